//! The misuse catalogue: each misuse of the API either panics with a
//! message naming the call and what was wrong, or returns an `io::Error`
//! saying so, and leaves the thread (and the context) usable — never
//! undefined behaviour, never a silent hang.
//!
//! Misuse the type system forbids (a `Coroutine`, a lock guard, a `Timer`,
//! an `FdHandler` or a `LocalBh` moved to another thread, a coroutine
//! entered from another thread, a `CoroutineFuture` on a work-stealing
//! executor, a `RawFdSource` used as an `AsFd`) is covered by
//! `compile_fail` doctests next to those types.
//!

use std::cell::{Cell, RefCell};
use std::io::{ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use coroloop::aio::{AioContext, ClockType, EventNotifier, IoThread, IoThreadBuilder};
use coroloop::coroutine::{self, Coroutine};
use coroloop::future::{await_future, CoroutineFuture};
use coroloop::sync::{CoMutex, CoQueue, CoRwLock, CoSleep};

mod common;
use common::{on_fresh_thread, panic_message};

fn still_usable() {
    let co = Coroutine::new(|| 1 + 1);
    co.enter();
    assert_eq!(co.take_result(), Some(2));
}

/// Sets a flag when dropped (callbacks' captures, coroutines' stacks).
struct DropFlag(Arc<AtomicBool>);
impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

fn flag() -> (Arc<AtomicBool>, DropFlag) {
    let f = Arc::new(AtomicBool::new(false));
    (f.clone(), DropFlag(f))
}

// ---- entering coroutines ----

#[test]
fn recursive_enter_of_self_panics() {
    let co = Coroutine::new(|| {
        let me = Coroutine::current().unwrap();
        panic_message(|| me.enter())
    });
    co.enter();
    assert_eq!(
        co.take_result().unwrap(),
        "Coroutine::enter: coroutine re-entered recursively \
         (it is already on this thread's call chain)"
    );
    still_usable();
}

#[test]
fn recursive_enter_of_a_caller_panics() {
    let outer = Coroutine::new(|| {
        let me = Coroutine::current().unwrap();
        let inner = Coroutine::new(move || panic_message(|| me.enter()));
        inner.enter();
        inner.take_result().unwrap()
    });
    outer.enter();
    assert!(outer
        .take_result()
        .unwrap()
        .contains("coroutine re-entered recursively"));
}

#[test]
fn enter_of_a_finished_coroutine_panics() {
    let co = Coroutine::new(|| ());
    co.enter();
    assert_eq!(
        panic_message(|| co.enter()),
        "Coroutine::enter: the coroutine has already finished"
    );
    assert_eq!(
        panic_message(|| co.enter_if_inactive()),
        "Coroutine::enter: the coroutine has already finished"
    );
    still_usable();
}

#[test]
fn a_completed_coroutine_future_polled_again_panics() {
    use std::future::Future;
    use std::task::{Context, Poll, Wake, Waker};
    struct Noop;
    impl Wake for Noop {
        fn wake(self: Arc<Self>) {}
    }
    let waker = Waker::from(Arc::new(Noop));
    let mut cx = Context::from_waker(&waker);
    let mut fut = CoroutineFuture::new(|| 5);
    assert_eq!(std::pin::Pin::new(&mut fut).poll(&mut cx), Poll::Ready(5));
    assert_eq!(
        panic_message(|| std::pin::Pin::new(&mut fut).poll(&mut cx)),
        "CoroutineFuture: its coroutine ended without a result: it was cancelled \
         (the AioContext it waited on shut down, or `cancel()`), or it panicked \
         while entered outside poll, or the future was polled after it completed"
    );
    still_usable();
}

// ---- coroutine-only calls outside a coroutine ----

#[test]
fn suspend_outside_a_coroutine_panics() {
    assert_eq!(
        panic_message(coroutine::suspend),
        "coroutine::suspend() called outside a coroutine"
    );
    still_usable();
}

#[test]
fn yield_now_outside_a_coroutine_panics() {
    let _ctx = AioContext::new().unwrap();
    assert_eq!(
        panic_message(coroutine::yield_now),
        "coroutine::yield_now() called outside a coroutine"
    );
    still_usable();
}

#[test]
fn sleep_outside_a_coroutine_panics() {
    let ctx = AioContext::new().unwrap();
    assert_eq!(
        panic_message(|| coroutine::sleep(Duration::from_millis(1))),
        "coroutine::sleep() called outside a coroutine"
    );
    assert_eq!(ctx.compute_timeout(), None, "no timer was left armed");
    still_usable();
}

#[test]
fn comutex_lock_outside_a_coroutine_panics() {
    let m = CoMutex::new(1);
    assert_eq!(
        panic_message(|| drop(m.lock())),
        "CoMutex::lock called outside a coroutine"
    );
    assert!(!m.is_locked(), "the refused lock took nothing");
    assert_eq!(
        *m.try_lock().unwrap(),
        1,
        "try_lock is the non-coroutine way"
    );
}

#[test]
fn corwlock_read_and_write_outside_a_coroutine_panic() {
    let l = CoRwLock::new(1);
    assert_eq!(
        panic_message(|| drop(l.read())),
        "CoRwLock::read called outside a coroutine"
    );
    assert_eq!(
        panic_message(|| drop(l.write())),
        "CoRwLock::write called outside a coroutine"
    );
    // Nothing is held or queued: the non-waiting forms still succeed.
    drop(l.try_write().unwrap());
    assert_eq!(*l.try_read().unwrap(), 1);
}

#[test]
fn corwlock_upgrade_outside_a_coroutine_panics_only_when_it_must_wait() {
    let l = CoRwLock::new(1);
    // Uncontended, upgrading needs no wait and works anywhere.
    let r = l.try_read().unwrap();
    drop(CoRwLock::upgrade(r));
    // Contended, it would have to wait: it panics, having given up the
    // read lock it consumed, and queues nothing.
    let r1 = l.try_read().unwrap();
    let r2 = l.try_read().unwrap();
    assert_eq!(
        panic_message(move || drop(CoRwLock::upgrade(r1))),
        "CoRwLock::upgrade called outside a coroutine"
    );
    assert!(l.try_write().is_none(), "r2 still reads");
    drop(r2);
    drop(l.try_write().expect("the lock is free again"));
}

#[test]
fn coqueue_wait_outside_a_coroutine_panics_and_releases_the_guard() {
    let m = CoMutex::new(0);
    let q = CoQueue::new();
    let g = m.try_lock().unwrap();
    assert_eq!(
        panic_message(|| drop(q.wait(g))),
        "CoQueue::wait called outside a coroutine"
    );
    assert!(!m.is_locked(), "the guard was dropped by the unwind");
    assert!(q.is_empty(), "nothing was queued");
    assert!(!q.next());
}

#[test]
fn coqueue_wait_unlocked_outside_a_coroutine_panics() {
    let q = CoQueue::new();
    let msg = panic_message(|| q.wait_unlocked());
    // The panic happens and names `CoQueue::wait...`; the exact name is
    // the subject of `coqueue_wait_unlocked_names_itself` below.
    assert!(
        msg.starts_with("CoQueue::wait") && msg.ends_with(" called outside a coroutine"),
        "{msg}"
    );
    assert!(q.is_empty());
}

#[test]
fn coqueue_wait_unlocked_names_itself() {
    let q = CoQueue::new();
    assert_eq!(
        panic_message(|| q.wait_unlocked()),
        "CoQueue::wait_unlocked called outside a coroutine"
    );
}

// `CoQueue::wait` with the guard of "another" mutex cannot go wrong: unlike
// QEMU's `qemu_co_queue_wait(queue, lock)`, which takes the queue and a
// lock separately, `wait(guard)` takes only the guard, releases the lock
// that guard belongs to and relocks that same lock before returning its
// new guard. There is no second lock to mix up; one queue may even serve
// waiters of different mutexes, each getting its own lock back.
#[test]
fn coqueue_wait_relocks_the_guards_own_mutex() {
    let q = Rc::new(CoQueue::new());
    let a = Rc::new(CoMutex::new("a"));
    let b = Rc::new(CoMutex::new("b"));
    let waiter = |m: Rc<CoMutex<&'static str>>| {
        let q = q.clone();
        Coroutine::new(move || {
            let g = m.lock();
            let g = q.wait(g);
            *g
        })
    };
    let (ca, cb) = (waiter(a.clone()), waiter(b.clone()));
    ca.enter();
    cb.enter();
    assert!(
        !a.is_locked() && !b.is_locked(),
        "both released while waiting"
    );
    q.restart_all();
    assert_eq!((ca.take_result(), cb.take_result()), (Some("a"), Some("b")));
    assert!(!a.is_locked() && !b.is_locked());
}

