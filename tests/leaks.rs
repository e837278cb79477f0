//! Leaks (issue "Reliability", part 3): tearing an AioContext down — by
//! dropping its last handle on the home thread, by `shutdown()`, or by
//! `IoThread::stop()` — frees everything it holds and runs every
//! destructor: pending bottom halves, timers, fd handlers, suspended and
//! detached coroutines, queued and pending tasks. Every object under test
//! holds a [`Counted`], whose destructor bumps a counter, and each test
//! asserts the exact number of destructor runs at each step.
//!
//! Coroutine stacks are checked too: after a teardown, every stack the test
//! used is back in a pool (or unmapped). The stack counters are process
//! wide, so the tests run one at a time (`SERIAL`), and all coroutine work
//! happens on a thread of its own that is joined before the final check
//! (the libtest threads never create coroutines, so no other thread holds
//! pooled workers).

use std::cell::Cell;
use std::future::Future;
use std::os::unix::net::UnixStream;
use std::panic::resume_unwind;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use coroloop::aio::{AioContext, ClockType, IoThread};
use coroloop::coroutine::{self, Coroutine};
use coroloop::future::{await_future, CoroutineFuture};
use coroloop::sync::{CoMutex, CoQueue, CoSleep};

// ---- helpers ----

/// Bumps its counter when dropped.
#[derive(Debug)]
struct Counted(Arc<AtomicUsize>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_add(1, SeqCst);
    }
}

/// A destructor counter and the `Counted` values that feed it.
#[derive(Clone, Default)]
struct Drops {
    dropped: Arc<AtomicUsize>,
    made: Arc<AtomicUsize>,
}

impl Drops {
    fn counted(&self) -> Counted {
        self.made.fetch_add(1, SeqCst);
        Counted(self.dropped.clone())
    }
    /// Destructor runs so far.
    fn get(&self) -> usize {
        self.dropped.load(SeqCst)
    }
    /// `Counted` values made so far.
    fn made(&self) -> usize {
        self.made.load(SeqCst)
    }
}

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Stacks mapped and not idle in this thread's pool or the release pool:
/// those some coroutine (or another thread's pool) still holds.
fn in_use_stacks() -> usize {
    let (local, global) = coroutine::pool_stats();
    coroutine::live_stacks() - local - global
}

/// Runs `f` alone (no other test of this binary runs meanwhile) on a new
/// thread, joins it, and checks that every coroutine stack it used is idle
/// in the release pool or unmapped afterwards (the thread's own pool is
/// retired when it exits).
fn isolated(f: impl FnOnce() + Send + 'static) {
    let _g = serial();
    let before = in_use_stacks();
    let r = std::thread::Builder::new()
        .name("leaks-home".into())
        .spawn(move || {
            let before = in_use_stacks();
            f();
            assert_eq!(
                in_use_stacks(),
                before,
                "a coroutine stack is still in use after the teardown"
            );
        })
        .unwrap()
        .join();
    if let Err(p) = r {
        resume_unwind(p);
    }
    assert_eq!(
        in_use_stacks(),
        before,
        "the home thread exited but a stack was neither pooled nor unmapped"
    );
}

struct NoopWake;
impl Wake for NoopWake {
    fn wake(self: Arc<Self>) {}
}

/// Polls `fut` once with a waker that does nothing.
fn poll_once<F: Future + Unpin>(fut: &mut F) -> Poll<F::Output> {
    let waker = Waker::from(Arc::new(NoopWake));
    Pin::new(fut).poll(&mut Context::from_waker(&waker))
}

/// A future that never completes and keeps the wakers it is polled with
/// (so whoever polls it stays referenced, as a real I/O future would).
struct Never(Vec<Waker>);

impl Future for Never {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let w = cx.waker().clone();
        self.0.push(w);
        Poll::Pending
    }
}

/// Polls `ctx` until nothing is left to run (bounded).
fn settle(ctx: &AioContext) {
    for _ in 0..100 {
        if !ctx.poll(false) {
            return;
        }
    }
    panic!("the context never settled");
}

/// A coroutine that holds `c` and stays suspended until unwound.
fn suspended_forever(c: Counted) -> impl FnOnce() + 'static {
    move || {
        let _c = c;
        loop {
            coroutine::suspend();
        }
    }
}

// ---- bottom halves ----

// Bottom halves scheduled from other threads and never run sit on the
// context's remote list; dropping the context frees them (and their
// callbacks) without running them.
#[test]
fn remote_pending_bottom_halves_are_freed_with_the_context() {
    isolated(|| {
        let ctx = AioContext::new().unwrap();
        let drops = Drops::default();
        let ran = Arc::new(AtomicUsize::new(0));
        // A Bh scheduled from another thread, whose handle is then dropped
        // (DELETED while pending).
        let (c, r) = (drops.counted(), ran.clone());
        let bh = ctx.bh_new(move || {
            let _ = &c;
            r.fetch_add(1, SeqCst);
        });
        std::thread::scope(|s| {
            s.spawn(|| bh.schedule());
        });
        drop(bh);
        // A oneshot scheduled from another thread.
        let (c, r, ctx2) = (drops.counted(), ran.clone(), ctx.clone());
        std::thread::spawn(move || {
            ctx2.bh_schedule_oneshot(move || {
                let _c = c;
                r.fetch_add(1, SeqCst);
            })
        })
        .join()
        .unwrap();
        assert_eq!(drops.get(), 0, "pending: nothing freed yet");
        drop(ctx);
        assert_eq!(ran.load(SeqCst), 0, "dropping a context runs no BH");
        assert_eq!(drops.get(), 2, "both pending BHs freed with the context");
    });
}

