//! Bottom halves: callbacks scheduled to run on the next loop iteration.
//!
//! # Protocol
//!
//! Each BH has one `flags` word (QEMU's):
//!
//! * `PENDING`: the node is linked in one of the context's lists (the
//!   remote stack, the local list or a slice being processed). Set by the
//!   enqueuer that links it, cleared by the dequeuer that unlinks it.
//! * `SCHEDULED`: run the callback when dequeued. Cleared by `cancel` and
//!   by the dequeue.
//! * `DELETED`: free without calling (the handle was dropped).
//! * `ONESHOT`: free after calling.
//!
//! Enqueue is one `fetch_or` (plus a push if `PENDING` was clear); dequeue
//! is one `fetch_and`. On the home thread the push goes to a plain local
//! list, so a schedule + dispatch costs exactly one locked operation each
//! way; other threads push on a lock-free (Treiber) stack and notify.
//!
//! # Ownership
//!
//! A node has one owner: its handle ([`Bh`], [`LocalBh`]) until the handle
//! is dropped, then the lists (dropping a handle enqueues `DELETED`); a
//! oneshot belongs to the lists from the start. Only the dispatcher on the
//! home thread frees nodes, never while their callback runs (a callback
//! that drops its own handle is freed after it returns), so callbacks that
//! are not `Send` are dropped on their home thread.
//!
//! # Slices
//!
//! Each `bh_poll` moves everything enqueued so far into a new *slice* and
//! processes slices oldest first, so a BH scheduled while BHs run waits for
//! the next `bh_poll`, and a nested `poll` inside a callback runs the
//! outer pass's remaining BHs exactly once (QEMU's `BHListSlice`).

use std::cell::{Cell, RefCell, UnsafeCell};
use std::collections::VecDeque;
use std::fmt;
use std::marker::PhantomData;
use std::ptr::{self, NonNull};

use crate::loom::sync::atomic::{AtomicPtr, AtomicU32, Ordering};

use super::AioContext;

pub(crate) const PENDING: u32 = 1 << 0;
pub(crate) const SCHEDULED: u32 = 1 << 1;
pub(crate) const DELETED: u32 = 1 << 2;
pub(crate) const ONESHOT: u32 = 1 << 3;

/// The type-independent head of every BH node.
#[repr(C)]
pub(crate) struct BhHeader {
    pub(crate) flags: AtomicU32,
    /// Link in whichever list holds the node (see `PENDING`).
    pub(crate) next: AtomicPtr<BhHeader>,
    /// Home thread only: the callback is running.
    running: Cell<bool>,
    /// Home thread only: freed while running; free when the call returns.
    free_after_run: Cell<bool>,
    vtable: &'static BhVTable,
}

struct BhVTable {
    /// Calls the callback (home thread, not running).
    call: unsafe fn(NonNull<BhHeader>),
    /// Frees the node (home thread, or any thread for `Send` callbacks).
    free: unsafe fn(NonNull<BhHeader>),
}

#[repr(C)]
struct BhNode<F> {
    hdr: BhHeader,
    f: UnsafeCell<Option<F>>,
}

struct Repeat<F>(PhantomData<F>);
impl<F: FnMut() + 'static> Repeat<F> {
    const VTABLE: BhVTable = BhVTable {
        call: call_repeat::<F>,
        free: free_node::<F>,
    };
}

struct Once<F>(PhantomData<F>);
impl<F: FnOnce() + 'static> Once<F> {
    const VTABLE: BhVTable = BhVTable {
        call: call_once::<F>,
        free: free_node::<F>,
    };
}

/// # Safety
/// `h` heads a live `BhNode<F>`, on its home thread, not running.
unsafe fn call_repeat<F: FnMut()>(h: NonNull<BhHeader>) {
    let node = h.cast::<BhNode<F>>();
    // SAFETY: the `running` flag guarantees this is the only access to the
    // callback; the node is alive (the dispatcher never frees a running
    // node).
    if let Some(f) = unsafe { &mut *(*node.as_ptr()).f.get() } {
        f();
    }
}

/// # Safety
/// As `call_repeat`.
unsafe fn call_once<F: FnOnce()>(h: NonNull<BhHeader>) {
    let node = h.cast::<BhNode<F>>();
    // SAFETY: as in `call_repeat`.
    if let Some(f) = unsafe { (*(*node.as_ptr()).f.get()).take() } {
        f();
    }
}

