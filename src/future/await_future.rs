//! `await_future`: a Rust future awaited inside a coroutine.

use std::cell::Cell;
use std::future::{Future, IntoFuture};
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use crate::coroutine::{self, Coroutine, Erased, RemoteCoroutine};

/// The waker `await_future` hands to the future: it records that the
/// future asked to be polled (the wait's own grant state) and queues the
/// coroutine on its resumer.
struct Signal {
    fired: AtomicBool,
    co: RemoteCoroutine,
}

impl Wake for Signal {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // Release: what the waking side published is visible to the poll
        // that follows (pairs with the Acquire swap below).
        self.fired.store(true, Ordering::Release);
        self.co.wake();
    }
}

thread_local! {
    /// The signal of the last `await_future` that ended with no waker
    /// clone outstanding: reused by the next one for the same coroutine,
    /// so awaiting costs no allocation and no reference counting.
    static SPARE: Spare = const {
        Spare { _teardown: crate::coroutine::TeardownOnDrop, signal: Cell::new(None) }
    };
}

/// The spare signal; its destruction begins the thread's teardown (see
/// `coroutine/teardown.rs`).
struct Spare {
    /// First: fields drop in order, so the teardown begins before the
    /// rest goes (see `coroutine/teardown.rs`).
    _teardown: crate::coroutine::TeardownOnDrop,
    signal: Cell<Option<Arc<Signal>>>,
}

/// A signal for the current coroutine `me`: the spare one if it is
/// unshared and for `me`, else a new one.
#[track_caller]
fn signal_for(me: &Coroutine<Erased>) -> Arc<Signal> {
    if let Some(mut s) = SPARE.try_with(|s| s.signal.take()).ok().flatten() {
        if s.co.is_for(me) {
            if let Some(sig) = Arc::get_mut(&mut s) {
                // Unshared: no old waker can set it any more.
                *sig.fired.get_mut() = false;
                return s;
            }
        }
    }
    let remote = me.remote();
    if !remote.has_resumer() {
        panic!(
            "await_future: this coroutine has no resumer (create it where an AioContext \
             exists, or inside a CoroutineFuture), so its waker could not resume it"
        );
    }
    Arc::new(Signal {
        fired: AtomicBool::new(false),
        co: remote,
    })
}

/// Offers the signal for reuse when `await_future` ends (normally or by
/// unwinding), if the future kept no clone of its waker.
struct Recycle(Arc<Signal>);

impl Drop for Recycle {
    fn drop(&mut self) {
        if Arc::strong_count(&self.0) == 1 {
            let s = self.0.clone();
            // Replacing the spare drops the older one: fine, it is unshared.
            // (During the thread's teardown the spare is gone: just drop.)
            let _ = SPARE.try_with(|c| c.signal.set(Some(s)));
        }
    }
}

/// Awaits `fut` inside a coroutine: polls it with a waker that queues this
/// coroutine on its resumer (its AioContext, or the
/// [`CoroutineFuture`](super::CoroutineFuture) that drives it), suspends
/// while it is pending, and polls it again only after that waker fired
/// (QEMU's Rust bindings do the same with `aio_co_wake`).
///
/// Wakes from any thread, from inside `poll` (`wake_by_ref` before
/// returning `Pending`), duplicate and stale wakes are all fine: the waker
/// never enters the coroutine itself, a wake that comes before the
/// coroutine suspends is kept, and resumptions that are not this future's
/// wake (a `remote().wake()`, an old waker) do not poll it again.
///
/// In the coroutine a [`CoroutineFuture`](super::CoroutineFuture) wraps,
/// while that future's `poll` runs it, the future is polled with the
/// executor's own waker instead, exactly as an `.await` in an async block
/// would be: its wake goes straight to the executor, and each poll
/// of the `CoroutineFuture` that enters the coroutine polls it again
/// (spurious polls included, which every future tolerates). Resumptions
/// from anywhere else (entered by hand, from another coroutine outside
/// that poll) do not poll it.
///
/// The future is polled on the coroutine's thread, outside any other
/// runtime: futures that need a runtime's reactor need that runtime on
/// this thread. Tokio's timers and sockets (`tokio::time::sleep`,
/// `tokio::net`) panic on an [`IoThread`](crate::aio::IoThread) ("there is
/// no reactor running"); use [`coroutine::sleep`](crate::coroutine::sleep)
/// and [`net`](crate::net) there, or smol's `Timer` and `Async`, which
/// bring their own reactor. Channels and locks (tokio's included) need
/// none.
///
/// # Panics
///
/// Outside a coroutine (use [`AioContext::block_on`] there), or in a
/// coroutine that nothing drives (created where no AioContext existed and
/// not inside a `CoroutineFuture`): its waker would have nowhere to go.
/// A panic of `fut` propagates to the caller.
///
/// [`AioContext::block_on`]: crate::aio::AioContext::block_on
///
/// # Examples
///
/// ```
/// use coroloop::{aio::AioContext, future::await_future, Coroutine};
/// use std::time::Duration;
///
/// let ctx = AioContext::new()?;
/// let co = Coroutine::new(|| {
///     // Sequential code waiting on async code (a smol timer here).
///     await_future(smol::Timer::after(Duration::from_millis(5)));
///     "slept"
/// });
/// co.enter();
/// ctx.poll_while(|| !co.is_finished());
/// assert_eq!(co.take_result(), Some("slept"));
/// # std::io::Result::Ok(())
/// ```
#[track_caller]
pub fn await_future<F: IntoFuture>(fut: F) -> F::Output {
    // The main coroutine of a `CoroutineFuture`, entered by its poll, polls
    // the future with the executor's own waker (see `Direct`).
    let fut = match super::coroutine_future::await_direct(fut.into_future()) {
        Ok(v) => return v,
        Err(fut) => fut,
    };
    let Some(me) = Coroutine::current() else {
        panic!("await_future called outside a coroutine (use AioContext::block_on there)");
    };
    // Declared before the waker, so dropped after it.
    let signal = Recycle(signal_for(&me));
    drop(me);
    let waker = Waker::from(signal.0.clone());
    let mut cx = Context::from_waker(&waker);
    let mut fut = pin!(fut);
    loop {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
        // Always suspend at least once, even if the future woke itself
        // during poll: the wake queued us, so the resumer runs other work
        // first (a self-waking future is a yield, not a spin).
        loop {
            coroutine::suspend();
            if signal.0.fired.swap(false, Ordering::Acquire) {
                break;
            }
        }
    }
}
