#![allow(missing_docs)] // criterion_group! generates undocumented items
//! The future bridges beside native async executors, in one run:
//! `cargo bench --bench bridge -- --warm-up-time 1 --measurement-time 3`.
//!
//! Every figure is per operation (criterion's "time" is per await, per
//! yield or per task).
//!
//! * `await_ready`: `await_future` of an immediately-ready future inside a
//!   coroutine (an `async fn`, `std::future::ready`), per call; vs the
//!   same `async fn` under `smol::block_on` per call, and `.await`ed in a
//!   loop inside one `block_on` (the floor).
//! * `await_once_pending`: `await_future` of a future that is pending once
//!   (its first poll stores the waker in a shared slot and returns
//!   `Pending`; the wake comes from outside `poll`), so the coroutine
//!   really suspends; per await. coroloop: a coroutine on an AioContext
//!   woken by the driver loop (`wake` + `poll(false)`) or by a `LocalBh`
//!   (`poll_while`); a `CoroutineFuture` under
//!   `futures_lite::future::block_on` and on a `smol::LocalExecutor`.
//!   Peers: an async task on a `LocalExecutor` with the same driver loop
//!   (`wake` + `try_tick`), an async block under `block_on`, and a bare
//!   corosensei coroutine polled by `block_on` (the floor of a stackful
//!   bridge). Under `block_on` the wake is issued by a wrapper future
//!   right after the inner poll returns `Pending`.
//! * `yield_n`: a `CoroutineFuture` calling `coroutine::yield_now()` 1000
//!   times vs an async block awaiting `futures_lite::future::yield_now()`
//!   1000 times, on a `LocalExecutor` (`try_tick` loop) and under
//!   `block_on`; plus a coroutine and an async task on an AioContext; per
//!   yield, creation included.
//! * `spawn_run`: spawn 1000 tasks that bump a counter, then run them, per
//!   task: `AioContext::spawn_local` / `spawn` / `spawn_coroutine` +
//!   `poll(false)`, vs smol `LocalExecutor` / `Executor` spawn + `try_tick`,
//!   tokio current-thread `LocalSet::spawn_local` + `block_on(&mut local)`
//!   and `tokio::spawn` inside `block_on`.

use std::cell::Cell;
use std::future::Future;
use std::hint::black_box;
use std::pin::{pin, Pin};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use corosensei::{Coroutine as RawCoroutine, CoroutineResult, Yielder};
use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion};

use coroloop::aio::{AioContext, LocalBh};
use coroloop::coroutine::{self, Coroutine};
use coroloop::future::{await_future, CoroutineFuture};

/// Yields per batch in `yield_n`, tasks per batch in `spawn_run`.
const BATCH: u64 = 1000;

fn group<'a>(c: &'a mut Criterion, name: &str) -> BenchmarkGroup<'a, WallTime> {
    let mut g = c.benchmark_group(name);
    g.sample_size(20);
    g
}

#[inline(never)]
async fn add_one(x: u64) -> u64 {
    x + 1
}

// ---------------------------------------------------------------------
// await_ready

fn await_ready(c: &mut Criterion) {
    let mut g = group(c, "await_ready");
    g.bench_function("coroloop_await_future_async_fn", |b| {
        let _ctx = AioContext::new().unwrap();
        b.iter_custom(|iters| {
            let co = Coroutine::new(move || {
                let t = Instant::now();
                for i in 0..iters {
                    black_box(await_future(add_one(black_box(i))));
                }
                t.elapsed()
            });
            co.enter();
            co.take_result().unwrap()
        });
    });
    g.bench_function("coroloop_await_future_std_ready", |b| {
        let _ctx = AioContext::new().unwrap();
        b.iter_custom(|iters| {
            let co = Coroutine::new(move || {
                let t = Instant::now();
                for i in 0..iters {
                    black_box(await_future(std::future::ready(black_box(i))));
                }
                t.elapsed()
            });
            co.enter();
            co.take_result().unwrap()
        });
    });
    g.bench_function("coroloop_await_future_in_coroutine_future", |b| {
        b.iter_custom(|iters| {
            smol::future::block_on(CoroutineFuture::new(move || {
                let t = Instant::now();
                for i in 0..iters {
                    black_box(await_future(add_one(black_box(i))));
                }
                t.elapsed()
            }))
        });
    });
    g.bench_function("smol_block_on_per_call", |b| {
        let mut i = 0u64;
        b.iter(|| {
            i += 1;
            smol::block_on(add_one(black_box(i)))
        });
    });
    g.bench_function("async_await_in_one_block_on", |b| {
        b.iter_custom(|iters| {
            smol::future::block_on(async move {
                let t = Instant::now();
                for i in 0..iters {
                    black_box(add_one(black_box(i)).await);
                }
                t.elapsed()
            })
        });
    });
    g.finish();
}

