//! The interpreter: runs a program's steps on its worker threads, one step
//! at a time, each op against that thread's table of handles.

use std::cell::{Cell, RefCell};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::task::Waker;
use std::time::{Duration, Instant};

use coroloop::aio::{
    AioContext, AioMode, Bh, ClockType, FdHandler, FdMonitorKind, IoThread, LocalBh, Task, Timer,
};
use coroloop::coroutine::{self, RemoteCoroutine};
use coroloop::future::{await_future, CoroutineFuture};
use coroloop::io::CoFd;
use coroloop::sync::{CoMutex, CoQueue, CoRwLock, CoSleep};
use coroloop::Coroutine;

use crate::check::{self, call, fail, Canary, KBuf, KLEN};
use crate::program::*;

// ------------------------------------------------------------ shared state

/// A `Send` handle on its way between threads.
enum Item {
    Ctx(AioContext),
    Remote(RemoteCoroutine),
    Bh(Bh),
    Waker(Waker),
    Task(Task<u64>),
}

/// What all threads of a program share.
struct Globals {
    mutexes: [CoMutex<()>; MUTEXES as usize],
    held: [AtomicBool; MUTEXES as usize],
    rw: CoRwLock<()>,
    readers: AtomicI32,
    writer: AtomicBool,
    queue: CoQueue,
    sleeps: [CoSleep; SLEEPS as usize],
    signals: Vec<(async_channel::Sender<()>, async_channel::Receiver<()>)>,
    /// Non-blocking pipe (fd handlers, `CoFd`).
    pipe0: OwnedFd,
    /// Blocking pipe (io_uring reads that wait in the kernel).
    pipe1: OwnedFd,
    file: File,
    exchange: Mutex<Vec<Option<Item>>>,
}

static GLOBALS: Mutex<Option<Arc<Globals>>> = Mutex::new(None);

fn g() -> Option<Arc<Globals>> {
    GLOBALS.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

// ------------------------------------------------------------ thread state

enum AnyBh {
    Send(Bh),
    Local(LocalBh),
}

impl AnyBh {
    fn schedule(&self) {
        match self {
            AnyBh::Send(b) => b.schedule(),
            AnyBh::Local(b) => b.schedule(),
        }
    }
    fn cancel(&self) {
        match self {
            AnyBh::Send(b) => b.cancel(),
            AnyBh::Local(b) => b.cancel(),
        }
    }
}

/// One thread's handles. Never borrowed across a library call: ops take
/// what they need out (or clone it) first.
struct World {
    ctxs: Vec<Option<AioContext>>,
    cos: Vec<Option<Coroutine<u64>>>,
    bhs: Vec<Option<Rc<AnyBh>>>,
    timers: Vec<Option<Rc<Timer>>>,
    fds: Vec<Option<(FdHandler<OwnedFd>, u8)>>,
    tasks: Vec<Option<Task<u64>>>,
    io: Vec<Option<IoThread>>,
    smol: Rc<smol::LocalExecutor<'static>>,
}

impl World {
    fn new(ctx0: Option<AioContext>) -> World {
        fn none<T>(n: u8) -> Vec<Option<T>> {
            (0..n).map(|_| None).collect()
        }
        let mut ctxs = none(CTXS);
        ctxs[0] = ctx0;
        World {
            ctxs,
            cos: none(COS),
            bhs: none(BHS),
            timers: none(TIMERS),
            fds: none(FDS),
            tasks: none(TASKS),
            io: none(IOTHREADS),
            smol: Rc::new(smol::LocalExecutor::new()),
        }
    }
}

thread_local! {
    static WORLD: RefCell<Option<World>> = const { RefCell::new(None) };
    static DEPTH: Cell<u32> = const { Cell::new(0) };
}

/// Runs `f` on this thread's handles; `None` if there are none (or they
/// are borrowed further up this stack, or destroyed).
fn with<R>(f: impl FnOnce(&mut World) -> R) -> Option<R> {
    WORLD
        .try_with(|w| {
            let mut w = w.try_borrow_mut().ok()?;
            w.as_mut().map(f)
        })
        .ok()
        .flatten()
}

fn ctx(c: u8) -> Option<AioContext> {
    with(|w| w.ctxs[c as usize].clone()).flatten()
}

fn co(s: u8) -> Option<Coroutine<u64>> {
    with(|w| w.cos[s as usize].clone()).flatten()
}

/// Puts `v` in a slot; whatever was there is dropped after the borrow.
fn put<T>(slot: impl FnOnce(&mut World) -> &mut Option<T>, v: T) {
    let old = with(|w| slot(w).replace(v));
    drop(old);
}

fn take<T>(slot: impl FnOnce(&mut World) -> &mut Option<T>) -> Option<T> {
    with(|w| slot(w).take()).flatten()
}

/// Drops this thread's handles now (in field order).
fn drop_world() {
    let w = WORLD.try_with(|w| w.try_borrow_mut().ok().and_then(|mut w| w.take()));
    if let Ok(Some(w)) = w {
        let World {
            ctxs,
            cos,
            bhs,
            timers,
            fds,
            tasks,
            io,
            smol,
        } = w;
        drop(cos);
        drop(bhs);
        drop(timers);
        drop(fds);
        drop(tasks);
        drop(smol);
        drop(io);
        drop(ctxs);
    }
}

// ------------------------------------------------------------ the ops

/// Runs a body: the ops a callback, coroutine or future runs.
pub(crate) fn run_body(body: &[Op]) {
    let d = DEPTH.with(|d| d.get());
    if d > 8 {
        return;
    }
    DEPTH.with(|x| x.set(d + 1));
    struct Back(u32);
    impl Drop for Back {
        fn drop(&mut self) {
            let _ = DEPTH.try_with(|x| x.set(self.0));
        }
    }
    let _back = Back(d);
    for op in body {
        exec(op);
    }
}

fn coroutine_body(what: &'static str, body: Vec<Op>) -> impl FnOnce() -> u64 {
    let canary = Canary::local(what);
    move || {
        canary.check();
        run_body(&body);
        canary.id()
    }
}

fn callback(canary: Canary, body: Vec<Op>) -> impl FnMut() + Send + 'static {
    move || {
        canary.check();
        run_body(&body);
    }
}