#[test]
fn cosleep_outside_a_coroutine_and_twice_panic() {
    let s = CoSleep::new();
    assert_eq!(
        panic_message(|| s.sleep()),
        "CoSleep::sleep called outside a coroutine"
    );
    assert!(!s.wake(), "nobody was registered");
    let s = Rc::new(CoSleep::new());
    let s1 = s.clone();
    let first = Coroutine::new(move || s1.sleep());
    first.enter();
    let s2 = s.clone();
    let second = Coroutine::new(move || panic_message(|| s2.sleep()));
    second.enter();
    assert_eq!(
        second.take_result().unwrap(),
        "CoSleep::sleep: another coroutine already sleeps on this CoSleep"
    );
    assert!(s.wake(), "the first sleeper is untouched");
    assert!(first.is_finished());
}

#[test]
fn cosleep_sleep_for_outside_a_coroutine_says_so() {
    let _ctx = AioContext::new().unwrap();
    let s = CoSleep::new();
    assert_eq!(
        panic_message(|| s.sleep_for(ClockType::Realtime, Duration::from_millis(1))),
        "CoSleep::sleep_for called outside a coroutine"
    );
}

#[test]
fn await_future_outside_a_coroutine_panics() {
    let polled = Cell::new(false);
    assert_eq!(
        panic_message(|| await_future(async { polled.set(true) })),
        "await_future called outside a coroutine (use AioContext::block_on there)"
    );
    assert!(!polled.get(), "the future was never polled");
}

#[test]
fn submit_co_outside_a_coroutine_panics() {
    let ctx = AioContext::new().unwrap();
    let ran = Arc::new(AtomicBool::new(false));
    let r = ran.clone();
    assert_eq!(
        panic_message(|| ctx
            .thread_pool()
            .submit_co(move || r.store(true, Ordering::SeqCst))),
        "ThreadPool::submit_co called outside a coroutine"
    );
    assert_eq!(ctx.thread_pool().workers(), 0, "no job was queued");
    assert!(!ran.load(Ordering::SeqCst));
}

