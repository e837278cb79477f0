//! File-descriptor monitoring behind one interface (QEMU's `FDMonOps`).
//!
//! The context talks to a [`FdMonitor`], chosen when it is created (see
//! [`FdMonitorKind`]): `Epoll` (the default) or io_uring poll requests
//! (`fdmon_uring.rs`). Either is level-triggered: a readable fd keeps being
//! reported until it is drained, as QEMU's `G_IO_IN`.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use rustix::event::epoll;

use super::fdmon_uring::UringMonitor;

/// How an [`AioContext`](super::AioContext) watches file descriptors
/// (QEMU's `FDMonOps`: `fdmon-epoll`, `fdmon-io_uring`). Chosen when the
/// context is created, with
/// [`AioContextBuilder::fd_monitor`](super::AioContextBuilder::fd_monitor)
/// or [`IoThreadBuilder::fd_monitor`](super::IoThreadBuilder::fd_monitor).
///
/// Both behave the same for fd handlers: level-triggered (a handler runs
/// again on every iteration while its fd stays readable or writable), a
/// removed handler is never called, and the context's [`AsFd`] fd is
/// readable while an event is pending, for driving the context from
/// another loop.
///
/// The default is [`Epoll`](Self::Epoll), unless the environment variable
/// `COROLOOP_FDMON` is `io_uring` (read once per process): then contexts
/// that do not choose get [`IoUring`](Self::IoUring), falling back to epoll
/// with a logged warning where io_uring cannot be set up.
#[doc(alias = "FDMonOps")]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FdMonitorKind {
    /// epoll(7) (QEMU's `fdmon-epoll`): one `epoll_ctl` per registration
    /// change, one `epoll_wait` per sleep. Works everywhere.
    Epoll,
    /// io_uring poll requests (QEMU's `fdmon-io_uring`): a one-shot
    /// `IORING_OP_POLL_ADD` per watched fd, re-armed after it fired, and
    /// submitted together with the wait in one `io_uring_enter`. Needs
    /// Linux 5.11 or later with io_uring enabled (not disabled by
    /// `kernel.io_uring_disabled`, a seccomp filter or a container
    /// runtime); otherwise creating such a context fails.
    ///
    /// The kernel delivers poll completions to the context's home thread
    /// as task work, which interrupts that thread's blocking system calls
    /// as a signal would: calls without a timeout restart transparently,
    /// but one with a timeout (a socket read with `SO_RCVTIMEO`, ...) made
    /// on the home thread outside the loop may fail with `EINTR` when a
    /// watched fd becomes ready.
    #[doc(alias = "fdmon-io_uring")]
    IoUring,
}

/// The kind of contexts that do not choose one: `COROLOOP_FDMON`, read once.
pub(crate) fn default_kind() -> FdMonitorKind {
    static KIND: OnceLock<FdMonitorKind> = OnceLock::new();
    *KIND.get_or_init(|| match std::env::var("COROLOOP_FDMON") {
        Err(std::env::VarError::NotPresent) => FdMonitorKind::Epoll,
        Ok(v) => match v.trim().to_ascii_lowercase().as_str() {
            "io_uring" | "io-uring" | "iouring" | "uring" => FdMonitorKind::IoUring,
            "epoll" | "" => FdMonitorKind::Epoll,
            other => {
                log::warn!(
                    "coroloop: COROLOOP_FDMON={other:?} is not a known fd monitor \
                     (`epoll` or `io_uring`); using epoll"
                );
                FdMonitorKind::Epoll
            }
        },
        Err(std::env::VarError::NotUnicode(v)) => {
            log::warn!("coroloop: COROLOOP_FDMON={v:?} is not a known fd monitor; using epoll");
            FdMonitorKind::Epoll
        }
    })
}

/// Creates the monitor of a new context: `kind` if given (its error is
/// returned), else [`default_kind`], which falls back to epoll with a
/// warning (logged once) if io_uring cannot be set up.
pub(crate) fn create(kind: Option<FdMonitorKind>) -> io::Result<Box<dyn FdMonitor>> {
    /// io_uring from the environment failed once: don't try again.
    static ENV_URING_FAILED: AtomicBool = AtomicBool::new(false);
    match kind {
        Some(FdMonitorKind::Epoll) => Ok(Box::new(Epoll::new()?)),
        Some(FdMonitorKind::IoUring) => Ok(Box::new(UringMonitor::new()?)),
        None => match default_kind() {
            FdMonitorKind::IoUring if !ENV_URING_FAILED.load(Ordering::Relaxed) => {
                match UringMonitor::new() {
                    Ok(m) => Ok(Box::new(m)),
                    Err(e) => {
                        if !ENV_URING_FAILED.swap(true, Ordering::Relaxed) {
                            log::warn!(
                                "coroloop: COROLOOP_FDMON=io_uring, but {e}; \
                                 AioContexts use epoll instead"
                            );
                        }
                        Ok(Box::new(Epoll::new()?))
                    }
                }
            }
            _ => Ok(Box::new(Epoll::new()?)),
        },
    }
}

/// Readiness reported for one registration.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Ready {
    pub(crate) key: u64,
    pub(crate) readable: bool,
    pub(crate) writable: bool,
    /// Hang-up or error: both read and write handlers get to see it.
    pub(crate) error: bool,
}

