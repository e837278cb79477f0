#![allow(missing_docs)] // criterion_group! generates undocumented items
//! AioContext costs beside their peers, in one run.
//!
//! * `bh`: schedule + dispatch of 1000 bottom halves from the home thread,
//!   vs `smol::LocalExecutor` spawn + run of 1000 empty tasks.
//! * `bh_remote`: 1000 BHs scheduled from another thread onto an IoThread.
//!   Peer: the bare protocol (`bare_bh`: `fetch_or`, CAS push, notify;
//!   `swap`, `fetch_and`) with a busy-polling consumer thread.
//! * `idle_poll`: `poll(false)` with nothing to do.
//! * `pingpong`: a round trip between two threads: coroutines on two
//!   IoThreads waking each other (polling off, and QEMU's 32 µs polling),
//!   async-channel under smol on two threads, tokio mpsc on a 2-worker
//!   runtime (whose two tasks may share a worker: not a cross-thread
//!   round trip) and between two single-threaded runtimes on two threads,
//!   std mpsc.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

use coroloop::aio::{AioContext, IoThread, IoThreadBuilder};
use coroloop::coroutine::{self, Coroutine, RemoteCoroutine};

const BATCH: u64 = 1000;

fn bh(c: &mut Criterion) {
    let mut g = c.benchmark_group("bh");
    g.throughput(Throughput::Elements(BATCH));
    g.bench_function("coroloop", |b| {
        let ctx = AioContext::new().unwrap();
        let count = std::rc::Rc::new(std::cell::Cell::new(0u64));
        let bhs: Vec<_> = (0..BATCH)
            .map(|_| {
                let c = count.clone();
                ctx.bh_new_local(move || c.set(c.get() + 1))
            })
            .collect();
        b.iter(|| {
            for bh in &bhs {
                bh.schedule();
            }
            ctx.poll(false);
        });
        assert!(count.get() > 0);
    });
    g.bench_function("coroloop_oneshot", |b| {
        let ctx = AioContext::new().unwrap();
        b.iter(|| {
            for _ in 0..BATCH {
                ctx.bh_schedule_oneshot_local(|| {});
            }
            ctx.poll(false);
        });
    });
    g.bench_function("smol_local_executor", |b| {
        let ex = smol::LocalExecutor::new();
        b.iter(|| {
            for _ in 0..BATCH {
                ex.spawn(async {}).detach();
            }
            while ex.try_tick() {}
        });
    });
    g.finish();
}

fn bh_remote(c: &mut Criterion) {
    let mut g = c.benchmark_group("bh_remote");
    g.throughput(Throughput::Elements(BATCH));
    g.bench_function("coroloop", |b| {
        let io = IoThread::spawn("bench-bh").unwrap();
        let count = Arc::new(AtomicU64::new(0));
        let bhs: Vec<_> = (0..BATCH)
            .map(|_| {
                let c = count.clone();
                io.context().bh_new(move || {
                    c.fetch_add(1, Ordering::Release);
                })
            })
            .collect();
        let mut expected = 0;
        b.iter(|| {
            for bh in &bhs {
                bh.schedule();
            }
            expected += BATCH;
            while count.load(Ordering::Acquire) < expected {
                std::hint::spin_loop();
            }
        });
        drop(bhs);
        io.stop();
    });
    g.finish();
}

/// The bare cross-thread BH protocol, as the peer of `bh_remote`: what a
/// schedule from another thread and its dispatch cannot do without. The
/// producer marks the node (`fetch_or` of PENDING | SCHEDULED), pushes it
/// on a lock-free stack with a CAS if it was not pending, and notifies
/// (a store, a full fence, a load of `notify_me`: the consumer is busy
/// polling, so no eventfd write); the consumer takes the whole stack with
/// a `swap` and clears each node with a `fetch_and` before running it.
mod bare_bh {
    use std::ptr;
    use std::sync::atomic::{fence, AtomicBool, AtomicPtr, AtomicU32, AtomicU64, Ordering};

    const PENDING: u32 = 1;
    const SCHEDULED: u32 = 2;

    pub(crate) struct Node {
        flags: AtomicU32,
        next: AtomicPtr<Node>,
    }

    impl Node {
        pub(crate) fn new() -> Node {
            Node {
                flags: AtomicU32::new(0),
                next: AtomicPtr::new(ptr::null_mut()),
            }
        }
    }

