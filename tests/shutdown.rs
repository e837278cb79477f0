//! `AioContext::shutdown` and the last handle dropped off the home thread
//! (DESIGN.md, "Thread model", bullet "Shutdown"): shutdown empties the
//! home-thread state completely even when a destructor panics, nothing can
//! be armed, registered or queued on a shut-down context, and the last
//! handle dropped on another thread never drops a home-thread value.
//!
//! The canaries below record the thread that drops them; a canary dropped
//! off the thread that created it is the bug (leaking one is acceptable).

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::thread::{self, ThreadId};
use std::time::Duration;

use coroloop::aio::{AioContext, ClockType, Timer};
use coroloop::coroutine::{self, Coroutine};

mod common;
use common::on_fresh_thread;

/// Where each canary was dropped: its name and whether that was on the
/// thread that created it.
#[derive(Clone, Default)]
struct Drops(Arc<Mutex<Vec<(&'static str, bool)>>>);

impl Drops {
    fn canary(&self, name: &'static str) -> Canary {
        Canary {
            name,
            home: thread::current().id(),
            drops: self.clone(),
        }
    }

    /// The canaries dropped on a thread other than their own.
    fn off_thread(&self) -> Vec<&'static str> {
        let d = self.0.lock().unwrap();
        d.iter()
            .filter(|(_, home)| !home)
            .map(|(n, _)| *n)
            .collect()
    }

    fn dropped(&self, name: &str) -> bool {
        self.0.lock().unwrap().iter().any(|(n, _)| *n == name)
    }
}

/// A `!Send` value bound to its thread (held in an `Rc` by the callbacks).
struct Canary {
    name: &'static str,
    home: ThreadId,
    drops: Drops,
}

impl Drop for Canary {
    fn drop(&mut self) {
        let home = thread::current().id() == self.home;
        self.drops.0.lock().unwrap().push((self.name, home));
    }
}

/// Drops the last handle of `ctx` on another thread (with a watchdog).
fn drop_last_handle_elsewhere(ctx: AioContext) {
    on_fresh_thread(move || drop(ctx));
}

type Slot = Rc<RefCell<Option<Timer>>>;

fn slot_mod(slot: &Slot, expire: i64) {
    slot.borrow()
        .as_ref()
        .expect("timer in its slot")
        .mod_ns(expire);
}

// Hole: a nested poll's "busy" path re-armed a timer whose callback was
// running after another callback had shut the context down; the timer
// stayed in the home-thread state, which `Inner::drop` then dropped on the
// thread holding the last handle, with the `Rc`s its callback owned.
#[test]
fn a_timer_rearmed_by_a_nested_poll_after_shutdown_is_not_dropped_off_thread() {
    let drops = Drops::default();
    let ctx = AioContext::new().unwrap();
    let slot_a: Slot = Default::default();
    let slot_b: Slot = Default::default();
    let sb = slot_b.clone();
    let tb = ctx.timer_new(ClockType::Virtual, move || {
        AioContext::current().unwrap().shutdown();
        drop(sb.borrow_mut().take());
    });
    *slot_b.borrow_mut() = Some(tb);
    let (sa, sb) = (slot_a.clone(), slot_b.clone());
    let canary = Rc::new(drops.canary("timer A's callback"));
    let ta = ctx.timer_new(ClockType::Virtual, move || {
        let _keep = &canary;
        let ctx = AioContext::current().unwrap();
        slot_mod(&sa, 0); // re-armed while it runs
        slot_mod(&sb, 0); // B shuts the context down
        ctx.advance_virtual_clock(100);
        ctx.poll(false); // nested: A is busy, B shuts down
        drop(sa.borrow_mut().take()); // A's handle goes while it runs
    });
    *slot_a.borrow_mut() = Some(ta);
    slot_mod(&slot_a, 0);
    ctx.poll(false);
    assert!(!ctx.poll(false), "shut down: nothing runs");
    // Its handle went while it ran: the node, and the callback, went when
    // the callback returned.
    assert!(drops.dropped("timer A's callback"));
    drop_last_handle_elsewhere(ctx);
    assert_eq!(drops.off_thread(), Vec::<&str>::new());
}

// Defect: `Timers::clear` reset the armed counts but left the nodes armed,
// so `Timer::del` after shutdown subtracted from 0.
#[test]
fn timer_del_after_shutdown_does_not_underflow() {
    let ctx = AioContext::new().unwrap();
    let t = ctx.timer_new(ClockType::Virtual, || unreachable!("fired after shutdown"));
    let t2 = ctx.timer_new(ClockType::Realtime, || unreachable!("fired after shutdown"));
    t.mod_ns(1_000);
    t2.mod_after(Duration::from_secs(3600));
    ctx.shutdown();
    t.del(); // subtracted from the cleared armed count
    assert!(!t2.is_pending(), "shutdown disarmed the timer");
    assert_eq!(t2.expire_time(), None);
    t2.del();
    t.mod_ns(0);
    assert!(!t.is_pending(), "a shut-down context arms nothing");
    ctx.advance_virtual_clock(10_000);
    assert!(!ctx.poll(false));
    drop((t, t2));
}

// Defect: a coroutine suspended inside a timer callback (it ran a nested
// poll) left the callback borrowed; every later pass found the timer busy
// and re-armed it at `now`, so `poll` never slept again.
#[test]
fn a_coroutine_suspended_in_a_timer_callback_does_not_make_poll_spin() {
    on_fresh_thread(|| {
        let ctx = AioContext::new().unwrap();
        let slot: Slot = Default::default();
        let runs = Rc::new(Cell::new(0u32));
        let (s, r) = (slot.clone(), runs.clone());
        let t = ctx.timer_new(ClockType::Virtual, move || {
            r.set(r.get() + 1);
            if r.get() == 1 {
                slot_mod(&s, 0); // periodic: re-armed first
                coroutine::suspend(); // then waits for something
            }
        });
        *slot.borrow_mut() = Some(t);
        slot_mod(&slot, 0);
        let c = ctx.clone();
        let co = Coroutine::new(move || {
            c.poll(false);
        });
        co.enter();
        assert_eq!(runs.get(), 1);
        assert!(!co.is_finished(), "suspended inside the timer callback");
        for _ in 0..3 {
            assert!(!ctx.poll(false), "the busy timer is not progress");
            assert_ne!(
                ctx.compute_timeout(),
                Some(Duration::ZERO),
                "a timer whose callback is suspended keeps the loop spinning"
            );
        }
        assert_eq!(runs.get(), 1);
        // The callback returns: the expiry it missed runs now.
        co.enter();
        assert!(co.is_finished());
        assert!(ctx.poll(false));
        assert_eq!(runs.get(), 2, "the missed expiry fired once");
        assert!(!ctx.poll(false));
        assert_eq!(ctx.compute_timeout(), None);
        drop(slot.borrow_mut().take());
    });
}

// The pending re-fire of a busy timer is dropped when the timer is deleted
// or re-armed meanwhile.
#[test]
fn a_busy_timer_deleted_while_its_callback_runs_does_not_fire_again() {
    let ctx = AioContext::new().unwrap();
    let slot: Slot = Default::default();
    let runs = Rc::new(Cell::new(0u32));
    let (s, r) = (slot.clone(), runs.clone());
    let t = ctx.timer_new(ClockType::Virtual, move || {
        r.set(r.get() + 1);
        if r.get() == 1 {
            slot_mod(&s, 0);
            AioContext::current().unwrap().poll(false); // finds it busy
            s.borrow().as_ref().unwrap().del();
        }
    });
    *slot.borrow_mut() = Some(t);
    slot_mod(&slot, 0);
    assert!(ctx.poll(false));
    assert!(!ctx.poll(false));
    assert_eq!(runs.get(), 1);
    assert!(!slot.borrow().as_ref().unwrap().is_pending());
    drop(slot.borrow_mut().take());
}

// Defect: after a callback shut the context down inside a nested poll, the
// nested busy path re-armed the outer timer and the outer pass ran it
// again, on the shut-down context.
#[test]
fn no_timer_callback_runs_after_shutdown() {
    let ctx = AioContext::new().unwrap();
    let shut = Rc::new(Cell::new(false));
    let late = Rc::new(Cell::new(0u32));
    let slot_a: Slot = Default::default();
    let slot_b: Slot = Default::default();
    let (sh, l) = (shut.clone(), late.clone());
    let tb = ctx.timer_new(ClockType::Virtual, move || {
        if sh.get() {
            l.set(l.get() + 1);
        }
        sh.set(true);
        AioContext::current().unwrap().shutdown();
    });
    *slot_b.borrow_mut() = Some(tb);
    let (sa, sb, sh, l) = (slot_a.clone(), slot_b.clone(), shut.clone(), late.clone());
    let ta = ctx.timer_new(ClockType::Virtual, move || {
        if sh.get() {
            l.set(l.get() + 1);
            return;
        }
        slot_mod(&sa, 0);
        slot_mod(&sb, 0);
        AioContext::current().unwrap().poll(false); // B shuts down
    });
    *slot_a.borrow_mut() = Some(ta);
    slot_mod(&slot_a, 0);
    ctx.poll(false);
    assert!(shut.get());
    assert!(!ctx.poll(false));
    assert_eq!(late.get(), 0, "a timer callback ran after shutdown");
    for s in [&slot_a, &slot_b] {
        assert!(!s.borrow().as_ref().unwrap().is_pending());
        drop(s.borrow_mut().take());
    }
}
