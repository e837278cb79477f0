//! The Linux native AIO engine (QEMU's `block/linux-aio.c`,
//! `aio_setup_linux_aio`, `aio=native`): `io_setup` / `io_submit` /
//! `io_getevents` with completions signalled on an eventfd.
//!
//! Meant for `O_DIRECT` files: on a buffered file the kernel performs the
//! request inside `io_submit`, blocking the loop. Requests pushed during
//! one loop iteration go out in one `io_submit` when it ends, unless the
//! last submission went to the device (then at once, as for io_uring);
//! beyond the context's event budget they wait in a backlog.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use super::request::{self, Cancel, Requests};
use crate::coroutine::RemoteCoroutine;

/// Events per AIO context: `io_setup` reserves twice this much against
/// `fs.aio-max-nr` (65,536 by default), so keep it small (QEMU: 1,024).
const MAX_EVENTS: usize = 256;

const IOCB_CMD_PREAD: u16 = 0;
const IOCB_CMD_PWRITE: u16 = 1;
const IOCB_CMD_FSYNC: u16 = 2;
const IOCB_CMD_FDSYNC: u16 = 3;
const IOCB_CMD_PREADV: u16 = 7;
const IOCB_CMD_PWRITEV: u16 = 8;
const IOCB_FLAG_RESFD: u32 = 1;

/// `struct iocb` of `<linux/aio_abi.h>` (little-endian layout).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Iocb {
    aio_data: u64,
    aio_key: u32,
    aio_rw_flags: i32,
    aio_lio_opcode: u16,
    aio_reqprio: i16,
    aio_fildes: u32,
    aio_buf: u64,
    aio_nbytes: u64,
    aio_offset: i64,
    aio_reserved2: u64,
    aio_flags: u32,
    aio_resfd: u32,
}

/// `struct io_event`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct IoEvent {
    data: u64,
    obj: u64,
    res: i64,
    res2: i64,
}

/// The head of the completion ring the kernel maps at the context id
/// (`struct aio_ring` of `fs/aio.c`), read to see whether events wait
/// without a system call.
#[repr(C)]
struct AioRing {
    id: u32,
    nr: u32,
    head: u32,
    tail: u32,
    magic: u32,
    compat_features: u32,
    incompat_features: u32,
    header_length: u32,
}
const AIO_RING_MAGIC: u32 = 0xa10a_10a1;

/// A context's Linux AIO state (QEMU's `LinuxAioState`): coroutine file
/// I/O on `io_submit`, for `O_DIRECT` files. Get it with
/// [`AioContext::linux_aio`](crate::aio::AioContext::linux_aio); it is
/// bound to the context's home thread.
///
/// # Cancellation
///
/// A coroutine unwound while its request is in flight tries `io_cancel`
/// and then blocks its thread in `io_getevents` until the kernel returned
/// the request, so its buffer is never written after the call unwound.
#[doc(alias = "LinuxAioState")]
pub struct LinuxAio {
    ctx_id: u64,
    efd: OwnedFd,
    reqs: RefCell<Requests>,
    /// Control blocks by request slot: `io_cancel` finds a request by the
    /// address it was submitted with, so each lives in its own box.
    iocbs: RefCell<Vec<Option<Box<Iocb>>>>,
    /// Boxes of finished requests, reused (their addresses must be
    /// stable, hence boxed even in a `Vec`).
    #[allow(clippy::vec_box)]
    spare: RefCell<Vec<Box<Iocb>>>,
    /// Slots pushed and not yet submitted (the plug), then the backlog.
    pending: RefCell<VecDeque<usize>>,
    in_flight: Cell<usize>,
    events: RefCell<Vec<IoEvent>>,
    waiters: RefCell<Vec<RemoteCoroutine>>,
    dead: Cell<bool>,
    /// The thread's teardown cancelled and reaped everything: nothing may
    /// be submitted any more (see `Engines::teardown`).
    torn_down: Cell<bool>,
    /// The last `io_submit` left requests with the device (`O_DIRECT`):
    /// submit at once instead of plugging (see `IoUring`).
    device_bound: Cell<bool>,
}

impl std::fmt::Debug for LinuxAio {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinuxAio")
            .field("in_flight", &self.in_flight.get())
            .field("queued", &self.pending.borrow().len())
            .finish()
    }
}

fn cvt(r: libc::c_long) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

