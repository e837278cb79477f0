//! Workers and the coroutine pools.
//!
//! A *worker* is a corosensei coroutine whose body is a loop: it receives a
//! header, runs that header's closure, reports how it ended, and waits for
//! the next header. Taking a worker from the pool therefore costs a context
//! switch, not a new context. A worker is a suspended coroutine, so it never
//! changes thread:
//!
//! * each thread keeps its idle workers of the default stack size in a
//!   local pool of at most [`pool_batch_size`] entries;
//! * a worker that does not fit is retired: its loop returns and its bare
//!   stack goes to the global release pool (at most twice the batch size,
//!   shared by all threads), or is unmapped;
//! * a thread whose local pool is empty builds a worker on a stack from the
//!   release pool before mapping a new one.
//!
//! Headers are pooled per thread as well (`recycle_header`).

use std::cell::Cell;
use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;

use corosensei::{CoroutineResult, Yielder};

use super::header::Header;
use super::stack::{CoStack, StackBounds, DEFAULT_STACK_SIZE};

/// What the enter loop asks of a worker, one word so that corosensei passes
/// it in a register: [`Cmd::RESUME`], [`Cmd::CANCEL`], [`Cmd::EXIT`], or the
/// address of a header whose closure an idle worker must run.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct Cmd(usize);

impl Cmd {
    /// Return from `suspend()`.
    pub(crate) const RESUME: Cmd = Cmd(0);
    /// Return from `suspend()` by unwinding (last handle dropped).
    pub(crate) const CANCEL: Cmd = Cmd(1);
    /// Leave the loop (the worker is idle and being retired).
    pub(crate) const EXIT: Cmd = Cmd(2);

    /// Run this header's closure (the worker is idle).
    pub(crate) fn run(h: &Header) -> Cmd {
        Cmd(h as *const Header as usize)
    }

    fn header(self) -> Option<NonNull<Header>> {
        if self.0 > Cmd::EXIT.0 {
            NonNull::new(self.0 as *mut Header)
        } else {
            None
        }
    }
}

/// How a worker handed control back. A panic's payload is left in the
/// header's `panic` slot, so this stays one byte.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Event {
    Suspended,
    Finished,
    Panicked,
    Cancelled,
}

/// Panic payload used to unwind a coroutine whose last handle was dropped.
pub(crate) struct Cancelled;

pub(crate) struct Worker {
    co: corosensei::Coroutine<Cmd, Event, (), CoStack>,
    pub(crate) bounds: StackBounds,
    pub(crate) size: usize,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("bounds", &self.bounds)
            .finish()
    }
}

fn worker_main(y: &Yielder<Cmd, Event>, mut cmd: Cmd) {
    loop {
        let h = match cmd.header() {
            Some(h) => h,
            None if cmd == Cmd::EXIT => return,
            None => {
                // The enter loop only resumes idle workers with a job or EXIT.
                log::error!("coroloop: idle worker resumed without a job");
                std::process::abort();
            }
        };
        // SAFETY: the enter loop keeps the header alive while the worker
        // runs it.
        let hr = unsafe { h.as_ref() };
        // `suspend()` finds the loop's yielder through the header: one
        // dependent load fewer on every switch than through the worker.
        hr.yielder.set(y);
        let run = hr.vtable.get().run;
        // SAFETY: the payload holds the closure this vtable was made for.
        let ev = match catch_unwind(AssertUnwindSafe(|| unsafe { run(hr) })) {
            Ok(()) => Event::Finished,
            Err(p) if hr.cancelling.get() && p.is::<Cancelled>() => Event::Cancelled,
            Err(p) => {
                hr.panic.set(Some(p));
                Event::Panicked
            }
        };
        cmd = y.suspend(ev);
    }
}

#[cold]
#[inline(never)]
fn worker_returned() -> ! {
    log::error!("coroloop: worker loop returned while running a job");
    std::process::abort();
}

impl Worker {
    fn new(stack: CoStack) -> NonNull<Worker> {
        super::overflow::ensure_installed();
        let bounds = stack.bounds();
        let size = stack.size();
        let w = Box::new(Worker {
            co: corosensei::Coroutine::with_stack(stack, worker_main),
            bounds,
            size,
        });
        NonNull::from(Box::leak(w))
    }

