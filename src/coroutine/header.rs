//! The coroutine header: the state a coroutine's handles share.
//!
//! A header lives beside the stack, not on it, and is pooled per thread. It
//! outlives the stack: when the body returns, the worker (stack and
//! corosensei context) goes back to the pool at once while the header keeps
//! the result until an owner takes it.
//!
//! ```text
//!   Coroutine<T> ──strong──┐
//!   Coroutine<T> ──strong──┤
//!   wake-up lists ──weak───┼──► Header ──worker──► Worker { corosensei ctx, CoStack }
//!   enter loop ────weak────┘     │  (while unfinished)      (pooled per thread)
//!                                ├─ payload: closure, then result
//!                                ├─ state, caller, wake-up list, resumer
//!                                └─ generation (atomic), remote refs (atomic)
//! ```
//!
//! # Field access rules
//!
//! Every `Cell`/`UnsafeCell` field is touched only on the home thread (the
//! thread that created the coroutine): handles are `!Send`, and the enter
//! loop, `suspend` and the pools are thread-local. Only `generation` and
//! `remote` are read from other threads.
//!
//! # Counts
//!
//! * `strong`: [`Coroutine`](super::Coroutine) handles. When it drops to 0
//!   the coroutine is unwound if suspended, its closure or result dropped.
//! * `weak`: same-thread references that do not own: entries of wake-up
//!   lists and the enter loop's hold on the coroutine it is running.
//! * `remote`: references from other threads (wakers, remote handles).
//!
//! The header goes back to the pool when all three are 0 (see
//! `remote.rs` for the hand-off when the last remote reference drops after
//! the home thread let go).

use std::any::TypeId;
use std::cell::{Cell, UnsafeCell};
use std::marker::PhantomData;
use std::mem::{self, MaybeUninit};
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicU64, Ordering};

use super::remote::RemoteCount;
use super::resumer::Resumer;

use super::pool::Worker;
use super::stack::StackBounds;

/// Lifecycle of the coroutine a header describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum State {
    /// Created, never entered: the payload holds the closure.
    Fresh,
    /// On the current call chain (entered and not yet suspended).
    Running,
    /// Suspended in `suspend()`.
    Suspended,
    /// Returned, panicked or was unwound; the worker is gone.
    Finished,
}

/// What the payload slot holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Payload {
    Empty,
    Closure,
    Result,
}

/// Inline storage for the entry closure and then its result. Closures and
/// results that do not fit are boxed, with the box pointer stored inline.
#[repr(C, align(16))]
pub(crate) struct Inline([MaybeUninit<u8>; 64]);

const fn fits<X>() -> bool {
    mem::size_of::<X>() <= mem::size_of::<Inline>() && mem::align_of::<X>() <= 16
}

/// # Safety
/// `slot` must be valid for writes and hold no live value.
unsafe fn put<X>(slot: *mut Inline, x: X) {
    if fits::<X>() {
        // SAFETY: X fits size and alignment of Inline; slot is writable.
        unsafe { ptr::write(slot.cast::<X>(), x) }
    } else {
        // SAFETY: a pointer fits in Inline; slot is writable.
        unsafe { ptr::write(slot.cast::<*mut X>(), Box::into_raw(Box::new(x))) }
    }
}

/// # Safety
/// `slot` must hold a value of type `X` stored by [`put`]; it is moved out.
unsafe fn take<X>(slot: *mut Inline) -> X {
    if fits::<X>() {
        // SAFETY: the caller guarantees slot holds an X written by `put`.
        unsafe { ptr::read(slot.cast::<X>()) }
    } else {
        // SAFETY: `put` stored a pointer from Box::into_raw.
        unsafe { *Box::from_raw(ptr::read(slot.cast::<*mut X>())) }
    }
}

/// Type-erased operations on the payload, one static table per `(F, T)`.
pub(crate) struct PayloadVTable {
    /// Moves the closure out, runs it, stores the result. Sets `payload` to
    /// `Empty` before running and `Result` after.
    pub(crate) run: unsafe fn(&Header),
    /// `None` when dropping is a no-op (inline and no drop glue).
    pub(crate) drop_closure: Option<unsafe fn(*mut Inline)>,
    pub(crate) drop_result: Option<unsafe fn(*mut Inline)>,
    pub(crate) result_type: fn() -> TypeId,
}

struct VTableFor<F, T>(PhantomData<(F, T)>);

