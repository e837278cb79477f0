//! File I/O for coroutines: the thread pool, io_uring and Linux AIO
//! engines behind one front door, [`CoFile`] (QEMU's
//! `aio=threads|io_uring|native`).
//!
//! | QEMU | coroloop |
//! |------|----------|
//! | `aio=threads` (`thread_pool_submit_co` + `preadv`) | [`AioMode::Threads`]: `preadv2(RWF_NOWAIT)` inline, the [`ThreadPool`](super::ThreadPool) on `EAGAIN` |
//! | `aio=io_uring` (`luring_co_submit`) | [`AioMode::IoUring`], [`IoUring`] (page-cache hits inline first, see [`CoFile::set_inline_cached_reads`]) |
//! | `aio=native` (`laio_co_submit`) | [`AioMode::Native`], [`LinuxAio`] |
//! | `aio_setup_linux_io_uring` / `aio_get_linux_io_uring` | [`AioContext::linux_io_uring`](super::AioContext::linux_io_uring) |
//! | `aio_setup_linux_aio` / `aio_get_linux_aio` | [`AioContext::linux_aio`](super::AioContext::linux_aio) |
//!
//! Every call suspends the calling coroutine until the request completed
//! and is resumed by the context's loop; the loop thread never blocks on
//! the disk (except Linux AIO on a buffered file, as in QEMU).
//!
//! # Buffers and cancellation
//!
//! The calls borrow the caller's buffers for the duration of the request.
//! If the coroutine is unwound meanwhile (its owner dropped it, its
//! context shut down), the request is cancelled and the thread blocks until
//! the kernel has let go of the buffer before the unwind goes on: no
//! completion ever writes into freed memory or reaches a coroutine that no
//! longer exists. The threads engine reads and writes through a buffer of
//! its own on the worker, so an abandoned request there just finishes.
//!
//! # Thread exit
//!
//! A coroutine that is leaked (`mem::forget`) or still suspended when its
//! thread exits never unwinds, so its request is not cancelled that way.
//! Instead, when the thread's teardown begins (the first of coroloop's
//! thread-local destructors runs), every request of the thread's contexts
//! is cancelled and reaped and the engines are stopped: nothing is
//! submitted afterwards. An [`IoThread`](super::IoThread) does this before its thread
//! function returns. What remains on other threads (a buffer in a
//! thread-local first used after that registration) is stated in the
//! crate docs, "Thread-locals and thread exit".

mod linux_aio;
mod request;
mod uring;

use std::cell::{Cell, OnceCell, RefCell};
use std::collections::BTreeSet;
use std::fmt;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::Arc;

pub use linux_aio::LinuxAio;
pub use uring::IoUring;

use super::AioContext;
use crate::coroutine::RemoteCoroutine;

/// How a [`CoFile`] does its I/O (QEMU's `-drive aio=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[doc(alias = "BlockdevAioOptions")]
pub enum AioMode {
    /// `preadv2(RWF_NOWAIT)` inline on the loop thread, the context's
    /// thread pool when that would block (QEMU's `aio=threads`, plus the
    /// inline attempt). The default, as in QEMU.
    #[default]
    Threads,
    /// The context's io_uring (`aio=io_uring`). Reads of a buffered file
    /// first try the page cache inline, as with `Threads`
    /// ([`CoFile::set_inline_cached_reads`]).
    IoUring,
    /// Linux native AIO (`aio=native`); for `O_DIRECT` files.
    Native,
}

impl AioMode {
    /// QEMU's name of the mode: `threads`, `io_uring` or `native`.
    pub fn as_str(self) -> &'static str {
        match self {
            AioMode::Threads => "threads",
            AioMode::IoUring => "io_uring",
            AioMode::Native => "native",
        }
    }
}

impl std::str::FromStr for AioMode {
    type Err = io::Error;
    fn from_str(s: &str) -> io::Result<AioMode> {
        match s {
            "threads" => Ok(AioMode::Threads),
            "io_uring" => Ok(AioMode::IoUring),
            "native" => Ok(AioMode::Native),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("unknown aio mode {s:?} (expected threads, io_uring or native)"),
            )),
        }
    }
}

impl fmt::Display for AioMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The engines a context set up (home-thread state).
#[derive(Default)]
pub(crate) struct Engines {
    uring: OnceCell<Result<IoUring, (io::ErrorKind, String)>>,
    aio: OnceCell<Result<LinuxAio, (io::ErrorKind, String)>>,
    pub(crate) default_mode: Cell<AioMode>,
}

/// Keys of the engines' fds in the context's fd monitor.
pub(crate) const URING_KEY: u64 = u64::MAX - 1;
pub(crate) const AIO_KEY: u64 = u64::MAX - 2;

impl Engines {
    fn uring(&self) -> Option<&IoUring> {
        self.uring.get().and_then(|r| r.as_ref().ok())
    }

    fn aio(&self) -> Option<&LinuxAio> {
        self.aio.get().and_then(|r| r.as_ref().ok())
    }

