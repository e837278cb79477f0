//! Waking, scheduling and owning coroutines through their resumer: the
//! cross-thread half of ARCHITECTURE.md's "Resumers". Only the resumer
//! trait is known here; what needs a context (`sleep`, `reschedule_self`,
//! `aio_context`) lives next to the context, in `aio/co.rs`.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Wake, Waker};

use super::header::Header;
use super::resumer::{CoReqKind, Resumer};
use super::{current, suspend, Coroutine, Erased, RemoteRef};

fn resumer_of(h: &Header) -> Option<Arc<dyn Resumer>> {
    // SAFETY: home-thread field (callers are on the home thread); cloned
    // out so no borrow outlives this call.
    unsafe { (*h.resumer.get()).clone() }
}

/// A `Send + Sync` handle to wake or schedule a coroutine from any thread
/// (QEMU's `aio_co_wake` / `aio_co_schedule` from another thread). It does
/// not own the coroutine: once the coroutine finishes (or is unwound) its
/// remote handles do nothing.
///
/// The coroutine is entered by its *resumer* — the AioContext that was
/// current on its thread when it was created — on its home thread, never
/// on the caller's.
///
/// # Examples
///
/// ```
/// use coroloop::{coroutine, AioContext, Coroutine};
///
/// let ctx = AioContext::new()?;
/// let co = Coroutine::new(|| {
///     coroutine::suspend();
///     std::thread::current().id()
/// });
/// co.enter();
/// let remote = co.remote();
/// std::thread::spawn(move || remote.wake()).join().unwrap();
/// assert!(ctx.poll(true));
/// assert_eq!(co.take_result(), Some(std::thread::current().id()));
/// # std::io::Result::Ok(())
/// ```
#[derive(Clone)]
pub struct RemoteCoroutine {
    r: RemoteRef,
    resumer: Option<Arc<dyn Resumer>>,
}

impl RemoteCoroutine {
    /// Queues the coroutine on its resumer to be entered on its home
    /// thread. Repeated wakes before it runs queue it once; waking a
    /// finished coroutine does nothing. A coroutine without a resumer (no
    /// AioContext on its thread) only records the wake, with a log line.
    #[doc(alias = "aio_co_wake")]
    pub fn wake(&self) {
        if !self.r.is_current() {
            return;
        }
        if !self.r.header().woken.claim() {
            return; // a request is already queued
        }
        match &self.resumer {
            Some(res) => res.queue(self.r.clone(), CoReqKind::Wake),
            None => no_resumer_logged(),
        }
    }

    /// Schedules the coroutine on its resumer (QEMU's `aio_co_schedule`).
    ///
    /// # Panics
    ///
    /// If it is already scheduled and has not run since (QEMU: "Co-routine
    /// was already scheduled"), or if it has no resumer.
    #[doc(alias = "aio_co_schedule")]
    #[track_caller]
    pub fn schedule(&self) {
        let Some(res) = &self.resumer else {
            panic!("RemoteCoroutine::schedule: the coroutine has no AioContext to run it");
        };
        if !self.r.is_current() {
            return;
        }
        if !self.r.header().scheduled.claim() {
            panic!("RemoteCoroutine::schedule: coroutine was already scheduled");
        }
        res.queue(self.r.clone(), CoReqKind::Schedule);
    }

    /// A handle, if the coroutine is still current.
    ///
    /// # Safety
    ///
    /// Must be called on the coroutine's home thread.
    pub(crate) unsafe fn upgrade_home(&self) -> Option<Coroutine<Erased>> {
        // SAFETY: forwarded from the caller.
        unsafe { self.r.upgrade() }
    }

    /// Whether this handle is for `co` (same header, same generation).
    pub(crate) fn is_for<T>(&self, co: &Coroutine<T>) -> bool {
        self.r.header_addr() == co.header_addr() && self.r.is_current()
    }

    /// Whether something drives the coroutine (an AioContext or a
    /// `CoroutineFuture`).
    pub(crate) fn has_resumer(&self) -> bool {
        self.resumer.is_some()
    }

    /// Whether the coroutine finished (or was unwound).
    pub fn is_finished(&self) -> bool {
        !self.r.is_current()
    }

    /// Its resumer, if any (the loop's `aio_context` looks at it).
    pub(crate) fn resumer(&self) -> Option<&Arc<dyn Resumer>> {
        self.resumer.as_ref()
    }
}

impl fmt::Debug for RemoteCoroutine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteCoroutine")
            .field("finished", &self.is_finished())
            .field("has_resumer", &self.resumer.is_some())
            .finish()
    }
}

