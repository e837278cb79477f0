//! Coroutines and contexts: the context as a coroutine's resumer.
//!
//! A context queues coroutines scheduled or woken from anywhere in a
//! lock-free queue and enters them on its home thread during `poll`, after
//! the bottom halves (QEMU's `co_schedule_bh`).
//!
//! The coroutine core does not know contexts (ARCHITECTURE.md,
//! "Layering"): what a coroutine needs a context for lives here —
//! [`sleep`], [`reschedule_self`], `Coroutine::aio_context` — and is
//! re-exported at its public path (`coroutine::sleep`, ...).

use std::any::Any;
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use concurrent_queue::ConcurrentQueue;

use super::{home_default, running_inner, AioContext, ClockType, Inner};
use crate::coroutine::{
    self, arrive, depart, enter_request, CoList, CoReqKind, Coroutine, Erased, MovedOwner,
    RemoteCoroutine, RemoteRef, Request, Resumer, WakeOnDrop,
};

pub(crate) struct CoQueue {
    /// Requests from other threads.
    queue: ConcurrentQueue<(RemoteRef, CoReqKind)>,
    /// Requests made on the home thread (no atomics on the queue itself).
    local: std::cell::RefCell<std::collections::VecDeque<(RemoteRef, CoReqKind)>>,
    resumer: OnceLock<Arc<CtxResumer>>,
}

impl CoQueue {
    pub(crate) fn new() -> CoQueue {
        CoQueue {
            queue: ConcurrentQueue::unbounded(),
            local: Default::default(),
            resumer: OnceLock::new(),
        }
    }

    pub(crate) fn set_resumer(&self, inner: &Arc<Inner>) {
        // The loop plugs itself into the coroutine core: from now on,
        // coroutines created outside any coroutine look up their thread's
        // context (before the first context, none exists).
        coroutine::set_default_resumer_hook(thread_default_resumer);
        let _ = self.resumer.set(Arc::new(CtxResumer {
            inner: Arc::downgrade(inner),
            list: CoList::new(),
        }));
    }

    /// The coroutines the context resumes (home thread only).
    pub(crate) fn coroutines(&self) -> &CoList {
        &self.resumer.get().expect("set at creation").list
    }

    /// Home thread only (reads the local queue).
    pub(crate) fn is_empty(&self) -> bool {
        self.queue.is_empty() && self.local.borrow().is_empty()
    }

    /// Queues a request; `home`: the caller is on the home thread.
    fn push(&self, req: (RemoteRef, CoReqKind), home: bool) {
        if home {
            self.local.borrow_mut().push_back(req);
        } else {
            let _ = self.queue.push(req);
        }
    }
}

/// What coroutines hold to reach their context: weak, so that coroutines
/// (detached ones included) never keep their context alive.
pub(crate) struct CtxResumer {
    inner: Weak<Inner>,
    /// Every coroutine this context resumes, cancelled by its shutdown.
    list: CoList,
}

impl Resumer for CtxResumer {
    fn queue(&self, co: RemoteRef, kind: CoReqKind) {
        let Some(inner) = self.inner.upgrade() else {
            return; // the context is gone; so is the coroutine's driver
        };
        if inner.is_dead() {
            return; // shut down: it enters nothing any more
        }
        let home = inner.is_home();
        inner.co.push((co, kind), home);
        if home {
            inner.notify_home();
        } else {
            inner.notify();
        }
    }

    fn event_loop(&self) -> Option<Arc<dyn Any + Send + Sync>> {
        Some(self.inner.upgrade()?)
    }

    fn coroutines(&self) -> Option<&CoList> {
        Some(&self.list)
    }

    fn adopt(&self, co: Coroutine<Erased>) -> Result<(), Coroutine<Erased>> {
        match self.inner.upgrade() {
            Some(inner) if !inner.is_dead() && inner.is_home() => {
                let addr = co.header_addr();
                let prev = inner.local().detached.borrow_mut().insert(addr, co);
                drop(prev);
                Ok(())
            }
            _ => Err(co),
        }
    }

