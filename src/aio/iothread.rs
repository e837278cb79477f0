//! `IoThread`: a thread running its own AioContext (QEMU's IOThread).

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

use super::{AioContext, FdMonitorKind, IOTHREAD_POLL_MAX_NS};

/// A thread that runs an [`AioContext`] until stopped (QEMU's IOThread).
/// Adaptive polling is on by default (32 µs, as QEMU's `poll-max-ns`).
///
/// Stopping (explicitly or by dropping the handle) finishes the current
/// loop iteration, unwinds every coroutine the context resumes (whoever
/// owns it), drops its
/// handlers, timers and pending BHs on the thread, cancels its unfinished
/// tasks, and joins it (see [`AioContext::shutdown`]). A task spawned on
/// the context after that is refused at once: await
/// [`Task::fallible`](super::Task::fallible) where the thread may be
/// stopped first.
///
/// # Examples
///
/// ```
/// use coroloop::aio::IoThread;
/// use std::sync::mpsc;
///
/// let io = IoThread::spawn("worker")?;
/// let (tx, rx) = mpsc::channel();
/// io.context().bh_schedule_oneshot(move || {
///     tx.send(std::thread::current().name().map(String::from)).unwrap();
/// });
/// assert_eq!(rx.recv().unwrap().as_deref(), Some("worker"));
/// io.stop();
/// # std::io::Result::Ok(())
/// ```
#[derive(Debug)]
#[doc(alias = "IOThread")]
pub struct IoThread {
    ctx: AioContext,
    name: String,
    stopping: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// Options for [`IoThread`]: name, polling parameters and fd monitor.
#[derive(Debug, Clone)]
pub struct IoThreadBuilder {
    name: String,
    poll_max_ns: i64,
    poll_grow: i64,
    poll_shrink: i64,
    fd_monitor: Option<FdMonitorKind>,
}

impl IoThreadBuilder {
    /// A builder for a thread named `name`, polling up to 32 µs.
    pub fn new(name: impl Into<String>) -> IoThreadBuilder {
        IoThreadBuilder {
            name: name.into(),
            poll_max_ns: IOTHREAD_POLL_MAX_NS,
            poll_grow: 0,
            poll_shrink: 0,
            fd_monitor: None,
        }
    }

    /// Adaptive polling parameters (see
    /// [`AioContext::set_poll_params`]); `max_ns = 0` turns polling off.
    ///
    /// Busy polling watches every fd handler: those with an `io_poll` hook
    /// through the hook, the others (sockets that coroutines wait on) with
    /// a zero-timeout call of the fd monitor per round. A request/response
    /// server gains when `max_ns` covers its clients' turnaround: the loop
    /// then sees the next request without going to sleep. On this
    /// project's 2-vCPU VM a local NBD client's turnaround was 40-60 µs,
    /// above the 32 µs default (QEMU's), and the NBD example's 4 KiB reads
    /// at queue depth 1 went from about 11,000 to 22,000-29,000 per second
    /// with 100 µs (BENCHMARKS.md, "NBD against nbdkit on every workload",
    /// "QD1: where a request's time goes"). Polling stops by
    /// itself while waits are longer than `max_ns`.
    pub fn poll_params(mut self, max_ns: i64, grow: i64, shrink: i64) -> IoThreadBuilder {
        self.poll_max_ns = max_ns;
        self.poll_grow = grow;
        self.poll_shrink = shrink;
        self
    }

    /// How the thread's context watches file descriptors (see
    /// [`AioContextBuilder::fd_monitor`](super::AioContextBuilder::fd_monitor));
    /// without this call, the default of [`FdMonitorKind`].
    pub fn fd_monitor(mut self, kind: FdMonitorKind) -> IoThreadBuilder {
        self.fd_monitor = Some(kind);
        self
    }

