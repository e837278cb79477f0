//! Async tasks and futures on an AioContext: `block_on`, `spawn`,
//! `spawn_local`, `spawn_coroutine`.
//!
//! Tasks are async-task `Runnable`s run from the context's own queues
//! during `poll`, after the coroutine queue and before fd handlers — work
//! items like BHs, not a nested executor.

use std::future::{Future, IntoFuture};
use std::mem;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Wake, Waker};

use async_task::{Runnable, Task};
use concurrent_queue::ConcurrentQueue;
use slab::Slab;

use super::{thread_serial, AioContext, Inner};
use crate::future::CoroutineFuture;

/// The context's task queues. Both take pushes from any thread (a task's
/// waker may fire anywhere); `local` holds tasks whose future must stay on
/// the home thread. `active` knows every unfinished task (as smol's
/// executor does), so that teardown reaches tasks that wait in no queue.
pub(crate) struct TaskQueues {
    send: ConcurrentQueue<Runnable>,
    local: ConcurrentQueue<Runnable>,
    active: Mutex<Active>,
}

/// Unfinished tasks: their wakers, by slab key, with an id so that a key
/// reused after a teardown is never removed by an older task.
#[derive(Default)]
struct Active {
    tasks: Slab<(u64, Waker)>,
    next_id: u64,
}

impl TaskQueues {
    pub(crate) fn new() -> TaskQueues {
        TaskQueues {
            send: ConcurrentQueue::unbounded(),
            local: ConcurrentQueue::unbounded(),
            active: Mutex::new(Active::default()),
        }
    }

    /// Wakes every unfinished task, so that a dead or dropped context's
    /// scheduler drops it (its future with it: coroutines are unwound).
    /// A waker's scheduler may drop the task's future there: each wake's
    /// panic is caught by `panics`.
    pub(crate) fn wake_all_active(&self, panics: &mut super::Panics) {
        let wakers: Vec<Waker> = {
            let mut a = self.active.lock().unwrap_or_else(|e| e.into_inner());
            a.tasks.drain().map(|(_, w)| w).collect()
        };
        for w in wakers {
            panics.catch(|| w.wake());
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.send.is_empty() && self.local.is_empty()
    }

    /// Home thread: drops every queued task (cancelling it), each future's
    /// panicking destructor caught by `panics`.
    pub(crate) fn clear(&self, panics: &mut super::Panics) {
        while let Ok(r) = self.send.pop() {
            panics.catch(|| drop(r));
        }
        while let Ok(r) = self.local.pop() {
            panics.catch(|| drop(r));
        }
    }

    /// Off the home thread, at the context's last drop: home-bound futures
    /// cannot be dropped here, so they are leaked (logged by the caller).
    pub(crate) fn forget_local(&self) -> usize {
        let mut n = 0;
        while let Ok(r) = self.local.pop() {
            mem::forget(r);
            n += 1;
        }
        n
    }
}

/// A task's future, registered in `active` while it lives.
struct Tracked<F> {
    fut: F,
    ctx: Weak<Inner>,
    key: usize,
    id: u64,
}

impl<F: Future> Future for Tracked<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // SAFETY: `fut` is structurally pinned (never moved out; `Tracked`
        // has no `Unpin` impl of its own and drops `fut` in place).
        unsafe { self.map_unchecked_mut(|t| &mut t.fut) }.poll(cx)
    }
}

impl<F> Drop for Tracked<F> {
    fn drop(&mut self) {
        if let Some(inner) = self.ctx.upgrade() {
            let mut a = inner.tasks.active.lock().unwrap_or_else(|e| e.into_inner());
            if a.tasks.get(self.key).is_some_and(|(id, _)| *id == self.id) {
                a.tasks.remove(self.key);
            }
        }
    }
}

impl AioContext {
    /// Spawns `fut` with async-task's `spawn` (any thread) or, for
    /// home-bound futures, the given unchecked spawner; registers it.
    fn spawn_tracked<F, T>(
        &self,
        fut: F,
        spawn: impl FnOnce(Tracked<F>) -> (Runnable, Task<T>),
    ) -> Task<T> {
        let q = &self.inner.tasks;
        let (runnable, task) = {
            let mut a = q.active.lock().unwrap_or_else(|e| e.into_inner());
            let id = a.next_id;
            a.next_id += 1;
            let entry = a.tasks.vacant_entry();
            let key = entry.key();
            let (runnable, task) = spawn(Tracked {
                fut,
                ctx: Arc::downgrade(&self.inner),
                key,
                id,
            });
            entry.insert((id, runnable.waker()));
            (runnable, task)
        };
        runnable.schedule();
        task
    }
}

