//! Stray wakes (issue "Reliability", part 2). ARCHITECTURE.md, "Resumption is
//! not a grant": a stale `Waker`, a `remote().wake()` or a duplicate wake
//! may resume a coroutine while it waits for something else, and every
//! library wait keeps its own grant state, so a stray wake never hands out
//! a lock, ends a sleep early, or resumes a coroutine that finished (or a
//! newer coroutine on its recycled stack).
//!
//! Each scenario parks waiters in one primitive — coroutines on the
//! AioContext, coroutines inside a `CoroutineFuture` task, and async tasks
//! where the primitive has an async form — and collects every handle that
//! can resume them: `co.remote()`, `co.waker()`, the waker of an earlier
//! `await_future` (kept after that wait ended), task wakers. Then 2-4
//! threads fire those handles at random (`wake`, `wake_by_ref`, wake by
//! value) thousands of times while the home thread polls the context and
//! adds its own strays (`co.wake()`, `co.enter()`, `ctx.co_schedule`).
//! After every poll the test asserts that no waiter got past its wait
//! (each waiter bumps its `past` counter right after its wait returns).
//! Then the waits are granted for real, while the storm goes on, and every
//! waiter must get past exactly once, in the order the primitive promises.
//!
//! The randomness is a SplitMix64 generator seeded from a constant (or
//! `COROLOOP_SEED=<n|0xhex>`); each scenario prints its seed (shown with
//! `--nocapture` or when it fails). Thread interleavings still vary from
//! run to run; the assertions hold for all of them.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex, OnceLock, RwLock};
use std::task::{Context, Poll, Waker};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use coroloop::aio::{AioContext, ClockType, Task};
use coroloop::coroutine::{self, Coroutine, Erased, RemoteCoroutine};
use coroloop::future::{await_future, CoroutineFuture};
use coroloop::sync::{CoMutex, CoQueue, CoRwLock, CoSleep};

// ---- seeded randomness ----

const DEFAULT_SEED: u64 = 0x5eed_c0de_2024_0001;

/// Stray wakes each storm thread fires before the grant phase.
const QUOTA: u64 = 8_000;

/// A scenario that takes longer than this is hung.
const HANG: Duration = Duration::from_secs(30);

fn base_seed() -> u64 {
    static SEED: OnceLock<u64> = OnceLock::new();
    *SEED.get_or_init(|| match std::env::var("COROLOOP_SEED") {
        Ok(s) => {
            let t = s.trim();
            let v = match t.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16).ok(),
                None => t.parse().ok(),
            };
            v.unwrap_or_else(|| panic!("COROLOOP_SEED={s:?} is not a number"))
        }
        Err(_) => DEFAULT_SEED,
    })
}

/// SplitMix64.
struct Rng(u64);

impl Rng {
    /// The generator of one scenario: the base seed mixed with its name.
    fn for_scenario(name: &str) -> Rng {
        let base = base_seed();
        let mut h: u64 = 0xcbf2_9ce4_8422_2325; // FNV-1a
        for b in name.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        let seed = base ^ h;
        eprintln!("stray_wakes/{name}: seed {seed:#018x} (COROLOOP_SEED={base:#x} replays it)");
        Rng(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }

    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}

// ---- stray handles and the storm ----

/// Something that can resume a waiter from any thread.
#[derive(Clone)]
enum Stray {
    Remote(RemoteCoroutine),
    Waker(Waker),
}

impl Stray {
    fn fire(&self, rng: &mut Rng) {
        match self {
            Stray::Remote(r) => {
                // Scheduling a finished coroutine is a no-op (a current
                // one could be scheduled twice, which panics by design).
                if r.is_finished() && rng.one_in(4) {
                    r.schedule();
                } else {
                    r.wake();
                }
            }
            Stray::Waker(w) => {
                if rng.one_in(2) {
                    w.wake_by_ref();
                } else {
                    // By value on purpose: `Wake::wake` is its own path.
                    #[allow(clippy::waker_clone_wake)]
                    w.clone().wake();
                }
            }
        }
    }
}

type Pool = Arc<RwLock<Vec<Stray>>>;

/// Per-waiter results, filled in right after each wait.
type Slots<T> = Rc<RefCell<Vec<Option<T>>>>;

/// Threads firing random handles of a pool: `QUOTA` wakes each as fast as
/// they can, then gently (every 50 µs) until stopped.
struct Storm {
    stop: Arc<AtomicBool>,
    quota_done: Arc<AtomicUsize>,
    threads: Vec<JoinHandle<u64>>,
}

impl Storm {
    fn start(pool: &Pool, rng: &mut Rng) -> Storm {
        let stop = Arc::new(AtomicBool::new(false));
        let quota_done = Arc::new(AtomicUsize::new(0));
        let n = 2 + rng.below(3);
        let threads = (0..n)
            .map(|_| {
                let (pool, stop, done) = (pool.clone(), stop.clone(), quota_done.clone());
                let mut rng = Rng(rng.next_u64());
                std::thread::spawn(move || {
                    let mut fired = 0u64;
                    while !stop.load(Relaxed) {
                        {
                            let p = pool.read().unwrap();
                            if !p.is_empty() {
                                let k = rng.below(p.len());
                                p[k].fire(&mut rng);
                            }
                        }
                        fired += 1;
                        if fired == QUOTA {
                            done.fetch_add(1, Relaxed);
                        }
                        if fired >= QUOTA {
                            std::thread::sleep(Duration::from_micros(50));
                        } else if rng.one_in(16) {
                            std::thread::yield_now();
                        }
                    }
                    fired
                })
            })
            .collect();
        Storm {
            stop,
            quota_done,
            threads,
        }
    }

