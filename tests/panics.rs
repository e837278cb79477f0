//! Panics in callbacks, tasks and coroutines run by an AioContext: how each
//! is reported, and that the context stays usable afterwards.
//!
//! `AioContext::poll`'s contract (src/aio/mod.rs): a panic in a callback
//! (BH, fd handler, timer) or in a coroutine the context enters unwinds out
//! of `poll` to its caller, with the original payload; the context stays
//! usable and the work not yet run stays queued. Tasks are the exception:
//! their panic is kept for their `Task` handle and re-raised where it is
//! awaited, never out of `poll`. An `IoThread` catches what unwinds out of
//! its `poll`, logs it and keeps serving.

use std::cell::{Cell, RefCell};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use coroloop::aio::{AioContext, ClockType, IoThread};
use coroloop::coroutine::{self, Coroutine};
use coroloop::future::CoroutineFuture;

mod common;
use common::{captured_logs, on_fresh_thread as with_watchdog, panic_message, payload_message};

/// Polls (blocking) until one `poll` panics, and returns its message.
/// Fails if none does within 5 s.
fn poll_until_panic(ctx: &AioContext) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Err(p) = catch_unwind(AssertUnwindSafe(|| ctx.poll(true))) {
            return payload_message(&*p);
        }
    }
    panic!("no panic came out of poll within 5 s");
}

/// After a panic: the context still runs a new BH, a new timer and a new
/// coroutine, and has nothing else left to do.
fn assert_usable(ctx: &AioContext) {
    let bh_ran = Rc::new(Cell::new(false));
    let b = bh_ran.clone();
    ctx.bh_schedule_oneshot_local(move || b.set(true));
    let timer_ran = Rc::new(Cell::new(false));
    let t = timer_ran.clone();
    let timer = ctx.timer_new(ClockType::Virtual, move || t.set(true));
    timer.mod_ns(ctx.clock_ns(ClockType::Virtual));
    let co = Coroutine::new(|| {
        coroutine::suspend();
        7
    });
    co.enter();
    ctx.co_schedule(&co);
    assert!(ctx.poll(false));
    assert!(bh_ran.get(), "a BH runs after the panic");
    assert!(timer_ran.get(), "a timer fires after the panic");
    assert_eq!(
        co.take_result(),
        Some(7),
        "a coroutine runs after the panic"
    );
    assert!(!ctx.poll(false), "nothing else was left queued");
}

/// Counts its drops.
struct DropCount(Rc<Cell<u32>>);
impl Drop for DropCount {
    fn drop(&mut self) {
        self.0.set(self.0.get() + 1);
    }
}

// ---- bottom halves ----

#[test]
fn a_panicking_bh_unwinds_out_of_poll_and_the_rest_stays_queued() {
    let ctx = AioContext::new().unwrap();
    let calls = Rc::new(Cell::new(0));
    let c = calls.clone();
    // A repeating BH that panics on its first run only.
    let bh = ctx.bh_new_local(move || {
        c.set(c.get() + 1);
        if c.get() == 1 {
            panic!("bh boom");
        }
    });
    let later = Rc::new(Cell::new(0));
    let l = later.clone();
    let later_bh = ctx.bh_new_local(move || l.set(l.get() + 1));
    let fired = Rc::new(Cell::new(false));
    let f = fired.clone();
    let timer = ctx.timer_new(ClockType::Virtual, move || f.set(true));
    timer.mod_ns(0);
    bh.schedule();
    later_bh.schedule();

    assert_eq!(panic_message(|| ctx.poll(false)), "bh boom");
    assert_eq!(calls.get(), 1);
    assert_eq!(later.get(), 0, "the pass stopped at the panic");
    assert!(!fired.get(), "timers come after BHs: not reached");
    assert!(later_bh.is_scheduled(), "still queued");

    assert!(ctx.poll(false));
    assert_eq!(later.get(), 1, "run exactly once on the next poll");
    assert!(fired.get());
    assert_eq!(
        calls.get(),
        1,
        "the panicking BH is not run again by itself"
    );
    assert!(!ctx.poll(false));

    // The BH that panicked can be scheduled again.
    bh.schedule();
    assert!(ctx.poll(false));
    assert_eq!(calls.get(), 2);
    assert_usable(&ctx);
}