impl<F: FnOnce() -> T + 'static, T: 'static> VTableFor<F, T> {
    const VTABLE: PayloadVTable = PayloadVTable {
        run: run::<F, T>,
        drop_closure: dropper::<F>(),
        drop_result: dropper::<T>(),
        result_type: TypeId::of::<T>,
    };
}

/// # Safety
/// The header's payload must hold a closure of type `F`.
unsafe fn run<F: FnOnce() -> T, T>(h: &Header) {
    debug_assert_eq!(h.payload.get(), Payload::Closure);
    h.payload.set(Payload::Empty);
    // SAFETY: payload was Closure, written by `Header::init::<F, T>`.
    let f = unsafe { take::<F>(h.slot.get()) };
    let t = f();
    // SAFETY: the slot is empty (the closure was moved out above).
    unsafe { put::<T>(h.slot.get(), t) };
    h.payload.set(Payload::Result);
}

const fn dropper<X>() -> Option<unsafe fn(*mut Inline)> {
    if fits::<X>() && !mem::needs_drop::<X>() {
        None
    } else {
        Some(drop_in::<X>)
    }
}

/// # Safety
/// `slot` must hold an `X` stored by [`put`].
unsafe fn drop_in<X>(slot: *mut Inline) {
    // SAFETY: forwarded from the caller.
    drop(unsafe { take::<X>(slot) });
}

/// A non-owning same-thread reference, as held by wake-up lists.
pub(crate) struct WeakRef(NonNull<Header>);

impl WeakRef {
    #[inline]
    pub(crate) fn new(h: &Header) -> WeakRef {
        h.weak.set(h.weak.get() + 1);
        WeakRef(NonNull::from(h))
    }

    pub(crate) fn header(&self) -> &Header {
        // SAFETY: the weak count keeps the header out of the pool.
        unsafe { self.0.as_ref() }
    }

    /// Gives up the handle without dropping the weak count.
    fn into_raw(self) -> *const Header {
        let p = self.0.as_ptr();
        mem::forget(self);
        p
    }

    /// # Safety
    ///
    /// `p` must come from [`WeakRef::into_raw`] (it owns a weak count).
    unsafe fn from_raw(p: *const Header) -> WeakRef {
        // SAFETY: into_raw's pointer is non-null.
        WeakRef(unsafe { NonNull::new_unchecked(p as *mut Header) })
    }
}

/// An intrusive FIFO of headers linked through `wake_next`; every entry
/// owns one weak count. A header is in at most one list (`queued`).
pub(crate) struct WakeList {
    head: Cell<*const Header>,
    tail: Cell<*const Header>,
}

impl WakeList {
    pub(crate) const fn new() -> WakeList {
        WakeList {
            head: Cell::new(ptr::null()),
            tail: Cell::new(ptr::null()),
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.head.get().is_null()
    }

    /// Appends `co` unless it already is in some list.
    pub(crate) fn push_back(&self, co: &Header) {
        if co.queued.replace(true) {
            return;
        }
        co.wake_next.set(ptr::null());
        let p = WeakRef::new(co).into_raw();
        let tail = self.tail.get();
        if tail.is_null() {
            self.head.set(p);
        } else {
            // SAFETY: entries are kept alive by their weak counts.
            unsafe { (*tail).wake_next.set(p) };
        }
        self.tail.set(p);
    }

    /// Moves all of `other` in front of this list.
    pub(crate) fn prepend(&self, other: &WakeList) {
        let (oh, ot) = (
            other.head.replace(ptr::null()),
            other.tail.replace(ptr::null()),
        );
        if oh.is_null() {
            return;
        }
        // SAFETY: `ot` is an entry of `other`, alive by its weak count.
        unsafe { (*ot).wake_next.set(self.head.get()) };
        if self.tail.get().is_null() {
            self.tail.set(ot);
        }
        self.head.set(oh);
    }

    pub(crate) fn pop_front(&self) -> Option<WeakRef> {
        let p = self.head.get();
        if p.is_null() {
            return None;
        }
        // SAFETY: entries are kept alive by their weak counts.
        let next = unsafe { (*p).wake_next.replace(ptr::null()) };
        self.head.set(next);
        if next.is_null() {
            self.tail.set(ptr::null());
        }
        // SAFETY: as above; the list owned this entry's weak count.
        let r = unsafe { WeakRef::from_raw(p) };
        r.header().queued.set(false);
        Some(r)
    }
}

impl Drop for WakeList {
    fn drop(&mut self) {
        while self.pop_front().is_some() {}
    }
}

impl Drop for WeakRef {
    #[inline]
    fn drop(&mut self) {
        let h = self.header();
        h.weak.set(h.weak.get() - 1);
        // SAFETY: this was the last use of the pointer by this reference.
        unsafe { Header::maybe_recycle(self.0) };
    }
}

/// How a coroutine finished.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum End {
    /// Its closure returned (its result is in the payload until taken).
    Returned,
    /// Its closure panicked.
    Panicked,
    /// It was cancelled (unwound, discarded before it started, or leaked
    /// at its thread's exit).
    Cancelled,
}

