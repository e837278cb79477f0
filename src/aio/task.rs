//! Async tasks and futures on an AioContext: `block_on`, `spawn`,
//! `spawn_local`, `spawn_coroutine`.
//!
//! Tasks are async-task `Runnable`s run from the context's own queues
//! during `poll`, after the coroutine queue and before fd handlers — work
//! items like BHs, not a nested executor.
//!
//! # Shutdown
//!
//! No task outlives its context's shutdown and none is spawned after it,
//! so that no `Task` handle waits for what nothing will run:
//!
//! * A spawn registers its task in `active` with the lock held and the
//!   context found alive; once `dead` is set, a spawn is refused: the task
//!   is made and its runnable dropped at once, so its handle resolves as
//!   cancelled.
//! * The schedule functions queue a runnable even on a shut-down context;
//!   they never drop one (see `schedule_send` for why).
//! * `shutdown` sets `dead`, then wakes every registered task and empties
//!   the queues until no registered task is left but the ones running on
//!   its own call chain (the wake made those scheduled: they are queued
//!   again when their `run` returns, and `run_tasks` drops them). A task
//!   another thread is scheduling at that moment (it won the `SCHEDULED`
//!   bit, so the shutdown's wake did nothing) reaches a queue a moment
//!   later, and the shutdown waits for it there.
//!
//! Before, a `spawn_coroutine` from another thread onto a shut-down
//! context pushed its task to the local queue, which nothing ran or
//! emptied until the context's last handle went: its `Task` never
//! resolved.

use std::future::{Future, IntoFuture};
use std::mem;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Wake, Waker};

use async_task::Runnable;
use concurrent_queue::ConcurrentQueue;
use slab::Slab;