#[test]
fn fd_waits_outside_a_coroutine_panic() {
    let _ctx = AioContext::new().unwrap();
    let (a, _b) = UnixStream::pair().unwrap();
    assert_eq!(
        panic_message(|| coroloop::io::yield_until_fd_readable(&a)),
        "io::yield_until_fd_readable called outside a coroutine"
    );
    assert_eq!(
        panic_message(|| coroloop::io::yield_until_fd_writable(&a)),
        "io::yield_until_fd_writable called outside a coroutine"
    );
}

#[test]
fn a_second_waiter_on_one_fd_is_an_error() {
    let ctx = AioContext::new().unwrap();
    let (a, b) = UnixStream::pair().unwrap();
    let a = Rc::new(a);
    let a1 = a.clone();
    let first = Coroutine::new(move || coroloop::io::yield_until_fd_readable(&*a1).is_ok());
    first.enter();
    let a2 = a.clone();
    let second = Coroutine::new(move || coroloop::io::yield_until_fd_readable(&*a2));
    second.enter();
    let err = second.take_result().unwrap().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AlreadyExists);
    let raw = std::os::fd::AsRawFd::as_raw_fd(&*a);
    assert_eq!(
        err.to_string(),
        format!(
            "io::yield_until_fd_readable: another coroutine already waits for fd {raw} \
             to become readable"
        )
    );
    // The first waiter is unaffected.
    (&b).write_all(b"x").unwrap();
    assert!(ctx.poll(false));
    assert_eq!(first.take_result(), Some(true));
}

// ---- coroutines without an AioContext (no resumer) ----
//
// A coroutine's resumer is fixed when it is created: these are created on a
// thread with no AioContext (some make one afterwards, which does not
// adopt them).

#[test]
fn yield_now_and_sleep_without_an_aio_context_panic() {
    let msgs = on_fresh_thread(|| {
        let y = Coroutine::new(|| panic_message(coroutine::yield_now));
        let s = Coroutine::new(|| panic_message(|| coroutine::sleep(Duration::ZERO)));
        let _late = AioContext::new().unwrap();
        y.enter();
        s.enter();
        (y.take_result().unwrap(), s.take_result().unwrap())
    });
    assert_eq!(
        msgs.0,
        "coroutine::yield_now(): the coroutine has no AioContext to reschedule it"
    );
    assert_eq!(
        msgs.1,
        "coroutine::sleep(): the coroutine has no AioContext for its timer"
    );
}

#[test]
fn await_future_without_a_resumer_panics() {
    let (msg, polled) = on_fresh_thread(|| {
        let polled = Rc::new(Cell::new(false));
        let p = polled.clone();
        let co = Coroutine::new(move || panic_message(|| await_future(async move { p.set(true) })));
        co.enter();
        (co.take_result().unwrap(), polled.get())
    });
    assert_eq!(
        msg,
        "await_future: this coroutine has no resumer (create it where an AioContext \
         exists, or inside a CoroutineFuture), so its waker could not resume it"
    );
    assert!(!polled, "refused before the future was polled");
}

#[test]
fn submit_co_without_an_aio_context_panics() {
    let (msg, workers) = on_fresh_thread(|| {
        let slot: Rc<RefCell<Option<AioContext>>> = Rc::default();
        let s = slot.clone();
        let co = Coroutine::new(move || {
            let ctx = s.borrow().clone().unwrap();
            panic_message(|| ctx.thread_pool().submit_co(|| 1))
        });
        // Created after the coroutine: it is not the coroutine's resumer.
        let ctx = AioContext::new().unwrap();
        *slot.borrow_mut() = Some(ctx.clone());
        co.enter();
        (co.take_result().unwrap(), ctx.thread_pool().workers())
    });
    assert_eq!(
        msg,
        "ThreadPool::submit_co: the coroutine has no AioContext to resume it"
    );
    assert_eq!(workers, 0, "refused before the job was queued");
}

#[test]
fn fd_wait_without_an_aio_context_is_an_error() {
    let err = on_fresh_thread(|| {
        let co = Coroutine::new(|| {
            let (a, _b) = UnixStream::pair().unwrap();
            coroloop::io::yield_until_fd_readable(&a).unwrap_err()
        });
        co.enter();
        co.take_result().unwrap()
    });
    assert_eq!(err.kind(), ErrorKind::Other);
    assert_eq!(
        err.to_string(),
        "io::yield_until_fd_readable: the coroutine has no AioContext to watch the fd"
    );
}

#[test]
fn detach_without_an_aio_context_panics_and_unwinds_the_coroutine() {
    let (msg, unwound) = on_fresh_thread(|| {
        let (dropped, d) = flag();
        let co = Coroutine::new(move || {
            let _d = d;
            coroutine::suspend();
        });
        co.enter();
        let msg = panic_message(move || co.detach());
        (msg, dropped.load(Ordering::SeqCst))
    });
    assert_eq!(
        msg,
        "Coroutine::detach: the coroutine has no AioContext to own it"
    );
    assert!(
        unwound,
        "its last handle went with the panic: it was unwound"
    );
}

