//! QEMU's programming model in Rust: stackful coroutines that let ordinary,
//! sequential code wait without blocking a thread.
//!
//! coroloop is being built capability by capability. Available now:
//!
//! * [`coroutine`]: stackful coroutines on [corosensei] with QEMU's
//!   semantics — enter / suspend along a caller chain, wake-up lists,
//!   a per-thread pool of live coroutines, guard-paged stacks with a
//!   stack-overflow report, and a stack budget that keeps the process clear
//!   of `vm.max_map_count`.
//!
//! Planned, in this order: the AioContext event loop (bottom halves, fd
//! handlers, timers, adaptive polling, a thread pool), the coroutine locks
//! (CoMutex, CoQueue, CoRwLock, CoSleep), coroutine I/O, bridges with Rust
//! futures and smol, and io_uring / Linux AIO file I/O.
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
//! # QEMU names
//!
//! Every item carries its QEMU name as a rustdoc alias, so searching the
//! docs for `qemu_coroutine_enter` finds [`Coroutine::enter`].
//!
//! | QEMU | coroloop |
//! |---|---|
//! | `qemu_coroutine_create` | [`Coroutine::new`], [`coroutine::Builder`] (name, stack size, fallible `spawn`) |
//! | `qemu_coroutine_enter` / `_enter_if_inactive` | [`Coroutine::enter`] / [`Coroutine::enter_if_inactive`] |
//! | `aio_co_wake` on the home thread (no AioContext yet) | [`Coroutine::wake`] (the wake-up list, QEMU's `co_queue_wakeup`) |
//! | `qemu_coroutine_yield` | [`coroutine::suspend`] |
//! | `qemu_coroutine_self` / `qemu_in_coroutine` / `qemu_coroutine_entered` | [`Coroutine::current`] / [`coroutine::in_coroutine`] / [`Coroutine::is_entered`] |
//! | coroutine pool, `qemu_coroutine_{increase,decrease}_pool_batch_size` | [`coroutine::increase_pool_batch_size`], [`coroutine::decrease_pool_batch_size`] |
//! | the pool's cap below `vm.max_map_count` | [`coroutine::max_live_stacks`] |
//! | `COROUTINE_STACK_SIZE` | [`coroutine::DEFAULT_STACK_SIZE`] (1 MiB) |
//!
//! # Threads
//!
//! A coroutine's stack may hold thread-bound values (`Rc`, `RefCell`
//! borrows), so a coroutine never changes thread: [`Coroutine`] handles are
//! `!Send`. Pools are per thread; only bare stacks are shared between
//! threads.
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
mod loom;

pub use coroutine::Coroutine;