fn us(us: u16) -> Duration {
    Duration::from_micros(us as u64)
}

fn dup(fd: &OwnedFd) -> Option<OwnedFd> {
    fd.try_clone().ok()
}

/// Runs one op on this thread.
pub(crate) fn exec(op: &Op) {
    call();
    match op {
        Op::Poll { c, blocking } => {
            if DEPTH.with(|d| d.get()) > 6 {
                return;
            }
            let Some(ctx) = ctx(*c) else { return };
            if *blocking {
                // Something must end the wait: a timer of our own.
                let t = ctx.timer_new(ClockType::Realtime, || {});
                t.mod_after(Duration::from_micros(200));
                ctx.poll(true);
                drop(t);
            } else {
                ctx.poll(false);
            }
        }
        Op::CtxNew { c, uring } => {
            let kind = if *uring && !no_uring() {
                FdMonitorKind::IoUring
            } else {
                FdMonitorKind::Epoll
            };
            match AioContext::builder().name("fuzz").fd_monitor(kind).build() {
                Ok(ctx) => put(|w| &mut w.ctxs[*c as usize], ctx),
                Err(e) => fail(format!("AioContext::build: {e}")),
            }
        }
        Op::CtxShutdown { c } => {
            if let Some(ctx) = ctx(*c) {
                ctx.shutdown();
            }
        }
        Op::CtxDrop { c } => drop(take(|w| &mut w.ctxs[*c as usize])),
        Op::CoNew { s, body } => {
            let co = Coroutine::new(coroutine_body("coroutine", body.clone()));
            put(|w| &mut w.cos[*s as usize], co);
        }
        Op::CoEnter { s } => {
            if let Some(co) = co(*s) {
                if !co.is_finished() {
                    co.enter_if_inactive();
                }
            }
        }
        Op::CoWake { s } => {
            if let Some(co) = co(*s) {
                co.wake();
            }
        }
        Op::CoSchedule { s, c } => {
            if let (Some(co), Some(ctx)) = (co(*s), ctx(*c)) {
                ctx.co_schedule(&co);
            }
        }
        Op::CoDetach { s } => {
            if let Some(co) = take(|w| &mut w.cos[*s as usize]) {
                co.detach();
            }
        }
        Op::CoCancel { s } => {
            if let Some(co) = co(*s) {
                co.cancel();
            }
        }
        Op::CoDrop { s } => drop(take(|w| &mut w.cos[*s as usize])),
        Op::BhNew { s, c, local, body } => {
            let Some(ctx) = ctx(*c) else { return };
            let bh = if *local {
                AnyBh::Local(ctx.bh_new_local(callback(Canary::local("local bh"), body.clone())))
            } else {
                AnyBh::Send(ctx.bh_new(callback(Canary::sendable("bh"), body.clone())))
            };
            put(|w| &mut w.bhs[*s as usize], Rc::new(bh));
        }
        Op::BhSchedule { s } => {
            if let Some(bh) = with(|w| w.bhs[*s as usize].clone()).flatten() {
                bh.schedule();
            }
        }
        Op::BhCancel { s } => {
            if let Some(bh) = with(|w| w.bhs[*s as usize].clone()).flatten() {
                bh.cancel();
            }
        }
        Op::BhDrop { s } => drop(take(|w| &mut w.bhs[*s as usize])),
        Op::BhOneshot { c, body } => {
            if let Some(ctx) = ctx(*c) {
                let f = callback(Canary::sendable("oneshot bh"), body.clone());
                ctx.bh_schedule_oneshot(f);
            }
        }
        Op::TimerNew { s, c, body } => {
            let Some(ctx) = ctx(*c) else { return };
            let t = ctx.timer_new(
                ClockType::Realtime,
                callback(Canary::local("timer"), body.clone()),
            );
            put(|w| &mut w.timers[*s as usize], Rc::new(t));
        }
        Op::TimerMod { s, us: d } => {
            if let Some(t) = with(|w| w.timers[*s as usize].clone()).flatten() {
                t.mod_after(us(*d));
            }
        }
        Op::TimerDel { s } => {
            if let Some(t) = with(|w| w.timers[*s as usize].clone()).flatten() {
                t.del();
            }
        }
        Op::TimerDrop { s } => drop(take(|w| &mut w.timers[*s as usize])),
        Op::FdAdd { s, c, body } => {
            let (Some(ctx), Some(g)) = (ctx(*c), g()) else {
                return;
            };
            let Some(fd) = dup(&g.pipe0) else { return };
            let mut cb = callback(Canary::local("fd handler"), body.clone());
            let g2 = g.clone();
            let read: Box<dyn FnMut()> = Box::new(move || {
                drain(&g2.pipe0);
                cb();
            });
            match ctx.set_fd_handler(fd, false, Some(read), None, None) {
                Ok(h) => put(|w| &mut w.fds[*s as usize], (h, *c)),
                Err(e) => refused(&ctx, "set_fd_handler", e),
            }
        }
        Op::FdModify { s } => {
            let Some((h, c)) = take(|w| &mut w.fds[*s as usize]) else {
                return;
            };
            let fd = h.remove();
            let (Some(ctx), Some(g)) = (ctx(c), g()) else {
                return;
            };
            let canary = Canary::local("fd handler (modified)");
            let read: Box<dyn FnMut()> = Box::new(move || {
                canary.check();
                drain(&g.pipe0);
            });
            let polls = Cell::new(0u32);
            let poll: Box<dyn FnMut() -> bool> = Box::new(move || {
                polls.set(polls.get() + 1);
                polls.get() % 3 == 0
            });
            match ctx.set_fd_handler(fd, false, Some(read), None, Some(poll)) {
                Ok(h) => put(|w| &mut w.fds[*s as usize], (h, c)),
                Err(e) => refused(&ctx, "set_fd_handler (modify)", e),
            }
        }
        Op::FdRemove { s } => {
            if let Some((h, _)) = take(|w| &mut w.fds[*s as usize]) {
                drop(h.remove());
            }
        }
        Op::Spawn { s, c, yields, body } => {
            let Some(ctx) = ctx(*c) else { return };
            let canary = Canary::sendable("spawned future");
            let body = body.clone();
            let n = *yields;
            let t = ctx.spawn(async move {
                for _ in 0..n {
                    smol::future::yield_now().await;
                }
                canary.check();
                run_body(&body);
                canary.id()
            });
            put(|w| &mut w.tasks[*s as usize], t);
        }
        Op::SpawnLocal { s, c, body } => {
            let Some(ctx) = ctx(*c) else { return };
            let f = coroutine_body("spawn_local coroutine", body.clone());
            let canary = Canary::local("spawn_local future");
            let t = ctx.spawn_local(async move {
                let r = CoroutineFuture::new(f).await;
                canary.check();
                r
            });
            put(|w| &mut w.tasks[*s as usize], t);
        }
        Op::SpawnCoroutine { s, c, body } => {
            let Some(ctx) = ctx(*c) else { return };
            let canary = Canary::sendable("spawn_coroutine closure");
            let body = body.clone();
            let t = ctx.spawn_coroutine(move || {
                canary.check();
                run_body(&body);
                canary.id()
            });
            put(|w| &mut w.tasks[*s as usize], t);
        }
        Op::TaskDrop { s } => drop(take(|w| &mut w.tasks[*s as usize])),
        Op::TaskDetach { s } => {
            if let Some(t) = take(|w| &mut w.tasks[*s as usize]) {
                t.detach();
            }
        }
        Op::SmolSpawn { body } => {
            let Some(ex) = with(|w| w.smol.clone()) else {
                return;
            };
            let f = coroutine_body("smol coroutine", body.clone());
            ex.spawn(CoroutineFuture::new(f)).detach();
        }
        Op::SmolTick { n } => {
            let Some(ex) = with(|w| w.smol.clone()) else {
                return;
            };
            for _ in 0..*n {
                if !ex.try_tick() {
                    break;
                }
            }
        }
        Op::BlockOn { c, body } => {
            let Some(ctx) = ctx(*c) else { return };
            let f = coroutine_body("block_on coroutine", body.clone());
            ctx.block_on(CoroutineFuture::new(f));
        }
        Op::Signal { k } => {
            if let Some(g) = g() {
                let _ = g.signals[*k as usize].0.try_send(());
            }
        }
        Op::CoSleepWake { k } => {
            if let Some(g) = g() {
                g.sleeps[*k as usize].wake();
            }
        }
        Op::QueueNext => {
            if let Some(g) = g() {
                g.queue.next();
            }
        }
        Op::QueueRestartAll => {
            if let Some(g) = g() {
                g.queue.restart_all();
            }
        }
        Op::Export { what, s, x } => {
            let item = match what {
                0 => ctx(*s % CTXS).map(Item::Ctx),
                1 => co(*s % COS).map(|co| Item::Remote(co.remote())),
                2 => {
                    // A `Send` BH moves to the exchange (it is not `Clone`).
                    with(|w| {
                        let slot = &mut w.bhs[(*s % BHS) as usize];
                        match slot.take() {
                            Some(b) => match Rc::try_unwrap(b) {
                                Ok(AnyBh::Send(b)) => Some(Item::Bh(b)),
                                Ok(local) => {
                                    *slot = Some(Rc::new(local));
                                    None
                                }
                                Err(rc) => {
                                    *slot = Some(rc);
                                    None
                                }
                            },
                            None => None,
                        }
                    })
                    .flatten()
                }
                3 => co(*s % COS).map(|co| Item::Waker(co.waker())),
                _ => take(|w| &mut w.tasks[(*s % TASKS) as usize]).map(Item::Task),
            };
            let (Some(item), Some(g)) = (item, g()) else {
                return;
            };
            let old = g.exchange.lock().unwrap()[*x as usize].replace(item);
            drop(old);
        }
        Op::ImportDrop { x } => {
            if let Some(g) = g() {
                let old = g.exchange.lock().unwrap()[*x as usize].take();
                drop(old);
            }
        }
        Op::ImportUse { x } => {
            let Some(g) = g() else { return };
            let item = g.exchange.lock().unwrap()[*x as usize].take();
            match &item {
                Some(Item::Ctx(ctx)) => {
                    ctx.notify();
                    let c1 = Canary::sendable("imported oneshot bh");
                    ctx.bh_schedule_oneshot(move || c1.check());
                    let c2 = Canary::sendable("imported spawn");
                    ctx.spawn(async move { c2.check() }).detach();
                }
                Some(Item::Remote(r)) => r.wake(),
                Some(Item::Bh(b)) => b.schedule(),
                Some(Item::Waker(w)) => w.wake_by_ref(),
                Some(Item::Task(t)) => {
                    let _ = t.is_finished();
                }
                None => {}
            }
            // Back where it was, unless another was put there meanwhile.
            let mut ex = g.exchange.lock().unwrap();
            let back = if ex[*x as usize].is_none() {
                ex[*x as usize] = item;
                None
            } else {
                item
            };
            drop(ex);
            drop(back);
        }
        Op::IoThreadNew { i } => match IoThread::spawn("fuzz-io") {
            Ok(io) => put(|w| &mut w.io[*i as usize], io),
            Err(e) => fail(format!("IoThread::spawn: {e}")),
        },
        Op::IoThreadRun { i, body } => {
            let Some(ctx) =
                with(|w| w.io[*i as usize].as_ref().map(|io| io.context().clone())).flatten()
            else {
                return;
            };
            let mut f = callback(Canary::sendable("iothread bh"), body.clone());
            ctx.bh_schedule_oneshot(move || {
                ensure_world();
                f()
            });
        }
        Op::IoThreadStop { i } => {
            let Some(ctx) =
                with(|w| w.io[*i as usize].as_ref().map(|io| io.context().clone())).flatten()
            else {
                return;
            };
            // Its handles go on its own thread first, while it runs.
            let (tx, rx) = mpsc::channel();
            ctx.bh_schedule_oneshot(move || {
                drop_world();
                let _ = tx.send(());
            });
            drop(ctx);
            let _ = rx.recv_timeout(Duration::from_secs(10));
            // `stop` joins the thread.
            let io = take(|w| &mut w.io[*i as usize]);
            if let Some(io) = &io {
                io.stop();
            }
            drop(io);
        }
        Op::IoThreadDrop { i } => drop(take(|w| &mut w.io[*i as usize])),
        Op::Misuse { which } => misuse(*which),
        Op::Suspend => coroutine::suspend(),
        Op::Yield => coroutine::yield_now(),
        Op::Sleep { us: d } => coroutine::sleep(us(*d)),
        Op::CoSleepWait { k, us: d } => {
            let Some(g) = g() else { return };
            match d {
                None => g.sleeps[*k as usize].sleep(),
                Some(d) => {
                    g.sleeps[*k as usize].sleep_for(ClockType::Realtime, us(*d));
                }
            }
        }
        Op::Lock { m, body } => {
            let Some(g) = g() else { return };
            let m = *m as usize;
            let _guard = g.mutexes[m].lock();
            if g.held[m].swap(true, Ordering::SeqCst) {
                fail(format!("CoMutex {m}: two holders at once"));
            }
            let _held = Held(&g.held[m]);
            run_body(body);
        }
        Op::Read { body } => {
            let Some(g) = g() else { return };
            let _guard = g.rw.read();
            if g.writer.load(Ordering::SeqCst) {
                fail("CoRwLock: a reader while a writer holds it".into());
            }
            g.readers.fetch_add(1, Ordering::SeqCst);
            struct Reader<'a>(&'a AtomicI32);
            impl Drop for Reader<'_> {
                fn drop(&mut self) {
                    self.0.fetch_sub(1, Ordering::SeqCst);
                }
            }
            let _r = Reader(&g.readers);
            run_body(body);
        }
        Op::Write { body } => {
            let Some(g) = g() else { return };
            let _guard = g.rw.write();
            if g.writer.swap(true, Ordering::SeqCst) || g.readers.load(Ordering::SeqCst) != 0 {
                fail("CoRwLock: a writer while another holder holds it".into());
            }
            struct Writer<'a>(&'a AtomicBool);
            impl Drop for Writer<'_> {
                fn drop(&mut self) {
                    self.0.store(false, Ordering::SeqCst);
                }
            }
            let _w = Writer(&g.writer);
            run_body(body);
        }
        Op::QueueWait => {
            if let Some(g) = g() {
                g.queue.wait_unlocked();
            }
        }
        Op::AwaitSignal { k } => {
            if let Some(g) = g() {
                let rx = g.signals[*k as usize].1.clone();
                drop(g);
                let _ = await_future(rx.recv());
            }
        }
        Op::AwaitTask { s, fallible } => {
            if let Some(t) = take(|w| &mut w.tasks[*s as usize]) {
                if *fallible {
                    let _ = await_future(t.fallible());
                } else {
                    let _ = await_future(t);
                }
            }
        }
        Op::PipeRead { how } => pipe_read(*how),
        Op::FileRead { how } => file_read(*how),
        Op::PoolWork { us: d } => {
            if let Some(ctx) = AioContext::current() {
                let d = us(*d);
                let c = Canary::sendable("pool work");
                ctx.thread_pool().submit_co(move || {
                    std::thread::sleep(d);
                    c.check();
                });
            }
        }
        Op::Join { s } => {
            if let Some(co) = co(*s) {
                let r = co.join();
                if let Err(e) = r {
                    let _ = (e.is_panic(), e.is_cancelled());
                }
            }
        }
        Op::LockTimeout { m, us: d, body } => {
            let Some(g) = g() else { return };
            let m = *m as usize;
            let Some(_guard) = g.mutexes[m].lock_timeout(us(*d).max(Duration::from_micros(1)))
            else {
                return;
            };
            if g.held[m].swap(true, Ordering::SeqCst) {
                fail(format!("CoMutex {m}: two holders at once (lock_timeout)"));
            }
            let _held = Held(&g.held[m]);
            run_body(body);
        }
        Op::QueueWaitTimeout { us: d } => {
            if let Some(g) = g() {
                g.queue
                    .wait_unlocked_timeout(us(*d).max(Duration::from_micros(1)));
            }
        }
        Op::Panic => panic!("fuzz: deliberate panic"),
        Op::ThreadExit => {}
    }
}

