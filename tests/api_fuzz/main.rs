//! A seeded API-sequence fuzzer: random programs over the public API, run
//! on three worker threads (and IoThreads), checked for the invariants of
//! `check.rs`, replayable from their seed and shrunk to a short program
//! printed as Rust (which goes into `regressions.rs`).
//!
//! ```text
//! cargo test --test api_fuzz                       # a short slice (3 s, fixed seed)
//! COROLOOP_FUZZ_SECS=600 cargo test --release --test api_fuzz -- --ignored fuzz_long
//! scripts/fuzz.sh asan 60                          # under AddressSanitizer
//! COROLOOP_FUZZ_PROGRAM=<seed> cargo test --test api_fuzz -- --ignored replay
//! ```
//!
//! Environment: `COROLOOP_FUZZ_SEED` (the run's seed; random for
//! `fuzz_long` if unset, fixed for `fuzz_slice`, printed either way), `COROLOOP_FUZZ_SECS` (time budget),
//! `COROLOOP_FUZZ_CALLS` (API-call budget), `COROLOOP_FUZZ_PROGRAM` (one
//! program's seed, for `replay`), `COROLOOP_FUZZ_SHRINK=0` (report a
//! failure without shrinking it), `COROLOOP_FUZZ_LOG=1` (print the
//! library's log lines), `COROLOOP_FUZZ_HANG_SECS` (a step's time limit,
//! default 30), `COROLOOP_FUZZ_NO_URING=1` (no io_uring: for valgrind).
//! `COROLOOP_SEED` is `tests/stray_wakes.rs`'s and is not
//! read here.

mod check;
#[path = "../common/mod.rs"]
mod common;
mod exec;
mod program;
mod regressions;

use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use program::{generate, program_seed, prune, to_rust, Program};

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    match v.parse() {
        Ok(n) => Some(n),
        Err(_) => panic!("{name}={v}: not a number"),
    }
}

fn fresh_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    program::Rng::new(t ^ ((std::process::id() as u64) << 32)).next()
}

/// A quarter of the programs end with a documented leak (a thread that
/// exits with coroutines suspended leaks them, and whatever their stacks
/// hold: often a context, with its epoll, eventfd and io_uring fds), each
/// with its log line: long runs need more than the usual soft limit.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to an rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn fd_limit() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit with a valid pointer to an rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        lim.rlim_cur as usize
    } else {
        1024
    }
}

/// Runs programs until the budget is spent; panics with the first
/// failure, shrunk, as Rust.
fn fuzz(default_secs: u64, default_seed: Option<u64>) {
    raise_fd_limit();
    let base = env_u64("COROLOOP_FUZZ_SEED")
        .or(default_seed)
        .unwrap_or_else(fresh_seed);
    let secs = env_u64("COROLOOP_FUZZ_SECS").unwrap_or(default_secs);
    let max_calls = env_u64("COROLOOP_FUZZ_CALLS").unwrap_or(u64::MAX);
    println!("api_fuzz: seed {base} (replay the run: COROLOOP_FUZZ_SEED={base}), {secs} s");
    let t0 = Instant::now();
    let calls0 = check::CALLS.load(Ordering::Relaxed);
    let mut programs = 0u64;
    let fd_budget = fd_limit() / 2;
    while t0.elapsed() < Duration::from_secs(secs)
        && check::CALLS.load(Ordering::Relaxed) - calls0 < max_calls
    {
        if check::open_fds() > fd_budget {
            // The documented leaks have used half the fd limit: the rest of
            // the budget needs a fresh process (scripts/fuzz.sh starts one).
            println!("api_fuzz: fd budget reached ({fd_budget} open): stopping this process");
            break;
        }
        let pseed = program_seed(base, programs);
        let p = generate(pseed);
        let failures = exec::run_program(&p, &format!("program seed {pseed}"));
        programs += 1;
        if !failures.is_empty() {
            report(pseed, &p, &failures);
        }
    }
    let calls = check::CALLS.load(Ordering::Relaxed) - calls0;
    let el = t0.elapsed().as_secs_f64();
    println!(
        "api_fuzz: {programs} programs, {calls} API calls in {el:.1} s ({:.0} calls/s), clean; \
         {} programs leaked {} fds with a leak log line",
        calls as f64 / el,
        check::FD_LEAKS.load(Ordering::Relaxed),
        check::FDS_LEAKED.load(Ordering::Relaxed),
    );
}

