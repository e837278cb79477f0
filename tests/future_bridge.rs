//! The bridges between coroutines and Rust futures (issue: "Bridges with
//! Rust futures, and smol interop").

mod common;

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use common::panic_message;
use coroloop::aio::{AioContext, ClockType, IoThread};
use coroloop::coroutine::{self, Coroutine};
use coroloop::future::{await_future, CoroutineFuture};
use coroloop::sync::{CoMutex, CoQueue};

/// A future that is pending until `fire` is called from anywhere, counting
/// its polls.
#[derive(Clone, Default)]
struct Gate(Arc<Mutex<(bool, Option<Waker>, usize)>>);

impl Gate {
    fn fire(&self) {
        let w = {
            let mut g = self.0.lock().unwrap();
            g.0 = true;
            g.1.take()
        };
        if let Some(w) = w {
            w.wake();
        }
    }
    fn polls(&self) -> usize {
        self.0.lock().unwrap().2
    }
    fn wait(&self) -> GateWait {
        GateWait(self.clone())
    }
}

struct GateWait(Gate);

impl Future for GateWait {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut g = (self.0).0.lock().unwrap();
        g.2 += 1;
        if g.0 {
            Poll::Ready(())
        } else {
            g.1 = Some(cx.waker().clone());
            Poll::Pending
        }
    }
}

// ---- CoroutineFuture on foreign executors ----

fn body() -> u32 {
    let mut sum = 0;
    for i in 0..10 {
        coroutine::yield_now();
        sum += await_future(async move { i });
    }
    sum
}

#[test]
fn coroutine_future_on_smol_local_executor() {
    let ex = smol::LocalExecutor::new();
    let t = ex.spawn(CoroutineFuture::new(body));
    assert_eq!(smol::block_on(ex.run(t)), 45);
}

#[test]
fn coroutine_future_on_tokio_local_set() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let local = tokio::task::LocalSet::new();
    let v = local.block_on(&rt, async {
        tokio::task::spawn_local(CoroutineFuture::new(body))
            .await
            .unwrap()
    });
    assert_eq!(v, 45);
}

#[test]
fn coroutine_future_on_plain_block_on() {
    assert_eq!(smol::block_on(CoroutineFuture::new(body)), 45);
}

// Two coroutines awaiting 30 ms smol timers under one LocalExecutor run
// concurrently: the second starts waiting before the first is done.
#[test]
fn two_coroutines_sleep_concurrently_under_one_executor() {
    let ex = smol::LocalExecutor::new();
    let spans = Rc::new(RefCell::new(Vec::new()));
    let tasks: Vec<_> = (0..2)
        .map(|_| {
            let spans = spans.clone();
            ex.spawn(CoroutineFuture::new(move || {
                let start = Instant::now();
                await_future(smol::Timer::after(Duration::from_millis(30)));
                spans.borrow_mut().push((start, Instant::now()));
            }))
        })
        .collect();
    let t0 = Instant::now();
    smol::block_on(ex.run(async {
        for t in tasks {
            t.await;
        }
    }));
    let elapsed = t0.elapsed();
    let spans = spans.borrow();
    assert_eq!(spans.len(), 2);
    let (a, b) = (spans[0], spans[1]);
    // Both waits overlap: each started before the other ended.
    assert!(
        a.0 < b.1 && b.0 < a.1,
        "sequential, not concurrent: {spans:?}"
    );
    assert!(a.1 - a.0 >= Duration::from_millis(30));
    assert!(elapsed >= Duration::from_millis(30));
}