/// # Safety
/// `h` heads a `BhNode<F>` from `Box::into_raw` that nothing else uses.
unsafe fn free_node<F>(h: NonNull<BhHeader>) {
    // SAFETY: forwarded from the caller.
    drop(unsafe { Box::from_raw(h.cast::<BhNode<F>>().as_ptr()) });
}

fn new_node<F: 'static>(f: F, vtable: &'static BhVTable, flags: u32) -> NonNull<BhHeader> {
    let node = Box::new(BhNode {
        hdr: BhHeader {
            flags: AtomicU32::new(flags),
            next: AtomicPtr::new(ptr::null_mut()),
            running: Cell::new(false),
            free_after_run: Cell::new(false),
            vtable,
        },
        f: UnsafeCell::new(Some(f)),
    });
    NonNull::from(Box::leak(node)).cast()
}

/// A chain of nodes linked through `next` (local list, slice, or what the
/// remote stack gave up), FIFO.
#[derive(Clone, Copy)]
pub(crate) struct Chain {
    head: *mut BhHeader,
    tail: *mut BhHeader,
}

impl Chain {
    pub(crate) const EMPTY: Chain = Chain {
        head: ptr::null_mut(),
        tail: ptr::null_mut(),
    };

    fn is_empty(&self) -> bool {
        self.head.is_null()
    }

    fn push(&mut self, n: NonNull<BhHeader>) {
        // SAFETY: n is a live node being linked by its enqueuer.
        unsafe { n.as_ref() }
            .next
            .store(ptr::null_mut(), Ordering::Relaxed);
        if self.tail.is_null() {
            self.head = n.as_ptr();
        } else {
            // SAFETY: the tail is a live node of this chain.
            unsafe { (*self.tail).next.store(n.as_ptr(), Ordering::Relaxed) };
        }
        self.tail = n.as_ptr();
    }

    fn append(&mut self, other: Chain) {
        if other.is_empty() {
            return;
        }
        if self.tail.is_null() {
            *self = other;
        } else {
            // SAFETY: the tail is a live node of this chain.
            unsafe { (*self.tail).next.store(other.head, Ordering::Relaxed) };
            self.tail = other.tail;
        }
    }

    fn pop(&mut self) -> Option<NonNull<BhHeader>> {
        let h = NonNull::new(self.head)?;
        // SAFETY: the head is a live node of this chain.
        self.head = unsafe { h.as_ref() }.next.load(Ordering::Relaxed);
        if self.head.is_null() {
            self.tail = ptr::null_mut();
        }
        Some(h)
    }
}

/// Nodes enqueued from other threads: a Treiber stack.
pub(crate) struct RemoteStack {
    head: AtomicPtr<BhHeader>,
}

impl RemoteStack {
    pub(crate) fn new() -> RemoteStack {
        RemoteStack {
            head: AtomicPtr::new(ptr::null_mut()),
        }
    }

    pub(crate) fn push(&self, n: NonNull<BhHeader>) {
        let mut head = self.head.load(Ordering::Relaxed);
        loop {
            // SAFETY: n is live and not yet visible to the dispatcher.
            unsafe { n.as_ref() }.next.store(head, Ordering::Relaxed);
            // Release: the node's fields (and the work behind it) are
            // visible to the dispatcher's Acquire swap.
            match self.head.compare_exchange_weak(
                head,
                n.as_ptr(),
                Ordering::Release,
                Ordering::Relaxed,
            ) {
                Ok(_) => return,
                Err(h) => head = h,
            }
        }
    }

    /// Takes everything pushed so far, oldest first.
    pub(crate) fn take_all(&self) -> Chain {
        if self.head.load(Ordering::Relaxed).is_null() {
            return Chain::EMPTY;
        }
        let mut p = self.head.swap(ptr::null_mut(), Ordering::Acquire);
        // Reverse the LIFO stack into a FIFO chain.
        let mut chain = Chain::EMPTY;
        chain.tail = p;
        let mut prev: *mut BhHeader = ptr::null_mut();
        while !p.is_null() {
            // SAFETY: nodes on the stack are live; we own the chain now.
            let next = unsafe { (*p).next.load(Ordering::Relaxed) };
            // SAFETY: as above.
            unsafe { (*p).next.store(prev, Ordering::Relaxed) };
            prev = p;
            p = next;
        }
        chain.head = prev;
        chain
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.head.load(Ordering::Acquire).is_null()
    }
}

