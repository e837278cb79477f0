//! The per-thread state that a coroutine switch saves and restores.
//!
//! * The running coroutine: one const-initialised thread-local pointer
//!   without a destructor, so that reading it is a plain TLS load: cheap on
//!   every switch, and safe to read from the SIGSEGV handler.
//! * The running *loop*: the innermost event loop (an `AioContext`) whose
//!   `poll` runs on the current call chain, as an opaque pointer the loop
//!   module owns. A `poll` may run on a coroutine's stack and the coroutine
//!   may suspend inside it (a callback calls `suspend()`), so the value
//!   cannot be restored by a guard on the caller's stack: such a guard
//!   would stay on the suspended stack and later restore a value that
//!   belongs to another call chain, possibly a freed context. Instead each
//!   stack keeps its own innermost loop (`Header::own_loop` for a
//!   coroutine, `BASE_LOOP` for the thread's own stack), a guard only
//!   restores its own stack's slot, and the running loop is found by
//!   walking the call chain from the running coroutine through the
//!   coroutines that entered it (`Header::caller`, set at every switch)
//!   down to the thread's stack. The chain is exactly the set of stacks
//!   whose frames are live and blocked beneath the running code, so every
//!   pointer found that way names a live `poll` frame.

use std::cell::Cell;
use std::ptr;

use super::header::Header;

/// The running coroutine and the teardown flag share one thread-local, so
/// that `switch` computes its address once for both.
struct ThreadState {
    current: Cell<*const Header>,
    /// See `teardown.rs`.
    tearing_down: Cell<bool>,
}

thread_local! {
    static CURRENT: ThreadState = const {
        ThreadState { current: Cell::new(ptr::null()), tearing_down: Cell::new(false) }
    };
    /// The innermost running loop of the thread's own stack (outside
    /// every coroutine), or null.
    static BASE_LOOP: Cell<*const ()> = const { Cell::new(ptr::null()) };
}

/// The header of the coroutine running on this thread, or null.
#[inline]
pub(crate) fn current_ptr() -> *const Header {
    CURRENT.with(|s| s.current.get())
}

/// Sets the running coroutine; returns the previous one.
#[inline]
pub(crate) fn set_current(h: *const Header) -> *const Header {
    CURRENT.with(|s| s.current.replace(h))
}

/// As [`current_ptr`], for the signal handler: never panics.
pub(crate) fn current_ptr_signal_safe() -> *const Header {
    CURRENT.try_with(|s| s.current.get()).unwrap_or(ptr::null())
}

/// Whether this thread's teardown has begun (see `teardown.rs`).
#[inline]
pub(crate) fn tearing_down() -> bool {
    // A const thread-local without drop glue is never destroyed: `with`
    // cannot fail for it.
    CURRENT.with(|s| s.tearing_down.get())
}

/// Sets the teardown flag; returns its previous value.
pub(crate) fn set_tearing_down() -> bool {
    CURRENT.with(|s| s.tearing_down.replace(true))
}

/// The innermost running loop of the current call chain (null if none).
///
/// The pointer is valid while the caller runs: it was pushed by a `poll`
/// frame on the running stack or on one of the stacks of the call chain
/// beneath it (each blocked in a switch until this chain returns).
pub(crate) fn running_loop() -> *const () {
    let mut c = current_ptr();
    while !c.is_null() {
        // SAFETY: `c` is the running coroutine or one of its callers: each
        // is on the call chain (state Running), kept alive by the enter
        // loop that runs it, and `caller` was set when it was last entered.
        let h = unsafe { &*c };
        let own = h.own_loop.get();
        if !own.is_null() {
            return own;
        }
        c = h.caller.get();
    }
    BASE_LOOP.with(Cell::get)
}

/// Marks `lp` as the innermost running loop of the current stack. Returns
/// the token [`pop_loop`] needs; it must be called on the same stack (the
/// same coroutine, or outside coroutines) before the caller's frame ends.
#[inline]
pub(crate) fn push_loop(lp: *const ()) -> *const () {
    let cur = current_ptr();
    if cur.is_null() {
        BASE_LOOP.with(|l| l.replace(lp))
    } else {
        // SAFETY: the running coroutine's header is alive while it runs.
        unsafe { &*cur }.own_loop.replace(lp)
    }
}

/// Undoes the matching [`push_loop`] on the same stack: restores that
/// stack's previous innermost loop (an outer `poll` of the same stack, or
/// null), which is valid whenever this stack runs again.
#[inline]
pub(crate) fn pop_loop(prev: *const ()) {
    let cur = current_ptr();
    if cur.is_null() {
        BASE_LOOP.with(|l| l.set(prev));
    } else {
        // SAFETY: the running coroutine's header is alive while it runs;
        // it is the coroutine that called `push_loop` (code on a
        // coroutine's stack only runs while that coroutine is current).
        unsafe { &*cur }.own_loop.set(prev);
    }
}