#[test]
fn remote_schedule_without_an_aio_context_panics_and_remote_wake_only_marks() {
    let (msg, entered_by_wake, entered_by_hand) = on_fresh_thread(|| {
        let steps = Rc::new(Cell::new(0));
        let s = steps.clone();
        let co = Coroutine::new(move || loop {
            s.set(s.get() + 1);
            coroutine::suspend();
        });
        co.enter();
        let remote = co.remote();
        let msg = panic_message(|| remote.schedule());
        // A wake (remote handle or Waker, from any thread) has nowhere to
        // queue the coroutine: it is only recorded (and logged once).
        std::thread::scope(|sc| {
            sc.spawn(|| remote.wake());
        });
        co.waker().wake();
        let by_wake = steps.get() != 1;
        co.enter();
        (msg, by_wake, steps.get() == 2)
    });
    assert_eq!(
        msg,
        "RemoteCoroutine::schedule: the coroutine has no AioContext to run it"
    );
    assert!(!entered_by_wake, "a wake never enters a coroutine itself");
    assert!(entered_by_hand);
}

// ---- the home thread ----

#[test]
fn context_calls_off_the_home_thread_panic_naming_the_call() {
    let ctx = AioContext::new().unwrap();
    let c = ctx.clone();
    let msgs: Vec<(&str, String)> = on_fresh_thread(move || {
        let co = Coroutine::new(|| ());
        let (a, _b) = UnixStream::pair().unwrap();
        vec![
            ("AioContext::poll", panic_message(|| c.poll(false))),
            (
                "AioContext::poll_while",
                panic_message(|| c.poll_while(|| false)),
            ),
            ("AioContext::dispatch", panic_message(|| c.dispatch())),
            ("AioContext::prepare", panic_message(|| c.prepare())),
            ("AioContext::pending", panic_message(|| c.pending())),
            (
                "AioContext::compute_timeout",
                panic_message(|| c.compute_timeout()),
            ),
            ("AioContext::poll_ns", panic_message(|| c.poll_ns())),
            (
                "AioContext::block_on",
                panic_message(|| c.block_on(async { 1 })),
            ),
            (
                "AioContext::spawn_local",
                panic_message(|| c.spawn_local(async { 1 })),
            ),
            ("AioContext::co_enter", panic_message(|| c.co_enter(&co))),
            (
                "AioContext::co_schedule",
                panic_message(|| c.co_schedule(&co)),
            ),
            (
                "AioContext::detached_count",
                panic_message(|| c.detached_count()),
            ),
            (
                "AioContext::set_fd_handler",
                panic_message(|| c.set_fd_handler(a, false, Some(Box::new(|| ())), None, None)),
            ),
            (
                "AioContext::timer_new",
                panic_message(|| c.timer_new(ClockType::Virtual, || ())),
            ),
            (
                "AioContext::bh_new_local",
                panic_message(|| c.bh_new_local(|| ())),
            ),
            (
                "AioContext::bh_schedule_oneshot_local",
                panic_message(|| c.bh_schedule_oneshot_local(|| ())),
            ),
            ("AioContext::shutdown", panic_message(|| c.shutdown())),
        ]
    });
    for (api, msg) in msgs {
        assert_eq!(msg, format!("`{api}` called off the context's home thread"));
    }
    // Nothing was registered or queued by the refused calls, and the
    // context works at home.
    assert_eq!(ctx.compute_timeout(), None);
    assert!(!ctx.poll(false));
    let ran = Rc::new(Cell::new(false));
    let r = ran.clone();
    ctx.bh_schedule_oneshot_local(move || r.set(true));
    assert!(ctx.poll(false));
    assert!(ran.get());
}

#[test]
fn set_event_notifier_off_the_home_thread_names_itself() {
    let ctx = AioContext::new().unwrap();
    let msg = on_fresh_thread(move || {
        let n = Arc::new(EventNotifier::new().unwrap());
        panic_message(|| ctx.set_event_notifier(n, false, Box::new(|| ()), None))
    });
    assert_eq!(
        msg,
        "`AioContext::set_event_notifier` called off the context's home thread"
    );
}

// ---- scheduling ----

#[test]
fn co_schedule_twice_panics_and_the_coroutine_runs_once() {
    let ctx = AioContext::new().unwrap();
    let runs = Rc::new(Cell::new(0));
    let r = runs.clone();
    let co = Coroutine::new(move || loop {
        coroutine::suspend();
        r.set(r.get() + 1);
    });
    co.enter();
    ctx.co_schedule(&co);
    assert_eq!(
        panic_message(|| ctx.co_schedule(&co)),
        "AioContext::co_schedule: coroutine was already scheduled"
    );
    // Both ways of scheduling share the "scheduled" flag.
    assert_eq!(
        panic_message(|| co.remote().schedule()),
        "RemoteCoroutine::schedule: coroutine was already scheduled"
    );
    assert!(ctx.poll(false));
    assert_eq!(runs.get(), 1, "queued once");
    assert!(!ctx.poll(false));
    // Once it has run, it may be scheduled again.
    ctx.co_schedule(&co);
    assert!(ctx.poll(false));
    assert_eq!(runs.get(), 2);
}

#[test]
fn remote_schedule_twice_from_another_thread_panics() {
    let ctx = AioContext::new().unwrap();
    let runs = Rc::new(Cell::new(0));
    let r = runs.clone();
    let co = Coroutine::new(move || loop {
        coroutine::suspend();
        r.set(r.get() + 1);
    });
    co.enter();
    let remote = co.remote();
    let msg = on_fresh_thread(move || {
        remote.schedule();
        panic_message(|| remote.schedule())
    });
    assert_eq!(
        msg,
        "RemoteCoroutine::schedule: coroutine was already scheduled"
    );
    assert_eq!(
        panic_message(|| ctx.co_schedule(&co)),
        "AioContext::co_schedule: coroutine was already scheduled"
    );
    assert!(ctx.poll(false));
    assert_eq!(runs.get(), 1);
    assert!(!ctx.poll(false));
}