    fn detached_finished(&self, addr: usize) {
        // No `AioContext` handle is made here: dropping one could start a
        // shutdown (a context whose last user handle is gone).
        if let Some(inner) = self.inner.upgrade() {
            if !inner.is_home() || inner.is_dead() {
                return;
            }
            let owned = inner.local().detached.borrow_mut().remove(&addr);
            // Dropped after the borrow ends: the handle's drop may run code.
            drop(owned);
        }
    }
}

/// The resumer for a coroutine created outside any coroutine on this
/// thread: the context whose `poll` runs here, else the thread's default.
/// The coroutine core calls it through the hook registered when the first
/// context is created.
///
/// Also returns the context's list of coroutines, which the new coroutine
/// joins (valid as long as the returned resumer lives).
pub(crate) fn thread_default_resumer() -> Option<(Arc<dyn Resumer>, *const CoList)> {
    let running = running_inner();
    let home;
    let inner = if !running.is_null() {
        // SAFETY: the running loop's `poll` frame is on the current call
        // chain and keeps its context alive (see `AioContext::current`).
        unsafe { &*running }
    } else {
        home = home_default()?;
        &*home
    };
    // While its shutdown runs, a context stays the resumer of coroutines
    // created (by the destructors the shutdown runs): its list is closed,
    // so they are cancelled at their first suspension, and `detach`,
    // `sleep` and fd waits on them cancel or fail cleanly instead of
    // panicking. Once the shutdown is over it resumes nothing: coroutines
    // created then are bare, owned by their handles alone.
    if inner.is_shut() {
        return None;
    }
    let r = inner.co.resumer.get()?;
    let list: *const CoList = &r.list;
    Some((r.clone() as Arc<dyn Resumer>, list))
}

/// Enters the coroutines queued when the pass started; returns whether any
/// was entered. A panicking coroutine unwinds out; the rest stay queued.
pub(crate) fn run_queue(ctx: &AioContext) -> bool {
    let co = &ctx.inner.co;
    let n_remote = co.queue.len();
    let n_local = co.local.borrow().len();
    let mut progress = false;
    for i in 0..n_remote + n_local {
        let req = if i < n_remote {
            co.queue.pop().ok()
        } else {
            co.local.borrow_mut().pop_front()
        };
        let Some((r, kind)) = req else { continue };
        progress |= run_one(ctx, r, kind);
    }
    progress
}

fn run_one(ctx: &AioContext, r: RemoteRef, kind: CoReqKind) -> bool {
    // SAFETY: we are on the home thread (poll checked it), which is the
    // coroutine's home thread: its resumer is this context.
    match unsafe { enter_request(r, kind) } {
        Request::Entered => true,
        Request::Stale => false,
        // It will run again when it suspends; keep the request, unless a
        // coroutine entered meanwhile shut the context down (a shut-down
        // context queues nothing).
        Request::Busy(r, kind) if !ctx.inner.is_dead() => {
            ctx.inner.co.push((r, kind), true);
            false
        }
        Request::Busy(..) => false,
    }
}

/// Drops queued requests at shutdown.
pub(crate) fn clear_queue(ctx: &AioContext) {
    while ctx.inner.co.queue.pop().is_ok() {}
    ctx.inner.co.local.borrow_mut().clear();
}

impl AioContext {
    /// The resumer coroutines of this context hold.
    pub(crate) fn resumer(&self) -> Arc<dyn Resumer> {
        self.inner
            .co
            .resumer
            .get()
            .expect("set at creation")
            .clone()
    }

    /// Takes ownership of a detached coroutine (home thread).
    pub(crate) fn adopt(&self, co: Coroutine<Erased>) {
        self.inner.assert_home("Coroutine::detach");
        if self.inner.is_dead() {
            // A stopped context owns nothing: dropping unwinds it here.
            drop(co);
            return;
        }
        let addr = co.header_addr();
        let prev = self.inner.local().detached.borrow_mut().insert(addr, co);
        drop(prev);
    }

