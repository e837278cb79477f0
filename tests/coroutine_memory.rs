//! Memory: many suspended coroutines with small stacks, and creation until
//! the stack budget below `vm.max_map_count` runs out.

use std::process::Command;

use coroloop::coroutine::{self, Builder, Coroutine};

const CHILD_ENV: &str = "COROLOOP_MEMORY_CHILD";

fn rss_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: usize = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    // SAFETY: sysconf has no preconditions.
    pages * unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize
}

fn suspended_small(i: u32) -> std::io::Result<Coroutine<u32>> {
    let co = Builder::new().stack_size(16 * 1024).build(move || {
        coroutine::suspend();
        i
    })?;
    co.enter();
    Ok(co)
}

#[test]
fn twenty_thousand_suspended_coroutines() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    const N: u32 = 20_000;
    let before_stacks = coroutine::live_stacks();
    let before = rss_bytes();
    let cos: Vec<_> = (0..N).map(|i| suspended_small(i).unwrap()).collect();
    let after = rss_bytes();
    let per = after.saturating_sub(before) / N as usize;
    println!("RSS per suspended coroutine (16 KiB stack): {per} bytes");
    assert!(coroutine::live_stacks() >= before_stacks + N as usize);
    assert!(
        per < 16 * 1024,
        "a lightly used 16 KiB stack should not be fully resident: {per} bytes"
    );
    let mut sum = 0u64;
    for co in &cos {
        co.enter();
        sum += u64::from(co.take_result().unwrap());
    }
    assert_eq!(sum, u64::from(N) * u64::from(N - 1) / 2);
    drop(cos);
}

/// Child: create suspended coroutines until creation fails, then check the
/// process is still healthy and recovers.
fn exhaustion_child() {
    let max_map_count: usize = std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let expected_min = if max_map_count > 1_000_000 {
        // A huge map count would take minutes to exhaust: use our own knob.
        coroutine::set_max_live_stacks(30_000);
        30_000 - 1000
    } else {
        (max_map_count - 5000) / 2 - 1000
    };
    let mut cos = Vec::new();
    let err = loop {
        match suspended_small(cos.len() as u32) {
            Ok(co) => cos.push(co),
            Err(e) => break e,
        }
    };
    let live = cos.len();
    println!("live={live} max_map_count={max_map_count} error={err}");
    assert_eq!(err.kind(), std::io::ErrorKind::OutOfMemory, "{err}");
    assert!(
        err.to_string().starts_with("coroutine::Builder::build: "),
        "the error names the call: {err}"
    );
    assert!(
        live >= expected_min,
        "only {live} coroutines before failing"
    );
    // Creating through the panicking path would panic with the same error;
    // the fallible path must keep failing cleanly.
    assert!(Builder::new().build(|| ()).is_err());
    // The process is healthy: a thread can be spawned, memory allocated.
    let t = std::thread::spawn(|| {
        let v = vec![1u8; 1 << 20];
        v.iter().map(|&b| b as usize).sum::<usize>()
    });
    assert_eq!(t.join().unwrap(), 1 << 20);
    let big = vec![7u8; 1 << 20];
    assert_eq!(big[12345], 7);
    // Finish half of them: creation works again.
    let mut sum = 0u64;
    for co in cos.drain(live / 2..) {
        co.enter();
        sum += u64::from(co.take_result().unwrap());
    }
    assert!(sum > 0);
    let again = suspended_small(0).expect("creation works again");
    // Unwind the rest by dropping them.
    drop(cos);
    drop(again);
    let co = Coroutine::new(|| 42);
    co.enter();
    assert_eq!(co.take_result(), Some(42));
    println!("recovered");
}

#[test]
fn creation_fails_cleanly_when_stacks_run_out() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return exhaustion_child();
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "creation_fails_cleanly_when_stacks_run_out",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "child failed: {:?}\nstdout: {stdout}\nstderr: {stderr}",
        out.status
    );
    assert!(stdout.contains("recovered"), "{stdout}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
