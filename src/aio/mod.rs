//! The AioContext event loop, as QEMU's `include/block/aio.h`.
//!
//! An [`AioContext`] runs bottom halves ([`Bh`]), fd handlers
//! ([`FdHandler`]), timers ([`Timer`]) and coroutines on one thread, its
//! *home thread*: the thread that created it (or the thread an [`IoThread`]
//! starts). Only the home thread calls [`poll`](AioContext::poll); other
//! threads schedule bottom halves, wake coroutines and [`notify`] it.
//!
//! # One iteration of `poll`
//!
//! ```text
//!  poll(blocking)
//!   ├─ submit file requests queued outside the loop   (file/: io_uring, Linux AIO)
//!   ├─ timeout = blocking ? compute_timeout() : 0     BHs, coroutines, timers,
//!   │                                                 file completions waiting
//!   ├─ busy-poll io_poll handlers up to poll_ns       adaptive polling (and the
//!   │                                                 file engines' queues)
//!   ├─ notify_me += 2; fence; if notified: timeout=0  (notify.rs)
//!   ├─ wait for fds (epoll or io_uring) up to timeout skipped when non-blocking
//!   │                                                 and nothing needs the kernel
//!   ├─ notify_me -= 2; accept the notify
//!   ├─ bottom halves (slices: see bh.rs)
//!   ├─ scheduled and woken coroutines
//!   ├─ tasks
//!   ├─ file completions: their coroutines resume
//!   ├─ ready fd handlers
//!   ├─ expired timers
//!   └─ submit the file requests of this iteration     one io_uring_enter / io_submit
//!  returns whether any callback ran ("progress"); a bare notify is not progress
//! ```
//!
//! A panic in a callback or coroutine unwinds out of `poll` to its caller;
//! the context stays usable and the work not yet run stays queued.
//!
//! [`notify`]: AioContext::notify

mod bh;
pub(crate) mod co;
mod fd;
mod fdmon;
mod fdmon_uring;
mod file;
mod iothread;
mod notify;
mod task;
mod task_handle;
mod thread_pool;
mod timer;
mod wait;

use std::cell::{Cell, RefCell, UnsafeCell};
use std::collections::HashMap;
use std::fmt;
use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

pub use bh::{Bh, LocalBh};
pub use fd::{FdHandler, IoHandler, IoPollHandler, RawFdSource};
pub use fdmon::FdMonitorKind;
pub use file::{AioMode, CoFile, IoUring, LinuxAio};
pub use iothread::{IoThread, IoThreadBuilder};
pub use notify::EventNotifier;
pub use task_handle::{FallibleTask, Task};
pub use thread_pool::ThreadPool;
pub use timer::{ClockType, Timer};
pub use wait::wait_kick;

use crate::coroutine::{Coroutine, Erased};
use fdmon::{FdMonitor, Ready};

/// Key of the context's own notifier in the fd monitor.
const NOTIFY_KEY: u64 = u64::MAX;

/// QEMU's default `poll-max-ns` for IOThreads: 32 µs.
pub const IOTHREAD_POLL_MAX_NS: i64 = 32_000;

thread_local! {
    /// A serial number for this thread, assigned on first use: unlike a
    /// `ThreadId` it is a plain TLS load, and unlike a TLS address it is
    /// never reused.
    static THREAD_SERIAL: Cell<u64> = const { Cell::new(0) };
    /// The first context created on this thread that is still alive.
    static HOME_DEFAULT: HomeDefault = const {
        HomeDefault { _teardown: crate::coroutine::TeardownOnDrop, ctx: RefCell::new(None) }
    };
}

/// The thread's default context; its destruction begins the thread's
/// teardown (see `coroutine/teardown.rs`).
pub(crate) struct HomeDefault {
    /// First: fields drop in order, so the teardown begins before the
    /// rest goes (see `coroutine/teardown.rs`).
    _teardown: crate::coroutine::TeardownOnDrop,
    ctx: RefCell<Option<Weak<Inner>>>,
}

/// The thread's default context, if it is alive (`None` as well once the
/// thread's thread-locals are being destroyed).
pub(crate) fn home_default() -> Option<Arc<Inner>> {
    HOME_DEFAULT
        .try_with(|d| d.ctx.borrow().as_ref().and_then(Weak::upgrade))
        .ok()
        .flatten()
}

/// This thread's serial (see `THREAD_SERIAL`).
pub(crate) fn thread_serial() -> u64 {
    THREAD_SERIAL.with(|s| {
        let v = s.get();
        if v != 0 {
            return v;
        }
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let v = NEXT.fetch_add(1, Ordering::Relaxed);
        s.set(v);
        v
    })
}

/// An event loop (QEMU's `AioContext`). Cheap to clone; `Send + Sync`.
///
/// # Examples
///
/// ```
/// use coroloop::aio::AioContext;
/// use std::sync::{atomic::{AtomicBool, Ordering}, Arc};
///
/// let ctx = AioContext::new()?;
/// let done = Arc::new(AtomicBool::new(false));
/// let d = done.clone();
/// let remote = ctx.clone();
/// std::thread::spawn(move || {
///     remote.bh_schedule_oneshot(move || d.store(true, Ordering::Release));
/// });
/// ctx.poll_while(|| !done.load(Ordering::Acquire));
/// # std::io::Result::Ok(())
/// ```
pub struct AioContext {
    pub(crate) inner: Arc<Inner>,
    /// Whether this handle counts as a user handle (`Inner::handles`).
    /// The library's own references to a context (the timer of a sleeping
    /// coroutine, an fd wait) do not: a context that no user handle can
    /// reach any more shuts down instead of keeping its coroutines waiting
    /// unpolled forever (ARCHITECTURE.md, "Who owns a coroutine").
    counted: bool,
}