/// An `io::Error` from a call on `ctx`: expected only once it is shut down.
fn refused(ctx: &AioContext, api: &str, e: std::io::Error) {
    if !e.to_string().contains("shut down") {
        fail(format!("{api}: {e}"));
    }
    let _ = ctx;
}

/// Clears a lock's "held" flag when its holder lets go (also unwinding).
struct Held<'a>(&'a AtomicBool);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

fn drain(fd: &OwnedFd) {
    let mut b = [0u8; 64];
    let _ = (&File::from(fd.try_clone().unwrap())).read(&mut b);
}

/// A read whose buffer the kernel writes: the buffer lives on this
/// coroutine's stack and goes to the graveyard when the read is over
/// (returned, or unwound by a cancellation).
/// `COROLOOP_FUZZ_NO_URING=1`: no io_uring (valgrind emulates it only in
/// part): epoll contexts, io_uring reads become `CoFd` / thread-pool ones.
fn no_uring() -> bool {
    static NO: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *NO.get_or_init(|| std::env::var_os("COROLOOP_FUZZ_NO_URING").is_some())
}

fn pipe_read(how: u8) {
    let how = if no_uring() && (how == 1 || how == 2) {
        0
    } else {
        how
    };
    let Some(g) = g() else { return };
    let mut buf = KBuf::new();
    let r = match how {
        0 => {
            let Some(fd) = dup(&g.pipe0) else { return };
            drop(g);
            CoFd::new(fd).and_then(|mut f| f.read(buf.lent()))
        }
        1 => {
            let Some(ctx) = AioContext::current() else {
                return;
            };
            let fd = g.pipe1.try_clone();
            drop(g);
            match (ctx.linux_io_uring(), fd) {
                (Ok(u), Ok(fd)) => u.read_at(fd.as_fd(), buf.lent(), 0),
                _ => return,
            }
        }
        2 => {
            let Some(ctx) = AioContext::current() else {
                return;
            };
            let Some(fd) = dup(&g.pipe1) else { return };
            drop(g);
            let f = coroloop::aio::CoFile::with_mode(&ctx, File::from(fd), AioMode::IoUring);
            f.read_at(buf.lent(), 0)
        }
        _ => {
            let Some(fd) = dup(&g.pipe0) else { return };
            drop(g);
            match coroloop::io::yield_until_fd_readable(&fd) {
                Ok(()) => (&File::from(fd)).read(buf.lent()),
                Err(e) => Err(e),
            }
        }
    };
    if let Ok(n) = r {
        if n > KLEN {
            fail(format!("pipe read returned {n} > {KLEN}"));
        }
    }
}

