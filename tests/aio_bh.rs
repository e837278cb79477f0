//! Bottom halves: the BH cases of QEMU's tests/unit/test-aio.c, re-derived,
//! plus cross-thread scheduling with exact counts.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use coroloop::aio::{AioContext, LocalBh};

/// A BH that counts its runs and reschedules itself until `max`.
fn counting_bh(ctx: &AioContext, max: u32) -> (Rc<RefCell<Option<LocalBh>>>, Rc<Cell<u32>>) {
    let n = Rc::new(Cell::new(0));
    let slot: Rc<RefCell<Option<LocalBh>>> = Rc::new(RefCell::new(None));
    let (n2, s2) = (n.clone(), slot.clone());
    let bh = ctx.bh_new_local(move || {
        n2.set(n2.get() + 1);
        if n2.get() < max {
            s2.borrow().as_ref().unwrap().schedule();
        }
    });
    *slot.borrow_mut() = Some(bh);
    (slot, n)
}

/// A BH that counts, reschedules itself until `max`, then deletes itself.
fn deleting_bh(ctx: &AioContext, max: u32) -> (Rc<RefCell<Option<LocalBh>>>, Rc<Cell<u32>>) {
    let n = Rc::new(Cell::new(0));
    let slot: Rc<RefCell<Option<LocalBh>>> = Rc::new(RefCell::new(None));
    let (n2, s2) = (n.clone(), slot.clone());
    let bh = ctx.bh_new_local(move || {
        n2.set(n2.get() + 1);
        if n2.get() < max {
            s2.borrow().as_ref().unwrap().schedule();
        } else {
            // Delete from inside the callback: freed after it returns.
            let me = s2.borrow_mut().take();
            drop(me);
        }
    });
    *slot.borrow_mut() = Some(bh);
    (slot, n)
}

fn sched(slot: &Rc<RefCell<Option<LocalBh>>>) {
    slot.borrow().as_ref().unwrap().schedule();
}

// /aio/notify: a notify alone is not progress, and does not block the
// next non-blocking poll.
#[test]
fn notify_is_not_progress() {
    let ctx = AioContext::new().unwrap();
    assert!(!ctx.poll(false));
    ctx.notify();
    assert!(!ctx.poll(false));
    ctx.notify();
    // A blocking poll consumes the notify and returns without progress.
    assert!(!ctx.poll(true));
    assert!(!ctx.poll(false));
}

// /aio/bh/schedule and /aio/bh/flush
#[test]
fn bh_schedule() {
    let ctx = AioContext::new().unwrap();
    let (bh, n) = counting_bh(&ctx, 0);
    sched(&bh);
    assert_eq!(n.get(), 0);
    assert!(ctx.poll(true));
    assert_eq!(n.get(), 1);
    assert!(!ctx.poll(false));
    assert_eq!(n.get(), 1);
}

// /aio/bh/schedule10: one run per poll even though it reschedules itself.
#[test]
fn bh_schedule10() {
    let ctx = AioContext::new().unwrap();
    let (bh, n) = counting_bh(&ctx, 10);
    sched(&bh);
    assert_eq!(n.get(), 0);
    assert!(ctx.poll(false));
    assert_eq!(n.get(), 1);
    assert!(ctx.poll(true));
    assert_eq!(n.get(), 2);
    while n.get() < 10 {
        ctx.poll(true);
    }
    assert_eq!(n.get(), 10);
    assert!(!ctx.poll(false));
    assert_eq!(n.get(), 10);
}

// /aio/bh/cancel
#[test]
fn bh_cancel() {
    let ctx = AioContext::new().unwrap();
    let (bh, n) = counting_bh(&ctx, 0);
    sched(&bh);
    bh.borrow().as_ref().unwrap().cancel();
    assert!(!bh.borrow().as_ref().unwrap().is_scheduled());
    assert!(!ctx.poll(false));
    assert_eq!(n.get(), 0);
    // Scheduling again after a cancel works (the node is not linked twice).
    sched(&bh);
    assert!(ctx.poll(false));
    assert_eq!(n.get(), 1);
}

