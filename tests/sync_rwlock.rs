//! CoRwLock and CoSleep: QEMU's test-coroutine.c rwlock cases re-derived.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use coroloop::aio::{AioContext, ClockType};
use coroloop::coroutine::{self, Coroutine};
use coroloop::sync::{CoRwLock, CoSleep};

// /locking/co-rwlock/upgrade: a sole reader that upgrades while a writer
// waits goes behind the writer.
#[test]
fn rwlock_upgrade() {
    let l = Rc::new(CoRwLock::new(()));
    let (c1_done, c2_done) = (Rc::new(Cell::new(false)), Rc::new(Cell::new(false)));
    let (l1, d1) = (l.clone(), c1_done.clone());
    let c1 = Coroutine::new(move || {
        let r = l1.read();
        coroutine::suspend();
        let w = CoRwLock::upgrade(r);
        drop(w);
        d1.set(true);
    });
    let (l2, d2) = (l.clone(), c2_done.clone());
    let c2 = Coroutine::new(move || {
        let w = l2.write();
        coroutine::suspend();
        drop(w);
        d2.set(true);
    });
    c1.enter();
    c2.enter(); // queued behind the reader
    c1.enter(); // upgrade: must queue behind c2 (which gets the lock)
    assert!(!c1_done.get());
    c2.enter(); // c2 unlocks; c1 gets the write lock and finishes
    assert!(c1_done.get());
    assert!(c2_done.get());
}

// /locking/co-rwlock/downgrade: readers and writers waiting behind a
// reader; a downgrade admits the readers, no hang.
#[test]
fn rwlock_downgrade() {
    let l = Rc::new(CoRwLock::new(()));
    let done: Vec<_> = (0..4).map(|_| Rc::new(Cell::new(false))).collect();
    let (l1, d1) = (l.clone(), done[0].clone());
    let c1 = Coroutine::new(move || {
        let r = l1.read();
        coroutine::suspend();
        drop(r);
        coroutine::suspend();
        d1.set(true);
    });
    let (l2, d2) = (l.clone(), done[1].clone());
    let c2 = Coroutine::new(move || {
        let w = l2.write();
        let r = CoRwLock::downgrade(w);
        drop(r);
        d2.set(true);
    });
    let (l3, d3) = (l.clone(), done[2].clone());
    let c3 = Coroutine::new(move || {
        drop(l3.read());
        d3.set(true);
    });
    let (l4, d4) = (l.clone(), done[3].clone());
    let c4 = Coroutine::new(move || {
        drop(l4.write());
        d4.set(true);
    });
    c1.enter();
    c2.enter();
    c3.enter();
    c4.enter();
    c1.enter();
    assert!(done[1].get() && done[2].get() && done[3].get());
    c1.enter();
    assert!(done[0].get());
}

// Ticket fairness: a waiting writer blocks readers that come after it.
#[test]
fn rwlock_waiting_writer_blocks_later_readers() {
    let l = Rc::new(CoRwLock::new(0));
    let order = Rc::new(RefCell::new(Vec::new()));
    let (l1, o1) = (l.clone(), order.clone());
    let r1 = Coroutine::new(move || {
        let _r = l1.read();
        o1.borrow_mut().push("r1");
        coroutine::suspend();
    });
    let (l2, o2) = (l.clone(), order.clone());
    let w = Coroutine::new(move || {
        *l2.write() += 1;
        o2.borrow_mut().push("w");
    });
    let (l3, o3) = (l.clone(), order.clone());
    let r2 = Coroutine::new(move || {
        let v = *l3.read();
        o3.borrow_mut().push("r2");
        assert_eq!(v, 1, "r2 came after the writer");
    });
    r1.enter();
    w.enter();
    r2.enter();
    assert_eq!(*order.borrow(), ["r1"], "r2 waits behind the writer");
    r1.enter();
    assert_eq!(*order.borrow(), ["r1", "w", "r2"]);
}

#[test]
fn rwlock_unwound_waiter_keeps_the_queue_consistent() {
    let l = Rc::new(CoRwLock::new(0));
    let l0 = l.clone();
    let holder = Coroutine::new(move || {
        let _w = l0.write();
        coroutine::suspend();
    });
    holder.enter();
    let mk_reader = || {
        let l = l.clone();
        Coroutine::new(move || *l.read())
    };
    let (a, b) = (mk_reader(), mk_reader());
    let l3 = l.clone();
    let w2 = Coroutine::new(move || *l3.write() = 7);
    a.enter();
    w2.enter();
    b.enter();
    drop(w2); // the queued writer is unwound
    holder.enter(); // releases: both readers are admitted together
    assert!(a.is_finished() && b.is_finished());
    assert_eq!(a.take_result(), Some(0));
}

