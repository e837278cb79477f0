//! Fd handlers: callbacks run when a file descriptor becomes readable or
//! writable, with optional busy-poll hooks (QEMU's `aio_set_fd_handler`).

use std::cell::RefCell;
use std::fmt;
use std::io;
use std::marker::PhantomData;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::sync::atomic::Ordering;

use slab::Slab;

use super::fdmon::Ready;
use super::AioContext;

/// A read or write callback.
pub type IoHandler = Box<dyn FnMut()>;
/// A busy-poll callback: returns `true` when there is work, so the loop
/// runs the read handler without a system call.
pub type IoPollHandler = Box<dyn FnMut() -> bool>;

pub(crate) struct Entry {
    fd: RawFd,
    gen: u64,
    is_external: bool,
    read: Option<IoHandler>,
    write: Option<IoHandler>,
    io_poll: Option<IoPollHandler>,
    poll_begin: Option<IoHandler>,
    poll_end: Option<IoHandler>,
    /// Whether the fd is in the monitor (with no interest while external
    /// handlers are disabled, or with neither callback): removal deletes it
    /// from the monitor then. Found while writing ARCHITECTURE.md: an
    /// external handler removed while disabled stayed in the monitor.
    registered: bool,
}

/// The handler table of one context; home thread only.
pub(crate) struct Handlers {
    table: RefCell<Slab<Entry>>,
    next_gen: std::cell::Cell<u64>,
    /// Handlers without an `io_poll`: while any exists, a non-blocking poll
    /// must ask the kernel.
    pub(crate) unpollable: std::cell::Cell<usize>,
    /// Whether external handlers are currently out of the monitor.
    external_off: std::cell::Cell<bool>,
}

fn key_of(idx: usize, gen: u64) -> u64 {
    ((gen & 0xffff_ffff) << 32) | idx as u64
}

fn split_key(key: u64) -> (usize, u64) {
    ((key & 0xffff_ffff) as usize, key >> 32)
}

