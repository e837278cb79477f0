//! The invariants: canaries on every value handed to the library, canary
//! bytes around every kernel buffer, the panics allowed, and the failures
//! a program collects.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

/// Failures of the running program (emptied by `begin`).
static FAILURES: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// API calls made so far (all programs).
pub(crate) static CALLS: AtomicU64 = AtomicU64::new(0);

pub(crate) fn fail(msg: String) {
    let mut f = FAILURES.lock().unwrap_or_else(|e| e.into_inner());
    if f.len() < 20 {
        f.push(msg);
    }
}

pub(crate) fn call() {
    CALLS.fetch_add(1, Ordering::Relaxed);
}

/// The kernel's id of this thread: works in thread-local destructors too,
/// where `std::thread::current()` may not.
pub(crate) fn tid() -> i32 {
    // SAFETY: gettid has no preconditions and cannot fail.
    unsafe { libc::gettid() }
}

// ---------------------------------------------------------------- canaries

const MAGIC: u64 = 0xC0C0_1100_BEEF_F00D;

/// Program generation, so that a canary of an earlier program dropped late
/// is told apart.
static GENERATION: AtomicU64 = AtomicU64::new(0);
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

struct Live {
    generation: u64,
    what: &'static str,
}

fn ledger() -> &'static Mutex<HashMap<u64, Live>> {
    static L: OnceLock<Mutex<HashMap<u64, Live>>> = OnceLock::new();
    L.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Carried by every closure, future and coroutine the fuzzer gives the
/// library: records its home thread, and its drop checks that it runs once,
/// and (for values that are not `Send` to the library) on that thread.
#[derive(Debug)]
pub(crate) struct Canary {
    magic: u64,
    id: u64,
    home: i32,
    strict: bool,
    what: &'static str,
}

impl Canary {
    /// A canary for a value the library must drop on this thread.
    pub(crate) fn local(what: &'static str) -> Canary {
        Canary::new(what, true)
    }
    /// A canary for a `Send` value (dropped anywhere, once).
    pub(crate) fn sendable(what: &'static str) -> Canary {
        Canary::new(what, false)
    }
    fn new(what: &'static str, strict: bool) -> Canary {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let generation = GENERATION.load(Ordering::Relaxed);
        ledger()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, Live { generation, what });
        Canary {
            magic: MAGIC,
            id,
            home: tid(),
            strict,
            what,
        }
    }
    pub(crate) fn id(&self) -> u64 {
        self.id
    }
    /// Checks the canary is intact (called where the value is used).
    pub(crate) fn check(&self) {
        if self.magic != MAGIC {
            fail(format!(
                "canary {} ({}): corrupted ({:#x}) when used",
                self.id, self.what, self.magic
            ));
        }
    }
}

impl Drop for Canary {
    fn drop(&mut self) {
        if self.magic != MAGIC {
            fail(format!(
                "canary {} ({}): dropped twice or corrupted ({:#x})",
                self.id, self.what, self.magic
            ));
            return;
        }
        self.magic = 0xDEAD;
        if self.strict && tid() != self.home {
            fail(format!(
                "canary {} ({}): dropped on thread {}, its home is {}",
                self.id,
                self.what,
                tid(),
                self.home
            ));
        }
        let live = ledger()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
        if live.is_none() {
            fail(format!("canary {} ({}): dropped twice", self.id, self.what));
        }
    }
}

// ---------------------------------------------------------- kernel buffers

pub(crate) const KLEN: usize = 256;
const GUARD: usize = 64;
const GUARD_BYTE: u8 = 0xC3;
const FREED: u8 = 0x5A;

/// Leaked ("freed") kernel buffers of the running program: address, len.
static GRAVEYARD: Mutex<Vec<(usize, usize)>> = Mutex::new(Vec::new());

/// A buffer lent to a kernel read, with canary bytes on each side. Its drop
/// checks them, fills the lent part with `FREED` and leaks it into the
/// graveyard: a kernel write landing after the request was reaped shows
/// there when the program ends (AddressSanitizer and valgrind cannot see
/// kernel writes).
#[derive(Debug)]
pub(crate) struct KBuf {
    bytes: Box<[u8]>,
}

