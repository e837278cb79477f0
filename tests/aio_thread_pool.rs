//! The thread pool: QEMU's tests/unit/test-thread-pool.c re-derived
//! (submit, submit_aio, submit_co, submit_many).

use std::cell::Cell;
use std::rc::Rc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use coroloop::aio::AioContext;
use coroloop::Coroutine;

// /thread-pool/submit: fire and forget.
#[test]
fn submit() {
    let ctx = AioContext::new().unwrap();
    let n = Arc::new(AtomicU32::new(0));
    let n2 = n.clone();
    ctx.thread_pool()
        .submit(move || n2.fetch_add(1, Ordering::SeqCst), |_| {});
    ctx.poll_while(|| n.load(Ordering::SeqCst) == 0);
    assert_eq!(n.load(Ordering::SeqCst), 1);
}

// /thread-pool/submit-aio: the completion runs on the context, after a poll.
#[test]
fn submit_aio() {
    let ctx = AioContext::new().unwrap();
    let home = std::thread::current().id();
    let n = Arc::new(AtomicU32::new(0));
    let ret = Arc::new(AtomicU32::new(u32::MAX)); // "in progress"
    let (n2, r2) = (n.clone(), ret.clone());
    ctx.thread_pool().submit(
        move || n2.fetch_add(1, Ordering::SeqCst),
        move |old| {
            assert_eq!(std::thread::current().id(), home);
            r2.store(old, Ordering::SeqCst);
        },
    );
    std::thread::sleep(Duration::from_millis(10));
    assert_eq!(
        ret.load(Ordering::SeqCst),
        u32::MAX,
        "completions wait for a poll"
    );
    ctx.poll_while(|| ret.load(Ordering::SeqCst) == u32::MAX);
    assert_eq!(n.load(Ordering::SeqCst), 1);
    assert_eq!(ret.load(Ordering::SeqCst), 0);
}

// /thread-pool/submit-co: the coroutine yields until the work is done.
#[test]
fn submit_co() {
    let ctx = AioContext::new().unwrap();
    let active = Rc::new(Cell::new(0));
    let ret = Rc::new(Cell::new(None));
    let n = Arc::new(AtomicU32::new(0));
    let (a, r, n2, c) = (active.clone(), ret.clone(), n.clone(), ctx.clone());
    let co = Coroutine::new(move || {
        a.set(1);
        let n3 = n2.clone();
        let old = c.thread_pool().submit_co(move || {
            std::thread::sleep(Duration::from_millis(5));
            n3.fetch_add(1, Ordering::SeqCst)
        });
        assert_eq!(n2.load(Ordering::SeqCst), 1);
        r.set(Some(old));
        a.set(0);
    });
    co.enter();
    assert_eq!(active.get(), 1);
    assert_eq!(ret.get(), None);
    // A stray wake while it waits does not end the wait early.
    co.remote().wake();
    ctx.poll(false);
    ctx.poll_while(|| ret.get().is_none());
    assert_eq!(active.get(), 0);
    assert_eq!(ret.get(), Some(0));
    assert_eq!(n.load(Ordering::SeqCst), 1);
}

// /thread-pool/submit-many: more items than workers.
#[test]
fn submit_many() {
    let ctx = AioContext::new().unwrap();
    const N: usize = 100;
    let home = std::thread::current().id();
    let ns: Vec<_> = (0..N).map(|_| Arc::new(AtomicU32::new(0))).collect();
    let rets: Vec<_> = (0..N).map(|_| Arc::new(AtomicU32::new(u32::MAX))).collect();
    let active = Arc::new(std::sync::atomic::AtomicUsize::new(N));
    let pool = ctx.thread_pool();
    for i in 0..N {
        let (n, r, a) = (ns[i].clone(), rets[i].clone(), active.clone());
        pool.submit(
            move || {
                std::thread::sleep(Duration::from_millis(1));
                n.fetch_add(1, Ordering::SeqCst)
            },
            move |old| {
                assert_eq!(std::thread::current().id(), home);
                r.store(old, Ordering::SeqCst);
                a.fetch_sub(1, Ordering::SeqCst);
            },
        );
    }
    assert!(pool.workers() <= pool.max_workers());
    ctx.poll_while(|| active.load(Ordering::SeqCst) > 0);
    for i in 0..N {
        assert_eq!(ns[i].load(Ordering::SeqCst), 1);
        assert_eq!(rets[i].load(Ordering::SeqCst), 0);
    }
    assert_eq!(pool.completed(), N);
}

#[test]
fn a_panicking_job_is_reported_in_the_coroutine() {
    let ctx = AioContext::new().unwrap();
    let c = ctx.clone();
    let co = Coroutine::new(move || {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            c.thread_pool().submit_co(|| -> u32 { panic!("job boom") })
        }))
        .is_err()
    });
    co.enter();
    ctx.poll_while(|| !co.is_finished());
    assert_eq!(co.take_result(), Some(true));
    // The pool still works.
    let c = ctx.clone();
    let co = Coroutine::new(move || c.thread_pool().submit_co(|| 7));
    co.enter();
    ctx.poll_while(|| !co.is_finished());
    assert_eq!(co.take_result(), Some(7));
}

#[test]
fn submit_co_outside_a_coroutine_panics() {
    let ctx = AioContext::new().unwrap();
    let p = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        ctx.thread_pool().submit_co(|| 1)
    }))
    .unwrap_err();
    assert_eq!(
        p.downcast_ref::<&str>().copied(),
        Some("ThreadPool::submit_co called outside a coroutine")
    );
}