impl Handlers {
    pub(crate) fn new() -> Handlers {
        Handlers {
            table: RefCell::new(Slab::new()),
            next_gen: std::cell::Cell::new(1),
            unpollable: std::cell::Cell::new(0),
            external_off: std::cell::Cell::new(false),
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.table.borrow().is_empty()
    }

    pub(crate) fn len(&self) -> usize {
        self.table.borrow().len()
    }

    /// Applies the context's external-disable count to the monitor.
    pub(crate) fn sync_external(&self, ctx: &AioContext) {
        if ctx.inner.is_dead() {
            // Mid-shutdown the table may hold entries whose fds are already
            // closed (their handlers were dropped after `dead` was set):
            // nothing may touch the monitor by their numbers.
            return;
        }
        let off = ctx.inner.external_disable.load(Ordering::Acquire) > 0;
        if off == self.external_off.get() {
            return;
        }
        self.external_off.set(off);
        let mut table = self.table.borrow_mut();
        for (idx, e) in table.iter_mut() {
            if !e.is_external {
                continue;
            }
            // SAFETY: the entry's `FdHandler` keeps `e.fd` open while the
            // entry exists (`AioContext::register`'s contract: it owns the
            // fd for a safe registration, the caller of
            // `set_fd_handler_raw` promised it for a raw one).
            let fd = unsafe { BorrowedFd::borrow_raw(e.fd) };
            let (r, w) = if off {
                (false, false)
            } else {
                (e.read.is_some(), e.write.is_some())
            };
            // The fd stays in the monitor with no interest while disabled:
            // `registered` does not change, so removing the handler then
            // still deletes it from the monitor.
            let _ = ctx.inner.monitor.modify(fd, key_of(idx, e.gen), r, w);
        }
    }

    /// Calls the busy-poll hook of every pollable handler once; returns the
    /// keys of those with work.
    pub(crate) fn poll_once(&self, ctx: &AioContext, out: &mut Vec<Ready>) -> bool {
        let external_off = ctx.inner.external_disable.load(Ordering::Relaxed) > 0;
        let keys: Vec<(usize, u64)> = self
            .table
            .borrow()
            .iter()
            .filter(|(_, e)| e.io_poll.is_some() && !(external_off && e.is_external))
            .map(|(i, e)| (i, e.gen))
            .collect();
        let mut any = false;
        for (idx, gen) in keys {
            let Some(mut f) = self.take(idx, gen, |e| e.io_poll.take()) else {
                continue;
            };
            let ready = f();
            self.put_back(idx, gen, |e| e.io_poll = Some(f));
            if ready {
                any = true;
                out.push(Ready {
                    key: key_of(idx, gen),
                    readable: true,
                    writable: false,
                    error: false,
                });
            }
        }
        any
    }

    /// Calls every poll_begin (`true`) or poll_end (`false`) hook.
    pub(crate) fn poll_started(&self, started: bool) {
        let keys: Vec<(usize, u64)> = self
            .table
            .borrow()
            .iter()
            .filter(|(_, e)| {
                if started {
                    e.poll_begin.is_some()
                } else {
                    e.poll_end.is_some()
                }
            })
            .map(|(i, e)| (i, e.gen))
            .collect();
        for (idx, gen) in keys {
            let taken = self.take(idx, gen, |e| {
                if started {
                    e.poll_begin.take()
                } else {
                    e.poll_end.take()
                }
            });
            if let Some(mut f) = taken {
                f();
                self.put_back(idx, gen, |e| {
                    if started {
                        e.poll_begin = Some(f)
                    } else {
                        e.poll_end = Some(f)
                    }
                });
            }
        }
    }

    fn take<T>(&self, idx: usize, gen: u64, f: impl FnOnce(&mut Entry) -> Option<T>) -> Option<T> {
        let mut t = self.table.borrow_mut();
        match t.get_mut(idx) {
            Some(e) if e.gen == gen => f(e),
            _ => None,
        }
    }

    fn put_back(&self, idx: usize, gen: u64, f: impl FnOnce(&mut Entry)) {
        let mut t = self.table.borrow_mut();
        if let Some(e) = t.get_mut(idx) {
            if e.gen == gen {
                f(e);
            }
        }
        // Otherwise the handler was removed while its callback ran: the
        // callback is dropped here, after it returned.
    }

    /// Runs the handlers of the ready events; returns whether any ran.
    pub(crate) fn dispatch(&self, ctx: &AioContext, ready: &[Ready]) -> bool {
        let external_off = ctx.inner.external_disable.load(Ordering::Relaxed) > 0;
        let mut progress = false;
        for r in ready {
            let (idx, gen32) = split_key(r.key);
            let (gen, is_external) = match self.table.borrow().get(idx) {
                Some(e) if e.gen & 0xffff_ffff == gen32 => (e.gen, e.is_external),
                _ => continue,
            };
            if external_off && is_external {
                continue;
            }
            if r.readable || r.error {
                progress |= self.call(idx, gen, Which::Read);
            }
            if r.writable || r.error {
                progress |= self.call(idx, gen, Which::Write);
            }
        }
        progress
    }

    /// Calls one callback with it taken out of the table, so the callback
    /// may add or remove handlers; puts it back afterwards (also if it
    /// panics) unless its handler was removed meanwhile.
    fn call(&self, idx: usize, gen: u64, which: Which) -> bool {
        let Some(f) = self.take(idx, gen, |e| which.slot(e).take()) else {
            return false;
        };
        let mut restore = Restore {
            handlers: self,
            idx,
            gen,
            which,
            f: Some(f),
        };
        if let Some(f) = restore.f.as_mut() {
            f();
        }
        true
    }

    /// Shutdown: empties the table, dropping each callback separately so
    /// that one panicking destructor (caught by `panics`) leaves none of
    /// the others behind. Nothing is added afterwards: `set_fd_handler`
    /// refuses a dead context.
    pub(crate) fn clear(&self, panics: &mut super::Panics) {
        let entries: Vec<Entry> = self.table.borrow_mut().drain().collect();
        self.unpollable.set(0);
        for mut e in entries {
            for f in [
                e.read.take(),
                e.write.take(),
                e.poll_begin.take(),
                e.poll_end.take(),
            ] {
                panics.catch(|| drop(f));
            }
            let io_poll = e.io_poll.take();
            panics.catch(|| drop(io_poll));
        }
    }
}

#[derive(Clone, Copy)]
enum Which {
    Read,
    Write,
}

impl Which {
    fn slot(self, e: &mut Entry) -> &mut Option<IoHandler> {
        match self {
            Which::Read => &mut e.read,
            Which::Write => &mut e.write,
        }
    }
}

struct Restore<'a> {
    handlers: &'a Handlers,
    idx: usize,
    gen: u64,
    which: Which,
    f: Option<IoHandler>,
}

