//! Stack overflow inside a coroutine is reported by name and aborts; other
//! faults keep their usual behaviour. Each case runs in a child process
//! (this test binary re-run with one test selected and an env var set).

use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Output};

use coroloop::coroutine::{self, Coroutine};

const CHILD_ENV: &str = "COROLOOP_OVERFLOW_CHILD";

fn run_child(test: &str) -> Output {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, test)
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap()
}

fn is_child(test: &str) -> bool {
    std::env::var(CHILD_ENV).as_deref() == Ok(test)
}

/// AddressSanitizer owns SIGSEGV; the ASan script sets this.
fn skip_under_asan() -> bool {
    std::env::var_os("COROLOOP_ASAN").is_some()
}

#[inline(never)]
#[allow(unconditional_recursion)] // overflowing the stack is the point
fn recurse(depth: u64) -> u64 {
    let frame = [depth; 64];
    std::hint::black_box(&frame);
    recurse(depth + 1) + std::hint::black_box(frame[7])
}

fn child_overflow_named() {
    let co = coroutine::Builder::new()
        .name("NAME")
        .stack_size(64 * 1024)
        .build(|| recurse(0))
        .unwrap();
    co.enter();
    unreachable!("the overflow aborts");
}

#[test]
fn overflow_named() {
    if is_child("overflow_named") {
        return child_overflow_named();
    }
    if skip_under_asan() {
        return;
    }
    let out = run_child("overflow_named");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("coroutine 'NAME' has overflowed its stack"),
        "stderr: {stderr}"
    );
    assert_eq!(out.status.signal(), Some(libc::SIGABRT), "{:?}", out.status);
}

#[test]
fn overflow_unnamed_nested() {
    if is_child("overflow_unnamed_nested") {
        // The overflowing coroutine is two levels deep, on a pooled
        // default-size stack.
        let outer = Coroutine::new(|| {
            let inner = Coroutine::new(|| recurse(0));
            inner.enter();
        });
        outer.enter();
        unreachable!("the overflow aborts");
    }
    if skip_under_asan() {
        return;
    }
    let out = run_child("overflow_unnamed_nested");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stderr
        .lines()
        .find(|l| l.ends_with("has overflowed its stack"))
        .unwrap_or_else(|| panic!("no report in stderr: {stderr}"));
    assert!(line.starts_with("coroutine 0x"), "{line}");
    assert_eq!(out.status.signal(), Some(libc::SIGABRT), "{:?}", out.status);
}

#[test]
fn other_segfaults_are_not_reported_as_overflows() {
    if is_child("other_segfaults_are_not_reported_as_overflows") {
        // Make sure the handler is installed, then fault outside any guard.
        Coroutine::new(|| ()).enter();
        let co = Coroutine::new(|| {
            // SAFETY: none; this deliberately faults to test the handler.
            unsafe { std::ptr::write_volatile(16 as *mut u64, 1) };
        });
        co.enter();
        unreachable!("the fault kills the process");
    }
    if skip_under_asan() {
        return;
    }
    let out = run_child("other_segfaults_are_not_reported_as_overflows");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("overflowed"), "stderr: {stderr}");
    assert_eq!(out.status.signal(), Some(libc::SIGSEGV), "{:?}", out.status);
}

#[test]
fn thread_stack_overflow_is_still_reported_by_std() {
    if is_child("thread_stack_overflow_is_still_reported_by_std") {
        Coroutine::new(|| ()).enter();
        std::thread::Builder::new()
            .name("deep".into())
            .stack_size(256 * 1024)
            .spawn(|| recurse(0))
            .unwrap()
            .join()
            .unwrap();
        unreachable!();
    }
    if skip_under_asan() {
        return;
    }
    let out = run_child("thread_stack_overflow_is_still_reported_by_std");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("thread 'deep'") && stderr.contains("has overflowed its stack"),
        "stderr: {stderr}"
    );
    assert!(!stderr.contains("coroutine"), "stderr: {stderr}");
    assert_eq!(out.status.signal(), Some(libc::SIGABRT), "{:?}", out.status);
}

#[test]
fn coroutine_on_a_thread_without_an_altstack_reports_too() {
    // Threads not spawned by std have no alternate signal stack; coroloop
    // installs one the first time the thread builds a coroutine.
    if is_child("coroutine_on_a_thread_without_an_altstack_reports_too") {
        extern "C" fn body(_: *mut libc::c_void) -> *mut libc::c_void {
            let co = coroutine::Builder::new()
                .name("raw-thread")
                .build(|| recurse(0))
                .unwrap();
            co.enter();
            std::ptr::null_mut()
        }
        let mut t: libc::pthread_t = 0;
        // SAFETY: plain pthread_create with a valid entry point.
        unsafe {
            assert_eq!(
                libc::pthread_create(&mut t, std::ptr::null(), body, std::ptr::null_mut()),
                0
            );
            libc::pthread_join(t, std::ptr::null_mut());
        }
        unreachable!();
    }
    if skip_under_asan() {
        return;
    }
    let out = run_child("coroutine_on_a_thread_without_an_altstack_reports_too");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("coroutine 'raw-thread' has overflowed its stack"),
        "stderr: {stderr}"
    );
    assert_eq!(out.status.signal(), Some(libc::SIGABRT), "{:?}", out.status);
}