impl AioContext {
    /// A new user handle (counted in `handles`).
    pub(crate) fn from_inner(inner: Arc<Inner>) -> AioContext {
        inner.handles.fetch_add(1, Ordering::Relaxed);
        AioContext {
            inner,
            counted: true,
        }
    }

    /// A handle for the library's own use, which does not keep the
    /// context from shutting down when the last user handle goes (it keeps
    /// only its memory). Its clones are internal too.
    pub(crate) fn internal(&self) -> AioContext {
        AioContext {
            inner: self.inner.clone(),
            counted: false,
        }
    }
}

impl Clone for AioContext {
    fn clone(&self) -> AioContext {
        if self.counted {
            AioContext::from_inner(self.inner.clone())
        } else {
            self.internal()
        }
    }
}

impl Drop for AioContext {
    /// The last handle dropped on the home thread shuts the context down
    /// there (see [`shutdown`](AioContext::shutdown)), even if another
    /// thread briefly holds the context (a wake or a completion in flight)
    /// and would otherwise drop it last, off its home thread.
    fn drop(&mut self) {
        if self.counted
            && self.inner.handles.fetch_sub(1, Ordering::AcqRel) == 1
            && self.inner.is_home()
            && !self.inner.closing.load(Ordering::Acquire)
        {
            self.shutdown();
        }
    }
}

pub(crate) struct Inner {
    home: u64,
    name: Option<String>,
    notify_core: notify::NotifyCore,
    notifier: EventNotifier,
    pub(crate) monitor: Box<dyn FdMonitor>,
    pub(crate) bh: bh::BhQueues,
    pub(crate) external_disable: AtomicU32,
    pub(crate) virtual_ns: AtomicI64,
    dead: AtomicBool,
    /// Set when `shutdown` starts (before `dead`): a handle made and dropped
    /// during the shutdown (by a destructor it runs) must not start another
    /// one, nested on the stack.
    closing: AtomicBool,
    /// Set when `shutdown` has finished.
    shut: AtomicBool,
    /// `AioContext` handles (the `Arc` also counts internal references).
    handles: AtomicUsize,
    poll_max_ns: AtomicI64,
    poll_grow: AtomicI64,
    poll_shrink: AtomicI64,
    pub(crate) co: co::CoQueue,
    pub(crate) tasks: task::TaskQueues,
    thread_pool: OnceLock<ThreadPool>,
    /// Home-thread state; see `local()`.
    local: UnsafeCell<ManuallyDrop<Local>>,
}

// SAFETY: `local` is only reached through `Inner::local`, whose callers run
// on the home thread (checked by `assert_home` at every public entry); the
// other fields are atomics, thread-safe types, or immutable.
unsafe impl Sync for Inner {}
// SAFETY: as above. Dropping `Inner` off its home thread leaks `local`
// instead of dropping its thread-bound contents there (see `Drop`).
unsafe impl Send for Inner {}

pub(crate) struct Local {
    pub(crate) handlers: fd::Handlers,
    timers: timer::Timers,
    poll_ns: Cell<i64>,
    poll_started: Cell<bool>,
    /// Coroutines owned by this context (`Coroutine::detach`).
    pub(crate) detached: RefCell<HashMap<usize, Coroutine<Erased>>>,
    /// io_uring and Linux AIO, set up on first use.
    pub(crate) engines: file::Engines,
}

impl Inner {
    /// The serial of the home thread (see `thread_serial`).
    pub(crate) fn home_serial(&self) -> u64 {
        self.home
    }

    #[inline]
    pub(crate) fn is_home(&self) -> bool {
        thread_serial() == self.home
    }

    #[inline]
    #[track_caller]
    pub(crate) fn assert_home(&self, api: &str) {
        if !self.is_home() {
            home_violation(api);
        }
    }

    /// The home-thread state. Callers are on the home thread.
    #[inline]
    pub(crate) fn local(&self) -> &Local {
        debug_assert!(self.is_home());
        // SAFETY: only the home thread gets here (callers assert it), and
        // `Local`'s fields use interior mutability for their own updates.
        unsafe { &*self.local.get() }
    }

    pub(crate) fn timers(&self) -> &timer::Timers {
        &self.local().timers
    }

    /// Whether `shutdown` has finished (not merely started).
    pub(crate) fn is_shut(&self) -> bool {
        self.shut.load(Ordering::Acquire)
    }

    #[inline]
    pub(crate) fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }

    /// Wakes the loop if it sleeps (QEMU's `aio_notify`). Any thread.
    #[inline]
    pub(crate) fn notify(&self) {
        if self.notify_core.notify() {
            let _ = self.notifier.set();
        }
    }

    /// After queueing work on the home thread: wakes an outer loop of this
    /// thread that prepared to sleep on the context's fd (`prepare`,
    /// `run_in_smol`) while code it runs (a smol task) queued the work.
    /// Inside `poll` nothing is prepared and this is one load. Found while
    /// writing ARCHITECTURE.md: a BH scheduled, or a coroutine woken, from
    /// a smol task beside `run_in_smol` waited for an unrelated event.
    #[inline]
    pub(crate) fn notify_home(&self) {
        if self.notify_core.armed_here() {
            self.notify();
        }
    }
}

#[cold]
#[inline(never)]
#[track_caller]
fn home_violation(api: &str) -> ! {
    panic!("`{api}` called off the context's home thread")
}