#[test]
fn a_panicking_oneshot_is_freed() {
    let ctx = AioContext::new().unwrap();
    let drops = Rc::new(Cell::new(0));
    let d = DropCount(drops.clone());
    ctx.bh_schedule_oneshot_local(move || {
        let _d = &d;
        panic!("oneshot boom")
    });
    assert_eq!(panic_message(|| ctx.poll(false)), "oneshot boom");
    assert_eq!(drops.get(), 1, "the closure was dropped by the unwind");
    assert!(!ctx.poll(false), "and is not run again");
    assert_usable(&ctx);
}

#[test]
fn a_bh_panic_during_block_on_unwinds_out_of_block_on() {
    let ctx = AioContext::new().unwrap();
    ctx.bh_schedule_oneshot_local(|| panic!("bh in block_on"));
    let msg = panic_message(|| {
        ctx.block_on(async {
            smol::future::yield_now().await; // lets the loop run the BH
            1
        })
    });
    assert_eq!(msg, "bh in block_on");
    assert_eq!(ctx.block_on(async { 2 }), 2);
    assert_usable(&ctx);
}

// ---- fd handlers ----

#[test]
fn a_panicking_fd_handler_stays_registered_and_fires_again() {
    with_watchdog(|| {
        let ctx = AioContext::new().unwrap();
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let a = Rc::new(a);
        let calls = Rc::new(Cell::new(0));
        let got: Rc<RefCell<Vec<u8>>> = Rc::default();
        let (a2, c, g) = (a.clone(), calls.clone(), got.clone());
        let handler = ctx
            .set_fd_handler(
                a.clone(),
                false,
                Some(Box::new(move || {
                    c.set(c.get() + 1);
                    if c.get() == 1 {
                        panic!("fd boom"); // before reading: still readable
                    }
                    let mut buf = [0u8; 8];
                    let n = (&*a2).read(&mut buf).unwrap();
                    g.borrow_mut().extend_from_slice(&buf[..n]);
                })),
                None,
                None,
            )
            .unwrap();
        let fired = Rc::new(Cell::new(false));
        let f = fired.clone();
        let timer = ctx.timer_new(ClockType::Virtual, move || f.set(true));
        timer.mod_ns(0);
        (&b).write_all(b"x").unwrap();

        assert_eq!(panic_message(|| ctx.poll(true)), "fd boom");
        assert_eq!(calls.get(), 1);
        assert!(!fired.get(), "timers come after fd handlers: not reached");

        // The handler is still registered; the fd is still readable.
        assert!(ctx.poll(true));
        assert_eq!(calls.get(), 2);
        assert_eq!(*got.borrow(), b"x");
        assert!(fired.get(), "the expired timer ran on the next poll");
        assert!(!ctx.poll(false));

        // And it fires again for new data.
        (&b).write_all(b"y").unwrap();
        assert!(ctx.poll(true));
        assert_eq!(calls.get(), 3);
        assert_eq!(*got.borrow(), b"xy");
        drop(handler);
        assert_usable(&ctx);
    });
}

#[test]
fn an_fd_event_lost_to_a_panic_is_reported_again() {
    with_watchdog(|| {
        let ctx = AioContext::new().unwrap();
        // Two readable fds; whichever handler runs first panics once.
        let panicked = Rc::new(Cell::new(false));
        let reads: Rc<RefCell<Vec<&'static str>>> = Rc::default();
        let mut handlers = Vec::new();
        let mut peers = Vec::new();
        for name in ["one", "two"] {
            let (a, b) = UnixStream::pair().unwrap();
            let a = Rc::new(a);
            let (a2, p, r) = (a.clone(), panicked.clone(), reads.clone());
            let h = ctx
                .set_fd_handler(
                    a,
                    false,
                    Some(Box::new(move || {
                        if !p.replace(true) {
                            panic!("first handler boom");
                        }
                        let mut buf = [0u8; 1];
                        (&*a2).read_exact(&mut buf).unwrap();
                        r.borrow_mut().push(name);
                    })),
                    None,
                    None,
                )
                .unwrap();
            (&b).write_all(b"!").unwrap();
            handlers.push(h);
            peers.push(b);
        }
        assert_eq!(panic_message(|| ctx.poll(true)), "first handler boom");
        // Level-triggered: both fds are reported again, nothing is lost.
        let mut polls = 0;
        while reads.borrow().len() < 2 {
            assert!(ctx.poll(true));
            polls += 1;
            assert!(polls <= 2, "an event was lost: {:?}", reads.borrow());
        }
        let mut r = reads.borrow().clone();
        r.sort_unstable();
        assert_eq!(r, ["one", "two"]);
        drop(handlers);
        assert_usable(&ctx);
    });
}