    fn quota_reached(&self) -> bool {
        self.quota_done.load(Relaxed) == self.threads.len()
    }

    /// Stops and joins the threads; returns how many wakes they fired.
    fn stop(self) -> u64 {
        self.stop.store(true, Relaxed);
        self.threads
            .into_iter()
            .map(|t| t.join().expect("a storm thread panicked"))
            .sum()
    }
}

// ---- helper futures ----

/// Wakes itself from inside `poll` once, then completes with the waker it
/// was given: the waker of a wait that is over.
#[derive(Default)]
struct SelfWake(Option<Waker>);

impl Future for SelfWake {
    type Output = Waker;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Waker> {
        match self.0.take() {
            Some(w) => Poll::Ready(w),
            None => {
                self.0 = Some(cx.waker().clone());
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        }
    }
}

/// Lets the executor run other work once.
#[derive(Default)]
struct YieldOnce(bool);

impl Future for YieldOnce {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0 {
            return Poll::Ready(());
        }
        self.0 = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// Puts every distinct waker its task is polled with into the pool.
struct Spy {
    pool: Pool,
    seen: Option<Waker>,
    inner: Pin<Box<dyn Future<Output = ()>>>,
}

impl Future for Spy {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if !self.seen.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            self.seen = Some(cx.waker().clone());
            self.pool
                .write()
                .unwrap()
                .push(Stray::Waker(cx.waker().clone()));
        }
        self.inner.as_mut().poll(cx)
    }
}

/// A future pending until `fire`d (from anywhere), counting its polls and
/// keeping the latest waker.
#[derive(Clone, Default)]
struct Gate(Arc<Mutex<GateState>>);

#[derive(Default)]
struct GateState {
    open: bool,
    waker: Option<Waker>,
    polls: usize,
}

impl Gate {
    fn fire(&self) {
        let w = {
            let mut g = self.0.lock().unwrap();
            g.open = true;
            g.waker.take()
        };
        w.expect("the gate was polled").wake();
    }
    fn polls(&self) -> usize {
        self.0.lock().unwrap().polls
    }
    fn waker(&self) -> Waker {
        self.0.lock().unwrap().waker.clone().unwrap()
    }
    fn wait(&self) -> GateWait {
        GateWait(self.clone())
    }
}

struct GateWait(Gate);

impl Future for GateWait {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut g = (self.0).0.lock().unwrap();
        g.polls += 1;
        if g.open {
            Poll::Ready(())
        } else {
            g.waker = Some(cx.waker().clone());
            Poll::Pending
        }
    }
}

/// A blocking gate for thread-pool jobs.
#[derive(Clone, Default)]
struct JobGate(Arc<(Mutex<bool>, Condvar)>);

impl JobGate {
    fn wait(&self) {
        let (m, cv) = &*self.0;
        let mut open = m.lock().unwrap();
        while !*open {
            open = cv.wait(open).unwrap();
        }
    }
    fn open(&self) {
        let (m, cv) = &*self.0;
        *m.lock().unwrap() = true;
        cv.notify_all();
    }
}

// ---- the harness ----

/// Where a waiter runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// A coroutine created on the context's thread (its resumer is the
    /// context); the home thread also enters, wakes and schedules it.
    Co,
    /// A coroutine inside a `CoroutineFuture` spawned with `spawn_local`.
    FutCo,
    /// An async task (`spawn_local`).
    Task,
}

#[derive(Clone, Default)]
struct Marks {
    past: Rc<RefCell<Vec<u32>>>,
    order: Rc<RefCell<Vec<usize>>>,
}

/// Given to each waiter: `pass()` right after its wait returns.
struct Mark {
    i: usize,
    marks: Marks,
}

impl Mark {
    fn pass(&self) {
        self.marks.past.borrow_mut()[self.i] += 1;
        self.marks.order.borrow_mut().push(self.i);
    }
}

/// The home-thread start of every coroutine waiter: hand the storm its
/// remote handle, its waker, and the waker of an earlier wait; then yield.
fn prelude(pool: &Pool) {
    let me = Coroutine::current().expect("in a coroutine");
    let mut strays = vec![Stray::Remote(me.remote()), Stray::Waker(me.waker())];
    drop(me);
    strays.push(Stray::Waker(await_future(SelfWake::default())));
    pool.write().unwrap().extend(strays);
    coroutine::yield_now();
}

struct Harness {
    name: &'static str,
    rng: Rng,
    ctx: AioContext,
    marks: Marks,
    armed: Rc<Cell<usize>>,
    pool: Pool,
    kinds: Vec<Kind>,
    cos: Vec<Option<Coroutine<Erased>>>,
    tasks: Vec<Option<Task<()>>>,
    scheduled: Vec<bool>,
    storm: Option<Storm>,
    home_strays: u64,
    started: Instant,
}

impl Harness {
    fn new(name: &'static str) -> Harness {
        Harness {
            name,
            rng: Rng::for_scenario(name),
            ctx: AioContext::new().unwrap(),
            marks: Marks::default(),
            armed: Rc::default(),
            pool: Pool::default(),
            kinds: Vec::new(),
            cos: Vec::new(),
            tasks: Vec::new(),
            scheduled: Vec::new(),
            storm: None,
            home_strays: 0,
            started: Instant::now(),
        }
    }

