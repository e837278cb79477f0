//! Thread teardown: whether this thread's thread-local destructors have
//! started running coroloop's own.
//!
//! A suspended coroutine's stack may borrow thread-locals (a
//! `LocalKey::with` closure that suspends). At thread exit std destroys
//! thread-locals in reverse order of first use, so by the time some later
//! destructor drops the last handle of such a coroutine, what its stack
//! borrows may already be freed: unwinding it would run its destructors on
//! freed memory. Once teardown has begun, a dropped suspended coroutine is
//! therefore leaked with a log line instead of unwound, and the file
//! engines submit nothing more (see `aio/file`).
//!
//! The flag is a const-initialised `Cell` without a destructor: it can be
//! read and set at any point of the thread's exit, before or after any
//! other thread-local is destroyed. It is set by the first of coroloop's
//! thread-local destructors to run (the coroutine pool's, registered when
//! the thread first creates a coroutine, and the file engines', registered
//! when a context of the thread first sets up io_uring or Linux AIO).
//!
//! # The order that cannot be closed
//!
//! A user thread-local first used *after* coroloop's destructor was
//! registered is destroyed *before* that destructor runs, so no flag can
//! be set in time for it: a coroutine suspended inside that thread-local's
//! `with` and dropped by an even earlier-destroyed... later-registered
//! destructor is unwound on freed memory. A library cannot observe that
//! the thread is exiting before its own destructor runs; hence the rule in
//! the crate docs: never hold a thread-local borrow across a suspension.

use std::cell::Cell;

thread_local! {
    static TEARING_DOWN: Cell<bool> = const { Cell::new(false) };
}

/// Whether this thread's teardown has begun (one of coroloop's
/// thread-local destructors has run).
#[inline]
pub(crate) fn thread_tearing_down() -> bool {
    // A const `Cell` without drop glue is never destroyed; `try_with`
    // cannot fail for it, but stay on the safe side if it did.
    TEARING_DOWN.try_with(Cell::get).unwrap_or(true)
}

/// Records that this thread's teardown has begun.
pub(crate) fn begin_thread_teardown() {
    let _ = TEARING_DOWN.try_with(|t| t.set(true));
}
