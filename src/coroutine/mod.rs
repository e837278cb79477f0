//! Stackful coroutines, as QEMU's `qemu_coroutine_*` API.
//!
//! A [`Coroutine`] runs a closure on its own stack. [`enter`] switches to it
//! and returns when it [`suspend`]s or finishes; `enter` again resumes it
//! where it suspended. A coroutine may create and enter others: `suspend`
//! always returns to whoever entered the current coroutine (QEMU's caller
//! chain), and entering a coroutine that is already on the chain panics.
//!
//! ```
//! use coroloop::coroutine::{self, Coroutine};
//! use std::{cell::RefCell, rc::Rc};
//!
//! let log = Rc::new(RefCell::new(Vec::new()));
//! let l = log.clone();
//! let co = Coroutine::new(move || {
//!     l.borrow_mut().push("co: start");
//!     coroutine::suspend();
//!     l.borrow_mut().push("co: resumed");
//!     7
//! });
//! log.borrow_mut().push("main: enter");
//! co.enter();
//! log.borrow_mut().push("main: enter again");
//! co.enter();
//! assert!(co.is_finished());
//! assert_eq!(co.take_result(), Some(7));
//! assert_eq!(
//!     *log.borrow(),
//!     ["main: enter", "co: start", "main: enter again", "co: resumed"]
//! );
//! ```
//!
//! # Ownership
//!
//! Each coroutine has one kind of owner at a time:
//!
//! 1. **Its handles** (the default). When the last [`Coroutine`] handle is
//!    dropped while the coroutine is suspended, its *resumer* takes it over
//!    — its home [`AioContext`](crate::AioContext), or the
//!    [`CoroutineFuture`](crate::future::CoroutineFuture) it was created
//!    in — and it runs until it finishes, as a QEMU coroutine does (or a
//!    detached `std::thread`, or a tokio task whose `JoinHandle` was
//!    dropped). So the QEMU idiom `Coroutine::new(f).enter()` works: the
//!    temporary handle goes, the coroutine carries on. A *bare* coroutine
//!    (created where no context or future existed: nobody else could ever
//!    enter it) is unwound instead. [`Coroutine::cancel`] unwinds a
//!    coroutine explicitly.
//! 2. **A `CoroutineFuture`**, exclusively: dropping the future cancels it
//!    and every coroutine it resumes, as dropping any future cancels its
//!    work.
//! 3. **Its home context**, once [detached](Coroutine::detach), handed over
//!    by a dropped last handle, or spawned there
//!    (`AioContext::spawn_coroutine`).
//!
//! A context's shutdown (`shutdown()`, `IoThread::stop`, or dropping its
//! last user handle on its home thread) cancels every coroutine it
//! resumes, whoever owns it: nothing could resume it afterwards. Its handles
//! then see it finished without a result.
//!
//! *Unwinding* (cancellation) makes the coroutine's `suspend()` unwind
//! (without running the panic hook): destructors on its stack run, the
//! waits it was in are left cleanly, and its stack goes back to the pool.
//! Code running during that unwind must not suspend (a second `suspend`
//! re-raises the unwind; one from a destructor aborts). Under
//! `panic = "abort"` the coroutine cannot be unwound and is leaked with a
//! log line instead; so is a coroutine dropped or cancelled once its thread
//! has begun to exit, because its stack may borrow thread-locals that are
//! already destroyed (see the crate docs, "Thread-locals and thread exit").
//!
//! A handle dropped while its coroutine runs (for example the coroutine's
//! only handle cleared from inside it) lets the coroutine continue; when it
//! next suspends, its resumer takes it over (or, bare, it is unwound).
//!
//! # Wake-up list
//!
//! [`Coroutine::wake`] called from inside a coroutine does not switch: the
//! woken coroutine is appended to the *current* coroutine's wake-up list and
//! entered as soon as the current one suspends or finishes (QEMU's
//! `co_queue_wakeup`; the locks are built on it). Woken coroutines run
//! depth-first: those a coroutine wakes run before the ones queued earlier.
//! Called outside any coroutine, `wake` enters at once.
//!
//! # Panics
//!
//! A panic inside a coroutine finishes it and resumes unwinding out of the
//! `enter` (or `wake`) that resumed it, after the coroutines queued on wake-up
//! lists in that call have run.
//!
//! # Stacks and pools
//!
//! Stacks are `mmap`ed with a guard page ([`DEFAULT_STACK_SIZE`] = 1 MiB,
//! as QEMU; only touched pages use memory). Finished coroutines give their
//! stack, still set up as a live context, to a per-thread pool, so creating
//! a coroutine usually costs a few nanoseconds; see
//! [`increase_pool_batch_size`] and [`max_live_stacks`] for the limits that
//! keep the pools from exhausting `vm.max_map_count`. A coroutine that
//! overflows its stack aborts the process with
//! `coroutine 'NAME' has overflowed its stack` on stderr.
//!
//! [`enter`]: Coroutine::enter

mod builder;
mod current;
mod header;
mod join;
mod overflow;
mod pool;
mod registry;
mod remote;
mod resumer;
mod stack;
mod teardown;
mod wake;