/// The BH state of one context.
pub(crate) struct BhQueues {
    pub(crate) remote: RemoteStack,
    /// Home thread only.
    local: Cell<Chain>,
    /// Home thread only: slices being processed, oldest first.
    slices: RefCell<VecDeque<Chain>>,
}

// SAFETY: `local` and `slices` are only touched on the home thread (every
// caller checks it); `remote` is a lock-free stack.
unsafe impl Sync for BhQueues {}
// SAFETY: as above.
unsafe impl Send for BhQueues {}

impl BhQueues {
    /// Whether the home-thread lists (the local list and the slices being
    /// processed) link any node: their callbacks may be bound to the home
    /// thread. For the context's last reference (`&mut`: no one else
    /// touches them).
    pub(crate) fn has_home_nodes(&mut self) -> bool {
        !self.local.get_mut().is_empty() || self.slices.get_mut().iter().any(|c| !c.is_empty())
    }

    /// As `has_home_nodes`, on the home thread through a shared reference.
    pub(crate) fn has_home_nodes_shared(&self) -> bool {
        !self.local_is_empty()
            || self
                .slices
                .try_borrow()
                .map_or(true, |s| s.iter().any(|c| !c.is_empty()))
    }

    pub(crate) fn new() -> BhQueues {
        BhQueues {
            remote: RemoteStack::new(),
            local: Cell::new(Chain::EMPTY),
            slices: RefCell::new(VecDeque::new()),
        }
    }

    /// Whether any BH is scheduled (for the sleep timeout). Home thread.
    pub(crate) fn any_scheduled(&self) -> bool {
        if !self.remote.is_empty() {
            return true;
        }
        let scheduled = |c: Chain| {
            let mut p = c.head;
            while !p.is_null() {
                // SAFETY: linked nodes are live.
                let h = unsafe { &*p };
                if h.flags.load(Ordering::Relaxed) & (SCHEDULED | DELETED) == SCHEDULED {
                    return true;
                }
                p = h.next.load(Ordering::Relaxed);
            }
            false
        };
        if scheduled(self.local.get()) {
            return true;
        }
        self.slices.borrow().iter().any(|c| scheduled(*c))
    }

    /// Whether the home-thread list is empty (home thread only).
    #[inline]
    fn local_is_empty(&self) -> bool {
        let c = self.local.replace(Chain::EMPTY);
        let empty = c.is_empty();
        self.local.set(c);
        empty
    }

    fn pop_next(&self) -> Option<NonNull<BhHeader>> {
        let mut slices = self.slices.borrow_mut();
        loop {
            let front = slices.front_mut()?;
            if let Some(n) = front.pop() {
                return Some(n);
            }
            slices.pop_front();
        }
    }
}

/// Links `n` with `new_flags` (QEMU's `aio_bh_enqueue`). Any thread.
pub(crate) fn enqueue(ctx: &AioContext, n: NonNull<BhHeader>, new_flags: u32) {
    enqueue_inner(&ctx.inner, n, new_flags);
}

/// Schedules a oneshot BH on a context reached through an internal
/// reference, without making an `AioContext` handle (whose drop could be
/// the last one, off the home thread).
pub(crate) fn schedule_oneshot_internal<F>(inner: &super::Inner, f: F)
where
    F: FnOnce() + Send + 'static,
{
    let n = new_node(f, &Once::<F>::VTABLE, 0);
    enqueue_inner(inner, n, SCHEDULED | ONESHOT);
}