#[cold]
fn no_resumer_logged() {
    static LOGGED: AtomicBool = AtomicBool::new(false);
    if !LOGGED.swap(true, Ordering::Relaxed) {
        log::warn!(
            "coroloop: a coroutine without an AioContext was woken from a waker or remote \
             handle; only its woken bit is set (enter it by hand, or create it where an \
             AioContext runs)"
        );
    }
}

/// A home-thread wake of a coroutine whose resumer may refuse direct
/// entry: if it does, queue the coroutine there instead. Returns whether
/// the wake was queued (the caller must not enter it).
pub(crate) fn queue_if_refused(h: &Header) -> bool {
    let Some(r) = resumer_of(h) else {
        return false;
    };
    if r.admits_direct_entry() {
        return false;
    }
    if h.woken.claim() {
        r.queue(RemoteRef::new(h), CoReqKind::Wake);
    }
    true
}

/// What came of a request taken from a resumer's queue.
pub(crate) enum Request {
    /// The coroutine was entered.
    Entered,
    /// Finished, unwound or recycled since: dropped.
    Stale,
    /// Running further up this thread's call chain (a nested loop): the
    /// caller must queue the request again.
    Busy(RemoteRef, CoReqKind),
}

/// Enters the coroutine a queued request names, clearing its flag.
///
/// # Safety
///
/// Must be called on the coroutine's home thread.
pub(crate) unsafe fn enter_request(r: RemoteRef, kind: CoReqKind) -> Request {
    // SAFETY: forwarded from the caller.
    let Some(co) = (unsafe { r.upgrade() }) else {
        return Request::Stale;
    };
    if co.is_finished() {
        return Request::Stale;
    }
    if co.is_entered() {
        return Request::Busy(r, kind);
    }
    let h = r.header();
    let flag = match kind {
        CoReqKind::Schedule => &h.scheduled,
        CoReqKind::Wake => &h.woken,
    };
    // Clear with an RMW (see `WakeFlag`): a waker that found it set relies
    // on this entry.
    flag.release();
    co.enter();
    Request::Entered
}

struct CoWaker(RemoteCoroutine);

impl Wake for CoWaker {
    fn wake(self: Arc<Self>) {
        self.0.wake();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.wake();
    }
}

impl<T> Coroutine<T> {
    /// Makes `r` the resumer of this fresh coroutine (and of those created
    /// inside it); `ask`: home-thread wakes ask `r` before entering.
    pub(crate) fn set_resumer(&self, r: Arc<dyn Resumer>, ask: bool) {
        let h = self.header();
        // It leaves the old resumer's list for the new one's.
        h.links.unlink();
        if h.state.get() == super::State::Fresh {
            // Only joining a closed list (creation inside a coroutine of a
            // resumer that has ended) marks a fresh coroutine: the new
            // resumer decides again.
            h.cancelling.set(false);
        }
        if h.state.get() != super::State::Finished {
            if let Some(list) = r.coroutines() {
                list.link(h);
            }
        }
        // SAFETY: home-thread field (handles are !Send); no reference into
        // it is live.
        unsafe { *h.resumer.get() = Some(r) };
        h.ask_resumer.set(ask);
    }

    /// A handle to wake or schedule this coroutine from any thread.
    pub fn remote(&self) -> RemoteCoroutine {
        let h = self.header();
        let mut r = RemoteRef::new(h);
        if h.state.get() == super::State::Finished {
            // Made after the end: stale from the start.
            r.make_stale();
        }
        RemoteCoroutine {
            r,
            resumer: resumer_of(h),
        }
    }

    /// A `std::task::Waker` that wakes this coroutine through its resumer
    /// ([`RemoteCoroutine::wake`]). Waking never enters the coroutine in
    /// the waker's caller.
    pub fn waker(&self) -> Waker {
        Waker::from(Arc::new(CoWaker(self.remote())))
    }

    /// Its resumer, if any (the loop's `aio_context` looks at it).
    pub(crate) fn resumer(&self) -> Option<Arc<dyn Resumer>> {
        resumer_of(self.header())
    }

