//! Join: a coroutine waits for another and takes its result; a JoinSet
//! gives many in completion order; both from async code too. A panicked
//! joinee gives its panic message, a cancelled one `Cancelled`: never a
//! hang.

mod common;

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use common::{on_fresh_thread, panic_message};
use coroloop::aio::AioContext;
use coroloop::coroutine::{self, Coroutine, JoinError, JoinSet};

fn run<R: 'static>(f: impl FnOnce() -> R + 'static) -> R {
    let ctx = AioContext::new().unwrap();
    let co = Coroutine::new(f);
    co.enter();
    ctx.poll_while(|| !co.is_finished());
    co.take_result().expect("the test coroutine panicked")
}

#[test]
fn join_waits_and_takes_the_result() {
    on_fresh_thread(|| {
        let r = run(|| {
            let child = Coroutine::new(|| {
                coroutine::sleep(Duration::from_millis(2));
                7
            });
            child.enter();
            assert!(!child.is_finished());
            let v = child.join().unwrap();
            // Joining a finished one returns at once.
            let done = Coroutine::new(|| 5);
            done.enter();
            (v, done.join().unwrap())
        });
        assert_eq!(r, (7, 5));
    });
}

#[test]
fn join_of_a_panicked_coroutine_gives_its_panic() {
    on_fresh_thread(|| {
        let ctx = AioContext::new().unwrap();
        let child = Coroutine::new(|| -> u32 {
            coroutine::yield_now();
            panic!("boom in child");
        });
        child.enter();
        let c = child.clone();
        let joiner = Coroutine::new(move || match c.join() {
            Err(e) => {
                assert!(e.is_panic() && !e.is_cancelled());
                assert!(e.to_string().contains("boom in child"), "{e}");
                *e.into_panic().downcast::<String>().unwrap()
            }
            Ok(_) => panic!("no result expected"),
        });
        joiner.enter();
        // The panic itself goes to whoever resumed the child: the loop.
        let msg = panic_message(|| ctx.poll_while(|| !child.is_finished()));
        assert!(msg.contains("boom in child"));
        ctx.poll_while(|| !joiner.is_finished());
        assert_eq!(joiner.take_result().unwrap(), "boom in child");
    });
}

#[test]
fn join_of_a_cancelled_coroutine_is_cancelled_not_a_hang() {
    on_fresh_thread(|| {
        let ctx = AioContext::new().unwrap();
        let child = Coroutine::new(|| -> u32 {
            coroutine::suspend();
            1
        });
        child.enter();
        let c = child.clone();
        let joiner = Coroutine::new(move || c.join().map_err(|e| e.is_cancelled()));
        joiner.enter();
        child.cancel();
        ctx.poll_while(|| !joiner.is_finished());
        assert_eq!(joiner.take_result(), Some(Err(true)));
        // Cancelled before it started, and by its context's shutdown.
        let fresh = Coroutine::new(|| 1u32);
        let f = fresh.clone();
        let j2 = Coroutine::new(move || matches!(f.join(), Err(JoinError::Cancelled)));
        j2.enter();
        fresh.cancel();
        ctx.poll_while(|| !j2.is_finished());
        assert_eq!(j2.take_result(), Some(true));
        let waiting = Coroutine::new(|| {
            coroutine::sleep(Duration::from_secs(600));
            1u32
        });
        waiting.enter();
        let w = waiting.clone();
        let fut =
            ctx.spawn_local(async move { w.join_async().await.map_err(|e| e.is_cancelled()) });
        ctx.poll(false);
        let other = AioContext::new().unwrap();
        ctx.shutdown();
        assert!(waiting.is_finished());
        // The task was cancelled by the shutdown too: join from another
        // context's block_on instead.
        drop(fut);
        let r = other.block_on(waiting.join_async());
        assert!(matches!(r, Err(JoinError::Cancelled)));
    });
}

#[test]
fn join_misuse_panics_with_the_call_named() {
    on_fresh_thread(|| {
        let co = Coroutine::new(|| 1);
        let msg = panic_message(|| co.join());
        assert!(
            msg.contains("Coroutine::join called outside a coroutine"),
            "{msg}"
        );
        let msg = run(|| {
            let me = Coroutine::current().unwrap();
            panic_message(move || me.join())
        });
        assert!(msg.contains("cannot join itself"), "{msg}");
        co.enter();
        assert_eq!(co.take_result(), Some(1));
        let c = co.clone();
        let msg = run(move || panic_message(move || c.join()));
        assert!(msg.contains("already taken"), "{msg}");
    });
}

