//! `Task` and `FallibleTask`: the handles of tasks spawned on an
//! AioContext (`spawn`, `spawn_local`, `spawn_coroutine`).
//!
//! They wrap async-task's handles for one reason: a task can end without
//! an output, when its context shuts down before it finished (or it was
//! spawned on a context already shut down). async-task's `Task` then
//! panics with "Task polled after completion", which does not say what
//! happened; ours says the context shut down and names the fallible form.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// The panic message of a [`Task`] awaited after its context shut down
/// before the task finished.
pub(crate) const SHUT_DOWN_MSG: &str = "coroloop Task: the AioContext shut down before the task \
                                        finished (await `task.fallible()` to get `None` instead)";

/// The handle of a task spawned on an [`AioContext`](super::AioContext)
/// ([`spawn`](super::AioContext::spawn),
/// [`spawn_local`](super::AioContext::spawn_local),
/// [`spawn_coroutine`](super::AioContext::spawn_coroutine)): a future of
/// the task's output, awaitable from any thread and any executor.
///
/// As with async-task's `Task`, which it wraps:
///
/// * dropping the handle cancels the task (its future is dropped by the
///   context, a spawned coroutine is unwound); [`detach`](Self::detach)
///   lets it run to the end instead;
/// * [`cancel`](Self::cancel) cancels it and waits until it stopped;
/// * a panic inside the task is re-raised where the handle is awaited
///   (also through [`fallible`](Self::fallible)); the context is not
///   affected.
///
/// A task can also end without an output: when its context shuts down
/// ([`AioContext::shutdown`](super::AioContext::shutdown),
/// [`IoThread::stop`](super::IoThread::stop), the last handle dropped)
/// before the task finished, or when it was spawned on a context already
/// shut down, in which case the handle is resolved at once. Awaiting the
/// `Task` then panics with:
///
/// ```text
/// coroloop Task: the AioContext shut down before the task finished (await `task.fallible()` to get `None` instead)
/// ```
///
/// Where the context may shut down first (a task on an [`IoThread`]
/// that may be stopped), await [`task.fallible()`](Self::fallible), which
/// gives `None` in that case.
///
/// [`IoThread`]: super::IoThread
///
/// # Examples
///
/// ```
/// use coroloop::aio::IoThread;
///
/// let io = IoThread::spawn("tasks")?;
/// let task = io.context().spawn(async { 6 * 7 });
/// assert_eq!(smol::block_on(task.fallible()), Some(42));
///
/// io.stop();
/// // The context is shut down: the task is refused at once.
/// let task = io.context().spawn(async { 1 });
/// assert_eq!(smol::block_on(task.fallible()), None);
/// # std::io::Result::Ok(())
/// ```
#[must_use = "dropping a Task cancels the task; call `.detach()` to let it run to the end"]
pub struct Task<T> {
    task: async_task::FallibleTask<T>,
    /// The output was handed out: a later poll is a misuse, not a
    /// shutdown.
    done: bool,
}

impl<T> Task<T> {
    pub(crate) fn new(task: async_task::Task<T>) -> Task<T> {
        Task {
            task: task.fallible(),
            done: false,
        }
    }

    /// Lets the task run to the end in the background; its output is
    /// dropped. (It still ends early if its context shuts down.)
    pub fn detach(self) {
        self.task.detach()
    }

    /// Cancels the task and waits until it stopped running: its future is
    /// dropped by the context (a spawned coroutine is unwound). Returns
    /// the output if the task had completed just before, else `None`
    /// (also when its context had shut down).
    pub async fn cancel(self) -> Option<T> {
        self.task.cancel().await
    }

    /// A future of `Some(output)`, or of `None` if the task ended without
    /// an output because its context shut down (see [`Task`]). A panic in
    /// the task is still re-raised.
    ///
    /// # Examples
    ///
    /// ```
    /// use coroloop::aio::AioContext;
    ///
    /// let ctx = AioContext::new()?;
    /// let task = ctx.spawn(async { 5 });
    /// assert_eq!(ctx.block_on(task.fallible()), Some(5));
    ///
    /// let task = ctx.spawn(std::future::pending::<()>());
    /// ctx.shutdown();
    /// assert_eq!(ctx.block_on(task.fallible()), None);
    /// # std::io::Result::Ok(())
    /// ```
    pub fn fallible(self) -> FallibleTask<T> {
        FallibleTask { task: self.task }
    }

    /// Whether the task has finished: completed (its output may not be
    /// taken yet) or cancelled. Another thread may finish it right after
    /// this returns `false`.
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

impl<T> Future for Task<T> {
    type Output = T;

    /// The output; a panic of the task is re-raised here.
    ///
    /// # Panics
    ///
    /// If the context shut down before the task finished (see [`Task`]),
    /// and if polled again after it returned the output.
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        if self.done {
            polled_after_completion();
        }
        match Pin::new(&mut self.task).poll(cx) {
            Poll::Ready(Some(v)) => {
                self.done = true;
                Poll::Ready(v)
            }
            Poll::Ready(None) => shut_down(),
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cold]
#[inline(never)]
fn shut_down() -> ! {
    panic!("{SHUT_DOWN_MSG}")
}

#[cold]
#[inline(never)]
fn polled_after_completion() -> ! {
    panic!("coroloop Task polled after it returned its output")
}

impl<T> fmt::Debug for Task<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Task")
            .field("finished", &self.is_finished())
            .finish_non_exhaustive()
    }
}

/// A [`Task`] whose output is an `Option`: `None` when the task ended
/// without an output because its context shut down. From
/// [`Task::fallible`]. Dropping it cancels the task, as dropping the
/// `Task` does.
#[must_use = "dropping a FallibleTask cancels the task; call `.detach()` to let it run to the end"]
pub struct FallibleTask<T> {
    task: async_task::FallibleTask<T>,
}

impl<T> FallibleTask<T> {
    /// As [`Task::detach`].
    pub fn detach(self) {
        self.task.detach()
    }

    /// As [`Task::cancel`].
    pub async fn cancel(self) -> Option<T> {
        self.task.cancel().await
    }

    /// As [`Task::is_finished`].
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

impl<T> Future for FallibleTask<T> {
    type Output = Option<T>;

    /// `Some(output)`, or `None` if the context shut down before the task
    /// finished. A panic of the task is re-raised here.
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        Pin::new(&mut self.task).poll(cx)
    }
}

impl<T> fmt::Debug for FallibleTask<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FallibleTask")
            .field("finished", &self.is_finished())
            .finish_non_exhaustive()
    }
}
