//! Fd monitoring with io_uring poll requests (QEMU's
//! `util/fdmon-io_uring.c`).
//!
//! Every registration with an interest is one one-shot `IORING_OP_POLL_ADD`
//! in the kernel. When it completes, its readiness is reported and the
//! registration is re-armed (a new `POLL_ADD`) at the start of the next
//! [`wait`](FdMonitor::wait), after the handlers ran: if the fd is still
//! ready, the new request completes at once, inside the same
//! `io_uring_enter` that submits it. That gives epoll's level-triggered
//! semantics with one system call per loop iteration (submit and wait
//! together), and none for a non-blocking poll with nothing to submit: the
//! completion queue is read from shared memory.
//!
//! ```text
//!  user_data = generation << 32 | slot index     (u64::MAX: ignored)
//!  add      → POLL_ADD (queued; submitted by the next wait/prepare_wait)
//!  modify   → POLL_REMOVE(old) + POLL_ADD(new generation)
//!  delete   → POLL_REMOVE(old), submitted at once: the kernel drops its
//!             file reference before the caller closes the fd
//!  CQE      → stale generation: ignored; else report, queue the re-arm
//! ```
//!
//! The context's own notifier is reported once per write, as epoll's
//! edge-triggered registration: the monitor reads the eventfd back when its
//! poll completes (a poll on a still-readable eventfd would fire again at
//! once), then re-arms it like any other.
//!
//! The ring's fd is the monitor's fd: it is readable while completions are
//! waiting in the queue. `prepare_wait` submits the pending re-arms before
//! an outer loop sleeps on it.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use io_uring::{opcode, squeue, types, IoUring};
use rustix::event::epoll;
use slab::Slab;

use super::fdmon::{FdMonitor, FdMonitorKind, Ready};

/// Submission queue entries: re-arms of up to this many fds go to the
/// kernel in one `io_uring_enter`; more take one call per batch.
const SQ_ENTRIES: u32 = 256;
/// Completion queue entries. A fuller queue is not lost (the kernel keeps
/// the overflow and the harvest flushes it), only slower.
const CQ_ENTRIES: u32 = 1024;
/// user_data of requests whose completions are ignored (POLL_REMOVE, NOP).
const IGNORED: u64 = u64::MAX;

const POLLIN: u32 = libc::POLLIN as u16 as u32;
const POLLOUT: u32 = libc::POLLOUT as u16 as u32;
const POLLERR: u32 = libc::POLLERR as u16 as u32;
const POLLHUP: u32 = libc::POLLHUP as u16 as u32;
const POLLRDHUP: u32 = libc::POLLRDHUP as u16 as u32;

/// One registration.
struct Slot {
    /// The fd polled: the caller's (kept open by it while registered), or
    /// `notifier`'s.
    fd: RawFd,
    /// The notifier: the monitor's own duplicate of the eventfd, read back
    /// when its poll completes.
    notifier: Option<OwnedFd>,
    key: u64,
    /// Poll mask; 0 = no interest (nothing armed).
    events: u32,
    /// user_data of the `POLL_ADD` in flight (queued or in the kernel).
    armed: Option<u64>,
    /// Fired (or cancelled): to be re-armed by the next `wait`.
    rearm: bool,
}

struct State {
    ring: IoUring,
    slots: Slab<Slot>,
    /// Caller's fd → slot (the notifier is not in it).
    by_fd: HashMap<RawFd, usize>,
    /// Slots with `rearm` set (may hold indices since removed or reused).
    rearm: Vec<usize>,
    next_gen: u32,
    /// Events harvested outside `wait` (to make room in a full queue),
    /// reported by the next `wait`.
    backlog: Vec<Ready>,
    /// `IOSQE_CQE_SKIP_SUCCESS` works (5.17+): removals post no completion.
    skip_success: bool,
    /// A scratch epoll set to tell files without poll support (see
    /// `check_pollable`).
    probe: Option<OwnedFd>,
}

/// The io_uring fd monitor. The state sits behind a mutex for `Sync`; only
/// the context's home thread uses it, so it is never contended (and it is
/// held across the sleep in the kernel).
pub(crate) struct UringMonitor {
    ring_fd: RawFd,
    state: Mutex<State>,
}