    /// Starts the thread.
    ///
    /// # Errors
    ///
    /// If the thread or its context cannot be created (an explicitly
    /// chosen io_uring monitor unavailable, too), or a polling parameter
    /// is negative.
    pub fn spawn(self) -> io::Result<IoThread> {
        let (tx, rx) = mpsc::channel();
        let stopping = Arc::new(AtomicBool::new(false));
        let stop = stopping.clone();
        let (max, grow, shrink) = (self.poll_max_ns, self.poll_grow, self.poll_shrink);
        let name = self.name.clone();
        let fd_monitor = self.fd_monitor;
        let thread = std::thread::Builder::new()
            .name(self.name.clone())
            .spawn(move || {
                let mut builder = AioContext::builder().name(name);
                if let Some(kind) = fd_monitor {
                    builder = builder.fd_monitor(kind);
                }
                let ctx = match builder.build() {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                if let Err(e) = ctx.set_poll_params(max, grow, shrink) {
                    let _ = tx.send(Err(e));
                    return;
                }
                let _ = tx.send(Ok(ctx.clone()));
                // The thread is the crate's own: before its thread function
                // returns (and thread-locals start to be destroyed), its
                // context is shut down (every coroutine it resumes
                // cancelled), every kernel request of its contexts is
                // cancelled and reaped, and teardown is marked as begun, so
                // that coroutines dropped by later thread-local destructors
                // are leaked, not unwound on destroyed thread-locals
                // (soundness holes 4, 5). A guard does it, so that it also
                // happens if something unwinds out of the loop.
                let _end = EndOfThread(ctx.clone());
                while !stop.load(Ordering::Acquire) {
                    // A panicking callback must not take the thread down:
                    // log it and keep serving.
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        ctx.poll_impl(true, true);
                    }));
                    if let Err(p) = r {
                        log_panic("a callback panicked", p);
                    }
                }
            })?;
        let ctx = match rx.recv() {
            Ok(Ok(ctx)) => ctx,
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => {
                let _ = thread.join();
                return Err(io::Error::other("IoThread::spawn: the thread exited early"));
            }
        };
        Ok(IoThread {
            ctx,
            name: self.name,
            stopping,
            thread: Mutex::new(Some(thread)),
        })
    }
}

impl IoThread {
    /// Starts a thread named `name` running a new context.
    ///
    /// # Errors
    ///
    /// As [`IoThreadBuilder::spawn`].
    pub fn spawn(name: &str) -> io::Result<IoThread> {
        IoThreadBuilder::new(name).spawn()
    }

    /// The thread's context (its home thread is the IoThread).
    pub fn context(&self) -> &AioContext {
        &self.ctx
    }

    /// The thread's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Stops the loop, shuts the context down on its thread and joins it.
    ///
    /// # Panics
    ///
    /// If called twice, or from the IoThread itself (it would wait for
    /// itself). (A panicking callback does not end the thread: it is
    /// logged and the loop goes on.)
    #[track_caller]
    pub fn stop(&self) {
        let handle = {
            let mut slot = self.thread.lock().unwrap_or_else(|e| e.into_inner());
            match slot.as_ref() {
                None => panic!(
                    "IoThread::stop: IoThread '{}' is already stopped",
                    self.name
                ),
                // Checked before taking the handle: the thread keeps
                // running, so it must stay joinable.
                Some(h) if h.thread().id() == std::thread::current().id() => panic!(
                    "IoThread::stop: called from IoThread '{}' itself; stop it from another thread",
                    self.name
                ),
                Some(_) => slot.take().expect("checked above"),
            }
        };
        self.stopping.store(true, Ordering::Release);
        self.ctx.notify();
        if let Err(p) = handle.join() {
            std::panic::resume_unwind(p);
        }
    }

    /// Whether the thread has been stopped.
    pub fn is_stopped(&self) -> bool {
        self.thread
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none()
    }
}

impl Drop for IoThread {
    fn drop(&mut self) {
        let handle = self
            .thread
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(handle) = handle {
            self.stopping.store(true, Ordering::Release);
            self.ctx.notify();
            if handle.thread().id() == std::thread::current().id() {
                // Dropped by one of its own callbacks: it cannot wait for
                // itself; its loop ends when that callback returns.
                return;
            }
            if handle.join().is_err() && !std::thread::panicking() {
                log::error!("coroloop: IoThread '{}' panicked", self.name);
            }
        }
    }
}

/// Ends an IoThread's thread function (see where it is made).
struct EndOfThread(AioContext);

impl Drop for EndOfThread {
    fn drop(&mut self) {
        let ctx = &self.0;
        if let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| ctx.shutdown())) {
            log_panic("a destructor panicked during shutdown", p);
        }
        crate::coroutine::begin_thread_teardown();
    }
}

/// Logs a caught panic and disposes of its payload without letting a
/// panicking payload destructor unwind out of the thread function (which
/// would skip `EndOfThread`'s work if it happened in the loop): the
/// logging and the drop run under `catch_unwind`, and a payload whose drop
/// panics again is leaked.
fn log_panic(what: &str, p: Box<dyn std::any::Any + Send>) {
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        log::error!(
            "coroloop: IoThread '{}': {what}: {}",
            std::thread::current().name().unwrap_or("?"),
            panic_text(&*p)
        );
        drop(p);
    }));
    if let Err(again) = r {
        std::mem::forget(again);
    }
}

/// The message of a panic payload.
fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "<non-string panic>".into())
}
