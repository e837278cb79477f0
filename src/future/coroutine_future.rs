//! `CoroutineFuture`: a coroutine driven by whatever polls it.

use std::cell::Cell;
use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};

use atomic_waker::AtomicWaker;
use concurrent_queue::ConcurrentQueue;

use crate::aio::{AioContext, Inner};
use crate::coroutine::{
    self, enter_request, CoList, CoReqKind, Coroutine, Erased, RemoteRef, Request, Resumer,
};

/// The resumer of a `CoroutineFuture`: a queue that any thread may push
/// to, and the task waker of whoever polls the future.
pub(crate) struct FutureResumer {
    /// The future's own coroutine (its header address, set once created):
    /// its requests skip the queue and only set `main_req`.
    main: AtomicUsize,
    /// Pending requests of the main coroutine: `SCHEDULE` | `WAKE`.
    main_req: AtomicU8,
    /// Requests of the coroutines created inside it.
    /// Allocated at the first such request: an unbounded `ConcurrentQueue`
    /// is cache-line aligned (128 bytes), and an allocation that aligned
    /// costs `posix_memalign` (about 500 instructions) in every
    /// `CoroutineFuture::new` — most futures (every `spawn_coroutine` whose
    /// body creates no coroutine) never queue anything here.
    queue: std::sync::OnceLock<Box<ConcurrentQueue<(RemoteRef, CoReqKind)>>>,
    waker: AtomicWaker,
    /// Requests of the main coroutine made while our poll entered it (the
    /// direct path, see [`Direct`]): `SCHEDULE` | `WAKE` as in `main_req`,
    /// and `AWAIT` (it waits in `await_future` on a future polled with the
    /// executor's waker). The next poll enters it. Written only on the home
    /// thread inside the poll, so without read-modify-writes (an atomic only
    /// because the resumer is shared as `Send + Sync`).
    direct_req: AtomicU8,
    /// Set while the future is being polled (home thread only).
    polling: AtomicBool,
    /// The context current when the future was first polled (else when it
    /// was created): its timers, fd handlers and thread pool serve the
    /// coroutines inside. Set once, by the first poll.
    polled_ctx: std::sync::OnceLock<Option<Weak<Inner>>>,
    created_ctx: Option<Weak<Inner>>,
    /// Every coroutine the future resumes: cancelled when it is dropped.
    list: CoList,
    /// The coroutines it owns: created inside it, their last handle gone.
    owned: Owned,
}

/// Coroutines owned by a `CoroutineFuture`'s resumer.
struct Owned(std::cell::RefCell<Vec<Coroutine<Erased>>>);

// SAFETY: only touched on the future's home thread (the future is !Send;
// `adopt` and `detached_finished` run on the home thread of the
// coroutines, which is the future's), like the coroutines' own fields.
unsafe impl Send for Owned {}
// SAFETY: as above.
unsafe impl Sync for Owned {}

impl FutureResumer {
    /// The queue of the coroutines created inside, allocated on first use.
    fn queue(&self) -> &ConcurrentQueue<(RemoteRef, CoReqKind)> {
        self.queue
            .get_or_init(|| Box::new(ConcurrentQueue::unbounded()))
    }
}

