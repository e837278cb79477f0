//! A tour of coroloop's coroutines, ending with a summary line.
//!
//! 1. A synchronous `BufRead::lines` loop runs inside a coroutine over a
//!    pipe fed in small chunks by another coroutine: the reader suspends in
//!    its `Read` impl whenever the pipe is empty.
//! 2. 10,000 coroutines wait for one event; waking them goes through the
//!    waker's wake-up list (QEMU's `co_queue_wakeup`), no recursion.
//! 3. 1,000 nested coroutines (QEMU's perf-nesting).
//! 4. One million create + enter + finish cycles on the pool.
//! 5. An AioContext on an IoThread: 1,000 coroutines that sleep on timers,
//!    do blocking work in the thread pool, and are woken from this thread.
//!
//! Run: `cargo run --release --example demo`

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::rc::Rc;
use std::time::Instant;

use coroloop::aio::IoThread;
use coroloop::coroutine::{self, Coroutine, Erased};

#[derive(Default)]
struct Pipe {
    buf: VecDeque<u8>,
    closed: bool,
    reader: Option<Coroutine<Erased>>,
    writer: Option<Coroutine<Erased>>,
}

struct PipeReader(Rc<RefCell<Pipe>>);

impl Read for PipeReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let mut p = self.0.borrow_mut();
            if !p.buf.is_empty() || p.closed {
                let n = out.len().min(p.buf.len());
                for (o, b) in out.iter_mut().zip(p.buf.drain(..n)) {
                    *o = b;
                }
                // Room again: let the writer go on after we suspend.
                if let Some(w) = p.writer.take() {
                    w.wake();
                }
                return Ok(n);
            }
            p.reader = Coroutine::current();
            drop(p);
            coroutine::suspend();
        }
    }
}

fn pipeline(lines: u64) -> (u64, u64) {
    let pipe = Rc::new(RefCell::new(Pipe::default()));
    let p = pipe.clone();
    let reader = Coroutine::new(move || {
        BufReader::with_capacity(64, PipeReader(p))
            .lines()
            .map(|l| l.expect("utf-8 line").parse::<u64>().expect("a number"))
            .sum::<u64>()
    });
    let suspensions = Rc::new(Cell::new(0u64));
    let (p, s) = (pipe.clone(), suspensions.clone());
    let writer = Coroutine::new(move || {
        let text: String = (1..=lines).map(|i| format!("{i}\n")).collect();
        for chunk in text.as_bytes().chunks(7) {
            loop {
                let mut pipe = p.borrow_mut();
                if pipe.buf.len() < 32 {
                    pipe.buf.extend(chunk);
                    if let Some(r) = pipe.reader.take() {
                        r.wake();
                    }
                    break;
                }
                // Full: wait for the reader.
                pipe.writer = Coroutine::current();
                drop(pipe);
                s.set(s.get() + 1);
                coroutine::suspend();
            }
        }
        let mut pipe = p.borrow_mut();
        pipe.closed = true;
        if let Some(r) = pipe.reader.take() {
            r.wake();
        }
    });
    reader.enter();
    writer.enter();
    // Everything was driven by wake-ups: both are done.
    assert!(
        reader.is_finished() && writer.is_finished(),
        "pipeline stalled"
    );
    (reader.take_result().expect("sum"), suspensions.get())
}

fn broadcast(waiters: u32) -> u32 {
    let queue: Rc<RefCell<Vec<Coroutine<Erased>>>> = Rc::default();
    let woken = Rc::new(Cell::new(0));
    let cos: Vec<_> = (0..waiters)
        .map(|_| {
            let (q, w) = (queue.clone(), woken.clone());
            let co = Coroutine::new(move || {
                q.borrow_mut().push(Coroutine::current().unwrap());
                coroutine::suspend();
                w.set(w.get() + 1);
            });
            co.enter();
            co
        })
        .collect();
    let q = queue.clone();
    let waker = Coroutine::new(move || {
        for co in q.borrow_mut().drain(..) {
            co.wake(); // queued on this coroutine's wake-up list
        }
    });
    waker.enter();
    assert!(cos.iter().all(Coroutine::is_finished));
    woken.get()
}

fn nest(depth: u32, max: u32) -> u32 {
    if depth == max {
        return depth;
    }
    let child = Coroutine::new(move || nest(depth + 1, max));
    child.enter();
    child.take_result().unwrap()
}

