//! The running coroutine of each thread.
//!
//! One const-initialised thread-local pointer without a destructor, so that
//! reading it is a plain TLS load: cheap on every switch, and safe to read
//! from the SIGSEGV handler.

use std::cell::Cell;
use std::ptr;

use super::header::Header;

thread_local! {
    static CURRENT: Cell<*const Header> = const { Cell::new(ptr::null()) };
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
