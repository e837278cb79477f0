//! Joining coroutines: wait for one and take its result
//! ([`Coroutine::join`], `join_async` for async code), or for many in
//! completion order ([`JoinSet`]). QEMU has no join (its callers use
//! `AIO_WAIT_WHILE` on a flag); std, tokio and may do.

use std::any::Any;
use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use atomic_waker::AtomicWaker;

use super::header::{End, Header};
use super::Coroutine;

/// Why a joined coroutine gave no result.
pub enum JoinError {
    /// It panicked: the payload is its panic message (a `String`). The
    /// panic itself went, as always, to the code that resumed the
    /// coroutine; the joiner gets its message, as std's
    /// `JoinHandle::join` gives the panic of a thread.
    Panicked(Box<dyn Any + Send>),
    /// It was cancelled ([`Coroutine::cancel`], its context's shutdown, its
    /// `CoroutineFuture` dropped, or its thread exiting) before it
    /// returned.
    Cancelled,
}

impl JoinError {
    /// Whether the coroutine panicked.
    pub fn is_panic(&self) -> bool {
        matches!(self, JoinError::Panicked(_))
    }

    /// Whether the coroutine was cancelled.
    pub fn is_cancelled(&self) -> bool {
        matches!(self, JoinError::Cancelled)
    }

    /// The panic payload, to resume it with `std::panic::resume_unwind`.
    ///
    /// # Panics
    ///
    /// If the coroutine was cancelled, not panicked.
    pub fn into_panic(self) -> Box<dyn Any + Send> {
        match self {
            JoinError::Panicked(p) => p,
            JoinError::Cancelled => panic!("JoinError::into_panic: the coroutine was cancelled"),
        }
    }
}

impl fmt::Debug for JoinError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for JoinError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JoinError::Panicked(p) => {
                let msg = super::panic_text_of(Some(&**p));
                write!(f, "the joined coroutine panicked: {msg}")
            }
            JoinError::Cancelled => f.write_str("the joined coroutine was cancelled"),
        }
    }
}

impl std::error::Error for JoinError {}

/// Registers `w` to be woken when `h` finishes (home thread).
fn add_joiner(h: &Header, w: Waker) {
    let mut v = h.joiners.take();
    if !v.iter().any(|x| x.will_wake(&w)) {
        v.push(w);
    }
    h.joiners.set(v);
}

impl<T: 'static> Coroutine<T> {
    /// The outcome of a finished coroutine.
    fn outcome(&self, api: &str) -> Result<T, JoinError> {
        let h = self.header();
        match h.end.get() {
            End::Returned => match self.take_result() {
                Some(v) => Ok(v),
                None => panic!("{api}: the result was already taken (by `join` or `take_result`)"),
            },
            End::Panicked => {
                let text = h.panic_text.take();
                let msg: String = text.as_deref().unwrap_or("").to_string();
                h.panic_text.set(text);
                Err(JoinError::Panicked(Box::new(msg)))
            }
            End::Cancelled => Err(JoinError::Cancelled),
        }
    }

    /// Waits in the current coroutine until this one finished, and takes
    /// its result: `Err` if it panicked (with its message) or was
    /// cancelled. Does not start it: a coroutine that nothing enters is
    /// waited for until something does (`wake()` it to start it from its
    /// context). For async code see [`join_async`](Self::join_async).
    ///
    /// # Panics
    ///
    /// Outside a coroutine; if it joins itself or a coroutine that entered
    /// it (both would wait for ever); if the result was already taken.
    ///
    /// # Examples
    ///
    /// ```
    /// use coroloop::{coroutine::{self, Coroutine}, AioContext};
    /// use std::time::Duration;
    ///
    /// let ctx = AioContext::new()?;
    /// let parent = Coroutine::new(|| {
    ///     let child = Coroutine::new(|| {
    ///         coroutine::sleep(Duration::from_millis(1));
    ///         21
    ///     });
    ///     child.enter();
    ///     child.join().unwrap() * 2
    /// });
    /// parent.enter();
    /// ctx.poll_while(|| !parent.is_finished());
    /// assert_eq!(parent.take_result(), Some(42));
    /// # std::io::Result::Ok(())
    /// ```
    #[track_caller]
    pub fn join(&self) -> Result<T, JoinError> {
        let Some(me) = Coroutine::current() else {
            panic!("Coroutine::join called outside a coroutine (use join_async from async code)");
        };
        if me == *self {
            panic!("Coroutine::join: a coroutine cannot join itself");
        }
        if self.is_entered() {
            panic!(
                "Coroutine::join: joining a coroutine that entered this one would wait for ever"
            );
        }
        // No handle of itself may stay on its stack while it waits: that
        // would keep it alive when every other handle is gone (found by
        // the API fuzzer: such a joiner was never taken over nor
        // cancelled, and leaked).
        let mut waker = Some(me.waker());
        drop(me);
        while !self.is_finished() {
            if let Some(w) = waker.take() {
                add_joiner(self.header(), w);
            }
            super::suspend();
        }
        self.outcome("Coroutine::join")
    }

    /// A future that resolves to the result of this coroutine once it
    /// finished (as [`join`](Self::join)), for async code on its thread.
    pub fn join_async(&self) -> JoinFuture<'_, T> {
        JoinFuture { co: self }
    }
}

/// The future of [`Coroutine::join_async`].
#[must_use = "futures do nothing unless polled"]
pub struct JoinFuture<'a, T> {
    co: &'a Coroutine<T>,
}

impl<T> fmt::Debug for JoinFuture<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinFuture")
            .field("finished", &self.co.is_finished())
            .finish()
    }
}