impl LinuxAio {
    pub(crate) fn new() -> io::Result<LinuxAio> {
        if let Some(v) = std::env::var_os("COROLOOP_DISABLE_LINUX_AIO") {
            if v != "0" {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "Linux AIO unavailable: disabled by COROLOOP_DISABLE_LINUX_AIO",
                ));
            }
        }
        // SAFETY: plain syscall, no pointers.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(e.kind(), format!("Linux AIO: eventfd: {e}")));
        }
        // SAFETY: `efd` is a new descriptor we own.
        let efd = unsafe { OwnedFd::from_raw_fd(efd) };
        let mut ctx_id: u64 = 0;
        // SAFETY: io_setup writes the new context id to `ctx_id`.
        let r =
            unsafe { libc::syscall(libc::SYS_io_setup, MAX_EVENTS as libc::c_long, &mut ctx_id) };
        if let Err(e) = cvt(r) {
            let hint = match e.raw_os_error() {
                Some(libc::ENOSYS) => " (kernel without CONFIG_AIO, or a seccomp filter)",
                Some(libc::EAGAIN) => " (fs.aio-max-nr reached)",
                Some(libc::EPERM) => " (forbidden by a seccomp filter)",
                _ => "",
            };
            return Err(io::Error::new(
                e.kind(),
                format!("Linux AIO unavailable: io_setup: {e}{hint}"),
            ));
        }
        Ok(LinuxAio {
            ctx_id,
            efd,
            reqs: RefCell::new(Requests::default()),
            iocbs: RefCell::new(Vec::new()),
            spare: RefCell::new(Vec::new()),
            pending: RefCell::new(VecDeque::new()),
            in_flight: Cell::new(0),
            events: RefCell::new(vec![IoEvent::default(); MAX_EVENTS]),
            waiters: RefCell::new(Vec::new()),
            dead: Cell::new(false),
            torn_down: Cell::new(false),
            device_bound: Cell::new(false),
        })
    }

    pub(crate) fn eventfd(&self) -> BorrowedFd<'_> {
        self.efd.as_fd()
    }

    pub(crate) fn set_dead(&self) {
        self.dead.set(true);
    }

    /// Reads into `buf` at `offset` (`IOCB_CMD_PREAD`); returns the bytes
    /// read, 0 at end of file. With `O_DIRECT`, buffer address, length and
    /// offset must be aligned to the device's logical block size, else the
    /// result is `EINVAL`.
    ///
    /// # Panics
    ///
    /// Outside a coroutine.
    #[doc(alias = "laio_co_submit")]
    #[track_caller]
    pub fn read_at(&self, fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let w = request::waiter("LinuxAio::read_at");
        self.run(
            w,
            fd,
            IOCB_CMD_PREAD,
            buf.as_mut_ptr() as u64,
            buf.len() as u64,
            offset,
        )
    }

    /// Writes `buf` at `offset` (`IOCB_CMD_PWRITE`).
    ///
    /// # Panics
    ///
    /// Outside a coroutine.
    #[doc(alias = "laio_co_submit")]
    #[track_caller]
    pub fn write_at(&self, fd: BorrowedFd<'_>, buf: &[u8], offset: u64) -> io::Result<usize> {
        let w = request::waiter("LinuxAio::write_at");
        self.run(
            w,
            fd,
            IOCB_CMD_PWRITE,
            buf.as_ptr() as u64,
            buf.len() as u64,
            offset,
        )
    }

    /// Vectored read (`IOCB_CMD_PREADV`).
    ///
    /// # Panics
    ///
    /// Outside a coroutine.
    #[doc(alias = "laio_co_submit")]
    #[track_caller]
    pub fn readv_at(
        &self,
        fd: BorrowedFd<'_>,
        bufs: &mut [IoSliceMut<'_>],
        offset: u64,
    ) -> io::Result<usize> {
        let w = request::waiter("LinuxAio::readv_at");
        let p = bufs.as_mut_ptr() as u64;
        self.run(w, fd, IOCB_CMD_PREADV, p, bufs.len() as u64, offset)
    }

    /// Vectored write (`IOCB_CMD_PWRITEV`).
    ///
    /// # Panics
    ///
    /// Outside a coroutine.
    #[doc(alias = "laio_co_submit")]
    #[track_caller]
    pub fn writev_at(
        &self,
        fd: BorrowedFd<'_>,
        bufs: &[IoSlice<'_>],
        offset: u64,
    ) -> io::Result<usize> {
        let w = request::waiter("LinuxAio::writev_at");
        let p = bufs.as_ptr() as u64;
        self.run(w, fd, IOCB_CMD_PWRITEV, p, bufs.len() as u64, offset)
    }

    /// `fsync` through the AIO context (`IOCB_CMD_FSYNC`, Linux 4.18+).
    ///
    /// # Panics
    ///
    /// Outside a coroutine.
    #[doc(alias = "laio_co_submit")]
    #[track_caller]
    pub fn fsync(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        let w = request::waiter("LinuxAio::fsync");
        self.run(w, fd, IOCB_CMD_FSYNC, 0, 0, 0).map(|_| ())
    }

    /// `fdatasync` through the AIO context (`IOCB_CMD_FDSYNC`).
    ///
    /// # Panics
    ///
    /// Outside a coroutine.
    #[doc(alias = "laio_co_submit")]
    #[track_caller]
    pub fn fdatasync(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        let w = request::waiter("LinuxAio::fdatasync");
        self.run(w, fd, IOCB_CMD_FDSYNC, 0, 0, 0).map(|_| ())
    }

    /// Requests submitted to the kernel and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.in_flight.get()
    }

    /// Requests waiting to be submitted.
    pub fn queued(&self) -> usize {
        self.pending.borrow().len()
    }

    fn run(
        &self,
        waiter: RemoteCoroutine,
        fd: BorrowedFd<'_>,
        op: u16,
        buf: u64,
        nbytes: u64,
        offset: u64,
    ) -> io::Result<usize> {
        if self.dead.get() {
            return Err(io::Error::other(
                "LinuxAio: the AioContext is shut down; no request can complete",
            ));
        }
        if offset > i64::MAX as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("LinuxAio: offset {offset} out of range"),
            ));
        }
        let idx = self.reqs.borrow_mut().insert(waiter);
        let mut cb = self.spare.borrow_mut().pop().unwrap_or_default();
        *cb = Iocb {
            aio_data: idx as u64,
            aio_lio_opcode: op,
            aio_fildes: fd.as_raw_fd() as u32,
            aio_buf: buf,
            aio_nbytes: nbytes,
            aio_offset: offset as i64,
            aio_flags: IOCB_FLAG_RESFD,
            aio_resfd: self.efd.as_raw_fd() as u32,
            ..Iocb::default()
        };
        {
            let mut iocbs = self.iocbs.borrow_mut();
            if iocbs.len() <= idx {
                iocbs.resize_with(idx + 1, || None);
            }
            iocbs[idx] = Some(cb);
        }
        self.pending.borrow_mut().push_back(idx);
        if self.device_bound.get() {
            self.flush();
        }
        request::to_result(request::wait(self, idx))
    }

    /// Frees the control block of a finished request.
    fn release(&self, idx: usize) {
        if let Some(cb) = self.iocbs.borrow_mut().get_mut(idx).and_then(Option::take) {
            self.spare.borrow_mut().push(cb);
        }
    }

    pub(crate) fn has_pending(&self) -> bool {
        !self.pending.borrow().is_empty() && self.in_flight.get() < MAX_EVENTS
    }

    /// Submits the pending requests, up to the event budget, in one
    /// `io_submit` (or a few, if the kernel takes part of them).
    pub(crate) fn flush(&self) {
        if self.torn_down.get() {
            // Engine assertion: after the thread's teardown nothing reaches
            // the kernel (see `IoUring::flush`).
            assert!(
                self.pending.borrow().is_empty(),
                "coroloop: LinuxAio: a request was queued after thread teardown"
            );
            return;
        }
        let mut ptrs: Vec<*mut Iocb> = Vec::new();
        loop {
            let room = MAX_EVENTS - self.in_flight.get();
            ptrs.clear();
            {
                let pending = self.pending.borrow();
                let mut iocbs = self.iocbs.borrow_mut();
                let reqs = self.reqs.borrow();
                for &idx in pending.iter().take(room) {
                    reqs.assert_owner_alive(idx, "LinuxAio");
                    if let Some(cb) = iocbs.get_mut(idx).and_then(Option::as_mut) {
                        ptrs.push(&mut **cb);
                    }
                }
            }
            if ptrs.is_empty() {
                return;
            }
            let before = self.ring_len();
            // SAFETY: every pointer is a live boxed iocb whose buffers are
            // borrowed by the coroutine waiting for it (see `request::wait`).
            let r = unsafe {
                libc::syscall(
                    libc::SYS_io_submit,
                    self.ctx_id,
                    ptrs.len() as libc::c_long,
                    ptrs.as_mut_ptr(),
                )
            };
            match cvt(r) {
                Ok(n) => {
                    self.pending.borrow_mut().drain(..n);
                    self.in_flight.set(self.in_flight.get() + n);
                    // Buffered requests complete inside io_submit.
                    self.device_bound
                        .set(self.ring_len().saturating_sub(before) < n);
                    if n < ptrs.len() {
                        return; // the kernel is out of room: retry later
                    }
                }
                Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EINTR)) => {
                    return;
                }
                Err(e) => {
                    // The first iocb is invalid (bad fd, bad opcode): fail
                    // it alone and go on with the rest.
                    let idx = self.pending.borrow_mut().pop_front();
                    if let Some(idx) = idx {
                        let errno = e.raw_os_error().unwrap_or(libc::EIO);
                        if let Some(w) = self.reqs.borrow_mut().complete(idx, -(errno as i64)) {
                            self.waiters.borrow_mut().push(w);
                        }
                        self.release(idx);
                    }
                }
            }
        }
    }

    /// Events waiting in the completion ring (a memory read, no syscall);
    /// `usize::MAX` if the ring's layout is not the one we know.
    fn ring_len(&self) -> usize {
        let ring = self.ctx_id as *const AioRing;
        // SAFETY: the kernel maps `struct aio_ring` at the context id for
        // the context's lifetime; its fields are read with volatile loads
        // as the kernel updates them concurrently.
        unsafe {
            if std::ptr::read_volatile(&(*ring).magic) != AIO_RING_MAGIC {
                return usize::MAX;
            }
            let nr = std::ptr::read_volatile(&(*ring).nr).max(1);
            let head = std::ptr::read_volatile(&(*ring).head) % nr;
            let tail = std::ptr::read_volatile(&(*ring).tail) % nr;
            ((tail + nr - head) % nr) as usize
        }
    }

    /// Whether completions wait in the ring (no syscall).
    pub(crate) fn has_completions(&self) -> bool {
        self.in_flight.get() > 0 && self.ring_len() > 0
    }

    /// No request anywhere: not pending, in the kernel, nor waiting to be
    /// taken by its coroutine.
    pub(crate) fn is_idle(&self) -> bool {
        self.in_flight.get() == 0
            && self.pending.borrow().is_empty()
            && self.reqs.borrow().is_empty()
            && self.waiters.borrow().is_empty()
    }

    pub(crate) fn has_work(&self) -> bool {
        self.has_pending() || self.has_completions() || !self.waiters.borrow().is_empty()
    }

    /// `io_getevents` into `self.events`; returns how many.
    fn getevents(&self, min: usize, block: bool) -> usize {
        let mut events = self.events.borrow_mut();
        let zero = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        let ts: *const libc::timespec = if block { std::ptr::null() } else { &zero };
        loop {
            // SAFETY: `events` has room for MAX_EVENTS entries.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_io_getevents,
                    self.ctx_id,
                    min as libc::c_long,
                    MAX_EVENTS as libc::c_long,
                    events.as_mut_ptr(),
                    ts,
                )
            };
            match cvt(r) {
                Ok(n) => return n,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {
                    if !block {
                        return 0;
                    }
                }
                Err(e) => {
                    log::error!("coroloop: LinuxAio: io_getevents failed: {e}");
                    if block {
                        // Requests whose buffers may still be written:
                        // going on would be unsound.
                        std::process::abort();
                    }
                    return 0;
                }
            }
        }
    }

    /// Takes the first `n` events of `self.events` off `in_flight`: their
    /// results go to their slots (the waiters to `out`), their control
    /// blocks are freed. The event of `skip` (a request being cancelled) is
    /// only noted: returns whether it was among them.
    fn record(&self, n: usize, skip: Option<usize>, out: &mut Vec<RemoteCoroutine>) -> bool {
        self.in_flight.set(self.in_flight.get() - n);
        let events = self.events.borrow();
        let mut reqs = self.reqs.borrow_mut();
        let mut seen = false;
        for ev in &events[..n] {
            let i = ev.data as usize;
            if Some(i) == skip {
                seen = true;
            } else {
                out.extend(reqs.complete(i, ev.res));
                self.release(i);
            }
        }
        seen
    }

    /// Reaps completions and wakes their coroutines; returns progress.
    pub(crate) fn process(&self) -> bool {
        let mut progress = false;
        if self.has_completions() {
            let n = self.getevents(0, false);
            progress = n > 0;
            self.record(n, None, &mut self.waiters.borrow_mut());
        }
        if self.has_pending() {
            self.flush();
        }
        let mut waiters = std::mem::take(&mut *self.waiters.borrow_mut());
        progress |= !waiters.is_empty();
        request::wake_all(&mut waiters);
        // Keep the allocation, unless a waiter was queued meanwhile (a
        // submission that failed while the coroutines ran).
        let mut w = self.waiters.borrow_mut();
        if w.is_empty() {
            *w = waiters;
        }
        progress
    }
}