fn file_read(how: u8) {
    let (Some(g), Some(ctx)) = (g(), AioContext::current()) else {
        return;
    };
    let Ok(file) = g.file.try_clone() else { return };
    drop(g);
    let mode = match how {
        0 => AioMode::Threads,
        1 if no_uring() => AioMode::Threads,
        1 => AioMode::IoUring,
        _ => AioMode::Native,
    };
    let f = coroloop::aio::CoFile::with_mode(&ctx, file, mode);
    let mut buf = KBuf::new();
    match f.read_at(buf.lent(), 512) {
        Ok(n) => {
            if n != KLEN || buf.lent().iter().any(|&b| b != FILE_BYTE) {
                fail(format!("CoFile ({mode}) read {n} bytes, or the wrong ones"));
            }
        }
        // Documented: a shut-down context (or an exiting thread) fails
        // new requests with an io::Error saying so.
        Err(e) if e.to_string().contains("shut down") || e.to_string().contains("exiting") => {}
        Err(e) => fail(format!("CoFile ({mode}) read: {e}")),
    }
}

pub(crate) const FILE_BYTE: u8 = 0x7E;

/// Calls the docs say panic, checking they do with their message.
fn misuse(which: u8) {
    let r = match which {
        0 if !coroutine::in_coroutine() => catch_unwind(coroutine::suspend),
        1 if !coroutine::in_coroutine() => catch_unwind(coroutine::yield_now),
        2 => {
            // A context of another thread, used off its home thread.
            let Some(g) = g() else { return };
            let ctx = match &g.exchange.lock().unwrap()[0] {
                Some(Item::Ctx(c)) if !c.is_home_thread() => c.clone(),
                _ => return,
            };
            drop(g);
            catch_unwind(AssertUnwindSafe(|| {
                drop(ctx.timer_new(ClockType::Realtime, || {}));
            }))
        }
        3 => {
            let Some(co) = co(0) else { return };
            if !co.is_finished() {
                return;
            }
            catch_unwind(AssertUnwindSafe(|| co.enter()))
        }
        _ => return,
    };
    match r {
        Ok(()) => fail(format!("misuse {which} was not refused")),
        Err(p) => {
            let msg = crate::common::payload_message(&*p);
            if !check::allowed(&msg) {
                fail(format!("misuse {which}: unexpected message: {msg}"));
            }
        }
    }
}