use std::any::Any;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::marker::PhantomData;
use std::mem::ManuallyDrop;
use std::panic::resume_unwind;
use std::ptr::NonNull;
use std::sync::atomic::Ordering;

pub use builder::Builder;
pub use join::{JoinError, JoinFuture, JoinSet};
pub use pool::{decrease_pool_batch_size, increase_pool_batch_size, pool_batch_size, pool_stats};
pub use stack::{
    live_stacks, max_live_stacks, set_max_live_stacks, DEFAULT_STACK_SIZE, MIN_STACK_SIZE,
};
pub use wake::{yield_now, RemoteCoroutine};
// Waits that need a context live next to it (ARCHITECTURE.md, "Layering").
pub use crate::aio::co::{reschedule_self, sleep};

use header::{End, Header, State, WakeList, WeakRef};
use pool::{Cancelled, Cmd, Event, Worker};

pub(crate) use current::{pop_loop, push_loop, running_loop};
pub(crate) use registry::CoList;
pub(crate) use resumer::{set_default_resumer_hook, CoReqKind, Resumer};
pub(crate) use teardown::{
    begin_thread_teardown, set_thread_teardown_hook, thread_tearing_down, TeardownOnDrop,
};
pub(crate) use wake::{arrive, depart, enter_request, MovedOwner, Request, WakeOnDrop};

/// The result type of a handle whose coroutine's result type is not known,
/// such as the one [`Coroutine::current`] returns. It has no values: such a
/// handle's [`take_result`](Coroutine::take_result) always returns `None`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Erased {}

/// `!Send + !Sync` (the raw pointer), covariant in the result type.
type HandleMarker<T> = (*const (), fn() -> T);

/// A handle to a stackful coroutine whose body returns a `T`.
///
/// Handles are reference counted ([`Clone`]) and own the coroutine: see
/// [Ownership](self#ownership). They are `!Send`, because a coroutine's stack
/// may hold thread-bound values and therefore never changes thread:
///
/// ```compile_fail
/// let co = coroloop::Coroutine::new(|| ());
/// std::thread::spawn(move || co.enter());
/// ```
///
/// nor shared with one (`!Sync`):
///
/// ```compile_fail
/// let co = coroloop::Coroutine::new(|| ());
/// std::thread::scope(|s| {
///     s.spawn(|| co.is_finished());
/// });
/// ```
///
/// # Examples
///
/// ```
/// use coroloop::{coroutine, Coroutine};
///
/// let co = Coroutine::new(|| {
///     for _ in 0..3 {
///         coroutine::suspend();
///     }
///     "done"
/// });
/// let mut entries = 0;
/// while !co.is_finished() {
///     co.enter();
///     entries += 1;
/// }
/// assert_eq!(entries, 4);
/// assert_eq!(co.take_result(), Some("done"));
/// ```
pub struct Coroutine<T = ()> {
    h: NonNull<Header>,
    _marker: PhantomData<HandleMarker<T>>,
}

impl<T: 'static> Coroutine<T> {
    /// Creates a coroutine that will run `f` when first entered.
    ///
    /// # Panics
    ///
    /// Panics if no stack can be mapped; use [`Builder::build`] to get an
    /// `io::Error` instead.
    #[doc(alias = "qemu_coroutine_create")]
    #[inline]
    pub fn new<F>(f: F) -> Coroutine<T>
    where
        F: FnOnce() -> T + 'static,
    {
        match builder::spawn_inner(f, DEFAULT_STACK_SIZE) {
            Ok(co) => co,
            Err(e) => new_failed(e),
        }
    }

    /// Moves the result out once the coroutine has finished.
    ///
    /// Returns `None` before it finished, if it panicked or was unwound, if
    /// the result was already taken (through any handle), or if this handle
    /// is a [`Coroutine<Erased>`].
    pub fn take_result(&self) -> Option<T> {
        self.header().take_result::<T>()
    }
}

impl Coroutine<Erased> {
    /// The coroutine running on this thread, or `None` outside coroutines.
    ///
    /// # Examples
    ///
    /// ```
    /// use coroloop::Coroutine;
    /// assert!(Coroutine::current().is_none());
    /// let co = Coroutine::new(|| Coroutine::current().unwrap().name().map(String::from));
    /// co.enter();
    /// assert_eq!(co.take_result(), Some(None));
    /// ```
    #[doc(alias = "qemu_coroutine_self")]
    pub fn current() -> Option<Coroutine<Erased>> {
        let p = current::current_ptr();
        if p.is_null() {
            return None;
        }
        // SAFETY: the running coroutine's header is alive (the enter loop
        // holds a weak count on it).
        let h = unsafe { &*p };
        h.strong.set(h.strong.get() + 1);
        // SAFETY: we just took a strong count for the new handle.
        Some(unsafe { Coroutine::from_header(NonNull::from(h)) })
    }
}

impl<T> Coroutine<T> {
    /// # Safety
    ///
    /// The caller hands one strong count of `h` to the new handle.
    #[inline]
    unsafe fn from_header(h: NonNull<Header>) -> Coroutine<T> {
        Coroutine {
            h,
            _marker: PhantomData,
        }
    }