    /// Submits what coroutines queued (the end of the loop's plug).
    pub(crate) fn flush(&self) {
        if crate::coroutine::thread_tearing_down() {
            // The thread is exiting (a thread-local destructor polls):
            // submit nothing, cancel and reap instead.
            self.teardown();
            return;
        }
        if let Some(u) = self.uring() {
            u.flush();
        }
        if let Some(a) = self.aio() {
            if a.has_pending() {
                a.flush();
            }
        }
    }

    /// Whether the loop must not sleep.
    pub(crate) fn has_work(&self) -> bool {
        self.uring().is_some_and(IoUring::has_work) || self.aio().is_some_and(LinuxAio::has_work)
    }

    /// Busy-poll check: completions waiting, seen without a system call.
    pub(crate) fn poll_once(&self) -> bool {
        self.uring().is_some_and(IoUring::has_completions)
            || self.aio().is_some_and(LinuxAio::has_completions)
    }

    /// Reaps completions and resumes their coroutines.
    pub(crate) fn process(&self) -> bool {
        let mut progress = false;
        if let Some(u) = self.uring() {
            progress |= u.process();
        }
        if let Some(a) = self.aio() {
            progress |= a.process();
        }
        progress
    }

    /// Whether no request is queued, in flight or waiting to be taken (no
    /// coroutine of the home thread has anything here).
    pub(crate) fn is_idle(&self) -> bool {
        self.uring().map_or(true, IoUring::is_idle) && self.aio().map_or(true, LinuxAio::is_idle)
    }

    pub(crate) fn is_key(key: u64) -> bool {
        key == URING_KEY || key == AIO_KEY
    }

    pub(crate) fn shutdown(&self) {
        if let Some(u) = self.uring() {
            u.set_dead();
        }
        if let Some(a) = self.aio() {
            a.set_dead();
        }
    }

    /// Thread teardown: cancel and reap every request, never submit again.
    pub(crate) fn teardown(&self) {
        if let Some(u) = self.uring() {
            u.teardown();
        }
        if let Some(a) = self.aio() {
            a.teardown();
        }
    }
}

/// The contexts homed on this thread, for the thread's teardown (hole 4
/// of the soundness review, and the API fuzzer's silent leak).
///
/// A request's buffer may live in a thread-local (a coroutine suspended in
/// `read_at` inside `LocalKey::with`). At thread exit std frees
/// thread-locals in reverse order of first use; a request submitted after
/// its buffer's thread-local was destroyed (a later destructor polls the
/// context), or still in the kernel then, makes the kernel write into freed
/// memory, which no sanitizer sees. When the thread's teardown begins (the
/// first coroloop thread-local destructor runs: this registry's, the
/// coroutine pool's, ...; see `coroutine/teardown.rs`), its hook cancels
/// and reaps every request of the contexts listed here and stops their
/// engines from submitting; `Engines::flush` refuses to submit from then
/// on as well. IoThreads begin their teardown before their thread
/// function returns, which closes every order there. What remains on
/// other threads (a thread-local first used after every coroloop
/// thread-local, lent to a request still in the kernel when it is
/// destroyed) is stated in the crate docs.
///
/// The same hook logs each context that is still alive, not shut down and
/// holding callbacks, tasks or coroutines: if a handle held inside one of
/// them keeps the context alive (a cycle), nothing else would ever say
/// they are leaked.
struct ThreadContexts(RefCell<Vec<std::sync::Weak<super::Inner>>>);

impl Drop for ThreadContexts {
    fn drop(&mut self) {
        // Begins the teardown (whose hook finds this registry gone), then
        // tears down what the registry held.
        crate::coroutine::begin_thread_teardown();
        teardown_list(std::mem::take(self.0.get_mut()));
    }
}

thread_local! {
    static THREAD_CONTEXTS: ThreadContexts = const { ThreadContexts(RefCell::new(Vec::new())) };
}

fn teardown_list(list: Vec<std::sync::Weak<super::Inner>>) {
    for inner in list.iter().filter_map(std::sync::Weak::upgrade) {
        debug_assert!(inner.is_home());
        inner.local().engines.teardown();
        if inner.is_dead() {
            continue;
        }
        if let Some(what) = inner.held_at_thread_exit() {
            log::warn!(
                "coroloop: the home thread of AioContext {:?} is exiting while the context \
                 is alive and not shut down; it holds {what}, which are leaked unless a \
                 handle of the context is dropped later (call shutdown() before the thread \
                 exits)",
                inner.name
            );
        }
    }
}

/// Records a context created on this thread (its teardown reaps the
/// context's requests and reports what it still holds).
pub(crate) fn register_thread_context(inner: &std::sync::Arc<super::Inner>) {
    if crate::coroutine::thread_tearing_down() {
        return;
    }
    crate::coroutine::set_thread_teardown_hook(teardown_registered_contexts);
    let _ = THREAD_CONTEXTS.try_with(|t| {
        let mut v = t.0.borrow_mut();
        v.retain(|w| w.strong_count() > 0);
        v.push(std::sync::Arc::downgrade(inner));
    });
}