    /// Gives the coroutine to its home context: it runs until it finishes,
    /// as a QEMU coroutine does, without any handle keeping it; shutting
    /// the context down (or [`IoThread::stop`](crate::IoThread::stop))
    /// unwinds it if it is still suspended. Dropping the last handle of a
    /// suspended coroutine does the same implicitly; `detach` also hands
    /// over a coroutine that has not started yet, which then starts at the
    /// context's next pass (or the `CoroutineFuture`'s next poll).
    ///
    /// # Panics
    ///
    /// If the coroutine has no AioContext (none existed on its thread when
    /// it was created).
    #[track_caller]
    pub fn detach(self) {
        let h = self.header();
        if h.state.get() == super::State::Finished {
            return;
        }
        // SAFETY: home-thread field; the clone ends the borrow before calling.
        let Some(r) = (unsafe { (*h.resumer.get()).clone() }) else {
            panic!("Coroutine::detach: the coroutine has no AioContext to own it");
        };
        // Its resumer (context or `CoroutineFuture`) owns it, and is the
        // one told when it finishes; a resumer that has ended refuses, and
        // the coroutine is cancelled.
        h.detached.set(true);
        let fresh = h.state.get() == super::State::Fresh;
        let remote = RemoteRef::new(h);
        if let Err(co) = r.adopt(self.erase()) {
            co.header().detached.set(false);
            co.cancel();
            return;
        }
        // One that has not started yet starts at its resumer's next pass:
        // nothing else could ever enter it (found by the API fuzzer: a
        // `CoroutineFuture` waited forever for a detached fresh coroutine
        // it had taken over to finish).
        // As a wake: a `wake()` before it ran adds nothing (the pattern
        // "detach, then wake to start it" enters it once).
        if fresh && remote.header().woken.claim() {
            r.queue(remote, CoReqKind::Wake);
        }
    }
}

/// Reschedules the current coroutine on its resumer and suspends: other
/// ready work of the context runs first.
///
/// # Panics
///
/// Outside a coroutine, or in one without an AioContext.
#[track_caller]
pub fn yield_now() {
    let p = current::current_ptr();
    if p.is_null() {
        panic!("coroutine::yield_now() called outside a coroutine");
    }
    // SAFETY: the running coroutine's header is alive.
    let h = unsafe { &*p };
    // SAFETY: home-thread field, read on the home thread (the coroutine
    // runs here). Borrowed, not cloned (two atomic read-modify-writes
    // saved per yield): only `set_resumer` and `depart` replace it, and
    // neither runs inside a resumer's `queue`.
    let Some(res) = (unsafe { (*h.resumer.get()).as_ref() }) else {
        panic!("coroutine::yield_now(): the coroutine has no AioContext to reschedule it");
    };
    if h.scheduled.claim() {
        res.queue(RemoteRef::new(h), CoReqKind::Schedule);
    }
    suspend();
}

/// Wakes a coroutine through its resumer when dropped (a wait's callback
/// dropped unrun by its context's shutdown).
pub(crate) struct WakeOnDrop(pub(crate) RemoteCoroutine);

impl Drop for WakeOnDrop {
    fn drop(&mut self) {
        self.0.wake();
    }
}

/// Moving a suspended coroutine to another resumer (`reschedule_self`),
/// first half, on its old home thread: it takes `to` as its resumer, leaves
/// the old resumer's list and its `scheduled` flag is claimed for the move.
/// Returns whether it is detached (its owner must move too).
///
/// # Safety
///
/// On the coroutine's home thread, with the coroutine suspended, and no
/// handle of it used anywhere until [`arrive`] has run.
pub(crate) unsafe fn depart(r: &RemoteRef, to: Arc<dyn Resumer>) -> bool {
    let h = r.header();
    // SAFETY: home-thread field, on the home thread, with the coroutine
    // suspended; the caller guarantees no handle uses it.
    unsafe { *h.resumer.get() = Some(to) };
    h.links.unlink();
    let _ = h.scheduled.claim();
    h.detached.get()
}

/// Second half, on the new home thread: the coroutine joins its new
/// resumer's list and is queued there.
///
/// # Safety
///
/// On the new home thread, after [`depart`], with no handle of the
/// coroutine used meanwhile.
pub(crate) unsafe fn arrive(r: RemoteRef) {
    // SAFETY: `depart` set it; home-thread field, now on the new home
    // thread, and nothing else uses the coroutine.
    let Some(res) = (unsafe { (*r.header().resumer.get()).clone() }) else {
        unreachable!("depart() sets the resumer");
    };
    if let Some(list) = res.coroutines() {
        list.link(r.header());
    }
    res.queue(r, CoReqKind::Schedule);
}

/// The owning handle of a detached coroutine in transit between contexts.
pub(crate) struct MovedOwner(std::ptr::NonNull<Header>);

// SAFETY: only moved, never used, between `new` on the old home thread and
// `into_coroutine` on the new one; `reschedule_self`'s contract rules out
// any other use of the coroutine's handles meanwhile.
unsafe impl Send for MovedOwner {}

impl MovedOwner {
    pub(crate) fn new(co: Coroutine<Erased>) -> MovedOwner {
        let co = std::mem::ManuallyDrop::new(co);
        MovedOwner(co.h)
    }

    /// # Safety
    ///
    /// On the coroutine's new home thread.
    pub(crate) unsafe fn into_coroutine(self) -> Coroutine<Erased> {
        // SAFETY: the strong count `new` kept moves into the handle.
        unsafe { Coroutine::from_header(self.0) }
    }
}
