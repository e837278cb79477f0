//! Coroutine I/O (QEMU's `util/qemu-coroutine-io.c` and
//! `yield_until_fd_readable`): wait for fds by suspending the coroutine,
//! so ordinary blocking-style code runs without blocking its thread.
//!
//! [`CoFd`] implements `std::io::Read` and `Write` by suspending on
//! `WouldBlock`, so synchronous libraries (`std::io::copy`, `BufRead`
//! line readers, serde readers) work inside coroutines.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::aio::{AioContext, ClockType, FdHandler, RawFdSource};
use crate::coroutine::RemoteCoroutine;
use crate::Coroutine;

/// One coroutine waiting for one direction of an fd.
struct Waiting {
    ready: Rc<Cell<bool>>,
    remote: RemoteCoroutine,
}

/// The waits on one fd of one context: a reader and a writer may wait at
/// once (QEMU's `qio_channel_yield` keeps a read and a write coroutine per
/// channel), sharing one fd handler watching the directions awaited.
#[derive(Default)]
struct FdWaits {
    read: Option<Waiting>,
    write: Option<Waiting>,
    handler: Option<FdHandler<RawFdSource>>,
}

type WaitKey = (usize, RawFd);

/// Per (context, fd): the waits in progress on this thread. Its
/// destruction begins the thread's teardown (see `coroutine/teardown.rs`),
/// so no coroutine is unwound or resumed after it is gone.
struct Waits {
    /// First: fields drop in order, so the teardown begins before the map
    /// (and the fd handlers in it) goes.
    _teardown: crate::coroutine::TeardownOnDrop,
    map: RefCell<HashMap<WaitKey, Rc<RefCell<FdWaits>>>>,
}

thread_local! {
    static WAITS: Waits = Waits {
        _teardown: crate::coroutine::TeardownOnDrop,
        map: RefCell::new(HashMap::new()),
    };
}

impl FdWaits {
    fn slot(&mut self, write: bool) -> &mut Option<Waiting> {
        if write {
            &mut self.write
        } else {
            &mut self.read
        }
    }
}

/// The fd became ready in one direction: wake its waiter.
fn fire(entry: &Weak<RefCell<FdWaits>>, write: bool) {
    let Some(e) = entry.upgrade() else { return };
    let w = {
        let mut e = e.borrow_mut();
        e.slot(write)
            .as_ref()
            .map(|w| (w.ready.clone(), w.remote.clone()))
    };
    if let Some((ready, remote)) = w {
        if !ready.replace(true) {
            // SAFETY: fd handlers run on the context's home thread, which
            // is the home thread of the coroutines it resumes.
            if let Some(co) = unsafe { remote.upgrade_home() } {
                co.wake();
            }
        }
    }
}

/// Registers the fd handler for the directions now awaited (or none).
fn rearm(ctx: &AioContext, key: WaitKey, entry: &Rc<RefCell<FdWaits>>) -> io::Result<()> {
    let old = entry.borrow_mut().handler.take();
    drop(old);
    let (r, w) = {
        let e = entry.borrow();
        (e.read.is_some(), e.write.is_some())
    };
    if !r && !w {
        // Gone only during the thread's teardown, after which no wait
        // ends here (coroutines are neither unwound nor resumed).
        let _ = WAITS.try_with(|m| m.map.borrow_mut().remove(&key));
        return Ok(());
    }
    let cb = |write: bool| -> crate::aio::IoHandler {
        let weak = Rc::downgrade(entry);
        Box::new(move || fire(&weak, write))
    };
    // SAFETY: the fd is borrowed by every waiter in `entry` for the whole
    // of its wait, and the handler is dropped when the last one leaves
    // (`WaitGuard`), so it never outlives the fd.
    let h = unsafe {
        ctx.set_fd_handler_raw(
            key.1,
            false,
            r.then(|| cb(false)),
            w.then(|| cb(true)),
            None,
        )?
    };
    entry.borrow_mut().handler = Some(h);
    Ok(())
}