impl Drop for Restore<'_> {
    fn drop(&mut self) {
        if let Some(f) = self.f.take() {
            let which = self.which;
            self.handlers
                .put_back(self.idx, self.gen, |e| *which.slot(e) = Some(f));
        }
    }
}

/// A registered fd handler (QEMU's `AioHandler`): owns the fd, so it cannot
/// be closed while the loop watches it. Dropping the handle (or
/// [`remove`](FdHandler::remove)) unregisters it first. `T` is the value
/// given to [`AioContext::set_fd_handler`] (an `AsFd` it owns), or a
/// [`RawFdSource`] (only the number) for
/// [`set_fd_handler_raw`](AioContext::set_fd_handler_raw). `!Send`: it
/// belongs to the context's home thread (the fd it gives back may travel):
///
/// ```compile_fail,E0277
/// use coroloop::aio::AioContext;
///
/// let ctx = AioContext::new().unwrap();
/// let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
/// let h = ctx.set_fd_handler(a, false, Some(Box::new(|| ())), None, None).unwrap();
/// std::thread::spawn(move || drop(h));
/// ```
pub struct FdHandler<T> {
    /// What was registered; `None` once removed.
    fd: Option<T>,
    /// The number watched, kept open by `fd` (or by the raw contract) until
    /// unregistered.
    raw: RawFd,
    idx: usize,
    gen: u64,
    ctx: AioContext,
    _not_send: PhantomData<*const ()>,
}

impl<T> FdHandler<T> {
    /// The watched fd (for a raw registration, the [`RawFdSource`]: only
    /// its number).
    pub fn get_ref(&self) -> &T {
        self.fd.as_ref().expect("present until removed")
    }

    /// Unregisters the handler and gives the fd back (for a raw
    /// registration, the [`RawFdSource`]: only its number, which the
    /// caller may close from now on).
    pub fn remove(mut self) -> T {
        self.unregister();
        self.fd.take().expect("present until removed")
    }

    /// Sets the hooks called when the context starts and stops busy
    /// polling (QEMU's `aio_set_fd_poll`), e.g. to disable a device's
    /// notifications while it is polled.
    #[doc(alias = "aio_set_fd_poll")]
    pub fn set_poll(&self, begin: Option<IoHandler>, end: Option<IoHandler>) {
        if self.ctx.inner.is_dead() {
            return; // shut down: the hooks are dropped here
        }
        let h = &self.ctx.inner.local().handlers;
        let mut t = h.table.borrow_mut();
        if let Some(e) = t.get_mut(self.idx) {
            if e.gen == self.gen {
                e.poll_begin = begin;
                e.poll_end = end;
            }
        }
    }

