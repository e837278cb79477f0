//! `CoSleep`: a sleep another party can cut short (QEMU's `QemuCoSleep`).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use super::waitq::{wake_current_coroutine, Waiter};
use crate::aio::ClockType;
use crate::loom::sync::Mutex;

/// A place where one coroutine sleeps until [`wake`](CoSleep::wake) is
/// called (from any thread) or its timeout passes (QEMU's `QemuCoSleep`
/// with `qemu_co_sleep_ns_wakeable` / `qemu_co_sleep_wake`). Stray wakes of
/// the sleeping coroutine do not end the sleep.
///
/// # Examples
///
/// ```
/// use coroloop::{aio::{AioContext, ClockType}, sync::CoSleep, Coroutine};
/// use std::{sync::Arc, time::Duration};
///
/// let ctx = AioContext::new()?;
/// let s = Arc::new(CoSleep::new());
/// let s2 = s.clone();
/// let co = Coroutine::new(move || s2.sleep_for(ClockType::Realtime, Duration::from_secs(60)));
/// co.enter();
/// assert!(s.wake()); // cut short
/// ctx.poll_while(|| !co.is_finished());
/// assert_eq!(co.take_result(), Some(true));
/// # std::io::Result::Ok(())
/// ```
#[doc(alias = "QemuCoSleep")]
#[derive(Default)]
pub struct CoSleep {
    sleeper: Mutex<Option<Arc<Waiter>>>,
}

impl CoSleep {
    /// Nobody sleeps yet.
    pub fn new() -> CoSleep {
        CoSleep {
            sleeper: Mutex::new(None),
        }
    }

    fn register(&self, api: &'static str) -> Arc<Waiter> {
        let w = Waiter::new(false, wake_current_coroutine(api));
        let mut s = self.sleeper.lock().unwrap_or_else(|e| e.into_inner());
        assert!(
            s.is_none(),
            "{api}: another coroutine already sleeps on this CoSleep"
        );
        *s = Some(w.clone());
        w
    }

    fn unregister(&self, w: &Arc<Waiter>) {
        let mut s = self.sleeper.lock().unwrap_or_else(|e| e.into_inner());
        if s.as_ref().is_some_and(|x| Arc::ptr_eq(x, w)) {
            *s = None;
        }
    }

    /// Sleeps until [`wake`](Self::wake).
    ///
    /// # Panics
    ///
    /// Outside a coroutine, or if another coroutine already sleeps here.
    #[track_caller]
    pub fn sleep(&self) {
        let w = self.register("CoSleep::sleep");
        let _g = Unregister(self, w.clone());
        while !w.is_granted() {
            crate::coroutine::suspend();
        }
    }

    /// Sleeps until [`wake`](Self::wake) or until `d` passed on `clock`
    /// (a timer on the coroutine's context); returns `true` if woken early
    /// (QEMU's `qemu_co_sleep_ns_wakeable`).
    ///
    /// # Panics
    ///
    /// Outside a coroutine, in one without an AioContext, or if another
    /// coroutine already sleeps here.
    #[doc(alias = "qemu_co_sleep_ns_wakeable")]
    #[track_caller]
    pub fn sleep_for(&self, clock: ClockType, d: Duration) -> bool {
        let Some(me) = crate::Coroutine::current() else {
            panic!("CoSleep::sleep_for called outside a coroutine");
        };
        let Some(ctx) = me.aio_context().map(|c| c.internal()) else {
            panic!("CoSleep::sleep_for: the coroutine has no AioContext for its timer");
        };
        // A handle held across the sleep would keep the coroutine alive
        // (it could never be unwound by its owner).
        drop(me);
        let w = self.register("CoSleep::sleep_for");
        let _g = Unregister(self, w.clone());
        let timed_out = std::rc::Rc::new(std::cell::Cell::new(false));
        let (t, w2) = (timed_out.clone(), w.clone());
        // Dropped unrun by the context's shutdown: wakes the sleeper (no
        // grant), which then finds the context dead.
        let on_drop = WakeOnDrop(w.clone());
        let timer = ctx.timer_new(clock, move || {
            let _ = &on_drop;
            if !w2.is_granted() {
                t.set(true);
                w2.grant().wake();
            }
        });
        timer.mod_after(d);
        while !w.is_granted() {
            if ctx.inner.is_dead() {
                // Only `wake()` could end it now; a coroutine of a
                // shut-down context is cancelled instead of waiting on.
                crate::coroutine::cancel_current();
            }
            crate::coroutine::suspend();
        }
        !timed_out.get()
    }
}

/// Wakes a sleeper (without a grant) when dropped.
struct WakeOnDrop(std::sync::Arc<super::waitq::Waiter>);

impl Drop for WakeOnDrop {
    fn drop(&mut self) {
        self.0.wake();
    }
}

impl CoSleep {
    /// Wakes the sleeping coroutine, if any; returns whether one slept
    /// (QEMU's `qemu_co_sleep_wake`). Any thread.
    #[doc(alias = "qemu_co_sleep_wake")]
    pub fn wake(&self) -> bool {
        let w = self
            .sleeper
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        match w {
            Some(w) if !w.is_granted() => {
                w.grant().wake();
                true
            }
            _ => false,
        }
    }
}

struct Unregister<'a>(&'a CoSleep, Arc<Waiter>);

impl Drop for Unregister<'_> {
    fn drop(&mut self) {
        self.0.unregister(&self.1);
    }
}

impl fmt::Debug for CoSleep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sleeping = self
            .sleeper
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some();
        f.debug_struct("CoSleep")
            .field("sleeping", &sleeping)
            .finish()
    }
}