    #[inline]
    fn header(&self) -> &Header {
        // SAFETY: our strong count keeps the header alive.
        unsafe { self.h.as_ref() }
    }

    /// Enters the coroutine now: runs it until it suspends or finishes, then
    /// runs the coroutines it (and they) woke, then returns.
    ///
    /// # Panics
    ///
    /// * if the coroutine is already on this thread's call chain (it is
    ///   running, or it entered the coroutine calling `enter`), as QEMU's
    ///   "Co-routine re-entered recursively";
    /// * if the coroutine has finished;
    /// * with the coroutine's own panic, if it panics.
    #[doc(alias = "qemu_coroutine_enter")]
    #[inline]
    #[track_caller]
    pub fn enter(&self) {
        let h = self.header();
        match h.state.get() {
            State::Fresh | State::Suspended => enter_now(h),
            state => enter_refused(state),
        }
    }

    /// Enters the coroutine unless it is already on the call chain; returns
    /// whether it was entered.
    ///
    /// # Panics
    ///
    /// As [`enter`](Self::enter) if the coroutine has finished or panics.
    #[doc(alias = "qemu_coroutine_enter_if_inactive")]
    #[track_caller]
    pub fn enter_if_inactive(&self) -> bool {
        if self.is_entered() {
            return false;
        }
        self.enter();
        true
    }

    /// Wakes the coroutine on its home thread (QEMU's `aio_co_wake` without
    /// an AioContext).
    ///
    /// Inside a coroutine this appends it to the current coroutine's wake-up
    /// list (entered when the current one suspends or finishes); outside, it
    /// enters it before returning. Waking a coroutine that is running or
    /// already queued does nothing more, and waking a finished one does
    /// nothing: a coroutine may see a wake it was not waiting for, so code
    /// that suspends must check its own condition when resumed.
    ///
    /// # Examples
    ///
    /// ```
    /// use coroloop::{coroutine, Coroutine};
    /// use std::{cell::Cell, rc::Rc};
    ///
    /// let step = Rc::new(Cell::new(0));
    /// let s = step.clone();
    /// let waiter = Coroutine::new(move || {
    ///     coroutine::suspend();
    ///     s.set(s.get() + 1);
    /// });
    /// waiter.enter();
    /// let w = waiter.clone();
    /// let s = step.clone();
    /// let waker = Coroutine::new(move || {
    ///     w.wake();
    ///     assert_eq!(s.get(), 0, "woken coroutine runs after this one suspends");
    ///     coroutine::suspend();
    /// });
    /// waker.enter();
    /// assert_eq!(step.get(), 1);
    /// ```
    #[doc(alias = "aio_co_wake")]
    #[doc(alias = "aio_co_enter")]
    pub fn wake(&self) {
        wake_header(self.header());
    }

    /// Cancels the coroutine: a suspended one is unwound now (its
    /// `suspend()` unwinds, destructors on its stack run; any wait it was
    /// in is left cleanly), one never entered is dropped without running,
    /// and one on this thread's call chain (running, or waiting for a
    /// coroutine it entered) unwinds when it next suspends. Afterwards it
    /// is finished without a result. Cancelling a finished coroutine does
    /// nothing.
    ///
    /// Dropping the last handle does *not* cancel a coroutine that has a
    /// resumer: its context (or `CoroutineFuture`) takes it over and it
    /// runs to completion (see [Ownership](self#ownership)).
    ///
    /// # Panics
    ///
    /// With the panic of a destructor run by the unwind.
    ///
    /// # Examples
    ///
    /// ```
    /// use coroloop::{coroutine, Coroutine};
    /// use std::{cell::Cell, rc::Rc};
    ///
    /// struct Guard(Rc<Cell<bool>>);
    /// impl Drop for Guard {
    ///     fn drop(&mut self) {
    ///         self.0.set(true);
    ///     }
    /// }
    /// let dropped = Rc::new(Cell::new(false));
    /// let d = dropped.clone();
    /// let co = Coroutine::new(move || {
    ///     let _g = Guard(d);
    ///     coroutine::suspend();
    ///     unreachable!("cancelled while suspended");
    /// });
    /// co.enter();
    /// co.cancel();
    /// assert!(co.is_finished() && dropped.get());
    /// ```
    #[track_caller]
    pub fn cancel(&self) {
        let h = self.header();
        if let Some(p) = cancel_header(h) {
            resume_unwind(p);
        }
    }

    /// Whether the coroutine is on this thread's call chain: running, or
    /// waiting for a coroutine it entered to suspend.
    #[doc(alias = "qemu_coroutine_entered")]
    pub fn is_entered(&self) -> bool {
        self.header().state.get() == State::Running
    }

    /// Whether the coroutine has finished: returned, panicked, or was
    /// unwound.
    pub fn is_finished(&self) -> bool {
        self.header().state.get() == State::Finished
    }

    /// Whether the coroutine has been entered at least once.
    pub fn is_started(&self) -> bool {
        self.header().state.get() != State::Fresh
    }

