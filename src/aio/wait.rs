//! `poll_while` registrations and `wait_kick` (QEMU's `AIO_WAIT_WHILE` /
//! `aio_wait_kick`).

use std::sync::{Mutex, Weak};

use super::{AioContext, Inner};

/// Contexts currently inside `poll_while`.
static WAITING: Mutex<Vec<(usize, Weak<Inner>)>> = Mutex::new(Vec::new());

pub(crate) struct Waiting(usize);

impl Waiting {
    pub(crate) fn register(ctx: &AioContext) -> Waiting {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let id = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        WAITING
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((id, std::sync::Arc::downgrade(&ctx.inner)));
        Waiting(id)
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        let mut w = WAITING.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = w.iter().position(|(id, _)| *id == self.0) {
            w.swap_remove(i);
        }
    }
}

/// Wakes every context blocked in [`AioContext::poll_while`], so each
/// re-checks its condition (QEMU's `aio_wait_kick`). Call it after changing
/// state another thread's `poll_while` waits on, when no BH or wake for that
/// context is involved. Any thread.
///
/// # Examples
///
/// ```
/// use coroloop::aio::{wait_kick, AioContext};
/// use std::sync::{atomic::{AtomicBool, Ordering}, Arc};
///
/// let ctx = AioContext::new()?;
/// let flag = Arc::new(AtomicBool::new(false));
/// let f = flag.clone();
/// let t = std::thread::spawn(move || {
///     std::thread::sleep(std::time::Duration::from_millis(10));
///     f.store(true, Ordering::Release);
///     wait_kick();
/// });
/// ctx.poll_while(|| !flag.load(Ordering::Acquire));
/// t.join().unwrap();
/// # std::io::Result::Ok(())
/// ```
#[doc(alias = "aio_wait_kick")]
pub fn wait_kick() {
    let w = WAITING.lock().unwrap_or_else(|e| e.into_inner());
    for (_, inner) in w.iter() {
        if let Some(inner) = inner.upgrade() {
            inner.notify();
        }
    }
}