    fn n(&self) -> usize {
        self.kinds.len()
    }

    fn check_time(&self, what: &str) {
        assert!(
            self.started.elapsed() < HANG,
            "stray_wakes/{}: hung while {what} (past: {:?})",
            self.name,
            self.past()
        );
    }

    fn past(&self) -> Vec<u32> {
        self.marks.past.borrow().clone()
    }

    fn order(&self) -> Vec<usize> {
        self.marks.order.borrow().clone()
    }

    fn new_mark(&mut self, kind: Kind) -> Mark {
        let i = self.n();
        self.kinds.push(kind);
        self.marks.past.borrow_mut().push(0);
        self.scheduled.push(false);
        Mark {
            i,
            marks: self.marks.clone(),
        }
    }

    /// Polls until `n` waiters have armed (reached their wait), then a few
    /// more times so their waits are in place.
    fn settle(&mut self, n: usize) {
        while self.armed.get() < n {
            self.ctx.poll(false);
            self.check_time("starting the waiters");
        }
        for _ in 0..4 {
            self.ctx.poll(false);
        }
    }

    /// Starts a waiter running `body` in a coroutine of `kind` (Co or
    /// FutCo) and lets it reach its wait.
    fn spawn_co(&mut self, kind: Kind, body: impl FnOnce(Mark) + 'static) -> usize {
        let mark = self.new_mark(kind);
        let i = mark.i;
        let (pool, armed) = (self.pool.clone(), self.armed.clone());
        let run = move || {
            prelude(&pool);
            armed.set(armed.get() + 1);
            body(mark);
        };
        match kind {
            Kind::Co => {
                let co = Coroutine::new(run);
                co.enter();
                self.cos.push(Some(co.erase()));
                self.tasks.push(None);
            }
            Kind::FutCo => {
                let t = self.ctx.spawn_local(CoroutineFuture::new(run));
                self.cos.push(None);
                self.tasks.push(Some(t));
            }
            Kind::Task => unreachable!("spawn_co with Kind::Task"),
        }
        self.settle(i + 1);
        i
    }

    /// Starts a waiter running the future `body` makes, as a task.
    fn spawn_task<F>(&mut self, body: impl FnOnce(Mark) -> F) -> usize
    where
        F: Future<Output = ()> + 'static,
    {
        let mark = self.new_mark(Kind::Task);
        let i = mark.i;
        let fut = body(mark);
        let armed = self.armed.clone();
        let inner = Box::pin(async move {
            let _old = SelfWake::default().await;
            YieldOnce::default().await;
            armed.set(armed.get() + 1);
            fut.await;
        });
        let t = self.ctx.spawn_local(Spy {
            pool: self.pool.clone(),
            seen: None,
            inner,
        });
        self.cos.push(None);
        self.tasks.push(Some(t));
        self.settle(i + 1);
        i
    }

    /// Starts a waiter of `kind`: a coroutine running `co_body`, or a task
    /// running `task_body`'s future.
    fn spawn<F>(
        &mut self,
        kind: Kind,
        co_body: impl FnOnce(Mark) + 'static,
        task_body: impl FnOnce(Mark) -> F,
    ) -> usize
    where
        F: Future<Output = ()> + 'static,
    {
        match kind {
            Kind::Task => self.spawn_task(task_body),
            _ => self.spawn_co(kind, co_body),
        }
    }

    /// A home-thread stray, one time in three: wake, enter or (if allowed)
    /// schedule a random coroutine waiter.
    fn home_stray(&mut self, may_schedule: bool) {
        if self.cos.is_empty() || !self.rng.one_in(3) {
            return;
        }
        let i = self.rng.below(self.cos.len());
        let Some(co) = &self.cos[i] else { return };
        if co.is_finished() {
            return;
        }
        match self.rng.below(3) {
            0 => co.wake(),
            1 => co.enter(),
            _ if may_schedule && !self.scheduled[i] => {
                self.ctx.co_schedule(co);
                self.scheduled[i] = true;
            }
            _ => co.wake(),
        }
        self.home_strays += 1;
    }

    fn start_storm(&mut self) {
        assert!(self.storm.is_none());
        self.storm = Some(Storm::start(&self.pool, &mut self.rng));
    }

    fn assert_none_past(&self, when: &str) {
        let past = self.past();
        assert!(
            past.iter().all(|&p| p == 0),
            "stray_wakes/{}: a waiter got past its wait {when}: past = {past:?}",
            self.name
        );
    }

    /// The storm before any grant: after every poll, no waiter is past its
    /// wait and `check` holds.
    fn storm(&mut self, mut check: impl FnMut(&mut Harness)) {
        self.start_storm();
        loop {
            let done = self.storm.as_ref().unwrap().quota_reached();
            self.home_stray(true);
            self.ctx.poll(false);
            self.scheduled.fill(false);
            self.assert_none_past("during the storm");
            check(self);
            if done {
                break;
            }
            self.check_time("storming");
        }
        // Wakes still queued from the storm.
        for _ in 0..8 {
            self.ctx.poll(false);
            self.assert_none_past("after the storm");
            check(self);
        }
    }

    /// Polls (with home strays, never schedules) until `done`, checking
    /// `check` after every poll.
    fn poll_until(
        &mut self,
        what: &str,
        mut done: impl FnMut(&Harness) -> bool,
        mut check: impl FnMut(&Harness),
    ) {
        loop {
            self.home_stray(false);
            self.ctx.poll(false);
            check(self);
            if done(self) {
                return;
            }
            self.check_time(what);
        }
    }