// ---------------------------------------------------------------------
// await_once_pending

/// Where a pending [`OncePending`] leaves its waker for someone else to
/// call.
type Slot = Cell<Option<Waker>>;

/// Pending at its first poll (its waker stored in `slot`, and `kick`
/// scheduled if given), ready at the next one.
struct OncePending<'a> {
    slot: &'a Slot,
    kick: Option<&'a LocalBh>,
    polled: bool,
}

impl<'a> OncePending<'a> {
    fn new(slot: &'a Slot) -> Self {
        OncePending {
            slot,
            kick: None,
            polled: false,
        }
    }

    fn with_bh(slot: &'a Slot, bh: &'a LocalBh) -> Self {
        OncePending {
            slot,
            kick: Some(bh),
            polled: false,
        }
    }
}

impl Future for OncePending<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.polled {
            return Poll::Ready(());
        }
        self.polled = true;
        self.slot.set(Some(cx.waker().clone()));
        if let Some(bh) = self.kick {
            bh.schedule();
        }
        Poll::Pending
    }
}

/// Calls the waker a pending [`OncePending`] left, if any.
#[inline]
fn wake_slot(slot: &Slot) {
    if let Some(w) = slot.take() {
        w.wake();
    }
}

/// Under a `block_on`: polls `inner`, and when it is pending calls the
/// waker it left in `slot` — the wake comes from outside the inner
/// future's `poll`, as an executor's other task would issue it.
struct WakeAfterPoll<'a, F> {
    inner: F,
    slot: &'a Slot,
}

impl<F: Future + Unpin> Future for WakeAfterPoll<'_, F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let r = Pin::new(&mut self.inner).poll(cx);
        if r.is_pending() {
            wake_slot(self.slot);
        }
        r
    }
}

/// A bare corosensei coroutine as a future: each poll resumes it with the
/// address of the poll's `Context`.
struct RawCoFuture<T> {
    co: RawCoroutine<usize, (), T>,
}

impl<T> Future for RawCoFuture<T> {
    type Output = T;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let addr = cx as *mut Context<'_> as usize;
        match self.get_mut().co.resume(addr) {
            CoroutineResult::Yield(()) => Poll::Pending,
            CoroutineResult::Return(v) => Poll::Ready(v),
        }
    }
}