#[test]
fn scheduling_a_finished_coroutine_does_nothing() {
    let ctx = AioContext::new().unwrap();
    let co = Coroutine::new(coroutine::suspend);
    co.enter();
    // Remote handles and wakers made while it lived go stale when it ends.
    let (remote, waker) = (co.remote(), co.waker());
    co.enter();
    assert!(co.is_finished());
    assert!(remote.is_finished());
    ctx.co_schedule(&co);
    ctx.co_schedule(&co); // not "already scheduled": nothing was queued
    co.wake();
    ctx.co_enter(&co);
    remote.schedule();
    remote.schedule();
    remote.wake();
    waker.wake();
    assert!(!ctx.poll(false));
}

#[test]
fn waking_a_finished_coroutine_through_a_new_remote_handle_does_nothing() {
    let ctx = AioContext::new().unwrap();
    let co = Coroutine::new(|| ());
    co.enter();
    assert!(
        co.remote().is_finished(),
        "a new remote handle knows it finished"
    );
    co.remote().wake();
    co.waker().wake();
    co.remote().schedule();
    assert!(!ctx.poll(false));
}

// ---- parameters ----

#[test]
fn decreasing_the_pool_below_zero_panics() {
    let msg = panic_message(|| coroutine::decrease_pool_batch_size(usize::MAX));
    assert!(
        msg.starts_with(
            "coroutine::decrease_pool_batch_size(18446744073709551615): the batch size is only"
        ),
        "{msg}"
    );
}

#[test]
fn an_impossible_stack_size_is_an_error_not_a_panic() {
    let err = coroutine::Builder::new()
        .stack_size(1 << 46) // 64 TiB
        .build(|| ())
        .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("coroutine::Builder::build: cannot map a coroutine stack of"),
        "{err}"
    );
    still_usable();
}

#[test]
fn enable_external_without_disable_panics() {
    let ctx = AioContext::new().unwrap();
    assert_eq!(
        panic_message(|| ctx.enable_external()),
        "AioContext::enable_external: external handlers are not disabled"
    );
    assert!(!ctx.is_external_disabled());
    // Nesting counts: two disables need two enables, a third one panics.
    ctx.disable_external();
    ctx.disable_external();
    ctx.enable_external();
    assert!(ctx.is_external_disabled());
    ctx.enable_external();
    assert!(!ctx.is_external_disabled());
    assert_eq!(
        panic_message(|| ctx.enable_external()),
        "AioContext::enable_external: external handlers are not disabled"
    );
    assert!(!ctx.is_external_disabled(), "the count did not wrap");
}

#[test]
fn negative_poll_params_are_invalid_input_naming_the_argument() {
    let ctx = AioContext::new().unwrap();
    for ((max, grow, shrink), name, v) in [
        ((-1, 0, 0), "max_ns", -1),
        ((0, -2, 0), "grow", -2),
        ((0, 0, -3), "shrink", -3),
        ((-4, -5, -6), "max_ns", -4), // the first bad one is named
        ((i64::MIN, 0, 0), "max_ns", i64::MIN),
    ] {
        let err = ctx.set_poll_params(max, grow, shrink).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput);
        assert_eq!(
            err.to_string(),
            format!("AioContext::set_poll_params: {name} must not be negative (got {v})")
        );
    }
    ctx.set_poll_params(0, 0, 0).unwrap();
    assert!(!ctx.poll(false));
    // An IoThread with bad parameters is not started.
    let err = IoThreadBuilder::new("badparams")
        .poll_params(1000, 0, -1)
        .spawn()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    assert_eq!(
        err.to_string(),
        "AioContext::set_poll_params: shrink must not be negative (got -1)"
    );
}

#[test]
fn advancing_the_virtual_clock_backwards_panics() {
    let ctx = AioContext::new().unwrap();
    ctx.advance_virtual_clock(10);
    assert_eq!(
        panic_message(|| ctx.advance_virtual_clock(-5)),
        "AioContext::advance_virtual_clock: negative step -5"
    );
    assert_eq!(ctx.clock_ns(ClockType::Virtual), 10);
}

#[test]
fn fd_handler_misuse() {
    let ctx = AioContext::new().unwrap();
    let (a, _b) = UnixStream::pair().unwrap();
    assert_eq!(
        panic_message(|| ctx.set_fd_handler(a, false, None, None, None)),
        "AioContext::set_fd_handler: no callback given (drop the FdHandler to remove one)"
    );
    // epoll cannot watch a regular file.
    let file = std::fs::File::open("/proc/self/exe").unwrap();
    let raw = std::os::fd::AsRawFd::as_raw_fd(&file);
    let err = ctx
        .set_fd_handler(file, false, Some(Box::new(|| ())), None, None)
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PermissionDenied);
    assert_eq!(
        err.to_string(),
        format!(
            "AioContext::set_fd_handler: cannot watch fd {raw}: {}",
            std::io::Error::from_raw_os_error(libc::EPERM)
        )
    );
    assert!(!ctx.poll(false), "nothing stayed registered");
}