    /// Polls until waiter `k` is past, then checks that exactly the waiters
    /// in `granted` are, once each.
    fn expect_pass(&mut self, k: usize, granted: &[usize]) {
        self.poll_until("waiting for a granted waiter", |h| h.past()[k] == 1, |_| {});
        let past = self.past();
        for (i, &p) in past.iter().enumerate() {
            let want = u32::from(granted.contains(&i));
            assert_eq!(
                p, want,
                "stray_wakes/{}: waiter {i} past {p} times, expected {want} \
                 (granted so far: {granted:?}, past: {past:?})",
                self.name
            );
        }
    }

    /// Stops the storm, drains what it queued, and checks that every
    /// waiter got past exactly once and finished.
    fn finish(mut self) -> Vec<usize> {
        let fired = self.storm.take().map_or(0, Storm::stop);
        for _ in 0..16 {
            self.ctx.poll(false);
        }
        let n = self.n();
        assert_eq!(
            self.past(),
            vec![1; n],
            "stray_wakes/{}: every waiter gets past exactly once",
            self.name
        );
        let order = self.order();
        assert_eq!(order.len(), n);
        for (i, co) in self.cos.iter().enumerate() {
            if let Some(co) = co {
                assert!(co.is_finished(), "waiter {i} finished");
            }
        }
        for (i, t) in self.tasks.iter().enumerate() {
            if let Some(t) = t {
                assert!(t.is_finished(), "waiter {i}'s task finished");
            }
        }
        eprintln!(
            "stray_wakes/{}: {n} waiters ({:?}), {fired} stray wakes from threads, {} on the \
             home thread, {} handles, {:?}",
            self.name,
            self.kinds,
            self.home_strays,
            self.pool.read().unwrap().len(),
            self.started.elapsed()
        );
        order
    }
}

/// The waiter kinds, cycling.
fn kind_at(kinds: &[Kind], i: usize) -> Kind {
    kinds[i % kinds.len()]
}

// ---- scenarios ----

// CoMutex::lock (coroutines on the context and in CoroutineFutures) and
// CoMutex::lock_async (tasks), queued behind a coroutine holding the lock
// while it waits on its own condition. No stray hands out the lock; the
// real unlock hands it down the FIFO, one owner at a time.
#[test]
fn comutex_lock_and_lock_async() {
    let mut h = Harness::new("comutex");
    let m = Rc::new(CoMutex::new(0u32));
    let inside = Rc::new(Cell::new(0u32));
    let release = Rc::new(Cell::new(false));
    let (m1, r1) = (m.clone(), release.clone());
    h.spawn_co(Kind::Co, move |mark| {
        let g = m1.lock(); // free: the holder
        while !r1.get() {
            coroutine::suspend();
        }
        mark.pass();
        drop(g);
    });
    assert!(m.is_locked());
    let kinds = [Kind::Co, Kind::Task, Kind::FutCo];
    const WAITERS: usize = 9;
    for i in 0..WAITERS {
        let (m1, in1) = (m.clone(), inside.clone());
        let (m2, in2) = (m.clone(), inside.clone());
        h.spawn(
            kind_at(&kinds, i),
            move |mark| {
                let mut g = m1.lock();
                mark.pass();
                assert_eq!(in1.replace(in1.get() + 1), 0, "two owners");
                *g += 1;
                coroutine::yield_now(); // hold it across a suspension
                in1.set(in1.get() - 1);
                drop(g);
            },
            move |mark| async move {
                let mut g = m2.lock_async().await;
                mark.pass();
                assert_eq!(in2.replace(in2.get() + 1), 0, "two owners");
                *g += 1;
                YieldOnce::default().await;
                in2.set(in2.get() - 1);
                drop(g);
            },
        );
    }
    h.storm(|_| assert!(m.is_locked(), "the holder still holds the lock"));
    release.set(true);
    if let Some(co) = &h.cos[0] {
        co.wake();
    }
    h.poll_until(
        "handing the lock down",
        |h| h.past().iter().all(|&p| p >= 1),
        |_| {},
    );
    let order = h.finish();
    assert_eq!(order, (0..=WAITERS).collect::<Vec<_>>(), "FIFO hand-off");
    assert_eq!(*m.try_lock().unwrap(), WAITERS as u32);
}