impl<T: 'static> Future for JoinFuture<'_, T> {
    type Output = Result<T, JoinError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if self.co.is_finished() {
            return Poll::Ready(self.co.outcome("Coroutine::join_async"));
        }
        add_joiner(self.co.header(), cx.waker().clone());
        Poll::Pending
    }
}

/// What a `JoinSet`'s members tell it when they finish.
#[derive(Default)]
struct Done {
    ids: Mutex<VecDeque<u64>>,
    waiter: AtomicWaker,
}

/// The waker a member holds: records its id, then wakes the set's waiter.
struct MemberWaker {
    id: u64,
    done: Arc<Done>,
}

impl Wake for MemberWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.done
            .ids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(self.id);
        self.done.waiter.wake();
    }
}

/// A set of coroutines to wait for in completion order (tokio's
/// `JoinSet`): [`join_next`](Self::join_next) inside a coroutine,
/// [`join_next_async`](Self::join_next_async) in async code.
///
/// Dropping the set drops its handles, which does not cancel the
/// coroutines (see "Who owns a coroutine" in the crate docs): a suspended
/// one is taken over by its context and runs to completion. Call
/// [`cancel_all`](Self::cancel_all) to cancel them.
///
/// # Examples
///
/// ```
/// use coroloop::{coroutine::{self, JoinSet}, AioContext, Coroutine};
/// use std::time::Duration;
///
/// let ctx = AioContext::new()?;
/// let main = Coroutine::new(|| {
///     let mut set = JoinSet::new();
///     for i in 0..100u64 {
///         set.spawn(move || {
///             coroutine::sleep(Duration::from_micros(100 * (i % 7)));
///             i
///         });
///     }
///     let mut sum = 0;
///     while let Some(r) = set.join_next() {
///         sum += r.unwrap();
///     }
///     sum
/// });
/// main.enter();
/// ctx.poll_while(|| !main.is_finished());
/// assert_eq!(main.take_result(), Some(4950));
/// # std::io::Result::Ok(())
/// ```
pub struct JoinSet<T> {
    members: Vec<(u64, Coroutine<T>)>,
    next_id: u64,
    done: Arc<Done>,
}

impl<T> fmt::Debug for JoinSet<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinSet")
            .field("len", &self.members.len())
            .finish()
    }
}

impl<T: 'static> Default for JoinSet<T> {
    fn default() -> Self {
        JoinSet::new()
    }
}

impl<T: 'static> JoinSet<T> {
    /// An empty set.
    pub fn new() -> JoinSet<T> {
        JoinSet {
            members: Vec::new(),
            next_id: 0,
            done: Arc::default(),
        }
    }

    /// Creates a coroutine running `f`, adds it, and starts it as a
    /// [`wake`](Coroutine::wake) does: at once outside a coroutine, after
    /// the current coroutine suspends inside one.
    ///
    /// # Panics
    ///
    /// As [`Coroutine::new`].
    #[track_caller]
    pub fn spawn(&mut self, f: impl FnOnce() -> T + 'static) -> Coroutine<T> {
        let co = Coroutine::new(f);
        self.insert(co.clone());
        co.wake();
        co
    }

    /// Adds a coroutine (started or not; the set does not start it).
    pub fn insert(&mut self, co: Coroutine<T>) {
        let id = self.next_id;
        self.next_id += 1;
        let w = Waker::from(Arc::new(MemberWaker {
            id,
            done: self.done.clone(),
        }));
        if co.is_finished() {
            w.wake();
        } else {
            add_joiner(co.header(), w);
        }
        self.members.push((id, co));
    }

    /// How many coroutines the set holds (finished ones not joined yet
    /// included).
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Cancels every member ([`Coroutine::cancel`]); `join_next` then gives
    /// their outcomes (`Cancelled` for those that had not finished).
    pub fn cancel_all(&mut self) {
        for (_, co) in &self.members {
            co.cancel();
        }
    }

    /// The next finished member's outcome.
    fn take_done(&mut self) -> Option<Result<T, JoinError>> {
        loop {
            let id = self
                .done
                .ids
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pop_front()?;
            if let Some(i) = self.members.iter().position(|(m, _)| *m == id) {
                let (_, co) = self.members.swap_remove(i);
                return Some(co.outcome("JoinSet::join_next"));
            }
        }
    }

    /// Waits in the current coroutine for the next member to finish and
    /// returns its outcome, in completion order; `None` once the set is
    /// empty.
    ///
    /// # Panics
    ///
    /// Outside a coroutine (with members still running).
    #[track_caller]
    pub fn join_next(&mut self) -> Option<Result<T, JoinError>> {
        loop {
            if let Some(r) = self.take_done() {
                return Some(r);
            }
            if self.members.is_empty() {
                return None;
            }
            let Some(me) = Coroutine::current() else {
                panic!("JoinSet::join_next called outside a coroutine (use join_next_async)");
            };
            self.done.waiter.register(&me.waker());
            drop(me);
            // A member may have finished between the check and the
            // registration.
            if self
                .done
                .ids
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_empty()
            {
                super::suspend();
            }
        }
    }

    /// [`join_next`](Self::join_next) for async code.
    pub async fn join_next_async(&mut self) -> Option<Result<T, JoinError>> {
        std::future::poll_fn(|cx| {
            if let Some(r) = self.take_done() {
                return Poll::Ready(Some(r));
            }
            if self.members.is_empty() {
                return Poll::Ready(None);
            }
            self.done.waiter.register(cx.waker());
            match self.take_done() {
                Some(r) => Poll::Ready(Some(r)),
                None => Poll::Pending,
            }
        })
        .await
    }
}