/// The handles of an IoThread's thread, made on first use there.
fn ensure_world() {
    let _ = WORLD.try_with(|w| {
        if let Ok(mut w) = w.try_borrow_mut() {
            if w.is_none() {
                *w = Some(World::new(AioContext::current()));
            }
        }
    });
}

// ------------------------------------------------------------ the conductor

enum Msg {
    Run(Op),
    Finish(u8),
}

fn hang_secs() -> u64 {
    std::env::var("COROLOOP_FUZZ_HANG_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30)
}

fn pipe(nonblocking: bool) -> (OwnedFd, OwnedFd) {
    let (r, w) = rustix::pipe::pipe().unwrap();
    let set = |fd: &OwnedFd| {
        let fl = rustix::fs::fcntl_getfl(fd).unwrap();
        rustix::fs::fcntl_setfl(fd, fl | rustix::fs::OFlags::NONBLOCK).unwrap();
    };
    if nonblocking {
        set(&r);
    }
    set(&w); // the feeder never blocks
    (r, w)
}

fn data_file() -> File {
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("api_fuzz-{}.img", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    f.write_all(&[FILE_BYTE; 8192]).unwrap();
    let _ = std::fs::remove_file(&path);
    f
}

/// Runs `p` and returns its failures (empty: clean). `label` names it in
/// a hang report, which ends the process (its threads are stuck).
pub(crate) fn run_program(p: &Program, label: &str) -> Vec<String> {
    // One program at a time in this process (the tests of this binary run
    // in parallel; the bookkeeping is global).
    static ONE: Mutex<()> = Mutex::new(());
    let _one = ONE.lock().unwrap_or_else(|e| e.into_inner());
    check::begin();
    let (r0, w0) = pipe(true);
    let (r1, w1) = pipe(false);
    let globals = Arc::new(Globals {
        mutexes: [CoMutex::new(()), CoMutex::new(())],
        held: [AtomicBool::new(false), AtomicBool::new(false)],
        rw: CoRwLock::new(()),
        readers: AtomicI32::new(0),
        writer: AtomicBool::new(false),
        queue: CoQueue::new(),
        sleeps: [CoSleep::new(), CoSleep::new()],
        signals: (0..SIGNALS).map(|_| async_channel::unbounded()).collect(),
        pipe0: r0,
        pipe1: r1,
        file: data_file(),
        exchange: Mutex::new((0..EXCHANGE).map(|_| None).collect()),
    });
    *GLOBALS.lock().unwrap() = Some(globals);

    // The feeder: pipe data at random moments, so reads complete (or would
    // land late) while the program runs.
    let stop = Arc::new(AtomicBool::new(false));
    let feeder = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut a, mut b) = (File::from(w0), File::from(w1));
            while !stop.load(Ordering::Relaxed) {
                let _ = a.write(&[0xAB; 8]);
                let _ = b.write(&[0xAB; 8]);
                std::thread::sleep(Duration::from_micros(300));
            }
        })
    };

    let hang = Duration::from_secs(hang_secs());
    let mut workers = Vec::new();
    for t in 0..THREADS {
        let (tx, rx) = mpsc::channel::<Msg>();
        let (ack_tx, ack_rx) = mpsc::channel::<()>();
        let h = std::thread::Builder::new()
            .name(format!("fuzz-{t}"))
            .spawn(move || worker(rx, ack_tx))
            .unwrap();
        workers.push(Some((tx, ack_rx, h)));
    }
    let hung = |what: String| -> ! {
        eprintln!("api_fuzz: HANG ({label}): {what} did not finish within {hang:?}");
        eprintln!("program:\n{}", to_rust(p));
        std::process::exit(3);
    };
    for (i, (t, op)) in p.steps.iter().enumerate() {
        let Some((tx, ack, _)) = &workers[*t as usize] else {
            continue;
        };
        if tx.send(Msg::Run(op.clone())).is_err() {
            continue;
        }
        if ack.recv_timeout(hang).is_err() {
            hung(format!("step {i} on thread {t} ({op:?})"));
        }
        if *op == Op::ThreadExit {
            let (_, _, h) = workers[*t as usize].take().unwrap();
            join(h, hang).unwrap_or_else(|| hung(format!("thread {t}'s exit")));
        }
    }
    for (t, w) in workers.iter_mut().enumerate() {
        if let Some((tx, _, h)) = w.take() {
            let _ = tx.send(Msg::Finish(p.finish[t]));
            join(h, hang).unwrap_or_else(|| hung(format!("thread {t}'s finish")));
        }
    }
    // Handles still in the exchange go here: off their home threads.
    let g = GLOBALS.lock().unwrap().take();
    if let Some(g) = &g {
        let items: Vec<Option<Item>> = std::mem::take(&mut *g.exchange.lock().unwrap());
        drop(items);
    }
    drop(g);
    // Kernel writes that would land late get a chance to.
    std::thread::sleep(Duration::from_micros(500));
    stop.store(true, Ordering::Relaxed);
    feeder.join().unwrap();
    check::end()
}

