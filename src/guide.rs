//! Getting started: a guide in five short programs.
//!
//! Every example below is a doc test: it runs as written.
//!
//! # 1. The shape of a program
//!
//! A coroutine runs a closure on its own stack and may wait anywhere in its
//! call stack. Something must run it again when what it waits for happens:
//! that is an [`AioContext`], QEMU's event loop. A thread gets one with
//! [`AioContext::new`] and runs it with [`poll_while`](crate::AioContext::poll_while)
//! or [`block_on`](crate::AioContext::block_on); an [`IoThread`] is a thread that
//! does nothing else. A coroutine created on a thread where a context
//! exists belongs to that context: wakes from any thread queue it there,
//! and it runs on that thread only.
//!
//! ```
//! use coroloop::{coroutine, AioContext, Coroutine};
//! use std::time::Duration;
//!
//! let ctx = AioContext::new()?;
//! let co = Coroutine::new(|| {
//!     coroutine::sleep(Duration::from_millis(5)); // a timer of `ctx`
//!     "woke up"
//! });
//! co.enter(); // runs until the sleep, then returns here
//! ctx.poll_while(|| !co.is_finished()); // the loop runs until it is done
//! assert_eq!(co.take_result(), Some("woke up"));
//! # std::io::Result::Ok(())
//! ```
//!
//! # 2. A TCP echo server
//!
//! The server runs on an [`IoThread`]: one coroutine accepts, and each
//! connection gets a coroutine of its own that runs plain sequential code
//! (`BufRead::read_line`, `Write::write_all`) over a
//! [`net::TcpStream`](crate::net::TcpStream), whose reads and writes
//! suspend the coroutine instead of blocking the thread. The clients are
//! coroutines too, on this thread's context, gathered by a
//! [`JoinSet`](crate::coroutine::JoinSet).
//!
//! ```
//! use coroloop::coroutine::JoinSet;
//! use coroloop::net::{TcpListener, TcpStream};
//! use coroloop::{AioContext, Coroutine, IoThread};
//! use std::io::{BufRead, BufReader, Write};
//!
//! // The server.
//! let server = IoThread::spawn("echo")?;
//! let listener = TcpListener::bind("127.0.0.1:0")?; // non-blocking already
//! let addr = listener.local_addr()?;
//! server.context().bh_schedule_oneshot(move || {
//!     // On the IoThread: what is created here belongs to its context.
//!     Coroutine::new(move || {
//!         while let Ok((conn, _peer)) = listener.accept() {
//!             // Runs until it first waits; then the context owns it.
//!             Coroutine::new(move || {
//!                 let mut lines = BufReader::new(&conn);
//!                 let mut line = String::new();
//!                 while lines.read_line(&mut line).is_ok_and(|n| n > 0) {
//!                     if (&conn).write_all(line.as_bytes()).is_err() {
//!                         break;
//!                     }
//!                     line.clear();
//!                 }
//!             })
//!             .enter();
//!         }
//!     })
//!     .enter();
//! });
//!
//! // Three clients, as coroutines on this thread.
//! let ctx = AioContext::new()?;
//! let main = Coroutine::new(move || {
//!     let mut clients = JoinSet::new();
//!     for i in 0..3 {
//!         clients.spawn(move || -> std::io::Result<String> {
//!             let conn = TcpStream::connect(addr)?;
//!             writeln!(&conn, "hello from client {i}")?;
//!             let mut reply = String::new();
//!             BufReader::new(&conn).read_line(&mut reply)?;
//!             Ok(reply)
//!         });
//!     }
//!     let mut replies = Vec::new();
//!     while let Some(r) = clients.join_next() {
//!         replies.push(r.expect("the client did not panic").expect("no I/O error"));
//!     }
//!     replies.sort();
//!     replies
//! });
//! main.enter();
//! ctx.poll_while(|| !main.is_finished());
//! assert_eq!(
//!     main.take_result().unwrap(),
//!     ["hello from client 0\n", "hello from client 1\n", "hello from client 2\n"]
//! );
//! server.stop(); // unwinds the server's coroutines, joins the thread
//! # std::io::Result::Ok(())
//! ```
//!
//! `examples/echo.rs` is the same server with 64 clients and idle
//! timeouts ([`TcpStream::set_read_timeout`](crate::net::TcpStream::set_read_timeout)).
//!
//! # 3. Coroutines and smol side by side
//!
//! Coroutines and async tasks share a thread, a loop and the same locks.
//! A coroutine awaits a future with
//! [`await_future`](crate::future::await_future) (it suspends until the
//! future's waker fires); async code awaits a coroutine by wrapping it in a
//! [`CoroutineFuture`](crate::future::CoroutineFuture). Here an async task
//! sends numbers over an `async_channel`, a coroutine receives them with
//! sequential code and keeps a total under a
//! [`CoMutex`](crate::sync::CoMutex) that the task also locks, with
//! `lock_async`.
//!
//! ```
//! use coroloop::future::{await_future, CoroutineFuture};
//! use coroloop::sync::CoMutex;
//! use coroloop::AioContext;
//! use std::rc::Rc;
//! use std::time::Duration;
//!
//! let ctx = AioContext::new()?;
//! let total = Rc::new(CoMutex::new(0u64));
//! let (tx, rx) = async_channel::bounded::<u64>(4);
//!
//! // An async task: smol's timer, an async channel, the lock's async side.
//! let t = total.clone();
//! let producer = ctx.spawn_local(async move {
//!     for i in 1..=10 {
//!         smol::Timer::after(Duration::from_micros(100)).await;
//!         tx.send(i).await.unwrap();
//!     }
//!     *t.lock_async().await += 1000;
//! });
//!
//! // A coroutine: the same channel and lock, from sequential code.
//! let t = total.clone();
//! let consumer = ctx.spawn_local(CoroutineFuture::new(move || {
//!     while let Ok(i) = await_future(rx.recv()) {
//!         *t.lock() += i;
//!     }
//! }));
//!
//! ctx.block_on(async { producer.await; consumer.await });
//! assert_eq!(*total.try_lock().unwrap(), 1000 + 55);
//! # std::io::Result::Ok(())
//! ```
//!
//! The other way round, a smol executor can drive the context:
//! [`AioContext::run_in_smol`] is a future that runs the context's
//! callbacks and coroutines whenever its fd is ready, so one
//! `smol::block_on` serves both. `examples/smol_mix.rs` runs a smol TCP
//! server and coroutine clients that way.
//!
//! # 4. File I/O with `CoFile`
//!
//! [`CoFile`](crate::aio::CoFile) reads and writes at offsets from a
//! coroutine, through the context's thread pool (the default, QEMU's
//! `aio=threads`), io_uring (`aio=io_uring`) or Linux AIO (`aio=native`,
//! for `O_DIRECT` files). An engine the kernel refuses falls back to the
//! thread pool with a log line; [`CoFile::try_with_mode`](crate::aio::CoFile::try_with_mode)
//! returns the error instead.
//!
//! ```
//! use coroloop::aio::{AioMode, CoFile};
//! use coroloop::{AioContext, Coroutine};
//!
//! let ctx = AioContext::new()?;
//! let path = std::env::temp_dir().join(format!("coroloop-guide-{}", std::process::id()));
//! let file = std::fs::OpenOptions::new()
//!     .read(true).write(true).create(true).truncate(true)
//!     .open(&path)?;
//! let f = CoFile::with_mode(&ctx, file, AioMode::IoUring);
//! let co = Coroutine::new(move || -> std::io::Result<String> {
//!     f.write_all_at(b"hello, ", 0)?; // suspends until the write is done
//!     f.write_all_at(b"file", 7)?;
//!     f.fdatasync()?;
//!     let mut buf = [0u8; 11];
//!     f.read_exact_at(&mut buf, 0)?;
//!     Ok(format!("{} via {}", String::from_utf8_lossy(&buf), f.mode().as_str()))
//! });
//! co.enter();
//! ctx.poll_while(|| !co.is_finished());
//! let text = co.take_result().unwrap()?;
//! assert!(text.starts_with("hello, file via "), "{text}");
//! std::fs::remove_file(&path)?;
//! # std::io::Result::Ok(())
//! ```
//!
//! A request whose coroutine is cancelled (its context shut down, its
//! `CoroutineFuture` dropped) is cancelled in the kernel and reaped before
//! the coroutine's buffers go away.
//!
//! # 5. Tokio
//!
//! A [`CoroutineFuture`](crate::future::CoroutineFuture) is `!Send`, like
//! every coroutine: run it with `tokio::task::spawn_local` inside a
//! `LocalSet` (or `LocalSet::block_on`), not `tokio::spawn`, which may move
//! it to another worker thread and does not compile with it. To run
//! coroutine code from any thread, give it a thread of its own:
//! [`AioContext::spawn_coroutine`] (a `Send` closure, a `Send` task handle
//! you can await from tokio) on an [`IoThread`]'s context.
//!
//! ```
//! use coroloop::future::CoroutineFuture;
//! use coroloop::{coroutine, IoThread};
//! use std::time::Duration;
//!
//! let rt = tokio::runtime::Builder::new_current_thread().build()?;
//! let local = tokio::task::LocalSet::new();
//! // On tokio's thread: a coroutine polled by a tokio task.
//! let here = local.block_on(&rt, async {
//!     tokio::task::spawn_local(CoroutineFuture::new(|| 6 * 7)).await.unwrap()
//! });
//! assert_eq!(here, 42);
//!
//! // On an IoThread: awaited from tokio like any `Send` future.
//! let io = IoThread::spawn("coroutines")?;
//! let task = io.context().spawn_coroutine(|| {
//!     coroutine::sleep(Duration::from_millis(1)); // the IoThread's timers
//!     "done on the IoThread"
//! });
//! assert_eq!(rt.block_on(task), "done on the IoThread");
//! io.stop();
//! # std::io::Result::Ok(())
//! ```
//!
//! **Tokio's own timers and sockets need tokio's reactor.**
//! `tokio::time::sleep`, `tokio::net::TcpStream` and the like register with
//! the tokio runtime of the thread that polls them; awaited with
//! `await_future` inside a coroutine on an `IoThread` (where no tokio
//! runtime runs) they panic ("there is no reactor running"). In coroutines,
//! use [`coroutine::sleep`](crate::coroutine::sleep) and
//! [`net`](crate::net) (the context's own timers and fd monitor), or smol's
//! `Timer` and `Async`, which run their own reactor and work anywhere.
//! Tokio's channels and locks have no reactor and work everywhere.
//!
//! # Coroutine or task?
//!
//! Choose a **coroutine** when:
//!
//! * the waiting happens inside ordinary, non-async code: a `Read` or
//!   `Write` implementation, a trait method you do not control, a callback,
//!   a synchronous parser (`serde_json::from_reader`, `std::io::copy`,
//!   `BufRead::lines`) — a coroutine waits there without blocking the
//!   thread, and nothing needs to become `async`;
//! * you port QEMU-style C code, whose functions wait in the middle of
//!   deep call stacks;
//! * you want QEMU's locks and queues (`CoMutex`, `CoQueue`, `CoRwLock`)
//!   with their hand-off order.
//!
//! Choose an **async task** when:
//!
//! * the code and its libraries are async already;
//! * you want work stealing across threads (tokio's multi-threaded
//!   runtime): a coroutine never changes thread;
//! * you keep very many mostly idle waits: a future is exactly as big as
//!   its state, while each coroutine reserves a stack (1 MiB of address
//!   space by default, touched pages only; see
//!   [`coroutine::Builder::stack_size`](crate::coroutine::Builder::stack_size)).
//!
//! Both mix freely on one thread: [`AioContext::spawn_local`] runs tasks on
//! the context, `await_future` lets a coroutine wait for a future, and the
//! locks' `_async` methods let tasks wait for them.
//!
//! [`AioContext`]: crate::AioContext
//! [`AioContext::new`]: crate::AioContext::new
//! [`AioContext::run_in_smol`]: crate::AioContext::run_in_smol
//! [`AioContext::spawn_coroutine`]: crate::AioContext::spawn_coroutine
//! [`AioContext::spawn_local`]: crate::AioContext::spawn_local
//! [`IoThread`]: crate::IoThread