// Dropping a pending CoroutineFuture unwinds its coroutine: destructors run.
#[test]
fn dropping_a_pending_coroutine_future_runs_destructors() {
    struct Flag(Rc<Cell<u32>>);
    impl Drop for Flag {
        fn drop(&mut self) {
            self.0.set(self.0.get() + 1);
        }
    }
    let dropped = Rc::new(Cell::new(0));
    let d = dropped.clone();
    let gate = Gate::default();
    let g = gate.clone();
    let mut fut = Box::pin(CoroutineFuture::new(move || {
        let _f = Flag(d);
        await_future(g.wait());
        unreachable!("the gate never opens");
    }));
    let waker = Waker::from(Arc::new(NoopWake));
    assert!(fut
        .as_mut()
        .poll(&mut Context::from_waker(&waker))
        .is_pending());
    assert_eq!(dropped.get(), 0);
    drop(fut);
    assert_eq!(dropped.get(), 1);
    gate.fire(); // a late wake of the unwound coroutine does nothing
}

struct NoopWake;
impl std::task::Wake for NoopWake {
    fn wake(self: Arc<Self>) {}
}

/// Counts wakes of the task polling a future.
struct CountWake(AtomicUsize);
impl std::task::Wake for CountWake {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

// Wakes from other coroutines (CoQueue), from wakers and from other threads
// queue the coroutine and wake the task; polling enters it.
#[test]
fn coroutine_future_is_woken_by_queue_waker_and_threads() {
    let q = Rc::new(CoQueue::new());
    let q1 = q.clone();
    let (tx, rx) = mpsc::channel::<Waker>();
    let mut fut = Box::pin(CoroutineFuture::new(move || {
        // 1: woken by another coroutine of the same future (CoQueue).
        let q2 = q1.clone();
        let helper = Coroutine::new(move || {
            coroutine::yield_now();
            q2.next();
        });
        helper.enter();
        q1.wait_unlocked();
        // 2: woken from another thread through the coroutine's waker.
        tx.send(Coroutine::current().unwrap().waker()).unwrap();
        coroutine::suspend();
        7
    }));
    let counter = Arc::new(CountWake(AtomicUsize::new(0)));
    let waker = Waker::from(counter.clone());
    let mut cx = Context::from_waker(&waker);
    let mut polls = 0;
    let v = loop {
        polls += 1;
        assert!(polls < 100, "no progress");
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            break v;
        }
        if let Ok(w) = rx.try_recv() {
            std::thread::spawn(move || w.wake()).join().unwrap();
        }
        assert!(
            counter.0.swap(0, Ordering::Relaxed) > 0,
            "pending without a wake: it would hang"
        );
    };
    assert_eq!(v, 7);
    assert!(q.is_empty());
}

// ---- await_future ----

#[test]
fn await_future_outside_a_coroutine_panics() {
    let msg = panic_message(|| await_future(async {}));
    assert_eq!(
        msg,
        "await_future called outside a coroutine (use AioContext::block_on there)"
    );
}

// 100,000 values from another thread through an async channel, awaited in
// a coroutine on an AioContext: exact count and order.
#[test]
fn await_future_woken_from_another_thread_100k_times() {
    const N: u64 = 100_000;
    let ctx = AioContext::new().unwrap();
    let (tx, rx) = async_channel::bounded::<u64>(16);
    let producer = std::thread::spawn(move || {
        for i in 0..N {
            tx.send_blocking(i).unwrap();
        }
    });
    let co = Coroutine::new(move || {
        let mut next = 0;
        while let Ok(v) = await_future(rx.recv()) {
            assert_eq!(v, next, "out of order");
            next += 1;
        }
        next
    });
    co.enter();
    ctx.poll_while(|| !co.is_finished());
    producer.join().unwrap();
    assert_eq!(co.take_result(), Some(N));
}

