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
//!   coroutine, the thread-local itself for the thread's own stack), and
//!   [`switch`](super) saves the thread's value before resuming a
//!   coroutine and restores it when the coroutine suspends or finishes.
//!   What a `poll` on a coroutine's stack restores when it returns is that
//!   stack's own previous loop, or, if it was the outermost one there, the
//!   loop of whoever resumed the coroutine *this time* (`Header::base_loop`).

use std::cell::Cell;
use std::ptr;

use super::header::Header;

thread_local! {
    static CURRENT: Cell<*const Header> = const { Cell::new(ptr::null()) };
    /// The innermost running loop of the current call chain, or null.
    static LOOP: Cell<*const ()> = const { Cell::new(ptr::null()) };
}

/// The header of the coroutine running on this thread, or null.
#[inline]
pub(crate) fn current_ptr() -> *const Header {
    CURRENT.with(Cell::get)
}

/// Sets the running coroutine; returns the previous one.
#[inline]
pub(crate) fn set_current(h: *const Header) -> *const Header {
    CURRENT.with(|c| c.replace(h))
}

/// As [`current_ptr`], for the signal handler: never panics.
pub(crate) fn current_ptr_signal_safe() -> *const Header {
    CURRENT.try_with(Cell::get).unwrap_or(ptr::null())
}

/// Before switching into `h`: records the resumer's loop as the
/// coroutine's base and makes the coroutine's own innermost loop (if any)
/// the thread's. Returns the value to give back to [`leave_coroutine`].
#[inline(always)]
pub(crate) fn enter_coroutine(h: &Header) -> *const () {
    LOOP.with(|l| {
        let saved = l.get();
        h.base_loop.set(saved);
        let own = h.own_loop.get();
        if !own.is_null() {
            l.set(own);
        }
        saved
    })
}

/// After `h` suspended or finished: the resumer's loop again.
#[inline(always)]
pub(crate) fn leave_coroutine(saved: *const ()) {
    LOOP.with(|l| l.set(saved));
}

/// The innermost running loop of the current call chain (null if none).
///
/// The pointer is valid while the caller runs: it belongs to a `poll`
/// frame on the current stack, or to one of the stacks beneath it on the
/// call chain (blocked in a switch until this chain returns).
#[inline]
pub(crate) fn running_loop() -> *const () {
    LOOP.with(Cell::get)
}

/// Marks `lp` as the innermost running loop of the current stack. Returns
/// the token [`pop_loop`] needs; it must be called on the same stack (the
/// same coroutine, or outside coroutines) before the caller's frame ends.
#[inline]
pub(crate) fn push_loop(lp: *const ()) -> *const () {
    let cur = current_ptr();
    let prev = if cur.is_null() {
        LOOP.with(|l| l.get())
    } else {
        // SAFETY: the running coroutine's header is alive while it runs.
        unsafe { &*cur }.own_loop.replace(lp)
    };
    LOOP.with(|l| l.set(lp));
    prev
}

/// Undoes the matching [`push_loop`] on the same stack.
#[inline]
pub(crate) fn pop_loop(prev: *const ()) {
    let cur = current_ptr();
    let now = if cur.is_null() {
        prev
    } else {
        // SAFETY: the running coroutine's header is alive while it runs;
        // it is the coroutine that called `push_loop` (code on a
        // coroutine's stack only runs while that coroutine is current).
        let h = unsafe { &*cur };
        h.own_loop.set(prev);
        if prev.is_null() {
            h.base_loop.get()
        } else {
            prev
        }
    };
    LOOP.with(|l| l.set(now));
}