    /// Switches to the worker.
    ///
    /// # Safety
    ///
    /// `w` must be a live worker of this thread that is not on the current
    /// call chain, and `cmd` must fit its state (see [`Cmd`]).
    #[inline(always)]
    pub(crate) unsafe fn resume(w: NonNull<Worker>, cmd: Cmd) -> Event {
        // SAFETY: only the `co` field is borrowed mutably; code running on
        // the worker reaches the other fields through shared references.
        let co = unsafe { &mut (*w.as_ptr()).co };
        match co.resume(cmd) {
            CoroutineResult::Yield(ev) => ev,
            CoroutineResult::Return(()) => worker_returned(),
        }
    }

    /// Ends an idle worker's loop and gives back its stack.
    ///
    /// # Safety
    ///
    /// `w` must be an idle worker of this thread, not used afterwards.
    unsafe fn retire(w: NonNull<Worker>) -> CoStack {
        // SAFETY: the caller hands over ownership of the Box.
        let mut b = unsafe { Box::from_raw(w.as_ptr()) };
        if b.co.started() {
            match b.co.resume(Cmd::EXIT) {
                CoroutineResult::Return(()) => {}
                CoroutineResult::Yield(_) => {
                    log::error!("coroloop: retired worker did not exit");
                    std::process::abort();
                }
            }
        } else {
            // Never resumed: this only drops the (captureless) entry
            // function stored on the stack.
            b.co.force_unwind();
        }
        b.co.into_stack()
    }
}

/// Idle workers kept per thread, and headers.
struct LocalPool {
    workers: Vec<NonNull<Worker>>,
    headers: Vec<NonNull<Header>>,
    /// Workers handed out and not given back: the thread's unfinished
    /// coroutines (approximately: `reschedule_self` moves one to another
    /// thread), reported at the thread's exit.
    lent: isize,
}

impl Drop for LocalPool {
    fn drop(&mut self) {
        for w in self.workers.drain(..) {
            // SAFETY: pooled workers are idle and owned by the pool.
            let stack = unsafe { Worker::retire(w) };
            release_stack(stack);
        }
        for h in self.headers.drain(..) {
            // SAFETY: pooled headers are unreferenced and owned by the pool.
            drop(unsafe { Box::from_raw(h.as_ptr()) });
        }
    }
}

thread_local! {
    /// This thread's pool, allocated on first use. A const-initialised
    /// pointer without a destructor: reading it is a plain TLS load.
    static LOCAL: Cell<*mut LocalPool> = const { Cell::new(std::ptr::null_mut()) };
    /// Frees the pool when the thread exits.
    static LOCAL_OWNER: LocalOwner = const { LocalOwner };
}

struct LocalOwner;

impl Drop for LocalOwner {
    fn drop(&mut self) {
        // The thread is exiting: from now on suspended coroutines that are
        // dropped are leaked, not unwound (see `teardown.rs`).
        super::teardown::begin_thread_teardown();
        let p = LOCAL.with(|l| l.replace(std::ptr::null_mut()));
        if !p.is_null() {
            // SAFETY: as below; read before the pool is dropped.
            let lent = unsafe { (*p).lent };
            if lent > 0 {
                // Suspended coroutines cannot be unwound any more: they are
                // leaked, whether a later destructor drops their handles
                // (logged again then) or nothing ever does (their handles
                // held in a cycle, found by the API fuzzer to leak without
                // a word).
                log::warn!(
                    "coroloop: {lent} coroutine(s) of this thread are unfinished at its exit: \
                     their stacks are leaked (finish, cancel() or drop them before the thread \
                     exits; handles held in a cycle keep them too)"
                );
            }
            // SAFETY: `p` came from Box::into_raw in `with_local`, and was
            // unpublished above so nothing else can reach it.
            drop(unsafe { Box::from_raw(p) });
        }
    }
}

/// Runs `f` on this thread's pool; `None` while the thread is exiting.
/// `f` must not call back into the pool.
#[inline]
fn with_local<R>(f: impl FnOnce(&mut LocalPool) -> R) -> Option<R> {
    let mut p = LOCAL.try_with(Cell::get).ok()?;
    if p.is_null() {
        p = init_local()?;
    }
    // SAFETY: the pool belongs to this thread and `f` does not re-enter, so
    // this is the only reference to it.
    Some(f(unsafe { &mut *p }))
}

