//! CoMutex and CoQueue: QEMU's test-coroutine.c locking cases and
//! test-aio-multithread.c's mutex cases, re-derived.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use coroloop::aio::{AioContext, IoThread};
use coroloop::coroutine::{self, Coroutine};
use coroloop::sync::{CoLockable, CoMutex, CoQueue, CoRwLock};

// /locking/co-mutex: two bare coroutines, no AioContext. Unlock queues the
// waiter on the unlocker's wake-up list: it runs when the unlocker ends.
#[test]
fn co_mutex_bare_coroutines() {
    let m = Rc::new(CoMutex::new(()));
    let locked = Rc::new(Cell::new(false));
    let done = Rc::new(Cell::new(0));
    let mk = || {
        let (m, locked, done) = (m.clone(), locked.clone(), done.clone());
        Coroutine::new(move || {
            let g = m.lock();
            assert!(!locked.get());
            locked.set(true);
            coroutine::suspend();
            locked.set(false);
            drop(g);
            done.set(done.get() + 1);
        })
    };
    let (c1, c2) = (mk(), mk());
    c1.enter();
    assert!(locked.get());
    c2.enter();
    // c1 unlocks: c2 runs as soon as c1 terminates.
    c1.enter();
    assert_eq!(done.get(), 1);
    assert!(locked.get());
    c2.enter();
    assert_eq!(done.get(), 2);
    assert!(!locked.get());
}

#[test]
fn lock_outside_a_coroutine_panics_and_try_lock_works() {
    let m = CoMutex::new(5);
    let p = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _g = m.lock();
    }))
    .unwrap_err();
    assert_eq!(
        p.downcast_ref::<&str>().copied(),
        Some("CoMutex::lock called outside a coroutine")
    );
    let g = m.try_lock().unwrap();
    assert!(m.is_locked());
    assert!(m.try_lock().is_none());
    drop(g);
    assert!(!m.is_locked());
}

#[test]
fn stray_wakes_never_hand_out_the_lock() {
    let ctx = AioContext::new().unwrap();
    let m = Rc::new(CoMutex::new(0));
    let holder_g = m.try_lock().unwrap();
    let m2 = m.clone();
    let waiter = Coroutine::new(move || {
        *m2.lock() += 1;
    });
    waiter.enter();
    for _ in 0..100 {
        waiter.wake();
        waiter.remote().wake();
        waiter.waker().wake_by_ref();
        ctx.poll(false);
    }
    assert!(!waiter.is_finished(), "still waiting: the lock is held");
    drop(holder_g); // hands off: outside a coroutine, enters it now
    assert!(waiter.is_finished());
    assert_eq!(*m.try_lock().unwrap(), 1);
}

#[test]
fn unwound_waiter_leaves_the_queue_and_the_lock_reaches_the_next() {
    let m = Rc::new(CoMutex::new(Vec::new()));
    let g = m.try_lock().unwrap();
    let mk = |tag: u32| {
        let m = m.clone();
        Coroutine::new(move || m.lock().push(tag))
    };
    let (a, b, c) = (mk(1), mk(2), mk(3));
    a.enter();
    b.enter();
    c.enter();
    drop(b); // unwound while queued
    drop(g);
    assert!(a.is_finished() && c.is_finished());
    assert_eq!(*m.try_lock().unwrap(), [1, 3]);
    // A waiter granted the lock but unwound before it ran passes it on.
    let d_slot: Rc<std::cell::RefCell<Option<Coroutine>>> = Rc::default();
    let (m2, slot) = (m.clone(), d_slot.clone());
    let holder = Coroutine::new(move || {
        let g = m2.lock();
        coroutine::suspend();
        drop(g); // grants d, queued to run when this coroutine suspends
        drop(slot.borrow_mut().take()); // ...but d is unwound first
        coroutine::suspend();
    });
    holder.enter();
    let (d, e) = (mk(4), mk(5));
    d.enter();
    e.enter();
    *d_slot.borrow_mut() = Some(d);
    holder.enter();
    assert!(e.is_finished(), "the lock reached e");
    assert_eq!(*m.try_lock().unwrap(), [1, 3, 5]);
    holder.enter();
}