/// Fails once the thread's teardown has begun: nothing would reap the
/// requests of an engine set up then.
fn register_engine_context(inner: &std::sync::Arc<super::Inner>) -> io::Result<()> {
    if crate::coroutine::thread_tearing_down() {
        return Err(io::Error::other(
            "the thread is exiting: no file engine can be set up",
        ));
    }
    // Contexts created during the teardown are not listed: list this one
    // now if it is missing (an engine set up before the teardown).
    let _ = THREAD_CONTEXTS.try_with(|t| {
        let mut v = t.0.borrow_mut();
        let p = std::sync::Arc::as_ptr(inner);
        if !v.iter().any(|w| std::sync::Weak::as_ptr(w) == p) {
            v.push(std::sync::Arc::downgrade(inner));
        }
    });
    crate::coroutine::set_thread_teardown_hook(teardown_registered_contexts);
    Ok(())
}

/// The thread's teardown hook (see `coroutine/teardown.rs`): cancels and
/// reaps every file request of the contexts homed on this thread, stops
/// their engines for good, and logs the live ones that hold something.
fn teardown_registered_contexts() {
    let list = THREAD_CONTEXTS
        .try_with(|t| std::mem::take(&mut *t.0.borrow_mut()))
        .unwrap_or_default();
    teardown_list(list);
}

fn cached<T>(
    cell: &OnceCell<Result<T, (io::ErrorKind, String)>>,
    init: impl FnOnce() -> io::Result<T>,
) -> io::Result<&T> {
    match cell.get_or_init(|| init().map_err(|e| (e.kind(), e.to_string()))) {
        Ok(t) => Ok(t),
        Err((kind, msg)) => Err(io::Error::new(*kind, msg.clone())),
    }
}

impl AioContext {
    /// The context's io_uring, set up on first use (QEMU's
    /// `aio_setup_linux_io_uring` + `aio_get_linux_io_uring`).
    ///
    /// # Errors
    ///
    /// When io_uring cannot be set up (kernel without it,
    /// `kernel.io_uring_disabled`, a seccomp filter, the locked-memory
    /// limit): the message says so; the same error is returned on later
    /// calls. [`CoFile`] then falls back to the thread pool.
    ///
    /// # Panics
    ///
    /// Off the home thread.
    #[doc(alias = "aio_setup_linux_io_uring")]
    #[doc(alias = "aio_get_linux_io_uring")]
    #[track_caller]
    pub fn linux_io_uring(&self) -> io::Result<&IoUring> {
        self.inner.assert_home("AioContext::linux_io_uring");
        let inner = &*self.inner;
        cached(&inner.local().engines.uring, || {
            if inner.is_dead() {
                return Err(io::Error::other(
                    "AioContext::linux_io_uring: the context is shut down",
                ));
            }
            register_engine_context(&self.inner)?;
            let u = IoUring::new()?;
            // SAFETY: the ring fd lives as long as the engine, which lives
            // in the context's home state until the context is dropped,
            // after its monitor stopped being used.
            let fd = unsafe { BorrowedFd::borrow_raw(u.ring_fd()) };
            inner.monitor.add(fd, URING_KEY, true, false)?;
            Ok(u)
        })
    }

    /// The context's Linux AIO state, set up on first use (QEMU's
    /// `aio_setup_linux_aio` + `aio_get_linux_aio`).
    ///
    /// # Errors
    ///
    /// When `io_setup` fails (kernel without AIO, `fs.aio-max-nr`
    /// reached, a seccomp filter): the message says so; the same error is
    /// returned on later calls.
    ///
    /// # Panics
    ///
    /// Off the home thread.
    #[doc(alias = "aio_setup_linux_aio")]
    #[doc(alias = "aio_get_linux_aio")]
    #[track_caller]
    pub fn linux_aio(&self) -> io::Result<&LinuxAio> {
        self.inner.assert_home("AioContext::linux_aio");
        let inner = &*self.inner;
        cached(&inner.local().engines.aio, || {
            if inner.is_dead() {
                return Err(io::Error::other(
                    "AioContext::linux_aio: the context is shut down",
                ));
            }
            register_engine_context(&self.inner)?;
            let a = LinuxAio::new()?;
            inner.monitor.add_notifier(a.eventfd(), AIO_KEY)?;
            Ok(a)
        })
    }

    /// The mode [`CoFile::new`] uses on this context (default
    /// [`AioMode::Threads`]).
    #[track_caller]
    pub fn default_aio_mode(&self) -> AioMode {
        self.inner.assert_home("AioContext::default_aio_mode");
        self.inner.local().engines.default_mode.get()
    }