/// Runs the tasks queued when the pass started; returns whether any ran.
/// A task's panic is kept for its `Task` handle (async-task's
/// `propagate_panic`), so it never unwinds out of `poll`.
pub(crate) fn run_tasks(ctx: &AioContext) -> bool {
    let q = &ctx.inner.tasks;
    if q.is_empty() {
        return false;
    }
    let n = q.send.len() + q.local.len();
    let mut ran = 0;
    while ran < n {
        let r = match q.local.pop() {
            Ok(r) => r,
            Err(_) => match q.send.pop() {
                Ok(r) => r,
                Err(_) => break,
            },
        };
        r.run();
        ran += 1;
    }
    ran > 0
}

/// Queues a runnable of a `Send` task; drops it (cancelling the task) if
/// the context is gone or shut down.
fn schedule_send(ctx: &Weak<Inner>, r: Runnable) {
    match ctx.upgrade() {
        Some(inner) if !inner.is_dead() => {
            let _ = inner.tasks.send.push(r);
            inner.notify();
        }
        _ => drop(r),
    }
}

/// Queues a runnable of a home-bound task. If the context is gone, the
/// future can only be dropped on its home thread; elsewhere it is leaked.
fn schedule_local(ctx: &Weak<Inner>, home: u64, r: Runnable) {
    if let Some(inner) = ctx.upgrade() {
        if !inner.is_dead() || !inner.is_home() {
            // A dead context's queues are emptied by its last drop.
            let _ = inner.tasks.local.push(r);
            inner.notify();
            return;
        }
    }
    if thread_serial() == home {
        drop(r);
    } else {
        log::warn!(
            "coroloop: a local task was woken after its AioContext was dropped; \
             its future is leaked (it cannot be dropped off its home thread)"
        );
        mem::forget(r);
    }
}

/// `block_on`'s waker: marks the future as ready to poll and kicks the
/// loop.
struct BlockOnSignal {
    fired: AtomicBool,
    ctx: Weak<Inner>,
}

impl Wake for BlockOnSignal {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.fired.store(true, Ordering::Release);
        if let Some(inner) = self.ctx.upgrade() {
            inner.notify();
        }
    }
}

/// Creates the coroutine on the home thread at the first poll, then drives
/// it as a [`CoroutineFuture`].
struct SpawnedCoroutine<F, T> {
    f: Option<F>,
    fut: Option<CoroutineFuture<T>>,
}

impl<F, T> Future for SpawnedCoroutine<F, T>
where
    F: FnOnce() -> T + 'static,
    T: 'static,
{
    type Output = T;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        // SAFETY: nothing here is structurally pinned: `f` is moved out
        // and `CoroutineFuture` is `Unpin`.
        let this = unsafe { self.get_unchecked_mut() };
        if let Some(f) = this.f.take() {
            this.fut = Some(CoroutineFuture::new(f));
        }
        let fut = this
            .fut
            .as_mut()
            .expect("SpawnedCoroutine polled after completion");
        Pin::new(fut).poll(cx)
    }
}

