//! The cases of QEMU's tests/unit/test-coroutine.c that need neither locks
//! nor an AioContext, re-derived for coroloop (QEMU test names in comments).

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use coroloop::coroutine::{self, Coroutine};

// /basic/in_coroutine
#[test]
fn in_coroutine() {
    assert!(!coroutine::in_coroutine());
    let co = Coroutine::new(coroutine::in_coroutine);
    co.enter();
    assert_eq!(co.take_result(), Some(true));
    assert!(!coroutine::in_coroutine());
}

// /basic/self
#[test]
fn current_is_self() {
    let slot: Rc<RefCell<Option<Coroutine>>> = Rc::new(RefCell::new(None));
    let s = slot.clone();
    let co = Coroutine::new(move || {
        let me = Coroutine::current().expect("inside a coroutine");
        assert!(me == *s.borrow().as_ref().unwrap());
    });
    *slot.borrow_mut() = Some(co.clone());
    co.enter();
    assert!(co.is_finished());
    assert!(Coroutine::current().is_none());
}

// /basic/entered
#[test]
fn entered() {
    let outer = Coroutine::new(|| {
        let me = Coroutine::current().unwrap();
        assert!(me.is_entered());
        let caller = me.clone();
        let inner = Coroutine::new(move || {
            assert!(caller.is_entered(), "the caller is on the call chain");
            assert!(Coroutine::current().unwrap().is_entered());
            coroutine::suspend();
            assert!(caller.is_entered());
            assert!(Coroutine::current().unwrap().is_entered());
        });
        assert!(!inner.is_entered());
        inner.enter();
        assert!(!inner.is_entered());
        inner.enter();
        assert!(inner.is_finished());
    });
    assert!(!outer.is_entered());
    outer.enter();
    assert!(!outer.is_entered());
    assert!(outer.is_finished());
}

// /basic/nesting
fn nest(enters: Rc<Cell<u32>>, returns: Rc<Cell<u32>>, max: u32) {
    enters.set(enters.get() + 1);
    if enters.get() < max {
        let (e, r) = (enters.clone(), returns.clone());
        let child = Coroutine::new(move || nest(e, r, max));
        child.enter();
        assert!(child.is_finished());
    }
    returns.set(returns.get() + 1);
}

#[test]
fn nesting_128() {
    let (e, r) = (Rc::new(Cell::new(0)), Rc::new(Cell::new(0)));
    let (e2, r2) = (e.clone(), r.clone());
    let root = Coroutine::new(move || nest(e2, r2, 128));
    root.enter();
    assert_eq!(e.get(), 128);
    assert_eq!(r.get(), 128);
}

// /basic/yield
#[test]
fn yield_five_times() {
    let done = Rc::new(Cell::new(false));
    let d = done.clone();
    let co = Coroutine::new(move || {
        for _ in 0..5 {
            coroutine::suspend();
        }
        d.set(true);
    });
    let mut i = -1; // one extra entry to return from the coroutine
    while !done.get() {
        co.enter();
        i += 1;
    }
    assert_eq!(i, 5);
    assert!(co.is_finished());
}

// /basic/lifecycle
#[test]
fn lifecycle() {
    for _ in 0..2 {
        let done = Rc::new(Cell::new(false));
        let d = done.clone();
        let co = Coroutine::new(move || d.set(true));
        assert!(!co.is_started());
        co.enter();
        assert!(done.get());
        assert!(co.is_finished());
    }
}

// /basic/no-dangling-access: c1 enters c2 and finishes while c2 is
// suspended; c1's memory goes back to the pool and is reused; entering c2
// again must not touch c1 (in QEMU the test poisons c1's memory).
#[test]
fn no_dangling_access() {
    let c2 = Coroutine::new(coroutine::suspend);
    let c2b = c2.clone();
    let c1 = Coroutine::new(move || c2b.enter());
    c1.enter();
    assert!(c1.is_finished());
    drop(c1);
    // Reuse c1's pooled worker and header with a coroutine that scribbles on
    // its stack.
    let scribble = Coroutine::new(|| {
        let buf = [0xffu8; 4096];
        std::hint::black_box(&buf);
        coroutine::suspend();
    });
    scribble.enter();
    c2.enter();
    assert!(c2.is_finished());
    scribble.enter();
    assert!(scribble.is_finished());
}

// /basic/order
#[test]
fn order() {
    let rec = Rc::new(RefCell::new(Vec::new()));
    let r = rec.clone();
    let co = Coroutine::new(move || {
        r.borrow_mut().push((2, 1));
        assert!(coroutine::in_coroutine());
        coroutine::suspend();
        r.borrow_mut().push((2, 2));
        assert!(coroutine::in_coroutine());
    });
    rec.borrow_mut().push((1, 1));
    co.enter();
    rec.borrow_mut().push((1, 2));
    assert!(!coroutine::in_coroutine());
    co.enter();
    rec.borrow_mut().push((1, 3));
    assert!(!coroutine::in_coroutine());
    assert_eq!(*rec.borrow(), [(1, 1), (2, 1), (1, 2), (2, 2), (1, 3)]);
}

// perf-cost's shape as a functional check: create, enter, enter, repeat.
#[test]
fn create_enter_enter_many() {
    let n = Rc::new(Cell::new(0u32));
    for _ in 0..10_000 {
        let n2 = n.clone();
        let co = Coroutine::new(move || {
            coroutine::suspend();
            n2.set(n2.get() + 1);
        });
        co.enter();
        co.enter();
        assert!(co.is_finished());
    }
    assert_eq!(n.get(), 10_000);
}