/// I/O safety: what a raw registration gives back is only the number. The
/// old `RawFdSource` was `Copy` and `AsFd`, so after `remove` safe code could
/// borrow (and dup) whatever file later got the number; that no longer
/// compiles (`compile_fail` doctests on `RawFdSource`).
#[test]
fn a_removed_raw_fd_handler_gives_back_only_the_number() {
    use std::os::fd::AsRawFd;

    let ctx = AioContext::new().unwrap();
    let (a, mut b) = UnixStream::pair().unwrap();
    let raw = a.as_raw_fd();
    let fired = Rc::new(Cell::new(0u32));
    let f = fired.clone();
    // SAFETY: `a` stays open until after the handler is removed (and
    // `_a2` below keeps it open to the end).
    let h = unsafe {
        ctx.set_fd_handler_raw(
            raw,
            false,
            Some(Box::new(move || f.set(f.get() + 1))),
            None,
            None,
        )
    }
    .unwrap();
    assert_eq!(h.get_ref().as_raw_fd(), raw);
    assert_eq!(format!("{h:?}"), format!("FdHandler {{ fd: {raw} }}"));
    b.write_all(b"x").unwrap();
    assert!(ctx.poll(false));
    assert_eq!(fired.get(), 1, "watched while registered");

    let src: coroloop::aio::RawFdSource = h.remove();
    assert_eq!(src.as_raw_fd(), raw);
    assert_eq!(src.raw_fd(), raw);
    assert_eq!(format!("{src:?}"), format!("RawFdSource({raw})"));
    // No longer watched: the byte is still unread, yet nothing fires.
    b.write_all(b"y").unwrap();
    assert!(!ctx.poll(false));
    assert_eq!(fired.get(), 1, "not watched after remove");
    // Out of the monitor too: the same fd registers again (no EEXIST).
    let a2 = Rc::new(a);
    let _a2 = a2.clone();
    let h2 = ctx
        .set_fd_handler(a2, false, Some(Box::new(|| ())), None, None)
        .unwrap();
    assert_eq!(h2.get_ref().as_raw_fd(), raw);
    assert!(ctx.poll(false), "readable: the new handler runs");
    drop(h2);

    // Panics and errors name the raw call.
    assert_eq!(
        // SAFETY: `_a2` keeps the fd open; no handler is made.
        panic_message(|| unsafe { ctx.set_fd_handler_raw(raw, false, None, None, None) }),
        "AioContext::set_fd_handler_raw: no callback given (drop the FdHandler to remove one)"
    );
    let file = std::fs::File::open("/proc/self/exe").unwrap();
    // SAFETY: `file` outlives the call, which fails (no handler is made).
    let err = unsafe {
        ctx.set_fd_handler_raw(file.as_raw_fd(), false, Some(Box::new(|| ())), None, None)
    }
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PermissionDenied);
    assert!(
        err.to_string().starts_with(&format!(
            "AioContext::set_fd_handler_raw: cannot watch fd {}: ",
            file.as_raw_fd()
        )),
        "{err}"
    );
}

// ---- handles outliving their context ----

