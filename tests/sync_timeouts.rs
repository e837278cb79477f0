//! Bounded waits on the coroutine locks: a waiter that times out returns
//! `None` (or `false`) after at least its timeout, leaves its queue
//! consistent, and never takes a grant away from the next waiter, also
//! when the grant and the timeout race across threads.

mod common;

use std::cell::Cell;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{on_fresh_thread, panic_message};
use coroloop::aio::{AioContext, IoThread};
use coroloop::coroutine::{self, Coroutine};
use coroloop::sync::{CoMutex, CoQueue, CoRwLock};

const SHORT: Duration = Duration::from_millis(20);

#[test]
fn lock_timeout_gives_up_and_the_next_waiter_gets_the_lock() {
    on_fresh_thread(|| {
        let ctx = AioContext::new().unwrap();
        let m = Rc::new(CoMutex::new(0));
        let release = Rc::new(Cell::new(false));
        let (m1, r1) = (m.clone(), release.clone());
        let holder = Coroutine::new(move || {
            let _g = m1.lock();
            while !r1.get() {
                coroutine::sleep(Duration::from_millis(1));
            }
        });
        holder.enter();
        let m2 = m.clone();
        let quitter = Coroutine::new(move || {
            let t0 = Instant::now();
            let r = m2.lock_timeout(SHORT).map(|_| ());
            (r, t0.elapsed())
        });
        quitter.enter();
        let m3 = m.clone();
        let patient = Coroutine::new(move || *m3.lock() += 1);
        patient.enter();
        ctx.poll_while(|| !quitter.is_finished());
        let (r, waited) = quitter.take_result().unwrap();
        assert!(r.is_none(), "timed out");
        assert!(waited >= SHORT, "not before its timeout: {waited:?}");
        assert!(m.is_locked() && !patient.is_finished());
        release.set(true);
        ctx.poll_while(|| !patient.is_finished());
        assert_eq!(
            *m.try_lock().unwrap(),
            1,
            "the lock reached the next waiter"
        );
        // A bounded lock of a free mutex takes it at once.
        let m4 = m.clone();
        let quick = Coroutine::new(move || m4.lock_timeout(SHORT).is_some());
        quick.enter();
        assert_eq!(quick.take_result(), Some(true));
    });
}

#[test]
fn rwlock_and_queue_timeouts() {
    on_fresh_thread(|| {
        let ctx = AioContext::new().unwrap();
        let l = Rc::new(CoRwLock::new(()));
        let q = Rc::new(CoQueue::new());
        let m = Rc::new(CoMutex::new(()));
        let (l1, q1, m1) = (l.clone(), q.clone(), m.clone());
        let co = Coroutine::new(move || {
            let r = l1.read();
            // A writer waits behind the reader: times out.
            let timed_out_write = {
                let l2 = l1.clone();
                let w = Coroutine::new(move || l2.write_timeout(SHORT).is_none());
                w.enter();
                while !w.is_finished() {
                    coroutine::sleep(Duration::from_millis(1));
                }
                w.take_result().unwrap()
            };
            drop(r);
            // Nothing waits any more: a writer gets in at once.
            let free_write = l1.write_timeout(SHORT).is_some();
            let woken = q1.wait_unlocked_timeout(SHORT);
            let g = m1.lock();
            let (g, timed_out) = q1.wait_timeout(g, SHORT);
            let relocked = m1.try_lock().is_none();
            drop(g);
            (timed_out_write, free_write, woken, timed_out, relocked)
        });
        co.enter();
        ctx.poll_while(|| !co.is_finished());
        assert_eq!(co.take_result(), Some((true, true, false, true, true)));
        assert!(q.is_empty(), "the timed-out waiters left the queue");
        assert!(!q.next());
        assert!(l.try_write().is_some());
        assert!(m.try_lock().is_some());
    });
}

/// A coroutine's bounded wait is woken by `next()` before its timeout:
/// `true`, and the timer does not fire later into another wait.
#[test]
fn a_woken_bounded_wait_returns_true_and_its_timer_is_gone() {
    on_fresh_thread(|| {
        let ctx = AioContext::new().unwrap();
        let q = Rc::new(CoQueue::new());
        let q1 = q.clone();
        let co = Coroutine::new(move || {
            let first = q1.wait_unlocked_timeout(Duration::from_millis(30));
            // Waits again, unbounded: the first wait's timer must not end it.
            q1.wait_unlocked();
            first
        });
        co.enter();
        assert!(q.next());
        ctx.poll(false);
        std::thread::sleep(Duration::from_millis(60));
        for _ in 0..5 {
            ctx.poll(false);
        }
        assert!(!co.is_finished(), "still in its second wait");
        assert!(q.next());
        ctx.poll_while(|| !co.is_finished());
        assert_eq!(co.take_result(), Some(true));
    });
}