/// What every fd monitor offers the loop.
pub(crate) trait FdMonitor: Send + Sync {
    fn add(&self, fd: BorrowedFd<'_>, key: u64, read: bool, write: bool) -> io::Result<()>;
    /// Watches the context's own eventfd edge-triggered: every write is
    /// reported once, so the loop never has to read it back.
    fn add_notifier(&self, fd: BorrowedFd<'_>, key: u64) -> io::Result<()>;
    fn modify(&self, fd: BorrowedFd<'_>, key: u64, read: bool, write: bool) -> io::Result<()>;
    fn delete(&self, fd: BorrowedFd<'_>) -> io::Result<()>;
    /// Waits up to `timeout` (`None`: forever) and appends what is ready.
    fn wait(&self, timeout: Option<Duration>, out: &mut Vec<Ready>) -> io::Result<()>;
    /// An fd that is readable whenever `wait` would return events.
    fn as_fd_dyn(&self) -> BorrowedFd<'_>;
    /// Called before an outer loop sleeps on `as_fd_dyn` (see
    /// `AioContext::prepare`): hands the kernel whatever the monitor
    /// deferred to its next `wait` (io_uring: re-armed poll requests), so
    /// that the fd becomes readable when a watched fd is ready.
    fn prepare_wait(&self) {}
    /// The context shut down: drops every registration but the
    /// notifiers. Its handlers are gone and will close their fds without
    /// `delete`; epoll forgets a closed fd by itself, io_uring's poll
    /// requests would keep the files open until the monitor is dropped.
    fn shutdown(&self) {}
    /// Which implementation this is.
    fn kind(&self) -> FdMonitorKind;
}

/// epoll(7) through rustix.
pub(crate) struct Epoll {
    epfd: OwnedFd,
}

impl Epoll {
    pub(crate) fn new() -> io::Result<Epoll> {
        let epfd = epoll::create(epoll::CreateFlags::CLOEXEC)
            .map_err(|e| io::Error::new(e.kind(), format!("epoll_create1: {e}")))?;
        Ok(Epoll { epfd })
    }

    fn flags(read: bool, write: bool) -> epoll::EventFlags {
        let mut f = epoll::EventFlags::empty();
        if read {
            f |= epoll::EventFlags::IN | epoll::EventFlags::RDHUP;
        }
        if write {
            f |= epoll::EventFlags::OUT;
        }
        f
    }
}

impl FdMonitor for Epoll {
    fn add(&self, fd: BorrowedFd<'_>, key: u64, read: bool, write: bool) -> io::Result<()> {
        let data = epoll::EventData::new_u64(key);
        Ok(epoll::add(&self.epfd, fd, data, Self::flags(read, write))?)
    }

    fn add_notifier(&self, fd: BorrowedFd<'_>, key: u64) -> io::Result<()> {
        let data = epoll::EventData::new_u64(key);
        let flags = epoll::EventFlags::IN | epoll::EventFlags::ET;
        Ok(epoll::add(&self.epfd, fd, data, flags)?)
    }

    fn modify(&self, fd: BorrowedFd<'_>, key: u64, read: bool, write: bool) -> io::Result<()> {
        let data = epoll::EventData::new_u64(key);
        Ok(epoll::modify(
            &self.epfd,
            fd,
            data,
            Self::flags(read, write),
        )?)
    }

    fn delete(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        epoll::delete(&self.epfd, fd)?;
        Ok(())
    }

    fn wait(&self, timeout: Option<Duration>, out: &mut Vec<Ready>) -> io::Result<()> {
        let mut events = [epoll::Event {
            flags: epoll::EventFlags::empty(),
            data: epoll::EventData::new_u64(0),
        }; 64];
        // epoll_wait has millisecond resolution. For a finite, non-zero
        // timeout, first sleep in ppoll(2) on the epoll fd itself, which
        // takes nanoseconds, then harvest with a zero-timeout epoll_wait
        // (QEMU's fdmon-epoll does the same). epoll_pwait2 would do it in
        // one call, but seccomp filters and valgrind still reject it.
        if let Some(d) = timeout.filter(|d| !d.is_zero()) {
            let ts = rustix::time::Timespec {
                tv_sec: d.as_secs().min(i64::MAX as u64) as _,
                tv_nsec: d.subsec_nanos() as _,
            };
            let mut pfd = [rustix::event::PollFd::from_borrowed_fd(
                self.epfd.as_fd(),
                rustix::event::PollFlags::IN,
            )];
            match rustix::event::poll(&mut pfd, Some(&ts)) {
                // Timed out, or a signal: nothing ready (a spurious wake).
                Ok(0) | Err(rustix::io::Errno::INTR) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let zero = rustix::time::Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        let ts = timeout.map(|_| &zero);
        let n = match epoll::wait(&self.epfd, &mut events[..], ts) {
            Ok(n) => n,
            // A signal, or io_uring task work (a file engine's completion
            // posted to this thread): return as a spurious wake, so the
            // loop reaps it now instead of sleeping again first.
            Err(rustix::io::Errno::INTR) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        for ev in &events[..n] {
            let f = ev.flags;
            out.push(Ready {
                key: ev.data.u64(),
                readable: f.intersects(epoll::EventFlags::IN | epoll::EventFlags::RDHUP),
                writable: f.contains(epoll::EventFlags::OUT),
                error: f.intersects(epoll::EventFlags::ERR | epoll::EventFlags::HUP),
            });
        }
        Ok(())
    }

    fn as_fd_dyn(&self) -> BorrowedFd<'_> {
        self.epfd.as_fd()
    }

    fn kind(&self) -> FdMonitorKind {
        FdMonitorKind::Epoll
    }
}

impl AsFd for Epoll {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.epfd.as_fd()
    }
}