fn errno(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

/// "Operation not permitted" without the " (os error 1)" suffix.
fn describe(e: &io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

fn setup_error(e: io::Error) -> io::Error {
    let disabled = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok());
    let hint = match e.raw_os_error() {
        Some(libc::EPERM) => match disabled {
            Some(2) => " (io_uring is disabled: kernel.io_uring_disabled = 2)",
            Some(1) => {
                " (kernel.io_uring_disabled = 1 and this process is not in \
                 kernel.io_uring_group)"
            }
            _ => " (io_uring disabled by kernel.io_uring_disabled or a seccomp filter?)",
        },
        Some(libc::ENOSYS) => " (a kernel without io_uring, or a seccomp filter?)",
        Some(libc::ENOMEM) => " (locked-memory limit too low, on kernels before 5.12?)",
        _ => "",
    };
    io::Error::new(
        e.kind(),
        format!(
            "io_uring could not be set up: io_uring_setup: {}{hint}",
            describe(&e)
        ),
    )
}

fn enter_error(e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("io_uring_enter: {}", describe(&e)))
}

fn mask(read: bool, write: bool) -> u32 {
    let mut m = 0;
    if read {
        m |= POLLIN | POLLRDHUP;
    }
    if write {
        m |= POLLOUT;
    }
    m
}

/// Appends `r`, or with `merge` ORs it into an entry of the same key
/// appended since `from`.
fn push_ready(out: &mut Vec<Ready>, from: usize, merge: bool, r: Ready) {
    if merge {
        if let Some(o) = out[from..].iter_mut().find(|o| o.key == r.key) {
            o.readable |= r.readable;
            o.writable |= r.writable;
            o.error |= r.error;
            return;
        }
    }
    out.push(r);
}