fn join(h: std::thread::JoinHandle<()>, limit: Duration) -> Option<()> {
    let t0 = Instant::now();
    while !h.is_finished() {
        if t0.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    if h.join().is_err() {
        fail("a worker thread panicked outside its steps".into());
    }
    Some(())
}

fn worker(rx: mpsc::Receiver<Msg>, ack: mpsc::Sender<()>) {
    // First thread-local used: destroyed after coroloop's.
    WORLD.with(|w| *w.borrow_mut() = Some(World::new(None)));
    match AioContext::new() {
        Ok(ctx) => put(|w| &mut w.ctxs[0], ctx),
        Err(e) => fail(format!("AioContext::new: {e}")),
    }
    for msg in rx {
        match msg {
            Msg::Run(Op::ThreadExit) => {
                let _ = ack.send(());
                return; // the handles go with the thread's locals
            }
            Msg::Run(op) => {
                let _ = catch_unwind(AssertUnwindSafe(|| exec(&op)));
                let _ = ack.send(());
            }
            Msg::Finish(mode) => {
                let r = catch_unwind(AssertUnwindSafe(|| match mode {
                    0 => {
                        let ctxs: Vec<AioContext> =
                            with(|w| w.ctxs.iter().flatten().cloned().collect())
                                .unwrap_or_default();
                        for c in ctxs {
                            c.shutdown();
                        }
                        drop_world();
                    }
                    1 => drop_world(),
                    _ => {}
                }));
                drop(r);
                return;
            }
        }
    }
}