// /aio/bh/delete
#[test]
fn bh_delete_while_scheduled() {
    let ctx = AioContext::new().unwrap();
    let (bh, n) = counting_bh(&ctx, 0);
    sched(&bh);
    drop(bh.borrow_mut().take());
    assert!(!ctx.poll(false));
    assert_eq!(n.get(), 0);
}

// /aio/bh/callback-delete/one
#[test]
fn bh_callback_delete_one() {
    let ctx = AioContext::new().unwrap();
    let (bh, n) = deleting_bh(&ctx, 1);
    sched(&bh);
    assert_eq!(n.get(), 0);
    while n.get() < 1 {
        ctx.poll(true);
    }
    assert_eq!(n.get(), 1);
    assert!(bh.borrow().is_none());
    assert!(!ctx.poll(false));
}

// /aio/bh/callback-delete/many
#[test]
fn bh_callback_delete_many() {
    let ctx = AioContext::new().unwrap();
    let bhs: Vec<_> = [1, 3, 2, 4]
        .iter()
        .map(|&m| (deleting_bh(&ctx, m), m))
        .collect();
    for ((bh, n), _) in &bhs {
        sched(bh);
        assert_eq!(n.get(), 0);
    }
    assert!(ctx.poll(false));
    for ((_, n), _) in &bhs {
        assert_eq!(n.get(), 1);
    }
    assert!(bhs[0].0 .0.borrow().is_none());
    while bhs.iter().any(|((_, n), m)| n.get() < *m) {
        ctx.poll(true);
    }
    for ((bh, n), m) in &bhs {
        assert_eq!(n.get(), *m);
        assert!(bh.borrow().is_none());
    }
}

#[test]
fn oneshot_runs_once_and_is_freed() {
    let ctx = AioContext::new().unwrap();
    let drops = Arc::new(AtomicU32::new(0));
    struct D(Arc<AtomicU32>);
    impl Drop for D {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }
    let runs = Rc::new(Cell::new(0));
    let (r, d) = (runs.clone(), D(drops.clone()));
    ctx.bh_schedule_oneshot_local(move || {
        let _d = &d;
        r.set(r.get() + 1);
    });
    assert!(ctx.poll(false));
    assert!(!ctx.poll(false));
    assert_eq!(runs.get(), 1);
    assert_eq!(drops.load(Ordering::Relaxed), 1);
}

#[test]
fn bh_scheduled_while_bhs_run_waits_for_the_next_pass() {
    let ctx = AioContext::new().unwrap();
    let log = Rc::new(RefCell::new(Vec::new()));
    let l = log.clone();
    let c2 = ctx.clone();
    ctx.bh_schedule_oneshot_local(move || {
        l.borrow_mut().push("first");
        let l2 = l.clone();
        c2.bh_schedule_oneshot_local(move || l2.borrow_mut().push("scheduled by first"));
    });
    assert!(ctx.poll(false));
    assert_eq!(*log.borrow(), ["first"]);
    assert!(ctx.poll(false));
    assert_eq!(*log.borrow(), ["first", "scheduled by first"]);
}

#[test]
fn nested_poll_inside_a_bh_runs_each_earlier_bh_exactly_once() {
    let ctx = AioContext::new().unwrap();
    let runs = Rc::new(RefCell::new(vec![0u32; 4]));
    for i in 0..4 {
        let (r, c) = (runs.clone(), ctx.clone());
        ctx.bh_schedule_oneshot_local(move || {
            r.borrow_mut()[i] += 1;
            if i == 0 {
                // The nested poll runs BHs 1..3 of the outer pass.
                assert!(c.poll(false));
                assert_eq!(*r.borrow(), [1, 1, 1, 1]);
            }
        });
    }
    assert!(ctx.poll(false));
    assert_eq!(*runs.borrow(), [1, 1, 1, 1]);
    assert!(!ctx.poll(false));
}