/// Ends one wait (normally or while unwinding) and re-arms the handler.
struct WaitGuard {
    ctx: AioContext,
    key: WaitKey,
    entry: Rc<RefCell<FdWaits>>,
    write: bool,
}

impl Drop for WaitGuard {
    fn drop(&mut self) {
        let w = self.entry.borrow_mut().slot(self.write).take();
        drop(w);
        if let Err(e) = rearm(&self.ctx, self.key, &self.entry) {
            log::error!("coroloop: io: cannot re-arm fd {}: {e}", self.key.1);
        }
    }
}

fn wait_fd(fd: &impl AsFd, write: bool, api: &'static str) -> io::Result<()> {
    wait_fd_until(fd, write, api, None)
}

/// The `io::Error` of a wait that timed out (`ErrorKind::TimedOut`).
pub(crate) fn timed_out(api: &str, after: Duration) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!("{api}: timed out after {after:?}"),
    )
}

/// `wait_fd` that gives up at `deadline` (with `ErrorKind::TimedOut`, the
/// timeout named), timed on the context's realtime clock.
pub(crate) fn wait_fd_until(
    fd: &impl AsFd,
    write: bool,
    api: &'static str,
    deadline: Option<(Instant, Duration)>,
) -> io::Result<()> {
    if let Some((at, after)) = deadline {
        if Instant::now() >= at {
            return Err(timed_out(api, after));
        }
    }
    let Some(me) = Coroutine::current() else {
        panic!("{api} called outside a coroutine");
    };
    // The library's own reference: it does not keep the context alive
    // for its user (see `AioContext::internal`).
    let Some(ctx) = me.aio_context().map(|c| c.internal()) else {
        return Err(io::Error::other(format!(
            "{api}: the coroutine has no AioContext to watch the fd"
        )));
    };
    let raw = fd.as_fd().as_raw_fd();
    let key = (Arc::as_ptr(&ctx.inner) as usize, raw);
    let entry = WAITS
        .try_with(|m| m.map.borrow_mut().entry(key).or_default().clone())
        .map_err(|_| {
            io::Error::other(format!(
                "{api}: cannot wait for fd {raw}: the thread is exiting"
            ))
        })?;
    let ready = Rc::new(Cell::new(false));
    {
        let mut e = entry.borrow_mut();
        let slot = e.slot(write);
        if slot.is_some() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "{api}: another coroutine already waits for fd {raw} to become {}",
                    if write { "writable" } else { "readable" }
                ),
            ));
        }
        *slot = Some(Waiting {
            ready: ready.clone(),
            remote: me.remote(),
        });
    }
    let remote = me.remote();
    drop(me);
    let guard = WaitGuard {
        ctx,
        key,
        entry,
        write,
    };
    rearm(&guard.ctx, key, &guard.entry)?;
    // The timeout: a timer of the context that wakes the waiter (dropped,
    // and so disarmed, when the wait ends either way).
    let expired = Rc::new(Cell::new(false));
    let _timer = deadline.map(|(at, _)| {
        let (e, r) = (expired.clone(), remote.clone());
        let t = guard.ctx.timer_new(ClockType::Realtime, move || {
            e.set(true);
            r.wake();
        });
        t.mod_after(at.saturating_duration_since(Instant::now()));
        t
    });
    while !ready.get() {
        if guard.ctx.inner.is_dead() {
            // Woken by the shutdown (`wake_waiters_of`): nothing else will
            // make the fd ready for this context.
            return Err(io::Error::other(format!(
                "{api}: cannot wait for fd {raw}: the context is shut down"
            )));
        }
        if expired.get() {
            return Err(timed_out(api, deadline.map_or(Duration::ZERO, |d| d.1)));
        }
        crate::coroutine::suspend();
    }
    drop(guard);
    Ok(())
}