// CoRwLock::read and ::write queued behind a writer: strays never admit
// anyone; the real release admits them by ticket (runs of readers
// together, writers alone) with no reader/writer overlap.
#[test]
fn corwlock_read_and_write() {
    let mut h = Harness::new("corwlock");
    let l = Rc::new(CoRwLock::new(()));
    let readers = Rc::new(Cell::new(0u32));
    let writers = Rc::new(Cell::new(0u32));
    let release = Rc::new(Cell::new(false));
    let (l1, r1) = (l.clone(), release.clone());
    h.spawn_co(Kind::Co, move |mark| {
        let g = l1.write();
        while !r1.get() {
            coroutine::suspend();
        }
        mark.pass();
        drop(g);
    });
    let kinds = [Kind::Co, Kind::FutCo];
    const WAITERS: usize = 10;
    // Ticket groups: each writer alone, consecutive readers together.
    let mut group = vec![0usize];
    let mut is_writer = vec![true];
    for i in 0..WAITERS {
        let write = i == 2 || i == 6 || (i != 3 && i != 4 && h.rng.one_in(3));
        let prev_reader = !is_writer[is_writer.len() - 1];
        let g = group[group.len() - 1] + usize::from(write || !prev_reader);
        group.push(g);
        is_writer.push(write);
        let (l1, rd, wr) = (l.clone(), readers.clone(), writers.clone());
        h.spawn_co(kind_at(&kinds, i), move |mark| {
            if write {
                let g = l1.write();
                mark.pass();
                assert_eq!((rd.get(), wr.get()), (0, 0), "a writer shares the lock");
                wr.set(1);
                coroutine::yield_now();
                wr.set(0);
                drop(g);
            } else {
                let g = l1.read();
                mark.pass();
                assert_eq!(wr.get(), 0, "a reader shares the lock with a writer");
                rd.set(rd.get() + 1);
                coroutine::yield_now();
                rd.set(rd.get() - 1);
                drop(g);
            }
        });
    }
    h.storm(|_| assert!(l.try_read().is_none(), "the writer still holds the lock"));
    release.set(true);
    if let Some(co) = &h.cos[0] {
        co.wake();
    }
    h.poll_until(
        "admitting the waiters",
        |h| h.past().iter().all(|&p| p >= 1),
        |_| {},
    );
    let order = h.finish();
    let groups: Vec<usize> = order.iter().map(|&i| group[i]).collect();
    assert!(
        groups.windows(2).all(|w| w[0] <= w[1]),
        "admitted out of ticket order: order {order:?}, groups {groups:?} (writers {is_writer:?})"
    );
    assert!(l.try_write().is_some());
}

// CoQueue::wait (with a CoMutex guard), wait_unlocked, and their async
// forms: strays never end a wait; next() wakes exactly the head of the
// queue, restart_all() the rest.
#[test]
fn coqueue_wait_and_wait_unlocked() {
    let mut h = Harness::new("coqueue");
    let m = Rc::new(CoMutex::new(()));
    let q = Rc::new(CoQueue::new());
    let kinds = [Kind::Co, Kind::FutCo, Kind::Task];
    const WAITERS: usize = 12;
    for i in 0..WAITERS {
        let with_lock = (i / 3) % 2 == 0;
        let (m1, q1) = (m.clone(), q.clone());
        let (m2, q2) = (m.clone(), q.clone());
        h.spawn(
            kind_at(&kinds, i),
            move |mark| {
                if with_lock {
                    let g = q1.wait(m1.lock());
                    mark.pass();
                    assert!(m1.try_lock().is_none(), "the lock is retaken");
                    drop(g);
                } else {
                    q1.wait_unlocked();
                    mark.pass();
                }
            },
            move |mark| async move {
                if with_lock {
                    let g = q2.wait_async(m2.lock_async().await).await;
                    mark.pass();
                    assert!(m2.try_lock().is_none(), "the lock is retaken");
                    drop(g);
                } else {
                    q2.wait_unlocked_async().await;
                    mark.pass();
                }
            },
        );
    }
    h.storm(|_| {
        assert!(!q.is_empty());
        assert!(m.try_lock().is_some(), "waiters released the lock");
    });
    let half = WAITERS / 2;
    let mut granted = Vec::new();
    for k in 0..half {
        assert!(q.next());
        granted.push(k);
        h.expect_pass(k, &granted);
    }
    q.restart_all();
    h.poll_until(
        "restarting the rest",
        |h| h.past().iter().all(|&p| p >= 1),
        |_| {},
    );
    let order = h.finish();
    assert_eq!(
        order[..half],
        (0..half).collect::<Vec<_>>()[..],
        "next() is FIFO"
    );
    assert!(q.is_empty());
    assert!(!q.next());
}

// Bounded waits (CoMutex::lock_timeout, CoRwLock::write_timeout,
// CoQueue::wait_unlocked_timeout, with a timeout far beyond the test):
// strays end none of them early, and the real grants reach them in FIFO
// order, as for unbounded waits.
#[test]
fn bounded_waits_ignore_strays() {
    let mut h = Harness::new("bounded");
    const LONG: Duration = Duration::from_secs(600);
    let m = Rc::new(CoMutex::new(0u32));
    let l = Rc::new(CoRwLock::new(()));
    let q = Rc::new(CoQueue::new());
    let release = Rc::new(Cell::new(false));
    let (m1, l1, r1) = (m.clone(), l.clone(), release.clone());
    h.spawn_co(Kind::Co, move |mark| {
        let g = m1.lock();
        let w = l1.write();
        while !r1.get() {
            coroutine::suspend();
        }
        mark.pass();
        drop((g, w));
    });
    let kinds = [Kind::Co, Kind::FutCo];
    const EACH: usize = 3;
    for i in 0..EACH {
        let m1 = m.clone();
        h.spawn_co(kind_at(&kinds, i), move |mark| {
            let mut g = m1.lock_timeout(LONG).expect("granted, not timed out");
            mark.pass();
            *g += 1;
        });
    }
    for i in 0..EACH {
        let l1 = l.clone();
        h.spawn_co(kind_at(&kinds, i), move |mark| {
            let g = l1.write_timeout(LONG).expect("granted, not timed out");
            mark.pass();
            drop(g);
        });
    }
    for i in 0..EACH {
        let q1 = q.clone();
        h.spawn_co(kind_at(&kinds, i), move |mark| {
            assert!(q1.wait_unlocked_timeout(LONG), "woken, not timed out");
            mark.pass();
        });
    }
    h.storm(|_| assert!(m.is_locked()));
    release.set(true);
    if let Some(co) = &h.cos[0] {
        co.wake();
    }
    h.poll_until(
        "handing the locks down",
        |h| h.past()[..=2 * EACH].iter().all(|&p| p >= 1),
        |_| {},
    );
    q.restart_all();
    h.poll_until(
        "waking the queue",
        |h| h.past().iter().all(|&p| p >= 1),
        |_| {},
    );
    let order = h.finish();
    assert_eq!(order[0], 0, "the holder first");
    let mutex: Vec<usize> = order
        .iter()
        .copied()
        .filter(|&i| (1..=EACH).contains(&i))
        .collect();
    assert_eq!(mutex, (1..=EACH).collect::<Vec<_>>(), "FIFO hand-off");
    assert_eq!(*m.try_lock().unwrap(), EACH as u32);
    assert!(q.is_empty());
}