// A future that wakes itself inside poll is polled again after the
// coroutine yields (no lost wake, no spin); stray wakes do not re-poll.
#[test]
fn await_future_self_wake_and_stray_wakes() {
    struct SelfWake(u32, Rc<Cell<u32>>);
    impl Future for SelfWake {
        type Output = ();
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.1.set(self.1.get() + 1);
            if self.0 == 0 {
                return Poll::Ready(());
            }
            self.0 -= 1;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }
    let ctx = AioContext::new().unwrap();
    let polls = Rc::new(Cell::new(0));
    let p = polls.clone();
    let co = Coroutine::new(move || await_future(SelfWake(5, p)));
    co.enter();
    assert_eq!(polls.get(), 1, "the first poll is inline");
    assert!(!co.is_finished(), "a self-wake yields to the context first");
    ctx.poll_while(|| !co.is_finished());
    assert_eq!(polls.get(), 6);

    // Stray wakes: the gate future is polled once per real wake only.
    let gate = Gate::default();
    let g = gate.clone();
    let co = Coroutine::new(move || await_future(g.wait()));
    co.enter();
    assert_eq!(gate.polls(), 1);
    let remote = co.remote();
    for _ in 0..10 {
        remote.wake();
        co.waker().wake();
        ctx.poll(false);
    }
    assert_eq!(gate.polls(), 1, "stray wakes re-polled the future");
    assert!(!co.is_finished());
    let g2 = gate.clone();
    std::thread::spawn(move || g2.fire()).join().unwrap();
    ctx.poll_while(|| !co.is_finished());
    assert_eq!(gate.polls(), 2);
}

// smol types used directly inside coroutines on an AioContext.
#[test]
fn smol_types_inside_coroutines() {
    let ctx = AioContext::new().unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        std::io::Write::write_all(&mut s, b"hello").unwrap();
    });
    let co = Coroutine::new(move || {
        let t = Instant::now();
        await_future(smol::Timer::after(Duration::from_millis(5)));
        assert!(t.elapsed() >= Duration::from_millis(5));
        let mut stream = await_future(smol::net::TcpStream::connect(addr)).unwrap();
        let mut buf = Vec::new();
        await_future(smol::io::AsyncReadExt::read_to_end(&mut stream, &mut buf)).unwrap();
        buf
    });
    co.enter();
    ctx.poll_while(|| !co.is_finished());
    server.join().unwrap();
    assert_eq!(co.take_result().unwrap(), b"hello");
}

// ---- block_on ----

#[test]
fn block_on_completes_from_bh_timer_and_thread() {
    let ctx = AioContext::new().unwrap();
    // From a BH.
    let gate = Gate::default();
    let g = gate.clone();
    ctx.bh_schedule_oneshot(move || g.fire());
    ctx.block_on(gate.wait());
    // From a timer on the virtual clock, advanced by another BH.
    let gate = Gate::default();
    let g = gate.clone();
    let timer = ctx.timer_new(ClockType::Virtual, move || g.fire());
    timer.mod_ns(1_000);
    let c2 = ctx.clone();
    ctx.bh_schedule_oneshot(move || c2.advance_virtual_clock(2_000));
    ctx.block_on(gate.wait());
    // From another thread.
    let gate = Gate::default();
    let g = gate.clone();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(5));
        g.fire();
    });
    ctx.block_on(gate.wait());
    t.join().unwrap();
    assert_eq!(ctx.block_on(async { 5 }), 5);
}

#[test]
fn block_on_off_the_home_thread_panics() {
    let ctx = AioContext::new().unwrap();
    let msg = std::thread::scope(|s| {
        s.spawn(|| panic_message(|| ctx.block_on(async {})))
            .join()
            .unwrap()
    });
    assert_eq!(
        msg,
        "`AioContext::block_on` called off the context's home thread"
    );
}

// ---- tasks ----

#[test]
fn spawn_and_spawn_local_1000_tasks() {
    let ctx = AioContext::new().unwrap();
    let local: Vec<_> = (0..1000u64)
        .map(|i| {
            let r = Rc::new(i);
            ctx.spawn_local(async move { *r * 2 })
        })
        .collect();
    // `spawn` from other threads.
    let c2 = ctx.clone();
    let remote: Vec<_> = std::thread::spawn(move || {
        (0..1000u64)
            .map(|i| {
                c2.spawn(async move {
                    smol::future::yield_now().await;
                    i * 3
                })
            })
            .collect::<Vec<_>>()
    })
    .join()
    .unwrap();
    let sum = ctx.block_on(async {
        let mut sum = 0;
        for t in local {
            sum += t.await;
        }
        for t in remote {
            sum += t.await;
        }
        sum
    });
    assert_eq!(sum, 999 * 1000 / 2 * 5);
}