    /// Sets the mode [`CoFile::new`] uses on this context (QEMU sets it
    /// per drive; this is the per-context default).
    #[track_caller]
    pub fn set_default_aio_mode(&self, mode: AioMode) {
        self.inner.assert_home("AioContext::set_default_aio_mode");
        self.inner.local().engines.default_mode.set(mode);
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Engine {
    Threads,
    IoUring,
    Native,
}

/// A file whose reads and writes suspend the calling coroutine instead of
/// blocking its thread, on the engine picked at creation (QEMU's
/// `file-posix` driver with `aio=threads|io_uring|native`).
///
/// Bound to one context and its home thread. If the requested engine
/// cannot be set up, the file falls back to [`AioMode::Threads`] with a log
/// line ([`mode`](Self::mode) tells which one is used).
///
/// # Examples
///
/// ```
/// use coroloop::aio::{AioContext, AioMode, CoFile};
/// use coroloop::Coroutine;
///
/// let ctx = AioContext::new()?;
/// let path = std::env::temp_dir().join(format!("cofile-doc-{}", std::process::id()));
/// let file = std::fs::OpenOptions::new().read(true).write(true).create(true).open(&path)?;
/// let f = CoFile::with_mode(&ctx, file, AioMode::IoUring);
/// let co = Coroutine::new(move || {
///     f.write_at(b"hello", 0)?;
///     let mut buf = [0u8; 5];
///     let n = f.read_at(&mut buf, 0)?;
///     std::io::Result::Ok(buf[..n].to_vec())
/// });
/// co.enter();
/// ctx.poll_while(|| !co.is_finished());
/// assert_eq!(co.take_result().unwrap()?, b"hello");
/// std::fs::remove_file(path)?;
/// # std::io::Result::Ok(())
/// ```
#[doc(alias = "BDRVRawState")]
pub struct CoFile {
    file: Arc<std::fs::File>,
    ctx: AioContext,
    engine: Engine,
    direct: bool,
    /// Whether `pwritev2(RWF_NOWAIT)` is worth trying (buffered writes
    /// answer `EOPNOTSUPP` on many filesystems: then never again).
    write_nowait: Cell<bool>,
    /// Whether reads first try `preadv2(RWF_NOWAIT)` on the loop thread
    /// (buffered files only; see [`CoFile::set_inline_cached_reads`]).
    read_nowait: Cell<bool>,
    /// Buffered writes on the loop thread ([`CoFile::set_inline_buffered_writes`]).
    inline_writes: InlineWrites,
    /// Writes in flight, by sequence number, so that a flush waits for
    /// the writes issued before it (the engines do not order them).
    writes: RefCell<BTreeSet<u64>>,
    next_write: Cell<u64>,
    flushers: RefCell<Vec<RemoteCoroutine>>,
}

/// Marks one write in flight; dropped when it ended (or unwound).
struct WriteGuard<'a> {
    file: &'a CoFile,
    seq: u64,
}

impl Drop for WriteGuard<'_> {
    fn drop(&mut self) {
        self.file.writes.borrow_mut().remove(&self.seq);
        let flushers = std::mem::take(&mut *self.file.flushers.borrow_mut());
        // Queued wakes (never a direct entry: this may run in an unwind).
        for f in flushers {
            f.wake();
        }
    }
}

impl fmt::Debug for CoFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CoFile")
            .field("fd", &self.file.as_raw_fd())
            .field("mode", &self.mode())
            .field("direct", &self.direct)
            .finish()
    }
}

impl CoFile {
    /// Wraps `file` with the context's default mode
    /// ([`AioContext::set_default_aio_mode`]).
    ///
    /// # Panics
    ///
    /// Off the context's home thread.
    #[track_caller]
    pub fn new(ctx: &AioContext, file: std::fs::File) -> CoFile {
        let mode = ctx.default_aio_mode();
        CoFile::with_mode(ctx, file, mode)
    }

    /// Wraps `file` with `mode`, falling back to [`AioMode::Threads`] with a
    /// log line if that engine cannot be set up.
    ///
    /// # Panics
    ///
    /// Off the context's home thread.
    #[track_caller]
    pub fn with_mode(ctx: &AioContext, file: std::fs::File, mode: AioMode) -> CoFile {
        match CoFile::try_with_mode(ctx, file, mode) {
            Ok(f) => f,
            Err((file, e)) => {
                log::warn!("coroloop: CoFile: aio={mode} unavailable, using threads: {e}");
                CoFile::make(ctx, file, Engine::Threads)
            }
        }
    }

    /// Wraps `file` with `mode`, without falling back.
    ///
    /// # Errors
    ///
    /// The engine's setup error, with the file given back.
    ///
    /// # Panics
    ///
    /// Off the context's home thread.
    #[track_caller]
    #[allow(clippy::result_large_err)]
    pub fn try_with_mode(
        ctx: &AioContext,
        file: std::fs::File,
        mode: AioMode,
    ) -> Result<CoFile, (std::fs::File, io::Error)> {
        ctx.inner.assert_home("CoFile::with_mode");
        let engine = match mode {
            AioMode::Threads => Engine::Threads,
            AioMode::IoUring => match ctx.linux_io_uring() {
                Ok(_) => Engine::IoUring,
                Err(e) => return Err((file, e)),
            },
            AioMode::Native => match ctx.linux_aio() {
                Ok(_) => Engine::Native,
                Err(e) => return Err((file, e)),
            },
        };
        Ok(CoFile::make(ctx, file, engine))
    }