impl KBuf {
    pub(crate) fn new() -> KBuf {
        KBuf {
            bytes: vec![GUARD_BYTE; KLEN + 2 * GUARD].into_boxed_slice(),
        }
    }
    pub(crate) fn lent(&mut self) -> &mut [u8] {
        &mut self.bytes[GUARD..GUARD + KLEN]
    }
    fn guards_intact(bytes: &[u8]) -> bool {
        bytes[..GUARD].iter().all(|&b| b == GUARD_BYTE)
            && bytes[GUARD + KLEN..].iter().all(|&b| b == GUARD_BYTE)
    }
}

impl Drop for KBuf {
    fn drop(&mut self) {
        if !KBuf::guards_intact(&self.bytes) {
            fail("kernel buffer: a write landed outside the lent bytes".into());
        }
        self.bytes[GUARD..GUARD + KLEN].fill(FREED);
        let b = std::mem::take(&mut self.bytes);
        let len = b.len();
        let p = Box::leak(b).as_mut_ptr() as usize;
        GRAVEYARD
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((p, len));
    }
}

/// Checks every "freed" buffer of the program, then frees them for real.
fn check_graveyard() {
    let bufs = std::mem::take(&mut *GRAVEYARD.lock().unwrap_or_else(|e| e.into_inner()));
    for (p, len) in bufs {
        // SAFETY: leaked by `KBuf::drop` with this length; every thread of
        // the program has ended, so nothing else refers to it, and it is
        // freed once, here.
        let b = unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(p as *mut u8, len)) };
        let written = b[GUARD..GUARD + KLEN]
            .iter()
            .filter(|&&x| x != FREED)
            .count();
        if written != 0 || !KBuf::guards_intact(&b) {
            fail(format!(
                "kernel buffer: {written} bytes written after its request was reaped"
            ));
        }
    }
}

// ------------------------------------------------------------------ panics

/// Messages of the panics a fuzz program may cause: its own, and the
/// documented misuse messages of the calls it makes on purpose.
const ALLOWED: &[&str] = &[
    "fuzz: deliberate panic",
    "called outside a coroutine",
    "called off the context's home thread",
    "was already scheduled",
    "has no AioContext",
    "has already finished",
    "re-entered recursively",
    "another coroutine already sleeps on this CoSleep",
    "this coroutine has no resumer",
    "cannot join itself",
    "joining a coroutine that entered this one",
    "the result was already taken",
    "the coroutine has no AioContext for its timer",
    // Two deliberate panics in one enter: the second is logged and dropped
    // (crate docs, "Panics").
    "a second coroutine panicked in one enter",
    "CoroutineFuture: its coroutine ended without a result: it was cancelled",
    "the AioContext shut down before the task finished",
];

pub(crate) fn allowed(msg: &str) -> bool {
    ALLOWED.iter().any(|a| msg.contains(a))
}

/// Installs the panic hook (once): a panic whose message is not allowed is
/// a failure of the running program; allowed ones stay quiet.
pub(crate) fn install_hook() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let msg = info
                .payload()
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| info.payload().downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "<non-string payload>".into());
            if allowed(&msg) {
                return;
            }
            if FUZZING.load(Ordering::Relaxed) != 0 {
                let loc = info
                    .location()
                    .map(|l| format!(" at {}:{}", l.file(), l.line()))
                    .unwrap_or_default();
                fail(format!("unexpected panic{loc}: {msg}"));
            }
            prev(info);
        }));
    });
}

static FUZZING: AtomicU64 = AtomicU64::new(0);

// ------------------------------------------------------------------ logs

/// Log lines of the running program that say something was leaked.
static LEAK_LINES: AtomicU64 = AtomicU64::new(0);
static ERRORS: Mutex<Vec<String>> = Mutex::new(Vec::new());

struct Logger;

