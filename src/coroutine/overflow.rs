//! Stack-overflow reports for coroutines.
//!
//! A coroutine that runs past the end of its stack touches the guard page
//! and the kernel raises `SIGSEGV`. Without help the process dies with no
//! message. coroloop installs, once per process, a `SIGSEGV` handler that:
//!
//! 1. runs on the thread's alternate signal stack (the faulting stack is
//!    unusable). std gives one to the threads it spawns; for other threads
//!    coroloop installs one the first time the thread builds a coroutine;
//! 2. reads the running coroutine from a const-initialised thread-local and
//!    checks whether the fault address lies in its guard page;
//! 3. if so, writes `coroutine 'NAME' has overflowed its stack` (or the
//!    coroutine's address when unnamed) to stderr with `write(2)` and aborts.
//!    The message was rendered when the coroutine was created: the handler
//!    allocates and formats nothing;
//! 4. otherwise hands the fault to the handler that was installed before
//!    (std's, which reports overflows of thread stacks), or restores the
//!    default action so the fault kills the process as it would have.

use std::cell::Cell;
use std::ptr;
use std::sync::Once;
use std::sync::OnceLock;

use super::current;

struct PrevAction(libc::sigaction);
// SAFETY: a sigaction is plain data (a handler address, a mask and flags).
unsafe impl Sync for PrevAction {}
// SAFETY: as above.
unsafe impl Send for PrevAction {}

static PREV: OnceLock<PrevAction> = OnceLock::new();
static INSTALL: Once = Once::new();

thread_local! {
    /// Whether this thread's alternate signal stack has been checked.
    static ALTSTACK_CHECKED: Cell<bool> = const { Cell::new(false) };
    /// An alternate stack coroloop mapped for this thread, unmapped at exit.
    static ALTSTACK: AltStack = const { AltStack(Cell::new(ptr::null_mut()), Cell::new(0)) };
}

struct AltStack(Cell<*mut libc::c_void>, Cell<usize>);

impl Drop for AltStack {
    fn drop(&mut self) {
        // A coroloop thread-local is going: the thread's teardown began.
        super::teardown::begin_thread_teardown();
        let p = self.0.get();
        if p.is_null() {
            return;
        }
        let disable = libc::stack_t {
            ss_sp: ptr::null_mut(),
            ss_flags: libc::SS_DISABLE,
            ss_size: 0,
        };
        // SAFETY: we disable the alternate stack we installed on this thread
        // before unmapping it; no signal handler can be running on it here.
        unsafe {
            libc::sigaltstack(&disable, ptr::null_mut());
            libc::munmap(p, self.1.get());
        }
    }
}

/// Installs the process-wide handler and this thread's alternate stack.
/// Cheap after the first call on a thread.
pub(crate) fn ensure_installed() {
    if ALTSTACK_CHECKED.with(|c| c.replace(true)) {
        return;
    }
    INSTALL.call_once(install_handler);
    install_altstack();
}

fn install_handler() {
    // SAFETY: sigaction with a zeroed struct and a valid handler; we read the
    // previous action first and keep it for chaining.
    unsafe {
        let mut prev: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(libc::SIGSEGV, ptr::null(), &mut prev) != 0 {
            return;
        }
        let _ = PREV.set(PrevAction(prev));
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = handler as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        libc::sigemptyset(&mut act.sa_mask);
        libc::sigaction(libc::SIGSEGV, &act, ptr::null_mut());
    }
}