impl Local {
    /// What the home-thread state still holds that is bound to the home
    /// thread (callbacks, coroutines, requests of coroutines), or `None` if
    /// it holds nothing of the kind and may be dropped on any thread.
    fn leftovers(&self) -> Option<String> {
        let mut what = Vec::new();
        let n = self.handlers.len();
        if n > 0 {
            what.push(format!("{n} fd handler(s)"));
        }
        if !self.timers.is_empty() {
            what.push("timers".to_string());
        }
        let n = self.detached.borrow().len();
        if n > 0 {
            what.push(format!("{n} detached coroutine(s)"));
        }
        if !self.engines.is_idle() {
            what.push("file requests".to_string());
        }
        (!what.is_empty()).then(|| what.join(", "))
    }
}

impl Inner {
    /// At the home thread's teardown: what this live context still holds
    /// that nothing will drop unless a handle does later (its callbacks,
    /// tasks, detached coroutines, BHs), or `None`. Home thread only.
    pub(crate) fn held_at_thread_exit(&self) -> Option<String> {
        let mut what: Vec<String> = self.local().leftovers().into_iter().collect();
        let tasks = self.tasks.live();
        if tasks > 0 {
            what.push(format!("{tasks} task(s)"));
        }
        if self.bh.has_home_nodes_shared() {
            what.push("bottom halves".to_string());
        }
        (!what.is_empty()).then(|| what.join(", "))
    }
}

/// Panics caught while a context is torn down, so that every piece of the
/// teardown runs even if a destructor panics: the first panic is resumed
/// by [`finish`](Self::finish), the others are logged.
pub(crate) struct Panics {
    what: &'static str,
    first: Option<Box<dyn std::any::Any + Send>>,
}

impl Panics {
    pub(crate) fn new(what: &'static str) -> Panics {
        Panics { what, first: None }
    }

    /// Runs `f` (one destructor, or one step that runs destructors),
    /// keeping its panic.
    pub(crate) fn catch(&mut self, f: impl FnOnce()) {
        if let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
            self.keep(p);
        }
    }

    /// Keeps the first panic; logs and disposes of the others, without
    /// letting a payload whose own drop panics unwind out of the teardown
    /// (such a payload is leaked).
    pub(crate) fn keep(&mut self, p: Box<dyn std::any::Any + Send>) {
        if self.first.is_none() {
            self.first = Some(p);
            return;
        }
        let what = self.what;
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            log::error!(
                "coroloop: {what}: another destructor panicked ({}); only the first panic \
                 is resumed",
                panic_text(&*p)
            );
            drop(p);
        }));
        if let Err(again) = r {
            std::mem::forget(again);
        }
    }

    /// Resumes the first panic caught (logs it instead if the thread is
    /// already unwinding: a second panic would abort).
    pub(crate) fn finish(self) {
        let Some(p) = self.first else { return };
        if std::thread::panicking() {
            log::error!(
                "coroloop: {}: a destructor panicked during a panic ({}); its panic is dropped",
                self.what,
                panic_text(&*p)
            );
        } else {
            std::panic::resume_unwind(p);
        }
    }
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> &str {
    if let Some(s) = p.downcast_ref::<&str>() {
        s
    } else if let Some(s) = p.downcast_ref::<String>() {
        s
    } else {
        "a non-string payload"
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let home = self.home == thread_serial();
        let mut panics = Panics::new("dropping an AioContext");
        // Unfinished tasks that wait in no queue: woken, their scheduler
        // finds the context gone and drops them (home-bound ones only on
        // the home thread; elsewhere they are leaked, see below).
        self.tasks.wake_all_active(&mut panics);
        if home {
            self.tasks.clear(&mut panics);
            // No handle is left (each keeps the context alive): every node
            // still linked is a oneshot or deleted; free them here.
            bh::shutdown_queues(&self.bh, &mut panics);
        } else {
            let n = self.tasks.forget_local();
            if n > 0 {
                log::warn!(
                    "coroloop: AioContext {:?} dropped off its home thread with {n} local \
                     task(s) queued; they are leaked",
                    self.name
                );
            }
        }
        let local = self.local.get_mut();
        // Off the home thread the state is dropped only if it holds nothing
        // bound to the home thread, checked here, never inferred from
        // `dead`: a shutdown is no proof that the state is empty (a timer
        // re-armed by a nested poll after the shutdown, a shutdown cut
        // short by a panicking destructor both left callbacks behind, and
        // this drop ran their destructors, `Rc`s included, on the wrong
        // thread). Whatever is left is leaked instead.
        let leftovers = if home {
            None
        } else {
            // BH nodes still on the home lists (a `LocalBh` dropped or a
            // oneshot scheduled on the home thread, not dispatched since)
            // may hold callbacks bound to the home thread: they are leaked
            // with the rest (found by the API fuzzer; they used to be
            // leaked without a word).
            let bhs = self
                .bh
                .has_home_nodes()
                .then(|| "bottom halves".to_string());
            match (local.leftovers(), bhs) {
                (Some(a), Some(b)) => Some(format!("{a}, {b}")),
                (a, b) => a.or(b),
            }
        };
        match leftovers {
            None => panics.catch(|| {
                // SAFETY: this is the last reference, and either we are on
                // the home thread or the state holds no home-bound value
                // (`leftovers` found no handler, timer entry, detached
                // coroutine or file request), so nothing thread-bound is
                // dropped here.
                unsafe { ManuallyDrop::drop(local) }
            }),
            Some(what) => log::warn!(
                "coroloop: AioContext {:?} dropped off its home thread{}; its home-thread \
                 state still holds {what}: leaked (it cannot be dropped on this thread)",
                self.name,
                if self.dead.load(Ordering::Acquire) {
                    ""
                } else {
                    " without shutdown"
                }
            ),
        }
        bh::free_remote(&self.bh);
        panics.finish();
    }
}