    /// Gives up ownership of a detached coroutine (home thread).
    pub(crate) fn disown(&self, addr: usize) -> Option<Coroutine<Erased>> {
        if !self.inner.is_home() || self.inner.is_dead() {
            return None;
        }
        self.inner.local().detached.borrow_mut().remove(&addr)
    }

    /// Enters `co` on behalf of this context (QEMU's `aio_co_enter`): from
    /// inside a coroutine it is queued on the current coroutine's wake-up
    /// list, otherwise entered before this returns. Same as
    /// [`Coroutine::wake`].
    ///
    /// # Panics
    ///
    /// Off the home thread. A coroutine cannot be entered from another
    /// thread in the first place: its handle is `!Send`, so it cannot be
    /// moved there (wake it through [`Coroutine::remote`] instead).
    ///
    /// ```compile_fail,E0277
    /// use coroloop::{aio::AioContext, Coroutine};
    ///
    /// let ctx = AioContext::new().unwrap(); // `Send + Sync`
    /// let co = Coroutine::new(|| ()); // `!Send`
    /// std::thread::spawn(move || ctx.co_enter(&co));
    /// ```
    #[doc(alias = "aio_co_enter")]
    #[doc(alias = "qemu_aio_coroutine_enter")]
    #[track_caller]
    pub fn co_enter<T>(&self, co: &Coroutine<T>) {
        self.inner.assert_home("AioContext::co_enter");
        co.wake();
    }

    /// Queues `co` to be entered by this context's next `poll` (QEMU's
    /// `aio_co_schedule`).
    ///
    /// # Panics
    ///
    /// Off the home thread, or if `co` is already scheduled (QEMU's
    /// "Co-routine was already scheduled").
    #[doc(alias = "aio_co_schedule")]
    #[track_caller]
    pub fn co_schedule<T>(&self, co: &Coroutine<T>) {
        self.inner.assert_home("AioContext::co_schedule");
        if co.is_finished() || self.inner.is_dead() {
            return;
        }
        let r = co.remote_ref();
        if !r.header().scheduled.claim() {
            panic!("AioContext::co_schedule: coroutine was already scheduled");
        }
        self.inner.co.push((r, CoReqKind::Schedule), true);
        self.inner.notify_home();
    }

    /// Number of coroutines this context owns ([`Coroutine::detach`]).
    #[track_caller]
    pub fn detached_count(&self) -> usize {
        self.inner.assert_home("AioContext::detached_count");
        self.inner.local().detached.borrow().len()
    }
}

/// The context behind a resumer, if it is a context's and the context
/// still exists.
fn context_of(r: &Arc<dyn Resumer>) -> Option<AioContext> {
    let any = r.event_loop()?;
    any.downcast::<Inner>().ok().map(AioContext::from_inner)
}

impl<T> Coroutine<T> {
    /// The context that enters this coroutine when it is scheduled or woken
    /// from elsewhere (QEMU's `qemu_coroutine_get_aio_context`).
    #[doc(alias = "qemu_coroutine_get_aio_context")]
    pub fn aio_context(&self) -> Option<AioContext> {
        context_of(&self.resumer()?)
    }
}

impl RemoteCoroutine {
    /// The context that enters the coroutine, if any.
    pub fn aio_context(&self) -> Option<AioContext> {
        context_of(self.resumer()?)
    }
}