#[test]
fn tasks_interleave_with_bhs() {
    let ctx = AioContext::new().unwrap();
    let order = Rc::new(RefCell::new(Vec::new()));
    let o = order.clone();
    let task = ctx.spawn_local(async move {
        for i in 0..3 {
            o.borrow_mut().push(format!("task{i}"));
            smol::future::yield_now().await;
        }
    });
    let bh_order = order.clone();
    let bh = ctx.bh_new_local(move || bh_order.borrow_mut().push("bh".into()));
    for _ in 0..3 {
        bh.schedule();
        ctx.poll(false);
    }
    ctx.block_on(task);
    let order = order.borrow();
    assert_eq!(order.iter().filter(|s| *s == "bh").count(), 3);
    // Neither starves the other: the BH ran between task steps.
    let first_bh = order.iter().position(|s| s == "bh").unwrap();
    let last_task = order.iter().rposition(|s| s.starts_with("task")).unwrap();
    assert!(first_bh < last_task, "{order:?}");
}

#[test]
fn dropping_a_task_cancels_it_and_detach_lets_it_run() {
    let ctx = AioContext::new().unwrap();
    let gate = Gate::default();
    let g = gate.clone();
    let finished = Rc::new(Cell::new(false));
    let f = finished.clone();
    let t = ctx.spawn_local(async move {
        g.wait().await;
        f.set(true);
    });
    ctx.poll(false);
    drop(t);
    gate.fire();
    while ctx.poll(false) {}
    assert!(!finished.get(), "a dropped task was resumed");

    let f = finished.clone();
    ctx.spawn_local(async move {
        smol::future::yield_now().await;
        f.set(true);
    })
    .detach();
    ctx.poll_while(|| !finished.get());
}

#[test]
fn spawn_coroutine_from_a_smol_task_on_another_thread() {
    let io = IoThread::spawn("co-home").unwrap();
    let ctx = io.context().clone();
    let v = std::thread::spawn(move || {
        smol::block_on(async move {
            let task = ctx.spawn_coroutine(|| {
                coroutine::sleep(Duration::from_millis(2));
                let m = CoMutex::new(20);
                *m.lock() += 1;
                let x = *m.lock() * 2;
                (x, std::thread::current().name().map(String::from))
            });
            task.await
        })
    })
    .join()
    .unwrap();
    assert_eq!(v, (42, Some("co-home".to_string())));
    io.stop();
}

#[test]
fn spawn_coroutine_dropped_unwinds_and_detached_runs() {
    struct Flag(Arc<AtomicUsize>);
    impl Drop for Flag {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    let io = IoThread::spawn("co-cancel").unwrap();
    let dropped = Arc::new(AtomicUsize::new(0));
    let started = Arc::new(AtomicUsize::new(0));
    let (d, s) = (dropped.clone(), started.clone());
    let task = io.context().spawn_coroutine(move || {
        let _f = Flag(d);
        s.store(1, Ordering::SeqCst);
        loop {
            coroutine::sleep(Duration::from_millis(1));
        }
    });
    let t0 = Instant::now();
    while started.load(Ordering::SeqCst) == 0 {
        assert!(t0.elapsed() < Duration::from_secs(10));
        std::thread::yield_now();
    }
    drop(task);
    while dropped.load(Ordering::SeqCst) == 0 {
        assert!(t0.elapsed() < Duration::from_secs(10), "not unwound");
        std::thread::sleep(Duration::from_millis(1));
    }
    let (tx, rx) = mpsc::channel();
    io.context()
        .spawn_coroutine(move || {
            coroutine::sleep(Duration::from_millis(1));
            tx.send(5).unwrap();
        })
        .detach();
    assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), 5);
    io.stop();
}