impl Resumer for FutureResumer {
    fn queue(&self, co: RemoteRef, kind: CoReqKind) {
        let main = self.main.load(Ordering::Relaxed);
        if co.header_addr() == main {
            // The main coroutine, queued while our poll is entering it (a
            // `yield_now`, a wake of itself): on the home thread, inside
            // the poll. Record it for the next poll without atomics and
            // wake the task through the poll's own waker, as an async
            // `yield_now` does (see `Direct`).
            let lent = DIRECT.try_with(Cell::get).ok().filter(|d| d.co == main);
            if let Some(d) = lent {
                let r = self.direct_req.load(Ordering::Relaxed);
                self.direct_req.store(r | req_bit(kind), Ordering::Relaxed);
                // SAFETY: lent by the poll that is entering the main
                // coroutine, blocked in `enter` beneath us (see `Direct`);
                // only read (no `&mut` to it exists: awaited futures get a
                // `Context` of their own, see `await_direct`).
                unsafe { &*(d.cx as *const Context<'_>) }
                    .waker()
                    .wake_by_ref();
                return;
            }
            // Release: pairs with the Acquire swap in `poll`.
            self.main_req.fetch_or(req_bit(kind), Ordering::Release);
        } else {
            let _ = self.queue().push((co, kind));
        }
        self.waker.wake();
    }

    fn event_loop(&self) -> Option<Arc<dyn std::any::Any + Send + Sync>> {
        let inner = match self.polled_ctx.get() {
            Some(Some(c)) => c.upgrade(),
            _ => self.created_ctx.as_ref().and_then(Weak::upgrade),
        }?;
        Some(inner)
    }

    fn coroutines(&self) -> Option<&CoList> {
        Some(&self.list)
    }

    fn adopt(&self, co: Coroutine<Erased>) -> Result<(), Coroutine<Erased>> {
        if self.list.is_closed() {
            return Err(co);
        }
        self.owned.0.borrow_mut().push(co);
        Ok(())
    }

    fn detached_finished(&self, addr: usize) {
        let co = {
            let mut owned = self.owned.0.borrow_mut();
            owned
                .iter()
                .position(|c| c.header_addr() == addr)
                .map(|i| owned.swap_remove(i))
        };
        // Dropped after the borrow ends: the handle's drop may run code.
        drop(co);
        // A finished future waits for the coroutines it owns: poll again.
        self.waker.wake();
    }

    fn admits_direct_entry(&self) -> bool {
        // While the future is polled, wakes between its coroutines run
        // them at once (or through wake-up lists), as QEMU's do; otherwise
        // they go through the queue, and the task is woken.
        self.polling.load(Ordering::Relaxed)
    }
}

const SCHEDULE: u8 = 1;
const WAKE: u8 = 2;
/// `direct_req` only: the main coroutine awaits through the direct path.
const AWAIT: u8 = 4;

fn req_bit(kind: CoReqKind) -> u8 {
    match kind {
        CoReqKind::Schedule => SCHEDULE,
        CoReqKind::Wake => WAKE,
    }
}

/// A coroutine as a [`Future`]: any executor can drive it, and the
/// coroutine inside may wait in every way a coroutine can (locks, queues,
/// [`await_future`](super::await_future), fd waits on the context that was
/// current at creation), without blocking the executor's thread.
///
/// The future is the coroutine's resumer and its exclusive owner (see
/// ARCHITECTURE.md's "Resumers"):
///
/// * polling enters the coroutine — and the coroutines created inside it
///   that were woken or scheduled meanwhile;
/// * whatever wakes it (a [`Waker`](std::task::Waker) from
///   [`Coroutine::waker`], a `CoQueue`, a `CoMutex` hand-off, another
///   thread) queues it and wakes the task that polls the future;
/// * the coroutines created inside it have the future as their resumer:
///   one whose last handle is dropped while it is suspended is taken over
///   by the future and runs on while the future is polled, and the future
///   completes only once those have finished too (so such a coroutine must
///   not wait for something that only happens after the future completes:
///   keep its handle, or `cancel()` it, instead);
/// * dropping the future cancels (unwinds) its coroutine and every
///   coroutine it resumes, whoever holds their handles (their destructors
///   run);
/// * a panic inside resurfaces from `poll`;
/// * if its coroutine is cancelled instead of returning (the `AioContext`
///   it waited on shut down, or `cancel()` on a handle of it), `poll`
///   panics with a message that says so: there is no value to return.
///
/// It is `!Send`, like the coroutine: a coroutine never changes thread.
/// **Instead of `tokio::spawn` or `smol::spawn`**, which may poll it on any
/// of their threads and do not accept it, use:
///
/// * `tokio::task::spawn_local` inside a `tokio::task::LocalSet` (or
///   `LocalSet::block_on` / `run_until`);
/// * `smol::LocalExecutor::spawn`, or any `block_on`;
/// * [`AioContext::spawn_local`](crate::aio::AioContext::spawn_local) or
///   [`AioContext::block_on`](crate::aio::AioContext::block_on);
/// * to start coroutine code from another thread and await it from there,
///   [`AioContext::spawn_coroutine`](crate::aio::AioContext::spawn_coroutine)
///   on an [`IoThread`](crate::aio::IoThread)'s context: it takes a `Send`
///   closure and returns a `Send` task (see the [guide](crate::guide),
///   "Tokio").
///
/// ```compile_fail,E0277
/// use coroloop::future::CoroutineFuture;
///
/// let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
/// rt.block_on(async {
///     // Refused: the future is not `Send`.
///     tokio::spawn(CoroutineFuture::new(|| 1 + 1)).await.unwrap()
/// });
/// ```
///
/// ```compile_fail,E0277
/// use coroloop::future::CoroutineFuture;
///
/// let task = smol::spawn(CoroutineFuture::new(|| 1 + 1));
/// assert_eq!(smol::block_on(task), 2);
/// ```
///
/// The same with a `LocalSet`:
///
/// ```
/// use coroloop::future::CoroutineFuture;
///
/// let rt = tokio::runtime::Builder::new_current_thread().build()?;
/// let local = tokio::task::LocalSet::new();
/// let two = local.block_on(&rt, async {
///     tokio::task::spawn_local(CoroutineFuture::new(|| 1 + 1)).await.unwrap()
/// });
/// assert_eq!(two, 2);
/// # std::io::Result::Ok(())
/// ```
///
/// # Examples
///
/// ```
/// use coroloop::{future::{await_future, CoroutineFuture}, coroutine};
///
/// let fut = CoroutineFuture::new(|| {
///     // Sequential code that waits on a future, deep in a call stack.
///     let x = await_future(async { 20 });
///     coroutine::yield_now();
///     x + 22
/// });
/// assert_eq!(smol::block_on(fut), 42);
/// ```
#[must_use = "futures do nothing unless polled"]
pub struct CoroutineFuture<T> {
    co: Coroutine<T>,
    res: Arc<FutureResumer>,
    started: bool,
}

// The future never pins its fields: the coroutine lives on its own stack.
impl<T> Unpin for CoroutineFuture<T> {}

impl<T: 'static> CoroutineFuture<T> {
    /// Wraps `f` in a coroutine with the default stack.
    ///
    /// # Panics
    ///
    /// If no stack can be mapped (see [`coroutine::Builder::build`]).
    #[track_caller]
    pub fn new<F>(f: F) -> CoroutineFuture<T>
    where
        F: FnOnce() -> T + 'static,
    {
        match CoroutineFuture::with_builder(coroutine::Builder::new(), f) {
            Ok(fut) => fut,
            Err(e) => panic!("CoroutineFuture::new: cannot create the coroutine: {e}"),
        }
    }

    /// Wraps `f` in a coroutine configured by `builder` (name, stack size).
    ///
    /// # Errors
    ///
    /// As [`coroutine::Builder::build`].
    pub fn with_builder<F>(builder: coroutine::Builder, f: F) -> io::Result<CoroutineFuture<T>>
    where
        F: FnOnce() -> T + 'static,
    {
        let res = Arc::new(FutureResumer {
            main: AtomicUsize::new(0),
            main_req: AtomicU8::new(0),
            queue: std::sync::OnceLock::new(),
            waker: AtomicWaker::new(),
            direct_req: AtomicU8::new(0),
            polling: AtomicBool::new(false),
            polled_ctx: std::sync::OnceLock::new(),
            created_ctx: AioContext::current().map(|c| Arc::downgrade(&c.inner)),
            list: CoList::new(),
            owned: Owned(Default::default()),
        });
        let r2 = res.clone();
        let co = builder.build(move || {
            // However it ends (returned, panicked, unwound) and whoever
            // entered it last, the task learns about it.
            struct WakeOnExit(Arc<FutureResumer>);
            impl Drop for WakeOnExit {
                fn drop(&mut self) {
                    self.0.waker.wake();
                }
            }
            let _exit = WakeOnExit(r2);
            f()
        })?;
        co.set_resumer(res.clone(), true);
        res.main.store(co.header_addr(), Ordering::Relaxed);
        Ok(CoroutineFuture {
            co,
            res,
            started: false,
        })
    }

    /// A waker for the coroutine inside (see [`Coroutine::waker`]).
    pub fn waker(&self) -> std::task::Waker {
        self.co.waker()
    }

    /// Whether the coroutine has finished.
    pub fn is_finished(&self) -> bool {
        self.co.is_finished()
    }
}

/// Clears the polling flag however `poll` ends.
struct Polling<'a>(&'a FutureResumer);

