//! The context's thread pool (QEMU's `thread-pool.c`): run blocking work
//! on worker threads and get the result back on the context.
//!
//! Workers are started on demand, up to 64 (QEMU's default
//! `thread-pool-max`), and exit after 10 s idle. We write our own rather
//! than use the `blocking` crate because completions must come back to
//! *this* context (a per-context pool, as QEMU's), and `blocking` is a
//! process-wide pool with its own futures-based completion.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::Duration;

use super::Inner;
use crate::coroutine::{self, Coroutine};

type Job = Box<dyn FnOnce() + Send>;

const MAX_WORKERS: usize = 64;
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

struct State {
    jobs: VecDeque<Job>,
    workers: usize,
    idle: usize,
}

struct Shared {
    state: Mutex<State>,
    cv: Condvar,
    max: usize,
    completed: AtomicUsize,
}

/// A context's pool of worker threads (QEMU's `ThreadPool`). Get it with
/// [`AioContext::thread_pool`](super::AioContext::thread_pool).
pub struct ThreadPool {
    ctx: Weak<Inner>,
    shared: Arc<Shared>,
}

impl ThreadPool {
    pub(crate) fn new(ctx: Weak<Inner>) -> ThreadPool {
        ThreadPool {
            ctx,
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    jobs: VecDeque::new(),
                    workers: 0,
                    idle: 0,
                }),
                cv: Condvar::new(),
                max: MAX_WORKERS,
                completed: AtomicUsize::new(0),
            }),
        }
    }

    fn push(&self, job: Job) {
        let mut st = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        st.jobs.push_back(job);
        if st.idle > 0 {
            // Notify after unlocking: the woken worker must not block on
            // the mutex we still hold.
            drop(st);
            self.shared.cv.notify_one();
            return;
        }
        if st.workers < self.shared.max {
            st.workers += 1;
            drop(st);
            let shared = self.shared.clone();
            let spawned = std::thread::Builder::new()
                .name("coroloop-pool".into())
                .spawn(move || worker(shared));
            if let Err(e) = spawned {
                log::error!("coroloop: ThreadPool: cannot start a worker: {e}");
                let mut st = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
                st.workers -= 1;
                if st.workers == 0 {
                    // Run it on the caller rather than never.
                    let job = st.jobs.pop_front();
                    drop(st);
                    if let Some(job) = job {
                        job();
                    }
                }
            }
        }
    }

    /// Runs `f` on a worker thread, then `done(result)` on the context's
    /// home thread during its `poll` (QEMU's `thread_pool_submit_aio`).
    /// Callable from any thread. If the context is gone by then, `done`
    /// is dropped without being called. If `f` panics, the panic is caught
    /// and logged on the worker and `done` is dropped without being called
    /// (return a `Result` from `f`, or use [`submit_co`](Self::submit_co),
    /// which re-raises the panic in the coroutine, when the caller must
    /// know).
    #[doc(alias = "thread_pool_submit_aio")]
    #[doc(alias = "thread_pool_submit")]
    pub fn submit<F, T, D>(&self, f: F, done: D)
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
        D: FnOnce(T) + Send + 'static,
    {
        let ctx = self.ctx.clone();
        let shared = Arc::downgrade(&self.shared);
        self.push(Box::new(move || {
            let r = f();
            if let Some(s) = shared.upgrade() {
                s.completed.fetch_add(1, Ordering::Relaxed);
            }
            if let Some(inner) = ctx.upgrade() {
                super::bh::schedule_oneshot_internal(&inner, move || done(r));
            }
        }));
    }

    /// Runs `f` on a worker thread while the current coroutine waits, and
    /// returns its result (QEMU's `thread_pool_submit_co`). The coroutine is
    /// resumed on its home thread; other wakes meanwhile do not end the wait.
    /// If the coroutine is unwound while waiting, `f` still runs to the end
    /// and its result is dropped.
    ///
    /// # Panics
    ///
    /// Outside a coroutine, or in one without an AioContext to resume it;
    /// and with `f`'s panic, resumed in the coroutine.
    #[doc(alias = "thread_pool_submit_co")]
    #[track_caller]
    pub fn submit_co<F, T>(&self, f: F) -> T
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let Some(me) = Coroutine::current() else {
            panic!("ThreadPool::submit_co called outside a coroutine");
        };
        if me.aio_context().is_none() {
            panic!("ThreadPool::submit_co: the coroutine has no AioContext to resume it");
        }
        let remote = me.remote();
        drop(me);
        let slot: Arc<Mutex<Option<std::thread::Result<T>>>> = Arc::new(Mutex::new(None));
        let s = slot.clone();
        let shared = Arc::downgrade(&self.shared);
        self.push(Box::new(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
            *s.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
            if let Some(s) = shared.upgrade() {
                s.completed.fetch_add(1, Ordering::Relaxed);
            }
            remote.wake();
        }));
        loop {
            let r = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
            match r {
                Some(Ok(v)) => return v,
                Some(Err(p)) => std::panic::resume_unwind(p),
                None => coroutine::suspend(),
            }
        }
    }

    /// Worker threads currently alive.
    pub fn workers(&self) -> usize {
        self.shared
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .workers
    }

    /// Jobs that have finished running on a worker so far.
    pub fn completed(&self) -> usize {
        self.shared.completed.load(Ordering::Relaxed)
    }

    /// The most workers the pool starts (64).
    pub fn max_workers(&self) -> usize {
        self.shared.max
    }
}

fn worker(shared: Arc<Shared>) {
    let mut st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        if let Some(job) = st.jobs.pop_front() {
            drop(st);
            // A panicking job must not kill the worker's bookkeeping.
            if let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)) {
                let msg = p
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "<non-string panic>".into());
                log::error!(
                    "coroloop: ThreadPool: a job panicked ({msg}); its completion callback is \
                     dropped without being called"
                );
            }
            st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
            continue;
        }
        st.idle += 1;
        let (g, t) = shared
            .cv
            .wait_timeout(st, IDLE_TIMEOUT)
            .unwrap_or_else(|e| e.into_inner());
        st = g;
        st.idle -= 1;
        if t.timed_out() && st.jobs.is_empty() {
            st.workers -= 1;
            return;
        }
    }
}

impl fmt::Debug for ThreadPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ThreadPool")
            .field("workers", &self.workers())
            .field("completed", &self.completed())
            .finish()
    }
}
