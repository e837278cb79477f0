//! Guard-paged coroutine stacks and the process-wide mapping budget.
//!
//! Every stack is one `mmap` whose lowest page is `PROT_NONE` (the guard
//! page), so it costs the process two memory mappings (VMAs). Linux refuses
//! new mappings beyond `vm.max_map_count` (65530 by default), and a process
//! that hits that limit cannot spawn a thread, grow its heap with `mmap` or
//! even print a backtrace. QEMU learnt this in 2024, when idle stacks kept
//! in its coroutine pools used up the mappings of guests with many queues;
//! it now keeps 5,000 mappings in reserve for the rest of the process.
//!
//! coroloop does the same: every live stack (running, suspended or idle in
//! a pool) is counted in [`LIVE_STACKS`], and a new stack is refused with an
//! `io::Error` once the count would reach
//! `(max_map_count - RESERVED_MAPPINGS) / 2`. Before refusing, the caller
//! gives back the idle stacks of the pools (see `pool.rs`).

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::OnceLock;

use corosensei::stack::{DefaultStack, Stack, StackPointer};

/// Default usable stack size: 1 MiB, as QEMU's `COROUTINE_STACK_SIZE`.
///
/// Only the pages a coroutine touches become resident, so a lightly used
/// stack costs a few KiB of memory whatever its size.
#[doc(alias = "COROUTINE_STACK_SIZE")]
pub const DEFAULT_STACK_SIZE: usize = 1024 * 1024;

/// Smallest stack size the builder accepts (one page is corosensei's floor;
/// a Rust frame with formatting needs more, so we ask for four).
pub const MIN_STACK_SIZE: usize = 16 * 1024;

/// Mappings kept free for the rest of the process (QEMU's figure).
pub(crate) const RESERVED_MAPPINGS: usize = 5000;

/// Stacks currently mapped by this process through coroloop.
static LIVE_STACKS: AtomicUsize = AtomicUsize::new(0);

/// The limit on [`LIVE_STACKS`]; 0 means "not yet computed".
static STACK_LIMIT: AtomicUsize = AtomicUsize::new(0);

fn default_limit() -> usize {
    static DEFAULT: OnceLock<usize> = OnceLock::new();
    *DEFAULT.get_or_init(|| {
        let max_map_count = std::fs::read_to_string("/proc/sys/vm/max_map_count")
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok());
        match max_map_count {
            Some(n) => n.saturating_sub(RESERVED_MAPPINGS) / 2,
            // Not Linux, or /proc unavailable: no budget of our own.
            None => usize::MAX,
        }
    })
}

/// The most stacks coroloop keeps mapped at once, in use and pooled together.
///
/// By default this is `(vm.max_map_count - 5000) / 2`: each guarded stack
/// costs two mappings, and 5,000 mappings stay free for the rest of the
/// process (thread stacks, `malloc` arenas, files), as QEMU reserves.
/// Creating a coroutine beyond the limit fails with an `io::Error` of kind
/// `OutOfMemory` instead of exhausting the process's mappings.
///
/// # Examples
///
/// ```
/// let limit = coroloop::coroutine::max_live_stacks();
/// assert!(limit > 0);
/// ```
#[doc(alias = "get_global_pool_hard_max_size")]
#[doc(alias = "max_map_count")]
pub fn max_live_stacks() -> usize {
    match STACK_LIMIT.load(Relaxed) {
        0 => default_limit(),
        n => n,
    }
}

/// Lowers (or raises) the limit reported by [`max_live_stacks`].
///
/// Meant for tests and for processes that know their own mapping budget
/// (a process that maps many files may want a smaller share for stacks).
/// Stacks already mapped are not affected.
///
/// # Panics
///
/// Panics if `limit` is 0.
pub fn set_max_live_stacks(limit: usize) {
    assert!(
        limit > 0,
        "coroutine::set_max_live_stacks: limit must be > 0"
    );
    STACK_LIMIT.store(limit, Relaxed);
}

/// Number of coroutine stacks currently mapped (in use or pooled).
///
/// # Examples
///
/// ```
/// let _co = coroloop::Coroutine::new(|| ());
/// assert!(coroloop::coroutine::live_stacks() >= 1);
/// ```
pub fn live_stacks() -> usize {
    LIVE_STACKS.load(Relaxed)
}

/// A guarded stack counted against the mapping budget.
pub(crate) struct CoStack {
    inner: DefaultStack,
    /// Usable size that was asked for (the pool keys on it).
    size: usize,
}

impl std::fmt::Debug for StackBounds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "guard {:#x}..{:#x}", self.guard_lo, self.guard_hi)
    }
}

/// The guard page range of a stack: faults in it are stack overflows.
#[derive(Clone, Copy, Default)]
pub(crate) struct StackBounds {
    pub(crate) guard_lo: usize,
    pub(crate) guard_hi: usize,
}

pub(crate) fn page_size() -> usize {
    static PAGE: OnceLock<usize> = OnceLock::new();
    // SAFETY: sysconf has no memory-safety preconditions.
    *PAGE.get_or_init(|| unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize)
}

impl CoStack {
    /// Maps a new stack of at least `size` usable bytes, or fails with
    /// `OutOfMemory` if the mapping budget is spent or `mmap` fails.
    ///
    /// Never panics: corosensei's own `Default` stack panics on failure, and
    /// a panic at mapping exhaustion can hang the process while printing a
    /// backtrace.
    pub(crate) fn new(size: usize) -> io::Result<CoStack> {
        let limit = max_live_stacks();
        // Reserve a slot first so concurrent creators cannot overshoot.
        let prev = LIVE_STACKS.fetch_add(1, Relaxed);
        if prev >= limit {
            LIVE_STACKS.fetch_sub(1, Relaxed);
            return Err(io::Error::new(
                io::ErrorKind::OutOfMemory,
                format!(
                    "coroutine stack limit reached: {prev} stacks mapped, limit {limit} \
                     ((vm.max_map_count - {RESERVED_MAPPINGS}) / 2, see coroutine::max_live_stacks)"
                ),
            ));
        }
        match DefaultStack::new(size) {
            Ok(inner) => Ok(CoStack { inner, size }),
            Err(e) => {
                LIVE_STACKS.fetch_sub(1, Relaxed);
                Err(io::Error::new(
                    e.kind(),
                    format!("cannot map a coroutine stack of {size} bytes: {e}"),
                ))
            }
        }
    }

    pub(crate) fn size(&self) -> usize {
        self.size
    }

    pub(crate) fn bounds(&self) -> StackBounds {
        let lo = self.inner.limit().get();
        StackBounds {
            guard_lo: lo,
            guard_hi: lo + page_size(),
        }
    }
}

impl Drop for CoStack {
    fn drop(&mut self) {
        // `inner` unmaps itself right after this.
        LIVE_STACKS.fetch_sub(1, Relaxed);
    }
}

// SAFETY: delegates to corosensei's DefaultStack, which has a guard page and
// at least MIN_STACK_SIZE usable bytes.
unsafe impl Stack for CoStack {
    #[inline]
    fn base(&self) -> StackPointer {
        self.inner.base()
    }

    #[inline]
    fn limit(&self) -> StackPointer {
        self.inner.limit()
    }
}

/// Rounds a requested stack size to what the builder will map.
pub(crate) fn round_stack_size(size: usize) -> usize {
    let page = page_size();
    let size = size.max(MIN_STACK_SIZE);
    size.checked_add(page - 1)
        .map_or(usize::MAX & !(page - 1), |s| s & !(page - 1))
}
