//! Coroutines and contexts: the context as a coroutine's resumer.
//!
//! A context queues coroutines scheduled or woken from anywhere in a
//! lock-free queue and enters them on its home thread during `poll`, after
//! the bottom halves (QEMU's `co_schedule_bh`).

use std::sync::{Arc, OnceLock, Weak};

use concurrent_queue::ConcurrentQueue;

use super::{home_default, running_inner, AioContext, Inner};
use crate::coroutine::{
    enter_request, CoList, CoReqKind, Coroutine, Erased, RemoteRef, Request, Resumer,
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
        if !home {
            inner.notify();
        }
    }

    fn aio_context(&self) -> Option<AioContext> {
        self.inner.upgrade().map(AioContext::from_inner)
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
    }

    /// Number of coroutines this context owns ([`Coroutine::detach`]).
    #[track_caller]
    pub fn detached_count(&self) -> usize {
        self.inner.assert_home("AioContext::detached_count");
        self.inner.local().detached.borrow().len()
    }
}