/// At a context's shutdown: wakes (through their resumers) the coroutines
/// still waiting for an fd of it, which then fail their wait with an
/// `io::Error`. Those the context resumes were cancelled already; these
/// are coroutines of a `CoroutineFuture` that used the context.
pub(crate) fn wake_waiters_of(ctx_addr: usize) {
    let waiters: Vec<RemoteCoroutine> = WAITS
        .try_with(|m| {
            m.map
                .borrow()
                .iter()
                .filter(|(k, _)| k.0 == ctx_addr)
                .flat_map(|(_, e)| {
                    let e = e.borrow();
                    [e.read.as_ref(), e.write.as_ref()]
                        .into_iter()
                        .flatten()
                        .map(|w| w.remote.clone())
                        .collect::<Vec<_>>()
                })
                .collect()
        })
        .unwrap_or_default();
    for w in waiters {
        w.wake();
    }
}

/// Suspends the current coroutine until `fd` is readable (or hung up),
/// using its AioContext (QEMU's `yield_until_fd_readable`).
///
/// One coroutine may wait for an fd to become readable while another waits
/// for it to become writable (a reader and a writer sharing a socket).
///
/// # Errors
///
/// If the coroutine has no AioContext, the fd cannot be watched (watched
/// by an fd handler of this context, a regular file), or another coroutine
/// already waits for the same fd in the same direction (`AlreadyExists`).
///
/// # Panics
///
/// Outside a coroutine.
#[track_caller]
pub fn yield_until_fd_readable(fd: &impl AsFd) -> io::Result<()> {
    wait_fd(fd, false, "io::yield_until_fd_readable")
}

/// Suspends the current coroutine until `fd` is writable.
///
/// # Errors
///
/// As [`yield_until_fd_readable`].
///
/// # Panics
///
/// Outside a coroutine.
#[track_caller]
pub fn yield_until_fd_writable(fd: &impl AsFd) -> io::Result<()> {
    wait_fd(fd, true, "io::yield_until_fd_writable")
}

/// Receives into `bufs` from socket `fd` until they are full, the peer
/// closes, or an error (QEMU's `qemu_co_recvv`). Returns the bytes
/// received: fewer than asked only at end of stream, or if an error came
/// after some data (the error is then dropped, as QEMU reports partial
/// progress).
///
/// # Errors
///
/// The socket error if nothing was received.
///
/// # Panics
///
/// Outside a coroutine.
#[doc(alias = "qemu_co_recvv")]
#[track_caller]
pub fn co_recvv(fd: &impl AsFd, mut bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
    let mut done = 0;
    while bufs.iter().any(|b| !b.is_empty()) {
        let r = rustix::net::recvmsg(
            fd,
            bufs,
            &mut Default::default(),
            rustix::net::RecvFlags::DONTWAIT,
        );
        match r {
            Ok(msg) if msg.bytes == 0 => break, // end of stream
            Ok(msg) => {
                done += msg.bytes;
                IoSliceMut::advance_slices(&mut bufs, msg.bytes);
            }
            Err(rustix::io::Errno::AGAIN) => yield_until_fd_readable(fd)?,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) if done == 0 => return Err(e.into()),
            Err(_) => break,
        }
    }
    Ok(done)
}

/// Sends all of `bufs` on socket `fd` (QEMU's `qemu_co_sendv`); returns the
/// bytes sent, fewer only if an error came after some were sent.
///
/// # Errors
///
/// The socket error (e.g. `EPIPE` after the peer closed) if nothing was
/// sent.
///
/// # Panics
///
/// Outside a coroutine.
#[doc(alias = "qemu_co_sendv")]
#[track_caller]
pub fn co_sendv(fd: &impl AsFd, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
    let total: usize = bufs.iter().map(|b| b.len()).sum();
    let mut done = 0;
    while done < total {
        // Rebuild the remaining slices (sendmsg may stop mid-buffer).
        let mut skip = done;
        let mut rest: Vec<IoSlice<'_>> = Vec::with_capacity(bufs.len());
        for b in bufs {
            if skip >= b.len() {
                skip -= b.len();
                continue;
            }
            rest.push(IoSlice::new(&b[skip..]));
            skip = 0;
        }
        let r = rustix::net::sendmsg(
            fd,
            &rest,
            &mut Default::default(),
            rustix::net::SendFlags::DONTWAIT | rustix::net::SendFlags::NOSIGNAL,
        );
        match r {
            Ok(n) => done += n,
            Err(rustix::io::Errno::AGAIN) => yield_until_fd_writable(fd)?,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) if done == 0 => return Err(e.into()),
            Err(_) => break,
        }
    }
    Ok(done)
}