// The same objects scheduled on the home thread sit on the home-thread
// list (no atomics), which the last drop must free as well.
#[test]
fn home_pending_bottom_halves_are_freed_with_the_context() {
    isolated(|| {
        let ctx = AioContext::new().unwrap();
        let drops = Drops::default();
        let ran = Arc::new(AtomicUsize::new(0));
        // bh_new scheduled here, handle dropped while pending.
        let (c, r) = (drops.counted(), ran.clone());
        let bh = ctx.bh_new(move || {
            let _ = &c;
            r.fetch_add(1, SeqCst);
        });
        bh.schedule();
        drop(bh);
        // bh_new_local, likewise.
        let (c, r) = (drops.counted(), ran.clone());
        let lbh = ctx.bh_new_local(move || {
            let _ = &c;
            r.fetch_add(1, SeqCst);
        });
        lbh.schedule();
        drop(lbh);
        // Oneshots from the home thread.
        let (c, r) = (drops.counted(), ran.clone());
        ctx.bh_schedule_oneshot(move || {
            let _c = c;
            r.fetch_add(1, SeqCst);
        });
        let (c, r) = (drops.counted(), ran.clone());
        ctx.bh_schedule_oneshot_local(move || {
            let _c = c;
            r.fetch_add(1, SeqCst);
        });
        assert_eq!(drops.get(), 0);
        drop(ctx);
        assert_eq!(ran.load(SeqCst), 0, "dropping a context runs no BH");
        assert_eq!(drops.get(), 4, "every pending BH is freed with the context");
    });
}

// The same BHs with shutdown() before the drop: freed by shutdown, none run.
#[test]
fn shutdown_frees_pending_bottom_halves() {
    isolated(|| {
        let ctx = AioContext::new().unwrap();
        let drops = Drops::default();
        let ran = Arc::new(AtomicUsize::new(0));
        let (c, r) = (drops.counted(), ran.clone());
        let bh = ctx.bh_new(move || {
            let _ = &c;
            r.fetch_add(1, SeqCst);
        });
        bh.schedule();
        drop(bh);
        let (c, r) = (drops.counted(), ran.clone());
        let lbh = ctx.bh_new_local(move || {
            let _ = &c;
            r.fetch_add(1, SeqCst);
        });
        lbh.schedule();
        let (c, r) = (drops.counted(), ran.clone());
        ctx.bh_schedule_oneshot(move || {
            let _c = c;
            r.fetch_add(1, SeqCst);
        });
        let (c, r) = (drops.counted(), ran.clone());
        ctx.bh_schedule_oneshot_local(move || {
            let _c = c;
            r.fetch_add(1, SeqCst);
        });
        let (c, r, ctx2) = (drops.counted(), ran.clone(), ctx.clone());
        std::thread::spawn(move || {
            ctx2.bh_schedule_oneshot(move || {
                let _c = c;
                r.fetch_add(1, SeqCst);
            })
        })
        .join()
        .unwrap();
        ctx.shutdown();
        assert_eq!(drops.get(), 4, "shutdown frees every BH the lists own");
        // A BH handle that outlives shutdown still owns its node: freed
        // when it is dropped.
        assert!(!ctx.poll(false));
        drop(lbh);
        assert_eq!(drops.get(), 5);
        drop(ctx);
        assert_eq!(ran.load(SeqCst), 0, "no BH ran");
        assert_eq!(drops.get(), 5);
    });
}

// Scheduling a BH on the home thread after shutdown does nothing (the
// loop is gone), and dropping its handle then frees it.
#[test]
fn bh_scheduled_on_the_home_thread_after_shutdown_is_freed_when_dropped() {
    isolated(|| {
        let ctx = AioContext::new().unwrap();
        let drops = Drops::default();
        ctx.shutdown();
        let c = drops.counted();
        let bh = ctx.bh_new_local(move || {
            let _ = &c;
        });
        bh.schedule();
        assert!(!ctx.poll(false), "a dead context runs nothing");
        drop(bh);
        assert_eq!(drops.get(), 1, "the dropped handle freed its BH");
        let c = drops.counted();
        let bh = ctx.bh_new(move || {
            let _ = &c;
        });
        bh.schedule();
        drop(bh);
        assert_eq!(drops.get(), 2);
        drop(ctx);
        assert_eq!(drops.get(), 2);
    });
}

// ---- timers ----

// A timer armed far in the future, whose handle is dropped: its callback
// is freed at the latest with the context, never run.
#[test]
fn far_timers_are_freed_with_the_context() {
    isolated(|| {
        let ctx = AioContext::new().unwrap();
        let drops = Drops::default();
        let ran = Rc::new(Cell::new(0));
        for clock in [ClockType::Realtime, ClockType::Host, ClockType::Virtual] {
            let (c, r) = (drops.counted(), ran.clone());
            let t = ctx.timer_new(clock, move || {
                let _ = &c;
                r.set(r.get() + 1);
            });
            t.mod_after(Duration::from_secs(3600));
            drop(t);
        }
        settle(&ctx);
        drop(ctx);
        assert_eq!(ran.get(), 0);
        assert_eq!(drops.get(), 3, "every timer callback is freed");
    });
}