    /// The name given to the [`Builder`], if any.
    pub fn name(&self) -> Option<&str> {
        self.header().name()
    }

    /// Forgets the result type, to keep coroutines of different types
    /// together.
    pub fn erase(self) -> Coroutine<Erased> {
        let this = ManuallyDrop::new(self);
        // SAFETY: the strong count moves from `this` (not dropped) to the
        // new handle.
        unsafe { Coroutine::from_header(this.h) }
    }

    pub(crate) fn header_addr(&self) -> usize {
        self.h.as_ptr() as usize
    }

    /// Clears the queued-request flags of requests a driver took (RMW, see
    /// `WakeFlag`), before entering the coroutine for them.
    pub(crate) fn release_request_flags(&self, scheduled: bool, woken: bool) {
        let h = self.header();
        if scheduled {
            h.scheduled.release();
        }
        if woken {
            h.woken.release();
        }
    }

    pub(crate) fn remote_ref(&self) -> RemoteRef {
        RemoteRef::new(self.header())
    }
}

impl<T> Clone for Coroutine<T> {
    fn clone(&self) -> Self {
        let h = self.header();
        h.strong.set(h.strong.get() + 1);
        // SAFETY: we just took a strong count for the new handle.
        unsafe { Coroutine::from_header(self.h) }
    }
}

impl<T> Drop for Coroutine<T> {
    #[inline]
    fn drop(&mut self) {
        let h = self.header();
        let strong = h.strong.get() - 1;
        h.strong.set(strong);
        if strong != 0 {
            return;
        }
        if h.state.get() == State::Finished && h.weak.get() == 0 {
            // Fast path: nothing left to run or unwind.
            // SAFETY: strong and weak are 0 and the coroutine finished; we
            // do not use the header afterwards.
            unsafe { Header::recycle_unreferenced(self.h) };
            return;
        }
        drop_last_handle(h);
    }
}

impl<T, U> PartialEq<Coroutine<U>> for Coroutine<T> {
    /// Two handles are equal when they refer to the same coroutine.
    fn eq(&self, other: &Coroutine<U>) -> bool {
        self.h == other.h
    }
}

impl<T> Eq for Coroutine<T> {}

impl<T> Hash for Coroutine<T> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.h.hash(state)
    }
}

impl<T> fmt::Debug for Coroutine<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let h = self.header();
        f.debug_struct("Coroutine")
            .field("addr", &self.h)
            .field("name", &h.name())
            .field("state", &h.state.get())
            .finish()
    }
}

/// Suspends the current coroutine: control returns to whoever entered it.
/// Returns when the coroutine is entered (or woken) again.
///
/// Being resumed is not a grant: a coroutine may be woken by something it
/// was not waiting for, so wait loops check their own condition.
///
/// # Panics
///
/// Panics if called outside a coroutine, or from a destructor running while
/// the coroutine is being unwound, by its cancellation or by its own panic
/// (a panic in a destructor during unwinding aborts the process, after the
/// message). std's panic count belongs to the thread, not to the stack: a
/// coroutine suspended in the middle of a panic would leave
/// `std::thread::panicking()` true for all other code on the thread. A
/// coroutine *entered* while the thread was already panicking (from a
/// destructor on another stack) may suspend.
#[doc(alias = "qemu_coroutine_yield")]
#[inline]
#[track_caller]
pub fn suspend() {
    let p = current::current_ptr();
    if p.is_null() {
        suspend_outside();
    }
    // SAFETY: the running coroutine's header is alive.
    let h = unsafe { &*p };
    if h.cancelling.get() {
        raise_cancel(h);
    }
    if std::thread::panicking() && !h.entered_panicking.get() {
        suspend_while_panicking();
    }
    // SAFETY: the running coroutine's yielder was set when its job started
    // and lives on its worker's stack, which is the stack we are running on.
    let y = unsafe { &*h.yielder.get() };
    // The switch is inlined into the caller on purpose: a call frame
    // between the caller and the switch costs a mispredicted return on
    // every resume (about 15 ns here).
    let cmd = y.suspend(Event::Suspended);
    if cmd != Cmd::RESUME {
        resumed_with(cmd);
    }
}

#[cold]
#[inline(never)]
#[track_caller]
fn suspend_outside() -> ! {
    panic!("coroutine::suspend() called outside a coroutine");
}

#[cold]
#[inline(never)]
fn resumed_with(cmd: Cmd) {
    if cmd == Cmd::CANCEL {
        let p = current::current_ptr();
        // SAFETY: the running coroutine's header is alive.
        unsafe { &*p }.cancel_raised.set(true);
        resume_unwind(Box::new(Cancelled));
    }
    log::error!("coroloop: suspended coroutine resumed as an idle worker");
    std::process::abort();
}