impl LinuxAio {
    /// The thread is exiting (or its IoThread stopped): fails the requests
    /// never submitted, cancels those in the kernel and blocks until every
    /// one is reaped (results stay in their slots, no coroutine is woken),
    /// then never submits again. Idempotent.
    pub(crate) fn teardown(&self) {
        self.dead.set(true);
        if self.torn_down.replace(true) {
            return;
        }
        let never_sent = std::mem::take(&mut *self.pending.borrow_mut());
        for idx in never_sent {
            self.reqs
                .borrow_mut()
                .complete(idx, -(libc::ECANCELED as i64));
            self.release(idx);
        }
        // What is left in `iocbs` was submitted and not yet reaped.
        let submitted: Vec<*mut Iocb> = self
            .iocbs
            .borrow_mut()
            .iter_mut()
            .filter_map(|cb| cb.as_mut().map(|cb| &mut **cb as *mut Iocb))
            .collect();
        for cb in submitted {
            let mut ev = IoEvent::default();
            // SAFETY: `cb` is the address a request in flight was submitted
            // with; the kernel writes at most one event to `ev`. A request
            // the kernel cannot cancel (most file I/O) is reaped below.
            let r = unsafe { libc::syscall(libc::SYS_io_cancel, self.ctx_id, cb, &mut ev) };
            if r == 0 {
                self.in_flight.set(self.in_flight.get() - 1);
                let idx = ev.data as usize;
                self.reqs.borrow_mut().complete(idx, ev.res);
                self.release(idx);
            }
        }
        let mut ignored = Vec::new();
        while self.in_flight.get() > 0 {
            let n = self.getevents(1, true);
            self.record(n, None, &mut ignored);
            ignored.clear();
        }
    }
}

