//! Coroutines on an AioContext: the coroutine cases of QEMU's test-aio.c
//! (queue chaining, worker-thread co-enter) re-derived, and the Resumers
//! contract of ARCHITECTURE.md (co_enter / co_schedule / wake, detach, stray
//! wakes, sleep, yield_now).

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use coroloop::aio::{AioContext, IoThread};
use coroloop::coroutine::{self, Coroutine, Erased};

mod common;
use common::panic_message;

// /aio/coroutine/queue-chaining: two coroutines enter each other 25,000
// times through the wake-up lists; the stack must not grow.
#[test]
fn queue_chaining() {
    const MAX: u32 = 25_000;
    let ctx = AioContext::new().unwrap();
    let other: Rc<RefCell<[Option<Coroutine<Erased>>; 2]>> = Rc::default();
    let counts = Rc::new([Cell::new(0u32), Cell::new(0u32)]);
    let make = |me: usize| {
        let (other, counts, ctx) = (other.clone(), counts.clone(), ctx.clone());
        coroutine::Builder::new()
            .stack_size(64 * 1024) // a growing stack would overflow this
            .build(move || {
                while counts[me].get() < MAX {
                    counts[me].set(counts[me].get() + 1);
                    let o = other.borrow()[me].clone().unwrap();
                    ctx.co_enter(&o);
                    coroutine::suspend();
                }
            })
            .unwrap()
    };
    let a = make(0);
    let b = make(1);
    *other.borrow_mut() = [Some(b.clone().erase()), Some(a.clone().erase())];
    a.enter();
    assert_eq!(counts[0].get(), MAX);
    assert_eq!(counts[1].get(), MAX);
    assert!(a.is_finished());
    // b is suspended at its last suspend; one more enter finishes it.
    assert!(!b.is_finished());
    b.enter();
    assert!(b.is_finished());
    other.borrow_mut()[0] = None;
    other.borrow_mut()[1] = None;
}

// /aio/coroutine/worker-thread-co-enter: woken from another thread, the
// coroutine runs on its home thread.
#[test]
fn worker_thread_wake_runs_on_home() {
    let ctx = AioContext::new().unwrap();
    let home = std::thread::current().id();
    let ran_on = Rc::new(Cell::new(None));
    let r = ran_on.clone();
    let co = Coroutine::new(move || {
        coroutine::suspend();
        r.set(Some(std::thread::current().id()));
    });
    co.enter();
    let remote = co.remote();
    std::thread::spawn(move || remote.wake()).join().unwrap();
    assert!(ctx.poll(true));
    assert_eq!(ran_on.get(), Some(home));
    assert!(!ctx.poll(false));
    assert!(co.is_finished());
}

#[test]
fn co_schedule_runs_on_next_poll_and_double_schedule_panics() {
    let ctx = AioContext::new().unwrap();
    let steps = Rc::new(Cell::new(0));
    let s = steps.clone();
    let co = Coroutine::new(move || {
        s.set(1);
        coroutine::suspend();
        s.set(2);
    });
    co.enter();
    ctx.co_schedule(&co);
    assert_eq!(steps.get(), 1, "scheduling never enters");
    assert_eq!(
        panic_message(|| ctx.co_schedule(&co)),
        "AioContext::co_schedule: coroutine was already scheduled"
    );
    assert!(ctx.poll(false));
    assert_eq!(steps.get(), 2);
}

#[test]
fn waker_queues_and_never_enters_in_the_caller() {
    let ctx = AioContext::new().unwrap();
    let runs = Rc::new(Cell::new(0));
    let r = runs.clone();
    let co = Coroutine::new(move || loop {
        coroutine::suspend();
        r.set(r.get() + 1);
    });
    co.enter();
    let w = co.waker();
    w.wake_by_ref();
    w.wake_by_ref(); // duplicate: queued once
    assert_eq!(runs.get(), 0, "Waker::wake never enters");
    assert!(ctx.poll(false));
    assert_eq!(runs.get(), 1);
    assert!(!ctx.poll(false));
    co.cancel(); // unwinds it
    w.wake(); // stale: nothing happens
    assert!(!ctx.poll(false));
}

#[test]
fn detached_coroutines_are_owned_by_their_context() {
    let ctx = AioContext::new().unwrap();
    let drops = Rc::new(Cell::new(0));
    struct D(Rc<Cell<u32>>);
    impl Drop for D {
        fn drop(&mut self) {
            self.0.set(self.0.get() + 1);
        }
    }
    // One finishes on its own: its handle is released.
    let d = D(drops.clone());
    let co = Coroutine::new(move || {
        let _d = d;
        coroutine::yield_now();
    });
    co.enter();
    co.detach();
    assert_eq!(ctx.detached_count(), 1);
    assert!(ctx.poll(false));
    assert_eq!(ctx.detached_count(), 0);
    assert_eq!(drops.get(), 1);
    // One stays suspended: dropping the context on its home thread unwinds
    // it.
    let d = D(drops.clone());
    let co = Coroutine::new(move || {
        let _d = d;
        coroutine::suspend();
    });
    co.enter();
    co.detach();
    assert_eq!(ctx.detached_count(), 1);
    drop(ctx);
    assert_eq!(drops.get(), 2);
}