fn report(pseed: u64, p: &Program, failures: &[String]) -> ! {
    eprintln!("api_fuzz: program seed {pseed} failed:");
    for f in failures {
        eprintln!("  - {f}");
    }
    eprintln!(
        "replay: COROLOOP_FUZZ_PROGRAM={pseed} cargo test --test api_fuzz -- --ignored replay"
    );
    let shown = if std::env::var("COROLOOP_FUZZ_SHRINK").as_deref() == Ok("0") {
        p.clone()
    } else {
        shrink(pseed, &signature(&failures[0]))
    };
    eprintln!(
        "program ({} steps):\n{}",
        shown.steps.len(),
        to_rust(&shown)
    );
    panic!("api_fuzz: program seed {pseed} failed: {}", failures[0]);
}

/// A failure's kind: its text without numbers (fds, ids, seeds), cut short.
fn signature(failure: &str) -> String {
    let s: String = failure.chars().filter(|c| !c.is_ascii_digit()).collect();
    s.chars().take(70).collect()
}

/// Whether program `pseed` without the nodes `deleted` still fails the
/// same way (`sig`), in a child process (a sanitizer report or a hang
/// counts when `sig` is one); three tries, since thread timing varies.
fn still_fails(pseed: u64, deleted: &[usize], sig: &str) -> bool {
    let ids: Vec<String> = deleted.iter().map(|i| i.to_string()).collect();
    (0..3).any(|_| {
        let out = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "child", "--include-ignored", "--nocapture"])
            .env("COROLOOP_FUZZ_CHILD", "1")
            .env("COROLOOP_FUZZ_PROGRAM", pseed.to_string())
            .env("COROLOOP_FUZZ_DELETE", ids.join(","))
            .env("COROLOOP_FUZZ_HANG_SECS", "10")
            .output()
            .expect("running the test binary");
        if out.status.success() {
            return false;
        }
        let text = String::from_utf8_lossy(&out.stderr).to_string()
            + &String::from_utf8_lossy(&out.stdout);
        let text: String = text.chars().filter(|c| !c.is_ascii_digit()).collect();
        text.contains(sig)
    })
}

/// Deletes steps, then single ops, while the program still fails.
fn shrink(pseed: u64, sig: &str) -> Program {
    let p = generate(pseed);
    let limit = Duration::from_secs(env_u64("COROLOOP_FUZZ_SHRINK_SECS").unwrap_or(300));
    let t0 = Instant::now();
    if !still_fails(pseed, &[], sig) {
        eprintln!("api_fuzz: the failure did not repeat in a child process: not shrunk");
        return p;
    }
    let mut deleted: Vec<usize> = Vec::new();
    // Chunks of top-level steps, halving.
    let tops = program::top_ids(&p);
    let mut chunk = tops.len().div_ceil(2);
    while chunk >= 1 && t0.elapsed() < limit {
        let live: Vec<usize> = tops
            .iter()
            .copied()
            .filter(|i| !deleted.contains(i))
            .collect();
        for part in live.chunks(chunk) {
            if t0.elapsed() > limit {
                break;
            }
            let mut cand = deleted.clone();
            cand.extend_from_slice(part);
            if still_fails(pseed, &cand, sig) {
                deleted = cand;
            }
        }
        if chunk == 1 {
            break;
        }
        chunk /= 2;
    }
    // Single ops, nested ones included.
    for id in 0..program::count_nodes(&p) {
        if t0.elapsed() > limit {
            break;
        }
        if deleted.contains(&id) {
            continue;
        }
        let mut cand = deleted.clone();
        cand.push(id);
        if prune(&p, &cand) == prune(&p, &deleted) {
            continue; // inside a deleted body already
        }
        if still_fails(pseed, &cand, sig) {
            deleted = cand;
        }
    }
    eprintln!(
        "api_fuzz: shrunk in {:.0} s; deleted ids: {deleted:?}",
        t0.elapsed().as_secs_f64()
    );
    prune(&p, &deleted)
}