fn enqueue_inner(inner: &super::Inner, n: NonNull<BhHeader>, new_flags: u32) {
    // SAFETY: the caller owns or shares a live node.
    let h = unsafe { n.as_ref() };
    // AcqRel: pairs with the dequeue's fetch_and, so a node is unlinked
    // before PENDING clears and linked only after it is set.
    let old = h.flags.fetch_or(PENDING | new_flags, Ordering::AcqRel);
    let home = inner.is_home();
    if inner.is_dead() {
        if home && old & PENDING == 0 {
            if (old | new_flags) & (DELETED | ONESHOT) != 0 {
                // The loop is gone and the node is in no list, and no
                // handle owns it (deleted, or a oneshot): free it here.
                if h.running.get() {
                    h.free_after_run.set(true);
                } else {
                    // SAFETY: no handle owns the node and no list links it.
                    unsafe { (h.vtable.free)(n) };
                }
            } else {
                // A schedule that will never run: leave the node unlinked
                // and unflagged, so that dropping its handle frees it.
                h.flags.fetch_and(!(PENDING | SCHEDULED), Ordering::AcqRel);
            }
        } else if !home && old & PENDING == 0 {
            // Freed with the context (`Send` callbacks only get here).
            inner.bh.remote.push(n);
        }
        return;
    }
    if old & PENDING == 0 {
        if home {
            let mut local = inner.bh.local.get();
            local.push(n);
            inner.bh.local.set(local);
        } else {
            inner.bh.remote.push(n);
        }
    }
    if home {
        inner.notify_home();
    } else {
        inner.notify();
    }
}

/// Restores a node's running state when its callback returns or unwinds.
struct Running(NonNull<BhHeader>);

impl Drop for Running {
    fn drop(&mut self) {
        // SAFETY: the dispatcher keeps the node alive while it runs.
        let h = unsafe { self.0.as_ref() };
        h.running.set(false);
        if h.free_after_run.get() {
            // SAFETY: the lists gave the node up while it ran.
            unsafe { (h.vtable.free)(self.0) };
        }
    }
}

/// Runs the scheduled BHs (QEMU's `aio_bh_poll`); returns whether any ran.
/// Home thread only. A panicking callback unwinds out of here; the BHs not
/// yet run stay queued for the next call.
pub(crate) fn bh_poll(ctx: &AioContext) -> bool {
    let q = &ctx.inner.bh;
    if q.remote.is_empty() && q.local_is_empty() && q.slices.borrow().is_empty() {
        // Nothing scheduled and no outer pass in progress. A BH scheduled
        // from another thread that this load misses is still being pushed:
        // its notify comes after the push and makes the next pass look.
        return false;
    }
    let mut slice = q.remote.take_all();
    slice.append(q.local.replace(Chain::EMPTY));
    q.slices.borrow_mut().push_back(slice);
    let mut progress = false;
    while let Some(n) = q.pop_next() {
        // SAFETY: linked nodes are live.
        let h = unsafe { n.as_ref() };
        let flags = h.flags.fetch_and(!(PENDING | SCHEDULED), Ordering::AcqRel);
        if flags & (SCHEDULED | DELETED) == SCHEDULED {
            if h.running.get() {
                // Dequeued by a nested poll inside its own callback: run it
                // on the next pass instead of re-entering it.
                enqueue(ctx, n, SCHEDULED);
                continue;
            }
            progress = true;
            h.running.set(true);
            let guard = Running(n);
            if flags & ONESHOT != 0 {
                h.free_after_run.set(true);
            }
            // SAFETY: the node is live, on its home thread, not running
            // before we set the flag.
            unsafe { (h.vtable.call)(n) };
            drop(guard);
        } else if flags & (DELETED | ONESHOT) != 0 {
            if h.running.get() {
                h.free_after_run.set(true);
            } else {
                // SAFETY: the lists own deleted and oneshot nodes; this one
                // is unlinked and not running.
                unsafe { (h.vtable.free)(n) };
            }
        }
    }
    progress
}

/// Unlinks every node at shutdown (home thread); frees those the lists own.
pub(crate) fn shutdown(ctx: &AioContext, panics: &mut super::Panics) {
    shutdown_queues(&ctx.inner.bh, panics);
}

