//! Bridges between coroutines and Rust futures, both ways, on the same
//! threads.
//!
//! * [`CoroutineFuture`]: a coroutine body as a `Future` that any executor
//!   can poll (smol's `LocalExecutor`, tokio's `LocalSet`, a `block_on`).
//! * [`await_future`]: a future awaited inside a coroutine, which suspends
//!   until the future's waker fires.
//! * On [`AioContext`](crate::aio::AioContext):
//!   [`block_on`](crate::aio::AioContext::block_on),
//!   [`spawn`](crate::aio::AioContext::spawn),
//!   [`spawn_local`](crate::aio::AioContext::spawn_local),
//!   [`spawn_coroutine`](crate::aio::AioContext::spawn_coroutine) (tasks
//!   run as the context's own work items; their
//!   [`Task`](crate::aio::Task) handle's
//!   [`fallible()`](crate::aio::Task::fallible) gives `None` if the
//!   context shuts down first), and with the `smol` feature
//!   [`run_in_smol`](crate::aio::AioContext::run_in_smol) (the context
//!   driven from inside a smol executor).
//! * Futures that need a runtime's reactor (tokio's timers and sockets)
//!   work only where that runtime runs: inside coroutines on an
//!   `IoThread`, use [`coroutine::sleep`](crate::coroutine::sleep),
//!   [`net`](crate::net) or smol's `Timer`/`Async` (see the
//!   [guide](crate::guide), "Tokio").
//! * The coroutine locks serve async tasks too:
//!   [`CoMutex::lock_async`](crate::sync::CoMutex::lock_async),
//!   [`CoQueue::wait_async`](crate::sync::CoQueue::wait_async).
//!
//! # Examples
//!
//! A coroutine and async code sharing one thread and one lock:
//!
//! ```
//! use coroloop::{aio::AioContext, future::{await_future, CoroutineFuture}, sync::CoMutex};
//! use std::{rc::Rc, time::Duration};
//!
//! let ctx = AioContext::new()?;
//! let log = Rc::new(CoMutex::new(Vec::new()));
//! let l = log.clone();
//! let co = ctx.spawn_local(CoroutineFuture::new(move || {
//!     let mut g = l.lock();
//!     await_future(smol::Timer::after(Duration::from_millis(2))); // holds the lock
//!     g.push("coroutine");
//! }));
//! let l = log.clone();
//! let task = ctx.spawn_local(async move { l.lock_async().await.push("task") });
//! ctx.block_on(async { co.await; task.await });
//! assert_eq!(*log.try_lock().unwrap(), ["coroutine", "task"]);
//! # std::io::Result::Ok(())
//! ```

mod await_future;
mod coroutine_future;
#[cfg(feature = "smol")]
mod smol;

pub use await_future::await_future;
pub use coroutine_future::CoroutineFuture;