use super::task_handle::Task;
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
    /// Tasks running on the home thread's call chain (nested polls can
    /// run one inside another). Written by the home thread only.
    running: AtomicUsize,
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
            running: AtomicUsize::new(0),
        }
    }

    /// Wakes every unfinished task: a shut-down context's scheduler queues
    /// it for `clear`, a dropped context's scheduler drops it there (its
    /// future with it: coroutines are unwound); each wake's panic is
    /// caught by `panics`. Entries stay until their task's future is
    /// dropped (`Tracked::drop`).
    pub(crate) fn wake_all_active(&self, panics: &mut super::Panics) {
        let wakers: Vec<Waker> = {
            let a = self.active.lock().unwrap_or_else(|e| e.into_inner());
            a.tasks.iter().map(|(_, (_, w))| w.clone()).collect()
        };
        for w in wakers {
            panics.catch(|| w.wake());
        }
    }

    /// Home thread, `dead` already set (by `AioContext::shutdown`): drops
    /// every task of the context but the ones running on this call chain
    /// (see the module docs, "Shutdown"), each destructor's panic caught by
    /// `panics`. Waits for a task that another thread is scheduling at
    /// this moment to reach a queue.
    pub(crate) fn shut_down(&self, panics: &mut super::Panics) {
        loop {
            self.clear(panics);
            self.wake_all_active(panics);
            self.clear(panics);
            let left = self
                .active
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .tasks
                .len();
            if left <= self.running.load(Ordering::Relaxed) {
                return;
            }
            // Another thread holds a runnable between async-task's
            // `SCHEDULED` bit and its push: a few instructions away.
            std::thread::yield_now();
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.send.is_empty() && self.local.is_empty()
    }

    /// Tasks whose future is still alive (queued or waiting).
    pub(crate) fn live(&self) -> usize {
        self.active
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .tasks
            .len()
    }

    /// Home thread: drops every queued task (cancelling it), each future's
    /// panicking destructor caught by `panics`, until both queues are empty
    /// (a destructor may wake, and so queue, another task).
    pub(crate) fn clear(&self, panics: &mut super::Panics) {
        loop {
            let r = match self.local.pop() {
                Ok(r) => r,
                Err(_) => match self.send.pop() {
                    Ok(r) => r,
                    Err(_) => return,
                },
            };
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
    /// home-bound futures, the given unchecked spawner; registers it. On a
    /// shut-down context the task is not registered and its runnable is
    /// dropped at once (dropping `fut`, on the calling thread: the
    /// spawners only allow that where it is sound), so the returned handle
    /// is resolved, as cancelled.
    fn spawn_tracked<F, T>(
        &self,
        fut: F,
        spawn: impl FnOnce(Tracked<F>) -> (Runnable, async_task::Task<T>),
    ) -> Task<T> {
        let q = &self.inner.tasks;
        let mut a = q.active.lock().unwrap_or_else(|e| e.into_inner());
        // Checked under the lock that `shutdown`'s last look at `active`
        // takes: a task registered here is one that shutdown waits for.
        if self.inner.is_dead() {
            drop(a);
            let (runnable, task) = spawn(Tracked {
                fut,
                ctx: Weak::new(),
                key: usize::MAX,
                id: u64::MAX,
            });
            drop(runnable);
            return Task::new(task);
        }
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
        drop(a);
        runnable.schedule();
        Task::new(task)
    }
}

/// Counts a task as running on the home thread's call chain until dropped.
struct Running<'a>(&'a AtomicUsize);

impl<'a> Running<'a> {
    fn enter(n: &'a AtomicUsize) -> Running<'a> {
        // Home thread only: a load and a store, no read-modify-write.
        n.store(n.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        Running(n)
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        let n = self.0;
        n.store(n.load(Ordering::Relaxed) - 1, Ordering::Relaxed);
    }
}

/// Runs the tasks queued when the pass started; returns whether any ran.
/// A task's panic is kept for its `Task` handle (async-task's
/// `propagate_panic`), so it never unwinds out of `poll`. Once a task run
/// here shut the context down, the queues are emptied instead (the tasks
/// the shutdown found running were queued again when their `run`
/// returned); a destructor's panic then unwinds out of `poll`.
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
        {
            let _running = Running::enter(&q.running);
            r.run();
        }
        ran += 1;
        if ctx.inner.is_dead() {
            // `shut_down` again, not only `clear`: this task no longer
            // counts as running, so the wait covers every other task.
            let mut panics = super::Panics::new("AioContext::poll");
            q.shut_down(&mut panics);
            panics.finish();
            break;
        }
    }
    ran > 0
}

/// Queues a runnable of a `Send` task; drops it (cancelling the task) if
/// the context is gone.
///
/// A shut-down context's runnable is queued all the same, never dropped
/// here: a schedule function runs inside `Waker::wake`, which may be
/// called under a lock that the future's destructor takes again
/// (event-listener wakes its listeners under its mutex, and a dropped
/// `Recv` takes it: a self-deadlock, seen when a shutdown unwound one
/// coroutine whose dropped listener woke another task). The queues of a
/// shut-down context are emptied at points where no lock is held: the
/// shutdown under way (`TaskQueues::shut_down` waits for every task it has
/// not dropped yet) and `run_tasks` after a task that shut it down.
fn schedule_send(ctx: &Weak<Inner>, r: Runnable) {
    match ctx.upgrade() {
        Some(inner) => {
            let _ = inner.tasks.send.push(r);
            inner.notify();
        }
        None => drop(r),
    }
}

/// Queues a runnable of a home-bound task (on a shut-down context too: see
/// `schedule_send`). If the context is gone, the future can only be
/// dropped on its home thread; elsewhere it is leaked.
fn schedule_local(ctx: &Weak<Inner>, home: u64, r: Runnable) {
    if let Some(inner) = ctx.upgrade() {
        let _ = inner.tasks.local.push(r);
        if thread_serial() == home {
            // The loop runs on this thread: it sees the queue when this
            // returns, unless an outer loop prepared to sleep (no fence
            // needed for our own thread's loop).
            inner.notify_home();
        } else {
            inner.notify();
        }
        return;
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
                // The future runs as part of this context's loop: inside
                // it, `AioContext::current()` is this context (a
                // `CoroutineFuture` first polled here takes its timers and
                // fd waits here; with the thread's default context, which
                // nothing polls meanwhile, they would never fire).
                let polled = {
                    let _running = super::RunningGuard::enter(&self.inner);
                    fut.as_mut().poll(&mut cx)
                };
                if let Poll::Ready(v) = polled {
                    return v;
                }
                // Woken during poll: run one non-blocking pass, then poll
                // again (a self-waking future yields to the context).
                if signal.fired.load(Ordering::Acquire) {
                    self.poll(false);
                    continue;
                }
            }
            self.poll_impl(true, true);
        }
    }

    /// Spawns a `Send` future as a task of this context, from any thread.
    /// It runs on the home thread as one of the context's work items
    /// (interleaved with BHs, coroutines, fd handlers and timers). The
    /// [`Task`] handle is a future of its output (awaitable from any
    /// thread or executor); dropping it cancels the task,
    /// [`Task::detach`] lets it run to the end. A panic in the task is
    /// re-raised where the `Task` is awaited; the context stays usable.
    ///
    /// # Shutdown
    ///
    /// A task not finished when the context shuts down is cancelled (its
    /// future dropped on the home thread). On a context already shut down,
    /// `spawn` runs nothing and returns a handle that is resolved at once,
    /// from any thread. Either way, awaiting the [`Task`] panics with "the
    /// AioContext shut down before the task finished", and awaiting
    /// [`task.fallible()`](Task::fallible) gives `None`: use it where the
    /// context may shut down first.
    ///
    /// # Examples
    ///
    /// ```
    /// use coroloop::aio::AioContext;
    ///
    /// let ctx = AioContext::new()?;
    /// let task = ctx.spawn(async { 1 + 2 });
    /// assert_eq!(ctx.block_on(task), 3);
    ///
    /// // `fallible` tells a shut-down context from an output:
    /// let task = ctx.spawn(async { 4 });
    /// assert_eq!(ctx.block_on(task.fallible()), Some(4));
    /// ctx.shutdown();
    /// assert_eq!(ctx.block_on(ctx.spawn(async { 5 }).fallible()), None);
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
    /// # Shutdown
    ///
    /// As [`spawn`](Self::spawn)'s: a task not finished at the shutdown is
    /// cancelled, and on a context already shut down the handle is
    /// resolved at once; awaiting the [`Task`] then panics ("the
    /// AioContext shut down before the task finished"), awaiting
    /// [`task.fallible()`](Task::fallible) gives `None`.
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
    ///
    /// ctx.shutdown();
    /// let task = ctx.spawn_local(async move { *shared });
    /// assert_eq!(ctx.block_on(task.fallible()), None, "refused: shut down");
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
    /// # Shutdown
    ///
    /// A coroutine not finished when the context shuts down (an
    /// [`IoThread`](super::IoThread) stopped, say) is unwound on the home
    /// thread. On a context already shut down, `spawn_coroutine` creates
    /// nothing, drops `f` and returns a handle that is resolved at once,
    /// from any thread. Either way, awaiting the [`Task`] panics with "the
    /// AioContext shut down before the task finished", and awaiting
    /// [`task.fallible()`](Task::fallible) gives `None`: use it where the
    /// context may shut down first.
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
    ///
    /// // Once the IoThread is stopped, `fallible` gives `None` at once.
    /// let long = io.context().spawn_coroutine(|| coroutine::sleep(Duration::from_secs(3600)));
    /// io.stop();
    /// assert_eq!(smol::block_on(long.fallible()), None, "unwound by the stop");
    /// let late = io.context().spawn_coroutine(|| 1);
    /// assert_eq!(smol::block_on(late.fallible()), None, "refused: stopped");
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
        // dropping it anywhere only drops `f: Send`: `spawn_tracked` does
        // that, on the calling thread, when the context is shut down.
        self.spawn_tracked(fut, move |fut| unsafe {
            async_task::Builder::new()
                .propagate_panic(true)
                .spawn_unchecked(move |_| fut, move |r| schedule_local(&weak, home, r))
        })
    }
}