/// The grant and the timeout race: a holder on one IoThread releases the
/// lock around the moment a bounded waiter on another IoThread gives up;
/// an unbounded waiter queued behind it must always get the lock. 200
/// rounds, release times spread across the deadline.
#[test]
fn a_grant_racing_a_timeout_is_never_lost() {
    const ROUNDS: usize = 200;
    let a = IoThread::spawn("holder").unwrap();
    let b = IoThread::spawn("waiters").unwrap();
    let m = Arc::new(CoMutex::new(0u64));
    let got_bounded = Arc::new(AtomicUsize::new(0));
    let t0 = Instant::now();
    for round in 0..ROUNDS {
        let (tx, rx) = std::sync::mpsc::channel();
        let (held_tx, held_rx) = std::sync::mpsc::channel();
        let m1 = m.clone();
        let hold = Duration::from_micros(1500 + (round as u64 % 10) * 100);
        a.context().bh_schedule_oneshot(move || {
            Coroutine::new(move || {
                let g = m1.lock();
                held_tx.send(()).unwrap();
                std::thread::sleep(hold); // release near the deadline
                drop(g);
            })
            .enter();
        });
        held_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        let (m2, m3, gb) = (m.clone(), m.clone(), got_bounded.clone());
        b.context().bh_schedule_oneshot(move || {
            Coroutine::new(move || {
                if let Some(mut g) = m2.lock_timeout(Duration::from_millis(2)) {
                    *g += 1;
                    gb.fetch_add(1, Ordering::Relaxed);
                }
            })
            .enter();
            Coroutine::new(move || {
                *m3.lock() += 1;
                tx.send(()).unwrap();
            })
            .enter();
        });
        rx.recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("round {round}: the unbounded waiter never got the lock"));
    }
    // Every waiter that got it counted once; the lock is free.
    let (tx, rx) = std::sync::mpsc::channel();
    let m4 = m.clone();
    b.context().bh_schedule_oneshot(move || {
        Coroutine::new(move || tx.send(*m4.lock()).unwrap()).enter();
    });
    let total = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    let bounded = got_bounded.load(Ordering::Relaxed) as u64;
    assert_eq!(total, ROUNDS as u64 + bounded);
    println!(
        "{ROUNDS} rounds in {:?}: the bounded waiter got the lock {bounded} times, timed out {} times",
        t0.elapsed(),
        ROUNDS as u64 - bounded
    );
}

#[test]
fn bounded_waits_outside_a_coroutine_panic_with_the_call_named() {
    let m = CoMutex::new(());
    let msg = panic_message(|| m.lock_timeout(SHORT).map(|_| ()));
    assert!(
        msg.contains("CoMutex::lock_timeout called outside a coroutine"),
        "{msg}"
    );
    let q = CoQueue::new();
    let msg = panic_message(|| q.wait_unlocked_timeout(SHORT));
    assert!(
        msg.contains("CoQueue::wait_unlocked_timeout called outside a coroutine"),
        "{msg}"
    );
}

/// Found by the API fuzzer (program seed 8044187931261641910): a bounded
/// wait in a coroutine served by a shut-down context (a `block_on` of it)
/// armed a timer the context refused, and never ended. It times out at
/// once now.
#[test]
fn a_bounded_wait_on_a_shut_down_context_times_out() {
    on_fresh_thread(|| {
        let ctx = AioContext::new().unwrap();
        ctx.shutdown();
        let q = Rc::new(CoQueue::new());
        let q1 = q.clone();
        let woken = ctx.block_on(coroloop::future::CoroutineFuture::new(move || {
            q1.wait_unlocked_timeout(Duration::from_micros(283))
        }));
        assert!(!woken);
        assert!(q.is_empty());
    });
}

/// `CoRwLock::read_timeout` behind a writer times out; the writer's
/// release then admits a later reader (the queue is consistent).
#[test]
fn read_timeout_behind_a_writer() {
    on_fresh_thread(|| {
        let ctx = AioContext::new().unwrap();
        let l = Rc::new(CoRwLock::new(0));
        let l1 = l.clone();
        let co = Coroutine::new(move || {
            let mut w = l1.write();
            let l2 = l1.clone();
            let reader = Coroutine::new(move || l2.read_timeout(SHORT).map(|g| *g));
            reader.enter();
            while !reader.is_finished() {
                coroutine::sleep(Duration::from_millis(1));
            }
            *w = 5;
            drop(w);
            let late = l1.read_timeout(SHORT).map(|g| *g);
            (reader.take_result().unwrap(), late)
        });
        co.enter();
        ctx.poll_while(|| !co.is_finished());
        assert_eq!(co.take_result(), Some((None, Some(5))));
        assert!(l.try_write().is_some());
    });
}

/// Found by the API fuzzer (program seed 7270455167796295686): the context
/// shut down while a bounded wait was armed on it (a task shut it down
/// during the `block_on`): its timer's callback was dropped unrun and the
/// wait never ended. Dropping the callback expires the wait now.
#[test]
fn a_shutdown_during_a_bounded_wait_ends_it() {
    on_fresh_thread(|| {
        let ctx = AioContext::new().unwrap();
        let c = ctx.clone();
        ctx.spawn(async move {
            for _ in 0..3 {
                smol::future::yield_now().await;
            }
            c.shutdown();
        })
        .detach();
        let q = Rc::new(CoQueue::new());
        let q1 = q.clone();
        let woken = ctx.block_on(coroloop::future::CoroutineFuture::new(move || {
            q1.wait_unlocked_timeout(Duration::from_secs(600))
        }));
        assert!(!woken);
        assert!(q.is_empty());
    });
}