/// As `shutdown`, for a context being dropped on its home thread. A
/// callback's destructor that panics does not stop the others: each free
/// is caught by `panics`.
pub(crate) fn shutdown_queues(q: &BhQueues, panics: &mut super::Panics) {
    let mut all = q.remote.take_all();
    all.append(q.local.replace(Chain::EMPTY));
    let slices = std::mem::take(&mut *q.slices.borrow_mut());
    for c in slices {
        all.append(c);
    }
    while let Some(n) = all.pop() {
        // SAFETY: linked nodes are live.
        let h = unsafe { n.as_ref() };
        let flags = h.flags.fetch_and(!(PENDING | SCHEDULED), Ordering::AcqRel);
        if flags & (DELETED | ONESHOT) != 0 {
            if h.running.get() {
                h.free_after_run.set(true);
            } else {
                // SAFETY: owned by the lists, unlinked (popped off `all`,
                // which no one else reaches), not running; freed once,
                // whether or not the callback's destructor panics.
                panics.catch(|| unsafe { (h.vtable.free)(n) });
            }
        }
    }
}

/// Frees what other threads pushed after shutdown (context drop; the
/// callbacks there are `Send`).
pub(crate) fn free_remote(q: &BhQueues) {
    let mut all = q.remote.take_all();
    while let Some(n) = all.pop() {
        // SAFETY: linked nodes are live.
        let h = unsafe { n.as_ref() };
        let flags = h.flags.fetch_and(!(PENDING | SCHEDULED), Ordering::AcqRel);
        if flags & (DELETED | ONESHOT) != 0 {
            // SAFETY: owned by the list; no handle is left (the context,
            // which every handle keeps alive, is being dropped).
            unsafe { (h.vtable.free)(n) };
        }
    }
}

/// A bottom half whose callback is `Send`: schedule it from any thread.
///
/// Created by [`AioContext::bh_new`]. Scheduling is wait-free and
/// idempotent while the BH is pending; the callback runs on the context's
/// home thread during its next `poll`. Dropping the handle deletes the BH
/// (after the callback returns, if it is running).
///
/// # Examples
///
/// ```
/// use coroloop::aio::AioContext;
/// use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
/// use std::sync::Arc;
///
/// let ctx = AioContext::new()?;
/// let runs = Arc::new(AtomicU32::new(0));
/// let r = runs.clone();
/// let bh = ctx.bh_new(move || { r.fetch_add(1, Relaxed); });
/// std::thread::scope(|s| { s.spawn(|| { bh.schedule(); bh.schedule(); }); });
/// assert!(ctx.poll(true));
/// assert_eq!(runs.load(Relaxed), 1, "scheduled twice, run once");
/// assert!(!ctx.poll(false));
/// # std::io::Result::Ok(())
/// ```
#[doc(alias = "QEMUBH")]
pub struct Bh {
    node: NonNull<BhHeader>,
    ctx: AioContext,
}

// SAFETY: the callback is `Send` (see `AioContext::bh_new`) and is only
// called on the home thread; the handle's operations are atomic.
unsafe impl Send for Bh {}
// SAFETY: as above; `schedule` and `cancel` take `&self` and are atomic.
unsafe impl Sync for Bh {}

/// A bottom half with a callback that is not `Send`: a `!Send` handle on
/// the context's home thread. Created by [`AioContext::bh_new_local`].
///
/// ```compile_fail
/// let ctx = coroloop::aio::AioContext::new().unwrap();
/// let bh = ctx.bh_new_local(|| ());
/// std::thread::spawn(move || bh.schedule());
/// ```
pub struct LocalBh {
    node: NonNull<BhHeader>,
    ctx: AioContext,
    _not_send: PhantomData<*const ()>,
}

macro_rules! bh_methods {
    () => {
        /// Schedules the BH: its callback runs once during a coming `poll`
        /// of its context, however many times it is scheduled before that.
        /// A BH scheduled from its own callback runs in the next pass.
        #[doc(alias = "qemu_bh_schedule")]
        pub fn schedule(&self) {
            enqueue(&self.ctx, self.node, SCHEDULED);
        }

        /// Cancels a scheduled run (no effect if not scheduled or running).
        #[doc(alias = "qemu_bh_cancel")]
        pub fn cancel(&self) {
            // SAFETY: the handle owns the node.
            unsafe { self.node.as_ref() }
                .flags
                .fetch_and(!SCHEDULED, Ordering::AcqRel);
        }

        /// Whether the BH is scheduled and has not run yet.
        pub fn is_scheduled(&self) -> bool {
            // SAFETY: the handle owns the node.
            unsafe { self.node.as_ref() }.flags.load(Ordering::Acquire) & SCHEDULED != 0
        }

        /// The context the BH runs in.
        pub fn context(&self) -> &AioContext {
            &self.ctx
        }
    };
}