// ---- panics across each bridge ----

#[test]
fn panics_cross_every_bridge() {
    // CoroutineFuture: from poll.
    let msg = panic_message(|| smol::block_on(CoroutineFuture::new(|| panic!("in coroutine"))));
    assert_eq!(msg, "in coroutine");
    // await_future: the future's panic unwinds the coroutine, then enter.
    let ctx = AioContext::new().unwrap();
    let co = Coroutine::new(|| {
        await_future(async {
            smol::future::yield_now().await;
            panic!("in awaited future")
        })
    });
    co.enter();
    let msg = panic_message(|| ctx.poll_while(|| !co.is_finished()));
    assert_eq!(msg, "in awaited future");
    // Tasks: re-raised where awaited; the context goes on.
    let t = ctx.spawn(async { panic!("in task") });
    let t2 = ctx.spawn_local(async { 1 });
    let msg = panic_message(|| ctx.block_on(t));
    assert_eq!(msg, "in task");
    assert_eq!(ctx.block_on(t2), 1);
    let t = ctx.spawn_coroutine(|| panic!("in spawned coroutine"));
    let msg = panic_message(|| ctx.block_on(t));
    assert_eq!(msg, "in spawned coroutine");
    // block_on: the future's panic.
    let msg = panic_message(|| ctx.block_on(async { panic!("in block_on") }));
    assert_eq!(msg, "in block_on");
    assert_eq!(ctx.block_on(async { 3 }), 3);
}

// ---- one lock for coroutines and tasks ----

#[test]
fn coroutine_and_task_contend_for_one_comutex() {
    let ctx = AioContext::new().unwrap();
    let m = Rc::new(CoMutex::new(Vec::new()));
    let m1 = m.clone();
    let co = Coroutine::new(move || {
        for i in 0..100 {
            let mut g = m1.lock();
            g.push(("co", i));
            coroutine::yield_now(); // hold across a yield
            g.push(("co", i));
        }
    });
    let m2 = m.clone();
    let task = ctx.spawn_local(async move {
        for i in 0..100 {
            let mut g = m2.lock_async().await;
            g.push(("task", i));
            smol::future::yield_now().await; // hold across a yield
            g.push(("task", i));
        }
    });
    co.enter();
    ctx.block_on(task);
    ctx.poll_while(|| !co.is_finished());
    let v = m.try_lock().unwrap();
    assert_eq!(v.len(), 400);
    // Mutual exclusion: entries come in pairs from the same holder.
    for pair in v.chunks(2) {
        assert_eq!(pair[0], pair[1], "interleaved inside a critical section");
    }
    // Fairness: both made progress interleaved, not one after the other.
    let switches = v.windows(2).filter(|w| w[0].0 != w[1].0).count();
    assert!(switches > 100, "only {switches} hand-offs");
}

#[test]
fn dropped_lock_future_passes_the_lock_on() {
    let ctx = AioContext::new().unwrap();
    let m = Rc::new(CoMutex::new(0));
    let g = m.try_lock().unwrap();
    let m1 = m.clone();
    let quitter = ctx.spawn_local(async move {
        let _g = m1.lock_async().await;
        unreachable!("cancelled before it got the lock");
    });
    let m2 = m.clone();
    let next = ctx.spawn_local(async move { *m2.lock_async().await += 1 });
    ctx.poll(false); // both queued
    drop(quitter);
    drop(g);
    ctx.block_on(next);
    assert_eq!(*m.try_lock().unwrap(), 1);
}

