//! The one place that names `std::sync` atomics or loom's.
//!
//! Protocol cores (`aio/notify.rs`, `aio/bh.rs`, `coroutine/remote.rs`,
//! `sync/waitq.rs`, `sync/mutex.rs`, and the other locks) import their
//! atomics from here, so that `RUSTFLAGS="--cfg coroloop_loom" cargo test --lib --release
//! loom` model-checks them with loom. The cfg is ours, not `loom`, because
//! smol's crates switch to loom themselves under plain `cfg(loom)`.

#[cfg(all(test, coroloop_loom))]
pub(crate) use loom::sync;

#[cfg(not(all(test, coroloop_loom)))]
pub(crate) use std::sync;