/// Suspends the current coroutine for at least `d`, on its context's
/// realtime timers (QEMU's `qemu_co_sleep_ns`). Other wakes in between do
/// not end the sleep early.
///
/// # Panics
///
/// Outside a coroutine, or in one without an AioContext on its thread.
#[doc(alias = "qemu_co_sleep_ns")]
#[track_caller]
pub fn sleep(d: Duration) {
    let co = match Coroutine::current() {
        Some(co) => co,
        None => panic!("coroutine::sleep() called outside a coroutine"),
    };
    let Some(ctx) = co.aio_context().map(|c| c.internal()) else {
        panic!("coroutine::sleep(): the coroutine has no AioContext for its timer");
    };
    let fired = std::rc::Rc::new(std::cell::Cell::new(false));
    let f = fired.clone();
    let r = co.remote();
    // If the context shuts down, the timer's callback is dropped unrun:
    // this wakes the sleeper (through its resumer, never entering it from
    // the shutdown), which then finds the context dead.
    let on_drop = WakeOnDrop(co.remote());
    drop(co);
    let timer = ctx.timer_new(ClockType::Realtime, move || {
        let _ = &on_drop;
        f.set(true);
        // SAFETY: timer callbacks run on the context's home thread, which
        // is this coroutine's home thread.
        if let Some(co) = unsafe { r.upgrade_home() } {
            co.wake();
        }
    });
    timer.mod_after(d);
    while !fired.get() {
        if ctx.inner.is_dead() {
            // Nothing will ever end this sleep: a coroutine of a shut-down
            // context is cancelled (ARCHITECTURE.md, "Who owns a
            // coroutine").
            coroutine::cancel_current();
        }
        coroutine::suspend();
    }
}

/// Moves the current coroutine to `ctx`: it suspends here and is entered
/// next on `ctx`'s home thread (QEMU's `aio_co_reschedule_self`).
///
/// # Safety
///
/// A coroutine's stack may hold values bound to its thread, and its
/// handles and bookkeeping are not thread-safe. The caller guarantees:
///
/// * nothing on the coroutine's stack is bound to the current thread (no
///   `Rc` shared with this thread, no `RefCell` borrow of its data, no
///   reference to its thread-locals, no lock guard of a thread-affine lock);
/// * no [`Coroutine`] handle of it is used (cloned, dropped, entered,
///   queried) on any thread while it runs or is suspended on `ctx`'s
///   thread — in practice, it is [detached](Coroutine::detach) or its
///   handles are leaked;
/// * nothing on this thread will enter or wake it by hand afterwards.
///
/// Wakers and [`RemoteCoroutine`]s made before the move still queue it on
/// its old context.
#[doc(alias = "aio_co_reschedule_self")]
pub unsafe fn reschedule_self(ctx: &AioContext) {
    let Some(me) = Coroutine::current() else {
        panic!("coroutine::reschedule_self() called outside a coroutine");
    };
    let Some(old) = AioContext::current() else {
        panic!("coroutine::reschedule_self(): no AioContext runs on this thread");
    };
    if old.ptr_eq(ctx) {
        return;
    }
    let r = me.remote_ref();
    drop(me);
    let res: Arc<dyn Resumer> = ctx.resumer();
    let new_ctx = ctx.clone();
    let old2 = old.clone();
    // Hand over from a BH on the old context, which runs only after this
    // coroutine has suspended here: queueing it on the new context right
    // away could let that thread enter it before it left this one.
    old.bh_schedule_oneshot_local(move || {
        let addr = r.header_addr();
        // SAFETY: on the home thread, with the coroutine suspended (this
        // BH runs after it suspended below); the caller guarantees no
        // handle uses it until it arrives.
        let detached = unsafe { depart(&r, res) };
        let owned = if detached {
            old2.disown(addr).map(MovedOwner::new)
        } else {
            None
        };
        let target = new_ctx.clone();
        new_ctx.bh_schedule_oneshot(move || {
            if let Some(owner) = owned {
                // SAFETY: `owner` came from `disown` on the old home
                // thread; we are on the new home thread now.
                target.adopt(unsafe { owner.into_coroutine() });
            }
            // SAFETY: on the new home thread, after `depart`; the caller
            // guarantees nothing else uses the coroutine meanwhile.
            unsafe { arrive(r) };
        });
    });
    coroutine::suspend();
}
