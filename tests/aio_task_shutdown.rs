//! Tasks and their context's shutdown (ARCHITECTURE.md, "Who owns a coroutine":
//! "spawning onto one fails at once"; issue 22, points 3 and 4).
//!
//! * Spawning (`spawn`, `spawn_local`, `spawn_coroutine`) on a context that
//!   is shut down runs nothing, drops the future (or closure) at once and
//!   returns a `Task` that is already resolved, from any thread.
//! * A task that had not finished when its context shut down (an
//!   `IoThread` stopped) is cancelled, and its handle resolves.
//! * Either way, awaiting the `Task` panics with a message that says so and
//!   names `fallible()`, and `task.fallible()` gives `None`.
//!
//! Every wait here is bounded by a watchdog: before, awaiting a
//! `spawn_coroutine` made from another thread on a stopped `IoThread`
//! never returned.

use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use coroloop::aio::{AioContext, IoThread, Task};
use coroloop::coroutine;
use coroloop::future::{await_future, CoroutineFuture};

mod common;
use common::{on_fresh_thread, panic_message};

/// The panic of a `Task` awaited after its context shut down.
const SHUT_DOWN: &str = "coroloop Task: the AioContext shut down before the task finished \
                         (await `task.fallible()` to get `None` instead)";

/// Counts its drops.
#[derive(Clone, Default)]
struct Drops(Arc<AtomicUsize>);

struct Counted(Arc<AtomicUsize>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_add(1, SeqCst);
    }
}

impl Drops {
    fn counted(&self) -> Counted {
        Counted(self.0.clone())
    }

    fn get(&self) -> usize {
        self.0.load(SeqCst)
    }
}

/// Issue 22, point 3: `io.stop(); block_on(ctx.spawn_coroutine(..))` from
/// another thread never returned. Now each kind of spawn on a stopped
/// IoThread's context, from another thread, is resolved at once.
#[test]
fn spawning_on_a_stopped_iothread_from_another_thread_resolves_at_once() {
    let io = IoThread::spawn("task-stopped").unwrap();
    let ctx = io.context().clone();
    io.stop();
    on_fresh_thread(move || {
        let drops = Drops::default();
        let ran = Arc::new(AtomicUsize::new(0));

        let (c, r) = (drops.counted(), ran.clone());
        let t = ctx.spawn_coroutine(move || {
            let _c = c;
            r.fetch_add(1, SeqCst);
            1
        });
        assert!(t.is_finished(), "resolved at once");
        assert_eq!(drops.get(), 1, "the closure was dropped at once");
        assert_eq!(panic_message(|| smol::block_on(t)), SHUT_DOWN);

        let (c, r) = (drops.counted(), ran.clone());
        let t = ctx.spawn_coroutine(move || {
            let _c = c;
            r.fetch_add(1, SeqCst);
            2
        });
        assert_eq!(smol::block_on(t.fallible()), None);

        let (c, r) = (drops.counted(), ran.clone());
        let t = ctx.spawn(async move {
            let _c = c;
            r.fetch_add(1, SeqCst);
            3
        });
        assert!(t.is_finished(), "resolved at once");
        assert_eq!(panic_message(|| smol::block_on(t)), SHUT_DOWN);

        let (c, r) = (drops.counted(), ran.clone());
        let t = ctx.spawn(async move {
            let _c = c;
            r.fetch_add(1, SeqCst);
            4
        });
        assert_eq!(smol::block_on(t.fallible()), None);

        // `cancel` and `detach` on a refused task return at once too.
        let t = ctx.spawn_coroutine(|| 5);
        assert_eq!(smol::block_on(t.cancel()), None);
        ctx.spawn(async {}).detach();
        ctx.spawn_coroutine(|| ()).detach();

        // `spawn_local` belongs to the home thread (gone here).
        assert_eq!(
            panic_message(|| ctx.spawn_local(async { 6 })),
            "`AioContext::spawn_local` called off the context's home thread"
        );

        assert_eq!(drops.get(), 4, "every future or closure was dropped");
        assert_eq!(ran.load(SeqCst), 0, "nothing ran");
    });
}