/// The coroutine is unwinding from its own panic and a destructor tries to
/// suspend. std's panic count is per thread, not per stack: suspending
/// would leave the panic "in progress" for whatever code runs on the
/// thread until the coroutine is resumed (`std::thread::panicking()` true
/// there, std mutexes poisoned by guards that merely go out of scope) and
/// the resumer's own bookkeeping skewed. Stable Rust can neither save nor
/// restore that count, so the suspension is refused. Being a panic inside
/// a destructor during unwinding, this aborts the process after printing
/// the message: loud, never a hang or a silently wrong state.
#[cold]
#[inline(never)]
#[track_caller]
fn suspend_while_panicking() -> ! {
    panic!(
        "coroutine::suspend() called while this coroutine is unwinding from a panic \
         (a destructor tried to wait); a coroutine cannot suspend in the middle of a panic"
    )
}

#[cold]
#[inline(never)]
fn raise_cancel(h: &Header) -> ! {
    // Refused only while *this* coroutine's own cancellation unwinds (a
    // destructor of the unwind suspends): the thread may be panicking for
    // another stack's sake (a coroutine created by such a destructor, or
    // entered during a panic elsewhere, is cancelled normally).
    if h.cancel_raised.get() && std::thread::panicking() {
        panic!(
            "coroutine::suspend() called while the coroutine is being unwound \
             (it was cancelled); code run during the unwind must not suspend"
        );
    }
    h.cancel_raised.set(true);
    resume_unwind(Box::new(Cancelled))
}

/// Whether the caller runs inside a coroutine.
///
/// ```
/// use coroloop::{coroutine, Coroutine};
/// assert!(!coroutine::in_coroutine());
/// Coroutine::new(|| assert!(coroutine::in_coroutine())).enter();
/// ```
#[doc(alias = "qemu_in_coroutine")]
pub fn in_coroutine() -> bool {
    !current::current_ptr().is_null()
}

/// The header address of the running coroutine (as
/// [`Coroutine::header_addr`]), or 0 outside any: a cheap identity check.
#[inline]
pub(crate) fn current_addr() -> usize {
    current::current_ptr() as usize
}

#[cold]
#[inline(never)]
#[track_caller]
fn new_failed(e: std::io::Error) -> ! {
    panic!("Coroutine::new: cannot create a coroutine: {e}")
}

#[cold]
#[inline(never)]
#[track_caller]
fn enter_refused(state: State) -> ! {
    if state == State::Running {
        panic!(
            "Coroutine::enter: coroutine re-entered recursively \
             (it is already on this thread's call chain)"
        )
    }
    panic!("Coroutine::enter: the coroutine has already finished")
}

#[cold]
#[inline(never)]
fn drop_last_handle(h: &Header) {
    // Hold the header while the owner's duties run; dropping this last
    // reference recycles it exactly once.
    let hold = WeakRef::new(h);
    release_owner(h);
    drop(hold);
}

/// Handles the last strong handle going away.
fn release_owner(h: &Header) {
    match h.state.get() {
        State::Fresh => discard_fresh(h),
        State::Suspended => {
            // ARCHITECTURE.md, "Who owns a coroutine", item 1: its resumer (home
            // context or `CoroutineFuture`) takes it over and it runs on;
            // a bare coroutine, which nobody else could enter, is unwound.
            if hand_to_resumer(h) {
                return;
            }
            // The caller (`Drop`) holds a weak count on `h`.
            if let Some(p) = unwind_now(h) {
                if std::thread::panicking() {
                    log::error!(
                        "coroloop: a coroutine panicked while being unwound during a panic; \
                         its panic is dropped"
                    );
                } else {
                    resume_unwind(p);
                }
            }
        }
        // Orphaned while running: when it next suspends, the enter loop
        // hands it to its resumer (or unwinds it); or it just finishes.
        State::Running => {}
        State::Finished => h.clear_payload(),
    }
}

/// Ends a coroutine that never ran: its closure is dropped, its handles
/// see it finished without a result.
fn discard_fresh(h: &Header) {
    // Finished first, the closure dropped last: its destructor may use the
    // coroutine's handles (an `enter` then finds it finished).
    if let Some(w) = h.worker.take() {
        h.state.set(State::Finished);
        h.end.set(End::Cancelled);
        h.links.unlink();
        h.bump_generation();
        // SAFETY: the worker never ran this job, so it is idle.
        unsafe { pool::release_worker(w) };
    }
    h.clear_payload();
    wake_joiners(h);
}

/// Gives a suspended coroutine without handles to its resumer; returns
/// whether the resumer took it. Not during the thread's teardown (the
/// coroutine is leaked then, see `unwind_cmd`).
fn hand_to_resumer(h: &Header) -> bool {
    if teardown::thread_tearing_down() || h.cancelling.get() {
        return false;
    }
    // SAFETY: home-thread field; the clone ends the borrow before calling.
    let Some(r) = (unsafe { (*h.resumer.get()).clone() }) else {
        return false;
    };
    h.strong.set(h.strong.get() + 1);
    // SAFETY: we took a strong count for the owning handle.
    let owner = unsafe { Coroutine::<Erased>::from_header(NonNull::from(h)) };
    h.detached.set(true);
    match r.adopt(owner) {
        Ok(()) => true,
        Err(owner) => {
            h.detached.set(false);
            // Back to no handle (without running `Drop`, which would come
            // back here); the caller unwinds it.
            std::mem::forget(owner);
            h.strong.set(h.strong.get() - 1);
            false
        }
    }
}