// /locking/co-mutex/lockable: CoQueue::wait takes any coroutine lock
// (QEMU's QemuCoLockable). For each kind of guard: the lock is free while
// the waiter waits (a second coroutine takes it), held again in the same
// mode once the waiter is woken, and free when the waiter ends.
fn wait_with<'a, G: CoLockable<'a>>(q: &CoQueue, g: G) -> G {
    q.wait(g)
}

#[test]
fn co_queue_wait_releases_and_retakes_any_co_lock() {
    let m = Rc::new(CoMutex::new(0u32));
    let rw = Rc::new(CoRwLock::new(0u32));
    let q = Rc::new(CoQueue::new());
    let (m1, rw1, q1) = (m.clone(), rw.clone(), q.clone());
    let waiter = Coroutine::new(move || {
        let g = wait_with(&q1, m1.lock());
        assert!(m1.try_lock().is_none(), "mutex held again after the wait");
        assert_eq!(*g, 1);
        drop(g);
        let g = wait_with(&q1, rw1.write());
        assert!(rw1.try_read().is_none(), "write lock held again");
        assert_eq!(*g, 1);
        drop(g);
        let g = wait_with(&q1, rw1.read());
        assert!(rw1.try_write().is_none(), "read lock held again");
        assert!(rw1.try_read().is_some(), "as a reader");
        assert_eq!(*g, 2);
    });
    waiter.enter();
    // The waiter waits with nothing held: others take each lock freely.
    *m.try_lock().expect("mutex released by CoQueue::wait") += 1;
    assert!(q.next());
    *rw.try_write().expect("write lock released") += 1;
    assert!(q.next());
    *rw.try_write().expect("read lock released") += 1;
    assert!(q.next());
    assert!(waiter.is_finished());
    assert!(!m.is_locked());
    assert!(rw.try_write().is_some());
}

#[test]
fn co_queue_wait_next_restart_all() {
    let m = Rc::new(CoMutex::new(0u32));
    let q = Rc::new(CoQueue::new());
    let woken = Rc::new(Cell::new(0));
    let cos: Vec<_> = (0..3)
        .map(|_| {
            let (m, q, w) = (m.clone(), q.clone(), woken.clone());
            Coroutine::new(move || {
                let mut g = m.lock();
                while *g == 0 {
                    g = q.wait(g);
                }
                w.set(w.get() + 1);
            })
        })
        .collect();
    for c in &cos {
        c.enter();
    }
    assert!(!q.is_empty());
    // A wake with the condition false: the coroutine checks and waits again.
    assert!(q.next());
    assert_eq!(woken.get(), 0);
    *m.try_lock().unwrap() = 1;
    q.restart_all();
    assert_eq!(woken.get(), 3);
    assert!(q.is_empty());
    assert!(!q.next());
    // An unwound waiter leaves the queue consistent.
    let (m2, q2) = (m.clone(), q.clone());
    *m.try_lock().unwrap() = 0;
    let w = Coroutine::new(move || {
        let g = m2.lock();
        let _g = q2.wait(g);
    });
    w.enter();
    drop(w);
    assert!(q.is_empty());
    assert!(!m.is_locked());
}