#[test]
fn results_are_typed_and_taken_once() {
    let co = Coroutine::new(|| String::from("hello"));
    assert_eq!(co.take_result(), None, "not finished yet");
    co.enter();
    let other = co.clone();
    assert_eq!(other.take_result().as_deref(), Some("hello"));
    assert_eq!(co.take_result(), None, "already taken");
    // Large results are boxed beside the header.
    let big = Coroutine::new(|| [7u64; 64]);
    big.enter();
    assert_eq!(big.take_result(), Some([7u64; 64]));
    // An erased handle cannot take the result.
    let co = Coroutine::new(|| 1u8);
    co.enter();
    let erased = co.clone().erase();
    assert_eq!(erased.take_result(), None);
    assert_eq!(co.take_result(), Some(1));
}

#[test]
fn large_closures_run() {
    let data = [3u64; 100];
    let co = Coroutine::new(move || data.iter().sum::<u64>());
    co.enter();
    assert_eq!(co.take_result(), Some(300));
}

#[test]
fn wake_list_runs_after_the_waker_suspends_depth_first() {
    let log = Rc::new(RefCell::new(Vec::new()));
    let mk = |name: &'static str| {
        let l = log.clone();
        Coroutine::new(move || {
            coroutine::suspend();
            l.borrow_mut().push(name);
        })
    };
    let (a, b, c) = (mk("a"), mk("b"), mk("c"));
    a.enter();
    b.enter();
    c.enter();
    let l = log.clone();
    let b2 = b.clone();
    let a2 = a.clone();
    let driver = Coroutine::new(move || {
        a2.wake();
        b2.wake();
        a2.wake(); // duplicate: queued once
        l.borrow_mut().push("driver");
    });
    driver.enter();
    assert_eq!(*log.borrow(), ["driver", "a", "b"]);
    // c was never woken.
    assert!(!c.is_finished());
    c.wake(); // outside a coroutine: enters at once
    assert_eq!(*log.borrow(), ["driver", "a", "b", "c"]);
}

#[test]
fn nested_wakes_are_depth_first() {
    let log = Rc::new(RefCell::new(Vec::new()));
    let l = log.clone();
    let c = Coroutine::new(move || {
        coroutine::suspend();
        l.borrow_mut().push("c");
    });
    c.enter();
    let l = log.clone();
    let c2 = c.clone();
    let a = Coroutine::new(move || {
        coroutine::suspend();
        c2.wake();
        l.borrow_mut().push("a");
    });
    a.enter();
    let l = log.clone();
    let b = Coroutine::new(move || {
        coroutine::suspend();
        l.borrow_mut().push("b");
    });
    b.enter();
    let (a2, b2) = (a.clone(), b.clone());
    let driver = Coroutine::new(move || {
        a2.wake();
        b2.wake();
    });
    driver.enter();
    // a runs first and wakes c; c runs before b (QEMU prepends).
    assert_eq!(*log.borrow(), ["a", "c", "b"]);
}

#[test]
fn stale_wake_of_a_finished_pooled_coroutine_does_nothing() {
    let stale = Coroutine::new(|| ());
    stale.enter();
    assert!(stale.is_finished());
    // The finished coroutine's worker is back in the pool; the next
    // coroutine reuses it.
    let runs = Rc::new(Cell::new(0));
    let r = runs.clone();
    let fresh = Coroutine::new(move || {
        r.set(r.get() + 1);
        coroutine::suspend();
        r.set(r.get() + 1);
    });
    fresh.enter();
    assert_eq!(runs.get(), 1);
    stale.wake();
    let s2 = stale.clone();
    Coroutine::new(move || s2.wake()).enter();
    assert_eq!(runs.get(), 1, "a stale wake must not resume the reuser");
    assert!(!fresh.is_finished());
    fresh.enter();
    assert_eq!(runs.get(), 2);
}

#[test]
fn enter_if_inactive() {
    let co = Coroutine::new(|| {
        let me = Coroutine::current().unwrap();
        assert!(!me.enter_if_inactive(), "on the call chain: not entered");
        coroutine::suspend();
    });
    assert!(co.enter_if_inactive());
    assert!(!co.is_finished());
    assert!(co.enter_if_inactive());
    assert!(co.is_finished());
}

// `Builder::build` creates, as `Coroutine::new` does, and runs nothing
// (it was called `spawn`, which suggested `std::thread::Builder::spawn`).
#[test]
fn builder_build_creates_without_running() {
    let ran = Rc::new(Cell::new(false));
    let r = ran.clone();
    let co = coroutine::Builder::new()
        .name("not yet")
        .build(move || r.set(true))
        .unwrap();
    assert!(!co.is_started());
    assert!(!co.is_finished());
    assert!(!ran.get(), "build ran nothing");
    co.enter();
    assert!(ran.get());
    assert!(co.is_finished());
}

#[test]
fn builder_names_and_stack_sizes() {
    let co = coroutine::Builder::new()
        .name("small")
        .stack_size(16 * 1024)
        .build(|| {
            let buf = [1u8; 8 * 1024];
            std::hint::black_box(&buf)
                .iter()
                .map(|&b| b as u32)
                .sum::<u32>()
        })
        .unwrap();
    assert_eq!(co.name(), Some("small"));
    assert!(format!("{co:?}").contains("small"));
    co.enter();
    assert_eq!(co.take_result(), Some(8 * 1024));
}