// ---- timers ----

#[test]
fn a_panicking_timer_is_disarmed_and_can_be_rearmed() {
    let ctx = AioContext::new().unwrap();
    let calls = Rc::new(Cell::new(0));
    let c = calls.clone();
    let timer = ctx.timer_new(ClockType::Virtual, move || {
        c.set(c.get() + 1);
        if c.get() == 1 {
            panic!("timer boom");
        }
    });
    // A second timer with the same deadline, armed later: it runs after.
    let other = Rc::new(Cell::new(false));
    let o = other.clone();
    let timer2 = ctx.timer_new(ClockType::Virtual, move || o.set(true));
    timer.mod_ns(100);
    timer2.mod_ns(100);
    ctx.advance_virtual_clock(100);

    assert_eq!(panic_message(|| ctx.poll(false)), "timer boom");
    assert_eq!(calls.get(), 1);
    assert_eq!(timer.expire_time(), None, "a fired timer is disarmed");
    assert!(!other.get(), "the pass stopped at the panic");
    assert!(timer2.is_pending(), "still armed");

    assert!(ctx.poll(false));
    assert!(other.get());
    assert_eq!(calls.get(), 1, "not fired twice");
    assert!(!ctx.poll(false));

    timer.mod_ns(ctx.clock_ns(ClockType::Virtual));
    assert!(ctx.poll(false));
    assert_eq!(calls.get(), 2);
    assert_usable(&ctx);
}

// ---- thread pool ----