    #[derive(Default)]
    pub(crate) struct Loop {
        head: AtomicPtr<Node>,
        notify_me: AtomicU32,
        notified: AtomicBool,
        pub(crate) stop: AtomicBool,
        pub(crate) count: AtomicU64,
    }

    impl Loop {
        pub(crate) fn schedule(&self, n: &Node) {
            let old = n.flags.fetch_or(PENDING | SCHEDULED, Ordering::AcqRel);
            if old & PENDING == 0 {
                let node = n as *const Node as *mut Node;
                let mut head = self.head.load(Ordering::Relaxed);
                loop {
                    n.next.store(head, Ordering::Relaxed);
                    match self.head.compare_exchange_weak(
                        head,
                        node,
                        Ordering::Release,
                        Ordering::Relaxed,
                    ) {
                        Ok(_) => break,
                        Err(h) => head = h,
                    }
                }
            }
            self.notified.store(true, Ordering::Release);
            fence(Ordering::SeqCst);
            if self.notify_me.load(Ordering::Relaxed) != 0 {
                unreachable!("the consumer never sleeps in this bench");
            }
        }

        /// The consumer: busy polls until `stop`.
        pub(crate) fn run(&self) {
            while !self.stop.load(Ordering::Relaxed) {
                if self.head.load(Ordering::Relaxed).is_null() {
                    std::hint::spin_loop();
                    continue;
                }
                self.notified.store(false, Ordering::Relaxed);
                fence(Ordering::SeqCst);
                let mut p = self.head.swap(ptr::null_mut(), Ordering::Acquire);
                while !p.is_null() {
                    // SAFETY: nodes outlive the loop (the bench keeps them).
                    let n = unsafe { &*p };
                    p = n.next.load(Ordering::Relaxed);
                    let old = n.flags.fetch_and(!(PENDING | SCHEDULED), Ordering::AcqRel);
                    if old & SCHEDULED != 0 {
                        self.count.fetch_add(1, Ordering::Release);
                    }
                }
            }
        }
    }
}

fn bh_remote_bare(c: &mut Criterion) {
    let mut g = c.benchmark_group("bh_remote");
    g.throughput(Throughput::Elements(BATCH));
    g.bench_function("bare_protocol", |b| {
        let l = Arc::new(bare_bh::Loop::default());
        let nodes: Arc<Vec<bare_bh::Node>> =
            Arc::new((0..BATCH).map(|_| bare_bh::Node::new()).collect());
        let consumer = {
            let (l, _nodes) = (l.clone(), nodes.clone());
            std::thread::spawn(move || l.run())
        };
        let mut expected = 0;
        b.iter(|| {
            for n in nodes.iter() {
                l.schedule(n);
            }
            expected += BATCH;
            while l.count.load(Ordering::Acquire) < expected {
                std::hint::spin_loop();
            }
        });
        l.stop.store(true, Ordering::Relaxed);
        consumer.join().unwrap();
    });
    g.finish();
}

fn idle_poll(c: &mut Criterion) {
    let mut g = c.benchmark_group("idle_poll");
    g.bench_function("coroloop", |b| {
        let ctx = AioContext::new().unwrap();
        b.iter(|| ctx.poll(false));
    });
    g.bench_function("smol_local_executor_try_tick", |b| {
        let ex = smol::LocalExecutor::new();
        b.iter(|| ex.try_tick());
    });
    g.finish();
}

/// Starts a coroutine on `io` that waits for the baton and passes it on.
fn player(
    io: &IoThread,
    parity: u64,
    baton: Arc<AtomicU64>,
    peer: mpsc::Receiver<RemoteCoroutine>,
    me: mpsc::Sender<RemoteCoroutine>,
    rounds: u64,
    done: mpsc::Sender<()>,
) {
    io.context().bh_schedule_oneshot(move || {
        let co = Coroutine::new(move || {
            let peer = peer.recv().unwrap();
            loop {
                let v = baton.load(Ordering::Acquire);
                if v >= 2 * rounds {
                    break;
                }
                if v % 2 == parity {
                    baton.store(v + 1, Ordering::Release);
                    peer.wake();
                } else {
                    coroutine::suspend();
                }
            }
            peer.wake();
            done.send(()).unwrap();
        });
        me.send(co.remote()).unwrap();
        co.enter();
        co.detach();
    });
}