// CoSleep::sleep and CoSleep::sleep_for on the virtual clock: strays and
// a clock that creeps up to one nanosecond before the deadline end no
// sleep; wake() ends exactly the sleep it targets (`true`); the deadline
// ends the others (`false`), not a nanosecond early.
#[test]
fn cosleep_sleep_and_sleep_for() {
    const SLEEP_NS: i64 = 1_000_000_000;
    let mut h = Harness::new("cosleep");
    let ctx = h.ctx.clone();
    let kinds = [Kind::Co, Kind::FutCo];
    const WAITERS: usize = 10;
    let results: Slots<(bool, i64)> = Rc::default();
    let mut sleeps = Vec::new();
    for i in 0..WAITERS {
        let s = Arc::new(CoSleep::new());
        let timed = i % 2 == 1;
        sleeps.push((s.clone(), timed));
        results.borrow_mut().push(None);
        let (res, ctx) = (results.clone(), ctx.clone());
        h.spawn_co(kind_at(&kinds, i), move |mark| {
            let woken = if timed {
                s.sleep_for(ClockType::Virtual, Duration::from_nanos(SLEEP_NS as u64))
            } else {
                s.sleep();
                true
            };
            mark.pass();
            res.borrow_mut()[i] = Some((woken, ctx.clock_ns(ClockType::Virtual)));
        });
    }
    assert_eq!(ctx.clock_ns(ClockType::Virtual), 0);
    h.storm(|h| {
        let now = h.ctx.clock_ns(ClockType::Virtual);
        if h.rng.one_in(4) {
            let step = (h.rng.next_u64() % 50_000_000) as i64;
            h.ctx.advance_virtual_clock(step.min(SLEEP_NS - 1 - now));
        }
    });
    let now = ctx.clock_ns(ClockType::Virtual);
    ctx.advance_virtual_clock(SLEEP_NS - 1 - now);
    for _ in 0..4 {
        h.ctx.poll(false);
    }
    h.assert_none_past("one nanosecond before the deadline");
    // Wake all plain sleepers and half the timed ones, in random order.
    let mut to_wake: Vec<usize> = (0..WAITERS)
        .filter(|&i| !sleeps[i].1 || h.rng.one_in(2))
        .collect();
    h.rng.shuffle(&mut to_wake);
    let mut granted = Vec::new();
    for &k in &to_wake {
        assert!(sleeps[k].0.wake(), "waiter {k} was asleep");
        granted.push(k);
        h.expect_pass(k, &granted);
        assert!(!sleeps[k].0.wake(), "nobody sleeps there any more");
    }
    ctx.advance_virtual_clock(1);
    h.poll_until(
        "timing out the rest",
        |h| h.past().iter().all(|&p| p >= 1),
        |_| {},
    );
    h.finish();
    for (i, r) in results.borrow().iter().enumerate() {
        let (woken, at) = r.expect("recorded");
        let expect_woken = to_wake.contains(&i);
        assert_eq!(woken, expect_woken, "waiter {i}: woken early or timed out");
        if !woken {
            assert!(at >= SLEEP_NS, "waiter {i} timed out early, at {at} ns");
        }
    }
}

// coroutine::sleep (realtime timers): a storm for the whole sleep never
// ends one early; each ends after its full duration.
#[test]
fn coroutine_sleep() {
    let mut h = Harness::new("co-sleep");
    let kinds = [Kind::Co, Kind::FutCo];
    const WAITERS: usize = 6;
    let slept: Slots<Duration> = Rc::default();
    let mut durations = Vec::new();
    for i in 0..WAITERS {
        let d = Duration::from_millis(150 + 40 * i as u64);
        durations.push(d);
        slept.borrow_mut().push(None);
        let s = slept.clone();
        h.spawn_co(kind_at(&kinds, i), move |mark| {
            let t0 = Instant::now();
            coroutine::sleep(d);
            mark.pass();
            s.borrow_mut()[i] = Some(t0.elapsed());
        });
    }
    h.start_storm();
    let s = slept.clone();
    h.poll_until(
        "sleeping",
        |h| h.past().iter().all(|&p| p >= 1),
        move |h| {
            for (i, &p) in h.past().iter().enumerate() {
                if p > 0 {
                    let t = s.borrow()[i].expect("recorded right after the wait");
                    assert!(
                        t >= durations[i],
                        "waiter {i} slept {t:?} of {:?}",
                        durations[i]
                    );
                }
            }
        },
    );
    h.finish();
}

