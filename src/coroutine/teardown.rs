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
//! thread-local destructors to run: *every* thread-local of the crate that
//! has a destructor calls [`begin_thread_teardown`] from it (the coroutine
//! pool, the file engines' registry, the default context, fd waits, the
//! `await_future` spare signal, the alternate signal stack). So while the
//! flag is clear, all of them are alive, and the code that unwinds or
//! resumes coroutines may use them. Setting the flag also runs the loop's
//! teardown hook (cancel and reap the thread's file requests) at that
//! earliest point. After it:
//!
//! * a suspended coroutine that is dropped is leaked with a log line
//!   instead of unwound;
//! * a suspended coroutine is no longer resumed (`enter`, a wake, a poll):
//!   its stack may borrow destroyed thread-locals; it stays suspended and
//!   the attempt is logged;
//! * the file engines submit nothing.
//!
//! # The order that cannot be closed
//!
//! A user thread-local first used *after* every coroloop thread-local is
//! destroyed *before* any of their destructors runs, so the flag is not
//! yet set while it is destroyed, nor while any destructor that runs
//! between the two. A coroutine suspended inside that thread-local's
//! `with`, whose last handle such a destructor drops (or which it
//! resumes), still runs on the freed thread-local. A library cannot
//! observe that the thread is exiting before its own destructor runs;
//! hence the rule in the crate docs: never hold a thread-local borrow
//! across a suspension. IoThreads set the flag before their thread
//! function returns, which closes this order there.

use std::sync::OnceLock;

use super::current;

/// What the event loop does when a thread's teardown begins (cancel and
/// reap the file requests of the thread's contexts); registered by `aio`,
/// so that this module does not depend on it.
static HOOK: OnceLock<fn()> = OnceLock::new();

/// Registers the loop's teardown hook (once per process).
pub(crate) fn set_thread_teardown_hook(f: fn()) {
    let _ = HOOK.set(f);
}

/// Whether this thread's teardown has begun (one of coroloop's
/// thread-local destructors has run).
#[inline]
pub(crate) fn thread_tearing_down() -> bool {
    current::tearing_down()
}

/// Records that this thread's teardown has begun and, the first time,
/// runs the loop's teardown hook. Called from the destructor of every
/// coroloop thread-local that has one, and by an IoThread before its
/// thread function returns.
pub(crate) fn begin_thread_teardown() {
    if !current::set_tearing_down() {
        if let Some(hook) = HOOK.get() {
            hook();
        }
    }
}

/// A marker to embed in a coroloop thread-local that has a destructor: its
/// drop begins the thread's teardown (see the module docs).
pub(crate) struct TeardownOnDrop;

impl Drop for TeardownOnDrop {
    fn drop(&mut self) {
        begin_thread_teardown();
    }
}