fn coroloop_pingpong(a: &IoThread, b: &IoThread, rounds: u64) -> Duration {
    let baton = Arc::new(AtomicU64::new(0));
    let (ta, ra) = mpsc::channel();
    let (tb, rb) = mpsc::channel();
    let (done_tx, done_rx) = mpsc::channel();
    let start = Instant::now();
    player(a, 0, baton.clone(), rb, ta, rounds, done_tx.clone());
    player(b, 1, baton, ra, tb, rounds, done_tx);
    done_rx.recv().unwrap();
    done_rx.recv().unwrap();
    start.elapsed()
}

fn pingpong(c: &mut Criterion) {
    let mut g = c.benchmark_group("pingpong");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(4));
    g.bench_function("coroloop_iothreads_no_polling", |b| {
        let x = IoThreadBuilder::new("pp-a")
            .poll_params(0, 0, 0)
            .spawn()
            .unwrap();
        let y = IoThreadBuilder::new("pp-b")
            .poll_params(0, 0, 0)
            .spawn()
            .unwrap();
        b.iter_custom(|iters| coroloop_pingpong(&x, &y, iters));
    });
    g.bench_function("coroloop_iothreads_polling_32us", |b| {
        let x = IoThread::spawn("pp-a").unwrap();
        let y = IoThread::spawn("pp-b").unwrap();
        b.iter_custom(|iters| coroloop_pingpong(&x, &y, iters));
    });
    g.bench_function("async_channel_smol", |b| {
        b.iter_custom(|iters| {
            let (tx1, rx1) = async_channel::bounded::<u64>(1);
            let (tx2, rx2) = async_channel::bounded::<u64>(1);
            let echo = std::thread::spawn(move || {
                smol::block_on(async {
                    while let Ok(v) = rx1.recv().await {
                        tx2.send(v).await.unwrap();
                    }
                })
            });
            let start = Instant::now();
            smol::block_on(async {
                for i in 0..iters {
                    tx1.send(i).await.unwrap();
                    rx2.recv().await.unwrap();
                }
            });
            let el = start.elapsed();
            drop(tx1);
            echo.join().unwrap();
            el
        });
    });
    g.bench_function("tokio_mpsc_2_workers", |b| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap();
        b.iter_custom(|iters| {
            rt.block_on(async {
                let (tx1, mut rx1) = tokio::sync::mpsc::channel::<u64>(1);
                let (tx2, mut rx2) = tokio::sync::mpsc::channel::<u64>(1);
                let echo = tokio::spawn(async move {
                    while let Some(v) = rx1.recv().await {
                        tx2.send(v).await.unwrap();
                    }
                });
                let start = Instant::now();
                let pinger = tokio::spawn(async move {
                    for i in 0..iters {
                        tx1.send(i).await.unwrap();
                        rx2.recv().await.unwrap();
                    }
                });
                pinger.await.unwrap();
                let el = start.elapsed();
                echo.await.unwrap();
                el
            })
        });
    });
    g.bench_function("tokio_mpsc_two_threads", |b| {
        b.iter_custom(|iters| {
            let (tx1, mut rx1) = tokio::sync::mpsc::channel::<u64>(1);
            let (tx2, mut rx2) = tokio::sync::mpsc::channel::<u64>(1);
            let echo = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    while let Some(v) = rx1.recv().await {
                        tx2.send(v).await.unwrap();
                    }
                });
            });
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            let start = Instant::now();
            rt.block_on(async {
                for i in 0..iters {
                    tx1.send(i).await.unwrap();
                    rx2.recv().await.unwrap();
                }
            });
            let el = start.elapsed();
            drop(tx1);
            echo.join().unwrap();
            el
        });
    });
    g.bench_function("std_mpsc", |b| {
        b.iter_custom(|iters| {
            let (tx1, rx1) = mpsc::channel::<u64>();
            let (tx2, rx2) = mpsc::channel::<u64>();
            let echo = std::thread::spawn(move || {
                while let Ok(v) = rx1.recv() {
                    tx2.send(v).unwrap();
                }
            });
            let start = Instant::now();
            for i in 0..iters {
                tx1.send(i).unwrap();
                rx2.recv().unwrap();
            }
            let el = start.elapsed();
            drop(tx1);
            echo.join().unwrap();
            el
        });
    });
    g.finish();
}

criterion_group!(benches, bh, bh_remote, bh_remote_bare, idle_poll, pingpong);
criterion_main!(benches);