/// Coroutines on an IoThread: each sleeps 1 ms on the context's timers,
/// squares its number on a pool worker (`submit_co`), then waits for a
/// wake from the main thread (`RemoteCoroutine::wake`).
fn iothread_work(n: u64) -> (u64, bool) {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{mpsc, Arc};
    let io = IoThread::spawn("demo-io").expect("IoThread");
    let go = Arc::new(AtomicBool::new(false));
    let sum = Arc::new(AtomicU64::new(0));
    let on_io = Arc::new(AtomicBool::new(true));
    let (tx, rx) = mpsc::channel();
    let (done_tx, done_rx) = mpsc::channel();
    for i in 0..n {
        let (go, sum, on_io, tx, done) = (
            go.clone(),
            sum.clone(),
            on_io.clone(),
            tx.clone(),
            done_tx.clone(),
        );
        let ctx = io.context().clone();
        io.context().bh_schedule_oneshot(move || {
            let co = Coroutine::new(move || {
                coroutine::sleep(std::time::Duration::from_millis(1));
                let sq = ctx.thread_pool().submit_co(move || i * i);
                while !go.load(Ordering::Acquire) {
                    coroutine::suspend(); // until main wakes us
                }
                on_io.fetch_and(
                    std::thread::current().name() == Some("demo-io"),
                    Ordering::Relaxed,
                );
                sum.fetch_add(sq, Ordering::Relaxed);
                done.send(()).unwrap();
            });
            tx.send(co.remote()).unwrap();
            co.enter();
            co.detach();
        });
    }
    let remotes: Vec<_> = (0..n).map(|_| rx.recv().unwrap()).collect();
    std::thread::sleep(std::time::Duration::from_millis(20));
    go.store(true, Ordering::Release);
    for r in &remotes {
        r.wake();
    }
    for _ in 0..n {
        done_rx.recv().unwrap();
    }
    io.stop();
    (sum.load(Ordering::Relaxed), on_io.load(Ordering::Relaxed))
}

fn main() {
    // The library's log lines (leaks, fallbacks) go through `log`:
    // show warnings and errors; RUST_LOG=coroloop=debug etc. overrides.
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    println!("coroloop demo: five small programs; each line says what ran, what it shows, and how long it took.");

    let t = Instant::now();
    let (sum, writer_waits) = pipeline(20_000);
    println!(
        "1 pipeline:  std's BufRead::lines ran inside a coroutine, reading 20000 numbers from an \
         in-memory pipe that another coroutine filled 7 bytes at a time; the reader suspended \
         inside its Read impl whenever the pipe was empty, the writer {writer_waits} times when it \
         was full. Sum {sum} (expected {}), in {:.1?}.",
        20_000u64 * 20_001 / 2,
        t.elapsed()
    );
    assert_eq!(sum, 20_000 * 20_001 / 2);

    let t = Instant::now();
    let woken = broadcast(10_000);
    let fresh = t.elapsed();
    assert_eq!(woken, 10_000);
    // Let the pool keep that many idle coroutines, as QEMU does per queue.
    coroutine::increase_pool_batch_size(10_000);
    broadcast(10_000);
    let t = Instant::now();
    let woken = broadcast(10_000);
    let pooled = t.elapsed();
    assert_eq!(woken, 10_000);
    coroutine::decrease_pool_batch_size(10_000);
    println!(
        "2 broadcast: {woken} coroutines each started and waited; one coroutine then woke them \
         all through its wake-up list (QEMU's co_queue_wakeup: no recursion, no stack growth). \
         Create + wait + wake + finish for all of them: {fresh:.1?} the first time (every stack \
         freshly mapped), {pooled:.1?} once the pool keeps the coroutines ({:.0} ns each).",
        pooled.as_nanos() as f64 / f64::from(woken)
    );

    let t = Instant::now();
    let root = Coroutine::new(|| nest(1, 1000));
    root.enter();
    let depth = root.take_result().unwrap();
    assert_eq!(depth, 1000);
    println!(
        "3 nesting:   each coroutine created and entered the next one, 1000 deep (QEMU's \
         perf-nesting): depth {depth} reached and unwound back, in {:.1?}.",
        t.elapsed()
    );

    const N: u32 = 1_000_000;
    let t = Instant::now();
    for i in 0..N {
        let co = Coroutine::new(move || std::hint::black_box(i));
        co.enter();
    }
    let per = t.elapsed().as_nanos() as f64 / f64::from(N);
    let (local, global) = coroutine::pool_stats();
    println!(
        "4 lifecycle: {N} coroutines created, entered and finished one after another (QEMU's \
         perf-lifecycle): {per:.1} ns each, on {local} live workers pooled on this thread \
         ({global} bare stacks in the shared pool); {} stacks mapped in all, under the limit of {} \
         that keeps vm.max_map_count safe.",
        coroutine::live_stacks(),
        coroutine::max_live_stacks()
    );

    let t = Instant::now();
    let (sum, resumed_on_io) = iothread_work(1000);
    println!(
        "5 iothread:  1000 coroutines on an IoThread (its own AioContext) each slept 1 ms on a \
         timer, squared its number on a thread-pool worker and waited until this thread woke it; \
         all resumed on the IoThread: {resumed_on_io}; sum of squares {sum} (expected {}), \
         in {:.1?} (including a deliberate 20 ms pause before the wakes).",
        (0..1000u64).map(|i| i * i).sum::<u64>(),
        t.elapsed()
    );
    assert_eq!(sum, (0..1000u64).map(|i| i * i).sum::<u64>());
    assert!(resumed_on_io);
    println!("demo: all checks passed");
}
