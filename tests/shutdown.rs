//! `AioContext::shutdown` and the last handle dropped off the home thread
//! (ARCHITECTURE.md, "Shutdown and thread teardown"): shutdown empties the
//! home-thread state completely even when a destructor panics, nothing can
//! be armed, registered or queued on a shut-down context, and the last
//! handle dropped on another thread never drops a home-thread value.
//!
//! The canaries below record the thread that drops them; a canary dropped
//! off the thread that created it is the bug (leaking one is acceptable).

use std::cell::{Cell, RefCell};
use std::os::unix::net::UnixStream;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::thread::{self, ThreadId};
use std::time::Duration;

use coroloop::aio::{AioContext, ClockType, Timer};
use coroloop::coroutine::{self, Coroutine};

mod common;
use common::{captured_logs, on_fresh_thread, payload_message};

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

fn logged(line: &str) -> bool {
    captured_logs().0.lock().unwrap().iter().any(|l| l == line)
}

/// Drops the last handle of `ctx` on another thread (with a watchdog).
fn drop_last_handle_elsewhere(ctx: AioContext) {
    on_fresh_thread(move || drop(ctx));
}

/// Panics when dropped (a destructor that fails during shutdown).
struct Boom(&'static str);
impl Drop for Boom {
    fn drop(&mut self) {
        panic!("{}", self.0);
    }
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

// Hole: shutdown() marked the context dead, then a BH closure's destructor
// panicked: the timers and fd handlers were never cleared, and the last
// handle dropped on another thread dropped them there.
#[test]
fn shutdown_empties_everything_even_when_a_destructor_panics() {
    let drops = Drops::default();
    let ctx = AioContext::new().unwrap();
    let c = Rc::new(drops.canary("fd handler"));
    let (a, _b) = UnixStream::pair().unwrap();
    let h = ctx
        .set_fd_handler(
            a,
            false,
            Some(Box::new(move || {
                let _ = &c;
            })),
            None,
            None,
        )
        .unwrap();
    let boom = Boom("boom in a BH closure's destructor");
    ctx.bh_schedule_oneshot_local(move || drop(boom)); // never runs
    let c = Rc::new(drops.canary("BH queued after the panicking one"));
    ctx.bh_schedule_oneshot_local(move || {
        let _ = &c;
    });
    let c = Rc::new(drops.canary("detached coroutine"));
    Coroutine::new(move || {
        let _keep = &c;
        coroutine::suspend();
    })
    .tap_enter()
    .detach();
    let r = catch_unwind(AssertUnwindSafe(|| ctx.shutdown()));
    let p = r.expect_err("shutdown resumes the destructor's panic");
    assert_eq!(payload_message(&*p), "boom in a BH closure's destructor");
    for name in [
        "fd handler",
        "BH queued after the panicking one",
        "detached coroutine",
    ] {
        assert!(drops.dropped(name), "shutdown dropped the {name}");
    }
    assert_eq!(ctx.detached_count(), 0);
    assert!(!ctx.poll(false));
    drop(h);
    drop_last_handle_elsewhere(ctx);
    assert_eq!(drops.off_thread(), Vec::<&str>::new());
}

// Several destructors panic in several parts of the teardown: the first
// panic is resumed once everything is cleared (the others are logged).
#[test]
fn shutdown_resumes_the_first_panic_after_clearing_the_rest() {
    captured_logs();
    let drops = Drops::default();
    let ctx = AioContext::new().unwrap();
    let boom = Boom("first: a BH closure");
    ctx.bh_schedule_oneshot_local(move || drop(boom));
    let boom = Boom("second: another BH closure");
    ctx.bh_schedule_oneshot_local(move || drop(boom));
    let (a, _b) = UnixStream::pair().unwrap();
    let boom = Boom("third: an fd handler");
    let c = Rc::new(drops.canary("write handler of the same fd"));
    let h = ctx
        .set_fd_handler(
            a,
            false,
            Some(Box::new(move || {
                let _ = &boom;
            })),
            Some(Box::new(move || {
                let _ = &c;
            })),
            None,
        )
        .unwrap();
    let (a, _b) = UnixStream::pair().unwrap();
    let c = Rc::new(drops.canary("second fd handler"));
    let h2 = ctx
        .set_fd_handler(
            a,
            false,
            Some(Box::new(move || {
                let _ = &c;
            })),
            None,
            None,
        )
        .unwrap();
    let r = catch_unwind(AssertUnwindSafe(|| ctx.shutdown()));
    let p = r.expect_err("shutdown resumes the first panic");
    assert_eq!(payload_message(&*p), "first: a BH closure");
    assert!(drops.dropped("write handler of the same fd"));
    assert!(drops.dropped("second fd handler"));
    for other in ["second: another BH closure", "third: an fd handler"] {
        let line = format!(
            "ERROR coroloop: AioContext::shutdown: another destructor panicked ({other}); \
             only the first panic is resumed"
        );
        assert!(logged(&line), "{line}");
    }
    ctx.shutdown(); // idempotent, and nothing left to panic
    drop((h, h2));
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

// Timers deleted by a destructor that shutdown runs while it clears the
// timers (a callback kept by a stale heap entry owns their handles) are
// already disarmed: the armed counts stay in step.
#[test]
fn timers_deleted_by_a_destructor_run_by_shutdown() {
    let ctx = AioContext::new().unwrap();
    let top = ctx.timer_new(ClockType::Virtual, || ()); // keeps Y's entry from the top
    top.mod_ns(500);
    let xs: Vec<Timer> = (0..8)
        .map(|i| {
            let t = ctx.timer_new(ClockType::Virtual, || unreachable!("fired after shutdown"));
            t.mod_ns(5_000 + i);
            t
        })
        .collect();
    let slot: Slot = Default::default();
    let s = slot.clone();
    let y = ctx.timer_new(ClockType::Virtual, move || {
        let _keep = &xs;
        slot_mod(&s, 1_000);
        drop(s.borrow_mut().take()); // its stale entry keeps this callback
    });
    *slot.borrow_mut() = Some(y);
    slot_mod(&slot, 0);
    assert!(ctx.poll(false));
    ctx.shutdown(); // dropping Y's entry drops the xs
    assert!(!top.is_pending());
    top.del();
    ctx.advance_virtual_clock(10_000);
    assert!(!ctx.poll(false));
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

// What destructors run by shutdown try to add is refused: the timer they
// arm, the handler they register, the BH they schedule, the coroutine they
// detach.
#[test]
fn destructors_run_by_shutdown_cannot_add_work() {
    struct AddsWork {
        ctx: AioContext,
        timer: Timer,
        drops: Drops,
    }
    impl Drop for AddsWork {
        fn drop(&mut self) {
            self.timer.mod_ns(0);
            assert!(!self.timer.is_pending());
            let c = Rc::new(self.drops.canary("late handler"));
            let (a, _b) = UnixStream::pair().unwrap();
            assert!(self
                .ctx
                .set_fd_handler(
                    a,
                    false,
                    Some(Box::new(move || {
                        let _ = &c;
                    })),
                    None,
                    None
                )
                .is_err());
            let c = Rc::new(self.drops.canary("late BH"));
            self.ctx.bh_schedule_oneshot_local(move || {
                let _ = &c;
            });
            let c = Rc::new(self.drops.canary("late coroutine"));
            let co = Coroutine::new(move || {
                let _keep = &c;
                coroutine::suspend();
            });
            co.enter();
            // Created during the shutdown: it belongs to the dying context,
            // whose closed list cancels it at its first suspension; `detach`
            // is refused without a panic (it is cancelled).
            assert!(co.is_finished());
            co.detach();
            assert_eq!(self.ctx.detached_count(), 0);
        }
    }
    let drops = Drops::default();
    let ctx = AioContext::new().unwrap();
    let fired = Rc::new(Cell::new(false));
    let f = fired.clone();
    let c = drops.canary("late timer's callback");
    let timer = ctx.timer_new(ClockType::Virtual, move || {
        let _ = &c;
        f.set(true);
    });
    let adds = AddsWork {
        ctx: ctx.clone(),
        timer,
        drops: drops.clone(),
    };
    let (a, _b) = UnixStream::pair().unwrap();
    let h = ctx
        .set_fd_handler(
            a,
            false,
            Some(Box::new(move || {
                let _ = &adds;
            })),
            None,
            None,
        )
        .unwrap();
    ctx.shutdown();
    for name in [
        "late handler",
        "late BH",
        "late coroutine",
        "late timer's callback",
    ] {
        assert!(drops.dropped(name), "{name} refused and dropped at once");
    }
    assert!(!ctx.poll(false));
    assert!(!fired.get());
    drop(h);
    drop_last_handle_elsewhere(ctx);
    assert_eq!(drops.off_thread(), Vec::<&str>::new());
}

// A context never shut down whose last handle goes on another thread while
// its home-thread state still holds a callback (a deleted timer's stale
// heap entry) leaks that state instead of dropping it there.
#[test]
fn last_handle_off_home_leaks_home_state_that_is_not_empty() {
    captured_logs();
    let drops = Drops::default();
    let d = drops.clone();
    let ctx = on_fresh_thread(move || {
        let ctx = AioContext::builder().name("leaky").build().unwrap();
        // Y stays at the top of the heap (its entry goes stale when Y is
        // dropped, but is not expired), so X's stale entry is never popped.
        let y = ctx.timer_new(ClockType::Virtual, || ());
        y.mod_ns(500);
        let slot: Slot = Default::default();
        let s = slot.clone();
        let c = Rc::new(d.canary("deleted timer's callback"));
        let x = ctx.timer_new(ClockType::Virtual, move || {
            let _keep = &c;
            slot_mod(&s, 1_000);
            drop(s.borrow_mut().take()); // deleted while it runs: keeps its callback
        });
        *slot.borrow_mut() = Some(x);
        slot_mod(&slot, 0);
        assert!(ctx.poll(false));
        drop(y);
        let other = ctx.clone();
        // Not the last handle: no shutdown.
        drop(ctx);
        other
    });
    drop(ctx); // the last handle, off the home thread
    assert_eq!(drops.off_thread(), Vec::<&str>::new());
    assert!(!drops.dropped("deleted timer's callback"), "leaked");
    assert!(logged(
        "WARN coroloop: AioContext Some(\"leaky\") dropped off its home thread without \
         shutdown; its home-thread state still holds timers: leaked (it cannot be dropped on \
         this thread)"
    ));
}

/// Enters a coroutine and hands it back (for a chain ending in `detach`).
trait TapEnter {
    fn tap_enter(self) -> Self;
}

impl<T> TapEnter for Coroutine<T> {
    fn tap_enter(self) -> Self {
        self.enter();
        self
    }
}

/// Found by the API fuzzer (program seed 8454365929731295474): a blocking
/// `poll` of a shut-down context, from a coroutine, slept until a notify
/// that nothing would send. It returns `false` at once now; `poll_while`
/// still sleeps until another thread kicks it.
#[test]
fn a_blocking_poll_of_a_shut_down_context_returns() {
    common::on_fresh_thread(|| {
        let ctx = AioContext::new().unwrap();
        ctx.shutdown();
        assert!(!ctx.poll(true));
        let c2 = ctx.clone();
        let co = coroloop::Coroutine::new(move || c2.poll(true));
        co.enter();
        assert_eq!(co.take_result(), Some(false));
        // poll_while: ended by another thread's flag and kick.
        let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let f2 = flag.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(20));
            f2.store(true, std::sync::atomic::Ordering::SeqCst);
            coroloop::aio::wait_kick();
        });
        ctx.poll_while(|| !flag.load(std::sync::atomic::Ordering::SeqCst));
        t.join().unwrap();
    });
}