// Dropping a Timer deletes it (the docs; QEMU's timer_del + timer_free):
// its callback, and what the callback holds, should go with it, not
// linger in the context's timer heap. Here an earlier timer stays armed,
// so the deleted entry is never at the top of the heap, where the lazy
// deletion would pop it.
#[test]
fn dropping_an_armed_timer_drops_its_callback() {
    isolated(|| {
        let ctx = AioContext::new().unwrap();
        let drops = Drops::default();
        let earlier = ctx.timer_new(ClockType::Virtual, || ());
        earlier.mod_after(Duration::from_secs(1));
        let c = drops.counted();
        let t = ctx.timer_new(ClockType::Virtual, move || {
            let _ = &c;
        });
        t.mod_after(Duration::from_secs(3600));
        drop(t);
        assert_eq!(ctx.compute_timeout(), None, "only virtual timers, none due");
        settle(&ctx);
        assert_eq!(drops.get(), 1, "the deleted timer's callback was dropped");
        drop(earlier);
        drop(ctx);
        assert_eq!(drops.get(), 1);
    });
}

// A never-armed timer's callback goes with the handle.
#[test]
fn dropping_an_unarmed_timer_drops_its_callback() {
    isolated(|| {
        let ctx = AioContext::new().unwrap();
        let drops = Drops::default();
        let c = drops.counted();
        let t = ctx.timer_new(ClockType::Realtime, move || {
            let _ = &c;
        });
        drop(t);
        assert_eq!(drops.get(), 1);
        drop(ctx);
        assert_eq!(drops.get(), 1);
    });
}

// ---- fd handlers ----

// An fd handler's callbacks (read, write, io_poll, poll begin/end) are
// dropped when its handle is (the handle keeps the context alive, so it
// always goes first), and the fd is given back or closed.
#[test]
fn fd_handler_callbacks_are_dropped_with_the_handler() {
    isolated(|| {
        let ctx = AioContext::new().unwrap();
        let drops = Drops::default();
        let (a, _b) = UnixStream::pair().unwrap();
        let (c1, c2, c3, c4, c5) = (
            drops.counted(),
            drops.counted(),
            drops.counted(),
            drops.counted(),
            drops.counted(),
        );
        let h = ctx
            .set_fd_handler(
                a,
                false,
                Some(Box::new(move || {
                    let _ = &c1;
                })),
                Some(Box::new(move || {
                    let _ = &c2;
                })),
                Some(Box::new(move || {
                    let _ = &c3;
                    false
                })),
            )
            .unwrap();
        h.set_poll(
            Some(Box::new(move || {
                let _ = &c4;
            })),
            Some(Box::new(move || {
                let _ = &c5;
            })),
        );
        ctx.poll(false); // the write callback runs: the socket is writable
        assert_eq!(drops.get(), 0);
        let a = h.remove();
        assert_eq!(drops.get(), 5, "all five callbacks dropped on removal");
        drop(a);
        drop(ctx);
        assert_eq!(drops.get(), 5);
    });
}

// ---- coroutines ----

// A suspended coroutine whose last handle is dropped is taken over by its
// context (ARCHITECTURE.md, "Who owns a coroutine"), as a detached one is; a bare
// one (no context) is unwound at once; every coroutine the context
// resumes is unwound when the context goes.
#[test]
fn suspended_and_detached_coroutines_are_unwound() {
    isolated(|| {
        let drops = Drops::default();
        let co = Coroutine::new(suspended_forever(drops.counted()));
        co.enter();
        drop(co);
        assert_eq!(drops.get(), 1, "bare: unwound when its last handle went");
    });
    isolated(|| {
        let ctx = AioContext::new().unwrap();
        let drops = Drops::default();
        let co = Coroutine::new(suspended_forever(drops.counted()));
        co.enter();
        assert_eq!(drops.get(), 0);
        drop(co);
        assert_eq!(drops.get(), 0, "its context owns it now");
        assert_eq!(ctx.detached_count(), 1);
        let co = Coroutine::new(suspended_forever(drops.counted()));
        co.enter();
        co.cancel();
        assert!(co.is_finished());
        assert_eq!(drops.get(), 1, "cancel unwinds it");
        for _ in 0..3 {
            let co = Coroutine::new(suspended_forever(drops.counted()));
            co.enter();
            co.detach();
        }
        // A detached coroutine that is still fresh, and one queued to run.
        let fresh = Coroutine::new(suspended_forever(drops.counted()));
        fresh.detach();
        let queued = Coroutine::new(suspended_forever(drops.counted()));
        queued.enter();
        ctx.co_schedule(&queued);
        queued.detach();
        assert_eq!(ctx.detached_count(), 6);
        assert_eq!(drops.get(), 1);
        drop(ctx);
        assert_eq!(
            drops.get(),
            7,
            "the context unwound every coroutine it owned"
        );
    });
}