#[test]
fn bh_rescheduled_and_nested_poll_does_not_reenter_it() {
    let ctx = AioContext::new().unwrap();
    let depth = Rc::new(Cell::new(0));
    let runs = Rc::new(Cell::new(0));
    let slot: Rc<RefCell<Option<LocalBh>>> = Rc::new(RefCell::new(None));
    let (d, r, s, c) = (depth.clone(), runs.clone(), slot.clone(), ctx.clone());
    let bh = ctx.bh_new_local(move || {
        assert_eq!(d.get(), 0, "a BH callback is never re-entered");
        d.set(1);
        r.set(r.get() + 1);
        if r.get() == 1 {
            s.borrow().as_ref().unwrap().schedule();
            c.poll(false); // dequeues the BH: it must wait, not re-enter
        }
        d.set(0);
    });
    *slot.borrow_mut() = Some(bh);
    sched(&slot);
    ctx.poll(false);
    assert_eq!(runs.get(), 1);
    assert!(ctx.poll(false));
    assert_eq!(runs.get(), 2);
}

#[test]
fn send_bh_scheduled_from_other_threads_runs_on_home() {
    let ctx = AioContext::new().unwrap();
    let home = std::thread::current().id();
    let runs = Arc::new(AtomicU32::new(0));
    let r = runs.clone();
    let bh = Arc::new(ctx.bh_new(move || {
        assert_eq!(std::thread::current().id(), home);
        r.fetch_add(1, Ordering::Relaxed);
    }));
    let b = bh.clone();
    std::thread::spawn(move || b.schedule()).join().unwrap();
    assert!(ctx.poll(true));
    assert_eq!(runs.load(Ordering::Relaxed), 1);
    // Drop the last handle on another thread: deleted, freed on home.
    std::thread::spawn(move || drop(bh)).join().unwrap();
    assert!(!ctx.poll(false));
}

/// 200,000 oneshot BHs scheduled from 2 threads each run exactly once.
#[test]
fn two_hundred_thousand_oneshots_from_two_threads() {
    const PER_THREAD: u64 = 100_000;
    let ctx = AioContext::new().unwrap();
    let sum = Arc::new(AtomicU64::new(0));
    let count = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..2u64)
        .map(|t| {
            let (ctx, sum, count) = (ctx.clone(), sum.clone(), count.clone());
            std::thread::spawn(move || {
                for i in 0..PER_THREAD {
                    let v = t * PER_THREAD + i;
                    let (sum, count) = (sum.clone(), count.clone());
                    ctx.bh_schedule_oneshot(move || {
                        sum.fetch_add(v, Ordering::Relaxed);
                        count.fetch_add(1, Ordering::Relaxed);
                    });
                }
            })
        })
        .collect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while count.load(Ordering::Relaxed) < 2 * PER_THREAD {
        ctx.poll(true);
        assert!(std::time::Instant::now() < deadline, "timed out");
    }
    for t in threads {
        t.join().unwrap();
    }
    while ctx.poll(false) {}
    let n = 2 * PER_THREAD;
    assert_eq!(count.load(Ordering::Relaxed), n);
    assert_eq!(sum.load(Ordering::Relaxed), n * (n - 1) / 2);
}

#[test]
fn panic_in_a_bh_leaves_the_context_usable() {
    let ctx = AioContext::new().unwrap();
    let ran = Rc::new(Cell::new(false));
    ctx.bh_schedule_oneshot_local(|| panic!("bh boom"));
    let r = ran.clone();
    ctx.bh_schedule_oneshot_local(move || r.set(true));
    let err = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| ctx.poll(false)));
    assert!(err.is_err());
    assert!(!ran.get(), "the pass stopped at the panic");
    assert!(ctx.poll(false), "the rest runs on the next poll");
    assert!(ran.get());
    assert!(!ctx.poll(false));
}

#[test]
fn poll_off_the_home_thread_panics() {
    let ctx = AioContext::new().unwrap();
    let c = ctx.clone();
    let err = std::thread::spawn(move || c.poll(false))
        .join()
        .unwrap_err();
    let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
    assert_eq!(
        msg,
        "`AioContext::poll` called off the context's home thread"
    );
}