impl Bh {
    bh_methods!();
}

impl LocalBh {
    bh_methods!();
}

impl Drop for Bh {
    #[doc(alias = "qemu_bh_delete")]
    fn drop(&mut self) {
        enqueue(&self.ctx, self.node, DELETED);
    }
}

impl Drop for LocalBh {
    fn drop(&mut self) {
        enqueue(&self.ctx, self.node, DELETED);
    }
}

impl fmt::Debug for Bh {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bh")
            .field("scheduled", &self.is_scheduled())
            .finish()
    }
}

impl fmt::Debug for LocalBh {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalBh")
            .field("scheduled", &self.is_scheduled())
            .finish()
    }
}

impl AioContext {
    /// Creates a bottom half that runs `f` on this context's home thread
    /// each time it is scheduled (QEMU's `aio_bh_new`). The handle is
    /// `Send + Sync`: schedule it from any thread.
    #[doc(alias = "aio_bh_new")]
    pub fn bh_new<F>(&self, f: F) -> Bh
    where
        F: FnMut() + Send + 'static,
    {
        Bh {
            node: new_node(f, &Repeat::<F>::VTABLE, 0),
            ctx: self.clone(),
        }
    }

    /// Creates a bottom half whose callback need not be `Send`; the handle
    /// stays on the home thread.
    ///
    /// # Panics
    ///
    /// Panics if called off the context's home thread.
    #[track_caller]
    pub fn bh_new_local<F>(&self, f: F) -> LocalBh
    where
        F: FnMut() + 'static,
    {
        self.inner.assert_home("AioContext::bh_new_local");
        LocalBh {
            node: new_node(f, &Repeat::<F>::VTABLE, 0),
            ctx: self.clone(),
            _not_send: PhantomData,
        }
    }

    /// Runs `f` once on the home thread during a coming `poll` (QEMU's
    /// `aio_bh_schedule_oneshot`). Callable from any thread.
    #[doc(alias = "aio_bh_schedule_oneshot")]
    pub fn bh_schedule_oneshot<F>(&self, f: F)
    where
        F: FnOnce() + Send + 'static,
    {
        let n = new_node(f, &Once::<F>::VTABLE, 0);
        enqueue(self, n, SCHEDULED | ONESHOT);
    }

    /// As [`bh_schedule_oneshot`](Self::bh_schedule_oneshot) for a callback
    /// that is not `Send`, from the home thread.
    ///
    /// # Panics
    ///
    /// Panics if called off the context's home thread.
    #[track_caller]
    pub fn bh_schedule_oneshot_local<F>(&self, f: F)
    where
        F: FnOnce() + 'static,
    {
        self.inner
            .assert_home("AioContext::bh_schedule_oneshot_local");
        let n = new_node(f, &Once::<F>::VTABLE, 0);
        enqueue(self, n, SCHEDULED | ONESHOT);
    }
}

#[cfg(all(test, coroloop_loom))]
mod tests_loom {
    use super::*;
    use loom::sync::atomic::AtomicUsize;
    use loom::sync::Arc;

    /// Counts calls; its drop (when the node is freed) counts frees.
    struct Probe {
        calls: Arc<AtomicUsize>,
        frees: Arc<AtomicUsize>,
    }
    impl Drop for Probe {
        fn drop(&mut self) {
            self.frees.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn repeat_node<F: FnMut() + 'static>(f: F) -> NonNull<BhHeader> {
        new_node(f, &Repeat::<F>::VTABLE, 0)
    }

    /// The enqueue of `enqueue()` without a context: link if not pending.
    fn enqueue_remote(stack: &RemoteStack, n: NonNull<BhHeader>, flags: u32) {
        // SAFETY: the node is alive until the dispatcher frees it, which it
        // only does after a DELETED enqueue linked it.
        let h = unsafe { n.as_ref() };
        if h.flags.fetch_or(PENDING | flags, Ordering::AcqRel) & PENDING == 0 {
            stack.push(n);
        }
    }

