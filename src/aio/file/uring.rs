//! The io_uring engine (QEMU's `block/io_uring.c`, `aio_setup_linux_io_uring`).
//!
//! One ring per context, created on first use. A coroutine queues an SQE
//! tagged with its request slot and suspends; requests queued during one
//! loop iteration go to the kernel in one `io_uring_enter` when the
//! iteration ends (QEMU's plug/unplug) — unless the last submission went
//! to the device (did not complete inside the call, e.g. `O_DIRECT`): then
//! each is submitted at once, so the device queue stays staggered instead
//! of completing and refilling in lockstep. Entries wait in a backlog of
//! our own and enter the shared submission queue only right before
//! `io_uring_enter` (or later, when the SQ is full or the completion queue
//! budget is used up), so a request never submitted can always be
//! withdrawn: when its coroutine is unwound, and at thread teardown. The
//! ring fd sits in the context's fd monitor, so a sleeping
//! loop wakes on completions; an awake loop reaps them from the mapped
//! completion queue without a system call (also during busy polling).

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};

use io_uring::{opcode, squeue, types};

use super::request::{self, Cancel, Requests};
use crate::coroutine::RemoteCoroutine;

/// SQ entries (QEMU uses 128); the CQ is twice as large.
const ENTRIES: u32 = 128;
/// user_data of our cancel requests, whose completions are ignored.
const CANCEL_TAG: u64 = u64::MAX;
/// user_data of the cancel-everything request of a teardown, whose result
/// says whether the kernel knows it (5.19+).
const CANCEL_ANY_TAG: u64 = u64::MAX - 1;

/// A context's io_uring (QEMU's `LuringState`): coroutine file I/O that
/// suspends until the kernel completes it. Get it with
/// [`AioContext::linux_io_uring`](crate::aio::AioContext::linux_io_uring);
/// it is bound to the context's home thread (`!Send`, `!Sync`).
///
/// Completions are reaped when the context polls, so use it from
/// coroutines of that context (or of another context polled on the same
/// thread while the first one is polled too).
///
/// # Cancellation
///
/// A coroutine unwound while its request is in flight (its owner dropped
/// it, its context was shut down) cancels the request
/// (`IORING_OP_ASYNC_CANCEL`) and blocks its thread until the kernel
/// reaped it, so the buffer it lent the kernel is never written after the
/// call returned or unwound.
#[doc(alias = "LuringState")]
pub struct IoUring {
    ring: RefCell<io_uring::IoUring>,
    reqs: RefCell<Requests>,
    /// Entries not yet in the SQ: pushed since the last flush, or waiting
    /// for room in the SQ or the CQ budget. They enter the SQ only in
    /// `flush`, right before `io_uring_enter`, so an entry that was never
    /// submitted can always be withdrawn (a cancelled request, thread
    /// teardown) instead of sitting in the shared ring where the next
    /// system call would submit it.
    backlog: RefCell<VecDeque<squeue::Entry>>,
    /// SQEs in the SQ but not yet submitted (only after a submission the
    /// kernel refused for now: `EAGAIN`/`EBUSY`).
    queued: Cell<usize>,
    /// Entries submitted and not yet reaped (cancels included).
    in_flight: Cell<usize>,
    cq_cap: usize,
    /// Reused buffer of the coroutines to wake after a reap.
    waiters: RefCell<Vec<RemoteCoroutine>>,
    dead: Cell<bool>,
    /// The thread's teardown cancelled and reaped everything: nothing may
    /// be submitted any more (see `Engines::teardown`).
    torn_down: Cell<bool>,
    /// The last submission went to the device (not all of it completed
    /// inside `io_uring_enter`): submit at once instead of plugging.
    device_bound: Cell<bool>,
}

impl std::fmt::Debug for IoUring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoUring")
            .field("in_flight", &self.in_flight.get())
            .field("queued", &(self.queued.get() + self.backlog.borrow().len()))
            .finish()
    }
}