#[test]
fn a_bh_keeps_its_context_alive() {
    let ctx = AioContext::new().unwrap();
    let runs = Arc::new(AtomicU32::new(0));
    let r = runs.clone();
    let bh = ctx.bh_new(move || {
        r.fetch_add(1, Ordering::SeqCst);
    });
    drop(ctx); // the BH's handle still holds the context
    bh.schedule();
    assert!(bh.is_scheduled());
    assert_eq!(runs.load(Ordering::SeqCst), 0, "nothing runs unless polled");
    assert!(bh.context().poll(false));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[test]
fn a_bh_of_a_stopped_iothread_never_runs_and_is_freed_with_the_context() {
    let io = IoThread::spawn("misuse-stopped").unwrap();
    let ran = Arc::new(AtomicBool::new(false));
    let (bh_dropped, d1) = flag();
    let r = ran.clone();
    let bh = io.context().bh_new(move || {
        let _ = &d1;
        r.store(true, Ordering::SeqCst);
    });
    io.stop();
    // The context is shut down and its thread gone: scheduling is accepted
    // (no panic) and does nothing.
    bh.schedule();
    bh.schedule();
    let (oneshot_dropped, d2) = flag();
    let r = ran.clone();
    io.context().bh_schedule_oneshot(move || {
        let _ = &d2;
        r.store(true, Ordering::SeqCst);
    });
    assert!(!oneshot_dropped.load(Ordering::SeqCst));
    drop(io);
    assert!(
        !bh_dropped.load(Ordering::SeqCst),
        "the Bh still holds them"
    );
    drop(bh); // the last handle of the context
    assert!(bh_dropped.load(Ordering::SeqCst));
    assert!(oneshot_dropped.load(Ordering::SeqCst));
    assert!(!ran.load(Ordering::SeqCst));
}

#[test]
fn a_timer_keeps_its_context_alive_and_never_fires_unpolled() {
    let ctx = AioContext::new().unwrap();
    let fired = Rc::new(Cell::new(false));
    let (dropped, d) = flag();
    let f = fired.clone();
    let timer = ctx.timer_new(ClockType::Virtual, move || {
        let _ = &d;
        f.set(true);
    });
    drop(ctx);
    // No panic: the timer's handle keeps the context alive, but nothing
    // can poll it any more, so the callback never runs.
    timer.mod_ns(0);
    assert!(timer.is_pending());
    timer.del();
    timer.mod_ns(1);
    assert!(!fired.get());
    drop(timer); // drops the context, and with it the callback
    assert!(dropped.load(Ordering::SeqCst));
    assert!(!fired.get());
}

#[test]
fn work_queued_at_home_after_shutdown_never_runs() {
    let ctx = AioContext::new().unwrap();
    ctx.shutdown();
    ctx.shutdown(); // idempotent
    let ran = Rc::new(Cell::new(false));
    let r = ran.clone();
    ctx.bh_schedule_oneshot_local(move || r.set(true));
    let bh = ctx.bh_new(|| unreachable!("a BH ran after shutdown"));
    bh.schedule();
    // A task spawned after shutdown is cancelled at once; its handle says
    // why (it used to be async-task's "Task polled after completion").
    let task = ctx.spawn_local(async { 1 });
    assert!(task.is_finished());
    assert!(!ctx.poll(false));
    assert!(!ran.get());
    assert_eq!(
        panic_message(|| ctx.block_on(task)),
        "coroloop Task: the AioContext shut down before the task finished \
         (await `task.fallible()` to get `None` instead)"
    );
}

#[test]
fn a_timer_armed_after_shutdown_does_not_fire() {
    let ctx = AioContext::new().unwrap();
    let fired = Rc::new(Cell::new(false));
    let f = fired.clone();
    let timer = ctx.timer_new(ClockType::Virtual, move || f.set(true));
    ctx.shutdown();
    timer.mod_ns(0);
    assert!(!ctx.poll(false), "poll has nothing to run after shutdown");
    assert!(!fired.get());
}

#[test]
fn an_fd_handler_added_after_shutdown_does_not_run() {
    let ctx = AioContext::new().unwrap();
    ctx.shutdown();
    let ran = Rc::new(Cell::new(false));
    let r = ran.clone();
    let (a, b) = UnixStream::pair().unwrap();
    let raw = std::os::fd::AsRawFd::as_raw_fd(&a);
    let err = ctx
        .set_fd_handler(a, false, Some(Box::new(move || r.set(true))), None, None)
        .expect_err("a shut-down context watches no new fd");
    assert_eq!(
        err.to_string(),
        format!("AioContext::set_fd_handler: cannot watch fd {raw}: the context is shut down")
    );
    let _ = (&b).write_all(b"x");
    assert!(!ctx.poll(false), "poll has nothing to run after shutdown");
    assert!(!ran.get());
}

#[test]
fn shutdown_cancels_the_coroutines_it_resumes_and_schedules_after_it_do_nothing() {
    let ctx = AioContext::new().unwrap();
    let co = Coroutine::new(|| {
        coroutine::suspend();
        7
    });
    co.enter();
    ctx.shutdown();
    // Its resumer is gone: nothing could resume it, so it was unwound.
    assert!(co.is_finished());
    assert_eq!(co.take_result(), None, "finished without a result");
    ctx.co_schedule(&co);
    assert!(!ctx.poll(false), "poll has nothing to run after shutdown");
    // A coroutine created afterwards has no resumer (the context resumes
    // nothing any more): a bare coroutine, owned by its handles.
    let late = Coroutine::new(|| {
        coroutine::suspend();
        1
    });
    assert!(late.aio_context().is_none());
    late.enter();
    late.enter();
    assert_eq!(late.take_result(), Some(1));
}

#[test]
fn bottom_halves_scheduled_after_shutdown_are_freed() {
    let ctx = AioContext::new().unwrap();
    ctx.shutdown();
    let (oneshot, d) = flag();
    ctx.bh_schedule_oneshot_local(move || {
        let _ = &d;
    });
    assert!(
        oneshot.load(Ordering::SeqCst),
        "the refused oneshot was dropped"
    );
    let (bh_cb, d) = flag();
    let bh = ctx.bh_new_local(move || {
        let _ = &d;
    });
    bh.schedule();
    assert!(!ctx.poll(false));
    drop(bh);
    assert!(
        bh_cb.load(Ordering::SeqCst),
        "the callback was dropped with its BH"
    );
}

#[test]
fn dropping_the_context_frees_pending_bottom_halves() {
    // A oneshot scheduled and never run.
    let ctx = AioContext::new().unwrap();
    let (oneshot, d) = flag();
    ctx.bh_schedule_oneshot_local(move || {
        let _ = &d;
    });
    drop(ctx);
    // A Bh handle dropped after the context's other handles.
    let ctx = AioContext::new().unwrap();
    let (bh_cb, d) = flag();
    let bh = ctx.bh_new(move || {
        let _ = &d;
    });
    drop(ctx);
    drop(bh);
    assert!(oneshot.load(Ordering::SeqCst), "pending oneshot leaked");
    assert!(bh_cb.load(Ordering::SeqCst), "deleted Bh leaked");
}

// ---- fds ----

#[test]
fn a_read_handler_sees_eof_when_the_peer_closes_and_fires_until_removed() {
    on_fresh_thread(|| {
        let ctx = AioContext::new().unwrap();
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let a = Rc::new(a);
        let reads: Rc<RefCell<Vec<usize>>> = Rc::default();
        let (a2, r) = (a.clone(), reads.clone());
        let handler = ctx
            .set_fd_handler(
                a.clone(),
                false,
                Some(Box::new(move || {
                    let mut buf = [0u8; 16];
                    let n = std::io::Read::read(&mut &*a2, &mut buf).expect("readable");
                    r.borrow_mut().push(n);
                })),
                None,
                None,
            )
            .unwrap();
        (&b).write_all(b"hi").unwrap();
        drop(b);
        // The data, then EOF: `poll(true)` never blocks on a closed peer.
        assert!(ctx.poll(true));
        assert!(ctx.poll(true));
        assert_eq!(*reads.borrow(), [2, 0]);
        // Level-triggered: a hung-up fd stays ready, so the handler runs on
        // every poll (a loop that keeps it registered spins) ...
        for i in 0..3 {
            assert!(ctx.poll(true));
            assert_eq!(reads.borrow().len(), 3 + i);
        }
        assert!(reads.borrow().iter().skip(1).all(|&n| n == 0));
        // ... until it is removed, which the owner does on EOF.
        drop(handler);
        assert!(!ctx.poll(false));
        assert_eq!(ctx.compute_timeout(), None, "poll(true) would now sleep");
        assert_eq!(reads.borrow().len(), 5);
    });
}

#[test]
fn a_read_handler_may_remove_itself_on_eof() {
    on_fresh_thread(|| {
        let ctx = AioContext::new().unwrap();
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let a = Rc::new(a);
        let slot: Rc<RefCell<Option<coroloop::aio::FdHandler<Rc<UnixStream>>>>> = Rc::default();
        let calls = Rc::new(Cell::new(0));
        let (a2, s, c) = (a.clone(), slot.clone(), calls.clone());
        let h = ctx
            .set_fd_handler(
                a.clone(),
                false,
                Some(Box::new(move || {
                    c.set(c.get() + 1);
                    let mut buf = [0u8; 16];
                    if std::io::Read::read(&mut &*a2, &mut buf).unwrap() == 0 {
                        drop(s.borrow_mut().take()); // unregister from inside
                    }
                })),
                None,
                None,
            )
            .unwrap();
        *slot.borrow_mut() = Some(h);
        drop(b);
        assert!(ctx.poll(true));
        assert_eq!(calls.get(), 1);
        assert!(slot.borrow().is_none());
        assert!(!ctx.poll(false));
        assert_eq!(calls.get(), 1);
    });
}

#[test]
fn a_write_handler_sees_epipe_when_the_peer_closes() {
    on_fresh_thread(|| {
        let ctx = AioContext::new().unwrap();
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let a = Rc::new(a);
        let errs: Rc<RefCell<Vec<ErrorKind>>> = Rc::default();
        let (a2, e) = (a.clone(), errs.clone());
        let handler = ctx
            .set_fd_handler(
                a.clone(),
                false,
                None,
                Some(Box::new(move || {
                    if let Err(err) = (&*a2).write(b"x") {
                        e.borrow_mut().push(err.kind());
                    }
                })),
                None,
            )
            .unwrap();
        drop(b);
        assert!(ctx.poll(true));
        assert_eq!(*errs.borrow(), [ErrorKind::BrokenPipe]);
        drop(handler);
        assert!(!ctx.poll(false));
    });
}

// ---- IoThread ----

#[test]
fn iothread_stop_twice_panics() {
    let io = IoThread::spawn("misuse-twice").unwrap();
    assert!(!io.is_stopped());
    io.stop();
    assert!(io.is_stopped());
    assert_eq!(
        panic_message(|| io.stop()),
        "IoThread::stop: IoThread 'misuse-twice' is already stopped"
    );
    assert!(io.is_stopped());
    drop(io); // and dropping a stopped IoThread does nothing more
}

#[test]
fn iothread_stop_from_the_iothread_itself_panics() {
    let io = Arc::new(IoThread::spawn("misuse-self").unwrap());
    let (tx, rx) = mpsc::channel();
    let me = io.clone();
    io.context().bh_schedule_oneshot(move || {
        let msg = panic_message(|| me.stop());
        drop(me);
        tx.send(msg).unwrap();
    });
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(10)).unwrap(),
        "IoThread::stop: called from IoThread 'misuse-self' itself; stop it from another thread"
    );
    // What becomes of the thread afterwards: see the ignored test below.
}