/// `await` inside a [`RawCoFuture`]: polls `fut` with the resuming poll's
/// context, suspending the coroutine (the outer poll returns `Pending`)
/// until it is ready.
#[inline(always)]
fn raw_await<F: Future>(y: &Yielder<usize, ()>, cx_addr: &mut usize, fut: F) -> F::Output {
    let mut fut = pin!(fut);
    loop {
        // SAFETY: `cx_addr` is the `Context` of the `RawCoFuture::poll`
        // that resumed the coroutine last, and that poll is still running
        // (it is blocked in `resume` until we suspend).
        let cx = unsafe { &mut *(*cx_addr as *mut Context<'_>) };
        if let Poll::Ready(v) = fut.as_mut().poll(cx) {
            return v;
        }
        *cx_addr = y.suspend(());
    }
}

fn await_once_pending(c: &mut Criterion) {
    let mut g = group(c, "await_once_pending");
    g.bench_function("coroloop_aiocontext_driver_wake", |b| {
        let ctx = AioContext::new().unwrap();
        b.iter_custom(|iters| {
            let slot = Rc::new(Slot::new(None));
            let s = slot.clone();
            let t = Instant::now();
            let co = Coroutine::new(move || {
                for _ in 0..iters {
                    await_future(OncePending::new(&s));
                }
            });
            co.enter();
            while !co.is_finished() {
                wake_slot(&slot);
                ctx.poll(false);
            }
            t.elapsed()
        });
    });
    g.bench_function("coroloop_aiocontext_bh_wake", |b| {
        let ctx = AioContext::new().unwrap();
        let slot = Rc::new(Slot::new(None));
        let s = slot.clone();
        let bh = Rc::new(ctx.bh_new_local(move || wake_slot(&s)));
        b.iter_custom(|iters| {
            let (slot, bh) = (slot.clone(), bh.clone());
            let t = Instant::now();
            let co = Coroutine::new(move || {
                for _ in 0..iters {
                    await_future(OncePending::with_bh(&slot, &bh));
                }
            });
            co.enter();
            ctx.poll_while(|| !co.is_finished());
            t.elapsed()
        });
    });
    g.bench_function("coroloop_coroutine_future_block_on", |b| {
        b.iter_custom(|iters| {
            let slot = Rc::new(Slot::new(None));
            let s = slot.clone();
            let t = Instant::now();
            let fut = CoroutineFuture::new(move || {
                for _ in 0..iters {
                    await_future(OncePending::new(&s));
                }
            });
            smol::future::block_on(WakeAfterPoll {
                inner: fut,
                slot: &slot,
            });
            t.elapsed()
        });
    });
    g.bench_function("coroloop_coroutine_future_local_executor", |b| {
        let ex = smol::LocalExecutor::new();
        b.iter_custom(|iters| {
            let slot = Rc::new(Slot::new(None));
            let s = slot.clone();
            let t = Instant::now();
            let task = ex.spawn(CoroutineFuture::new(move || {
                for _ in 0..iters {
                    await_future(OncePending::new(&s));
                }
            }));
            while !task.is_finished() {
                wake_slot(&slot);
                ex.try_tick();
            }
            t.elapsed()
        });
    });
    g.bench_function("corosensei_bare_block_on", |b| {
        b.iter_custom(|iters| {
            let slot = Rc::new(Slot::new(None));
            let s = slot.clone();
            let t = Instant::now();
            let fut = RawCoFuture {
                co: RawCoroutine::new(move |y: &Yielder<usize, ()>, mut cx_addr: usize| {
                    for _ in 0..iters {
                        raw_await(y, &mut cx_addr, OncePending::new(&s));
                    }
                }),
            };
            smol::future::block_on(WakeAfterPoll {
                inner: fut,
                slot: &slot,
            });
            t.elapsed()
        });
    });
    g.bench_function("async_block_on", |b| {
        b.iter_custom(|iters| {
            let slot = Slot::new(None);
            let t = Instant::now();
            let fut = pin!(async {
                for _ in 0..iters {
                    OncePending::new(&slot).await;
                }
            });
            smol::future::block_on(WakeAfterPoll {
                inner: fut,
                slot: &slot,
            });
            t.elapsed()
        });
    });
    g.bench_function("async_local_executor_driver_wake", |b| {
        let ex = smol::LocalExecutor::new();
        b.iter_custom(|iters| {
            let slot = Rc::new(Slot::new(None));
            let s = slot.clone();
            let t = Instant::now();
            let task = ex.spawn(async move {
                for _ in 0..iters {
                    OncePending::new(&s).await;
                }
            });
            while !task.is_finished() {
                wake_slot(&slot);
                ex.try_tick();
            }
            t.elapsed()
        });
    });
    g.finish();
}

// ---------------------------------------------------------------------
// yield_n

fn yield_n(c: &mut Criterion) {
    let mut g = group(c, "yield_n");
    let per_yield = |total: Duration| total / BATCH as u32;
    g.bench_function("coroloop_coroutine_future_local_executor", |b| {
        let ex = smol::LocalExecutor::new();
        b.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                let task = ex.spawn(CoroutineFuture::new(|| {
                    for _ in 0..BATCH {
                        coroutine::yield_now();
                    }
                }));
                while !task.is_finished() {
                    ex.try_tick();
                }
            }
            per_yield(t.elapsed())
        });
    });
    g.bench_function("async_local_executor", |b| {
        let ex = smol::LocalExecutor::new();
        b.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                let task = ex.spawn(async {
                    for _ in 0..BATCH {
                        smol::future::yield_now().await;
                    }
                });
                while !task.is_finished() {
                    ex.try_tick();
                }
            }
            per_yield(t.elapsed())
        });
    });
    g.bench_function("coroloop_coroutine_future_block_on", |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                smol::future::block_on(CoroutineFuture::new(|| {
                    for _ in 0..BATCH {
                        coroutine::yield_now();
                    }
                }));
            }
            per_yield(t.elapsed())
        });
    });
    g.bench_function("async_block_on", |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                smol::future::block_on(async {
                    for _ in 0..BATCH {
                        smol::future::yield_now().await;
                    }
                });
            }
            per_yield(t.elapsed())
        });
    });
    g.bench_function("coroloop_coroutine_on_aiocontext", |b| {
        let ctx = AioContext::new().unwrap();
        b.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                let co = Coroutine::new(|| {
                    for _ in 0..BATCH {
                        coroutine::yield_now();
                    }
                });
                co.enter();
                while !co.is_finished() {
                    ctx.poll(false);
                }
            }
            per_yield(t.elapsed())
        });
    });
    g.bench_function("async_task_on_aiocontext", |b| {
        let ctx = AioContext::new().unwrap();
        b.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                let task = ctx.spawn_local(async {
                    for _ in 0..BATCH {
                        smol::future::yield_now().await;
                    }
                });
                while !task.is_finished() {
                    ctx.poll(false);
                }
            }
            per_yield(t.elapsed())
        });
    });
    g.finish();
}