/// Unwinds a suspended coroutine now (or leaks it where it cannot be
/// unwound); returns its panic. The caller keeps `h` alive.
fn unwind_now(h: &Header) -> Option<Box<dyn Any + Send>> {
    let cmd = unwind_cmd(h)?;
    run_loop(h, cmd)
}

/// Cancels one coroutine for a resumer that ends (`CoList::cancel_all`):
/// a suspended one is unwound (or leaked, see `unwind_cmd`), a fresh one
/// discarded, one on the call chain unwinds at its next suspension.
pub(crate) fn cancel_header(h: &Header) -> Option<Box<dyn Any + Send>> {
    match h.state.get() {
        State::Fresh => {
            discard_fresh(h);
            None
        }
        State::Suspended => {
            let hold = WeakRef::new(h);
            let p = unwind_now(h);
            drop(hold);
            p
        }
        State::Running => {
            h.cancelling.set(true);
            None
        }
        State::Finished => None,
    }
}

/// Cancels the current coroutine: it unwinds now (from inside a library
/// wait whose context shut down, for example).
pub(crate) fn cancel_current() -> ! {
    let p = current::current_ptr();
    assert!(!p.is_null(), "cancel_current outside a coroutine");
    // SAFETY: the running coroutine's header is alive.
    unsafe { &*p }.cancelling.set(true);
    suspend();
    unreachable!("a cancelled coroutine's suspend() unwinds")
}

/// How to get rid of a suspended coroutine nobody owns.
///
/// Hole 5 of the soundness review: once the thread's teardown has begun,
/// the coroutine is leaked instead of unwound. Its stack may borrow a
/// thread-local (it suspended inside `LocalKey::with`) that std destroyed
/// earlier in the teardown; unwinding would run its destructors on that
/// freed memory. See `teardown.rs` for the order that remains.
fn unwind_cmd(h: &Header) -> Option<Cmd> {
    let why = if cfg!(panic = "abort") {
        Some("panic=abort cannot unwind its stack")
    } else if teardown::thread_tearing_down() {
        Some(
            "its thread is exiting, and its stack may borrow thread-locals \
             that are already destroyed",
        )
    } else {
        None
    };
    if let Some(why) = why {
        let name = h.name().unwrap_or("<unnamed>");
        log::warn!("coroloop: leaking suspended coroutine '{name}' ({h:p}): {why}");
        // The worker (and its mapped stack) is leaked on purpose.
        let _ = h.worker.take();
        h.state.set(State::Finished);
        h.end.set(End::Cancelled);
        h.links.unlink();
        h.bump_generation();
        wake_joiners(h);
        None
    } else {
        h.cancelling.set(true);
        Some(Cmd::CANCEL)
    }
}

/// Enters `h` now (it is Fresh or Suspended), resuming its panic if any.
/// The caller's handle keeps `h` alive.
#[inline(always)]
fn enter_now(h: &Header) {
    if let Some(p) = run_loop(h, start_cmd(h)) {
        resume_unwind(p);
    }
}

#[inline]
fn start_cmd(h: &Header) -> Cmd {
    match h.state.get() {
        State::Fresh => Cmd::run(h),
        _ => Cmd::RESUME,
    }
}

fn wake_header(h: &Header) {
    match h.state.get() {
        State::Running | State::Finished => return,
        State::Fresh | State::Suspended => {}
    }
    if h.ask_resumer.get() && wake::queue_if_refused(h) {
        return;
    }
    let cur = current::current_ptr();
    if cur.is_null() {
        enter_now(h);
    } else {
        // SAFETY: the running coroutine's header is alive.
        unsafe { &*cur }.push_wakeup(h);
    }
}

/// Runs `first` with `cmd`, then every coroutine queued on the wake-up
/// lists of the coroutines it ran, depth-first (a coroutine's list goes in
/// front of those queued earlier). Returns the first panic.
///
/// The caller keeps `first` alive (a strong handle or a weak count); the
/// others are kept alive by the weak counts of their list entries.
#[inline(always)]
fn run_loop(first: &Header, cmd: Cmd) -> Option<Box<dyn Any + Send>> {
    let from = current::current_ptr();
    let mut panic = None;
    run_one(first, from, cmd, &mut panic);
    if first.wakeup.is_empty() {
        return panic;
    }
    run_pending(first, from, panic)
}

#[cold]
fn run_pending(
    first: &Header,
    from: *const Header,
    mut panic: Option<Box<dyn Any + Send>>,
) -> Option<Box<dyn Any + Send>> {
    let pending = WakeList::new();
    pending.prepend(&first.wakeup);
    while let Some(r) = pending.pop_front() {
        let h = r.header();
        match h.state.get() {
            // Stale (finished) or redundant (already on the chain) wake.
            State::Finished | State::Running => continue,
            State::Fresh | State::Suspended => {}
        }
        run_one(h, from, start_cmd(h), &mut panic);
        pending.prepend(&h.wakeup);
    }
    panic
}