#[cold]
fn init_local() -> Option<*mut LocalPool> {
    // Register the destructor first; fails once the thread is exiting.
    LOCAL_OWNER.try_with(|_| ()).ok()?;
    let p = Box::into_raw(Box::new(LocalPool {
        workers: Vec::new(),
        headers: Vec::new(),
        lent: 0,
    }));
    LOCAL.with(|l| l.set(p));
    Some(p)
}

/// QEMU's initial pool size and batch size.
const POOL_INITIAL_SIZE: usize = 64;

static POOL_BATCH: AtomicUsize = AtomicUsize::new(POOL_INITIAL_SIZE);

/// Bare stacks shared by all threads (the release pool).
static RELEASE: Mutex<Vec<CoStack>> = Mutex::new(Vec::new());

/// Number of idle workers each thread keeps (and half the number of bare
/// stacks the process keeps). Starts at 64, as QEMU's pool.
///
/// # Examples
///
/// ```
/// use coroloop::coroutine;
/// let before = coroutine::pool_batch_size();
/// coroutine::increase_pool_batch_size(16);
/// assert_eq!(coroutine::pool_batch_size(), before + 16);
/// coroutine::decrease_pool_batch_size(16);
/// assert_eq!(coroutine::pool_batch_size(), before);
/// ```
#[inline]
pub fn pool_batch_size() -> usize {
    POOL_BATCH.load(Relaxed)
}

/// Lets the pools keep `n` more idle coroutines, for a user that expects
/// that many more in flight at once (QEMU raises it per virtqueue).
///
/// The pools never keep more stacks than [`max_live_stacks`] allows.
///
/// [`max_live_stacks`]: super::max_live_stacks
#[doc(alias = "qemu_coroutine_increase_pool_batch_size")]
#[doc(alias = "qemu_coroutine_inc_pool_size")]
pub fn increase_pool_batch_size(n: usize) {
    POOL_BATCH.fetch_add(n, Relaxed);
}

/// Undoes [`increase_pool_batch_size`]. The calling thread's pool and the
/// shared release pool shrink at once; other threads' pools shrink as their
/// coroutines finish.
///
/// # Panics
///
/// Panics if `n` is larger than the current batch size.
#[doc(alias = "qemu_coroutine_decrease_pool_batch_size")]
#[doc(alias = "qemu_coroutine_dec_pool_size")]
pub fn decrease_pool_batch_size(n: usize) {
    let r = POOL_BATCH.fetch_update(Relaxed, Relaxed, |cur| cur.checked_sub(n));
    match r {
        Err(cur) => {
            panic!("coroutine::decrease_pool_batch_size({n}): the batch size is only {cur}")
        }
        Ok(old) => trim_to(old - n),
    }
}

/// Shrinks this thread's pool and the release pool to `batch` (and twice
/// that) idle stacks; other threads shrink theirs as coroutines finish.
fn trim_to(batch: usize) {
    let extra = with_local(|p| {
        let keep = p.workers.len().min(batch);
        p.workers.split_off(keep)
    })
    .unwrap_or_default();
    for w in extra {
        // SAFETY: pooled workers are idle and owned by the pool.
        drop(unsafe { Worker::retire(w) });
    }
    let mut pool = RELEASE.lock().unwrap_or_else(|e| e.into_inner());
    let keep = pool.len().min(batch * 2);
    let extra = pool.split_off(keep);
    drop(pool);
    drop(extra);
}

/// A worker and a header for a new coroutine with a stack of `size` bytes.
#[inline]
pub(crate) fn take_pair(size: usize) -> io::Result<(NonNull<Worker>, NonNull<Header>)> {
    if size == DEFAULT_STACK_SIZE {
        // Fast path: both from this thread's pool in one visit.
        let pair = with_local(|p| match (p.workers.pop(), p.headers.pop()) {
            (Some(w), Some(h)) => {
                p.lent += 1;
                Some((w, h))
            }
            (w, h) => {
                p.workers.extend(w);
                p.headers.extend(h);
                None
            }
        });
        if let Some(Some(pair)) = pair {
            return Ok(pair);
        }
    }
    take_pair_slow(size)
}