    fn unregister(&mut self) {
        if self.ctx.inner.is_dead() {
            return;
        }
        let h = &self.ctx.inner.local().handlers;
        let entry = {
            let mut t = h.table.borrow_mut();
            match t.get(self.idx) {
                Some(e) if e.gen == self.gen => Some(t.remove(self.idx)),
                _ => None,
            }
        };
        if let Some(e) = entry {
            if e.io_poll.is_none() {
                h.unpollable.set(h.unpollable.get() - 1);
            }
            if e.registered {
                // SAFETY: `self.raw` is still open: `self.fd` (or, for a raw
                // registration, the caller of `set_fd_handler_raw`) keeps it
                // open until the handler is removed, which is now; it may be
                // closed only after this.
                let fd = unsafe { BorrowedFd::borrow_raw(self.raw) };
                let _ = self.ctx.inner.monitor.delete(fd);
            }
            // Wake the loop so it stops waiting on a removed fd.
            self.ctx.inner.notify();
            drop(e);
        }
    }
}

impl<T> Drop for FdHandler<T> {
    fn drop(&mut self) {
        if self.fd.is_some() {
            self.unregister();
        }
    }
}

impl<T> fmt::Debug for FdHandler<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FdHandler").field("fd", &self.raw).finish()
    }
}

/// The fd number registered by [`AioContext::set_fd_handler_raw`], given
/// back by [`FdHandler::remove`] (and [`FdHandler::get_ref`]).
///
/// It is only a number: it implements [`AsRawFd`] but not [`AsFd`], and is
/// neither `Copy` nor `Clone`. I/O safety: the raw registration's contract
/// keeps the fd open only while the handler exists, and a `RawFdSource`
/// outlives the handler. A [`BorrowedFd`] made from it after `remove` could
/// name a file that was closed meanwhile and whose number went to another
/// file, so safe code could read or write that other file (or watch it).
/// Turning the number back into a `BorrowedFd` takes `unsafe`
/// ([`BorrowedFd::borrow_raw`]) and the caller's own knowledge that the fd
/// is open.
///
/// ```
/// use coroloop::aio::AioContext;
/// use std::os::fd::AsRawFd;
///
/// let ctx = AioContext::new()?;
/// let (a, _b) = std::os::unix::net::UnixStream::pair()?;
/// // SAFETY: `a` stays open until after the handler is removed.
/// let h = unsafe {
///     ctx.set_fd_handler_raw(a.as_raw_fd(), false, Some(Box::new(|| ())), None, None)?
/// };
/// let src = h.remove();
/// assert_eq!(src.as_raw_fd(), a.as_raw_fd());
/// drop(a); // from here on the number may name any file
/// # std::io::Result::Ok(())
/// ```
///
/// No `BorrowedFd` from it:
///
/// ```compile_fail,E0599
/// use coroloop::aio::AioContext;
/// use std::os::fd::{AsFd, AsRawFd};
///
/// let ctx = AioContext::new().unwrap();
/// let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
/// // SAFETY: `a` stays open until after the handler is removed.
/// let h = unsafe {
///     ctx.set_fd_handler_raw(a.as_raw_fd(), false, Some(Box::new(|| ())), None, None)
/// }
/// .unwrap();
/// let src = h.remove();
/// drop(a);
/// // Would reach whatever file has the number now.
/// let _dup = src.as_fd().try_clone_to_owned();
/// ```
///
/// nor through an `AsFd` bound:
///
/// ```compile_fail,E0277
/// use coroloop::aio::AioContext;
/// use std::os::fd::AsRawFd;
///
/// let ctx = AioContext::new().unwrap();
/// let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
/// // SAFETY: `a` stays open until after the handler is removed.
/// let h = unsafe {
///     ctx.set_fd_handler_raw(a.as_raw_fd(), false, Some(Box::new(|| ())), None, None)
/// }
/// .unwrap();
/// let src = h.remove();
/// drop(a);
/// // A safe registration takes an `AsFd` it owns, not a bare number.
/// let _h2 = ctx.set_fd_handler(src, false, Some(Box::new(|| ())), None, None);
/// ```
///
/// and it is not `Copy`:
///
/// ```compile_fail,E0382
/// use coroloop::aio::AioContext;
/// use std::os::fd::AsRawFd;
///
/// let ctx = AioContext::new().unwrap();
/// let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
/// // SAFETY: `a` stays open until after the handler is removed.
/// let h = unsafe {
///     ctx.set_fd_handler_raw(a.as_raw_fd(), false, Some(Box::new(|| ())), None, None)
/// }
/// .unwrap();
/// let src = h.remove();
/// let moved = src;
/// let _ = (moved.raw_fd(), src.raw_fd());
/// ```
///
/// nor `Clone`:
///
/// ```compile_fail,E0599
/// use coroloop::aio::AioContext;
/// use std::os::fd::AsRawFd;
///
/// let ctx = AioContext::new().unwrap();
/// let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
/// // SAFETY: `a` stays open until after the handler is removed.
/// let h = unsafe {
///     ctx.set_fd_handler_raw(a.as_raw_fd(), false, Some(Box::new(|| ())), None, None)
/// }
/// .unwrap();
/// let _copy = h.get_ref().clone();
/// ```
#[derive(Debug)]
pub struct RawFdSource(RawFd);

