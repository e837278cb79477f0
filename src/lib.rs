//! coroloop (docs filled below)
#![deny(unsafe_op_in_unsafe_fn)]

pub mod coroutine;

pub use coroutine::Coroutine;