/// Mutex contention across IoThreads (test-aio-multithread.c's
/// co-mutex cases): exact final counter, every coroutine finished.
fn contention(threads: usize, per_thread: usize, iters: u64) {
    let ios: Vec<_> = (0..threads)
        .map(|i| IoThread::spawn(&format!("mtx-{i}")).unwrap())
        .collect();
    let m = Arc::new(CoMutex::new(0u64));
    let (tx, rx) = mpsc::channel();
    let handoffs = Arc::new(AtomicU64::new(0));
    for io in &ios {
        for _ in 0..per_thread {
            let (m, tx, handoffs) = (m.clone(), tx.clone(), handoffs.clone());
            let name = io.name().to_string();
            io.context().bh_schedule_oneshot(move || {
                let co = Coroutine::new(move || {
                    for i in 0..iters {
                        let mut g = m.lock();
                        assert_eq!(std::thread::current().name(), Some(name.as_str()));
                        *g += 1;
                        if i % 8 == 0 {
                            coroutine::yield_now(); // hold it across a yield
                            handoffs.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    tx.send(()).unwrap();
                });
                co.enter();
                co.detach();
            });
        }
    }
    for _ in 0..threads * per_thread {
        rx.recv_timeout(Duration::from_secs(60))
            .expect("contention finished");
    }
    let total = (threads * per_thread) as u64 * iters;
    let (tx, rx) = mpsc::channel();
    let m2 = m.clone();
    ios[0].context().bh_schedule_oneshot(move || {
        tx.send(*m2.try_lock().unwrap()).unwrap();
    });
    assert_eq!(rx.recv().unwrap(), total);
    for io in ios {
        io.stop();
    }
}

#[test]
fn mutex_contention_two_iothreads() {
    contention(2, 8, 2000);
}

#[test]
fn mutex_contention_four_iothreads() {
    contention(4, 4, 2000);
}

/// test-aio-multithread's co-schedule case: coroutines hop between
/// IoThreads by rescheduling themselves; every hop lands on the target.
#[test]
fn coroutines_hop_between_iothreads() {
    let ios: Arc<Vec<IoThread>> = Arc::new(
        (0..3)
            .map(|i| IoThread::spawn(&format!("hop-{i}")).unwrap())
            .collect(),
    );
    let (tx, rx) = mpsc::channel();
    let ctxs: Vec<_> = ios.iter().map(|io| io.context().clone()).collect();
    for k in 0..6usize {
        let (ctxs, tx) = (ctxs.clone(), tx.clone());
        ios[k % 3].context().bh_schedule_oneshot(move || {
            let co = Coroutine::new(move || {
                let mut hops = 0;
                for h in 0..30 {
                    let target = &ctxs[(k + h) % 3];
                    // SAFETY: only Send values on the stack; the coroutine
                    // is detached (no handle is used while it moves).
                    unsafe { coroutine::reschedule_self(target) };
                    assert!(target.is_home_thread());
                    hops += 1;
                }
                tx.send(hops).unwrap();
            });
            let r = co.remote();
            co.detach();
            r.wake();
        });
    }
    let mut total = 0;
    for _ in 0..6 {
        total += rx.recv_timeout(Duration::from_secs(30)).expect("hops done");
    }
    assert_eq!(total, 180);
    drop(ctxs);
    if let Ok(ios) = Arc::try_unwrap(ios) {
        for io in ios {
            io.stop();
        }
    }
}

/// Starvation across threads (test-aio-multithread's check): coroutines on
/// 2 IoThreads each need 2,000 locks, holding the lock across a yield so
/// that every lock is contended; FIFO hand-off must let every one of them
/// finish (a starved waiter would never complete its quota), with exact
/// totals. Equal shares over time are not asserted: on this 2-vCPU machine
/// a descheduled IoThread makes its coroutines late, which is not the
/// lock's doing.
#[test]
fn fifo_handoff_does_not_starve_anyone() {
    const EACH: u64 = 2000;
    const PER: usize = 4;
    let ios: Vec<_> = (0..2)
        .map(|i| IoThread::spawn(&format!("fair-{i}")).unwrap())
        .collect();
    let m = Arc::new(CoMutex::new(0u64));
    let (tx, rx) = mpsc::channel();
    for io in &ios {
        for _ in 0..PER {
            let (m, tx) = (m.clone(), tx.clone());
            io.context().bh_schedule_oneshot(move || {
                let co = Coroutine::new(move || {
                    for _ in 0..EACH {
                        let mut g = m.lock();
                        *g += 1;
                        coroutine::yield_now(); // contend while holding
                    }
                    tx.send(EACH).unwrap();
                });
                co.enter();
                co.detach();
            });
        }
    }
    let done: u64 = (0..2 * PER)
        .map(|_| {
            rx.recv_timeout(Duration::from_secs(60))
                .expect("a coroutine starved: it never completed its locks")
        })
        .sum();
    assert_eq!(done, 2 * PER as u64 * EACH);
    let (tx, rx) = mpsc::channel();
    let m2 = m.clone();
    ios[0]
        .context()
        .bh_schedule_oneshot(move || tx.send(*m2.try_lock().unwrap()).unwrap());
    assert_eq!(rx.recv().unwrap(), 2 * PER as u64 * EACH);
    for io in ios {
        io.stop();
    }
}