/// A short slice in every `cargo test` run, with a fixed seed (the same
/// programs each time; thread timing still varies). Fresh seeds are for
/// `fuzz_long` (`scripts/fuzz.sh`, which CI runs under ASan).
#[test]
fn fuzz_slice() {
    fuzz(3, Some(0x00C0_10FF_2026_1203));
}

/// The long run: `COROLOOP_FUZZ_SECS` (default 600) or
/// `COROLOOP_FUZZ_CALLS`.
#[test]
#[ignore = "long: run on demand (scripts/fuzz.sh)"]
fn fuzz_long() {
    fuzz(600, None);
}

/// One program: `COROLOOP_FUZZ_PROGRAM=<seed>`.
#[test]
#[ignore = "replays COROLOOP_FUZZ_PROGRAM"]
fn replay() {
    let Some(pseed) = env_u64("COROLOOP_FUZZ_PROGRAM") else {
        panic!("set COROLOOP_FUZZ_PROGRAM to a program seed");
    };
    let p = generate(pseed);
    println!("{}", to_rust(&p));
    if let Ok(sig) = std::env::var("COROLOOP_FUZZ_SIG") {
        // A failure that ends the process (a hang, a sanitizer report):
        // shrink it in child processes, by a text its output shows.
        let shown = shrink(pseed, &signature(&sig));
        panic!("shrunk ({} steps):\n{}", shown.steps.len(), to_rust(&shown));
    }
    let failures = exec::run_program(&p, &format!("program seed {pseed}"));
    if !failures.is_empty() {
        report(pseed, &p, &failures);
    }
}

/// The shrinker's child: one program with some ops deleted (run by
/// `still_fails` in a child process).
#[test]
#[ignore = "the shrinker's child process"]
fn child() {
    assert!(
        std::env::var_os("COROLOOP_FUZZ_CHILD").is_some(),
        "run by the shrinker only"
    );
    let pseed = env_u64("COROLOOP_FUZZ_PROGRAM").unwrap();
    let deleted: Vec<usize> = std::env::var("COROLOOP_FUZZ_DELETE")
        .unwrap_or_default()
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap())
        .collect();
    let p = prune(&generate(pseed), &deleted);
    let failures = exec::run_program(&p, "shrink candidate");
    for f in &failures {
        eprintln!("failure: {f}");
    }
    assert!(failures.is_empty(), "{} failures", failures.len());
}

/// Every program the fuzzer found failing, shrunk, runs clean now.
#[test]
fn regressions() {
    for (name, p) in regressions::programs() {
        for round in 0..3 {
            let failures = exec::run_program(&p, name);
            assert!(
                failures.is_empty(),
                "regression {name} (round {round}): {failures:?}"
            );
        }
    }
}

/// The generator is a function of the seed, and shrinking by ids removes
/// exactly the nodes named (with their bodies).
#[test]
fn generation_is_replayable_and_prunable() {
    let a = generate(42);
    assert_eq!(a, generate(42));
    assert_ne!(a, generate(43));
    let n = program::count_nodes(&a);
    assert!(n >= a.steps.len());
    let all: Vec<usize> = program::top_ids(&a);
    assert!(prune(&a, &all).steps.is_empty());
    assert_eq!(prune(&a, &[]), a);
    let one = prune(&a, &[all[0]]);
    assert_eq!(one.steps.len(), a.steps.len() - 1);
    assert_eq!(one.steps[..], a.steps[1..]);
    // The printer's output names every variant with `Op::`.
    let src = to_rust(&a);
    assert!(src.starts_with("Program {"), "{src}");
    assert!(
        !src.contains("body: [") && !src.contains("(0, CoNew"),
        "{src}"
    );
}