/// [`co_recvv`] with one buffer (QEMU's `qemu_co_recv`).
///
/// # Errors
///
/// As [`co_recvv`].
#[doc(alias = "qemu_co_recv")]
#[track_caller]
pub fn co_recv(fd: &impl AsFd, buf: &mut [u8]) -> io::Result<usize> {
    co_recvv(fd, &mut [IoSliceMut::new(buf)])
}

/// [`co_sendv`] with one buffer (QEMU's `qemu_co_send`).
///
/// # Errors
///
/// As [`co_sendv`].
#[doc(alias = "qemu_co_send")]
#[track_caller]
pub fn co_send(fd: &impl AsFd, buf: &[u8]) -> io::Result<usize> {
    co_sendv(fd, &[IoSlice::new(buf)])
}

/// An fd whose `std::io::Read` / `Write` suspend the current coroutine
/// instead of blocking the thread. `new` puts the fd in non-blocking mode
/// (which affects every duplicate of it).
///
/// Outside a coroutine, reads and writes that would block return
/// `WouldBlock`, as on any non-blocking fd.
///
/// # Examples
///
/// ```
/// use coroloop::{aio::AioContext, io::CoFd, Coroutine};
/// use std::io::{BufRead, BufReader, Write};
/// use std::os::unix::net::UnixStream;
///
/// let ctx = AioContext::new()?;
/// let (a, b) = UnixStream::pair()?;
/// let reader = Coroutine::new(move || {
///     let lines = BufReader::new(CoFd::new(a).unwrap()).lines();
///     lines.map(|l| l.unwrap()).collect::<Vec<_>>()
/// });
/// reader.enter(); // suspends: nothing to read yet
/// let writer = Coroutine::new(move || {
///     let mut w = CoFd::new(b).unwrap();
///     w.write_all(b"one\ntwo\n").unwrap();
/// }); // dropping the writer closes the socket: EOF for the reader
/// writer.enter();
/// drop(writer);
/// ctx.poll_while(|| !reader.is_finished());
/// assert_eq!(reader.take_result().unwrap(), ["one", "two"]);
/// # std::io::Result::Ok(())
/// ```
#[derive(Debug)]
pub struct CoFd<T: AsFd> {
    inner: T,
    timeouts: Timeouts,
}

/// Read and write timeouts (nanoseconds, 0 for none), shared by the
/// coroutine I/O types.
#[derive(Debug, Default)]
pub(crate) struct Timeouts {
    read: AtomicU64,
    write: AtomicU64,
}

impl Timeouts {
    pub(crate) fn set(&self, write: bool, d: Option<Duration>, api: &str) -> io::Result<()> {
        let ns = match d {
            None => 0,
            Some(d) if d.is_zero() => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{api}: a zero timeout is invalid (use None for no timeout)"),
                ))
            }
            Some(d) => u64::try_from(d.as_nanos()).unwrap_or(u64::MAX),
        };
        let slot = if write { &self.write } else { &self.read };
        slot.store(ns, Ordering::Relaxed);
        Ok(())
    }

    pub(crate) fn get(&self, write: bool) -> Option<Duration> {
        let slot = if write { &self.write } else { &self.read };
        match slot.load(Ordering::Relaxed) {
            0 => None,
            ns => Some(Duration::from_nanos(ns)),
        }
    }
}