impl Cancel for LinuxAio {
    fn take(&self, idx: usize) -> Option<i64> {
        self.reqs.borrow_mut().take(idx)
    }

    fn cancel_and_reap(&self, idx: usize) {
        let queued = {
            let mut pending = self.pending.borrow_mut();
            match pending.iter().position(|&i| i == idx) {
                Some(i) => {
                    pending.remove(i);
                    true
                }
                None => false,
            }
        };
        if queued || self.reqs.borrow().is_done(idx) {
            self.reqs.borrow_mut().remove(idx);
            self.release(idx);
            return;
        }
        let cb: *mut Iocb = match self
            .iocbs
            .borrow_mut()
            .get_mut(idx)
            .and_then(Option::as_mut)
        {
            Some(cb) => &mut **cb,
            None => return,
        };
        let mut ev = IoEvent::default();
        // SAFETY: `cb` is the address the request was submitted with; the
        // kernel writes at most one event to `ev`. Most file requests
        // cannot be cancelled (EINVAL/EAGAIN): then we wait below.
        let r = unsafe { libc::syscall(libc::SYS_io_cancel, self.ctx_id, cb, &mut ev) };
        let mut stashed = Vec::new();
        if r == 0 {
            // Cancelled: the event came back here, not through the ring.
            self.in_flight.set(self.in_flight.get() - 1);
        } else {
            let mut mine = false;
            while !mine {
                let n = self.getevents(1, true);
                mine = self.record(n, Some(idx), &mut stashed);
            }
        }
        self.reqs.borrow_mut().remove(idx);
        self.release(idx);
        for w in stashed {
            w.wake();
        }
    }
}

impl Drop for LinuxAio {
    fn drop(&mut self) {
        // Every request is reaped by its waiting coroutine before that can
        // go away; should any remain, wait for them before the buffers
        // could be reused.
        while self.in_flight.get() > 0 {
            let n = self.getevents(1, true);
            self.in_flight.set(self.in_flight.get() - n);
        }
        // SAFETY: the context is ours and has nothing in flight.
        unsafe { libc::syscall(libc::SYS_io_destroy, self.ctx_id) };
    }
}