impl UringMonitor {
    /// Sets up a ring.
    ///
    /// # Errors
    ///
    /// When io_uring is unavailable (kernel, sysctl, seccomp, memory) or
    /// too old, with a message that says so and why.
    pub(crate) fn new() -> io::Result<UringMonitor> {
        if let Some(v) = std::env::var_os("COROLOOP_DISABLE_IO_URING") {
            if v != "0" {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "io_uring could not be set up: disabled by COROLOOP_DISABLE_IO_URING",
                ));
            }
        }
        // No COOP_TASKRUN or DEFER_TASKRUN: a poll completion must be
        // posted (making the ring fd readable) while the home thread sleeps
        // elsewhere, e.g. in an outer loop's poll(2) on that fd.
        let ring = IoUring::builder()
            .setup_cqsize(CQ_ENTRIES)
            .setup_clamp()
            .build(SQ_ENTRIES)
            .map_err(setup_error)?;
        let p = ring.params();
        if !p.is_feature_ext_arg() || !p.is_feature_nodrop() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "io_uring could not be set up: the kernel lacks IORING_FEAT_EXT_ARG \
                 (waits with a timeout need Linux 5.11 or later)",
            ));
        }
        let skip_success = p.is_feature_skip_cqe_on_success();
        Ok(UringMonitor {
            ring_fd: ring.as_raw_fd(),
            state: Mutex::new(State {
                ring,
                slots: Slab::new(),
                by_fd: HashMap::new(),
                rearm: Vec::new(),
                next_gen: 1,
                backlog: Vec::new(),
                skip_success,
                probe: None,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl State {
    /// Queues an SQE, submitting to make room when the queue is full.
    fn push(&mut self, e: &squeue::Entry) -> io::Result<()> {
        for _ in 0..16 {
            // SAFETY: poll add/remove and nop requests reference no memory
            // of ours (the fd is only a number, resolved by the kernel).
            if unsafe { self.ring.submission().push(e) }.is_ok() {
                return Ok(());
            }
            self.submit()?;
        }
        Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            "io_uring: the submission queue stays full",
        ))
    }

    /// Hands the queued SQEs to the kernel without waiting.
    fn submit(&mut self) -> io::Result<()> {
        let mut tries = 0;
        loop {
            match self.ring.submit() {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                // Old kernels refuse to submit while completions overflow;
                // harvesting makes room (the events wait in the backlog).
                Err(e)
                    if matches!(e.raw_os_error(), Some(libc::EBUSY | libc::EAGAIN))
                        && tries < 8 =>
                {
                    tries += 1;
                    let mut backlog = std::mem::take(&mut self.backlog);
                    self.harvest(&mut backlog, 0, true);
                    self.backlog = backlog;
                    if e.raw_os_error() == Some(libc::EAGAIN) {
                        std::thread::yield_now();
                    }
                }
                Err(e) => return Err(enter_error(e)),
            }
        }
    }

    fn has_queued(&mut self) -> bool {
        let sq = self.ring.submission();
        !sq.is_empty() || sq.cq_overflow()
    }

    /// Queues a `POLL_ADD` for slot `idx` under a new generation.
    fn arm(&mut self, idx: usize) -> io::Result<()> {
        let gen = self.next_gen;
        self.next_gen = gen.wrapping_add(1);
        let ud = (u64::from(gen) << 32) | idx as u64;
        let slot = &self.slots[idx];
        let e = opcode::PollAdd::new(types::Fd(slot.fd), slot.events)
            .build()
            .user_data(ud);
        self.push(&e)?;
        let slot = &mut self.slots[idx];
        slot.armed = Some(ud);
        slot.rearm = false;
        Ok(())
    }

    /// Queues the removal of the `POLL_ADD` with user_data `ud`.
    fn cancel(&mut self, ud: u64) -> io::Result<()> {
        let mut e = opcode::PollRemove::new(ud).build().user_data(IGNORED);
        if self.skip_success {
            e = e.flags(squeue::Flags::SKIP_SUCCESS);
        }
        self.push(&e)
    }

    /// Re-arms the registrations that fired since the last wait.
    fn rearm_fired(&mut self) -> io::Result<()> {
        let mut list = std::mem::take(&mut self.rearm);
        let mut res = Ok(());
        let mut done = 0;
        for &idx in &list {
            let want = match self.slots.get(idx) {
                Some(s) => s.rearm && s.armed.is_none() && s.events != 0,
                None => false,
            };
            if want {
                if let Err(e) = self.arm(idx) {
                    res = Err(e);
                    break;
                }
            } else if let Some(s) = self.slots.get_mut(idx) {
                s.rearm = false;
            }
            done += 1;
        }
        list.drain(..done);
        // On error the rest stays queued (plus any queued meanwhile).
        list.append(&mut self.rearm);
        self.rearm = list;
        res
    }

    /// Moves every completion into `out` (merging events of one key from
    /// `from` on if `merge`), flushing the kernel's overflow list.
    fn harvest(&mut self, out: &mut Vec<Ready>, from: usize, merge: bool) {
        loop {
            let State {
                ring, slots, rearm, ..
            } = self;
            for cqe in ring.completion() {
                let ud = cqe.user_data();
                if ud == IGNORED {
                    continue;
                }
                let idx = (ud & 0xffff_ffff) as usize;
                let Some(slot) = slots.get_mut(idx) else {
                    continue; // deleted
                };
                if slot.armed != Some(ud) {
                    continue; // a request since removed or replaced
                }
                slot.armed = None;
                let res = cqe.result();
                if res == -libc::ECANCELED {
                    // Cancelled by the kernel (not by us): arm again.
                    slot.rearm = true;
                    rearm.push(idx);
                    continue;
                }
                if res < 0 {
                    // The fd cannot be polled (closed under us?): report it
                    // once as an error; not re-armed until modified.
                    log::warn!(
                        "coroloop: io_uring fd monitor: polling fd {} failed: {}",
                        slot.fd,
                        describe(&errno(-res))
                    );
                    push_ready(
                        out,
                        from,
                        merge,
                        Ready {
                            key: slot.key,
                            readable: false,
                            writable: false,
                            error: true,
                        },
                    );
                    continue;
                }
                let m = res as u32;
                if let Some(n) = &slot.notifier {
                    // Consume the wake-up, so that the re-armed poll waits
                    // for the next write.
                    let mut buf = [0u8; 8];
                    let _ = rustix::io::read(n, &mut buf);
                }
                slot.rearm = true;
                rearm.push(idx);
                let r = Ready {
                    key: slot.key,
                    readable: m & (POLLIN | POLLRDHUP) != 0,
                    writable: m & POLLOUT != 0,
                    error: m & (POLLERR | POLLHUP) != 0,
                };
                if r.readable || r.writable || r.error {
                    push_ready(out, from, merge, r);
                }
            }
            if !ring.submission().cq_overflow() {
                break;
            }
            // Completions the full queue could not take wait in the kernel:
            // an enter with GETEVENTS (which `submit` sets) flushes them.
            if let Err(e) = ring.submit() {
                if e.raw_os_error() != Some(libc::EINTR) {
                    log::error!("coroloop: io_uring fd monitor: {}", enter_error(e));
                    break;
                }
            }
        }
    }

    /// Refuses what epoll refuses with `EPERM`: files without poll support
    /// (regular files, directories), which a poll request would report
    /// ready forever. Other fds are not checked (beyond being open).
    fn check_pollable(&mut self, fd: BorrowedFd<'_>) -> io::Result<()> {
        let st = rustix::fs::fstat(fd)?;
        let ft = rustix::fs::FileType::from_raw_mode(st.st_mode);
        if !matches!(
            ft,
            rustix::fs::FileType::RegularFile | rustix::fs::FileType::Directory
        ) {
            return Ok(());
        }
        // Some regular files do poll (procfs, sysfs, ...): ask epoll.
        let probe = match &self.probe {
            Some(p) => p,
            None => self.probe.insert(
                epoll::create(epoll::CreateFlags::CLOEXEC)
                    .map_err(|e| io::Error::new(e.kind(), format!("epoll_create1: {e}")))?,
            ),
        };
        epoll::add(
            probe,
            fd,
            epoll::EventData::new_u64(0),
            epoll::EventFlags::IN,
        )?;
        let _ = epoll::delete(probe, fd);
        Ok(())
    }

    fn insert(&mut self, slot: Slot) -> io::Result<usize> {
        if self.slots.vacant_key() >= u32::MAX as usize {
            return Err(errno(libc::ENOSPC));
        }
        let idx = self.slots.insert(slot);
        if self.slots[idx].events != 0 {
            if let Err(e) = self.arm(idx) {
                self.slots.remove(idx);
                return Err(e);
            }
        }
        Ok(idx)
    }
}

impl FdMonitor for UringMonitor {
    fn add(&self, fd: BorrowedFd<'_>, key: u64, read: bool, write: bool) -> io::Result<()> {
        let mut st = self.lock();
        let raw = fd.as_raw_fd();
        if st.by_fd.contains_key(&raw) {
            return Err(errno(libc::EEXIST));
        }
        st.check_pollable(fd)?;
        let idx = st.insert(Slot {
            fd: raw,
            notifier: None,
            key,
            events: mask(read, write),
            armed: None,
            rearm: false,
        })?;
        st.by_fd.insert(raw, idx);
        Ok(())
    }

    fn add_notifier(&self, fd: BorrowedFd<'_>, key: u64) -> io::Result<()> {
        // Our own duplicate: polled and read for as long as the monitor
        // lives, whatever happens to the caller's fd.
        let own = fd.try_clone_to_owned()?;
        let mut st = self.lock();
        st.insert(Slot {
            fd: own.as_raw_fd(),
            notifier: Some(own),
            key,
            events: POLLIN,
            armed: None,
            rearm: false,
        })?;
        Ok(())
    }

    fn modify(&self, fd: BorrowedFd<'_>, key: u64, read: bool, write: bool) -> io::Result<()> {
        let mut st = self.lock();
        let idx = *st
            .by_fd
            .get(&fd.as_raw_fd())
            .ok_or_else(|| errno(libc::ENOENT))?;
        let events = mask(read, write);
        let slot = &mut st.slots[idx];
        slot.key = key;
        if events == slot.events && (slot.armed.is_some() || slot.rearm) {
            return Ok(()); // the request in flight (or its re-arm) will do
        }
        slot.events = events;
        slot.rearm = false;
        if let Some(ud) = slot.armed.take() {
            st.cancel(ud)?;
        }
        if events != 0 {
            st.arm(idx)?;
        }
        Ok(())
    }

    fn delete(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        let mut st = self.lock();
        let idx = st
            .by_fd
            .remove(&fd.as_raw_fd())
            .ok_or_else(|| errno(libc::ENOENT))?;
        let slot = st.slots.remove(idx);
        if let Some(ud) = slot.armed {
            // Now, not at the next wait: until the kernel drops the request
            // it holds a reference to the file, and closing the fd would
            // not close it (a peer would not see the hang-up).
            st.cancel(ud)?;
            st.submit()?;
        }
        Ok(())
    }

    fn wait(&self, timeout: Option<Duration>, out: &mut Vec<Ready>) -> io::Result<()> {
        let mut st = self.lock();
        let from = out.len();
        let merge = !st.backlog.is_empty();
        let mut backlog = std::mem::take(&mut st.backlog);
        for r in backlog.drain(..) {
            push_ready(out, from, true, r);
        }
        st.backlog = backlog;
        st.rearm_fired()?;
        let mut timeout = if out.len() > from {
            Some(Duration::ZERO)
        } else {
            timeout
        };
        // A wake-up may bring only completions that are ignored (removals,
        // stale generations): then the wait goes on until the deadline.
        let deadline = timeout.and_then(|d| Instant::now().checked_add(d));
        loop {
            let mut interrupted = false;
            let r = match timeout {
                Some(d) if d.is_zero() => {
                    if st.has_queued() {
                        st.submit()?;
                    }
                    Ok(0)
                }
                Some(d) => {
                    let ts = types::Timespec::from(d);
                    let args = types::SubmitArgs::new().timespec(&ts);
                    st.ring.submitter().submit_with_args(1, &args)
                }
                None => st.ring.submitter().submit_and_wait(1),
            };
            match r {
                Ok(_) => {}
                Err(e) => match e.raw_os_error() {
                    Some(libc::ETIME) => {}
                    // A signal: return, a spurious wake-up.
                    Some(libc::EINTR) => interrupted = true,
                    // Completions overflow: the harvest below flushes them.
                    Some(libc::EBUSY) => {}
                    _ => return Err(enter_error(e)),
                },
            }
            st.harvest(out, from, merge);
            if out.len() > from || interrupted {
                return Ok(());
            }
            match (timeout, deadline) {
                (Some(d), _) if d.is_zero() => return Ok(()),
                (Some(_), Some(dl)) => {
                    let now = Instant::now();
                    if now >= dl {
                        return Ok(());
                    }
                    timeout = Some(dl - now);
                }
                // Forever (or beyond what an Instant can hold): again.
                _ => {}
            }
            // Anything queued by the harvest (re-arms of cancelled
            // requests) goes with the next wait.
            st.rearm_fired()?;
        }
    }

    fn as_fd_dyn(&self) -> BorrowedFd<'_> {
        // SAFETY: `ring_fd` is the ring's fd, owned by `state.ring`, which
        // lives as long as `self`.
        unsafe { BorrowedFd::borrow_raw(self.ring_fd) }
    }

    fn prepare_wait(&self) {
        let mut st = self.lock();
        let mut r = st.rearm_fired();
        if r.is_ok() && !st.backlog.is_empty() {
            // Events harvested early must wake the outer loop: a no-op's
            // completion makes the ring fd readable.
            let e = opcode::Nop::new().build().user_data(IGNORED);
            r = st.push(&e);
        }
        if r.is_ok() && st.has_queued() {
            r = st.submit();
        }
        if let Err(e) = r {
            log::error!("coroloop: io_uring fd monitor: {e}");
        }
    }

    fn shutdown(&self) {
        let mut st = self.lock();
        st.by_fd.clear();
        let gone: Vec<usize> = st
            .slots
            .iter()
            .filter(|(_, s)| s.notifier.is_none())
            .map(|(i, _)| i)
            .collect();
        let mut r = Ok(());
        for idx in gone {
            let slot = st.slots.remove(idx);
            if let Some(ud) = slot.armed {
                if r.is_ok() {
                    r = st.cancel(ud);
                }
            }
        }
        if r.is_ok() {
            r = st.submit();
        }
        if let Err(e) = r {
            log::error!("coroloop: io_uring fd monitor: shutdown: {e}");
        }
    }

    fn kind(&self) -> FdMonitorKind {
        FdMonitorKind::IoUring
    }
}

impl AsFd for UringMonitor {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.as_fd_dyn()
    }
}