#[test]
fn co_queue_wait_async_serves_tasks() {
    let ctx = AioContext::new().unwrap();
    let st = Rc::new((CoMutex::new(0u32), CoQueue::new()));
    let tasks: Vec<_> = (0..3)
        .map(|_| {
            let st = st.clone();
            ctx.spawn_local(async move {
                let mut g = st.0.lock_async().await;
                while *g == 0 {
                    g = st.1.wait_async(g).await;
                }
                *g += 1;
            })
        })
        .collect();
    let s = st.clone();
    let co = Coroutine::new(move || {
        *s.0.lock() = 1;
        s.1.restart_all();
    });
    while ctx.poll(false) {}
    assert!(!st.1.is_empty(), "tasks wait");
    co.enter();
    ctx.block_on(async {
        for t in tasks {
            t.await;
        }
    });
    assert_eq!(*st.0.try_lock().unwrap(), 4);
}

// ---- smol driving an AioContext ----

#[test]
fn run_in_smol_drives_bhs_timers_and_coroutines() {
    let ctx = AioContext::new().unwrap();
    let hits = Rc::new(Cell::new(0));
    let h = hits.clone();
    let remote = ctx.clone();
    // A BH scheduled from another thread, a coroutine sleeping on the
    // context's timer, and smol tasks, all on this one thread.
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(2));
        remote.bh_schedule_oneshot(|| {});
    });
    let co = Coroutine::new(move || {
        coroutine::sleep(Duration::from_millis(3));
        h.set(h.get() + 1);
    });
    co.enter();
    let ex = smol::LocalExecutor::new();
    ex.spawn(ctx.run_in_smol()).detach();
    let smol_side = Rc::new(Cell::new(0));
    let s = smol_side.clone();
    smol::block_on(ex.run(async move {
        for _ in 0..5 {
            smol::Timer::after(Duration::from_millis(2)).await;
            s.set(s.get() + 1);
        }
        let t0 = Instant::now();
        while hits.get() == 0 {
            assert!(t0.elapsed() < Duration::from_secs(10));
            smol::Timer::after(Duration::from_millis(1)).await;
        }
    }));
    assert!(co.is_finished());
    assert_eq!(smol_side.get(), 5);
}

// Work queued on the home thread by a smol task while `run_in_smol` sleeps
// on the context's fd wakes the driver: a BH, a coroutine's waker, a
// `co_schedule`, a timer armed by a coroutine. Found while writing
// ARCHITECTURE.md: home-thread queueing never notified, so each of these
// waited for an unrelated event (here: for ever).
#[test]
fn run_in_smol_sees_work_queued_by_tasks_on_its_thread() {
    use std::sync::atomic::AtomicBool;
    async fn until(what: &str, cond: impl Fn() -> bool) {
        let t0 = Instant::now();
        while !cond() {
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "{what}: never ran: the driver missed the wake-up"
            );
            smol::Timer::after(Duration::from_millis(1)).await;
        }
    }
    async fn let_driver_sleep() {
        smol::Timer::after(Duration::from_millis(20)).await;
    }
    let ctx = AioContext::new().unwrap();
    let ex = smol::LocalExecutor::new();
    ex.spawn(ctx.run_in_smol()).detach();
    let c = ctx.clone();
    smol::block_on(ex.run(async move {
        let_driver_sleep().await;
        let ran = Arc::new(AtomicBool::new(false));
        let r = ran.clone();
        c.bh_schedule_oneshot(move || r.store(true, Ordering::SeqCst));
        until("a BH", || ran.load(Ordering::SeqCst)).await;

        let_driver_sleep().await;
        let co = Coroutine::new(coroutine::suspend);
        co.enter();
        co.waker().wake();
        until("a woken coroutine", || co.is_finished()).await;

        let_driver_sleep().await;
        let co = Coroutine::new(coroutine::suspend);
        co.enter();
        c.co_schedule(&co);
        until("a scheduled coroutine", || co.is_finished()).await;

        let_driver_sleep().await;
        let co = Coroutine::new(|| coroutine::sleep(Duration::from_millis(2)));
        co.enter();
        until("a sleeping coroutine's timer", || co.is_finished()).await;
    }));
}