/// Runs the non-blocking `op` on `fd`, suspending the current coroutine
/// while it would block, until it succeeds, fails, or `timeout` (counted
/// from the first attempt) runs out (`ErrorKind::TimedOut`). Outside a
/// coroutine `WouldBlock` is returned as is.
pub(crate) fn retry_io<F: AsFd + ?Sized, R>(
    fd: &F,
    write: bool,
    api: &'static str,
    timeout: Option<Duration>,
    mut op: impl FnMut(&F) -> rustix::io::Result<R>,
) -> io::Result<R> {
    let mut deadline = None;
    loop {
        match op(fd) {
            Ok(r) => return Ok(r),
            Err(rustix::io::Errno::INTR) => {}
            Err(rustix::io::Errno::AGAIN) if crate::coroutine::in_coroutine() => {
                if deadline.is_none() {
                    deadline = timeout.map(|t| (Instant::now() + t, t));
                }
                wait_fd_until(&fd.as_fd(), write, api, deadline)?
            }
            Err(e) => return Err(e.into()),
        }
    }
}

impl<T: AsFd> CoFd<T> {
    /// Wraps `inner`, setting its fd non-blocking.
    ///
    /// # Errors
    ///
    /// If `fcntl` fails.
    pub fn new(inner: T) -> io::Result<CoFd<T>> {
        let fd = inner.as_fd();
        let flags = rustix::fs::fcntl_getfl(fd)?;
        rustix::fs::fcntl_setfl(fd, flags | rustix::fs::OFlags::NONBLOCK)?;
        Ok(CoFd {
            inner,
            timeouts: Timeouts::default(),
        })
    }

    /// Bounds each read (std's `set_read_timeout` signature): a read that
    /// waits longer fails with `io::ErrorKind::TimedOut`. Unlike std on
    /// Unix, which reports `WouldBlock` there, the kind says "timed out":
    /// inside a coroutine `WouldBlock` would read as "try again". `None`
    /// (the default) waits for ever.
    ///
    /// # Errors
    ///
    /// `InvalidInput` for a zero duration, as std.
    pub fn set_read_timeout(&self, dur: Option<Duration>) -> io::Result<()> {
        self.timeouts.set(false, dur, "CoFd::set_read_timeout")
    }

    /// Bounds each write: as [`set_read_timeout`](Self::set_read_timeout).
    ///
    /// # Errors
    ///
    /// `InvalidInput` for a zero duration, as std.
    pub fn set_write_timeout(&self, dur: Option<Duration>) -> io::Result<()> {
        self.timeouts.set(true, dur, "CoFd::set_write_timeout")
    }

    /// The read timeout.
    pub fn read_timeout(&self) -> io::Result<Option<Duration>> {
        Ok(self.timeouts.get(false))
    }

    /// The write timeout.
    pub fn write_timeout(&self) -> io::Result<Option<Duration>> {
        Ok(self.timeouts.get(true))
    }

    /// The wrapped value.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// Unwraps (the fd stays non-blocking).
    pub fn into_inner(self) -> T {
        self.inner
    }

    fn retry<R>(&self, write: bool, op: impl FnMut(&T) -> rustix::io::Result<R>) -> io::Result<R> {
        retry_io(
            &self.inner,
            write,
            if write { "CoFd::write" } else { "CoFd::read" },
            self.timeouts.get(write),
            op,
        )
    }
}

impl<T: AsFd> Read for CoFd<T> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.retry(false, |f| rustix::io::read(f, &mut *buf))
    }

    fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        self.retry(false, |f| rustix::io::readv(f, &mut *bufs))
    }
}

impl<T: AsFd> Write for CoFd<T> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.retry(true, |f| rustix::io::write(f, buf))
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.retry(true, |f| rustix::io::writev(f, bufs))
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<T: AsFd> AsFd for CoFd<T> {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.inner.as_fd()
    }
}