    fn make(ctx: &AioContext, file: std::fs::File, engine: Engine) -> CoFile {
        let direct = rustix::fs::fcntl_getfl(&file)
            .map(|f| f.contains(rustix::fs::OFlags::DIRECT))
            .unwrap_or(false);
        CoFile {
            file: Arc::new(file),
            ctx: ctx.clone(),
            engine,
            direct,
            write_nowait: Cell::new(!direct),
            read_nowait: Cell::new(!direct && engine != Engine::Native),
            inline_writes: InlineWrites::default(),
            writes: RefCell::new(BTreeSet::new()),
            next_write: Cell::new(0),
            flushers: RefCell::new(Vec::new()),
        }
    }

    /// The engine in use.
    pub fn mode(&self) -> AioMode {
        match self.engine {
            Engine::Threads => AioMode::Threads,
            Engine::IoUring => AioMode::IoUring,
            Engine::Native => AioMode::Native,
        }
    }

    /// Whether the file was opened with `O_DIRECT`.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// Whether reads first try `preadv2(RWF_NOWAIT)` on the loop thread:
    /// a read the page cache can serve then completes at once, with one
    /// system call and no suspension, and only the rest goes to the
    /// engine. On by default for buffered files with [`AioMode::Threads`]
    /// (QEMU's `aio=threads` plus the inline attempt) and
    /// [`AioMode::IoUring`]; off for [`AioMode::Native`] and for `O_DIRECT`
    /// files (where it is never used: the page cache is bypassed).
    ///
    /// Why io_uring gets it too: io_uring completes cached reads inside its
    /// submission call, but the coroutine still suspends until the loop
    /// reaps the completion, and a batch of large reads submitted together
    /// is copied before any of it is used. Measured with the NBD example on
    /// 64 KiB sequential reads of a page-cached image just after a burst
    /// of writes: about 1,100-1,200 MB/s through the ring, 2,150-2,200 MB/s
    /// with the inline attempt (BENCHMARKS.md, "NBD against nbdkit on every
    /// workload", "64 KiB sequential reads with io_uring").
    /// Turn it off to send every read through the engine (to exercise the
    /// ring, or to keep the loop thread's time per read bounded when the
    /// page cache holds large extents).
    pub fn set_inline_cached_reads(&self, on: bool) {
        self.read_nowait.set(on && !self.direct);
    }

    /// Whether buffered writes run `pwritev` on the loop thread instead of
    /// going to the engine (off by default, as QEMU: the loop thread never
    /// waits for the disk).
    ///
    /// A buffered write normally only copies into the page cache (a few
    /// µs for 4 KiB), and handing it to a worker thread and back costs more
    /// than the write itself: the NBD example's 4 KiB writes at queue
    /// depth 16 went from about 40,000 to 61,000-76,000 per second on this
    /// project's VM (BENCHMARKS.md, "NBD against nbdkit on every workload",
    /// "Writes"). But a buffered write
    /// *can* block: when the kernel throttles writers because too much
    /// data is dirty, or on a metadata lock. So each inline write is timed:
    /// one that takes longer than 1 ms sends this file's writes back to
    /// the engine for the next second, after which inline writes are tried
    /// again. The loop thread therefore stalls at most once a second, for
    /// as long as one write blocks. Where `pwritev2(RWF_NOWAIT)` works
    /// (it never blocks) the threads engine uses it first.
    ///
    /// No effect on `O_DIRECT` files (their writes always go to the
    /// engine) or with [`AioMode::Native`], whose buffered writes already
    /// block in `io_submit` (as in QEMU).
    pub fn set_inline_buffered_writes(&self, on: bool) {
        self.inline_writes
            .on
            .set(on && !self.direct && self.engine != Engine::Native);
    }

    /// Whether buffered writes run on the loop thread
    /// ([`set_inline_buffered_writes`](Self::set_inline_buffered_writes)).
    pub fn inline_buffered_writes(&self) -> bool {
        self.inline_writes.on.get()
    }

    /// Whether reads try the page cache inline first
    /// ([`set_inline_cached_reads`](Self::set_inline_cached_reads)).
    pub fn inline_cached_reads(&self) -> bool {
        self.read_nowait.get()
    }

    /// The file.
    pub fn file(&self) -> &std::fs::File {
        &self.file
    }

    /// The context whose loop completes the requests.
    pub fn aio_context(&self) -> &AioContext {
        &self.ctx
    }