// A waker kept by a finished await is stale for the next await of the
// same coroutine: firing it does not poll the new future again.
#[test]
fn await_future_old_waker_does_not_poll_the_next_future() {
    struct Keep(Rc<RefCell<Option<Waker>>>, bool);
    impl Future for Keep {
        type Output = ();
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            *self.0.borrow_mut() = Some(cx.waker().clone());
            if self.1 {
                return Poll::Ready(());
            }
            self.1 = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }
    let ctx = AioContext::new().unwrap();
    let kept = Rc::new(RefCell::new(None));
    let gate = Gate::default();
    let (k, g) = (kept.clone(), gate.clone());
    let co = Coroutine::new(move || {
        for _ in 0..3 {
            await_future(Keep(k.clone(), false));
        }
        await_future(g.wait());
    });
    co.enter();
    while ctx.poll(false) {}
    assert_eq!(gate.polls(), 1);
    let old = kept.borrow_mut().take().unwrap();
    for _ in 0..10 {
        old.wake_by_ref();
        while ctx.poll(false) {}
    }
    assert_eq!(gate.polls(), 1, "a stale waker re-polled the next future");
    gate.fire();
    ctx.poll_while(|| !co.is_finished());
    assert_eq!(gate.polls(), 2);
}

/// Found by the API fuzzer (program seed 18249969999573282947): a
/// `CoroutineFuture` built outside any loop, on a thread whose default
/// context is another one, and given to `ctx.block_on`, put its sleep's
/// timer on the default context, which nothing polled: `block_on` hung.
/// The context that first polls the future serves it now, and inside
/// `block_on` that context is `AioContext::current()`.
#[test]
fn block_on_serves_a_coroutine_future_built_outside_it() {
    common::on_fresh_thread(|| {
        let default = AioContext::new().unwrap();
        let other = AioContext::new().unwrap();
        let fut = CoroutineFuture::new(|| {
            coroutine::sleep(Duration::from_micros(64));
            AioContext::current().unwrap()
        });
        let served_by = other.block_on(fut);
        assert!(served_by.ptr_eq(&other));
        let inside = other.block_on(async { AioContext::current().unwrap() });
        assert!(inside.ptr_eq(&other));
        drop(default);
    });
}

// ---- the direct path: the main coroutine of a CoroutineFuture awaits with
// the executor's own waker ----

// Woken from another thread, by the executor's waker the future holds.
#[test]
fn direct_await_in_a_coroutine_future_woken_from_another_thread() {
    let gate = Gate::default();
    let g = gate.clone();
    let fut = CoroutineFuture::new(move || {
        await_future(g.wait());
        coroutine::yield_now();
        7
    });
    let g = gate.clone();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(5));
        g.fire();
    });
    assert_eq!(smol::block_on(fut), 7);
    t.join().unwrap();
    assert_eq!(gate.polls(), 2, "polled once pending, once ready");
}

// The main coroutine resumed by hand outside its future's poll never polls
// the awaited future (the poll's context is gone then) and does not return;
// a stray wake makes the next poll re-poll it (a spurious poll, as any
// executor may make) without ending the wait: only the future's own wake
// does.
#[test]
fn direct_await_ignores_resumptions_that_are_not_its_poll() {
    let gate = Gate::default();
    let g = gate.clone();
    let main_handle: Rc<RefCell<Option<Coroutine<coroutine::Erased>>>> = Rc::default();
    let mh = main_handle.clone();
    let fut = CoroutineFuture::new(move || {
        *mh.borrow_mut() = Coroutine::current();
        await_future(g.wait());
        "done"
    });
    let g = gate.clone();
    let ex = smol::LocalExecutor::new();
    let task = ex.spawn(fut);
    smol::block_on(ex.run(async {
        for _ in 0..5 {
            smol::future::yield_now().await;
        }
        assert_eq!(g.polls(), 1);
        let main = main_handle.borrow().clone().unwrap();
        // By hand, outside the future's poll: no poll of the gate.
        main.enter();
        main.enter();
        assert_eq!(g.polls(), 1, "a hand entry polled with a stale context");
        assert!(!main.is_finished());
        // A stray wake from another thread: a spurious poll at most.
        let remote = main.remote();
        std::thread::spawn(move || remote.wake()).join().unwrap();
        for _ in 0..5 {
            smol::future::yield_now().await;
        }
        assert!(!main.is_finished(), "a stray wake ended the wait");
        drop(main);
        g.fire();
        assert_eq!(task.await, "done");
    }));
    main_handle.borrow_mut().take();
}