/// Options for a new [`AioContext`]: its name and its fd monitor. Get one
/// with [`AioContext::builder`]; [`build`](Self::build) creates the context
/// on the calling thread, its home.
///
/// # Examples
///
/// ```
/// use coroloop::aio::{AioContext, FdMonitorKind};
///
/// let ctx = AioContext::builder()
///     .name("main loop")
///     .fd_monitor(FdMonitorKind::Epoll)
///     .build()?;
/// assert_eq!(ctx.fd_monitor_kind(), FdMonitorKind::Epoll);
/// // io_uring where the kernel allows it, else epoll:
/// let ctx = AioContext::builder()
///     .fd_monitor(FdMonitorKind::IoUring)
///     .build()
///     .or_else(|_| AioContext::builder().fd_monitor(FdMonitorKind::Epoll).build())?;
/// # drop(ctx);
/// # std::io::Result::Ok(())
/// ```
#[derive(Debug, Clone, Default)]
#[must_use = "a builder does nothing until `build` is called"]
pub struct AioContextBuilder {
    name: Option<String>,
    fd_monitor: Option<FdMonitorKind>,
}

impl AioContextBuilder {
    /// Names the context (shown by its `Debug` output and in log lines).
    pub fn name(mut self, name: impl Into<String>) -> AioContextBuilder {
        self.name = Some(name.into());
        self
    }

    /// How the context watches file descriptors. Without this call: the
    /// default of [`FdMonitorKind`] (epoll, unless `COROLOOP_FDMON` says
    /// otherwise).
    pub fn fd_monitor(mut self, kind: FdMonitorKind) -> AioContextBuilder {
        self.fd_monitor = Some(kind);
        self
    }

    /// Creates the context, whose home is the calling thread (see
    /// [`AioContext::new`]).
    ///
    /// # Errors
    ///
    /// When the fd monitor or the eventfd cannot be created: out of file
    /// descriptors, or, for an explicitly chosen
    /// [`FdMonitorKind::IoUring`], io_uring unavailable (the message says
    /// why). An io_uring monitor chosen by `COROLOOP_FDMON` falls back to
    /// epoll instead, with a logged warning.
    pub fn build(self) -> io::Result<AioContext> {
        AioContext::create(self.name, self.fd_monitor)
    }
}

impl AioContext {
    /// Creates a context whose home is the calling thread (QEMU's
    /// `aio_context_new`), with the default fd monitor: the same as
    /// `AioContext::builder().build()`. The first live context created on
    /// a thread is that thread's default: see [`current`](Self::current).
    ///
    /// # Errors
    ///
    /// When the fd monitor (epoll or io_uring instance) or the eventfd
    /// cannot be created (out of file descriptors).
    #[doc(alias = "aio_context_new")]
    pub fn new() -> io::Result<AioContext> {
        AioContext::builder().build()
    }

    /// Options for a new context: name, fd monitor.
    pub fn builder() -> AioContextBuilder {
        AioContextBuilder::default()
    }

    /// How this context watches file descriptors. Any thread.
    pub fn fd_monitor_kind(&self) -> FdMonitorKind {
        self.inner.monitor.kind()
    }

    fn create(name: Option<String>, kind: Option<FdMonitorKind>) -> io::Result<AioContext> {
        let monitor = fdmon::create(kind)?;
        let notifier = EventNotifier::new()?;
        monitor.add_notifier(notifier.as_fd(), NOTIFY_KEY)?;
        let inner = Arc::new(Inner {
            home: thread_serial(),
            name,
            notify_core: notify::NotifyCore::new(),
            notifier,
            monitor,
            bh: bh::BhQueues::new(),
            external_disable: AtomicU32::new(0),
            virtual_ns: AtomicI64::new(0),
            dead: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            shut: AtomicBool::new(false),
            handles: AtomicUsize::new(0),
            poll_max_ns: AtomicI64::new(0),
            poll_grow: AtomicI64::new(0),
            poll_shrink: AtomicI64::new(0),
            co: co::CoQueue::new(),
            tasks: task::TaskQueues::new(),
            thread_pool: OnceLock::new(),
            local: UnsafeCell::new(ManuallyDrop::new(Local {
                handlers: fd::Handlers::new(),
                timers: timer::Timers::new(),
                poll_ns: Cell::new(0),
                poll_started: Cell::new(false),
                detached: RefCell::new(HashMap::new()),
                engines: file::Engines::default(),
            })),
        });
        inner.co.set_resumer(&inner);
        file::register_thread_context(&inner);
        // During the thread's teardown there is no default any more.
        let _ = HOME_DEFAULT.try_with(|d| {
            let mut d = d.ctx.borrow_mut();
            // A shut-down default gives way to the new context.
            let live = d.as_ref().and_then(Weak::upgrade);
            if !live.is_some_and(|c| !c.is_dead()) {
                *d = Some(Arc::downgrade(&inner));
            }
        });
        Ok(AioContext::from_inner(inner))
    }

    /// The context whose `poll` is running on this thread, else the
    /// thread's default context: the first one created on this thread that
    /// is still alive (a default that was shut down gives way to the next
    /// context created) — QEMU's `qemu_get_current_aio_context`. A shut-down
    /// context resumes no coroutine created after its shutdown: those are
    /// bare, owned by their handles alone.
    #[doc(alias = "qemu_get_current_aio_context")]
    pub fn current() -> Option<AioContext> {
        let running = running_inner();
        if !running.is_null() {
            // SAFETY: the running loop is a context whose `poll` frame is on
            // the current call chain, holding `&self` (see
            // `coroutine::running_loop`): alive while we run.
            unsafe { Arc::increment_strong_count(running) };
            // SAFETY: we just took the count this Arc gives back.
            let inner = unsafe { Arc::from_raw(running) };
            return Some(AioContext::from_inner(inner));
        }
        home_default().map(AioContext::from_inner)
    }

