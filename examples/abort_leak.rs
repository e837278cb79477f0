//! Dropping the last handle of a suspended coroutine under `panic = "abort"`.
//!
//! With unwinding, the coroutine's stack is unwound and its destructors run.
//! Under `panic = "abort"` it cannot be unwound: coroloop leaks it (stack
//! included) with a warning in the log, and the process carries on. CI runs
//! this example both ways:
//!
//! ```sh
//! cargo run --example abort_leak
//! RUSTFLAGS="-C panic=abort" cargo run --example abort_leak
//! ```

use std::cell::Cell;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};

use coroloop::coroutine::{self, Coroutine};

/// Counts warnings that mention a leaked coroutine.
struct CountingLogger;

static LEAK_WARNINGS: AtomicUsize = AtomicUsize::new(0);

impl log::Log for CountingLogger {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        eprintln!("[{}] {}", record.level(), record.args());
        if record.level() == log::Level::Warn && record.args().to_string().contains("leaking") {
            LEAK_WARNINGS.fetch_add(1, Ordering::Relaxed);
        }
    }
    fn flush(&self) {}
}

struct DropFlag(Rc<Cell<bool>>);
impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.set(true);
    }
}

fn main() {
    log::set_logger(&CountingLogger).unwrap();
    log::set_max_level(log::LevelFilter::Warn);

    let dropped = Rc::new(Cell::new(false));
    let flag = DropFlag(dropped.clone());
    let co = coroutine::Builder::new()
        .name("held")
        .build(move || {
            let _flag = flag;
            coroutine::suspend();
        })
        .unwrap();
    co.enter();
    let stacks = coroutine::live_stacks();
    drop(co);

    if cfg!(panic = "abort") {
        assert!(!dropped.get(), "cannot unwind under panic=abort");
        assert_eq!(LEAK_WARNINGS.load(Ordering::Relaxed), 1);
        assert_eq!(coroutine::live_stacks(), stacks, "the stack is leaked");
    } else {
        assert!(dropped.get(), "unwound: the destructor ran");
        assert_eq!(LEAK_WARNINGS.load(Ordering::Relaxed), 0);
    }
    // The thread goes on creating coroutines either way.
    let co = Coroutine::new(|| 7);
    co.enter();
    assert_eq!(co.take_result(), Some(7));
    println!(
        "abort_leak (panic={}): destructor ran: {}, leak warnings: {}",
        if cfg!(panic = "abort") {
            "abort"
        } else {
            "unwind"
        },
        dropped.get(),
        LEAK_WARNINGS.load(Ordering::Relaxed)
    );
}