// Detached coroutines waiting in the library's primitives (none of which
// holds the context) are unwound by the context's drop, and their waits
// leave no trace (wait records unlink themselves).
#[test]
fn detached_coroutines_waiting_in_locks_are_unwound() {
    isolated(|| {
        let ctx = AioContext::new().unwrap();
        let drops = Drops::default();
        let m = Arc::new(CoMutex::new(0));
        let q = Arc::new(CoQueue::new());
        let s = Arc::new(CoSleep::new());
        let held = m.try_lock().unwrap();
        let bodies: Vec<Box<dyn FnOnce()>> = vec![
            {
                let (m, c) = (m.clone(), drops.counted());
                Box::new(move || {
                    let _c = c;
                    let _g = m.lock();
                    unreachable!("the lock is never released");
                })
            },
            {
                let (q, c) = (q.clone(), drops.counted());
                Box::new(move || {
                    let _c = c;
                    q.wait_unlocked();
                    unreachable!("never woken");
                })
            },
            {
                let (s, c) = (s.clone(), drops.counted());
                Box::new(move || {
                    let _c = c;
                    s.sleep();
                    unreachable!("never woken");
                })
            },
            {
                let c = drops.counted();
                Box::new(move || {
                    let _c = c;
                    await_future(Never(Vec::new()));
                })
            },
        ];
        for b in bodies {
            let co = Coroutine::new(b);
            co.enter();
            co.detach();
        }
        settle(&ctx);
        assert_eq!(drops.get(), 0);
        drop(ctx);
        assert_eq!(drops.get(), 4);
        // The waits unlinked themselves: the lock and the queue are clean.
        assert!(q.is_empty(), "the unwound CoQueue waiter left the queue");
        assert!(!s.wake(), "the unwound sleeper unregistered");
        drop(held);
        assert!(!m.is_locked(), "nobody inherited the lock");
    });
}

// ---- tasks ----

// Tasks queued and never run (spawn, spawn_local, spawn_coroutine before
// its first poll) are dropped with the context; their handles then report
// cancellation.
#[test]
fn queued_tasks_are_dropped_with_the_context() {
    isolated(|| {
        let ctx = AioContext::new().unwrap();
        let drops = Drops::default();
        let ran = Arc::new(AtomicUsize::new(0));
        let (c, r) = (drops.counted(), ran.clone());
        let t_send = ctx.spawn(async move {
            let _c = c;
            r.fetch_add(1, SeqCst);
        });
        let (c, r) = (drops.counted(), ran.clone());
        ctx.spawn(async move {
            let _c = c;
            r.fetch_add(1, SeqCst);
        })
        .detach();
        let (c, r) = (Rc::new(drops.counted()), ran.clone());
        ctx.spawn_local(async move {
            let _c = c;
            r.fetch_add(1, SeqCst);
        })
        .detach();
        let (c, r) = (drops.counted(), ran.clone());
        let t_co = ctx.spawn_coroutine(move || {
            let _c = c;
            r.fetch_add(1, SeqCst);
        });
        let (c, r) = (drops.counted(), ran.clone());
        ctx.spawn_coroutine(move || {
            let _c = c;
            r.fetch_add(1, SeqCst);
        })
        .detach();
        // Spawned from another thread.
        let (c, r, ctx2) = (drops.counted(), ran.clone(), ctx.clone());
        std::thread::spawn(move || {
            ctx2.spawn_coroutine(move || {
                let _c = c;
                r.fetch_add(1, SeqCst);
            })
            .detach()
        })
        .join()
        .unwrap();
        assert_eq!(drops.get(), 0);
        drop(ctx);
        assert_eq!(ran.load(SeqCst), 0, "no queued task ran");
        assert_eq!(drops.get(), 6, "every queued task's future was dropped");
        assert_eq!(smol::block_on(t_send.fallible()), None, "cancelled");
        assert_eq!(smol::block_on(t_co.fallible()), None, "cancelled");
    });
}

// A CoroutineFuture dropped while pending unwinds its coroutine at once.
#[test]
fn coroutine_future_dropped_while_pending_unwinds() {
    isolated(|| {
        let _ctx = AioContext::new().unwrap();
        let drops = Drops::default();
        let c = drops.counted();
        let mut fut = CoroutineFuture::new(move || {
            let _c = c;
            await_future(Never(Vec::new()));
        });
        assert!(poll_once(&mut fut).is_pending());
        // Also a nested coroutine, created inside (same resumer).
        let c = drops.counted();
        let mut fut2 = CoroutineFuture::new(move || {
            let inner = Coroutine::new(suspended_forever(c));
            inner.enter();
            loop {
                coroutine::suspend();
            }
        });
        assert!(poll_once(&mut fut2).is_pending());
        assert_eq!(drops.get(), 0);
        drop(fut);
        assert_eq!(drops.get(), 1);
        drop(fut2);
        assert_eq!(drops.get(), 2);
    });
}

// A task whose Task handle is dropped while its coroutine is suspended is
// cancelled: the next poll of the context drops the future, unwinding the
// coroutine.
#[test]
fn cancelled_pending_tasks_unwind_their_coroutines() {
    isolated(|| {
        let ctx = AioContext::new().unwrap();
        let drops = Drops::default();
        let c = drops.counted();
        let t1 = ctx.spawn_coroutine(move || {
            let _c = c;
            loop {
                coroutine::suspend();
            }
        });
        let c = drops.counted();
        let t2 = ctx.spawn_local(CoroutineFuture::new(move || {
            let _c = c;
            await_future(Never(Vec::new()));
        }));
        settle(&ctx);
        assert_eq!(drops.get(), 0);
        drop(t1);
        drop(t2);
        settle(&ctx);
        assert_eq!(drops.get(), 2);
        drop(ctx);
        assert_eq!(drops.get(), 2);
    });
}

