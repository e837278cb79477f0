//! Timers: QEMU's /aio/timer/schedule re-derived, plus virtual-clock
//! determinism and the no-busy-loop guarantee.

use std::cell::Cell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use coroloop::aio::{AioContext, ClockType, Timer};

// /aio/timer/schedule: realtime timer, 750 ms period, max 2 runs.
#[test]
fn timer_schedule() {
    let ctx = AioContext::new().unwrap();
    let n = Rc::new(Cell::new(0));
    let period = Duration::from_millis(750);
    let slot: Rc<std::cell::RefCell<Option<Timer>>> = Rc::default();
    let (n2, s2) = (n.clone(), slot.clone());
    let t = ctx.timer_new(ClockType::Realtime, move || {
        n2.set(n2.get() + 1);
        if n2.get() < 2 {
            s2.borrow().as_ref().unwrap().mod_after(period);
        }
    });
    t.mod_after(period);
    *slot.borrow_mut() = Some(t);
    while ctx.poll(false) {}
    assert!(!ctx.poll(false));
    assert_eq!(n.get(), 0);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(n.get(), 0, "nothing runs without polling");
    assert!(ctx.poll(false));
    assert_eq!(n.get(), 1);
    while ctx.poll(false) {}
    assert!(!ctx.poll(false));
    assert_eq!(n.get(), 1);
    // A blocking poll sleeps until the deadline, about 750 ms, then runs it.
    let start = Instant::now();
    let mut polls = 0;
    while n.get() < 2 {
        ctx.poll(true);
        polls += 1;
    }
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(740),
        "woke early: {waited:?}"
    );
    assert!(polls <= 2, "{polls} polls: busy loop");
    assert!(!ctx.poll(false));
    assert_eq!(n.get(), 2);
}

#[test]
fn far_timer_does_not_busy_loop() {
    let ctx = AioContext::new().unwrap();
    let t = ctx.timer_new(ClockType::Realtime, || {});
    t.mod_after(Duration::from_millis(50));
    let start = Instant::now();
    let mut polls = 0;
    while t.is_pending() {
        ctx.poll(true);
        polls += 1;
    }
    assert!(start.elapsed() >= Duration::from_millis(49));
    assert!(polls <= 2, "{polls} polls for one 50 ms timer");
}

#[test]
fn virtual_clock_is_deterministic() {
    let ctx = AioContext::new().unwrap();
    let order = Rc::new(std::cell::RefCell::new(Vec::new()));
    let timers: Vec<Timer> = [30, 10, 20]
        .iter()
        .map(|&at| {
            let o = order.clone();
            let t = ctx.timer_new(ClockType::Virtual, move || o.borrow_mut().push(at));
            t.mod_ns(at);
            t
        })
        .collect();
    assert_eq!(
        ctx.compute_timeout(),
        None,
        "virtual time does not pass by itself"
    );
    assert!(!ctx.poll(false));
    ctx.advance_virtual_clock(15);
    assert!(ctx.poll(true));
    assert_eq!(*order.borrow(), [10]);
    ctx.advance_virtual_clock(15);
    assert!(ctx.poll(false));
    assert_eq!(*order.borrow(), [10, 20, 30]);
    assert!(timers.iter().all(|t| !t.is_pending()));
}

#[test]
fn mod_anticipate_del_and_expire_time() {
    let ctx = AioContext::new().unwrap();
    let fired = Rc::new(Cell::new(0));
    let f = fired.clone();
    let t = ctx.timer_new(ClockType::Virtual, move || f.set(f.get() + 1));
    assert_eq!(t.expire_time(), None);
    t.mod_ns(100);
    assert_eq!(t.expire_time(), Some(100));
    t.mod_anticipate(200);
    assert_eq!(t.expire_time(), Some(100), "later deadline ignored");
    t.mod_anticipate(50);
    assert_eq!(t.expire_time(), Some(50));
    t.mod_ns(500); // plain mod may postpone
    assert_eq!(t.expire_time(), Some(500));
    t.del();
    assert!(!t.is_pending());
    ctx.advance_virtual_clock(1000);
    assert!(!ctx.poll(false));
    assert_eq!(fired.get(), 0);
    t.mod_ns(0); // in the past: fires on the next poll
    assert!(ctx.poll(false));
    assert_eq!(fired.get(), 1);
    // Dropping an armed timer deletes it.
    let f = fired.clone();
    let t2 = ctx.timer_new(ClockType::Virtual, move || f.set(f.get() + 10));
    t2.mod_ns(2000);
    drop(t2);
    ctx.advance_virtual_clock(5000);
    assert!(!ctx.poll(false));
    assert_eq!(fired.get(), 1);
}

#[test]
fn compute_timeout_folds_timers_and_bhs() {
    let ctx = AioContext::new().unwrap();
    assert_eq!(ctx.compute_timeout(), None);
    let t = ctx.timer_new(ClockType::Realtime, || {});
    t.mod_after(Duration::from_secs(5));
    let to = ctx.compute_timeout().unwrap();
    assert!(to <= Duration::from_secs(5) && to > Duration::from_secs(4));
    ctx.bh_schedule_oneshot(|| {});
    assert_eq!(ctx.compute_timeout(), Some(Duration::ZERO));
    assert!(ctx.poll(true));
}

#[test]
fn nanosecond_resolution() {
    let ctx = AioContext::new().unwrap();
    let t = ctx.timer_new(ClockType::Realtime, || {});
    let a = ctx.clock_ns(ClockType::Realtime);
    let b = ctx.clock_ns(ClockType::Realtime);
    assert!(b >= a);
    t.mod_after(Duration::from_micros(300));
    let start = Instant::now();
    while t.is_pending() {
        ctx.poll(true);
    }
    let el = start.elapsed();
    assert!(el >= Duration::from_micros(300), "{el:?}");
    assert!(
        el < Duration::from_millis(50),
        "sub-millisecond sleeps: {el:?}"
    );
    let host = ctx.clock_ns(ClockType::Host);
    assert!(
        host > 1_600_000_000_000_000_000,
        "wall clock in ns since 1970"
    );
}