fn install_altstack() {
    // SAFETY: querying the current alternate stack has no preconditions.
    let mut old: libc::stack_t = unsafe { std::mem::zeroed() };
    // SAFETY: `old` is a valid out-pointer.
    if unsafe { libc::sigaltstack(ptr::null(), &mut old) } != 0 {
        return;
    }
    if old.ss_flags & libc::SS_DISABLE == 0 {
        return; // std (or the application) already gave this thread one
    }
    let size = 64 * 1024;
    // SAFETY: anonymous private mapping, checked for failure.
    let p = unsafe {
        libc::mmap(
            ptr::null_mut(),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return; // overflow reports on this thread will be bare SIGSEGVs
    }
    let st = libc::stack_t {
        ss_sp: p,
        ss_flags: 0,
        ss_size: size,
    };
    // SAFETY: `st` describes the mapping made above, owned by ALTSTACK.
    if unsafe { libc::sigaltstack(&st, ptr::null_mut()) } != 0 {
        // SAFETY: unmapping the mapping we just made.
        unsafe { libc::munmap(p, size) };
        return;
    }
    let _ = ALTSTACK.try_with(|a| {
        a.0.set(p);
        a.1.set(size);
    });
}

/// Writes all of `buf` to stderr; async-signal-safe.
fn write_stderr(buf: &[u8]) {
    let mut off = 0;
    while off < buf.len() {
        // SAFETY: writing from a valid buffer to fd 2.
        let n = unsafe { libc::write(2, buf[off..].as_ptr().cast(), buf.len() - off) };
        if n <= 0 {
            return;
        }
        off += n as usize;
    }
}

/// Renders `coroutine 0x... has overflowed its stack\n` into `out`.
fn render_unnamed(addr: usize, out: &mut [u8; 64]) -> usize {
    let mut n = 0;
    for &b in b"coroutine 0x" {
        out[n] = b;
        n += 1;
    }
    let digits = b"0123456789abcdef";
    let mut started = false;
    for i in (0..usize::BITS / 4).rev() {
        let d = (addr >> (i * 4)) & 0xf;
        if d != 0 || started || i == 0 {
            started = true;
            out[n] = digits[d];
            n += 1;
        }
    }
    for &b in b" has overflowed its stack\n" {
        out[n] = b;
        n += 1;
    }
    n
}

extern "C" fn handler(sig: libc::c_int, info: *mut libc::siginfo_t, uctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let addr = unsafe { (*info).si_addr() } as usize;
    let cur = current::current_ptr_signal_safe();
    if !cur.is_null() {
        // SAFETY: the current coroutine's header is alive while it runs;
        // the fields read are plain values set before it was entered.
        let h = unsafe { &*cur };
        let b = h.bounds.get();
        if addr >= b.guard_lo && addr < b.guard_hi {
            // SAFETY: overflow_msg is only written at creation and reset,
            // never while the coroutine runs.
            match unsafe { &*h.overflow_msg.get() } {
                Some(msg) => write_stderr(msg),
                None => {
                    let mut buf = [0u8; 64];
                    let n = render_unnamed(cur as usize, &mut buf);
                    write_stderr(&buf[..n]);
                }
            }
            // SAFETY: abort is async-signal-safe.
            unsafe { libc::abort() };
        }
    }
    chain(sig, info, uctx);
}

fn chain(sig: libc::c_int, info: *mut libc::siginfo_t, uctx: *mut libc::c_void) {
    let prev = PREV.get().map(|p| p.0.sa_sigaction);
    let flags = PREV.get().map_or(0, |p| p.0.sa_flags);
    match prev {
        Some(h) if h != libc::SIG_DFL && h != libc::SIG_IGN => {
            if flags & libc::SA_SIGINFO != 0 {
                // SAFETY: the previous handler was installed with SA_SIGINFO,
                // so it has this signature.
                let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                    unsafe { std::mem::transmute(h) };
                f(sig, info, uctx);
            } else {
                // SAFETY: a plain handler takes only the signal number.
                let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(h) };
                f(sig);
            }
        }
        _ => {
            // Restore the default action: returning re-executes the faulting
            // instruction, which now kills the process with SIGSEGV.
            // SAFETY: resetting a signal disposition is async-signal-safe.
            unsafe {
                let mut dfl: libc::sigaction = std::mem::zeroed();
                dfl.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(sig, &dfl, ptr::null_mut());
            }
        }
    }
}

/// Renders the report for a named coroutine.
pub(crate) fn render_named(name: &str) -> Box<[u8]> {
    format!("coroutine '{name}' has overflowed its stack\n")
        .into_bytes()
        .into_boxed_slice()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unnamed_message_is_hex() {
        let mut buf = [0u8; 64];
        let n = render_unnamed(0x7f00_dead_beef, &mut buf);
        assert_eq!(
            std::str::from_utf8(&buf[..n]).unwrap(),
            "coroutine 0x7f00deadbeef has overflowed its stack\n"
        );
        let n = render_unnamed(0, &mut buf);
        assert_eq!(
            std::str::from_utf8(&buf[..n]).unwrap(),
            "coroutine 0x0 has overflowed its stack\n"
        );
    }
}