// ARCHITECTURE.md, "Who owns a coroutine": a coroutine spawned with
// `spawn_coroutine` belongs to its home context, and dropping the context
// (or shutting it down) unwinds the ones that remain. Here the coroutine
// has started and is suspended, so its task is in no queue: it is
// referenced only by the task waker that its own CoroutineFuture's resumer
// keeps.
#[test]
fn pending_spawned_coroutines_are_unwound_with_the_context() {
    isolated(|| {
        let drops = Drops::default();
        for shutdown in [false, true] {
            let ctx = AioContext::new().unwrap();
            let c = drops.counted();
            ctx.spawn_coroutine(move || {
                let _c = c;
                loop {
                    coroutine::suspend();
                }
            })
            .detach();
            let c = drops.counted();
            ctx.spawn_coroutine(move || {
                let _c = c;
                await_future(std::future::pending::<()>());
            })
            .detach();
            settle(&ctx);
            let base = drops.get();
            if shutdown {
                ctx.shutdown();
            }
            drop(ctx);
            assert_eq!(
                drops.get() - base,
                2,
                "the context unwound its pending coroutines (shutdown: {shutdown})"
            );
        }
    });
}

// Pending (not queued) tasks whose only references are their own wakers,
// kept by their futures: an executor that goes away drops them (smol's
// Executor does); an AioContext keeps no list of its tasks.
#[test]
fn pending_tasks_are_dropped_with_the_context() {
    isolated(|| {
        let ctx = AioContext::new().unwrap();
        let drops = Drops::default();
        let c = drops.counted();
        ctx.spawn(async move {
            let _c = c;
            Never(Vec::new()).await;
        })
        .detach();
        let c = Rc::new(drops.counted());
        ctx.spawn_local(async move {
            let _c = c;
            Never(Vec::new()).await;
        })
        .detach();
        let c = drops.counted();
        ctx.spawn_local(CoroutineFuture::new(move || {
            let _c = c;
            loop {
                coroutine::suspend();
            }
        }))
        .detach();
        settle(&ctx);
        assert_eq!(drops.get(), 0);
        drop(ctx);
        assert_eq!(drops.get(), 3, "the context dropped its pending tasks");
    });
}

// The same with the Task handle kept past the context: the context still
// owns the coroutine (ARCHITECTURE.md), so its drop unwinds it; the handle then
// reports cancellation.
#[test]
fn pending_spawned_coroutine_with_a_live_handle_is_unwound_with_the_context() {
    isolated(|| {
        let ctx = AioContext::new().unwrap();
        let drops = Drops::default();
        let c = drops.counted();
        let task = ctx.spawn_coroutine(move || {
            let _c = c;
            loop {
                coroutine::suspend();
            }
        });
        settle(&ctx);
        assert_eq!(drops.get(), 0);
        drop(ctx);
        assert_eq!(drops.get(), 1, "the context unwound the coroutine it owned");
        assert_eq!(smol::block_on(task.fallible()), None);
    });
}

// ---- what keeps a context alive ----

/// Runs `body` (which gets the context and a Counted) in a detached
/// coroutine that then waits forever, drops the test's handle to the
/// context, and returns whether the context survived (found again through
/// `AioContext::current()`, which only sees live contexts). A surviving
/// context is shut down, which must unwind the coroutine and let the
/// context go.
fn survives_its_last_handle(name: &str, body: impl FnOnce(AioContext, Counted) + 'static) -> bool {
    let ctx = AioContext::new().unwrap();
    let drops = Drops::default();
    let (c, ctx2) = (drops.counted(), ctx.clone());
    let co = Coroutine::new(move || body(ctx2, c));
    co.enter();
    co.detach();
    settle(&ctx);
    assert_eq!(drops.get(), 0, "{name}: the body waits");
    drop(ctx);
    match AioContext::current() {
        None => {
            assert_eq!(
                drops.get(),
                1,
                "{name}: context gone: the coroutine was unwound"
            );
            false
        }
        Some(ctx) => {
            assert_eq!(
                drops.get(),
                0,
                "{name}: context alive: the coroutine waits on"
            );
            assert_eq!(ctx.detached_count(), 1);
            ctx.shutdown();
            assert_eq!(drops.get(), 1, "{name}: shutdown unwound the coroutine");
            drop(ctx);
            assert!(
                AioContext::current().is_none(),
                "{name}: shutdown broke the cycle"
            );
            true
        }
    }
}