impl RawFdSource {
    /// The fd number (as [`AsRawFd::as_raw_fd`]).
    pub fn raw_fd(&self) -> RawFd {
        self.0
    }
}

impl AsRawFd for RawFdSource {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

impl AioContext {
    /// Watches `fd` (QEMU's `aio_set_fd_handler`): `read` runs when it is
    /// readable (or hung up, or in error), `write` when writable, on the
    /// home thread during `poll`. `io_poll`, if given, is called while the
    /// context busy-polls (see [`set_poll_params`](Self::set_poll_params));
    /// when it returns `true` the loop calls `read` without a system call.
    /// External handlers are skipped while [`disable_external`] is in
    /// effect.
    ///
    /// The handler owns `fd`; dropping it (or [`FdHandler::remove`])
    /// unregisters before the fd can be closed.
    ///
    /// # Errors
    ///
    /// The monitor's error (e.g. `EPERM` for a regular file, which epoll
    /// cannot watch), with the fd named.
    ///
    /// # Panics
    ///
    /// Panics if called off the home thread, or if no callback is given.
    ///
    /// [`disable_external`]: Self::disable_external
    #[doc(alias = "aio_set_fd_handler")]
    #[track_caller]
    pub fn set_fd_handler<T: AsFd + 'static>(
        &self,
        fd: T,
        is_external: bool,
        read: Option<IoHandler>,
        write: Option<IoHandler>,
        io_poll: Option<IoPollHandler>,
    ) -> io::Result<FdHandler<T>> {
        let raw = fd.as_fd().as_raw_fd();
        // SAFETY: `raw` is `fd`'s, and `fd` moves into the handler, which
        // drops it only after unregistering (`'static`: no borrow inside it
        // can end first, even if the handler is leaked).
        unsafe {
            self.register(
                fd,
                raw,
                "AioContext::set_fd_handler",
                is_external,
                read,
                write,
                io_poll,
            )
        }
    }

    /// As [`set_fd_handler`](Self::set_fd_handler) for a raw fd the caller
    /// keeps ownership of. The handler holds only the number, as a
    /// [`RawFdSource`]: [`FdHandler::remove`] gives back that number, never
    /// a [`BorrowedFd`] (the fd may be closed once the handler is gone).
    ///
    /// # Safety
    ///
    /// `fd` must be an open file descriptor and stay open (not closed, not
    /// reused) until the returned handler is dropped or removed: the
    /// kernel's epoll set would otherwise watch whatever file the number
    /// refers to next.
    ///
    /// # Errors
    ///
    /// As `set_fd_handler` (the messages name `set_fd_handler_raw`).
    ///
    /// # Panics
    ///
    /// As `set_fd_handler`.
    #[track_caller]
    pub unsafe fn set_fd_handler_raw(
        &self,
        fd: RawFd,
        is_external: bool,
        read: Option<IoHandler>,
        write: Option<IoHandler>,
        io_poll: Option<IoPollHandler>,
    ) -> io::Result<FdHandler<RawFdSource>> {
        // SAFETY: our caller promised that `fd` stays open until the
        // handler is dropped or removed, which is `register`'s contract.
        unsafe {
            self.register(
                RawFdSource(fd),
                fd,
                "AioContext::set_fd_handler_raw",
                is_external,
                read,
                write,
                io_poll,
            )
        }
    }

