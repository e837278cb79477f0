//! `coroutine::Builder`: name and stack size, fallible creation.

use std::io;

use super::header::Header;
use super::stack::{round_stack_size, DEFAULT_STACK_SIZE};
use super::{current, overflow, pool, Coroutine};

/// Configures a coroutine before creating it: its name (shown in stack
/// overflow reports and `Debug`) and its stack size. Unlike
/// [`Coroutine::new`], [`build`](Builder::build) reports a stack that cannot
/// be mapped as an `io::Error`.
///
/// `build` only creates the coroutine, as [`Coroutine::new`] does: it runs
/// when entered (unlike `std::thread::Builder::spawn`, which starts the
/// thread). Run it with [`Coroutine::enter`], or queue it on a context
/// with [`AioContext::co_schedule`](crate::AioContext::co_schedule).
///
/// # Examples
///
/// ```
/// use coroloop::coroutine::{self, Builder};
///
/// let co = Builder::new()
///     .name("worker")
///     .stack_size(64 * 1024)
///     .build(|| {
///         coroutine::suspend();
///         21 * 2
///     })?;
/// assert_eq!(co.name(), Some("worker"));
/// assert!(!co.is_started(), "built, not run");
/// co.enter();
/// co.enter();
/// assert_eq!(co.take_result(), Some(42));
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Debug, Clone, Default)]
#[doc(alias = "qemu_coroutine_create")]
pub struct Builder {
    name: Option<String>,
    stack_size: Option<usize>,
}

impl Builder {
    /// A builder with no name and the default stack size
    /// ([`DEFAULT_STACK_SIZE`](super::DEFAULT_STACK_SIZE), 1 MiB).
    pub fn new() -> Builder {
        Builder::default()
    }

    /// Names the coroutine.
    pub fn name(mut self, name: impl Into<String>) -> Builder {
        self.name = Some(name.into());
        self
    }

    /// Sets the usable stack size in bytes (rounded up to whole pages, at
    /// least [`MIN_STACK_SIZE`](super::MIN_STACK_SIZE)). A guard page is
    /// added below it. Only stacks of the default size are pooled.
    pub fn stack_size(mut self, size: usize) -> Builder {
        self.stack_size = Some(size);
        self
    }

    /// Creates the coroutine (QEMU's `qemu_coroutine_create`). It does not
    /// run until entered.
    ///
    /// # Errors
    ///
    /// `OutOfMemory` (or the `mmap` error) when no stack can be mapped: the
    /// [stack budget](super::max_live_stacks) is spent or the system refused
    /// the memory. The message begins with `coroutine::Builder::build: `.
    pub fn build<F, T>(self, f: F) -> io::Result<Coroutine<T>>
    where
        F: FnOnce() -> T + 'static,
        T: 'static,
    {
        let size = match self.stack_size {
            None => DEFAULT_STACK_SIZE,
            Some(s) => round_stack_size(s),
        };
        let co = spawn_inner(f, size)
            .map_err(|e| io::Error::new(e.kind(), format!("coroutine::Builder::build: {e}")))?;
        if let Some(name) = self.name {
            let hr = co.header();
            // SAFETY: home-thread fields of a header nothing else sees yet.
            unsafe {
                *hr.overflow_msg.get() = Some(overflow::render_named(&name));
                *hr.name.get() = Some(name.into_boxed_str());
            }
        }
        Ok(co)
    }
}

/// Creates an unnamed coroutine with a stack of `size` bytes.
#[inline]
pub(super) fn spawn_inner<F, T>(f: F, size: usize) -> io::Result<Coroutine<T>>
where
    F: FnOnce() -> T + 'static,
    T: 'static,
{
    let (worker, h) = pool::take_pair(size)?;
    // SAFETY: a header from the pool is unreferenced and ours.
    let hr = unsafe { h.as_ref() };
    hr.init(f);
    // SAFETY: the worker is idle and now owned by this header.
    hr.bounds.set(unsafe { worker.as_ref() }.bounds);
    hr.worker.set(Some(worker));
    let cur = current::current_ptr();
    // A callback of a `poll` running on the current coroutine's stack (a
    // nested poll) is the loop's code, not the coroutine's: what it creates
    // belongs to the loop's context (found by the API fuzzer: an fd
    // handler's coroutine, created in a nested poll inside a
    // `CoroutineFuture` and detached, was taken over by the future, which
    // then waited for it for ever).
    // SAFETY: the running coroutine's header is alive while it runs.
    let in_loop_callback = !cur.is_null() && !unsafe { (*cur).own_loop.get() }.is_null();
    if !cur.is_null() && !in_loop_callback {
        inherit_resumer(cur, hr);
    } else if let Some((r, list)) = super::resumer::default_resumer() {
        // SAFETY: the list lives in the resumer `r`, which stays alive (in
        // the header) for as long as the coroutine is linked.
        unsafe { &*list }.link(hr);
        // SAFETY: home-thread field of a header nothing else sees yet.
        unsafe { *hr.resumer.get() = Some(r) };
    }
    // SAFETY: `init` set strong to 1 for this handle.
    Ok(unsafe { Coroutine::from_header(h) })
}

/// A coroutine created inside another one shares its resumer.
fn inherit_resumer(cur: *const Header, h: &Header) {
    // SAFETY: the running coroutine's header is alive; resumer is a
    // home-thread field and no reference into it is live.
    unsafe {
        if let Some(r) = &*(*cur).resumer.get() {
            if let Some(list) = r.coroutines() {
                list.link(h);
            }
            *h.resumer.get() = Some(r.clone());
            h.ask_resumer.set((*cur).ask_resumer.get());
        }
    }
}