/// The same on the home thread of a context shut down by hand, for the
/// three kinds, `block_on` included.
#[test]
fn spawning_on_a_shut_down_context_at_home_resolves_at_once() {
    on_fresh_thread(|| {
        let ctx = AioContext::new().unwrap();
        ctx.shutdown();
        let drops = Drops::default();

        let c = Rc::new(drops.counted());
        let t = ctx.spawn_local(async move {
            let _c = c;
            1
        });
        assert!(t.is_finished());
        assert_eq!(drops.get(), 1, "the future was dropped at once");
        assert_eq!(panic_message(|| ctx.block_on(t)), SHUT_DOWN);
        let t = ctx.spawn_local(async { 2 });
        assert_eq!(ctx.block_on(t.fallible()), None);

        let c = drops.counted();
        let t = ctx.spawn(async move {
            let _c = c;
            3
        });
        assert_eq!(drops.get(), 2);
        assert_eq!(panic_message(|| ctx.block_on(t)), SHUT_DOWN);
        assert_eq!(ctx.block_on(ctx.spawn(async { 4 }).fallible()), None);

        let c = drops.counted();
        let t = ctx.spawn_coroutine(move || {
            let _c = c;
            5
        });
        assert_eq!(drops.get(), 3);
        assert_eq!(panic_message(|| ctx.block_on(t)), SHUT_DOWN);
        assert_eq!(ctx.block_on(ctx.spawn_coroutine(|| 6).fallible()), None);
        assert!(!ctx.poll(false), "nothing was queued");
    });
}

/// Issue 22, point 4: a task still pending when its IoThread stops is
/// cancelled (its future dropped, its coroutine unwound, on the IoThread);
/// its `Task` then panics with the shutdown message, not async-task's
/// "Task polled after completion", and its fallible form gives `None`.
#[test]
fn a_task_pending_when_its_iothread_stops_resolves_as_shut_down() {
    for fallible in [false, true] {
        let io = IoThread::spawn("task-pending").unwrap();
        let ctx = io.context().clone();
        let drops = Drops::default();
        let (started_tx, started) = mpsc::channel::<&'static str>();

        let (c, s) = (drops.counted(), started_tx.clone());
        let t_send: Task<u32> = ctx.spawn(async move {
            let _c = c;
            s.send("spawn").unwrap();
            std::future::pending::<()>().await;
            1
        });
        let (c, s) = (drops.counted(), started_tx.clone());
        let t_co: Task<u32> = ctx.spawn_coroutine(move || {
            let _c = c;
            s.send("spawn_coroutine").unwrap();
            coroutine::sleep(Duration::from_secs(3600));
            2
        });
        // spawn_local from the IoThread itself; the Task comes back here.
        let (task_tx, task_rx) = mpsc::channel::<Task<u32>>();
        let (c, s, ctx2) = (drops.counted(), started_tx.clone(), ctx.clone());
        ctx.bh_schedule_oneshot(move || {
            let c = Rc::new(c);
            let t = ctx2.spawn_local(CoroutineFuture::new(move || {
                let _c = c;
                s.send("spawn_local").unwrap();
                await_future(std::future::pending::<()>());
                3
            }));
            task_tx.send(t).unwrap();
        });
        let t_local = task_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        let mut names: Vec<_> = (0..3)
            .map(|_| started.recv_timeout(Duration::from_secs(10)).unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["spawn", "spawn_coroutine", "spawn_local"]);
        assert_eq!(drops.get(), 0);
        assert!(!t_send.is_finished() && !t_co.is_finished() && !t_local.is_finished());

        io.stop();
        assert_eq!(drops.get(), 3, "the stop dropped every pending task");
        on_fresh_thread(move || {
            for t in [t_send, t_co, t_local] {
                assert!(t.is_finished());
                if fallible {
                    assert_eq!(smol::block_on(t.fallible()), None);
                } else {
                    assert_eq!(panic_message(|| smol::block_on(t)), SHUT_DOWN);
                }
            }
        });
    }
}

/// A task awaited by a waiter that sleeps in `block_on` on another thread
/// when the IoThread stops: the waiter is woken and sees the shutdown.
#[test]
fn a_waiter_blocked_on_a_task_is_woken_by_the_stop() {
    let io = IoThread::spawn("task-waiter").unwrap();
    let (started_tx, started) = mpsc::channel();
    let t = io.context().spawn_coroutine(move || {
        started_tx.send(()).unwrap();
        coroutine::sleep(Duration::from_secs(3600));
    });
    let (t2_started_tx, t2_started) = mpsc::channel();
    let t2 = io.context().spawn(async move {
        t2_started_tx.send(()).unwrap();
        std::future::pending::<u8>().await
    });
    started.recv_timeout(Duration::from_secs(10)).unwrap();
    t2_started.recv_timeout(Duration::from_secs(10)).unwrap();
    let (msg_tx, msg) = mpsc::channel();
    let waiter = std::thread::spawn(move || {
        msg_tx.send(panic_message(|| smol::block_on(t))).unwrap();
    });
    let fallible_waiter = std::thread::spawn(move || smol::block_on(t2.fallible()));
    std::thread::sleep(Duration::from_millis(20)); // both are waiting
    io.stop();
    assert_eq!(
        msg.recv_timeout(Duration::from_secs(10)).unwrap(),
        SHUT_DOWN
    );
    waiter.join().unwrap();
    assert_eq!(
        on_fresh_thread(move || fallible_waiter.join().unwrap()),
        None
    );
}