#[test]
fn sleep_uses_timers_and_ignores_stray_wakes() {
    let ctx = AioContext::new().unwrap();
    let woke_at = Rc::new(Cell::new(None));
    let w = woke_at.clone();
    let start = Instant::now();
    let co = Coroutine::new(move || {
        coroutine::sleep(Duration::from_millis(200));
        w.set(Some(start.elapsed()));
    });
    co.enter();
    // Stray wakes from everywhere: none may end the sleep early.
    for _ in 0..10 {
        co.wake();
        co.remote().wake();
        ctx.poll(false);
    }
    assert!(woke_at.get().is_none());
    while !co.is_finished() {
        ctx.poll(true);
    }
    assert!(woke_at.get().unwrap() >= Duration::from_millis(200));
}

#[test]
fn yield_now_lets_other_work_run() {
    let ctx = AioContext::new().unwrap();
    let log = Rc::new(RefCell::new(Vec::new()));
    let l = log.clone();
    let co = Coroutine::new(move || {
        l.borrow_mut().push("co 1");
        coroutine::yield_now();
        l.borrow_mut().push("co 2");
    });
    let l = log.clone();
    ctx.bh_schedule_oneshot_local(move || l.borrow_mut().push("bh"));
    co.enter();
    assert!(ctx.poll(false));
    assert_eq!(*log.borrow(), ["co 1", "bh", "co 2"]);
}

#[test]
fn coroutines_inherit_the_current_context() {
    let ctx = AioContext::new().unwrap();
    let co = Coroutine::new(|| ());
    assert!(co.aio_context().unwrap().ptr_eq(&ctx));
    assert!(AioContext::current().unwrap().ptr_eq(&ctx));
    let bare = std::thread::spawn(|| Coroutine::new(|| ()).aio_context().is_none())
        .join()
        .unwrap();
    assert!(bare, "no context on that thread");
}