// io::yield_until_fd_readable / _writable on socket pairs: only the fd
// becoming ready ends a wait, and only that fd's.
#[test]
fn fd_readable_and_writable() {
    let mut h = Harness::new("fd");
    let kinds = [Kind::Co, Kind::FutCo];
    const WAITERS: usize = 8;
    let mut peers = Vec::new();
    for i in 0..WAITERS {
        let (a, b) = UnixStream::pair().unwrap();
        let writable = i % 2 == 1;
        if writable {
            a.set_nonblocking(true).unwrap();
            let buf = [0u8; 16 * 1024];
            loop {
                match (&a).write(&buf) {
                    Ok(_) => {}
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => panic!("filling the socket: {e}"),
                }
            }
        }
        peers.push((b, writable));
        h.spawn_co(kind_at(&kinds, i), move |mark| {
            if writable {
                coroloop::io::yield_until_fd_writable(&a).unwrap();
            } else {
                coroloop::io::yield_until_fd_readable(&a).unwrap();
            }
            mark.pass();
            drop(a);
        });
    }
    h.storm(|_| {});
    let mut ks: Vec<usize> = (0..WAITERS).collect();
    h.rng.shuffle(&mut ks);
    let mut granted = Vec::new();
    for &k in &ks {
        let (b, writable) = &peers[k];
        if *writable {
            b.set_nonblocking(true).unwrap();
            let mut buf = [0u8; 64 * 1024];
            loop {
                match (&*b).read(&mut buf) {
                    Ok(0) => panic!("peer closed"),
                    Ok(_) => {}
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => panic!("draining the socket: {e}"),
                }
            }
        } else {
            (&*b).write_all(&[1]).unwrap();
        }
        granted.push(k);
        h.expect_pass(k, &granted);
    }
    h.finish();
}

// ThreadPool::submit_co: a waiter resumes with its own job's result once
// that job is done, never earlier.
#[test]
fn thread_pool_submit_co() {
    let mut h = Harness::new("thread-pool");
    let kinds = [Kind::Co, Kind::FutCo];
    const WAITERS: usize = 6;
    let results: Slots<usize> = Rc::default();
    let mut gates = Vec::new();
    for i in 0..WAITERS {
        let gate = JobGate::default();
        gates.push(gate.clone());
        results.borrow_mut().push(None);
        let (res, ctx) = (results.clone(), h.ctx.clone());
        h.spawn_co(kind_at(&kinds, i), move |mark| {
            let v = ctx.thread_pool().submit_co(move || {
                gate.wait();
                i * 10
            });
            mark.pass();
            res.borrow_mut()[i] = Some(v);
        });
    }
    h.storm(|_| {});
    let mut ks: Vec<usize> = (0..WAITERS).collect();
    h.rng.shuffle(&mut ks);
    let mut granted = Vec::new();
    for &k in &ks {
        gates[k].open();
        granted.push(k);
        h.expect_pass(k, &granted);
        assert_eq!(results.borrow()[k], Some(k * 10));
    }
    h.finish();
}

// await_future of a pending future: strays resume the coroutine but never
// poll the future again (for futures whose own waker is kept out of the
// storm, exactly one poll before the wake and one after); storming the
// future's own waker re-polls it, which still returns Pending.
#[test]
fn await_future_pending() {
    let mut h = Harness::new("await-future");
    let kinds = [Kind::Co, Kind::FutCo];
    const WAITERS: usize = 8;
    let mut gates = Vec::new();
    for i in 0..WAITERS {
        let gate = Gate::default();
        gates.push(gate.clone());
        h.spawn_co(kind_at(&kinds, i), move |mark| {
            await_future(gate.wait());
            mark.pass();
        });
    }
    // Odd gates: their own (current) waker joins the storm.
    for g in gates.iter().skip(1).step_by(2) {
        h.pool.write().unwrap().push(Stray::Waker(g.waker()));
    }
    let g2 = gates.clone();
    h.storm(move |_| {
        for (i, g) in g2.iter().enumerate() {
            if i % 2 == 0 {
                assert_eq!(g.polls(), 1, "gate {i} was polled by a stray resumption");
            }
        }
    });
    let mut ks: Vec<usize> = (0..WAITERS).collect();
    h.rng.shuffle(&mut ks);
    let mut granted = Vec::new();
    for &k in &ks {
        gates[k].fire();
        granted.push(k);
        h.expect_pass(k, &granted);
    }
    h.finish();
    for (i, g) in gates.iter().enumerate() {
        if i % 2 == 0 {
            assert_eq!(
                g.polls(),
                2,
                "gate {i}: polled once, then once after its wake"
            );
        } else {
            assert!(g.polls() >= 2);
        }
    }
}