/// Spawns and wakes from other threads while the IoThread stops: every
/// task either ran or was cancelled, and every handle resolves (the
/// shutdown waits for a task that another thread is scheduling at that
/// moment instead of leaving it in a queue nothing runs).
#[test]
fn spawns_and_wakes_racing_with_the_stop_all_resolve() {
    for round in 0..20 {
        let io = IoThread::spawn("task-race").unwrap();
        let ctx = io.context().clone();
        let drops = Drops::default();
        let (wake_tx, wake_rx) = async_channel::unbounded::<()>();
        let spawners: Vec<_> = (0..3)
            .map(|k| {
                let (ctx, drops, wake_rx) = (ctx.clone(), drops.clone(), wake_rx.clone());
                std::thread::spawn(move || {
                    let mut tasks = Vec::new();
                    for i in 0..100u32 {
                        let c = drops.counted();
                        let rx = wake_rx.clone();
                        let t = match (k + i) % 3 {
                            0 => ctx.spawn_coroutine(move || {
                                let _c = c;
                                let _ = await_future(rx.recv());
                                i
                            }),
                            1 => ctx.spawn(async move {
                                let _c = c;
                                let _ = rx.recv().await;
                                i
                            }),
                            _ => ctx.spawn_coroutine(move || {
                                let _c = c;
                                coroutine::yield_now();
                                i
                            }),
                        };
                        tasks.push(t);
                    }
                    tasks
                })
            })
            .collect();
        let wake_tx2 = wake_tx.clone(); // `wake_tx` outlives the stop: no wake by closing
        let waker = std::thread::spawn(move || {
            let wake_tx = wake_tx2;
            for _ in 0..150 {
                let _ = wake_tx.send_blocking(());
                std::thread::yield_now();
            }
        });
        std::thread::sleep(Duration::from_micros(200 * (round % 5)));
        io.stop();
        let tasks: Vec<Task<u32>> = spawners
            .into_iter()
            .flat_map(|s| s.join().unwrap())
            .collect();
        waker.join().unwrap();
        drop(wake_tx);
        let n = tasks.len();
        let (done, cancelled) = on_fresh_thread(move || {
            let mut done = 0;
            let mut cancelled = 0;
            for t in tasks {
                match smol::block_on(t.fallible()) {
                    Some(_) => done += 1,
                    None => cancelled += 1,
                }
            }
            (done, cancelled)
        });
        assert_eq!(done + cancelled, n);
        assert_eq!(drops.get(), n, "round {round}: every future was dropped");
    }
}

/// Awaiting a `Task` again after it gave its output is a misuse of its
/// own: the message does not blame a shutdown.
#[test]
fn polling_a_task_after_its_output_names_that_misuse() {
    let ctx = AioContext::new().unwrap();
    let mut t = ctx.spawn(async { 7 });
    assert!(ctx.poll(false));
    let poll_once = |t: &mut Task<i32>| smol::block_on(smol::future::poll_once(t));
    assert_eq!(poll_once(&mut t), Some(7));
    assert_eq!(
        panic_message(|| poll_once(&mut t)),
        "coroloop Task polled after it returned its output"
    );
}

/// A panic inside the task is still re-raised through `fallible()` (the
/// shutdown case is the only one that gives `None`).
#[test]
fn fallible_still_reraises_the_task_panic() {
    let ctx = AioContext::new().unwrap();
    let t = ctx.spawn_coroutine(|| -> u32 { panic!("boom in a fallible task") });
    assert_eq!(
        panic_message(|| ctx.block_on(t.fallible())),
        "boom in a fallible task"
    );
    let t = ctx.spawn(async { panic!("boom in a fallible send task") });
    assert!(ctx.poll(false));
    assert_eq!(
        panic_message(|| ctx.block_on(t.fallible())),
        "boom in a fallible send task"
    );
}