#[test]
fn a_panicking_submit_job_never_calls_done_and_does_not_reach_poll() {
    with_watchdog(|| {
        let ctx = AioContext::new().unwrap();
        let pool = ctx.thread_pool();
        let done_called = Arc::new(AtomicBool::new(false));
        let done_dropped = Arc::new(AtomicBool::new(false));
        struct SetOnDrop(Arc<AtomicBool>);
        impl Drop for SetOnDrop {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let (dc, dd) = (done_called.clone(), SetOnDrop(done_dropped.clone()));
        pool.submit(
            || -> u32 { panic!("pool job boom") },
            move |_| {
                let _ = &dd;
                dc.store(true, Ordering::SeqCst);
            },
        );
        // The panic stays on the worker (caught there, after the default
        // hook printed it); `done` is dropped there without being called,
        // and `poll` sees nothing of it.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !done_dropped.load(Ordering::SeqCst) {
            assert!(
                Instant::now() < deadline,
                "the job's `done` was never dropped"
            );
            ctx.poll(false);
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(!ctx.poll(false));
        assert!(!done_called.load(Ordering::SeqCst));
        assert_eq!(
            pool.completed(),
            0,
            "a panicked job does not count as completed"
        );

        // The pool still runs jobs (the worker survived the panic).
        let r = Arc::new(AtomicU32::new(0));
        let r2 = r.clone();
        pool.submit(|| 41 + 1, move |v| r2.store(v, Ordering::SeqCst));
        ctx.poll_while(|| r.load(Ordering::SeqCst) == 0);
        assert_eq!(r.load(Ordering::SeqCst), 42);
        assert_eq!(pool.completed(), 1);
        assert_usable(&ctx);
    });
}

#[test]
fn a_panicking_submit_done_callback_unwinds_out_of_poll() {
    with_watchdog(|| {
        let ctx = AioContext::new().unwrap();
        ctx.thread_pool().submit(|| 5, |v| panic!("done boom {v}"));
        // `done` runs as a BH on the home thread.
        assert_eq!(poll_until_panic(&ctx), "done boom 5");
        assert_usable(&ctx);
    });
}

#[test]
fn a_panicking_submit_co_job_is_resumed_in_the_coroutine_and_out_of_poll() {
    with_watchdog(|| {
        let ctx = AioContext::new().unwrap();
        let c = ctx.clone();
        let drops = Rc::new(Cell::new(0));
        let d = DropCount(drops.clone());
        // The job waits until the coroutine has suspended: had it already
        // ended, `submit_co` would resume its panic at once, inside the
        // `enter` below.
        let (go, wait) = mpsc::channel::<()>();
        let co = Coroutine::new(move || {
            let _d = d;
            c.thread_pool().submit_co(move || -> u32 {
                wait.recv().unwrap();
                panic!("submit_co boom")
            })
        });
        co.enter();
        assert!(!co.is_finished(), "waiting for the worker");
        go.send(()).unwrap();
        // The context enters the coroutine when the job ends; the job's
        // panic resumes there, finishes the coroutine, and unwinds out of
        // the `poll` that entered it.
        assert_eq!(poll_until_panic(&ctx), "submit_co boom");
        assert!(co.is_finished());
        assert_eq!(co.take_result(), None);
        assert_eq!(drops.get(), 1, "the coroutine's stack was unwound");
        // The pool and the context go on.
        let c = ctx.clone();
        let co = Coroutine::new(move || c.thread_pool().submit_co(|| 6));
        co.enter();
        ctx.poll_while(|| !co.is_finished());
        assert_eq!(co.take_result(), Some(6));
        assert_usable(&ctx);
    });
}

// ---- tasks ----

#[test]
fn a_panicking_spawned_task_is_reraised_where_awaited_not_out_of_poll() {
    let ctx = AioContext::new().unwrap();
    let task = ctx.spawn(async { panic!("send task boom") });
    let local_task = ctx.spawn_local(async { panic!("local task boom") });
    // `poll` runs both tasks and keeps their panics for the handles.
    assert!(ctx.poll(false));
    assert!(task.is_finished() && local_task.is_finished());
    assert!(!ctx.poll(false));
    assert_eq!(panic_message(|| ctx.block_on(task)), "send task boom");
    assert_eq!(
        panic_message(|| ctx.block_on(local_task)),
        "local task boom"
    );
    // A task awaited on another executor re-raises there.
    let task = ctx.spawn(async { panic!("awaited elsewhere") });
    assert!(ctx.poll(false));
    assert_eq!(
        with_watchdog(move || panic_message(|| smol::block_on(task))),
        "awaited elsewhere"
    );
    assert_usable(&ctx);
}

#[test]
fn a_panicking_detached_task_is_dropped_silently() {
    let ctx = AioContext::new().unwrap();
    ctx.spawn(async { panic!("detached boom") }).detach();
    ctx.spawn_local(async { panic!("detached local boom") })
        .detach();
    assert!(ctx.poll(false), "no panic out of poll");
    assert!(!ctx.poll(false));
    assert_usable(&ctx);
}

#[test]
fn a_panicking_spawn_coroutine_is_reraised_where_awaited() {
    let ctx = AioContext::new().unwrap();
    let task = ctx.spawn_coroutine(|| -> u32 {
        coroutine::yield_now();
        panic!("spawned coroutine boom")
    });
    let mut passes = 0;
    while !task.is_finished() {
        assert!(ctx.poll(false), "no panic out of poll, and progress");
        passes += 1;
        assert!(passes < 10);
    }
    assert_eq!(
        panic_message(|| ctx.block_on(task)),
        "spawned coroutine boom"
    );
    assert_usable(&ctx);
}

#[test]
fn a_panicking_coroutine_future_reraises_from_the_task_polling_it() {
    let ctx = AioContext::new().unwrap();
    let task = ctx.spawn_local(CoroutineFuture::new(|| -> u32 {
        coroutine::yield_now();
        panic!("coroutine future boom")
    }));
    assert_eq!(
        panic_message(|| ctx.block_on(task)),
        "coroutine future boom"
    );
    assert_usable(&ctx);
}

// ---- coroutines entered by the context ----

#[test]
fn a_scheduled_coroutine_panic_unwinds_out_of_poll_and_the_rest_stays_queued() {
    let ctx = AioContext::new().unwrap();
    let drops = Rc::new(Cell::new(0));
    let d = DropCount(drops.clone());
    let bad = Coroutine::new(move || {
        let _d = d;
        coroutine::suspend();
        panic!("scheduled boom");
    });
    let good = Coroutine::new(|| {
        coroutine::suspend();
        "good"
    });
    bad.enter();
    good.enter();
    ctx.co_schedule(&bad);
    ctx.co_schedule(&good);
    let fired = Rc::new(Cell::new(false));
    let f = fired.clone();
    let timer = ctx.timer_new(ClockType::Virtual, move || f.set(true));
    timer.mod_ns(0);

    assert_eq!(panic_message(|| ctx.poll(false)), "scheduled boom");
    assert!(bad.is_finished());
    assert_eq!(bad.take_result(), None);
    assert_eq!(drops.get(), 1, "its stack was unwound");
    assert!(!good.is_finished(), "the pass stopped at the panic");
    assert!(!fired.get());

    assert!(ctx.poll(false));
    assert_eq!(good.take_result(), Some("good"), "entered on the next poll");
    assert!(fired.get());
    assert!(!ctx.poll(false));
    // A finished coroutine's scheduling flag does not linger.
    ctx.co_schedule(&bad);
    assert!(!ctx.poll(false));
    assert_usable(&ctx);
}

#[test]
fn a_woken_coroutine_panic_unwinds_out_of_poll() {
    with_watchdog(|| {
        let ctx = AioContext::new().unwrap();
        let co = Coroutine::new(|| {
            coroutine::suspend();
            panic!("woken boom");
        });
        co.enter();
        // Woken from another thread: queued on the context, entered by poll.
        let waker = co.waker();
        std::thread::spawn(move || waker.wake()).join().unwrap();
        assert_eq!(poll_until_panic(&ctx), "woken boom");
        assert!(co.is_finished());
        // Woken through a remote handle.
        let co = Coroutine::new(|| {
            coroutine::suspend();
            panic!("remote boom");
        });
        co.enter();
        let remote = co.remote();
        std::thread::spawn(move || remote.wake()).join().unwrap();
        assert_eq!(poll_until_panic(&ctx), "remote boom");
        assert_usable(&ctx);
    });
}

#[test]
fn a_detached_coroutine_panic_unwinds_out_of_poll_and_is_disowned() {
    let ctx = AioContext::new().unwrap();
    let co = Coroutine::new(|| {
        coroutine::yield_now();
        panic!("detached coroutine boom");
    });
    co.enter();
    co.detach();
    assert_eq!(ctx.detached_count(), 1);
    assert_eq!(panic_message(|| ctx.poll(false)), "detached coroutine boom");
    assert_eq!(ctx.detached_count(), 0, "the context let go of it");
    assert_usable(&ctx);
}

#[test]
fn a_sleeping_coroutine_panic_unwinds_out_of_the_poll_running_its_timer() {
    with_watchdog(|| {
        let ctx = AioContext::new().unwrap();
        let co = Coroutine::new(|| {
            coroutine::sleep(Duration::from_millis(1));
            panic!("after sleep boom");
        });
        co.enter();
        assert_eq!(poll_until_panic(&ctx), "after sleep boom");
        assert!(co.is_finished());
        assert_usable(&ctx);
    });
}

// ---- IoThread ----

/// Waits (bounded) for a log line equal to `line`.
fn wait_for_log(line: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if captured_logs().0.lock().unwrap().iter().any(|l| l == line) {
            return;
        }
        assert!(Instant::now() < deadline, "no log line {line:?}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn an_iothread_logs_a_panicking_callback_and_keeps_serving() {
    captured_logs();
    let io = IoThread::spawn("panics-io").unwrap();
    let ctx = io.context();

    ctx.bh_schedule_oneshot(|| panic!("iothread bh boom"));
    wait_for_log("ERROR coroloop: IoThread 'panics-io': a callback panicked: iothread bh boom");
    let (tx, rx) = mpsc::channel();
    let t = tx.clone();
    ctx.bh_schedule_oneshot(move || t.send("bh after").unwrap());
    assert_eq!(rx.recv_timeout(Duration::from_secs(5)), Ok("bh after"));

    // A coroutine on the IoThread that panics is logged the same way.
    ctx.bh_schedule_oneshot(|| {
        // Created while the IoThread polls: its resumer is the context.
        let co = Coroutine::new(|| {
            coroutine::yield_now(); // entered again by the next poll
            panic!("iothread coroutine boom");
        });
        co.enter();
        co.detach();
    });
    wait_for_log(
        "ERROR coroloop: IoThread 'panics-io': a callback panicked: iothread coroutine boom",
    );
    let t = tx.clone();
    ctx.bh_schedule_oneshot(move || t.send("bh after coroutine").unwrap());
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(5)),
        Ok("bh after coroutine")
    );

    // A task's panic still goes to its handle, not to the log.
    let task = ctx.spawn(async { panic!("iothread task boom") });
    assert_eq!(panic_message(|| smol::block_on(task)), "iothread task boom");
    assert!(!io.is_stopped());
    io.stop();
    assert!(!captured_logs()
        .0
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains("iothread task boom")));
}