// Stale handles — remote handles, wakers, and wakers of earlier
// await_future waits — of coroutines that finished (returned, unwound,
// detached and finished, cancelled inside a task) never resume the
// coroutines created after them on the recycled stacks, even while the
// storm races with coroutines finishing and being replaced.
#[test]
fn stale_handles_never_resume_recycled_coroutines() {
    const OLD: usize = 40;
    const LIVE_MAX: usize = 200;
    const POOL_MAX: usize = 4096;
    let name = "recycled";
    let mut rng = Rng::for_scenario(name);
    let started = Instant::now();
    let ctx = AioContext::new().unwrap();
    let pool = Pool::default();

    // Old coroutines: each hands its handles to the pool, then suspends
    // once; they end in four ways.
    struct Ended(Rc<Cell<usize>>);
    impl Drop for Ended {
        fn drop(&mut self) {
            self.0.set(self.0.get() + 1);
        }
    }
    let ended = Rc::new(Cell::new(0));
    let ready = Rc::new(Cell::new(0));
    let mut finished_handles: Vec<Coroutine<Erased>> = Vec::new();
    let mut tasks = Vec::new();
    let mut pending_end = Vec::new();
    for k in 0..OLD {
        let (p, e, r) = (pool.clone(), Ended(ended.clone()), ready.clone());
        let body = move || {
            let _e = e;
            let me = Coroutine::current().unwrap();
            p.write()
                .unwrap()
                .extend([Stray::Remote(me.remote()), Stray::Waker(me.waker())]);
            drop(me);
            let w = await_future(SelfWake::default());
            p.write().unwrap().push(Stray::Waker(w));
            r.set(r.get() + 1);
            coroutine::suspend();
        };
        if k % 4 == 3 {
            tasks.push(ctx.spawn_local(CoroutineFuture::new(body)));
        } else {
            let co = Coroutine::new(body);
            co.enter();
            pending_end.push((k, co));
        }
    }
    while ready.get() < OLD {
        ctx.poll(false);
        assert!(started.elapsed() < HANG);
    }
    for (k, co) in pending_end {
        match k % 4 {
            0 => {
                co.enter(); // returns
                finished_handles.push(co.erase());
            }
            1 => co.cancel(), // unwound
            _ => {
                let r = co.remote();
                co.detach();
                r.wake(); // finishes on the next poll; the context lets go
            }
        }
    }
    drop(tasks); // cancelled: unwound on the next poll
    while ended.get() < OLD {
        ctx.poll(false);
        assert!(started.elapsed() < HANG);
    }
    assert_eq!(ctx.detached_count(), 0);
    for s in pool.read().unwrap().iter() {
        if let Stray::Remote(r) = s {
            assert!(r.is_finished());
        }
    }

    // New coroutines on the recycled workers, each counting its
    // resumptions and waiting for its own flag.
    struct Live {
        co: Coroutine<()>,
        resumed: Rc<Cell<u32>>,
        go: Rc<Cell<bool>>,
    }
    let spawn_live = || {
        let (resumed, go) = (Rc::new(Cell::new(0)), Rc::new(Cell::new(false)));
        let (r, g) = (resumed.clone(), go.clone());
        let co = Coroutine::new(move || loop {
            coroutine::suspend();
            r.set(r.get() + 1);
            if g.get() {
                break;
            }
        });
        co.enter();
        Live { co, resumed, go }
    };
    let mut live: Vec<Live> = (0..32).map(|_| spawn_live()).collect();
    let check = |live: &[Live], when: &str| {
        for (i, l) in live.iter().enumerate() {
            assert_eq!(
                l.resumed.get(),
                0,
                "stray_wakes/{name}: live coroutine {i} was resumed by a stale handle {when}"
            );
        }
    };

    // The storm, racing with churn: coroutines whose handles join the pool
    // while they are current, then finish and give their worker to the
    // next live coroutine.
    let storm = Storm::start(&pool, &mut rng);
    let mut churned = 0u64;
    while !storm.quota_reached() {
        let churn = Coroutine::new(coroutine::suspend);
        churn.enter();
        {
            // Bounded pool: past POOL_MAX handles, new ones replace random
            // old ones (whose headers the last reference then frees).
            let mut p = pool.write().unwrap();
            for s in [Stray::Remote(churn.remote()), Stray::Waker(churn.waker())] {
                if p.len() < POOL_MAX {
                    p.push(s);
                } else {
                    let k = rng.below(p.len());
                    p[k] = s;
                }
            }
        }
        if rng.one_in(2) {
            ctx.poll(false); // maybe a stray (then current) wake finishes it
        }
        if !churn.is_finished() {
            churn.enter();
        }
        drop(churn);
        churned += 1;
        if live.len() < LIVE_MAX {
            live.push(spawn_live());
        }
        for _ in 0..rng.below(3) {
            let i = rng.below(finished_handles.len());
            finished_handles[i].wake(); // finished: does nothing
        }
        ctx.poll(false);
        check(&live, "during the storm");
        assert!(started.elapsed() < HANG, "hung storming");
    }
    let fired = storm.stop();
    for _ in 0..16 {
        ctx.poll(false);
    }
    check(&live, "after the storm");

    // Real wakes, from another thread: each live coroutine resumes once.
    for l in &live {
        l.go.set(true);
    }
    let remotes: Vec<RemoteCoroutine> = live.iter().map(|l| l.co.remote()).collect();
    std::thread::spawn(move || {
        for r in remotes {
            r.wake();
        }
    })
    .join()
    .unwrap();
    while !live.iter().all(|l| l.co.is_finished()) {
        ctx.poll(false);
        assert!(started.elapsed() < HANG, "hung finishing");
    }
    for (i, l) in live.iter().enumerate() {
        assert_eq!(
            l.resumed.get(),
            1,
            "live coroutine {i} resumed once by its wake"
        );
    }
    eprintln!(
        "stray_wakes/{name}: {} live coroutines, {churned} churned, {fired} stale wakes, {} \
         handles, {:?}",
        live.len(),
        pool.read().unwrap().len(),
        started.elapsed()
    );
}