/// A stray-wake storm from several threads against a coroutine waiting on
/// a counter: it is resumed often, but its own condition decides, and the
/// final count is exact.
#[test]
fn remote_wake_storm_is_harmless() {
    let ctx = AioContext::new().unwrap();
    let target = Arc::new(AtomicU64::new(0));
    let seen = Rc::new(Cell::new(0u64));
    let (t, s) = (target.clone(), seen.clone());
    let co = Coroutine::new(move || {
        while t.load(Ordering::Acquire) < 1000 {
            coroutine::suspend();
            s.set(s.get() + 1);
        }
    });
    co.enter();
    let remote = co.remote();
    let threads: Vec<_> = (0..3)
        .map(|i| {
            let (r, t) = (remote.clone(), target.clone());
            std::thread::spawn(move || {
                for _ in 0..2000 {
                    r.wake();
                    if i == 0 {
                        t.fetch_add(1, Ordering::AcqRel);
                    }
                }
                r.wake();
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !co.is_finished() {
        ctx.poll(true);
        assert!(Instant::now() < deadline);
    }
    for t in threads {
        t.join().unwrap();
    }
    assert!(target.load(Ordering::Relaxed) >= 1000);
    assert!(seen.get() >= 1);
}

/// Two coroutines on two IoThreads hand a baton back and forth by waking
/// each other; each is only ever resumed on its own thread.
#[test]
fn baton_between_two_iothreads() {
    const ROUNDS: u64 = 10_000;
    let a = IoThread::spawn("baton-a").unwrap();
    let b = IoThread::spawn("baton-b").unwrap();
    let baton = Arc::new(AtomicU64::new(0));
    let (tx, rx) = std::sync::mpsc::channel::<coroloop::coroutine::RemoteCoroutine>();
    let (tx2, rx2) = std::sync::mpsc::channel::<coroloop::coroutine::RemoteCoroutine>();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<(u64, u64, bool)>();
    let start =
        |io: &IoThread,
         parity: u64,
         send_self: std::sync::mpsc::Sender<coroloop::coroutine::RemoteCoroutine>,
         recv_peer: std::sync::mpsc::Receiver<coroloop::coroutine::RemoteCoroutine>| {
            let (baton, done) = (baton.clone(), done_tx.clone());
            let name = io.name().to_string();
            io.context().bh_schedule_oneshot(move || {
                let co = Coroutine::new(move || {
                    let peer = recv_peer.recv().unwrap();
                    let mut resumes = 0u64;
                    let mut passes = 0u64;
                    let mut on_own_thread = true;
                    loop {
                        let v = baton.load(Ordering::Acquire);
                        if v >= ROUNDS {
                            break;
                        }
                        if v % 2 == parity {
                            baton.store(v + 1, Ordering::Release);
                            passes += 1;
                            peer.wake();
                        } else {
                            coroutine::suspend();
                            resumes += 1;
                            on_own_thread &= std::thread::current().name() == Some(name.as_str());
                        }
                    }
                    peer.wake(); // let the other one see the end
                    done.send((passes, resumes, on_own_thread)).unwrap();
                });
                send_self.send(co.remote()).unwrap();
                co.enter();
                co.detach();
            });
        };
    start(&a, 0, tx, rx2);
    start(&b, 1, tx2, rx);
    for _ in 0..2 {
        let (passes, resumes, own) = done_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("baton finished");
        assert!(own, "resumed on a foreign thread");
        assert_eq!(
            passes,
            ROUNDS / 2,
            "each side passed the baton exactly half the time"
        );
        assert!(resumes >= 1);
    }
    assert_eq!(baton.load(Ordering::Relaxed), ROUNDS);
    a.stop();
    b.stop();
}

#[test]
fn iothread_stop_unwinds_detached_coroutines_and_rejects_double_stop() {
    let io = IoThread::spawn("stopper").unwrap();
    let drops = Arc::new(AtomicU64::new(0));
    struct D(Arc<AtomicU64>);
    impl Drop for D {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }
    let d = D(drops.clone());
    let (tx, rx) = std::sync::mpsc::channel();
    io.context().bh_schedule_oneshot(move || {
        let co = Coroutine::new(move || {
            let _d = d;
            coroutine::suspend();
        });
        co.enter();
        co.detach();
        tx.send(()).unwrap();
    });
    rx.recv().unwrap();
    io.stop();
    assert_eq!(drops.load(Ordering::Relaxed), 1);
    assert!(io.is_stopped());
    assert_eq!(
        panic_message(|| io.stop()),
        "IoThread::stop: IoThread 'stopper' is already stopped"
    );
}

#[test]
fn poll_while_and_wait_kick() {
    let ctx = AioContext::new().unwrap();
    let flag = Arc::new(AtomicU64::new(0));
    let f = flag.clone();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(20));
        f.store(1, Ordering::Release);
        coroloop::aio::wait_kick();
    });
    ctx.poll_while(|| flag.load(Ordering::Acquire) == 0);
    t.join().unwrap();
}

#[test]
fn prepare_pending_dispatch_drive_the_context() {
    let ctx = AioContext::new().unwrap();
    let runs = Arc::new(AtomicU64::new(0));
    // Nothing to do: the outer loop may sleep forever.
    assert_eq!(ctx.prepare(), None);
    assert!(!ctx.pending());
    let r = runs.clone();
    let c = ctx.clone();
    std::thread::spawn(move || {
        c.bh_schedule_oneshot(move || {
            r.fetch_add(1, Ordering::Relaxed);
        })
    })
    .join()
    .unwrap();
    // The outer loop would wait on ctx.as_fd(); here the work is there.
    let _timeout = ctx.prepare();
    assert!(ctx.pending());
    assert!(ctx.dispatch());
    assert_eq!(runs.load(Ordering::Relaxed), 1);
}

#[test]
fn reschedule_self_moves_a_detached_coroutine_to_another_iothread() {
    let a = IoThread::spawn("from").unwrap();
    let b = IoThread::spawn("to").unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let target = b.context().clone();
    a.context().bh_schedule_oneshot(move || {
        let co = Coroutine::new(move || {
            let before = std::thread::current().name().map(String::from);
            // SAFETY: the stack holds only Send values, and the coroutine is
            // detached: no handle of it is used while it moves.
            unsafe { coroutine::reschedule_self(&target) };
            let after = std::thread::current().name().map(String::from);
            // It now lives on the new context: its timers work there.
            coroutine::sleep(Duration::from_millis(1));
            let still = std::thread::current().name().map(String::from);
            tx.send((before, after, still)).unwrap();
        });
        let remote = co.remote();
        co.detach();
        remote.wake(); // start it from the context's queue
    });
    let (before, after, still) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(before.as_deref(), Some("from"));
    assert_eq!(after.as_deref(), Some("to"));
    assert_eq!(still.as_deref(), Some("to"));
    // Ownership moved along: neither context still owns it once finished.
    for io in [&a, &b] {
        let (tx, rx) = std::sync::mpsc::channel();
        let c = io.context().clone();
        io.context()
            .bh_schedule_oneshot(move || tx.send(c.detached_count()).unwrap());
        assert_eq!(rx.recv().unwrap(), 0);
    }
    a.stop();
    b.stop();
}

#[test]
fn shutdown_unwinds_owned_coroutines_even_when_they_hold_the_context() {
    let ctx = AioContext::new().unwrap();
    let drops = Rc::new(Cell::new(0));
    struct D(Rc<Cell<u32>>);
    impl Drop for D {
        fn drop(&mut self) {
            self.0.set(self.0.get() + 1);
        }
    }
    for _ in 0..3 {
        let d = D(drops.clone());
        let co = Coroutine::new(move || {
            let _d = d;
            // Holds a Timer (and so the context) while it sleeps.
            coroutine::sleep(Duration::from_secs(3600));
        });
        co.enter();
        co.detach();
    }
    assert_eq!(ctx.detached_count(), 3);
    ctx.shutdown();
    assert_eq!(drops.get(), 3, "all three unwound");
    assert_eq!(ctx.detached_count(), 0);
    assert!(!ctx.poll(false), "nothing left to run");
    ctx.shutdown(); // idempotent
}