/// Switches to `h` until it suspends or finishes; unwinds it at once if
/// it suspended with no owner left.
#[inline(always)]
fn run_one(h: &Header, from: *const Header, mut cmd: Cmd, panic: &mut Option<Box<dyn Any + Send>>) {
    loop {
        if switch(h, from, cmd) == Event::Panicked {
            let p = h.panic.take();
            if panic.is_none() {
                *panic = p;
            } else {
                log::error!("coroloop: a second coroutine panicked in one enter; panic dropped");
            }
        }
        if h.state.get() == State::Suspended && h.strong.get() == 0 {
            // Its last handle went away while it ran: its resumer takes it
            // over, or (bare, or cancelled) it is unwound now.
            if hand_to_resumer(h) {
                return;
            }
            if let Some(c) = unwind_cmd(h) {
                cmd = c;
                continue;
            }
        }
        return;
    }
}

/// Switches to `h` and records how it came back.
#[inline(always)]
fn switch(h: &Header, from: *const Header, cmd: Cmd) -> Event {
    let w = match h.worker.get() {
        Some(w) => w,
        None => unreachable!("coroloop: entering a coroutine without a worker"),
    };
    if cmd == Cmd::RESUME && teardown::thread_tearing_down() {
        // Its stack may borrow thread-locals destroyed by now: a suspended
        // coroutine is not resumed once the thread's teardown began.
        return resume_refused(h);
    }
    h.state.set(State::Running);
    // The call chain, which `current::running_loop` walks: per-stack state
    // is found through it, never restored by a guard on a stack that may
    // stay suspended (see `current.rs`).
    h.caller.set(from);
    h.entered_panicking.set(std::thread::panicking());
    current::set_current(h);
    // SAFETY: `w` is this coroutine's worker, alive while unfinished, and
    // not on the call chain (the coroutine was Fresh or Suspended).
    let ev = unsafe { Worker::resume(w, cmd) };
    current::set_current(from);
    if ev == Event::Suspended {
        h.state.set(State::Suspended);
    } else {
        finish(h, w, ev == Event::Panicked);
    }
    ev
}

/// A suspended coroutine asked to resume during the thread's teardown: it
/// stays suspended (and is leaked with the thread).
#[cold]
#[inline(never)]
fn resume_refused(h: &Header) -> Event {
    let name = h.name().unwrap_or("<unnamed>");
    log::warn!(
        "coroloop: not resuming suspended coroutine '{name}' ({h:p}): its thread is exiting, \
         and its stack may borrow thread-locals that are already destroyed"
    );
    Event::Suspended
}

#[inline(always)]
fn finish(h: &Header, w: NonNull<Worker>, panicked: bool) {
    h.state.set(State::Finished);
    // How it ended, for `join`.
    h.end.set(if panicked {
        record_panic_text(h);
        End::Panicked
    } else if h.cancel_raised.get() || h.cancelling.get() {
        End::Cancelled
    } else {
        End::Returned
    });
    h.links.unlink();
    h.worker.set(None);
    h.cancelling.set(false);
    h.cancel_raised.set(false);
    h.bump_generation();
    // SAFETY: the worker's job ended, so it is idle in its loop.
    unsafe { pool::release_worker(w) };
    if h.strong.get() == 0 {
        // Nobody can take the result.
        h.clear_payload();
    }
    if h.detached.replace(false) {
        detached_finished(h);
    }
    wake_joiners(h);
}

/// Keeps the message of the panic `h` ended with, for its joiners (if any
/// handle is left to join it).
#[cold]
fn record_panic_text(h: &Header) {
    if h.strong.get() > 0 {
        let p = h.panic.take();
        h.panic_text.set(Some(panic_text_of(p.as_deref()).into()));
        h.panic.set(p);
    }
}

/// Wakes those joining `h`, which just finished.
#[inline(always)]
fn wake_joiners(h: &Header) {
    if h.has_joiners() {
        wake_joiners_cold(h);
    }
}

#[cold]
fn wake_joiners_cold(h: &Header) {
    for w in h.joiners.take() {
        w.wake();
    }
}

/// The text of a panic payload (`&str` or `String`).
pub(crate) fn panic_text_of(p: Option<&(dyn Any + Send)>) -> String {
    match p {
        Some(p) => {
            if let Some(s) = p.downcast_ref::<&str>() {
                s.to_string()
            } else if let Some(s) = p.downcast_ref::<String>() {
                s.clone()
            } else {
                "a non-string panic payload".to_string()
            }
        }
        None => String::new(),
    }
}

/// Tells the owning context that a detached coroutine finished, so it
/// drops its handle.
#[cold]
fn detached_finished(h: &Header) {
    // SAFETY: home-thread field; the clone ends the borrow before calling.
    let r = unsafe { (*h.resumer.get()).clone() };
    if let Some(r) = r {
        r.detached_finished(h as *const Header as usize);
    }
}

/// A reference to a coroutine usable from any thread: it keeps the header
/// allocated (never the coroutine alive) and remembers the generation it
/// was made in, so it goes stale once that coroutine finishes.
///
/// The wakers and remote handles of the AioContext and future bridges are
/// built on it.
pub(crate) struct RemoteRef {
    h: NonNull<Header>,
    generation: u64,
}