    /// Whether the calling thread is this context's home thread.
    #[doc(alias = "in_aio_context_home_thread")]
    pub fn is_home_thread(&self) -> bool {
        self.inner.is_home()
    }

    /// Whether two handles refer to the same context.
    pub fn ptr_eq(&self, other: &AioContext) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// Wakes the loop if it is blocked in `poll` (QEMU's `aio_notify`).
    /// Costs no system call while the loop is awake. Any thread.
    #[doc(alias = "aio_notify")]
    pub fn notify(&self) {
        self.inner.notify();
    }

    /// How long `poll(true)` would sleep: `Some(ZERO)` if a BH, coroutine
    /// or task is ready to run or a file engine has work to submit or reap,
    /// else the time to the next timer, or `None` (until notified) —
    /// QEMU's `aio_compute_timeout`.
    ///
    /// # Panics
    ///
    /// Off the home thread.
    #[doc(alias = "aio_compute_timeout")]
    #[track_caller]
    pub fn compute_timeout(&self) -> Option<Duration> {
        self.inner.assert_home("AioContext::compute_timeout");
        self.timeout_ns().map(|ns| Duration::from_nanos(ns as u64))
    }

    /// Whether a non-blocking pass would do nothing: no fd handler (so no
    /// fd to ask the kernel about), and nothing queued or armed — BHs,
    /// coroutines, tasks, file-engine work, timers. Home thread only.
    #[inline]
    fn idle(&self, local: &Local) -> bool {
        let inner = &*self.inner;
        local.handlers.is_empty()
            && inner.co.is_empty()
            && inner.tasks.is_empty()
            && !inner.timers().any_armed()
            && !inner.bh.any_scheduled()
            && !local.engines.has_work()
    }

    fn timeout_ns(&self) -> Option<i64> {
        if self.inner.is_dead() {
            return None; // nothing runs any more: sleep until notified
        }
        if self.inner.bh.any_scheduled()
            || !self.inner.co.is_empty()
            || !self.inner.tasks.is_empty()
            || self.inner.local().engines.has_work()
        {
            return Some(0);
        }
        self.inner.timers().timeout_ns(self)
    }

    /// Runs one iteration of the loop (QEMU's `aio_poll`): waits for events
    /// if `blocking` (until a BH, fd, timer, coroutine wake or `notify`),
    /// then runs what is ready. Returns whether any callback ran or
    /// coroutine was entered; a `notify` alone is not progress.
    ///
    /// On a context that was shut down nothing can run any more, so a
    /// blocking `poll` returns `false` at once instead of waiting for
    /// something that cannot come ([`poll_while`](Self::poll_while) and
    /// [`block_on`](Self::block_on) still sleep until notified: what they
    /// wait for may be done by another thread).
    ///
    /// # Panics
    ///
    /// Off the home thread (with a message naming the call); and with the
    /// panic of a callback or coroutine it ran, after which the context
    /// remains usable.
    #[doc(alias = "aio_poll")]
    #[track_caller]
    pub fn poll(&self, blocking: bool) -> bool {
        self.inner.assert_home("AioContext::poll");
        self.poll_impl(blocking, false)
    }