// ---------------------------------------------------------------------
// spawn_run

fn spawn_run(c: &mut Criterion) {
    let mut g = group(c, "spawn_run");
    let per_task = |total: Duration| total / BATCH as u32;
    g.bench_function("coroloop_spawn_local", |b| {
        let ctx = AioContext::new().unwrap();
        let count = Rc::new(Cell::new(0u64));
        b.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                count.set(0);
                for _ in 0..BATCH {
                    let c = count.clone();
                    ctx.spawn_local(async move { c.set(c.get() + 1) }).detach();
                }
                while count.get() < BATCH {
                    ctx.poll(false);
                }
            }
            per_task(t.elapsed())
        });
    });
    g.bench_function("coroloop_spawn", |b| {
        let ctx = AioContext::new().unwrap();
        let count = Arc::new(AtomicU64::new(0));
        b.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                count.store(0, Ordering::Relaxed);
                for _ in 0..BATCH {
                    let c = count.clone();
                    ctx.spawn(async move {
                        c.fetch_add(1, Ordering::Relaxed);
                    })
                    .detach();
                }
                while count.load(Ordering::Relaxed) < BATCH {
                    ctx.poll(false);
                }
            }
            per_task(t.elapsed())
        });
    });
    g.bench_function("coroloop_spawn_coroutine", |b| {
        let ctx = AioContext::new().unwrap();
        let count = Arc::new(AtomicU64::new(0));
        b.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                count.store(0, Ordering::Relaxed);
                for _ in 0..BATCH {
                    let c = count.clone();
                    ctx.spawn_coroutine(move || {
                        c.fetch_add(1, Ordering::Relaxed);
                    })
                    .detach();
                }
                while count.load(Ordering::Relaxed) < BATCH {
                    ctx.poll(false);
                }
            }
            per_task(t.elapsed())
        });
    });
    g.bench_function("smol_local_executor", |b| {
        let ex = smol::LocalExecutor::new();
        let count = Rc::new(Cell::new(0u64));
        b.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                count.set(0);
                for _ in 0..BATCH {
                    let c = count.clone();
                    ex.spawn(async move { c.set(c.get() + 1) }).detach();
                }
                while count.get() < BATCH {
                    ex.try_tick();
                }
            }
            per_task(t.elapsed())
        });
    });
    g.bench_function("smol_executor", |b| {
        let ex = smol::Executor::new();
        let count = Arc::new(AtomicU64::new(0));
        b.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                count.store(0, Ordering::Relaxed);
                for _ in 0..BATCH {
                    let c = count.clone();
                    ex.spawn(async move {
                        c.fetch_add(1, Ordering::Relaxed);
                    })
                    .detach();
                }
                while count.load(Ordering::Relaxed) < BATCH {
                    ex.try_tick();
                }
            }
            per_task(t.elapsed())
        });
    });
    g.bench_function("tokio_current_thread_local_set", |b| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let mut local = tokio::task::LocalSet::new();
        let count = Rc::new(Cell::new(0u64));
        b.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                count.set(0);
                for _ in 0..BATCH {
                    let c = count.clone();
                    drop(local.spawn_local(async move { c.set(c.get() + 1) }));
                }
                rt.block_on(&mut local);
                assert_eq!(count.get(), BATCH);
            }
            per_task(t.elapsed())
        });
    });
    g.bench_function("tokio_current_thread_spawn", |b| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let count = Arc::new(AtomicU64::new(0));
        b.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                count.store(0, Ordering::Relaxed);
                rt.block_on(async {
                    for _ in 0..BATCH {
                        let c = count.clone();
                        drop(tokio::spawn(async move {
                            c.fetch_add(1, Ordering::Relaxed);
                        }));
                    }
                    while count.load(Ordering::Relaxed) < BATCH {
                        tokio::task::yield_now().await;
                    }
                });
            }
            per_task(t.elapsed())
        });
    });
    g.finish();
}

criterion_group!(benches, await_ready, await_once_pending, yield_n, spawn_run);
criterion_main!(benches);