    fn uring(&self) -> &IoUring {
        match self.ctx.linux_io_uring() {
            Ok(u) => u,
            Err(_) => unreachable!("CoFile: the io_uring set up at creation is cached"),
        }
    }

    fn aio(&self) -> &LinuxAio {
        match self.ctx.linux_aio() {
            Ok(a) => a,
            Err(_) => unreachable!("CoFile: the Linux AIO set up at creation is cached"),
        }
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Reads into `buf` at `offset`; returns the bytes read (fewer only at
    /// end of file, 0 there).
    ///
    /// # Panics
    ///
    /// Outside a coroutine, or off the context's home thread.
    #[doc(alias = "raw_co_preadv")]
    #[track_caller]
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.read("CoFile::read_at", &mut [IoSliceMut::new(buf)], offset)
    }

    /// Writes `buf` at `offset`; returns the bytes written.
    ///
    /// # Panics
    ///
    /// Outside a coroutine, or off the context's home thread.
    #[doc(alias = "raw_co_pwritev")]
    #[track_caller]
    pub fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        self.write("CoFile::write_at", &[IoSlice::new(buf)], offset)
    }

    /// Reads exactly `buf.len()` bytes at `offset` (`UnexpectedEof` if the
    /// file ends first).
    ///
    /// # Panics
    ///
    /// As [`read_at`](Self::read_at).
    #[track_caller]
    pub fn read_exact_at(&self, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
        while !buf.is_empty() {
            match self.read_at(buf, offset)? {
                0 => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("CoFile::read_exact_at: end of file at offset {offset}"),
                    ))
                }
                n => {
                    buf = &mut buf[n..];
                    offset += n as u64;
                }
            }
        }
        Ok(())
    }

    /// Writes all of `buf` at `offset`.
    ///
    /// # Panics
    ///
    /// As [`write_at`](Self::write_at).
    #[track_caller]
    pub fn write_all_at(&self, mut buf: &[u8], mut offset: u64) -> io::Result<()> {
        while !buf.is_empty() {
            match self.write_at(buf, offset)? {
                0 => return Err(io::ErrorKind::WriteZero.into()),
                n => {
                    buf = &buf[n..];
                    offset += n as u64;
                }
            }
        }
        Ok(())
    }

    /// Vectored read at `offset`.
    ///
    /// # Panics
    ///
    /// Outside a coroutine, or off the context's home thread.
    #[track_caller]
    pub fn readv_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> io::Result<usize> {
        self.read("CoFile::readv_at", bufs, offset)
    }

    /// Vectored write at `offset`.
    ///
    /// # Panics
    ///
    /// Outside a coroutine, or off the context's home thread.
    #[track_caller]
    pub fn writev_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> io::Result<usize> {
        self.write("CoFile::writev_at", bufs, offset)
    }

    /// Every call starts here: on the home thread, in a coroutine.
    #[track_caller]
    fn check(&self, api: &str) {
        self.ctx.inner.assert_home(api);
        if !crate::coroutine::in_coroutine() {
            panic!("{api} called outside a coroutine");
        }
    }

    #[track_caller]
    fn read(&self, api: &str, bufs: &mut [IoSliceMut<'_>], offset: u64) -> io::Result<usize> {
        self.check(api);
        match self.engine {
            Engine::IoUring | Engine::Native => {
                let mut rest = bufs;
                let done = match self.read_cached(rest, offset) {
                    Cached::All(n) => return Ok(n),
                    Cached::Failed(e) => return Err(e),
                    Cached::Part(n) => {
                        IoSliceMut::advance_slices(&mut rest, n);
                        n
                    }
                };
                let at = offset + done as u64;
                let r = if self.engine == Engine::IoUring {
                    self.uring().readv_at(self.fd(), rest, at)
                } else {
                    self.aio().readv_at(self.fd(), rest, at)
                };
                match r {
                    Ok(n) => Ok(done + n),
                    // Partial progress is reported, as `read` does.
                    Err(_) if done > 0 => Ok(done),
                    Err(e) => Err(e),
                }
            }
            Engine::Threads => self.threads_read(bufs, offset),
        }
    }

    /// The inline attempt of a read (when enabled): what the page cache
    /// gave without blocking.
    fn read_cached(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> Cached {
        if !self.read_nowait.get() {
            return Cached::Part(0);
        }
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        match rustix::io::preadv2(self.fd(), bufs, offset, rustix::io::ReadWriteFlags::NOWAIT) {
            Ok(n) if n == total || n == 0 => Cached::All(n),
            Ok(n) => Cached::Part(n), // partly cached: the rest goes to the engine
            Err(e) if e == rustix::io::Errno::AGAIN => Cached::Part(0),
            Err(e) if e == rustix::io::Errno::OPNOTSUPP || e == rustix::io::Errno::INVAL => {
                // The filesystem does not do non-blocking reads: never again.
                self.read_nowait.set(false);
                Cached::Part(0)
            }
            Err(e) => Cached::Failed(e.into()),
        }
    }

    #[track_caller]
    fn write(&self, api: &str, bufs: &[IoSlice<'_>], offset: u64) -> io::Result<usize> {
        self.check(api);
        let seq = self.next_write.get();
        self.next_write.set(seq + 1);
        self.writes.borrow_mut().insert(seq);
        let _g = WriteGuard { file: self, seq };
        match self.engine {
            Engine::IoUring => {
                if let Some(r) = self.write_inline(bufs, offset) {
                    return r;
                }
                self.uring().writev_at(self.fd(), bufs, offset)
            }
            Engine::Native => self.aio().writev_at(self.fd(), bufs, offset),
            Engine::Threads => self.threads_write(bufs, offset),
        }
    }

    /// A buffered write on the loop thread, if enabled and not paused
    /// after a slow one (`None`: use the engine).
    fn write_inline(&self, bufs: &[IoSlice<'_>], offset: u64) -> Option<io::Result<usize>> {
        let iw = &self.inline_writes;
        if !iw.on.get() {
            return None;
        }
        let start = std::time::Instant::now();
        if !iw.allowed(start) {
            return None;
        }
        let r = rustix::io::pwritev(self.fd(), bufs, offset);
        if iw.record(start, std::time::Instant::now()) {
            log::debug!(
                "coroloop: CoFile: an inline write took over {:?}; writes go to the engine for {:?}",
                INLINE_WRITE_SLOW,
                INLINE_WRITE_PAUSE
            );
        }
        Some(r.map_err(Into::into))
    }

    /// Waits until the writes issued before now have ended.
    #[track_caller]
    fn wait_writes(&self, api: &str) {
        self.check(api);
        let me = request::waiter(api);
        let before = self.next_write.get();
        while self.writes.borrow().first().is_some_and(|&s| s < before) {
            self.flushers.borrow_mut().push(me.clone());
            crate::coroutine::suspend();
        }
    }

    /// Flushes data and metadata to stable storage (QEMU's `flush`):
    /// first waits for the writes issued on this `CoFile` before the call
    /// (the engines themselves do not order a flush after requests in
    /// flight), then syncs.
    ///
    /// # Panics
    ///
    /// Outside a coroutine, or off the context's home thread.
    #[doc(alias = "raw_co_flush_to_disk")]
    #[track_caller]
    pub fn fsync(&self) -> io::Result<()> {
        self.wait_writes("CoFile::fsync");
        match self.engine {
            Engine::IoUring => self.uring().fsync(self.fd()),
            Engine::Native => self.aio().fsync(self.fd()),
            Engine::Threads => {
                let f = self.file.clone();
                self.pool(move || f.sync_all())
            }
        }
    }

    /// Flushes data (not all metadata) to stable storage, after the
    /// writes issued before the call, as [`fsync`](Self::fsync).
    ///
    /// # Panics
    ///
    /// Outside a coroutine, or off the context's home thread.
    #[track_caller]
    pub fn fdatasync(&self) -> io::Result<()> {
        self.wait_writes("CoFile::fdatasync");
        match self.engine {
            Engine::IoUring => self.uring().fdatasync(self.fd()),
            Engine::Native => self.aio().fdatasync(self.fd()),
            Engine::Threads => {
                let f = self.file.clone();
                self.pool(move || f.sync_data())
            }
        }
    }

    fn pool<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.ctx.thread_pool().submit_co(f)
    }

    /// The threads engine's read: inline if the page cache has the data,
    /// else on a worker through a buffer of its own.
    #[track_caller]
    fn threads_read(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> io::Result<usize> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let done = match self.read_cached(bufs, offset) {
            Cached::All(n) => return Ok(n),
            Cached::Failed(e) => return Err(e),
            Cached::Part(n) => n, // the rest on a worker
        };
        let len = total - done;
        let f = self.file.clone();
        let at = offset + done as u64;
        let (r, bounce) = self.pool(move || {
            let mut b = AlignedBuf::new(len);
            let r = rustix::io::pread(&*f, b.as_mut_slice(), at);
            (r, b)
        });
        let n = r?;
        scatter(bufs, done, &bounce.as_slice()[..n]);
        Ok(done + n)
    }

    #[track_caller]
    fn threads_write(&self, bufs: &[IoSlice<'_>], offset: u64) -> io::Result<usize> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let mut done = 0;
        if self.write_nowait.get() {
            match rustix::io::pwritev2(self.fd(), bufs, offset, rustix::io::ReadWriteFlags::NOWAIT)
            {
                Ok(n) if n == total => return Ok(n),
                Ok(n) => done = n,
                Err(e) if e == rustix::io::Errno::AGAIN => {}
                Err(e) if e == rustix::io::Errno::OPNOTSUPP || e == rustix::io::Errno::INVAL => {
                    self.write_nowait.set(false);
                }
                Err(e) => return Err(e.into()),
            }
        }
        if done == 0 {
            if let Some(r) = self.write_inline(bufs, offset) {
                return r;
            }
        }
        let mut b = AlignedBuf::new(total - done);
        gather(bufs, done, b.as_mut_slice());
        let f = self.file.clone();
        let at = offset + done as u64;
        let n = self.pool(move || rustix::io::pwrite(&*f, b.as_slice(), at))?;
        Ok(done + n)
    }
}

/// An inline write slower than this pauses inline writes of the file.
const INLINE_WRITE_SLOW: std::time::Duration = std::time::Duration::from_millis(1);
/// How long writes go to the engine after a slow inline write.
const INLINE_WRITE_PAUSE: std::time::Duration = std::time::Duration::from_secs(1);

/// The inline-write policy of one file: on or off, and paused until when
/// after a slow write.
#[derive(Default)]
struct InlineWrites {
    on: Cell<bool>,
    paused_until: Cell<Option<std::time::Instant>>,
}

impl InlineWrites {
    /// Whether a write starting at `now` may run inline (the pause, if
    /// any, is over).
    fn allowed(&self, now: std::time::Instant) -> bool {
        match self.paused_until.get() {
            Some(t) if now < t => false,
            Some(_) => {
                self.paused_until.set(None);
                true
            }
            None => true,
        }
    }

    /// Records an inline write's duration; returns whether it was slow
    /// (inline writes are then paused).
    fn record(&self, start: std::time::Instant, end: std::time::Instant) -> bool {
        let slow = end.saturating_duration_since(start) > INLINE_WRITE_SLOW;
        if slow {
            self.paused_until.set(Some(end + INLINE_WRITE_PAUSE));
        }
        slow
    }
}

/// What a read's inline attempt got.
enum Cached {
    /// The whole read (or 0 at end of file): done.
    All(usize),
    /// This many bytes (maybe 0); the rest must go to the engine.
    Part(usize),
    /// A real error: the read fails with it.
    Failed(io::Error),
}

/// Copies `src` into `bufs`, starting `skip` bytes in.
fn scatter(bufs: &mut [IoSliceMut<'_>], mut skip: usize, mut src: &[u8]) {
    for b in bufs.iter_mut() {
        if src.is_empty() {
            return;
        }
        if skip >= b.len() {
            skip -= b.len();
            continue;
        }
        let dst = &mut b[skip..];
        skip = 0;
        let n = dst.len().min(src.len());
        dst[..n].copy_from_slice(&src[..n]);
        src = &src[n..];
    }
}

/// Copies `bufs`, from `skip` bytes in, into `dst`.
fn gather(bufs: &[IoSlice<'_>], mut skip: usize, dst: &mut [u8]) {
    let mut at = 0;
    for b in bufs {
        if skip >= b.len() {
            skip -= b.len();
            continue;
        }
        let src = &b[skip..];
        skip = 0;
        dst[at..at + src.len()].copy_from_slice(src);
        at += src.len();
    }
}

/// A zeroed heap buffer aligned for `O_DIRECT` (4 KiB).
struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: it owns its allocation exclusively, like a `Box<[u8]>`.
unsafe impl Send for AlignedBuf {}

const ALIGN: usize = 4096;

impl AlignedBuf {
    fn layout(len: usize) -> std::alloc::Layout {
        let cap = len.div_ceil(ALIGN).max(1) * ALIGN;
        match std::alloc::Layout::from_size_align(cap, ALIGN) {
            Ok(l) => l,
            Err(_) => panic!("CoFile: request of {len} bytes is too large"),
        }
    }

    fn new(len: usize) -> AlignedBuf {
        let layout = Self::layout(len);
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { std::alloc::alloc_zeroed(layout) };
        let Some(ptr) = std::ptr::NonNull::new(p) else {
            std::alloc::handle_alloc_error(layout)
        };
        AlignedBuf { ptr, len }
    }

    fn as_slice(&self) -> &[u8] {
        // SAFETY: `len` initialised (zeroed) bytes are allocated at `ptr`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.len)) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn a_slow_inline_write_pauses_inline_writes_for_a_while() {
        let iw = InlineWrites::default();
        let t0 = Instant::now();
        assert!(iw.allowed(t0));
        // A fast write changes nothing.
        assert!(!iw.record(t0, t0 + Duration::from_micros(20)));
        assert!(iw.allowed(t0 + Duration::from_micros(30)));
        // A slow one pauses inline writes until INLINE_WRITE_PAUSE after it.
        let end = t0 + INLINE_WRITE_SLOW + Duration::from_micros(1);
        assert!(iw.record(t0, end));
        assert!(!iw.allowed(end));
        assert!(!iw.allowed(end + INLINE_WRITE_PAUSE - Duration::from_millis(1)));
        // Over: allowed again, and the pause is cleared.
        assert!(iw.allowed(end + INLINE_WRITE_PAUSE));
        assert!(iw.paused_until.get().is_none());
        assert!(iw.allowed(end));
    }
}