    /// One `bh_poll` pass over what the stack holds (the per-node steps of
    /// `bh_poll`); returns whether the node was freed.
    fn dispatch(stack: &RemoteStack) -> bool {
        let mut chain = stack.take_all();
        let mut freed = false;
        while let Some(n) = chain.pop() {
            // SAFETY: linked nodes are live.
            let h = unsafe { n.as_ref() };
            let flags = h.flags.fetch_and(!(PENDING | SCHEDULED), Ordering::AcqRel);
            if flags & (SCHEDULED | DELETED) == SCHEDULED {
                // SAFETY: live, not running, one dispatcher.
                unsafe { (h.vtable.call)(n) };
            }
            if flags & (DELETED | ONESHOT) != 0 {
                // SAFETY: the lists own deleted nodes.
                unsafe { (h.vtable.free)(n) };
                freed = true;
            }
        }
        freed
    }

    /// A schedule from another thread (joined before the pass), then the
    /// handle's delete racing the dispatcher: the callback runs at most
    /// once, never after the node is freed, and the node is freed exactly
    /// once.
    #[test]
    fn loom_schedule_dispatch_delete() {
        loom::model(|| {
            let calls = Arc::new(AtomicUsize::new(0));
            let frees = Arc::new(AtomicUsize::new(0));
            let probe = Probe {
                calls: calls.clone(),
                frees: frees.clone(),
            };
            let n = repeat_node(move || {
                probe.calls.fetch_add(1, Ordering::Relaxed);
            });
            let stack = Arc::new(RemoteStack::new());
            struct SendPtr(NonNull<BhHeader>);
            // SAFETY: the model hands the node to threads that only use its
            // atomic fields before the dispatcher frees it.
            unsafe impl Send for SendPtr {}
            let (s1, p1) = (stack.clone(), SendPtr(n));
            let sched = loom::thread::spawn(move || {
                let p = p1;
                enqueue_remote(&s1, p.0, SCHEDULED);
            });
            // The handle's owner drops it after the schedule was issued.
            sched.join().unwrap();
            let (s2, p2) = (stack.clone(), SendPtr(n));
            let del = loom::thread::spawn(move || {
                let p = p2;
                enqueue_remote(&s2, p.0, DELETED);
            });
            let mut freed = dispatch(&stack);
            del.join().unwrap();
            if !freed {
                freed = dispatch(&stack);
            }
            assert!(freed, "the deleted node is freed by the next pass");
            assert_eq!(frees.load(Ordering::Relaxed), 1);
            assert!(calls.load(Ordering::Relaxed) <= 1);
        });
    }

    /// Two threads schedule the same BH while the dispatcher runs: it runs
    /// at least once after the last schedule (no lost schedule) and is
    /// linked at most once at a time.
    #[test]
    fn loom_concurrent_schedules_are_not_lost() {
        loom::model(|| {
            let calls = Arc::new(AtomicUsize::new(0));
            let frees = Arc::new(AtomicUsize::new(0));
            let probe = Probe {
                calls: calls.clone(),
                frees: frees.clone(),
            };
            let n = repeat_node(move || {
                probe.calls.fetch_add(1, Ordering::Relaxed);
            });
            let stack = Arc::new(RemoteStack::new());
            struct SendPtr(NonNull<BhHeader>);
            // SAFETY: as above.
            unsafe impl Send for SendPtr {}
            let ts: Vec<_> = (0..2)
                .map(|_| {
                    let (s, p) = (stack.clone(), SendPtr(n));
                    loom::thread::spawn(move || {
                        let p = p;
                        enqueue_remote(&s, p.0, SCHEDULED);
                    })
                })
                .collect();
            dispatch(&stack);
            for t in ts {
                t.join().unwrap();
            }
            dispatch(&stack);
            let c = calls.load(Ordering::Relaxed);
            assert!((1..=2).contains(&c), "ran {c} times");
            // SAFETY: no other thread uses the node any more.
            let h = unsafe { n.as_ref() };
            assert_eq!(h.flags.load(Ordering::Relaxed) & (PENDING | SCHEDULED), 0);
            // SAFETY: the model owns the node now.
            unsafe { (h.vtable.free)(n) };
            assert_eq!(frees.load(Ordering::Relaxed), 1);
        });
    }
}