#[test]
fn join_set_in_completion_order_from_a_coroutine_and_from_async() {
    on_fresh_thread(|| {
        let order = run(|| {
            let mut set = JoinSet::new();
            for i in 0..100u64 {
                set.spawn(move || {
                    // Finish in reverse order of creation.
                    coroutine::sleep(Duration::from_micros(50 * (100 - i)));
                    i
                });
            }
            assert_eq!(set.len(), 100);
            let mut order = Vec::new();
            while let Some(r) = set.join_next() {
                order.push(r.unwrap());
            }
            assert!(set.is_empty());
            order
        });
        assert_eq!(order.len(), 100);
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
        // Mostly reversed: completion order, not insertion order.
        assert!(order[0] > order[99], "{order:?}");

        // From async code, with a panicked and a cancelled member.
        let ctx = AioContext::new().unwrap();
        let seen = Rc::new(RefCell::new(Vec::new()));
        let mut set: JoinSet<u32> = JoinSet::new();
        set.spawn(|| {
            coroutine::sleep(Duration::from_millis(1));
            1
        });
        set.spawn(|| -> u32 {
            coroutine::sleep(Duration::from_millis(2));
            panic!("member panics")
        });
        let stuck = set.spawn(|| {
            coroutine::suspend();
            3
        });
        let s = seen.clone();
        let task = ctx.spawn_local(async move {
            while let Some(r) = set.join_next_async().await {
                s.borrow_mut().push(match r {
                    Ok(v) => format!("ok {v}"),
                    Err(e) if e.is_panic() => "panicked".to_string(),
                    Err(_) => "cancelled".to_string(),
                });
            }
        });
        // The member's panic reaches the loop that resumed it.
        let msg = panic_message(|| ctx.poll_while(|| seen.borrow().len() < 2));
        assert!(msg.contains("member panics"), "{msg}");
        ctx.poll_while(|| seen.borrow().len() < 2);
        stuck.cancel();
        ctx.block_on(task);
        assert_eq!(*seen.borrow(), ["ok 1", "panicked", "cancelled"]);
    });
}

#[test]
fn join_set_cancel_all() {
    on_fresh_thread(|| {
        let r = run(|| {
            let mut set = JoinSet::new();
            for _ in 0..10 {
                set.spawn(|| {
                    coroutine::suspend();
                    1u8
                });
            }
            set.cancel_all();
            let mut cancelled = 0;
            while let Some(r) = set.join_next() {
                assert!(r.unwrap_err().is_cancelled());
                cancelled += 1;
            }
            cancelled
        });
        assert_eq!(r, 10);
    });
}

/// Found by the API fuzzer (program seed 8829696300826754488): `join` kept
/// a handle of the joining coroutine on its own stack while it waited, so
/// dropping every other handle neither handed it over nor cancelled it: it
/// leaked, with the coroutine it joined. Now it is unwound (a bare one) and
/// both closures are dropped.
#[test]
fn a_joiner_whose_handles_are_dropped_is_not_kept_alive_by_itself() {
    on_fresh_thread(|| {
        let old = AioContext::new().unwrap();
        let ctx = AioContext::new().unwrap();
        drop(old); // the thread's default context is shut down: bare coroutines
        let dropped = Rc::new(RefCell::new(Vec::new()));
        struct Flag(Rc<RefCell<Vec<&'static str>>>, &'static str);
        impl Drop for Flag {
            fn drop(&mut self) {
                self.0.borrow_mut().push(self.1);
            }
        }
        let f2 = Flag(dropped.clone(), "joined");
        let joined = Coroutine::new(move || {
            let _f = &f2;
            0u8
        });
        let f3 = Flag(dropped.clone(), "joiner");
        let j = joined.clone();
        let joiner = Coroutine::new(move || {
            let _f = &f3;
            j.join().is_ok()
        });
        joiner.enter();
        assert!(
            !joiner.is_finished(),
            "waits for a coroutine nothing starts"
        );
        drop(joined);
        drop(joiner);
        let mut d = dropped.borrow().clone();
        d.sort_unstable();
        assert_eq!(d, ["joined", "joiner"]);
        drop(ctx);
    });
}

/// Found by the API fuzzer (program seed 15327822891244565956, under ASan):
/// two coroutines each holding a handle of the other (here: joining each
/// other) are a reference cycle that nothing ever drops; at their thread's
/// exit they leaked without a word. The thread's exit now logs how many of
/// its coroutines are unfinished.
#[test]
fn coroutines_in_a_cycle_at_thread_exit_are_reported() {
    let logs = common::captured_logs();
    std::thread::Builder::new()
        .name("cycle".into())
        .spawn(|| {
            let ctx = AioContext::new().unwrap();
            let slot: Rc<RefCell<Option<Coroutine<u8>>>> = Rc::default();
            let s = slot.clone();
            let a = Coroutine::new(move || {
                let b = s.borrow().clone().unwrap();
                b.join().map_or(0, |v| v + 1)
            });
            let a2 = a.clone();
            let b = Coroutine::new(move || a2.join().map_or(0, |v| v + 1));
            *slot.borrow_mut() = Some(b.clone());
            drop(slot);
            b.enter();
            a.enter();
            assert!(
                !a.is_finished() && !b.is_finished(),
                "each waits for the other"
            );
            ctx.poll(false);
            std::mem::forget(ctx); // nothing will cancel them
        })
        .unwrap()
        .join()
        .unwrap();
    let lines = logs.0.lock().unwrap().clone();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("unfinished at its exit: their stacks are leaked")),
        "{lines:?}"
    );
}