#[test]
fn co_sleep_wake_and_timeout() {
    let ctx = AioContext::new().unwrap();
    let s = Arc::new(CoSleep::new());
    let s2 = s.clone();
    // The virtual clock makes the timeout deterministic.
    let co = Coroutine::new(move || s2.sleep_for(ClockType::Virtual, Duration::from_micros(20)));
    co.enter();
    // Stray wakes do not end it.
    co.wake();
    co.remote().wake();
    ctx.poll(false);
    assert!(!co.is_finished());
    ctx.advance_virtual_clock(19_999);
    ctx.poll(false);
    assert!(!co.is_finished(), "not yet due");
    ctx.advance_virtual_clock(1);
    ctx.poll_while(|| !co.is_finished());
    assert_eq!(co.take_result(), Some(false), "timed out, not woken");
    // Woken from another thread before the timeout.
    let s3 = s.clone();
    let co = Coroutine::new(move || s3.sleep_for(ClockType::Realtime, Duration::from_secs(60)));
    co.enter();
    let s4 = s.clone();
    std::thread::spawn(move || assert!(s4.wake()))
        .join()
        .unwrap();
    ctx.poll_while(|| !co.is_finished());
    assert_eq!(co.take_result(), Some(true));
    assert!(!s.wake(), "nobody sleeps now");
    // Plain sleep until woken.
    let s5 = s.clone();
    let co = Coroutine::new(move || s5.sleep());
    co.enter();
    assert!(s.wake());
    assert!(
        co.is_finished(),
        "woken outside a coroutine: entered at once"
    );
}

// try_read / try_write follow the tickets: no barging past a waiting writer.
#[test]
fn try_locks_respect_waiting_writers() {
    let l = Rc::new(CoRwLock::new(()));
    let r = l.try_read().expect("free lock: read");
    assert!(l.try_write().is_none(), "a reader holds it");
    let l2 = l.clone();
    let writer = Coroutine::new(move || drop(l2.write()));
    writer.enter(); // queued behind the reader
    assert!(!writer.is_finished());
    assert!(l.try_read().is_none(), "a writer waits: no new readers");
    drop(r); // the writer is granted and runs
    assert!(writer.is_finished());
    let w = l.try_write().expect("free again");
    assert!(l.try_read().is_none());
    drop(w);
    assert!(l.try_read().is_some());
}

// The locks reuse a thread's finished wait record for the next wait: a
// record last used by a writer (or a `CoMutex` waiter) must come back as a
// reader's, so two readers queued behind a writer are admitted together,
// and a mutex waiter's record serves a later read wait.
#[test]
fn reused_wait_records_take_the_new_waits_mode() {
    let m = Rc::new(coroloop::sync::CoMutex::new(()));
    let l = Rc::new(CoRwLock::new(()));
    let log = Rc::new(RefCell::new(Vec::new()));
    // Round 1: a mutex wait (an exclusive record), finished.
    let holder = {
        let m = m.clone();
        Coroutine::new(move || {
            let g = m.lock();
            coroutine::suspend();
            drop(g);
        })
    };
    let waiter = {
        let (m, log) = (m.clone(), log.clone());
        Coroutine::new(move || {
            drop(m.lock());
            log.borrow_mut().push("mutex");
        })
    };
    holder.enter();
    waiter.enter();
    holder.enter();
    assert!(waiter.is_finished() && holder.is_finished());
    // Round 2: a writer holds; two readers queue (the first reuses the
    // exclusive record above); both must hold the read lock together.
    let writer = {
        let l = l.clone();
        Coroutine::new(move || {
            let g = l.write();
            coroutine::suspend();
            drop(g);
        })
    };
    let inside = Rc::new(Cell::new(0));
    let max_inside = Rc::new(Cell::new(0));
    let reader = |name: &'static str| {
        let (l, log, inside, max_inside) =
            (l.clone(), log.clone(), inside.clone(), max_inside.clone());
        Coroutine::new(move || {
            let g = l.read();
            inside.set(inside.get() + 1);
            max_inside.set(max_inside.get().max(inside.get()));
            coroutine::suspend();
            inside.set(inside.get() - 1);
            drop(g);
            log.borrow_mut().push(name);
        })
    };
    let (r1, r2) = (reader("r1"), reader("r2"));
    writer.enter();
    r1.enter();
    r2.enter();
    writer.enter(); // releases: both readers are admitted
    assert_eq!(max_inside.get(), 2, "the readers did not share the lock");
    r1.enter();
    r2.enter();
    assert!(r1.is_finished() && r2.is_finished());
    assert_eq!(*log.borrow(), ["mutex", "r1", "r2"]);
}