impl log::Log for Logger {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        let line = format!("{}", record.args());
        if line.contains("leak") {
            LEAK_LINES.fetch_add(1, Ordering::Relaxed);
        }
        if std::env::var_os("COROLOOP_FUZZ_LOG").is_some() {
            eprintln!("[{} {}] {line}", record.level(), tid());
        }
        if record.level() == log::Level::Error && FUZZING.load(Ordering::Relaxed) != 0 {
            let mut e = ERRORS.lock().unwrap_or_else(|e| e.into_inner());
            if e.len() < 5 {
                e.push(line);
            }
        }
    }
    fn flush(&self) {}
}

pub(crate) fn install_logger() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        log::set_logger(&Logger).expect("the only logger of this test binary");
        log::set_max_level(log::LevelFilter::Warn);
    });
}

// ------------------------------------------------------------ a program

/// Open file descriptors of the process.
pub(crate) fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

static FDS_AT_BEGIN: AtomicU64 = AtomicU64::new(0);
/// Programs that leaked fds (with a leak log line), and how many fds.
pub(crate) static FD_LEAKS: AtomicU64 = AtomicU64::new(0);
pub(crate) static FDS_LEAKED: AtomicU64 = AtomicU64::new(0);

/// Starts a program's bookkeeping.
pub(crate) fn begin() {
    FDS_AT_BEGIN.store(open_fds() as u64, Ordering::Relaxed);
    install_hook();
    install_logger();
    FAILURES.lock().unwrap_or_else(|e| e.into_inner()).clear();
    ERRORS.lock().unwrap_or_else(|e| e.into_inner()).clear();
    LEAK_LINES.store(0, Ordering::Relaxed);
    GENERATION.fetch_add(1, Ordering::Relaxed);
    FUZZING.store(1, Ordering::Relaxed);
}

/// Ends a program (every thread of it ended): checks the buffers and the
/// canaries, and returns the failures.
pub(crate) fn end() -> Vec<String> {
    check_graveyard();
    // A thread-pool job whose coroutine was cancelled may still be
    // running: its pool thread drops it when it finishes. Give it a moment
    // (the other `Send` values are dropped by the program's own threads,
    // which have ended, or leaked with a log line).
    let generation = GENERATION.load(Ordering::Relaxed);
    for _ in 0..250 {
        let pending = ledger()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .any(|l| l.generation == generation && l.what == "pool work");
        if !pending {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    // Every fd the program opened is closed, or the library said it leaked
    // something (a leaked context keeps its epoll, eventfd and io_uring).
    let before = FDS_AT_BEGIN.load(Ordering::Relaxed);
    let after = open_fds() as u64;
    if after > before {
        if LEAK_LINES.load(Ordering::Relaxed) == 0 {
            fail(format!(
                "{} file descriptors left open without a leak log line",
                after - before
            ));
        } else {
            FD_LEAKS.fetch_add(1, Ordering::Relaxed);
            FDS_LEAKED.fetch_add(after - before, Ordering::Relaxed);
        }
    }
    let live: Vec<(u64, &'static str)> = ledger()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter(|(_, l)| l.generation == generation)
        .map(|(id, l)| (*id, l.what))
        .collect();
    if !live.is_empty() && LEAK_LINES.load(Ordering::Relaxed) == 0 {
        let mut kinds: Vec<&str> = live.iter().map(|(_, w)| *w).collect();
        kinds.sort_unstable();
        kinds.dedup();
        fail(format!(
            "{} values were neither dropped nor reported leaked (no log line): {:?}",
            live.len(),
            kinds
        ));
    }
    // Canaries of this program leaked with a log line stay in the ledger
    // under their generation: later programs do not count them, and a
    // late drop of one is not taken for a second drop.
    for e in ERRORS.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
        if !e.contains("leak") && !allowed(&e) {
            fail(format!("error log line: {e}"));
        }
    }
    FUZZING.store(0, Ordering::Relaxed);
    std::mem::take(&mut *FAILURES.lock().unwrap_or_else(|e| e.into_inner()))
}
