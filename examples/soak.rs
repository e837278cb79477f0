//! The soak test of `tests/soak.rs` as a program, for long runs:
//!
//! ```text
//! cargo run --release --example soak -- 120   # seconds (default 120)
//! ```
//!
//! 4 IoThreads and 10,000 coroutines exchange a CoMutex, a CoQueue,
//! cross-thread schedules, hops between threads, timers and thread-pool
//! jobs; at the end every total is checked exactly and the operations per
//! second are printed. It panics (non-zero exit) on any mismatch, or with a
//! per-thread diagnostic if the coroutines do not finish within 60 s of
//! the stop.

#[path = "../tests/soak.rs"]
mod soak;

fn main() {
    // The library's log lines (leaks, fallbacks) go through `log`:
    // show warnings and errors; RUST_LOG=coroloop=debug etc. overrides.
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let secs = std::env::args()
        .nth(1)
        .map(|s| s.parse().expect("usage: soak [SECONDS]"))
        .unwrap_or(120);
    soak::run_soak(secs);
}