impl IoUring {
    /// Sets up a ring; the error says io_uring is unavailable and why.
    pub(crate) fn new() -> io::Result<IoUring> {
        if let Some(v) = std::env::var_os("COROLOOP_DISABLE_IO_URING") {
            if v != "0" {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "io_uring unavailable: disabled by COROLOOP_DISABLE_IO_URING",
                ));
            }
        }
        // Cooperative task running (5.19+) spares the interrupts that would
        // otherwise post each completion; older kernels take the plain ring.
        let ring = io_uring::IoUring::builder()
            .setup_coop_taskrun()
            .setup_cqsize(ENTRIES * 2)
            .build(ENTRIES)
            .or_else(|_| {
                io_uring::IoUring::builder()
                    .setup_cqsize(ENTRIES * 2)
                    .build(ENTRIES)
            })
            .map_err(|e| {
                let hint = match e.raw_os_error() {
                    Some(libc::ENOSYS) => " (kernel without io_uring)",
                    Some(libc::EPERM) => {
                        " (disabled by kernel.io_uring_disabled or a seccomp filter)"
                    }
                    Some(libc::ENOMEM) => " (locked-memory limit too low)",
                    _ => "",
                };
                io::Error::new(
                    e.kind(),
                    format!("io_uring unavailable: io_uring_setup: {e}{hint}"),
                )
            })?;
        let cq_cap = ring.params().cq_entries() as usize;
        Ok(IoUring {
            ring: RefCell::new(ring),
            reqs: RefCell::new(Requests::default()),
            backlog: RefCell::new(VecDeque::new()),
            queued: Cell::new(0),
            in_flight: Cell::new(0),
            cq_cap,
            waiters: RefCell::new(Vec::new()),
            dead: Cell::new(false),
            torn_down: Cell::new(false),
            device_bound: Cell::new(false),
        })
    }

    pub(crate) fn ring_fd(&self) -> RawFd {
        self.ring.borrow().as_raw_fd()
    }

    /// After the context shut down, new requests fail at once (nothing
    /// would reap them).
    pub(crate) fn set_dead(&self) {
        self.dead.set(true);
    }

    /// Reads into `buf` at `offset` (QEMU's `luring_co_submit` with
    /// `QEMU_AIO_READ`); returns the bytes read, 0 at end of file.
    ///
    /// # Panics
    ///
    /// Outside a coroutine.
    #[doc(alias = "luring_co_submit")]
    #[track_caller]
    pub fn read_at(&self, fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let w = request::waiter("IoUring::read_at");
        let len = buf.len().min(u32::MAX as usize) as u32;
        let e = opcode::Read::new(types::Fd(fd.as_raw_fd()), buf.as_mut_ptr(), len)
            .offset(offset)
            .build();
        self.run(e, w)
    }

    /// Writes `buf` at `offset`; returns the bytes written.
    ///
    /// # Panics
    ///
    /// Outside a coroutine.
    #[doc(alias = "luring_co_submit")]
    #[track_caller]
    pub fn write_at(&self, fd: BorrowedFd<'_>, buf: &[u8], offset: u64) -> io::Result<usize> {
        let w = request::waiter("IoUring::write_at");
        let len = buf.len().min(u32::MAX as usize) as u32;
        let e = opcode::Write::new(types::Fd(fd.as_raw_fd()), buf.as_ptr(), len)
            .offset(offset)
            .build();
        self.run(e, w)
    }

    /// Vectored read at `offset` (`IORING_OP_READV`).
    ///
    /// # Panics
    ///
    /// Outside a coroutine.
    #[doc(alias = "luring_co_submit")]
    #[track_caller]
    pub fn readv_at(
        &self,
        fd: BorrowedFd<'_>,
        bufs: &mut [IoSliceMut<'_>],
        offset: u64,
    ) -> io::Result<usize> {
        let w = request::waiter("IoUring::readv_at");
        let n = iov_count(bufs.len(), "IoUring::readv_at")?;
        // IoSliceMut is ABI-compatible with `struct iovec` on Unix.
        let e = opcode::Readv::new(
            types::Fd(fd.as_raw_fd()),
            bufs.as_mut_ptr().cast::<libc::iovec>(),
            n,
        )
        .offset(offset)
        .build();
        self.run(e, w)
    }

    /// Vectored write at `offset` (`IORING_OP_WRITEV`).
    ///
    /// # Panics
    ///
    /// Outside a coroutine.
    #[doc(alias = "luring_co_submit")]
    #[track_caller]
    pub fn writev_at(
        &self,
        fd: BorrowedFd<'_>,
        bufs: &[IoSlice<'_>],
        offset: u64,
    ) -> io::Result<usize> {
        let w = request::waiter("IoUring::writev_at");
        let n = iov_count(bufs.len(), "IoUring::writev_at")?;
        let e = opcode::Writev::new(
            types::Fd(fd.as_raw_fd()),
            bufs.as_ptr().cast::<libc::iovec>(),
            n,
        )
        .offset(offset)
        .build();
        self.run(e, w)
    }

    /// Flushes data and metadata to stable storage (`fsync`). Requests
    /// submitted earlier by any coroutine that completed are covered;
    /// io_uring does not order it after requests still in flight.
    ///
    /// # Panics
    ///
    /// Outside a coroutine.
    #[doc(alias = "luring_co_submit")]
    #[track_caller]
    pub fn fsync(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        let w = request::waiter("IoUring::fsync");
        let e = opcode::Fsync::new(types::Fd(fd.as_raw_fd())).build();
        self.run(e, w).map(|_| ())
    }

    /// Flushes data (and the metadata needed to read it) to stable storage
    /// (`fdatasync`).
    ///
    /// # Panics
    ///
    /// Outside a coroutine.
    #[doc(alias = "luring_co_submit")]
    #[track_caller]
    pub fn fdatasync(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        let w = request::waiter("IoUring::fdatasync");
        let e = opcode::Fsync::new(types::Fd(fd.as_raw_fd()))
            .flags(types::FsyncFlags::DATASYNC)
            .build();
        self.run(e, w).map(|_| ())
    }

    /// Requests submitted to the kernel and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.in_flight.get()
    }

    /// Requests waiting for room in the ring.
    pub fn queued(&self) -> usize {
        self.queued.get() + self.backlog.borrow().len()
    }

    /// Submits `e` for the current coroutine and waits for its completion.
    fn run(&self, e: squeue::Entry, waiter: RemoteCoroutine) -> io::Result<usize> {
        if self.dead.get() {
            return Err(io::Error::other(
                "IoUring: the AioContext is shut down; no request can complete",
            ));
        }
        let idx = self.reqs.borrow_mut().insert(waiter);
        self.push(e.user_data(idx as u64));
        if self.device_bound.get() {
            // Requests that wait for the device gain nothing from a batch
            // and lose from it: a batch completes together and leaves the
            // device idle while the loop turns around (measured: O_DIRECT
            // at depth 16 ran 47k reads/s plugged, 57-63k unplugged).
            self.flush();
        }
        request::to_result(request::wait(self, idx))
    }

    fn push(&self, e: squeue::Entry) {
        self.backlog.borrow_mut().push_back(e);
    }

    /// Pushes into the SQ if there is room there and in the CQ budget.
    fn try_push(&self, e: &squeue::Entry) -> bool {
        if self.in_flight.get() + self.queued.get() >= self.cq_cap {
            return false;
        }
        let mut ring = self.ring.borrow_mut();
        // SAFETY: the buffers the entry points to are borrowed by the
        // coroutine that waits for it, which reaps or cancels it before
        // they are released (see `request::wait`).
        let pushed = unsafe { ring.submission().push(e).is_ok() };
        if pushed {
            self.queued.set(self.queued.get() + 1);
        }
        pushed
    }

    /// Hands the queued entries to the kernel (the end of a plugged
    /// section), refilling the SQ from the backlog.
    pub(crate) fn flush(&self) {
        if self.torn_down.get() {
            // Engine assertion: after the thread's teardown nothing reaches
            // the kernel (a request's buffer may be freed thread-local
            // memory by now). `run` refuses new requests, so nothing waits.
            assert!(
                self.backlog.borrow().is_empty() && self.queued.get() == 0,
                "coroloop: IoUring: a request was queued after thread teardown"
            );
            return;
        }
        loop {
            if self.queued.get() > 0 {
                let before = self.cq_len();
                let r = self.ring.borrow().submit();
                match r {
                    Ok(n) => {
                        self.queued.set(self.queued.get() - n);
                        self.in_flight.set(self.in_flight.get() + n);
                        // Page-cache hits complete inside the call: keep
                        // batching those (one system call for the lot).
                        self.device_bound
                            .set(self.cq_len().saturating_sub(before) < n);
                    }
                    Err(e) if is_retry(&e) => return,
                    Err(e) => {
                        log::error!("coroloop: IoUring: io_uring_enter failed: {e}");
                        return;
                    }
                }
            }
            let mut backlog = self.backlog.borrow_mut();
            let mut moved = false;
            while let Some(e) = backlog.front() {
                self.reqs
                    .borrow()
                    .assert_owner_alive(e.get_user_data() as usize, "IoUring");
                if !self.try_push(e) {
                    break;
                }
                backlog.pop_front();
                moved = true;
            }
            if !moved {
                return;
            }
        }
    }

    /// No request anywhere: not in the backlog, the SQ, the kernel, nor
    /// waiting to be taken by its coroutine.
    pub(crate) fn is_idle(&self) -> bool {
        self.in_flight.get() == 0
            && self.queued.get() == 0
            && self.backlog.borrow().is_empty()
            && self.reqs.borrow().is_empty()
            && self.waiters.borrow().is_empty()
    }

    /// Whether the loop must not sleep: entries to submit or completions
    /// to reap.
    pub(crate) fn has_work(&self) -> bool {
        self.queued.get() > 0
            || (!self.backlog.borrow().is_empty()
                && self.in_flight.get() + self.queued.get() < self.cq_cap)
            || self.has_completions()
    }

    fn cq_len(&self) -> usize {
        self.ring.borrow_mut().completion().len()
    }

    pub(crate) fn has_completions(&self) -> bool {
        self.in_flight.get() > 0 && !self.ring.borrow_mut().completion().is_empty()
    }

    /// Empties the CQ: every completion is counted off `in_flight`, and
    /// those of requests (not of our cancels) go to `f(slot, result)`.
    /// Returns how many there were.
    fn reap(&self, mut f: impl FnMut(usize, i64)) -> usize {
        let mut ring = self.ring.borrow_mut();
        let mut n = 0;
        for c in ring.completion() {
            n += 1;
            if c.user_data() != CANCEL_TAG {
                f(c.user_data() as usize, c.result() as i64);
            }
        }
        self.in_flight.set(self.in_flight.get().saturating_sub(n));
        n
    }

    /// Reaps completions and wakes their coroutines; returns progress.
    pub(crate) fn process(&self) -> bool {
        if self.in_flight.get() == 0 {
            return false;
        }
        let reaped = {
            let mut reqs = self.reqs.borrow_mut();
            let mut waiters = self.waiters.borrow_mut();
            self.reap(|idx, res| waiters.extend(reqs.complete(idx, res)))
        };
        if reaped == 0 {
            return false;
        }
        // Room was made: move the backlog in now, so its requests go out
        // with the submissions of the coroutines woken below.
        if !self.backlog.borrow().is_empty() {
            self.flush();
        }
        let mut waiters = std::mem::take(&mut *self.waiters.borrow_mut());
        request::wake_all(&mut waiters);
        // Keep the allocation, unless a waiter was queued meanwhile (a
        // submission that failed while the coroutines ran).
        let mut w = self.waiters.borrow_mut();
        if w.is_empty() {
            *w = waiters;
        }
        true
    }

    /// Removes entry `idx` from the backlog if it is still there.
    fn unqueue(&self, idx: usize) -> bool {
        let mut backlog = self.backlog.borrow_mut();
        match backlog.iter().position(|e| e.get_user_data() == idx as u64) {
            Some(i) => {
                backlog.remove(i);
                true
            }
            None => false,
        }
    }

    /// Submits what is queued and blocks for one completion at least (or
    /// none with `want == 0`); aborts if the kernel refuses, since the
    /// buffers of requests in flight could otherwise be written later.
    fn submit_blocking(&self, want: usize) {
        let r = self.ring.borrow().submit_and_wait(want);
        match r {
            Ok(n) => {
                self.queued.set(self.queued.get().saturating_sub(n));
                self.in_flight.set(self.in_flight.get() + n);
            }
            Err(e) if is_retry(&e) => {}
            Err(e) => {
                log::error!(
                    "coroloop: IoUring: io_uring_enter failed while reaping a request that \
                     must finish before its buffer is released ({e}); aborting"
                );
                std::process::abort();
            }
        }
    }

    /// Pushes a cancel entry (blocking until the SQ has room).
    fn push_cancel(&self, e: squeue::Entry) {
        loop {
            {
                let mut ring = self.ring.borrow_mut();
                // SAFETY: a cancel entry points to no memory.
                if unsafe { ring.submission().push(&e).is_ok() } {
                    self.queued.set(self.queued.get() + 1);
                    return;
                }
            }
            self.submit_blocking(0);
        }
    }

    /// Fails the requests never submitted and blocks until every request
    /// in the kernel is reaped; their results stay in their slots and no
    /// coroutine is woken. Entries already in the SQ (a submission the
    /// kernel refused with `EAGAIN`) cannot be withdrawn from the shared
    /// ring: they are submitted with the cancel and reaped too.
    fn drain_all(&self) {
        let never_sent = std::mem::take(&mut *self.backlog.borrow_mut());
        {
            let mut reqs = self.reqs.borrow_mut();
            for e in never_sent {
                reqs.complete(e.get_user_data() as usize, -(libc::ECANCELED as i64));
            }
        }
        if self.in_flight.get() + self.queued.get() == 0 {
            return;
        }
        let any = opcode::AsyncCancel2::new(types::CancelBuilder::any())
            .build()
            .user_data(CANCEL_ANY_TAG);
        self.push_cancel(any);
        let mut one_by_one = false;
        while self.in_flight.get() + self.queued.get() > 0 {
            self.submit_blocking(1);
            let mut reqs = self.reqs.borrow_mut();
            self.reap(|idx, res| {
                if idx as u64 == CANCEL_ANY_TAG {
                    // A kernel before 5.19 does not know "cancel any":
                    // cancel the requests one by one (a pipe or socket read
                    // would otherwise never end).
                    one_by_one = res == -(libc::EINVAL as i64);
                } else {
                    reqs.complete(idx, res);
                }
            });
            drop(reqs);
            if std::mem::take(&mut one_by_one) {
                let left = self.reqs.borrow().unfinished();
                for idx in left {
                    let c = opcode::AsyncCancel::new(idx as u64)
                        .build()
                        .user_data(CANCEL_TAG);
                    self.push_cancel(c);
                }
            }
        }
    }

    /// The thread is exiting (or its IoThread stopped): cancel and reap
    /// everything, then never submit again. Idempotent.
    pub(crate) fn teardown(&self) {
        self.dead.set(true);
        if self.torn_down.replace(true) {
            return;
        }
        self.drain_all();
        debug_assert_eq!(self.in_flight.get() + self.queued.get(), 0);
    }
}