// User handles that own a piece of the context (Timer, Bh, LocalBh,
// FdHandler) keep it alive from inside a detached coroutine: only
// shutdown() ends such a context (AioContext::shutdown's docs). The
// library's own references (coroutine::sleep's timer, an fd wait's
// handler, CoSleep::sleep_for's timer: see
// coroutine_sleeping_in_sleep_for_is_unwound), wakers, remote handles,
// Task handles and waits that do not hold the context do not keep it
// alive (ARCHITECTURE.md, "Who owns a coroutine").
#[test]
fn what_keeps_a_context_alive_and_shutdown_breaks_the_cycle() {
    isolated(|| {
        type Body = Box<dyn FnOnce(AioContext, Counted)>;
        let cases: Vec<(&str, bool, Body)> = vec![
            (
                "a Timer handle",
                true,
                Box::new(|ctx, c| {
                    let t = ctx.timer_new(ClockType::Realtime, || ());
                    t.mod_after(Duration::from_secs(3600));
                    drop(ctx);
                    let _keep = (t, c);
                    loop {
                        coroutine::suspend();
                    }
                }),
            ),
            (
                "a Bh handle",
                true,
                Box::new(|ctx, c| {
                    let bh = ctx.bh_new(|| ());
                    drop(ctx);
                    let _keep = (bh, c);
                    loop {
                        coroutine::suspend();
                    }
                }),
            ),
            (
                "a LocalBh handle",
                true,
                Box::new(|ctx, c| {
                    let bh = ctx.bh_new_local(|| ());
                    drop(ctx);
                    let _keep = (bh, c);
                    loop {
                        coroutine::suspend();
                    }
                }),
            ),
            (
                "an FdHandler",
                true,
                Box::new(|ctx, c| {
                    let (a, b) = UnixStream::pair().unwrap();
                    let h = ctx.set_fd_handler(a, false, Some(Box::new(|| ())), None, None);
                    drop(ctx);
                    let _keep = (h.unwrap(), b, c);
                    loop {
                        coroutine::suspend();
                    }
                }),
            ),
            (
                "coroutine::sleep",
                false,
                Box::new(|ctx, c| {
                    drop(ctx);
                    let _c = c;
                    coroutine::sleep(Duration::from_secs(3600));
                }),
            ),
            (
                "io::yield_until_fd_readable",
                false,
                Box::new(|ctx, c| {
                    drop(ctx);
                    let _c = c;
                    let (a, _b) = UnixStream::pair().unwrap();
                    coroloop::io::yield_until_fd_readable(&a).unwrap();
                }),
            ),
            (
                "its own RemoteCoroutine and Waker",
                false,
                Box::new(|ctx, c| {
                    drop(ctx);
                    let me = Coroutine::current().unwrap();
                    let _keep = (me.remote(), me.waker(), c);
                    drop(me);
                    loop {
                        coroutine::suspend();
                    }
                }),
            ),
            (
                "await_future of a pending future",
                false,
                Box::new(|ctx, c| {
                    drop(ctx);
                    let _c = c;
                    await_future(Never(Vec::new()));
                }),
            ),
            (
                "CoSleep::sleep",
                false,
                Box::new(|ctx, c| {
                    drop(ctx);
                    let _c = c;
                    CoSleep::new().sleep();
                }),
            ),
            (
                "a Task handle of spawn",
                false,
                Box::new(|ctx, c| {
                    let t = ctx.spawn(std::future::pending::<()>());
                    drop(ctx);
                    let _keep = (t, c);
                    loop {
                        coroutine::suspend();
                    }
                }),
            ),
        ];
        for (name, keeps, body) in cases {
            let alive = survives_its_last_handle(name, body);
            assert_eq!(
                alive,
                keeps,
                "{name} {} the context alive",
                if keeps {
                    "should keep"
                } else {
                    "should not keep"
                }
            );
        }
    });
}

// A coroutine waiting in CoSleep::sleep_for whose last handle goes is
// taken over by its context, and unwound when the context shuts down; the
// timer is the library's own reference and does not keep the context
// alive.
#[test]
fn coroutine_sleeping_in_sleep_for_is_unwound() {
    isolated(|| {
        let ctx = AioContext::new().unwrap();
        let drops = Drops::default();
        let c = drops.counted();
        let co = Coroutine::new(move || {
            let _c = c;
            CoSleep::new().sleep_for(ClockType::Virtual, Duration::from_secs(3600));
        });
        co.enter();
        drop(co);
        assert_eq!(drops.get(), 0, "its context owns it now");
        drop(ctx);
        assert_eq!(drops.get(), 1, "unwound when the context shut down");
        assert!(!survives_its_last_handle("CoSleep::sleep_for", |ctx, c| {
            drop(ctx);
            let _c = c;
            CoSleep::new().sleep_for(ClockType::Virtual, Duration::from_secs(3600));
        }));
    });
}

// ---- everything at once ----