    /// `poll`; a blocking one on a shut-down context sleeps until notified
    /// if `sleep_when_dead` (for loops that wait for another thread).
    pub(crate) fn poll_impl(&self, blocking: bool, sleep_when_dead: bool) -> bool {
        let inner = &*self.inner;
        let local = inner.local();
        if !blocking && self.idle(local) {
            // Nothing could run and no fd could be ready: a full pass would
            // only find that out (QEMU's non-blocking `aio_poll` also skips
            // the kernel when it watches nothing). A notify that came alone
            // stays pending for the next full pass, which accepts it.
            return false;
        }
        let _running = RunningGuard::enter(inner);
        local.handlers.sync_external(self);
        // File requests queued outside the loop go out before it waits.
        local.engines.flush();

        let poll_max = inner.poll_max_ns.load(Ordering::Relaxed);
        let start = if poll_max > 0 {
            timer::realtime_ns()
        } else {
            0
        };
        let mut timeout = if blocking && (sleep_when_dead || !inner.is_dead()) {
            self.timeout_ns()
        } else {
            Some(0)
        };
        let mut ready: Vec<Ready> = Vec::new();
        let mut progress = false;
        // Whether `ready` already holds a fresh answer of the fd monitor
        // (busy polling asked it): the kernel need not be asked again.
        let mut monitor_asked = false;

        // Adaptive busy polling before sleeping.
        if timeout != Some(0) && poll_max > 0 {
            let budget = match timeout {
                Some(t) => local.poll_ns.get().min(t),
                None => local.poll_ns.get(),
            };
            if budget > 0 {
                if !local.poll_started.replace(true) {
                    local.handlers.poll_started(true);
                }
                let t0 = timer::realtime_ns();
                // Handlers without an io_poll hook (sockets waited on by
                // coroutines, most fd handlers) are polled through the fd
                // monitor with a zero timeout: one system call per round
                // for all of them. Without it, busy polling could not see
                // a socket become readable and only delayed the sleep
                // (QEMU turns polling off while such a handler exists).
                let ask_monitor = local.handlers.unpollable.get() > 0;
                loop {
                    let hooks = local.handlers.poll_once(self, &mut ready);
                    let mut found =
                        hooks | local.engines.poll_once() | inner.notify_core.is_notified();
                    if ask_monitor {
                        // Every round, also when a hook found work: then
                        // `ready` is complete and the kernel is not asked
                        // again below.
                        found |= self.monitor_poll_once(&mut ready);
                    }
                    let elapsed = timer::realtime_ns() - t0;
                    if found {
                        // An io_poll hook that found work is progress (as
                        // QEMU's); what the monitor reported (maybe only
                        // the notifier) is dispatched below like any pass's.
                        progress |= hooks;
                        monitor_asked = ask_monitor;
                        timeout = Some(0);
                        break;
                    }
                    if elapsed >= budget {
                        timeout = timeout.map(|t| (t - elapsed).max(0));
                        break;
                    }
                    std::hint::spin_loop();
                }
            }
        }

        let use_notify_me = timeout != Some(0);
        if use_notify_me && !inner.notify_core.prepare_block() {
            timeout = Some(0);
        }
        if local.poll_started.replace(false) {
            local.handlers.poll_started(false);
        }
        // A poll that will not sleep skips the kernel when no fd could be
        // ready: none is watched, or busy polling already found work and
        // every handler has an io_poll hook (QEMU's "non-blocking aio_poll
        // does not need the system call").
        let need_kernel = timeout != Some(0)
            || (!monitor_asked
                && (local.handlers.unpollable.get() > 0
                    || (ready.is_empty() && !local.handlers.is_empty())));
        if need_kernel {
            let d = timeout.map(|ns| Duration::from_nanos(ns as u64));
            let polled = ready.len();
            if let Err(e) = inner.monitor.wait(d, &mut ready) {
                log::error!("coroloop: AioContext::poll: waiting for fds failed: {e}");
            }
            if polled > 0 {
                merge_ready(&mut ready, polled);
            }
        }
        if use_notify_me {
            inner.notify_core.finish_block();
        }
        if let Some(i) = ready.iter().position(|r| r.key == NOTIFY_KEY) {
            // Edge-triggered: the event is consumed without reading the
            // eventfd (one system call less per wake-up).
            ready.swap_remove(i);
            inner.notify_core.drained();
        }
        // The file engines' fds only wake the loop; completions are reaped
        // below whether or not they were reported.
        ready.retain(|r| !file::Engines::is_key(r.key));
        inner.notify_core.accept();

        if poll_max > 0 && blocking {
            let block_ns = timer::realtime_ns() - start;
            self.adjust_poll_time(block_ns);
        }

        if inner.is_dead() {
            return false; // shut down: nothing runs any more
        }
        progress |= bh::bh_poll(self);
        progress |= co::run_queue(self);
        progress |= task::run_tasks(self);
        progress |= local.engines.process();
        progress |= local.handlers.dispatch(self, &ready);
        progress |= local.timers.run(self);
        // Requests the coroutines queued in this iteration go to the
        // kernel together (QEMU's plug/unplug around a loop iteration).
        local.engines.flush();
        progress
    }

    /// One round of busy polling for the handlers without an io_poll
    /// hook: the fd monitor with a zero timeout. Returns whether it
    /// reported anything (added to `ready`).
    fn monitor_poll_once(&self, ready: &mut Vec<Ready>) -> bool {
        let before = ready.len();
        if let Err(e) = self.inner.monitor.wait(Some(Duration::ZERO), ready) {
            log::error!("coroloop: AioContext::poll: polling the fds failed: {e}");
            return false;
        }
        if before > 0 && ready.len() > before {
            merge_ready(ready, before);
        }
        ready.len() > before
    }

    /// QEMU's grow/shrink rule for the busy-poll time.
    fn adjust_poll_time(&self, block_ns: i64) {
        let inner = &self.inner;
        let local = inner.local();
        let max = inner.poll_max_ns.load(Ordering::Relaxed);
        let ns = local.poll_ns.get();
        if block_ns <= ns {
            // Polling would have caught it: keep.
        } else if block_ns > max {
            let shrink = inner.poll_shrink.load(Ordering::Relaxed);
            local.poll_ns.set(if shrink > 0 { ns / shrink } else { 0 });
        } else if ns < max && block_ns < max {
            let grow = match inner.poll_grow.load(Ordering::Relaxed) {
                0 => 2,
                g => g,
            };
            let next = if ns == 0 {
                4_000
            } else {
                ns.saturating_mul(grow)
            };
            local.poll_ns.set(next.min(max));
        }
    }

    /// The current busy-poll time in nanoseconds (grows and shrinks with
    /// the observed wait times, up to `max_ns`).
    #[track_caller]
    pub fn poll_ns(&self) -> i64 {
        self.inner.assert_home("AioContext::poll_ns");
        self.inner.local().poll_ns.get()
    }

