//! QEMU's programming model in Rust: stackful coroutines that let ordinary,
//! sequential code wait without blocking a thread.
//!
//! What it provides:
//!
//! * [`coroutine`]: stackful coroutines on [corosensei] with QEMU's
//!   semantics — enter / suspend along a caller chain, wake-up lists,
//!   a per-thread pool of live coroutines, guard-paged stacks with a
//!   stack-overflow report, and a stack budget that keeps the process clear
//!   of `vm.max_map_count`.
//! * [`aio`]: the AioContext event loop — bottom halves, fd handlers and
//!   event notifiers on epoll, timers on three clocks, adaptive busy
//!   polling, cross-thread wake-ups (`notify` without a system call while
//!   the loop is awake), coroutines scheduled and woken from any thread,
//!   `IoThread`s and a per-context thread pool.
//!
//! * [`sync`]: the coroutine locks — [`sync::CoMutex`] (fair hand-off,
//!   one compare-exchange each way uncontended), [`sync::CoQueue`],
//!   [`sync::CoRwLock`] (QEMU's tickets, upgrade/downgrade),
//!   [`sync::CoSleep`] — usable across threads, robust to stray wakes and
//!   to waiters being unwound.
//! * [`io`]: coroutine fd I/O — `yield_until_fd_readable`, `co_send(v)` /
//!   `co_recv(v)`, and [`io::CoFd`], whose `Read`/`Write` suspend instead
//!   of blocking, so synchronous code (`std::io::copy`, `BufRead`) runs
//!   inside coroutines.
//! * [`future`]: coroutines and async Rust both ways on the same threads —
//!   [`future::CoroutineFuture`] (a coroutine any executor can poll),
//!   [`future::await_future`] (a future awaited inside a coroutine),
//!   `AioContext::{block_on, spawn, spawn_local, spawn_coroutine}` (tasks
//!   run as the context's own work items), `AioContext::run_in_smol` (the
//!   context driven from a smol executor; `smol` feature, on by default),
//!   and [`sync::CoMutex::lock_async`] / [`sync::CoQueue::wait_async`] so
//!   one lock serves coroutines and tasks.
//! * file I/O on the loop: [`aio::CoFile`] over the thread pool, io_uring
//!   ([`aio::IoUring`]) or Linux AIO ([`aio::LinuxAio`]), QEMU's
//!   `aio=threads|io_uring|native`.
//! * [`net`]: TCP and Unix sockets for coroutines — [`net::TcpListener`],
//!   [`net::TcpStream`], [`net::UnixListener`], [`net::UnixStream`]:
//!   non-blocking by construction, `Read`/`Write` that suspend, read and
//!   write timeouts that fail with `TimedOut`, `accept_timeout` and
//!   `connect_timeout`.
//! * Waiting for coroutines: [`Coroutine::join`] and
//!   [`coroutine::JoinSet`] (completion order), also from async code; and
//!   a bounded form of every lock wait ([`sync::CoMutex::lock_timeout`],
//!   ...; see [`sync`]'s "Timeouts").
//!
//! **New here?** Start with the [`guide`]: five short programs (the shape
//! of a program, a TCP echo server, coroutines beside smol tasks, file
//! I/O, tokio) and when to choose a coroutine over a task. The
//! [glossary](#glossary) explains QEMU's words.
//!
//! # Feature flags
//!
//! * `smol` (default): `AioContext::run_in_smol`, on async-io.
//!
//! # Example
//!
//! A coroutine can suspend deep inside an ordinary call stack — here inside
//! a `std::io::Read` implementation driven by the standard library's
//! `BufRead::lines`, which knows nothing about coroutines:
//!
//! ```
//! use std::cell::RefCell;
//! use std::collections::VecDeque;
//! use std::io::{BufRead, BufReader, Read};
//! use std::rc::Rc;
//!
//! use coroloop::coroutine::{self, Coroutine};
//!
//! /// Bytes written by one coroutine and read by another.
//! #[derive(Default)]
//! struct Pipe {
//!     buf: VecDeque<u8>,
//!     closed: bool,
//!     reader: Option<Coroutine<coroutine::Erased>>,
//! }
//!
//! struct PipeReader(Rc<RefCell<Pipe>>);
//!
//! impl Read for PipeReader {
//!     fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
//!         loop {
//!             let mut p = self.0.borrow_mut();
//!             if !p.buf.is_empty() || p.closed {
//!                 let n = out.len().min(p.buf.len());
//!                 for (o, b) in out.iter_mut().zip(p.buf.drain(..n)) {
//!                     *o = b;
//!                 }
//!                 return Ok(n);
//!             }
//!             // Nothing yet: wait without blocking the thread.
//!             p.reader = Coroutine::current();
//!             drop(p);
//!             coroutine::suspend();
//!         }
//!     }
//! }
//!
//! let pipe = Rc::new(RefCell::new(Pipe::default()));
//! let reader = {
//!     let pipe = pipe.clone();
//!     Coroutine::new(move || {
//!         // A synchronous API, running inside a coroutine.
//!         BufReader::new(PipeReader(pipe))
//!             .lines()
//!             .map(|l| l.unwrap().parse::<u64>().unwrap())
//!             .sum::<u64>()
//!     })
//! };
//! reader.enter(); // runs until the pipe is empty, then suspends
//!
//! for chunk in ["1\n2", "0\n3", "00\n"] {
//!     let mut p = pipe.borrow_mut();
//!     p.buf.extend(chunk.bytes());
//!     let waiter = p.reader.take();
//!     drop(p);
//!     if let Some(w) = waiter {
//!         w.wake(); // outside a coroutine: enters it now
//!     }
//! }
//! pipe.borrow_mut().closed = true;
//! reader.wake();
//! assert_eq!(reader.take_result(), Some(1 + 20 + 300));
//! ```
//!
//! # An accept loop
//!
//! A TCP server: one coroutine accepts, one coroutine per connection runs
//! sequential code, and a connection silent for too long is dropped. The
//! loop runs on an [`aio::IoThread`]; `examples/echo.rs` is the complete
//! program with 64 clients.
//!
//! ```
//! use coroloop::{aio::IoThread, net::{TcpListener, TcpStream}, Coroutine};
//! use std::io::{BufRead, BufReader, ErrorKind, Write};
//! use std::time::Duration;
//!
//! fn serve(conn: TcpStream) -> std::io::Result<()> {
//!     conn.set_read_timeout(Some(Duration::from_secs(30)))?;
//!     let mut lines = BufReader::new(&conn);
//!     let mut line = String::new();
//!     loop {
//!         line.clear();
//!         match lines.read_line(&mut line) {
//!             Ok(0) => return Ok(()), // the peer closed
//!             Ok(_) => (&conn).write_all(line.to_uppercase().as_bytes())?,
//!             Err(e) if e.kind() == ErrorKind::TimedOut => return Ok(()), // idle
//!             Err(e) => return Err(e),
//!         }
//!     }
//! }
//!
//! let io = IoThread::spawn("server")?;
//! let listener = TcpListener::bind("127.0.0.1:0")?; // non-blocking already
//! let addr = listener.local_addr()?;
//! io.context().bh_schedule_oneshot(move || {
//!     Coroutine::new(move || loop {
//!         let Ok((conn, _peer)) = listener.accept() else { return };
//!         // Runs until it suspends; then its context owns it.
//!         Coroutine::new(move || serve(conn)).enter();
//!     })
//!     .enter();
//! });
//!
//! // A client, blocking, from this thread:
//! let mut c = std::net::TcpStream::connect(addr)?;
//! c.write_all(b"hello\n")?;
//! let mut back = String::new();
//! BufReader::new(&c).read_line(&mut back)?;
//! assert_eq!(back, "HELLO\n");
//! # std::io::Result::Ok(())
//! ```
//!
//! # QEMU names
//!
//! Every item carries its QEMU name as a rustdoc alias, so searching the
//! docs for `qemu_coroutine_enter` finds [`Coroutine::enter`].
//!
//! | QEMU | coroloop |
//! |---|---|
//! | `qemu_coroutine_create` | [`Coroutine::new`], [`coroutine::Builder`] (name, stack size; [`build`](coroutine::Builder::build) creates without running, fallible → `io::Result`) |
//! | `qemu_coroutine_enter` / `_enter_if_inactive` | [`Coroutine::enter`] / [`Coroutine::enter_if_inactive`] |
//! | `aio_co_wake` on the home thread (no AioContext yet) | [`Coroutine::wake`] (the wake-up list, QEMU's `co_queue_wakeup`) |
//! | `qemu_coroutine_yield` | [`coroutine::suspend`] |
//! | `qemu_coroutine_self` / `qemu_in_coroutine` / `qemu_coroutine_entered` | [`Coroutine::current`] / [`coroutine::in_coroutine`] / [`Coroutine::is_entered`] |
//! | coroutine pool, `qemu_coroutine_{increase,decrease}_pool_batch_size` | [`coroutine::increase_pool_batch_size`], [`coroutine::decrease_pool_batch_size`] |
//! | the pool's cap below `vm.max_map_count` | [`coroutine::max_live_stacks`] |
//! | `COROUTINE_STACK_SIZE` | [`coroutine::DEFAULT_STACK_SIZE`] (1 MiB) |
//! | `aio_context_new`, ref/unref | [`aio::AioContext::new`] (`io::Result`); `Clone`/`Drop` |
//! | `qemu_get_current_aio_context` | [`aio::AioContext::current`] |
//! | `aio_poll` / `aio_notify` | [`aio::AioContext::poll`] / [`aio::AioContext::notify`] |
//! | `aio_prepare` / `aio_pending` / `aio_dispatch` | [`aio::AioContext::prepare`] / [`pending`](aio::AioContext::pending) / [`dispatch`](aio::AioContext::dispatch), with the context's fd (`AsFd`) |
//! | `aio_bh_new` / `aio_bh_schedule_oneshot` | [`aio::AioContext::bh_new`] → [`aio::Bh`] (`Send`), [`bh_new_local`](aio::AioContext::bh_new_local) → [`aio::LocalBh`]; [`bh_schedule_oneshot`](aio::AioContext::bh_schedule_oneshot) |
//! | `qemu_bh_schedule` / `_cancel` / `_delete` | [`aio::Bh::schedule`] / [`aio::Bh::cancel`] / `drop(bh)` |
//! | `FDMonOps` (epoll / io_uring fd monitoring) | epoll by default; [`aio::AioContext::builder`]`.fd_monitor(`[`aio::FdMonitorKind::IoUring`]`)` (QEMU's fdmon-io_uring) |
//! | `aio_set_fd_handler`, `aio_set_fd_poll` | [`aio::AioContext::set_fd_handler`] → [`aio::FdHandler`] (owns the fd), [`set_fd_handler_raw`](aio::AioContext::set_fd_handler_raw) (`unsafe`; gives back only the number, [`aio::RawFdSource`], never a `BorrowedFd`), [`aio::FdHandler::set_poll`] |
//! | `EventNotifier`, `aio_set_event_notifier` | [`aio::EventNotifier`], [`aio::AioContext::set_event_notifier`] |
//! | `aio_timer_new`, `timer_mod`, `timer_mod_anticipate`, `timer_del` | [`aio::AioContext::timer_new`] → [`aio::Timer`]: `mod_ns`, `mod_anticipate`, `del`, `expire_time` |
//! | `QEMUClockType` | [`aio::ClockType`] (`Realtime`, `Host`, `Virtual` advanced by hand) |
//! | `aio_compute_timeout` | [`aio::AioContext::compute_timeout`] |
//! | `aio_disable_external` / `enable` / `external_disabled` | [`aio::AioContext::disable_external`] / [`enable_external`](aio::AioContext::enable_external) / [`is_external_disabled`](aio::AioContext::is_external_disabled) |
//! | `aio_context_set_poll_params` | [`aio::AioContext::set_poll_params`] |
//! | `aio_co_enter` / `aio_co_schedule` / `aio_co_wake` | [`aio::AioContext::co_enter`] / [`aio::AioContext::co_schedule`], [`coroutine::RemoteCoroutine::schedule`] / [`Coroutine::wake`], [`Coroutine::remote`], [`Coroutine::waker`] |
//! | `aio_co_reschedule_self` | `unsafe` [`coroutine::reschedule_self`] |
//! | `qemu_coroutine_get_aio_context` | [`Coroutine::aio_context`] |
//! | coroutine owned by its context | [`Coroutine::detach`] |
//! | `qemu_co_sleep_ns` | [`coroutine::sleep`]; [`coroutine::yield_now`] |
//! | `AIO_WAIT_WHILE`, `aio_wait_kick` | [`aio::AioContext::poll_while`], [`aio::wait_kick`] |
//! | IOThread | [`aio::IoThread::spawn`], [`aio::IoThreadBuilder`] (poll params), `stop()` |
//! | `aio_get_thread_pool`, `thread_pool_submit_co/aio` | [`aio::AioContext::thread_pool`]: [`submit_co`](aio::ThreadPool::submit_co), [`submit`](aio::ThreadPool::submit) |
//! | `aio_setup_linux_io_uring` / `aio_get_linux_io_uring`, `luring_co_submit` | [`aio::AioContext::linux_io_uring`] → [`aio::IoUring`]: `read_at`, `write_at`, `readv_at`, `writev_at`, `fsync`, `fdatasync` |
//! | `aio_setup_linux_aio` / `aio_get_linux_aio`, `laio_co_submit` | [`aio::AioContext::linux_aio`] → [`aio::LinuxAio`] (same calls; for `O_DIRECT`) |
//! | `file-posix` with `aio=threads\|io_uring\|native` | [`aio::CoFile`] with [`aio::AioMode`] (falls back to threads when an engine is unavailable); `threads` first tries `preadv2(RWF_NOWAIT)` inline |
//! | `CoMutex` init/lock/unlock | [`sync::CoMutex::new`], [`lock`](sync::CoMutex::lock) → guard (unlock on drop), [`try_lock`](sync::CoMutex::try_lock) |
//! | `CoQueue` wait/next/restart_all/enter_next/enter_all/empty | [`sync::CoQueue`]: [`wait`](sync::CoQueue::wait), [`wait_unlocked`](sync::CoQueue::wait_unlocked), [`next`](sync::CoQueue::next), [`restart_all`](sync::CoQueue::restart_all), [`enter_next`](sync::CoQueue::enter_next), [`enter_all`](sync::CoQueue::enter_all), [`is_empty`](sync::CoQueue::is_empty) |
//! | `QemuCoLockable` (a lock `qemu_co_queue_wait` releases) | [`sync::CoLockable`]: mutex and rwlock guards |
//! | `CoRwlock` rdlock/wrlock/upgrade/downgrade/unlock | [`sync::CoRwLock`]: [`read`](sync::CoRwLock::read), [`write`](sync::CoRwLock::write), [`upgrade`](sync::CoRwLock::upgrade), [`downgrade`](sync::CoRwLock::downgrade) |
//! | `QemuCoSleep`, `qemu_co_sleep_ns_wakeable`, `qemu_co_sleep_wake` | [`sync::CoSleep`]: [`sleep`](sync::CoSleep::sleep), [`sleep_for`](sync::CoSleep::sleep_for), [`wake`](sync::CoSleep::wake) |
//! | `yield_until_fd_readable` | [`io::yield_until_fd_readable`], [`io::yield_until_fd_writable`] |
//! | `qemu_co_sendv_recvv`, `qemu_co_send/recv(v)` | [`io::co_sendv`], [`io::co_recvv`], [`io::co_send`], [`io::co_recv`]; [`io::CoFd`] |
//! | a future awaited in a coroutine (QEMU's Rust bindings: the waker calls `aio_co_wake`) | [`future::await_future`] |
//! | a coroutine as a future | [`future::CoroutineFuture`] |
//! | running a loop until a condition, from async code | [`aio::AioContext::block_on`] |
//! | tasks on the loop | [`aio::AioContext::spawn`], [`spawn_local`](aio::AioContext::spawn_local), [`spawn_coroutine`](aio::AioContext::spawn_coroutine) → [`aio::Task`] (await [`fallible()`](aio::Task::fallible) for `None` if the context shuts down first) |
//! | `aio_get_g_source` (the loop inside another event loop) | `AioContext::run_in_smol` (feature `smol`), or [`prepare`](aio::AioContext::prepare) / [`pending`](aio::AioContext::pending) / [`dispatch`](aio::AioContext::dispatch) |
//! | `QIOChannelSocket` + `qio_channel_yield` (accept, connect, read, write) | [`net::TcpListener`], [`net::TcpStream`], [`net::UnixListener`], [`net::UnixStream`] |
//! | (no QEMU equivalent) join, `JoinSet`, bounded lock waits | [`Coroutine::join`], [`coroutine::JoinSet`], [`sync::CoMutex::lock_timeout`], [`sync::CoQueue::wait_timeout`] |
//! | `CoMutex` / `CoQueue` from async code | [`sync::CoMutex::lock_async`], [`sync::CoQueue::wait_async`], [`wait_unlocked_async`](sync::CoQueue::wait_unlocked_async) |
//!
//! # Threads
//!
//! A coroutine's stack may hold thread-bound values (`Rc`, `RefCell`
//! borrows), so a coroutine never changes thread: [`Coroutine`] handles are
//! `!Send`. Pools are per thread; only bare stacks are shared between
//! threads.
//!
//! An [`aio::AioContext`] handle is `Send + Sync`, but the context has a
//! home thread: only that thread polls it and runs its callbacks and
//! coroutines (calls from elsewhere panic, naming the call). Other threads
//! schedule bottom halves, wake coroutines through
//! [`coroutine::RemoteCoroutine`] or a `Waker`, and notify it. A coroutine
//! created where a context runs belongs to that context: wakes from any
//! thread queue it there.
//!
//! ```
//! use coroloop::{aio::IoThread, coroutine, Coroutine};
//! use std::sync::mpsc;
//!
//! let io = IoThread::spawn("io")?;
//! let (tx, rx) = mpsc::channel();
//! io.context().bh_schedule_oneshot(move || {
//!     // On the IoThread: this coroutine belongs to its context.
//!     let co = Coroutine::new(move || {
//!         coroutine::sleep(std::time::Duration::from_millis(1));
//!         tx.send(std::thread::current().name().map(String::from)).unwrap();
//!     });
//!     co.enter();
//!     co.detach(); // the context owns it now
//! });
//! assert_eq!(rx.recv().unwrap().as_deref(), Some("io"));
//! io.stop();
//! # std::io::Result::Ok(())
//! ```
//!
//! # Thread-locals and thread exit
//!
//! **Do not hold a thread-local borrow across a suspension**: no
//! `coroutine::suspend()`, lock, sleep, fd wait, file request or
//! `await_future` inside a `LocalKey::with` closure, and no buffer lent to
//! a file request that lives in a thread-local. std destroys a thread's
//! thread-locals when the thread exits, in reverse order of their first
//! use, whether or not a suspended coroutine still borrows them.
//!
//! coroloop closes what a library can close. The thread's *teardown*
//! begins when the first of coroloop's own thread-locals is destroyed
//! (each of them — the coroutine pool, the default context, fd waits, file
//! engines, ... — begins it from its destructor, so the one first used
//! last, and destroyed first, counts). From then on:
//!
//! * a suspended coroutine whose last handle is dropped is leaked with a
//!   log line instead of unwound, since its destructors could read
//!   destroyed thread-locals;
//! * a suspended coroutine is not resumed any more (`enter`, a wake, a
//!   poll): it stays suspended, with a log line;
//! * every io_uring and Linux AIO request of the thread's contexts is
//!   cancelled and reaped before that destructor returns, and nothing is
//!   submitted afterwards.
//!
//! An [`aio::IoThread`] begins its teardown before its thread function
//! returns, so on IoThreads every order of thread-local destruction is
//! safe.
//!
//! What remains, on threads that are not IoThreads, is exactly this: a
//! thread-local whose **first use came after** the first use of every
//! coroloop thread-local is destroyed **before** the teardown begins. If
//! such a thread-local is borrowed across a suspension by a coroutine that
//! is still suspended (alive, or leaked with `mem::forget`) when the thread
//! exits, then (a) a destructor that runs between the two and drops the
//! coroutine's last handle, or resumes it, runs it on the destroyed
//! thread-local, and (b) a file request reading into that thread-local
//! that is in the kernel then, or that such a destructor submits by
//! polling the context, may complete into freed memory. No library can see
//! that a thread is exiting before its own thread-local destructor runs.
//! The rule above avoids both; so does running such coroutines on an
//! `IoThread`.
//!
//! # Glossary
//!
//! * **AioContext** — QEMU's event loop, [`AioContext`]: bottom halves, fd
//!   handlers, timers and the coroutines it resumes, run by
//!   [`poll`](aio::AioContext::poll) on its home thread. ("AIO" is QEMU's
//!   asynchronous I/O; the loop is not only for files.)
//! * **Bottom half (BH)** — a callback scheduled to run once on a
//!   context's next pass, from any thread ([`aio::Bh`],
//!   [`bh_schedule_oneshot`](aio::AioContext::bh_schedule_oneshot)): QEMU's
//!   way to defer work out of the current call stack or onto another
//!   thread's loop.
//! * **Home thread** — the one thread that polls a context and runs its
//!   callbacks and coroutines: the thread that created it, or the one an
//!   IoThread started. A coroutine's home thread is where it was created;
//!   it never runs anywhere else.
//! * **IoThread** — a thread that runs one context's loop until stopped
//!   ([`IoThread`]), as QEMU's `-object iothread`.
//! * **Resumer** — what enters a coroutine that was woken or scheduled
//!   from elsewhere: its context, or the
//!   [`CoroutineFuture`](future::CoroutineFuture) it runs inside. Fixed
//!   when the coroutine is created; it is also who owns a coroutine whose
//!   last handle was dropped.
//! * **Wake-up list** — the coroutines woken on the home thread by the
//!   running coroutine; they are entered when it suspends or finishes
//!   (QEMU's `co_queue_wakeup`), so a chain of wakes never deepens the
//!   stack. See [`Coroutine::wake`].
//! * **Enter / suspend** — [`Coroutine::enter`] switches to a coroutine
//!   and returns when it [suspends](coroutine::suspend) or finishes
//!   (QEMU's `qemu_coroutine_enter` / `qemu_coroutine_yield`).
//! * **Bare coroutine** — one created where no context or future existed:
//!   nothing but its handles can enter it.
//!
//! # Seeing the library's log lines
//!
//! coroloop never prints (the stack-overflow report, written right before
//! the process aborts, excepted). What it has to say goes through the
//! [`log`](https://docs.rs/log) facade, so nothing shows until the program
//! installs a logger: an unfinished coroutine leaked at thread exit, a
//! context dropped off its home thread with work left, an io_uring engine
//! that fell back to threads. Levels: `error` for leaks and lost work that
//! point at a bug in the caller, `warn` for fallbacks and refused
//! operations. With [`env_logger`](https://docs.rs/env_logger), as every
//! example in `examples/` does:
//!
//! ```
//! // In main(); RUST_LOG=coroloop=debug (or warn, error) overrides it.
//! env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
//! ```
//!
//! # Environment variables
//!
//! Read by the library:
//!
//! | variable | effect |
//! |---|---|
//! | `COROLOOP_FDMON` | `epoll` (default) or `io_uring`: the fd monitor of contexts that do not choose one ([`aio::FdMonitorKind`]); read once per process. An io_uring monitor that cannot be set up falls back to epoll with a log line. |
//! | `COROLOOP_DISABLE_IO_URING` | set (to anything but `0`): io_uring is treated as unavailable, for the fd monitor and for [`aio::IoUring`] (`CoFile` then falls back to threads), to test the fallbacks. |
//! | `COROLOOP_DISABLE_LINUX_AIO` | set (to anything but `0`): Linux AIO is treated as unavailable ([`aio::LinuxAio`]). |
//!
//! Read by the test suite and its scripts only:
//!
//! | variable | effect |
//! |---|---|
//! | `COROLOOP_REQUIRE_URING=1` | the io_uring tests fail instead of printing `SKIP` when io_uring is unavailable. |
//! | `COROLOOP_SEED` | the seed of `tests/stray_wakes.rs` (each scenario prints the seed that replays it). |
//! | `COROLOOP_SOAK_SECS`, `COROLOOP_SOAK_GRACE_SECS` | how long `tests/soak.rs` runs (default 10 s) and how long it waits for the work to drain after the stop (default 60 s). |
//! | `COROLOOP_ASAN=1` | set by `scripts/memcheck.sh` and `scripts/fuzz.sh` for AddressSanitizer builds: tests that cannot run under it (stack overflow reports) are skipped. |
//! | `COROLOOP_FUZZ_SEED`, `COROLOOP_FUZZ_SECS`, `COROLOOP_FUZZ_CALLS`, `COROLOOP_FUZZ_PROGRAM`, `COROLOOP_FUZZ_SHRINK`, `COROLOOP_FUZZ_SHRINK_SECS`, `COROLOOP_FUZZ_SIG`, `COROLOOP_FUZZ_LOG`, `COROLOOP_FUZZ_HANG_SECS`, `COROLOOP_FUZZ_NO_URING` | the API fuzzer (`tests/api_fuzz/`, `scripts/fuzz.sh`): the seed of a run, its length in seconds or calls, one program to replay, shrinking off (`0`) and its time budget, a failure that ends the process to shrink by its text (`HANG`, a sanitizer report), print the library's log lines, a step's time limit (default 30 s), no io_uring (for valgrind); `tests/api_fuzz/main.rs` documents each. |
//! | `COROLOOP_FUZZ_CHILD`, `COROLOOP_FUZZ_DELETE`, `COROLOOP_OVERFLOW_CHILD`, `COROLOOP_MEMORY_CHILD`, `COROLOOP_SOUNDNESS_CHILD` | internal: a test re-executes itself as a child process with these set (which scenario to run; for the fuzzer's shrinker, the steps to leave out). |
//!
//! # Platform
//!
//! Linux on x86_64 and aarch64 (corosensei's targets, `/proc` for the
//! stack budget, `SIGSEGV` on the alternate stack for overflow reports).
//!
//! [corosensei]: https://docs.rs/corosensei
#![deny(unsafe_op_in_unsafe_fn)]
#![doc(test(attr(deny(warnings))))]

pub mod aio;
pub mod coroutine;
pub mod future;
pub mod guide;
pub mod io;
mod loom;
pub mod net;
pub mod sync;

pub use aio::{AioContext, IoThread};
pub use coroutine::Coroutine;
