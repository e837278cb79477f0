//! Coroutine costs, coroloop beside raw corosensei (the floor) in one run.
//!
//! * `round_trip`: enter + suspend of a live coroutine (QEMU's perf-yield).
//! * `lifecycle`: create + enter + finish (QEMU's perf-lifecycle), with the
//!   pool; raw corosensei with a reused stack and with a fresh stack.
//! * `cost`: create + enter + suspend + enter + finish (QEMU's perf-cost,
//!   92 ns for QEMU's C pool on this machine).
//! * `nesting_1000`: a chain of 1000 nested coroutines (QEMU's perf-nesting).

#![allow(missing_docs)] // criterion_group! generates undocumented items

use std::cell::Cell;
use std::hint::black_box;
use std::rc::Rc;

use criterion::{criterion_group, criterion_main, Criterion};

use coroloop::coroutine::{self, Coroutine};
use corosensei::stack::DefaultStack;
use corosensei::{Coroutine as RawCoroutine, CoroutineResult};

fn round_trip(c: &mut Criterion) {
    let mut g = c.benchmark_group("round_trip");
    g.bench_function("coroloop", |b| {
        let co = Coroutine::new(|| loop {
            coroutine::suspend();
        });
        b.iter(|| co.enter());
    });
    g.bench_function("corosensei", |b| {
        let mut co = RawCoroutine::new(|y, ()| loop {
            y.suspend(());
        });
        b.iter(|| match co.resume(()) {
            CoroutineResult::Yield(()) => {}
            CoroutineResult::Return(()) => unreachable!(),
        });
    });
    g.finish();
}

fn lifecycle(c: &mut Criterion) {
    let mut g = c.benchmark_group("lifecycle");
    g.bench_function("coroloop", |b| {
        b.iter(|| {
            let co = Coroutine::new(|| black_box(1u32));
            co.enter();
        })
    });
    g.bench_function("coroloop_rc_capture", |b| {
        let counter = Rc::new(Cell::new(0u64));
        b.iter(|| {
            let c = counter.clone();
            let co = Coroutine::new(move || c.set(c.get() + 1));
            co.enter();
        })
    });
    g.bench_function("corosensei_reused_stack", |b| {
        let mut stack = Some(DefaultStack::new(coroutine::DEFAULT_STACK_SIZE).unwrap());
        b.iter(|| {
            let mut co =
                RawCoroutine::<(), (), u32, _>::with_stack(stack.take().unwrap(), |_, ()| {
                    black_box(1)
                });
            let _ = co.resume(());
            stack = Some(co.into_stack());
        })
    });
    // The floor of a pooled design: a worker coroutine that runs one job per
    // resume, kept in a pool. Create + enter + finish is a pool pop, two
    // switches (in with the job, out when it is done) and a push; the job
    // is passed by pointer, so nothing is allocated.
    g.bench_function("corosensei_pooled_worker", |b| {
        type Job<'a> = &'a mut dyn FnMut();
        type Worker = RawCoroutine<usize, (), (), DefaultStack>;
        let new_worker = || -> Worker {
            let stack = DefaultStack::new(coroutine::DEFAULT_STACK_SIZE).unwrap();
            RawCoroutine::with_stack(stack, |y, mut job: usize| loop {
                // SAFETY: `job` points at the `Job` the resumer passed;
                // it lives until this resume returns.
                let f = unsafe { &mut *(job as *mut Job<'_>) };
                f();
                job = y.suspend(());
            })
        };
        let mut pool: Vec<Worker> = vec![new_worker()];
        b.iter(|| {
            let mut w = pool.pop().unwrap_or_else(new_worker);
            let mut body = || {
                black_box(1u32);
            };
            let mut job: Job<'_> = &mut body;
            let _ = w.resume(&mut job as *mut Job<'_> as usize);
            pool.push(w);
        });
        // Workers are suspended inside their loop: unwinding them on drop
        // is what corosensei does; forget them instead (no unwind needed).
        for w in pool {
            std::mem::forget(w);
        }
    });
    g.bench_function("corosensei_fresh_stack", |b| {
        b.iter(|| {
            let stack = DefaultStack::new(coroutine::DEFAULT_STACK_SIZE).unwrap();
            let mut co = RawCoroutine::<(), (), u32, _>::with_stack(stack, |_, ()| black_box(1));
            let _ = co.resume(());
        })
    });
    g.finish();
}

fn cost(c: &mut Criterion) {
    let mut g = c.benchmark_group("cost");
    g.bench_function("coroloop", |b| {
        b.iter(|| {
            let co = Coroutine::new(coroutine::suspend);
            co.enter();
            co.enter();
        })
    });
    g.bench_function("corosensei_reused_stack", |b| {
        let mut stack = Some(DefaultStack::new(coroutine::DEFAULT_STACK_SIZE).unwrap());
        b.iter(|| {
            let mut co =
                RawCoroutine::<(), (), (), _>::with_stack(stack.take().unwrap(), |y, ()| {
                    y.suspend(())
                });
            let _ = co.resume(());
            let _ = co.resume(());
            stack = Some(co.into_stack());
        })
    });
    g.finish();
}

fn nest(depth: u32, max: u32) {
    if depth < max {
        let child = Coroutine::new(move || nest(depth + 1, max));
        child.enter();
    }
}

fn nesting(c: &mut Criterion) {
    let mut g = c.benchmark_group("nesting_1000");
    coroutine::increase_pool_batch_size(1000);
    g.bench_function("coroloop", |b| {
        b.iter(|| {
            let root = Coroutine::new(|| nest(1, 1000));
            root.enter();
        })
    });
    coroutine::decrease_pool_batch_size(1000);
    g.finish();
}

criterion_group!(benches, round_trip, lifecycle, cost, nesting);
criterion_main!(benches);