// A `yield_now` of the main coroutine goes through the poll's own waker:
// the executor runs other tasks in between, and nothing is lost.
#[test]
fn direct_yield_interleaves_with_other_tasks() {
    let log = Rc::new(RefCell::new(Vec::new()));
    let l = log.clone();
    let ex = smol::LocalExecutor::new();
    let co = ex.spawn(CoroutineFuture::new(move || {
        for i in 0..3 {
            l.borrow_mut().push(format!("co {i}"));
            coroutine::yield_now();
        }
    }));
    let l = log.clone();
    let task = ex.spawn(async move {
        for i in 0..3 {
            l.borrow_mut().push(format!("task {i}"));
            smol::future::yield_now().await;
        }
    });
    smol::block_on(ex.run(async {
        co.await;
        task.await;
    }));
    assert_eq!(
        *log.borrow(),
        ["co 0", "task 0", "co 1", "task 1", "co 2", "task 2"]
    );
}

// A future whose own `poll` suspends the coroutine (a coroutine wait inside
// `poll`), awaited by a `CoroutineFuture`'s coroutine: when the coroutine is
// resumed by a later poll, the future goes on using the `cx` it was given,
// which must still be valid. In a first version of the direct path it was
// the executor's own `Context`, gone with the earlier poll (caught in
// review). The executor here polls from alternating stack depths with a
// fresh waker each time and scribbles over the stack in between, so a
// stale `Context` is garbage when it is used.
#[test]
fn direct_await_of_a_future_that_suspends_inside_poll() {
    struct SuspendsInPoll(u32);
    impl Future for SuspendsInPoll {
        type Output = u32;
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<u32> {
            let before = cx.waker().clone();
            coroutine::yield_now(); // the executor's poll returns meanwhile
            assert!(
                cx.waker().will_wake(&before),
                "the Context changed under the future"
            );
            cx.waker().wake_by_ref();
            self.0 += 1;
            if self.0 < 3 {
                Poll::Pending
            } else {
                Poll::Ready(self.0)
            }
        }
    }
    struct Count(AtomicUsize);
    impl std::task::Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    #[inline(never)]
    fn poll_at_depth<F: Future + Unpin>(fut: &mut F, depth: u32) -> Poll<F::Output> {
        let pad = std::hint::black_box([depth as u8; 256]);
        if depth > 0 {
            let r = poll_at_depth(fut, depth - 1);
            std::hint::black_box(&pad);
            return r;
        }
        let waker = Waker::from(Arc::new(Count(AtomicUsize::new(0))));
        let mut cx = Context::from_waker(&waker);
        Pin::new(fut).poll(&mut cx)
    }
    #[inline(never)]
    fn scribble() {
        let mut junk = [0x41u8; 64 * 1024];
        std::hint::black_box(&mut junk);
    }
    let mut fut = CoroutineFuture::new(|| await_future(SuspendsInPoll(0)));
    let mut i = 0;
    let out = loop {
        if let Poll::Ready(v) = poll_at_depth(&mut fut, if i % 2 == 0 { 40 } else { 0 }) {
            break v;
        }
        scribble();
        i += 1;
        assert!(i < 100, "never completed");
    };
    assert_eq!(out, 3);
}
