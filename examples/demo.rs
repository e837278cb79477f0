//! A tour of coroloop's coroutines, ending with a summary line.
//!
//! 1. A synchronous `BufRead::lines` loop runs inside a coroutine over a
//!    pipe fed in small chunks by another coroutine: the reader suspends in
//!    its `Read` impl whenever the pipe is empty.
//! 2. 10,000 coroutines wait for one event; waking them goes through the
//!    waker's wake-up list (QEMU's `co_queue_wakeup`), no recursion.
//! 3. 1,000 nested coroutines (QEMU's perf-nesting).
//! 4. One million create + enter + finish cycles on the pool.
//!
//! Run: `cargo run --release --example demo`

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::rc::Rc;
use std::time::Instant;

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

fn main() {
    let t = Instant::now();
    let (sum, writer_waits) = pipeline(20_000);
    println!(
        "pipeline: BufRead::lines summed 20000 lines to {sum} inside a coroutine \
         (writer waited {writer_waits} times) in {:?}",
        t.elapsed()
    );
    assert_eq!(sum, 20_000 * 20_001 / 2);

    let t = Instant::now();
    let woken = broadcast(10_000);
    println!(
        "broadcast: woke {woken} waiting coroutines in {:?} (fresh stacks)",
        t.elapsed()
    );
    assert_eq!(woken, 10_000);
    // Let the pool keep that many idle coroutines, as QEMU does per queue.
    coroutine::increase_pool_batch_size(10_000);
    broadcast(10_000);
    let t = Instant::now();
    let woken = broadcast(10_000);
    println!(
        "broadcast: woke {woken} waiting coroutines in {:?} (pooled stacks)",
        t.elapsed()
    );
    coroutine::decrease_pool_batch_size(10_000);

    let root = Coroutine::new(|| nest(1, 1000));
    root.enter();
    let depth = root.take_result().unwrap();
    println!("nesting: reached depth {depth}");
    assert_eq!(depth, 1000);

    const N: u32 = 1_000_000;
    let t = Instant::now();
    for i in 0..N {
        let co = Coroutine::new(move || std::hint::black_box(i));
        co.enter();
    }
    let per = t.elapsed().as_nanos() as f64 / f64::from(N);
    let (local, global) = coroutine::pool_stats();
    println!(
        "lifecycle: {N} create+enter+finish at {per:.1} ns each; \
         pool holds {local} workers here, {global} bare stacks shared; \
         {} stacks mapped (limit {})",
        coroutine::live_stacks(),
        coroutine::max_live_stacks()
    );
    println!("demo: all checks passed");
}