#[test]
fn iothread_refusing_to_stop_itself_can_still_be_stopped() {
    let io = Arc::new(IoThread::spawn("misuse-self2").unwrap());
    let (tx, rx) = mpsc::channel();
    let me = io.clone();
    io.context().bh_schedule_oneshot(move || {
        let refused = catch_unwind(AssertUnwindSafe(|| me.stop())).is_err();
        drop(me);
        tx.send(refused).unwrap();
    });
    assert!(rx.recv_timeout(Duration::from_secs(10)).unwrap());
    assert!(!io.is_stopped(), "the thread still runs");
    io.stop();
    assert!(io.is_stopped());
}

#[test]
fn run_in_smol_future_is_not_send() {
    // Autoref specialisation: the inherent method applies only to `Send`
    // types, the trait method to the others.
    struct Probe<T>(std::marker::PhantomData<T>);
    trait NotSend {
        fn is_send(&self) -> bool {
            false
        }
    }
    impl<T> NotSend for Probe<T> {}
    impl<T: Send> Probe<T> {
        fn is_send(&self) -> bool {
            true
        }
    }
    fn probe<T>(_: &T) -> Probe<T> {
        Probe(std::marker::PhantomData)
    }
    // The probe tells `Send` from `!Send`.
    assert!(probe(&Arc::new(1)).is_send());
    assert!(!probe(&Rc::new(1)).is_send());
    let ctx = AioContext::new().unwrap();
    let driver = ctx.run_in_smol();
    assert!(!probe(&driver).is_send(), "run_in_smol's future is Send");
}