impl AioContext {
    /// Runs the context until `fut` completes, and returns its output.
    /// `fut`'s waker notifies the context from any thread, so `poll`
    /// returns and `fut` is polled again; in between, the context runs its
    /// BHs, coroutines, tasks, fd handlers and timers as usual.
    ///
    /// # Panics
    ///
    /// Off the home thread; and with `fut`'s panic, or the panic of a
    /// callback `poll` ran (as [`poll`](Self::poll) reports them).
    ///
    /// # Examples
    ///
    /// ```
    /// use coroloop::aio::AioContext;
    ///
    /// let ctx = AioContext::new()?;
    /// let (tx, rx) = async_channel::bounded(1);
    /// std::thread::spawn(move || tx.send_blocking(7).unwrap());
    /// assert_eq!(ctx.block_on(rx.recv()), Ok(7));
    /// # std::io::Result::Ok(())
    /// ```
    #[track_caller]
    pub fn block_on<F: IntoFuture>(&self, fut: F) -> F::Output {
        self.inner.assert_home("AioContext::block_on");
        let signal = Arc::new(BlockOnSignal {
            fired: AtomicBool::new(true),
            ctx: Arc::downgrade(&self.inner),
        });
        let waker = Waker::from(signal.clone());
        let mut cx = Context::from_waker(&waker);
        let mut fut = pin!(fut.into_future());
        loop {
            if signal.fired.swap(false, Ordering::Acquire) {
                if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
                    return v;
                }
                // Woken during poll: run one non-blocking pass, then poll
                // again (a self-waking future yields to the context).
                if signal.fired.load(Ordering::Acquire) {
                    self.poll(false);
                    continue;
                }
            }
            self.poll(true);
        }
    }

    /// Spawns a `Send` future as a task of this context, from any thread.
    /// It runs on the home thread as one of the context's work items
    /// (interleaved with BHs, coroutines, fd handlers and timers). The
    /// [`Task`] handle is a future of its output (awaitable from any
    /// thread or executor); dropping it cancels the task,
    /// [`Task::detach`] lets it run to the end. A panic in the task is
    /// re-raised where the `Task` is awaited; the context stays usable.
    /// Tasks still queued when the context shuts down are cancelled.
    ///
    /// # Examples
    ///
    /// ```
    /// use coroloop::aio::AioContext;
    ///
    /// let ctx = AioContext::new()?;
    /// let task = ctx.spawn(async { 1 + 2 });
    /// assert_eq!(ctx.block_on(task), 3);
    /// # std::io::Result::Ok(())
    /// ```
    pub fn spawn<F>(&self, fut: F) -> Task<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let weak = Arc::downgrade(&self.inner);
        self.spawn_tracked(fut, move |fut| {
            async_task::Builder::new()
                .propagate_panic(true)
                .spawn(move |_| fut, move |r| schedule_send(&weak, r))
        })
    }

    /// Spawns a future that need not be `Send` (it stays on the home
    /// thread), as [`spawn`](Self::spawn) otherwise.
    ///
    /// # Panics
    ///
    /// Off the home thread.
    ///
    /// # Examples
    ///
    /// ```
    /// use coroloop::aio::AioContext;
    /// use std::rc::Rc;
    ///
    /// let ctx = AioContext::new()?;
    /// let shared = Rc::new(5);
    /// let s = shared.clone();
    /// let task = ctx.spawn_local(async move { *s * 2 });
    /// assert_eq!(ctx.block_on(task), 10);
    /// # std::io::Result::Ok(())
    /// ```
    #[track_caller]
    pub fn spawn_local<F>(&self, fut: F) -> Task<F::Output>
    where
        F: Future + 'static,
        F::Output: 'static,
    {
        self.inner.assert_home("AioContext::spawn_local");
        let weak = Arc::downgrade(&self.inner);
        let home = thread_serial();
        self.spawn_tracked(fut, move |fut| {
            async_task::Builder::new()
                .propagate_panic(true)
                .spawn_local(move |_| fut, move |r| schedule_local(&weak, home, r))
        })
    }

    /// Runs `f` in a new coroutine on this context's home thread, from any
    /// thread. The coroutine is created there when the task first runs,
    /// driven as a [`CoroutineFuture`] (its timers, fd waits and thread
    /// pool are this context's). The [`Task`] is a future of `f`'s result:
    /// dropping it cancels the coroutine (unwinding it if it had started),
    /// [`Task::detach`] lets it run to the end; `f`'s panic is re-raised
    /// where the `Task` is awaited.
    ///
    /// # Examples
    ///
    /// ```
    /// use coroloop::{aio::IoThread, coroutine};
    /// use std::time::Duration;
    ///
    /// let io = IoThread::spawn("worker")?;
    /// let task = io.context().spawn_coroutine(|| {
    ///     coroutine::sleep(Duration::from_millis(1)); // on the IoThread
    ///     std::thread::current().name().map(String::from)
    /// });
    /// assert_eq!(smol::block_on(task).as_deref(), Some("worker"));
    /// # std::io::Result::Ok(())
    /// ```
    pub fn spawn_coroutine<F, T>(&self, f: F) -> Task<T>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let weak = Arc::downgrade(&self.inner);
        let home = self.inner.home_serial();
        let fut = SpawnedCoroutine {
            f: Some(f),
            fut: None,
        };
        // SAFETY: `fut` is `Send` until first polled (it then holds a
        // `!Send` coroutine). It is only polled by `run_tasks`, on the home
        // thread. It is dropped by `run_tasks` or `TaskQueues::clear` on
        // the home thread, or by `schedule_local`, which drops it only on
        // the home thread and leaks it elsewhere; `Inner::drop` off the
        // home thread leaks the local queue. Before its first poll
        // dropping it anywhere only drops `f: Send`.
        self.spawn_tracked(fut, move |fut| unsafe {
            async_task::Builder::new()
                .propagate_panic(true)
                .spawn_unchecked(move |_| fut, move |r| schedule_local(&weak, home, r))
        })
    }
}