impl Drop for Polling<'_> {
    fn drop(&mut self) {
        self.0.polling.store(false, Ordering::Relaxed);
    }
}

/// What a `CoroutineFuture::poll` that is entering its main coroutine
/// lends it: the poll's `Context` and the future's `direct_req` flags.
///
/// An `await_future` in the main coroutine, entered by that poll, polls its
/// future with the executor's own waker (cloned into a `Context` on the
/// coroutine's stack, as an `.await` in an async block would get it)
/// instead of a waker of its own that queues the coroutine and then wakes
/// the task: the future's wake goes straight to the
/// executor, and the next poll of the `CoroutineFuture` enters the
/// coroutine, which polls the future again. This is the bare stack-switch
/// bridge; the general path (`Signal`) stays for every other coroutine.
///
/// Set only around the poll's `enter` of its main coroutine and restored
/// when `enter` returns (or unwinds), so whatever it names is alive: the
/// poll's frame, holding the `Context`, is blocked in `enter` beneath the
/// running code on this thread, and the future (holding the flag) outlives
/// its poll. A coroutine resumed any other way does not find itself here.
#[derive(Clone, Copy)]
pub(crate) struct Direct {
    /// Header address of the main coroutine being entered, or 0.
    co: usize,
    /// The poll's `&mut Context<'_>`, type-erased.
    cx: *mut (),
    /// The future's `direct_req` flags.
    reqs: *const AtomicU8,
}