/// Every kind of pending object on one context (each holding a Counted
/// from `drops`); two of them are unwound on the way.
fn populate(ctx: &AioContext, drops: &Drops, ran: &Arc<AtomicUsize>) {
    // BHs: remote (pending, deleted) and oneshots from another thread.
    let (c, r) = (drops.counted(), ran.clone());
    let bh = ctx.bh_new(move || {
        let _ = &c;
        r.fetch_add(1, SeqCst);
    });
    std::thread::scope(|s| {
        s.spawn(|| bh.schedule());
    });
    drop(bh);
    let (c, r, ctx2) = (drops.counted(), ran.clone(), ctx.clone());
    std::thread::spawn(move || {
        ctx2.bh_schedule_oneshot(move || {
            let _c = c;
            r.fetch_add(1, SeqCst);
        })
    })
    .join()
    .unwrap();
    // BHs on the home-thread list: scheduled and deleted, oneshots.
    let (c, r) = (drops.counted(), ran.clone());
    let bh = ctx.bh_new_local(move || {
        let _ = &c;
        r.fetch_add(1, SeqCst);
    });
    bh.schedule();
    drop(bh);
    let (c, r) = (drops.counted(), ran.clone());
    ctx.bh_schedule_oneshot(move || {
        let _c = c;
        r.fetch_add(1, SeqCst);
    });
    let (c, r) = (Rc::new(drops.counted()), ran.clone());
    ctx.bh_schedule_oneshot_local(move || {
        let _c = c;
        r.fetch_add(1, SeqCst);
    });
    // A timer armed far ahead, handle dropped.
    let (c, r) = (drops.counted(), ran.clone());
    let t = ctx.timer_new(ClockType::Realtime, move || {
        let _ = &c;
        r.fetch_add(1, SeqCst);
    });
    t.mod_after(Duration::from_secs(3600));
    drop(t);
    // Detached coroutines: suspended forever, and in await_future.
    for _ in 0..3 {
        let co = Coroutine::new(suspended_forever(drops.counted()));
        co.enter();
        co.detach();
    }
    let c = drops.counted();
    let co = Coroutine::new(move || {
        let _c = c;
        await_future(Never(Vec::new()));
    });
    co.enter();
    co.detach();
    // A suspended coroutine whose handle is dropped (its context takes it
    // over) and one cancelled (unwound right away).
    let co = Coroutine::new(suspended_forever(drops.counted()));
    co.enter();
    drop(co);
    let co = Coroutine::new(suspended_forever(drops.counted()));
    co.enter();
    co.cancel();
    // Queued tasks.
    let (c, r) = (drops.counted(), ran.clone());
    ctx.spawn(async move {
        let _c = c;
        r.fetch_add(1, SeqCst);
    })
    .detach();
    let (c, r) = (Rc::new(drops.counted()), ran.clone());
    ctx.spawn_local(async move {
        let _c = c;
        r.fetch_add(1, SeqCst);
    })
    .detach();
    let (c, r) = (drops.counted(), ran.clone());
    ctx.spawn_coroutine(move || {
        let _c = c;
        r.fetch_add(1, SeqCst);
    })
    .detach();
    // A CoroutineFuture dropped while pending.
    let c = drops.counted();
    let mut fut = CoroutineFuture::new(move || {
        let _c = c;
        await_future(Never(Vec::new()));
    });
    assert!(poll_once(&mut fut).is_pending());
    drop(fut);
}

// Every kind of pending object on one context, then its last handle is
// dropped: each destructor runs exactly once, nothing runs.
//
// (Started spawn_coroutine tasks are left out: see the ignored tests
// above.)
#[test]
fn dropping_a_context_frees_everything_it_holds() {
    isolated(|| {
        let ctx = AioContext::new().unwrap();
        let drops = Drops::default();
        let ran = Arc::new(AtomicUsize::new(0));
        populate(&ctx, &drops, &ran);
        let n = drops.made();
        // The unwound coroutines, and the dropped timer's callback.
        assert_eq!(
            drops.get(),
            3,
            "only the unwound ones and the dropped timer so far"
        );
        drop(ctx);
        assert_eq!(ran.load(SeqCst), 0);
        assert_eq!(drops.get(), n);
    });
}

// The same, with shutdown() before the drop: shutdown does the freeing.
#[test]
fn shutdown_then_drop_frees_everything_it_holds() {
    isolated(|| {
        let ctx = AioContext::new().unwrap();
        let drops = Drops::default();
        let ran = Arc::new(AtomicUsize::new(0));
        populate(&ctx, &drops, &ran);
        let n = drops.made();
        // The unwound coroutines, and the dropped timer's callback.
        assert_eq!(
            drops.get(),
            3,
            "only the unwound ones and the dropped timer so far"
        );
        ctx.shutdown();
        assert_eq!(drops.get(), n, "shutdown freed everything");
        assert!(!ctx.poll(false));
        drop(ctx);
        assert_eq!(ran.load(SeqCst), 0);
        assert_eq!(drops.get(), n);
    });
}

// ---- IoThread ----

