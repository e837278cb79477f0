//! Panics inside coroutines, and unwinding of coroutines whose last handle
//! is dropped.

use std::cell::{Cell, RefCell};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::rc::Rc;

use coroloop::coroutine::{self, Coroutine};

mod common;

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    common::payload_message(&*p)
}

/// Counts its drops into a shared cell.
struct DropCount(Rc<Cell<u32>>);
impl Drop for DropCount {
    fn drop(&mut self) {
        self.0.set(self.0.get() + 1);
    }
}

#[test]
fn panic_propagates_out_of_enter_and_finishes_the_coroutine() {
    let drops = Rc::new(Cell::new(0));
    let d = DropCount(drops.clone());
    let co = Coroutine::new(move || {
        let _d = d;
        coroutine::suspend();
        panic!("boom in coroutine");
    });
    co.enter();
    assert_eq!(drops.get(), 0);
    let err = catch_unwind(AssertUnwindSafe(|| co.enter())).unwrap_err();
    assert_eq!(panic_message(err), "boom in coroutine");
    assert!(co.is_finished());
    assert_eq!(drops.get(), 1, "the stack was unwound");
    assert_eq!(co.take_result(), None);
    // The pool and the thread are still usable.
    let ok = Coroutine::new(|| 5);
    ok.enter();
    assert_eq!(ok.take_result(), Some(5));
}

#[test]
fn panic_in_nested_coroutine_reaches_the_outer_enter() {
    let inner_done = Rc::new(Cell::new(false));
    let i = inner_done.clone();
    let outer = Coroutine::new(move || {
        let inner = Coroutine::new(|| panic!("inner"));
        let r = catch_unwind(AssertUnwindSafe(|| inner.enter()));
        i.set(inner.is_finished());
        // Re-raise to the outer enter.
        std::panic::resume_unwind(r.unwrap_err());
    });
    let err = catch_unwind(AssertUnwindSafe(|| outer.enter())).unwrap_err();
    assert_eq!(panic_message(err), "inner");
    assert!(inner_done.get());
    assert!(outer.is_finished());
}

#[test]
fn queued_wakeups_still_run_when_a_coroutine_panics() {
    let ran = Rc::new(Cell::new(false));
    let r = ran.clone();
    let waiter = Coroutine::new(move || {
        coroutine::suspend();
        r.set(true);
    });
    waiter.enter();
    let w = waiter.clone();
    let bad = Coroutine::new(move || {
        w.wake();
        panic!("after waking");
    });
    let err = catch_unwind(AssertUnwindSafe(|| bad.enter())).unwrap_err();
    assert_eq!(panic_message(err), "after waking");
    assert!(ran.get(), "no wake-up is lost to a panic");
    assert!(waiter.is_finished());
}

#[test]
fn dropping_the_last_handle_of_a_suspended_coroutine_unwinds_it() {
    let drops = Rc::new(Cell::new(0));
    let after = Rc::new(Cell::new(false));
    let (d1, d2, a) = (
        DropCount(drops.clone()),
        DropCount(drops.clone()),
        after.clone(),
    );
    let co = Coroutine::new(move || {
        let _outer = d1;
        {
            let _inner = d2;
            coroutine::suspend();
        }
        a.set(true);
    });
    co.enter();
    let second = co.clone();
    drop(co);
    assert_eq!(drops.get(), 0, "another handle still owns it");
    drop(second);
    assert_eq!(drops.get(), 2, "both destructors ran");
    assert!(!after.get(), "code after the suspension point did not run");
}

#[test]
fn dropping_a_fresh_coroutine_drops_its_closure() {
    let drops = Rc::new(Cell::new(0));
    let d = DropCount(drops.clone());
    let co = Coroutine::new(move || drop(d));
    drop(co);
    assert_eq!(drops.get(), 1);
}

#[test]
fn dropping_a_finished_coroutine_drops_its_result() {
    let drops = Rc::new(Cell::new(0));
    let d = DropCount(drops.clone());
    let co = Coroutine::new(move || d);
    co.enter();
    assert_eq!(drops.get(), 0, "the result is kept for the owner");
    drop(co);
    assert_eq!(drops.get(), 1);
}

#[test]
fn unwinding_runs_wakeups_made_by_destructors() {
    // A destructor that wakes another coroutine (as a lock guard handing the
    // lock on would) during the unwind: the woken coroutine runs.
    struct WakeOnDrop(Coroutine);
    impl Drop for WakeOnDrop {
        fn drop(&mut self) {
            self.0.wake();
        }
    }
    let ran = Rc::new(Cell::new(false));
    let r = ran.clone();
    let waiter = Coroutine::new(move || {
        coroutine::suspend();
        r.set(true);
    });
    waiter.enter();
    let g = WakeOnDrop(waiter.clone());
    let holder = Coroutine::new(move || {
        let _g = g;
        coroutine::suspend();
    });
    holder.enter();
    drop(holder);
    assert!(ran.get());
}

#[test]
fn orphaned_while_running_is_unwound_at_its_next_suspension() {
    let slot: Rc<RefCell<Option<Coroutine>>> = Rc::new(RefCell::new(None));
    let drops = Rc::new(Cell::new(0));
    let reached = Rc::new(Cell::new(false));
    let (s, d, r) = (slot.clone(), DropCount(drops.clone()), reached.clone());
    let co = Coroutine::new(move || {
        let _d = d;
        // Drop the only handle from inside: the coroutine keeps running.
        drop(s.borrow_mut().take());
        r.set(true);
        coroutine::suspend();
        unreachable!("an unowned coroutine is never resumed");
    });
    *slot.borrow_mut() = Some(co);
    // Enter it through a wake-up list, which does not own it.
    let s2 = slot.clone();
    let driver = Coroutine::new(move || s2.borrow().as_ref().unwrap().wake());
    driver.enter();
    assert!(reached.get());
    assert!(slot.borrow().is_none());
    assert_eq!(drops.get(), 1, "unwound when it suspended unowned");
}

#[test]
fn catching_the_unwind_and_suspending_again_is_refused() {
    // A coroutine that swallows its own unwind and tries to suspend again is
    // unwound again instead of suspending.
    let attempts = Rc::new(Cell::new(0));
    let a = attempts.clone();
    let co = Coroutine::new(move || {
        for _ in 0..3 {
            let r = catch_unwind(AssertUnwindSafe(coroutine::suspend));
            if r.is_err() {
                a.set(a.get() + 1);
            }
        }
    });
    co.enter();
    drop(co);
    assert_eq!(
        attempts.get(),
        3,
        "every later suspend re-raised the unwind"
    );
}

#[test]
fn dropping_a_suspended_coroutine_while_the_thread_panics_unwinds_it() {
    let drops = Rc::new(Cell::new(0));
    let d = DropCount(drops.clone());
    let co = Coroutine::new(move || {
        let _d = d;
        coroutine::suspend();
    });
    co.enter();
    let r = catch_unwind(AssertUnwindSafe(move || {
        let _owned = co;
        panic!("outer panic");
    }));
    assert_eq!(panic_message(r.unwrap_err()), "outer panic");
    assert_eq!(drops.get(), 1, "the coroutine was unwound during the panic");
    let ok = Coroutine::new(|| 3);
    ok.enter();
    assert_eq!(ok.take_result(), Some(3));
}