pub(crate) struct Header {
    pub(crate) strong: Cell<usize>,
    pub(crate) weak: Cell<usize>,
    pub(crate) state: Cell<State>,
    /// The worker running this coroutine; `None` once finished.
    pub(crate) worker: Cell<Option<NonNull<Worker>>>,
    /// The worker loop's yielder (on the worker's stack), set when the job
    /// starts; meaningful while the coroutine is unfinished.
    pub(crate) yielder: Cell<*const corosensei::Yielder<super::pool::Cmd, super::pool::Event>>,
    /// Guard page of the worker's stack, for the overflow reporter.
    pub(crate) bounds: Cell<StackBounds>,
    /// Coroutines woken by this one, entered when it suspends or finishes
    /// (QEMU's `co_queue_wakeup`).
    pub(crate) wakeup: WakeList,
    /// Link in the wake-up list this header sits in.
    pub(crate) wake_next: Cell<*const Header>,
    /// Set while this header sits in some wake-up list, so a second wake
    /// does not queue it twice.
    pub(crate) queued: Cell<bool>,
    /// The panic the coroutine's body ended with, until the enter loop
    /// takes it.
    pub(crate) panic: Cell<Option<Box<dyn std::any::Any + Send>>>,
    /// The unwind in progress was started by coroloop (last handle dropped).
    pub(crate) cancelling: Cell<bool>,
    /// A `Cancelled` unwind was raised in it (its own cancellation is
    /// unwinding, or was caught and may be raised again).
    pub(crate) cancel_raised: Cell<bool>,
    /// Owned by its resumer's context (`Coroutine::detach`).
    pub(crate) detached: Cell<bool>,
    /// Its resumer may refuse direct entry (a `CoroutineFuture` that is
    /// not being polled): home-thread wakes ask it first.
    pub(crate) ask_resumer: Cell<bool>,
    /// Queued by a schedule and not yet dequeued (any thread).
    pub(crate) scheduled: super::remote::WakeFlag,
    /// Queued by a wake and not yet dequeued (any thread).
    pub(crate) woken: super::remote::WakeFlag,
    pub(crate) payload: Cell<Payload>,
    pub(crate) slot: UnsafeCell<Inline>,
    pub(crate) vtable: Cell<&'static PayloadVTable>,
    /// Name given to the builder.
    pub(crate) name: UnsafeCell<Option<Box<str>>>,
    /// "coroutine 'NAME' has overflowed its stack\n", rendered at creation
    /// so the signal handler need not format anything.
    pub(crate) overflow_msg: UnsafeCell<Option<Box<[u8]>>>,
    pub(crate) resumer: UnsafeCell<Option<std::sync::Arc<dyn Resumer>>>,
    /// Link in the list of the coroutines its resumer resumes (see
    /// `registry.rs`); unlinked when it finishes.
    pub(crate) links: super::registry::Links,
    /// The innermost event loop whose `poll` runs on this coroutine's own
    /// stack (null if none); see `current.rs`.
    pub(crate) own_loop: Cell<*const ()>,
    /// The coroutine that entered this one last (null: the thread's own
    /// stack); meaningful while this one is on the call chain.
    pub(crate) caller: Cell<*const Header>,
    /// Whether the thread was already panicking when this coroutine was
    /// last resumed (then a panic in progress is not necessarily its own).
    pub(crate) entered_panicking: Cell<bool>,
    /// How it finished (meaningful once `state` is `Finished`).
    pub(crate) end: Cell<End>,
    /// Wakers of those joining it (`Coroutine::join`, `JoinSet`), woken
    /// when it finishes.
    pub(crate) joiners: Cell<Vec<std::task::Waker>>,
    /// The message of the panic it ended with, for its joiners.
    pub(crate) panic_text: Cell<Option<Box<str>>>,
    /// Bumped whenever the coroutine finishes and whenever the header is
    /// reused; a remote reference carrying an older value is stale.
    pub(crate) generation: AtomicU64,
    /// Remote references, and which side frees the header (`remote.rs`).
    pub(crate) remote: RemoteCount,
}