    /// Sets adaptive busy polling (QEMU's `aio_context_set_poll_params`):
    /// before sleeping, `poll` calls the `io_poll` hooks (and checks for
    /// notifies) for up to `poll_ns`, which starts at 0, grows by `grow`
    /// (0: doubles, starting at 4 µs) while waits are shorter than
    /// `max_ns`, and shrinks by `shrink` (0: to 0) after a longer wait.
    /// `max_ns = 0` turns polling off (the default for
    /// [`AioContext::new`]; [`IoThread`] uses 32 µs).
    ///
    /// # Errors
    ///
    /// `InvalidInput` naming the argument if any is negative.
    #[doc(alias = "aio_context_set_poll_params")]
    pub fn set_poll_params(&self, max_ns: i64, grow: i64, shrink: i64) -> io::Result<()> {
        for (name, v) in [("max_ns", max_ns), ("grow", grow), ("shrink", shrink)] {
            if v < 0 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("AioContext::set_poll_params: {name} must not be negative (got {v})"),
                ));
            }
        }
        self.inner.poll_max_ns.store(max_ns, Ordering::Relaxed);
        self.inner.poll_grow.store(grow, Ordering::Relaxed);
        self.inner.poll_shrink.store(shrink, Ordering::Relaxed);
        if self.inner.is_home() {
            self.inner.local().poll_ns.set(0);
        }
        self.notify();
        Ok(())
    }

    /// Stops dispatching external fd handlers (nests). Any thread.
    #[doc(alias = "aio_disable_external")]
    pub fn disable_external(&self) {
        self.inner.external_disable.fetch_add(1, Ordering::AcqRel);
        self.notify();
    }

    /// Undoes one [`disable_external`](Self::disable_external) and kicks
    /// the loop.
    ///
    /// # Panics
    ///
    /// If external handlers are not disabled.
    #[doc(alias = "aio_enable_external")]
    #[track_caller]
    pub fn enable_external(&self) {
        let r =
            self.inner
                .external_disable
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| v.checked_sub(1));
        if r.is_err() {
            panic!("AioContext::enable_external: external handlers are not disabled");
        }
        self.notify();
    }

    /// Whether external handlers are disabled.
    #[doc(alias = "aio_external_disabled")]
    pub fn is_external_disabled(&self) -> bool {
        self.inner.external_disable.load(Ordering::Acquire) > 0
    }

    /// Prepares to be driven by another event loop (QEMU's GSource
    /// `prepare`): returns how long the outer loop may sleep (`None`:
    /// until the context's fd, [`AsFd`], is readable). Must be followed by
    /// [`pending`](Self::pending).
    #[doc(alias = "aio_prepare")]
    #[track_caller]
    pub fn prepare(&self) -> Option<Duration> {
        self.inner.assert_home("AioContext::prepare");
        // Re-armed io_uring polls must reach the kernel before the outer
        // loop sleeps on our fd.
        self.inner.monitor.prepare_wait();
        let timeout = self.timeout_ns();
        if !self.inner.notify_core.prepare_block() {
            return Some(Duration::ZERO);
        }
        timeout.map(|ns| Duration::from_nanos(ns as u64))
    }

    /// After the outer loop woke (or timed out): whether `dispatch` has
    /// work (QEMU's `aio_pending` and GSource `check`).
    #[doc(alias = "aio_pending")]
    #[track_caller]
    pub fn pending(&self) -> bool {
        self.inner.assert_home("AioContext::pending");
        self.inner.notify_core.finish_block();
        self.timeout_ns() == Some(0) || self.inner.notify_core.is_notified() || {
            let mut ready = Vec::new();
            let _ = self.inner.monitor.wait(Some(Duration::ZERO), &mut ready);
            if let Some(i) = ready.iter().position(|r| r.key == NOTIFY_KEY) {
                ready.swap_remove(i);
                self.inner.notify_core.drained();
            }
            // Level-triggered: what is ready now is still ready in dispatch.
            !ready.is_empty()
        }
    }

    /// Runs what is ready without waiting (QEMU's `aio_dispatch`); returns
    /// progress as `poll` does.
    #[doc(alias = "aio_dispatch")]
    #[track_caller]
    pub fn dispatch(&self) -> bool {
        self.inner.assert_home("AioContext::dispatch");
        self.poll(false)
    }

    /// Runs `poll(true)` while `cond()` holds (QEMU's `AIO_WAIT_WHILE`).
    /// [`wait_kick`] wakes every such loop, so a condition changed by
    /// another thread without scheduling work here is re-checked.
    ///
    /// # Panics
    ///
    /// Off the home thread.
    #[doc(alias = "AIO_WAIT_WHILE")]
    #[doc(alias = "aio_wait_while")]
    #[track_caller]
    pub fn poll_while(&self, mut cond: impl FnMut() -> bool) {
        self.inner.assert_home("AioContext::poll_while");
        let _w = wait::Waiting::register(self);
        while cond() {
            self.poll_impl(true, true);
        }
    }

    /// The context's thread pool (QEMU's `aio_get_thread_pool`), created on
    /// first use.
    #[doc(alias = "aio_get_thread_pool")]
    pub fn thread_pool(&self) -> &ThreadPool {
        self.inner
            .thread_pool
            .get_or_init(|| ThreadPool::new(Arc::downgrade(&self.inner)))
    }

    /// Tears the context down on its home thread: cancels (unwinds) every
    /// coroutine it resumes, whoever owns it — those it owns
    /// ([`Coroutine::detach`], dropped last handles, `spawn_coroutine`) and
    /// those whose handles the user holds, which then see them finished
    /// without a result — drops its fd handlers' callbacks, its timers and
    /// pending bottom halves, and cancels its unfinished tasks (their
    /// [`Task`] handles resolve: see [`Task::fallible`]). Afterwards `poll`
    /// has nothing to run, new work is refused (a spawn returns a resolved
    /// `Task`), and an io wait on it fails with an `io::Error`. Idempotent.
    /// [`IoThread::stop`] calls it.
    ///
    /// Dropping the last user handle on the home thread does the same. The
    /// library's own references (the timer of a sleeping coroutine, an fd
    /// wait) do not count, but user handles held by the context's own
    /// callbacks or coroutines (an `AioContext`, `Timer`, `Bh` or
    /// `FdHandler` captured by a coroutine it resumes) keep it alive: that
    /// is a cycle, and `shutdown` is what breaks it.
    ///
    /// # Panics
    ///
    /// Off the home thread; and with the panic of a destructor it ran (a
    /// callback's captures, a coroutine's unwinding), once everything is
    /// torn down: the first such panic is resumed, later ones are logged.
    #[track_caller]
    pub fn shutdown(&self) {
        self.inner.assert_home("AioContext::shutdown");
        if self.inner.closing.swap(true, Ordering::AcqRel) {
            return; // done, or in progress further up this stack
        }
        let local = self.inner.local();
        // Every step runs, and each destructor inside a step, even if a
        // destructor panics: `dead` is set before the state is emptied, and
        // a shutdown cut short by a panic used to leave callbacks in the
        // home-thread state (later dropped off the home thread by the last
        // handle). Panics are caught one by one and the first is resumed at
        // the end. Once `dead` is set nothing can be added back: every way
        // in refuses a dead context (`Timers` is closed by `clear`).
        let mut panics = Panics::new("AioContext::shutdown");
        // Coroutines first: their unwinding may still use the context.
        // Every coroutine the context resumes is cancelled, whoever owns
        // it (ARCHITECTURE.md, "Who owns a coroutine"): nothing could resume it
        // once the context is gone. Those it owns are then released.
        if let Some(p) = self.inner.co.coroutines().cancel_all() {
            panics.keep(p);
        }
        loop {
            let owned: Vec<_> = local
                .detached
                .borrow_mut()
                .drain()
                .map(|(_, c)| c)
                .collect();
            if owned.is_empty() {
                break;
            }
            for co in owned {
                panics.catch(|| drop(co));
            }
        }
        self.inner.dead.store(true, Ordering::Release);
        local.engines.shutdown();
        bh::shutdown(self, &mut panics);
        local.timers.clear(&mut panics);
        local.handlers.clear(&mut panics);
        // Waits the cancellation above did not end (coroutines of a
        // `CoroutineFuture` that used this context's timers or fds) are
        // woken to find it dead: a sleep cancels its coroutine, an fd wait
        // fails with an `io::Error`; nothing waits on forever.
        crate::io::wake_waiters_of(Arc::as_ptr(&self.inner) as usize);
        // Handlers dropped from now on no longer unregister: the monitor
        // lets go of their fds here (io_uring's poll requests hold them).
        self.inner.monitor.shutdown();
        co::clear_queue(self);
        // Queued tasks are dropped, and waiting ones woken so that their
        // scheduler (which sees the context dead) drops them too; new
        // spawns are refused (see task.rs, "Shutdown").
        self.inner.tasks.shut_down(&mut panics);
        // (File requests may remain: those of coroutines the context does
        // not own, which cancel and reap them when they are unwound.)
        debug_assert!(
            local.handlers.is_empty()
                && local.timers.is_empty()
                && local.detached.borrow().is_empty(),
            "AioContext::shutdown left home-thread state behind: {:?}",
            local.leftovers()
        );
        self.inner.shut.store(true, Ordering::Release);
        panics.finish();
    }
}

