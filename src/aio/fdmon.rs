//! File-descriptor monitoring behind one interface (QEMU's `FDMonOps`).
//!
//! The context talks to a [`FdMonitor`]; `Epoll` is the default. (The
//! file-I/O work adds an io_uring monitor behind the same trait.) The
//! monitor is level-triggered: a readable fd keeps being reported until it
//! is drained, as QEMU's `G_IO_IN`.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use rustix::event::epoll;

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
        let n = loop {
            match epoll::wait(&self.epfd, &mut events[..], ts) {
                Ok(n) => break n,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
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
}

impl AsFd for Epoll {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.epfd.as_fd()
    }
}