#[cold]
fn take_pair_slow(size: usize) -> io::Result<(NonNull<Worker>, NonNull<Header>)> {
    let w = take_worker(size)?;
    let h = with_local(|p| {
        p.lent += 1;
        p.headers.pop()
    })
    .flatten()
    .unwrap_or_else(Header::new_boxed);
    Ok((w, h))
}

fn take_worker(size: usize) -> io::Result<NonNull<Worker>> {
    if size == DEFAULT_STACK_SIZE {
        let w = with_local(|p| p.workers.pop()).flatten();
        if let Some(w) = w {
            return Ok(w);
        }
        let stack = RELEASE.lock().unwrap_or_else(|e| e.into_inner()).pop();
        if let Some(stack) = stack {
            return Ok(Worker::new(stack));
        }
    }
    let stack = match CoStack::new(size) {
        Ok(s) => s,
        Err(e) if e.kind() == io::ErrorKind::OutOfMemory => {
            // Idle stacks count against the budget: give them back, retry.
            if trim_pools() == 0 {
                return Err(e);
            }
            CoStack::new(size)?
        }
        Err(e) => return Err(e),
    };
    Ok(Worker::new(stack))
}

/// Unmaps every idle stack this thread and the release pool hold; returns
/// how many were freed.
fn trim_pools() -> usize {
    let workers = with_local(|p| std::mem::take(&mut p.workers)).unwrap_or_default();
    let mut n = workers.len();
    for w in workers {
        // SAFETY: pooled workers are idle and owned by the pool.
        drop(unsafe { Worker::retire(w) });
    }
    let stacks = std::mem::take(&mut *RELEASE.lock().unwrap_or_else(|e| e.into_inner()));
    n += stacks.len();
    drop(stacks);
    n
}

/// Takes back an idle worker (its job finished, panicked or was unwound).
///
/// # Safety
///
/// `w` must be an idle worker of this thread that nothing else refers to.
#[inline]
pub(crate) unsafe fn release_worker(w: NonNull<Worker>) {
    // SAFETY: the caller guarantees w is live.
    if unsafe { w.as_ref() }.size == DEFAULT_STACK_SIZE {
        let batch = pool_batch_size();
        let kept = with_local(|p| {
            p.lent -= 1;
            if p.workers.len() < batch {
                p.workers.push(w);
                true
            } else {
                false
            }
        });
        if kept == Some(true) {
            return;
        }
    } else {
        with_local(|p| p.lent -= 1);
    }
    // SAFETY: forwarded from the caller.
    unsafe { retire_worker(w) };
}

/// # Safety
///
/// As [`release_worker`].
#[cold]
unsafe fn retire_worker(w: NonNull<Worker>) {
    // SAFETY: forwarded from the caller.
    let stack = unsafe { Worker::retire(w) };
    release_stack(stack);
}

fn release_stack(stack: CoStack) {
    if stack.size() != DEFAULT_STACK_SIZE {
        return;
    }
    let cap = pool_batch_size() * 2;
    let mut pool = RELEASE.lock().unwrap_or_else(|e| e.into_inner());
    if pool.len() < cap {
        pool.push(stack);
    }
}

/// Takes back a header nothing refers to.
#[inline]
pub(crate) fn recycle_header(h: NonNull<Header>) {
    let batch = pool_batch_size();
    let kept = with_local(|p| {
        if p.headers.len() < batch * 4 {
            p.headers.push(h);
            true
        } else {
            false
        }
    });
    if kept != Some(true) {
        // SAFETY: nothing refers to the header any more.
        drop(unsafe { Box::from_raw(h.as_ptr()) });
    }
}

/// Idle workers in this thread's pool and bare stacks in the release pool.
///
/// # Examples
///
/// ```
/// use coroloop::{coroutine, Coroutine};
/// let co = Coroutine::new(|| ());
/// co.enter();
/// let (local, _global) = coroutine::pool_stats();
/// assert!(local >= 1, "the finished coroutine's worker is pooled");
/// ```
pub fn pool_stats() -> (usize, usize) {
    let local = with_local(|p| p.workers.len()).unwrap_or(0);
    let global = RELEASE.lock().unwrap_or_else(|e| e.into_inner()).len();
    (local, global)
}