// SAFETY: a RemoteRef only touches the header's atomic fields (`generation`
// and `remote`) off the home thread; the header is freed by whichever
// thread drops the last reference, after the home thread cleared every
// thread-bound field (see `Header::maybe_recycle`).
unsafe impl Send for RemoteRef {}
// SAFETY: as above; every method takes `&self` and only reads atomics.
unsafe impl Sync for RemoteRef {}

impl RemoteRef {
    pub(crate) fn new(h: &Header) -> RemoteRef {
        header::acquire_remote(h);
        RemoteRef {
            h: NonNull::from(h),
            generation: h.generation.load(Ordering::Acquire),
        }
    }

    /// Marks the reference stale (never current again): the generation
    /// before the one read, which the header has left for good.
    pub(crate) fn make_stale(&mut self) {
        self.generation = self.generation.wrapping_sub(1);
    }

    /// The header's address (identity only).
    pub(crate) fn header_addr(&self) -> usize {
        self.h.as_ptr() as usize
    }

    /// The header. Off the home thread only its atomic fields may be read.
    pub(crate) fn header(&self) -> &Header {
        // SAFETY: our remote count keeps the header allocated.
        unsafe { self.h.as_ref() }
    }

    /// Whether the coroutine this reference was made for is still the one
    /// the header describes and has not finished.
    pub(crate) fn is_current(&self) -> bool {
        // SAFETY: our remote count keeps the header allocated.
        unsafe { self.h.as_ref() }
            .generation
            .load(Ordering::Acquire)
            == self.generation
    }

    /// A handle to the coroutine, on its home thread, if it is current.
    ///
    /// # Safety
    ///
    /// Must be called on the coroutine's home thread.
    pub(crate) unsafe fn upgrade(&self) -> Option<Coroutine<Erased>> {
        // SAFETY: our remote count keeps the header allocated; the caller
        // is on the home thread, so the Cell fields may be read.
        let h = unsafe { self.h.as_ref() };
        if !self.is_current() || h.strong.get() == 0 {
            return None;
        }
        h.strong.set(h.strong.get() + 1);
        // SAFETY: we took a strong count for the handle.
        Some(unsafe { Coroutine::from_header(self.h) })
    }
}

impl Clone for RemoteRef {
    fn clone(&self) -> Self {
        // SAFETY: our remote count keeps the header allocated.
        header::acquire_remote(unsafe { self.h.as_ref() });
        RemoteRef {
            h: self.h,
            generation: self.generation,
        }
    }
}

impl Drop for RemoteRef {
    fn drop(&mut self) {
        // SAFETY: we own one remote count and give it up here.
        unsafe { header::release_remote(self.h) };
    }
}

impl fmt::Debug for RemoteRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteRef")
            .field("addr", &self.h)
            .field("generation", &self.generation)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_ref_goes_stale_when_the_coroutine_finishes() {
        let co = Coroutine::new(suspend);
        let r = co.remote_ref();
        assert!(r.is_current());
        co.enter();
        // SAFETY: same thread.
        assert!(unsafe { r.upgrade() }.is_some());
        co.enter();
        assert!(co.is_finished());
        assert!(!r.is_current());
        // SAFETY: same thread.
        assert!(unsafe { r.upgrade() }.is_none());
    }

    #[test]
    fn header_outlives_handles_while_remote_refs_exist() {
        let co = Coroutine::new(|| 5u32);
        let r = co.remote_ref();
        co.enter();
        drop(co);
        // The home thread let go: the header waits for the remote drop.
        let t = std::thread::spawn(move || {
            assert!(!r.is_current());
            drop(r);
        });
        t.join().unwrap();
        // A new coroutine still works (the header was freed, not pooled).
        let co = Coroutine::new(|| 6u32);
        co.enter();
        assert_eq!(co.take_result(), Some(6));
    }

    #[test]
    fn resumer_is_inherited_by_nested_coroutines() {
        use std::sync::{Arc, Mutex};
        struct Recorder(Mutex<Vec<bool>>);
        impl Resumer for Recorder {
            fn queue(&self, co: RemoteRef, _kind: CoReqKind) {
                self.0.lock().unwrap().push(co.is_current());
            }
        }
        let rec: Arc<Recorder> = Arc::new(Recorder(Mutex::new(Vec::new())));
        let outer = Coroutine::new(|| {
            let inner = Coroutine::new(|| ());
            // SAFETY: home-thread field of a live header.
            let r = unsafe { (*inner.header().resumer.get()).clone() };
            r.map(|r| r.queue(inner.remote_ref(), CoReqKind::Schedule))
                .is_some()
        });
        let dynrec: Arc<dyn Resumer> = rec.clone();
        // SAFETY: home-thread field of a fresh header, set before entering.
        unsafe { *outer.header().resumer.get() = Some(dynrec) };
        outer.enter();
        assert_eq!(outer.take_result(), Some(true));
        assert_eq!(*rec.0.lock().unwrap(), [true]);
    }
}