/// Runs `f` on the IoThread and waits for its result.
fn on_iothread<R: Send + 'static>(io: &IoThread, f: impl FnOnce() -> R + Send + 'static) -> R {
    let (tx, rx) = mpsc::channel();
    io.context().bh_schedule_oneshot(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("the IoThread ran the closure")
}

// IoThread::stop() while its context holds every kind of pending object —
// some created on the IoThread (detached coroutines, one of them holding
// the context through a Timer and an FdHandler; a far timer), some queued
// from this thread while the IoThread was busy in its last loop iteration
// (BHs, tasks), some queued on the IoThread at the very end of that
// iteration — runs each destructor exactly once, runs none of the queued
// work, and returns every stack.
#[test]
fn iothread_stop_frees_everything() {
    let _g = serial();
    let before = in_use_stacks();
    let drops = Drops::default();
    let ran = Arc::new(AtomicUsize::new(0));
    let io = IoThread::spawn("leaks-io").unwrap();
    let ctx = io.context().clone();

    let (d, r) = (drops.clone(), ran.clone());
    on_iothread(&io, move || {
        let ctx = AioContext::current().unwrap();
        for _ in 0..3 {
            let co = Coroutine::new(suspended_forever(d.counted()));
            co.enter();
            co.detach();
        }
        let (c, ctx2) = (d.counted(), ctx.clone());
        let co = Coroutine::new(move || {
            let _c = c;
            let t = ctx2.timer_new(ClockType::Realtime, || ());
            t.mod_after(Duration::from_secs(3600));
            let (a, b) = UnixStream::pair().unwrap();
            let h = ctx2.set_fd_handler(a, false, Some(Box::new(|| ())), None, None);
            drop(ctx2);
            let _keep = (t, h, b);
            coroutine::sleep(Duration::from_secs(3600));
        });
        co.enter();
        co.detach();
        let (c, rr) = (d.counted(), r.clone());
        let t = ctx.timer_new(ClockType::Realtime, move || {
            let _ = &c;
            rr.fetch_add(1, SeqCst);
        });
        t.mod_after(Duration::from_secs(3600));
        drop(t);
    });

    // Block the IoThread in a timer callback (timers run last in an
    // iteration) while this thread queues BHs and tasks its loop will not
    // get to; the callback itself queues home-thread work at the very end.
    let (entered_tx, entered_rx) = mpsc::channel::<()>();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (d, r) = (drops.clone(), ran.clone());
    on_iothread(&io, move || {
        let ctx = AioContext::current().unwrap();
        let t = ctx.timer_new(ClockType::Virtual, move || {
            let _ = entered_tx.send(());
            go_rx.recv().unwrap();
            let ctx = AioContext::current().unwrap();
            let (c, rr) = (Rc::new(d.counted()), r.clone());
            ctx.spawn_local(async move {
                let _c = c;
                rr.fetch_add(1, SeqCst);
            })
            .detach();
            Coroutine::new(suspended_forever(d.counted())).detach();
            let (c, rr) = (Rc::new(d.counted()), r.clone());
            ctx.bh_schedule_oneshot_local(move || {
                let _c = c;
                rr.fetch_add(1, SeqCst);
            });
            let (c, rr) = (d.counted(), r.clone());
            let bh = ctx.bh_new_local(move || {
                let _ = &c;
                rr.fetch_add(1, SeqCst);
            });
            bh.schedule();
            drop(bh);
        });
        t.mod_ns(1);
        // A detached coroutine keeps the timer (and so the context).
        let co = Coroutine::new(move || {
            let _t = t;
            loop {
                coroutine::suspend();
            }
        });
        co.enter();
        co.detach();
    });
    ctx.advance_virtual_clock(1);
    entered_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the IoThread entered the timer");
    let (c, r) = (drops.counted(), ran.clone());
    let bh = ctx.bh_new(move || {
        let _ = &c;
        r.fetch_add(1, SeqCst);
    });
    bh.schedule();
    drop(bh);
    let (c, r) = (drops.counted(), ran.clone());
    ctx.bh_schedule_oneshot(move || {
        let _c = c;
        r.fetch_add(1, SeqCst);
    });
    let (c, r) = (drops.counted(), ran.clone());
    ctx.spawn(async move {
        let _c = c;
        r.fetch_add(1, SeqCst);
    })
    .detach();
    let (c, r) = (drops.counted(), ran.clone());
    ctx.spawn_coroutine(move || {
        let _c = c;
        r.fetch_add(1, SeqCst);
    })
    .detach();
    // Only the callback of the armed timer whose handle was dropped.
    assert_eq!(drops.get(), 1);

    std::thread::scope(|s| {
        let stopper = s.spawn(|| io.stop());
        // Release the IoThread once stop() has raised its flag, so that its
        // loop ends with this iteration. `is_stopped` turns true right
        // before the flag is raised; the pause covers that gap.
        let t0 = Instant::now();
        while !io.is_stopped() {
            assert!(t0.elapsed() < Duration::from_secs(10));
            std::thread::yield_now();
        }
        std::thread::sleep(Duration::from_millis(20));
        go_tx.send(()).unwrap();
        stopper.join().unwrap();
    });
    let total = drops.made();
    assert_eq!(total, 13);
    assert_eq!(ran.load(SeqCst), 0, "no queued work ran");
    assert_eq!(drops.get(), total, "stop() ran every destructor once");
    drop(ctx);
    drop(io);
    assert_eq!(drops.get(), total);
    assert_eq!(
        in_use_stacks(),
        before,
        "the IoThread's coroutine stacks were all returned"
    );
}

// IoThread::stop() with a started spawn_coroutine suspended on it: the
// design has stop() unwind it on the IoThread.
#[test]
fn iothread_stop_unwinds_pending_spawned_coroutines() {
    let _g = serial();
    let before = in_use_stacks();
    let drops = Drops::default();
    let io = IoThread::spawn("leaks-io-task").unwrap();
    let (started_tx, started_rx) = mpsc::channel();
    let c = drops.counted();
    io.context()
        .spawn_coroutine(move || {
            let _c = c;
            started_tx.send(()).unwrap();
            loop {
                coroutine::suspend();
            }
        })
        .detach();
    started_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the coroutine started");
    io.stop();
    assert_eq!(drops.get(), 1, "stop() unwound the spawned coroutine");
    drop(io);
    assert_eq!(in_use_stacks(), before, "its stack was returned");
}