static EMPTY_VTABLE: PayloadVTable = PayloadVTable {
    run: run_nothing,
    drop_closure: None,
    drop_result: None,
    result_type: TypeId::of::<()>,
};

/// # Safety
/// Never called: the empty table is only installed while the payload is
/// `Empty`.
unsafe fn run_nothing(_: &Header) {}

impl Header {
    pub(crate) fn new_boxed() -> NonNull<Header> {
        let h = Box::new(Header {
            strong: Cell::new(0),
            weak: Cell::new(0),
            state: Cell::new(State::Finished),
            worker: Cell::new(None),
            yielder: Cell::new(ptr::null()),
            bounds: Cell::new(StackBounds::default()),
            wakeup: WakeList::new(),
            wake_next: Cell::new(ptr::null()),
            queued: Cell::new(false),
            panic: Cell::new(None),
            cancelling: Cell::new(false),
            cancel_raised: Cell::new(false),
            detached: Cell::new(false),
            ask_resumer: Cell::new(false),
            scheduled: super::remote::WakeFlag::new(),
            woken: super::remote::WakeFlag::new(),
            payload: Cell::new(Payload::Empty),
            slot: UnsafeCell::new(Inline([MaybeUninit::uninit(); 64])),
            vtable: Cell::new(&EMPTY_VTABLE),
            name: UnsafeCell::new(None),
            overflow_msg: UnsafeCell::new(None),
            resumer: UnsafeCell::new(None),
            links: super::registry::Links::new(),
            own_loop: Cell::new(ptr::null()),
            caller: Cell::new(ptr::null()),
            entered_panicking: Cell::new(false),
            end: Cell::new(End::Returned),
            joiners: Cell::new(Vec::new()),
            panic_text: Cell::new(None),
            generation: AtomicU64::new(0),
            remote: RemoteCount::new(),
        });
        let p = NonNull::from(Box::leak(h));
        // SAFETY: just allocated; the node records its header for the
        // resumer's list walks.
        unsafe { p.as_ref() }.links.set_owner(p.as_ptr());
        p
    }

    /// Prepares a pooled (or new) header for a coroutine running `f`.
    #[inline]
    pub(crate) fn init<F, T>(&self, f: F)
    where
        F: FnOnce() -> T + 'static,
        T: 'static,
    {
        debug_assert_eq!(self.payload.get(), Payload::Empty);
        debug_assert_eq!(self.strong.get(), 0);
        // SAFETY: the payload is Empty, so the slot holds no live value.
        unsafe { put::<F>(self.slot.get(), f) };
        self.payload.set(Payload::Closure);
        self.vtable.set(&VTableFor::<F, T>::VTABLE);
        self.state.set(State::Fresh);
        self.strong.set(1);
        self.cancelling.set(false);
        self.cancel_raised.set(false);
        // A leaked (never finished) predecessor cannot be recycled, so no
        // poll frame of an earlier coroutine is left on this header.
        self.own_loop.set(ptr::null());
        self.bump_generation();
    }

    /// Marks every remote reference made so far as stale. Only the home
    /// thread writes the generation, so a plain store suffices (no locked
    /// read-modify-write on the hot path).
    #[inline]
    pub(crate) fn bump_generation(&self) {
        let g = self.generation.load(Ordering::Relaxed);
        self.generation.store(g.wrapping_add(1), Ordering::Release);
    }

    pub(crate) fn name(&self) -> Option<&str> {
        // SAFETY: home-thread field, only written at creation and reset.
        unsafe { (*self.name.get()).as_deref() }
    }

    /// Drops whatever the payload holds (closure or result).
    #[inline]
    pub(crate) fn clear_payload(&self) {
        let vt = self.vtable.get();
        let drop_fn = match self.payload.replace(Payload::Empty) {
            Payload::Empty => None,
            Payload::Closure => vt.drop_closure,
            Payload::Result => vt.drop_result,
        };
        if let Some(f) = drop_fn {
            // SAFETY: the payload state said the slot holds the value this
            // drop function was made for.
            unsafe { f(self.slot.get()) }
        }
    }