/// The context whose `poll` is the innermost one running on the current
/// call chain, or null.
pub(crate) fn running_inner() -> *const Inner {
    crate::coroutine::running_loop().cast()
}

/// A handler that busy polling found ready and the monitor reported too is
/// dispatched once per pass, as QEMU's ready list holds a handler once:
/// the monitor's events (`ready[polled..]`) for a key already in
/// `ready[..polled]` are merged into that entry. Found while writing
/// ARCHITECTURE.md: such a handler's read callback ran twice in one pass.
fn merge_ready(ready: &mut Vec<Ready>, polled: usize) {
    let mut i = polled;
    while i < ready.len() {
        if let Some(j) = ready[..polled].iter().position(|r| r.key == ready[i].key) {
            let r = ready.swap_remove(i);
            let into = &mut ready[j];
            into.readable |= r.readable;
            into.writable |= r.writable;
            into.error |= r.error;
        } else {
            i += 1;
        }
    }
}

/// Marks a context as running on the current stack for
/// `AioContext::current`, until dropped.
///
/// This guard may sit on a coroutine's stack while the coroutine is
/// suspended (a callback of this `poll` suspended it). That is why it does
/// not restore a thread-wide value it saved: it restores the previous loop
/// *of its own stack*, and the running loop of the thread is found by
/// walking the current call chain (see `coroutine/current.rs`). Hole 1 of
/// the soundness review:
/// a guard that saved and restored the thread's value put back, after a
/// later resumption, a context that had been freed meanwhile.
pub(crate) struct RunningGuard {
    prev: *const (),
}

impl RunningGuard {
    /// Makes `inner` this stack's running context (`AioContext::current`)
    /// until the guard drops; the caller keeps `inner` alive meanwhile.
    pub(crate) fn enter(inner: &Inner) -> RunningGuard {
        RunningGuard {
            prev: crate::coroutine::push_loop((inner as *const Inner).cast()),
        }
    }
}

impl Drop for RunningGuard {
    fn drop(&mut self) {
        crate::coroutine::pop_loop(self.prev);
    }
}

impl AsFd for AioContext {
    /// The fd monitor's fd (epoll or io_uring instance): readable when a
    /// watched fd is ready or the context was notified. For driving the
    /// context from another loop (see
    /// [`prepare`](Self::prepare)).
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.monitor.as_fd_dyn()
    }
}

impl fmt::Debug for AioContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AioContext")
            .field("name", &self.inner.name)
            .field("home_thread", &self.inner.home)
            .finish()
    }
}
