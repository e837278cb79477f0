//! The resumer abstraction: what enters a coroutine that was woken or
//! scheduled from anywhere.
//!
//! The coroutine core knows resumers only through the [`Resumer`] trait.
//! The event loop (`aio`) implements it for its contexts and plugs itself
//! in with [`set_default_resumer_hook`], through which a coroutine created
//! outside any coroutine finds its thread's context; the future bridge
//! (`future`) implements it for `CoroutineFuture`. This module, like the
//! rest of `coroutine/`, never names the loop (ARCHITECTURE.md,
//! "Layering").

use std::any::Any;
use std::sync::{Arc, OnceLock};

use super::registry::CoList;
use super::{Coroutine, Erased, RemoteRef};

/// Why a coroutine is queued on its resumer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CoReqKind {
    /// `co_schedule` / `RemoteCoroutine::schedule` / `yield_now`: the
    /// `scheduled` flag is set until the driver dequeues it.
    Schedule,
    /// A wake (waker, remote wake): the `woken` flag is set until the
    /// driver dequeues it.
    Wake,
}

/// The driver that enters a coroutine queued from anywhere: an AioContext
/// (or, with the future bridges, a `CoroutineFuture`). Fixed at creation
/// and inherited by coroutines created inside.
pub(crate) trait Resumer: Send + Sync {
    /// Queue the coroutine on this driver and wake it. Any thread.
    fn queue(&self, co: RemoteRef, kind: CoReqKind);
    /// The event loop behind this resumer, type-erased (the loop downcasts
    /// it to its own context type), if it is one and it still exists.
    fn event_loop(&self) -> Option<Arc<dyn Any + Send + Sync>> {
        None
    }
    /// A detached coroutine (owned by this resumer) finished: release it.
    /// Called on the home thread from the enter loop.
    fn detached_finished(&self, _addr: usize) {}
    /// The coroutines this resumer resumes (home thread only).
    fn coroutines(&self) -> Option<&CoList> {
        None
    }
    /// Takes ownership of a suspended coroutine whose last handle went
    /// (ARCHITECTURE.md, "Who owns a coroutine", item 1), or gives it back
    /// if this resumer has ended. Home thread only.
    fn adopt(&self, co: Coroutine<Erased>) -> Result<(), Coroutine<Erased>> {
        Err(co)
    }
    /// Whether a wake on the home thread may enter the coroutine at once
    /// (or through a wake-up list) instead of queueing it here. Asked only
    /// for headers with `ask_resumer` set.
    fn admits_direct_entry(&self) -> bool {
        true
    }
}

/// The resumer of a coroutine created outside any coroutine on this
/// thread, and its list of coroutines (valid while the resumer lives).
pub(crate) type DefaultResumer = fn() -> Option<(Arc<dyn Resumer>, *const CoList)>;

/// Registered by the event loop when it creates its first context: before
/// that no context exists, so coroutines are bare.
static DEFAULT_RESUMER: OnceLock<DefaultResumer> = OnceLock::new();

/// Plugs the event loop in: `f` names the resumer of coroutines created
/// outside any coroutine (once per process; later calls are ignored).
pub(crate) fn set_default_resumer_hook(f: DefaultResumer) {
    let _ = DEFAULT_RESUMER.set(f);
}

/// The resumer a coroutine created outside any coroutine gets, if any.
#[inline]
pub(super) fn default_resumer() -> Option<(Arc<dyn Resumer>, *const CoList)> {
    DEFAULT_RESUMER.get().and_then(|f| f())
}