impl Direct {
    /// Nothing lent.
    const NONE: Direct = Direct {
        co: 0,
        cx: std::ptr::null_mut(),
        reqs: std::ptr::null(),
    };
}

thread_local! {
    static DIRECT: Cell<Direct> = const {
        Cell::new(Direct::NONE)
    };
}

/// Restores the previous [`Direct`] when the main coroutine's `enter`
/// returns or unwinds. It lives on the poll's frame, which no suspension
/// outlives (`enter` returns before the poll does).
struct DirectGuard(Direct);

impl Drop for DirectGuard {
    fn drop(&mut self) {
        let _ = DIRECT.try_with(|d| d.set(self.0));
    }
}

/// Enters the main coroutine with the poll's `Context` lent to it.
fn enter_main<T>(co: &Coroutine<T>, res: &FutureResumer, cx: &mut Context<'_>) {
    let lend = Direct {
        co: co.header_addr(),
        cx: cx as *mut Context<'_> as *mut (),
        reqs: &res.direct_req,
    };
    let Ok(prev) = DIRECT.try_with(|d| d.replace(lend)) else {
        co.enter(); // thread teardown: no direct path
        return;
    };
    let _restore = DirectGuard(prev);
    co.enter();
}

/// `await_future`'s direct path, if the running coroutine is the main
/// coroutine of the `CoroutineFuture` whose poll entered it: polls `fut`
/// with that poll's waker until it is ready, suspending (the poll
/// returns `Pending`) in between. `None` (and `fut` back) otherwise.
#[inline]
pub(crate) fn await_direct<F: Future>(fut: F) -> Result<F::Output, F> {
    let me = coroutine::current_addr();
    let lent = || DIRECT.try_with(Cell::get).unwrap_or(Direct::NONE);
    let mut d = lent();
    if me == 0 || d.co != me {
        return Err(fut);
    }
    let mut fut = std::pin::pin!(fut);
    // The executor's waker, cloned into this frame, and a `Context` built
    // on it here, on the coroutine's own stack: the future never sees the
    // poll's `Context` itself. A future whose `poll` suspends the coroutine
    // (a coroutine wait inside `poll`) is resumed by a later poll, when the
    // lending poll's frame is gone; its `cx` must still be valid then.
    let mut waker: Option<std::task::Waker> = None;
    loop {
        // Resumed by anything but our future's poll (a stray wake entered
        // from elsewhere): not a grant, suspend again; the executor's
        // waker, which the future holds, brings the poll back.
        if d.co == me {
            // SAFETY: `d` was lent by the poll that entered this coroutine
            // and is blocked in `enter` beneath us (see `Direct`): its
            // `Context` is alive. It is only read here, briefly, to clone
            // its waker; nothing keeps a reference to it.
            let lent = unsafe { &*(d.cx as *const Context<'_>) }.waker();
            if !waker.as_ref().is_some_and(|w| w.will_wake(lent)) {
                waker = Some(lent.clone());
            }
            let Some(w) = waker.as_ref() else {
                unreachable!("set just above")
            };
            let mut cx = Context::from_waker(w);
            if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
                return Ok(v);
            }
            // SAFETY: the flags live in the future's resumer, which the
            // future keeps alive for as long as its poll runs.
            let reqs = unsafe { &*d.reqs };
            reqs.store(reqs.load(Ordering::Relaxed) | AWAIT, Ordering::Relaxed);
        }
        coroutine::suspend();
        d = lent();
    }
}

impl<T: 'static> Future for CoroutineFuture<T> {
    type Output = T;

    #[track_caller]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let this = self.get_mut();
        this.res.waker.register(cx.waker());
        this.res.polling.store(true, Ordering::Relaxed);
        let _polling = Polling(&this.res);
        if !this.started {
            this.started = true;
            // The context polling it now (a `block_on`, a `spawn_local`
            // task, a nested executor inside a loop) serves it, rather than
            // the one current where it was built (found by the API fuzzer:
            // a future built outside any loop and given to another
            // context's `block_on` put its timers on the thread's default
            // context, which nothing polled: a sleep that never ended).
            if let Some(c) = AioContext::current() {
                let _ = this.res.polled_ctx.set(Some(Arc::downgrade(&c.inner)));
            }
            enter_main(&this.co, &this.res, cx);
        } else {
            let req = if this.co.is_finished() {
                0 // finished (its coroutines may still run, below)
            } else {
                // Only a swap when a request may be there: the load is a
                // plain read, the swap a locked instruction.
                let mut req = if this.res.main_req.load(Ordering::Relaxed) != 0 {
                    this.res.main_req.swap(0, Ordering::Acquire)
                } else {
                    0
                };
                let own = this.res.direct_req.load(Ordering::Relaxed);
                if own != 0 {
                    this.res.direct_req.store(0, Ordering::Relaxed);
                    req |= own;
                }
                req
            };
            if req != 0 {
                if this.co.is_entered() {
                    // Polled from inside itself (a nested executor): later.
                    this.res.main_req.fetch_or(req, Ordering::Relaxed);
                    this.res.waker.wake();
                } else {
                    // Clear the flags the requests claimed (RMW, see
                    // `WakeFlag`; `AWAIT` claims none), then enter once.
                    if req & (SCHEDULE | WAKE) != 0 {
                        this.co
                            .release_request_flags(req & SCHEDULE != 0, req & WAKE != 0);
                    }
                    enter_main(&this.co, &this.res, cx);
                }
            }
            // The requests queued before this pass; later ones woke the
            // task again, so they get their own pass (no starvation of
            // the executor by a coroutine that keeps yielding).
            if let Some(queue) = this.res.queue.get() {
                let n = if queue.is_empty() { 0 } else { queue.len() };
                for _ in 0..n {
                    let Ok((r, kind)) = queue.pop() else {
                        break;
                    };
                    // SAFETY: the future is !Send, so this is the thread that
                    // created it and every coroutine inheriting its resumer.
                    if let Request::Busy(r, kind) = unsafe { enter_request(r, kind) } {
                        let _ = queue.push((r, kind));
                        this.res.waker.wake();
                    }
                }
            }
        }
        if this.co.is_finished() {
            if !this.res.owned.0.borrow().is_empty() {
                // Coroutines it took over (created inside, their handles
                // dropped) run on until they finish, as ARCHITECTURE.md's
                // "Who owns a coroutine" says: the future is done then.
                return Poll::Pending;
            }
            match this.co.take_result() {
                Some(v) => Poll::Ready(v),
                None => panic!(
                    "CoroutineFuture: its coroutine ended without a result: it was cancelled \
                     (the AioContext it waited on shut down, or `cancel()`), or it panicked \
                     while entered outside poll, or the future was polled after it completed"
                ),
            }
        } else {
            Poll::Pending
        }
    }
}

impl<T> Drop for CoroutineFuture<T> {
    /// Cancels the coroutine and every coroutine the future resumes (the
    /// ones created inside it), whoever owns them: nothing could resume
    /// them once the future is gone. Their destructors run here.
    fn drop(&mut self) {
        let panic = self.res.list.cancel_all();
        let owned = std::mem::take(&mut *self.res.owned.0.borrow_mut());
        drop(owned);
        if let Some(p) = panic {
            if std::thread::panicking() {
                log::error!(
                    "coroloop: a coroutine panicked while a CoroutineFuture was dropped during \
                     a panic; its panic is dropped"
                );
            } else {
                std::panic::resume_unwind(p);
            }
        }
    }
}

impl<T> fmt::Debug for CoroutineFuture<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CoroutineFuture")
            .field("started", &self.started)
            .field("finished", &self.co.is_finished())
            .finish()
    }
}