    /// Moves the result out if it is a `T`.
    pub(crate) fn take_result<T: 'static>(&self) -> Option<T> {
        if self.payload.get() != Payload::Result
            || (self.vtable.get().result_type)() != TypeId::of::<T>()
        {
            return None;
        }
        self.payload.set(Payload::Empty);
        // SAFETY: the payload holds a result whose type id is T's.
        Some(unsafe { take::<T>(self.slot.get()) })
    }

    /// Pushes `co` on this coroutine's wake-up list unless already queued.
    pub(crate) fn push_wakeup(&self, co: &Header) {
        self.wakeup.push_back(co);
    }

    /// Returns the header to the pool (or frees it) once nothing refers to
    /// it. Called after any count dropped.
    ///
    /// # Safety
    ///
    /// `h` must point to a live header and the caller must not use it after
    /// this call unless it holds a count.
    #[inline]
    pub(crate) unsafe fn maybe_recycle(h: NonNull<Header>) {
        // SAFETY: the caller guarantees h is live.
        let r = unsafe { h.as_ref() };
        if r.strong.get() != 0 || r.weak.get() != 0 || r.state.get() == State::Running {
            return;
        }
        // SAFETY: forwarded from the caller; the checks above hold.
        unsafe { Header::recycle_unreferenced(h) }
    }

    /// Recycles a header nothing on its home thread refers to.
    ///
    /// # Safety
    ///
    /// `h` must be live, with `strong == weak == 0`, not running, and not
    /// used by the caller afterwards.
    #[inline]
    pub(crate) unsafe fn recycle_unreferenced(h: NonNull<Header>) {
        // SAFETY: the caller guarantees h is live.
        let r = unsafe { h.as_ref() };
        // Nothing on this thread refers to it any more: drop what is
        // thread-bound before anything can see it from another thread. A
        // recycled header is never in a resumer's list (it is unlinked when
        // it finishes; this only guards the invariant).
        r.links.unlink();
        r.clear_payload();
        r.reset_home_fields();
        if r.remote.home_release() {
            super::pool::recycle_header(h);
        }
        // Otherwise the last remote drop frees it (`release_remote`).
    }

    /// Whether someone waits for this coroutine to finish (no move of the
    /// list).
    #[inline(always)]
    pub(crate) fn has_joiners(&self) -> bool {
        // SAFETY: home-thread field; no reference into it is live (it is
        // only touched by `take`/`set`, never borrowed across a call).
        unsafe { !(*self.joiners.as_ptr()).is_empty() }
    }

    #[inline]
    fn reset_home_fields(&self) {
        debug_assert!(self.worker.get().is_none());
        // `vtable` is left as is: it is only used while the payload is not
        // Empty, and `init` sets both.
        // SAFETY: home-thread fields, no references into them are live.
        unsafe {
            if (*self.name.get()).is_some() {
                (*self.name.get()) = None;
                (*self.overflow_msg.get()) = None;
            }
            if (*self.resumer.get()).is_some() {
                (*self.resumer.get()) = None;
            }
        }
        // The enter loop drains a coroutine's list after every switch, and
        // takes its panic, so these are empty; clear defensively all the same.
        if !self.wakeup.is_empty() {
            while self.wakeup.pop_front().is_some() {}
        }
        self.queued.set(false);
        self.cancelling.set(false);
        if self.has_joiners() {
            drop(self.joiners.take());
        }
        // SAFETY: home-thread field, no reference into it is live.
        if unsafe { (*self.panic_text.as_ptr()).is_some() } {
            drop(self.panic_text.take());
        }
        self.detached.set(false);
        self.ask_resumer.set(false);
        self.scheduled.reset();
        self.woken.reset();
    }
}

/// Takes one remote reference (any thread that already holds one, or the
/// home thread holding a strong reference).
pub(crate) fn acquire_remote(h: &Header) {
    h.remote.acquire();
}

/// Drops one remote reference; frees the header if it was the last
/// reference of all.
///
/// # Safety
///
/// The caller must own one remote reference to `h` and not use it again.
pub(crate) unsafe fn release_remote(h: NonNull<Header>) {
    // SAFETY: our remote reference keeps the header allocated.
    if unsafe { h.as_ref() }.remote.release() {
        // The home thread let go and cleared every thread-bound field
        // (`recycle_unreferenced`); only plain data and atomics remain,
        // which may be freed from any thread.
        // SAFETY: nothing else refers to the header.
        drop(unsafe { Box::from_raw(h.as_ptr()) });
    }
}