impl Cancel for IoUring {
    fn take(&self, idx: usize) -> Option<i64> {
        self.reqs.borrow_mut().take(idx)
    }

    fn cancel_and_reap(&self, idx: usize) {
        if self.reqs.borrow().is_done(idx) || self.unqueue(idx) {
            self.reqs.borrow_mut().remove(idx);
            return;
        }
        // The entry is in the SQ or in the kernel: cancel it (the cancel
        // goes in after it) and wait until the kernel reaped it.
        let cancel = opcode::AsyncCancel::new(idx as u64)
            .build()
            .user_data(CANCEL_TAG);
        self.push_cancel(cancel);
        let mut stashed = Vec::new();
        let mut mine = false;
        while !mine {
            self.submit_blocking(1);
            let mut reqs = self.reqs.borrow_mut();
            self.reap(|i, res| {
                if i == idx {
                    mine = true;
                    reqs.remove(idx);
                } else {
                    stashed.extend(reqs.complete(i, res));
                }
            });
        }
        // Other coroutines' completions seen meanwhile: queue their wakes
        // through their resumer (never enter them from inside an unwind).
        for w in stashed {
            w.wake();
        }
    }
}

impl Drop for IoUring {
    fn drop(&mut self) {
        // Every request is owned by a waiting coroutine that reaps it
        // before it can go away, so nothing should be left; stay sound
        // regardless.
        if self.in_flight.get() > 0 || self.queued.get() > 0 {
            self.drain_all();
        }
    }
}

fn iov_count(n: usize, api: &str) -> io::Result<u32> {
    if n > 1024 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{api}: {n} buffers exceed IOV_MAX (1024)"),
        ));
    }
    Ok(n as u32)
}

fn is_retry(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY)
    )
}