    /// Registers `fd` under the number `raw` (both public registrations):
    /// the handler keeps `fd` until it is removed; `api` names the public
    /// call in panics and errors.
    ///
    /// # Safety
    ///
    /// `raw` must be an open fd that stays open (not closed, not reused)
    /// until the returned handler is removed or dropped, e.g. because `fd`
    /// owns it.
    #[track_caller]
    #[allow(clippy::too_many_arguments)]
    unsafe fn register<T>(
        &self,
        fd: T,
        raw: RawFd,
        api: &'static str,
        is_external: bool,
        read: Option<IoHandler>,
        write: Option<IoHandler>,
        io_poll: Option<IoPollHandler>,
    ) -> io::Result<FdHandler<T>> {
        self.inner.assert_home(api);
        assert!(
            read.is_some() || write.is_some() || io_poll.is_some(),
            "{api}: no callback given (drop the FdHandler to remove one)"
        );
        if self.inner.is_dead() {
            return Err(io::Error::other(format!(
                "{api}: cannot watch fd {raw}: the context is shut down"
            )));
        }
        // SAFETY: `raw` is open and stays open until the handler is
        // removed (this function's contract).
        let bfd = unsafe { BorrowedFd::borrow_raw(raw) };
        let h = &self.inner.local().handlers;
        let gen = h.next_gen.get();
        h.next_gen.set(gen.wrapping_add(1) & 0xffff_ffff);
        let (want_r, want_w) = (read.is_some(), write.is_some());
        let pollable = io_poll.is_some();
        let idx = h.table.borrow_mut().insert(Entry {
            fd: raw,
            gen,
            is_external,
            read,
            write,
            io_poll,
            poll_begin: None,
            poll_end: None,
            registered: false,
        });
        let off = is_external && h.external_off.get();
        if !off && (want_r || want_w) {
            if let Err(e) = self
                .inner
                .monitor
                .add(bfd, key_of(idx, gen), want_r, want_w)
            {
                h.table.borrow_mut().remove(idx);
                return Err(io::Error::new(
                    e.kind(),
                    format!("{api}: cannot watch fd {raw}: {e}"),
                ));
            }
            h.table.borrow_mut()[idx].registered = true;
        } else if is_external {
            // Registered (with no interest) so that enabling can modify it.
            if self
                .inner
                .monitor
                .add(bfd, key_of(idx, gen), false, false)
                .is_ok()
            {
                h.table.borrow_mut()[idx].registered = true;
            }
        }
        if !pollable {
            h.unpollable.set(h.unpollable.get() + 1);
        }
        self.inner.notify();
        Ok(FdHandler {
            fd: Some(fd),
            raw,
            idx,
            gen,
            ctx: self.clone(),
            _not_send: PhantomData,
        })
    }

    /// Watches an [`EventNotifier`](super::EventNotifier) (QEMU's
    /// `aio_set_event_notifier`): `read` runs when it is set. Share the
    /// notifier with the callback through the `Arc`.
    ///
    /// # Errors
    ///
    /// As `set_fd_handler`.
    #[doc(alias = "aio_set_event_notifier")]
    #[doc(alias = "aio_set_event_notifier_poll")]
    #[track_caller]
    pub fn set_event_notifier(
        &self,
        notifier: std::sync::Arc<super::EventNotifier>,
        is_external: bool,
        read: IoHandler,
        io_poll: Option<IoPollHandler>,
    ) -> io::Result<FdHandler<std::sync::Arc<super::EventNotifier>>> {
        self.inner.assert_home("AioContext::set_event_notifier");
        self.set_fd_handler(notifier, is_external, Some(read), None, io_poll)
    }
}
