//! File I/O engines (threads, io_uring, Linux AIO) through `CoFile` and
//! the engines' own calls: data checked at many offsets, short reads,
//! `O_DIRECT` alignment errors, 10,000 requests on a small ring, flush
//! ordering, and the unwind of a coroutine with a request in flight.
//!
//! Files live under `target/` (`/tmp` may be tmpfs, where `O_DIRECT`
//! fails); the tests run one at a time (a global lock). An engine the
//! kernel or a sandbox forbids is skipped with `SKIP: <reason>`, unless
//! `COROLOOP_REQUIRE_URING=1`.

use std::cell::{Cell, RefCell};
use std::fs::{File, OpenOptions};
use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::{Mutex, MutexGuard};

use coroloop::aio::{AioContext, AioMode, CoFile};
use coroloop::Coroutine;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

fn path(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("file_io");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(format!("{name}-{}", std::process::id()))
}

fn open_rw(p: &PathBuf, direct: bool) -> std::io::Result<File> {
    let mut o = OpenOptions::new();
    o.read(true).write(true).create(true);
    if direct {
        o.custom_flags(libc::O_DIRECT);
    }
    o.open(p)
}

fn require() -> bool {
    std::env::var("COROLOOP_REQUIRE_URING").is_ok_and(|v| v == "1")
}

/// Whether `mode` can be set up here (probed once per engine, on a context
/// of its own); prints `SKIP` otherwise.
fn available(ctx: &AioContext, mode: AioMode, test: &str) -> bool {
    static PROBES: std::sync::OnceLock<[Result<(), String>; 2]> = std::sync::OnceLock::new();
    let probes = PROBES.get_or_init(|| {
        let probe = AioContext::new().unwrap();
        [
            probe
                .linux_io_uring()
                .map(|_| ())
                .map_err(|e| e.to_string()),
            probe.linux_aio().map(|_| ()).map_err(|e| e.to_string()),
        ]
    });
    let r = match mode {
        AioMode::Threads => return true,
        AioMode::IoUring => &probes[0],
        AioMode::Native => &probes[1],
    };
    match r {
        Ok(()) => {
            // The engine works here: this context's must set up too.
            match mode {
                AioMode::IoUring => {
                    ctx.linux_io_uring().unwrap();
                }
                _ => {
                    ctx.linux_aio().unwrap();
                }
            }
            true
        }
        Err(e) => {
            assert!(
                !require(),
                "{test}: aio={mode} required but unavailable: {e}"
            );
            println!("SKIP: {test} aio={mode}: {e}");
            false
        }
    }
}

const MODES: [AioMode; 3] = [AioMode::Threads, AioMode::IoUring, AioMode::Native];

fn pattern(block: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (block.wrapping_mul(131) as usize + i * 7) as u8)
        .collect()
}

/// A buffer aligned for O_DIRECT.
struct Aligned {
    raw: Vec<u8>,
    off: usize,
    len: usize,
}

impl Aligned {
    fn new(len: usize) -> Aligned {
        let raw = vec![0u8; len + 4096];
        let off = raw.as_ptr().align_offset(4096);
        Aligned { raw, off, len }
    }
    fn buf(&mut self) -> &mut [u8] {
        &mut self.raw[self.off..self.off + self.len]
    }
}

/// Runs `n` coroutines made by `make` on `ctx` to completion.
fn run_all<T: 'static>(ctx: &AioContext, cos: Vec<Coroutine<T>>) -> Vec<T> {
    for c in &cos {
        c.enter();
    }
    ctx.poll_while(|| cos.iter().any(|c| !c.is_finished()));
    cos.iter().map(|c| c.take_result().unwrap()).collect()
}

#[test]
fn reads_and_writes_at_many_offsets_with_data_checked() {
    let _s = serial();
    for mode in MODES {
        let ctx = AioContext::new().unwrap();
        if !available(&ctx, mode, "many_offsets") {
            continue;
        }
        let p = path(&format!("offsets-{mode}"));
        let _ = std::fs::remove_file(&p);
        let f = Rc::new(CoFile::with_mode(&ctx, open_rw(&p, false).unwrap(), mode));
        assert_eq!(f.mode(), mode);
        const BLOCKS: u64 = 200;
        const BS: usize = 4096 + 512;
        // 50 coroutines write 4 scattered blocks each (plain and vectored).
        let cos: Vec<_> = (0..50u64)
            .map(|c| {
                let f = f.clone();
                Coroutine::new(move || {
                    for k in 0..4u64 {
                        let b = (c * 4 + k) * 37 % BLOCKS;
                        let data = pattern(b, BS);
                        let n = if k % 2 == 0 {
                            f.write_at(&data, b * BS as u64).unwrap()
                        } else {
                            let (a, z) = data.split_at(1000);
                            f.writev_at(&[IoSlice::new(a), IoSlice::new(z)], b * BS as u64)
                                .unwrap()
                        };
                        assert_eq!(n, BS);
                    }
                })
            })
            .collect();
        run_all(&ctx, cos);
        // Read back (plain and vectored) in coroutines.
        let cos: Vec<_> = (0..BLOCKS)
            .map(|b| {
                let f = f.clone();
                Coroutine::new(move || {
                    let mut buf = vec![0u8; BS];
                    if b % 2 == 0 {
                        assert_eq!(f.read_at(&mut buf, b * BS as u64).unwrap(), BS);
                    } else {
                        let (x, y) = buf.split_at_mut(3000);
                        let mut v = [IoSliceMut::new(x), IoSliceMut::new(y)];
                        assert_eq!(f.readv_at(&mut v, b * BS as u64).unwrap(), BS);
                    }
                    assert_eq!(buf, pattern(b, BS), "aio={mode}: block {b}");
                    1u64
                })
            })
            .collect();
        assert_eq!(run_all(&ctx, cos).iter().sum::<u64>(), BLOCKS);
        // And the file itself, read without the library.
        let mut all = Vec::new();
        File::open(&p).unwrap().read_to_end(&mut all).unwrap();
        for b in 0..BLOCKS {
            let at = b as usize * BS;
            assert_eq!(
                &all[at..at + BS],
                &pattern(b, BS)[..],
                "aio={mode}: file block {b}"
            );
        }
        drop(f);
        std::fs::remove_file(&p).unwrap();
    }
}

#[test]
fn short_reads_at_end_of_file() {
    let _s = serial();
    for mode in MODES {
        let ctx = AioContext::new().unwrap();
        if !available(&ctx, mode, "short_reads") {
            continue;
        }
        let p = path(&format!("eof-{mode}"));
        std::fs::write(&p, pattern(1, 10_000)).unwrap();
        let f = CoFile::with_mode(&ctx, open_rw(&p, false).unwrap(), mode);
        let co = Coroutine::new(move || {
            let mut buf = vec![0u8; 4096];
            let a = f.read_at(&mut buf, 8192).unwrap();
            assert_eq!(&buf[..a], &pattern(1, 10_000)[8192..]);
            let b = f.read_at(&mut buf, 10_000).unwrap();
            let c = f.read_at(&mut buf, 1 << 40).unwrap();
            let mut big = vec![0u8; 20_000];
            let e = f.read_exact_at(&mut big, 0).unwrap_err().kind();
            (a, b, c, e)
        });
        co.enter();
        ctx.poll_while(|| !co.is_finished());
        assert_eq!(
            co.take_result(),
            Some((1808, 0, 0, std::io::ErrorKind::UnexpectedEof)),
            "aio={mode}"
        );
        std::fs::remove_file(&p).unwrap();
    }
}

#[test]
fn o_direct_alignment_errors_are_io_errors() {
    let _s = serial();
    for mode in MODES {
        let ctx = AioContext::new().unwrap();
        if !available(&ctx, mode, "o_direct") {
            continue;
        }
        let p = path(&format!("direct-{mode}"));
        std::fs::write(&p, pattern(2, 1 << 16)).unwrap();
        let file = match open_rw(&p, true) {
            Ok(f) => f,
            Err(e) => {
                println!("SKIP: o_direct aio={mode}: O_DIRECT not supported here: {e}");
                continue;
            }
        };
        let f = CoFile::with_mode(&ctx, file, mode);
        assert!(f.is_direct());
        let co = Coroutine::new(move || {
            let mut a = Aligned::new(4096);
            // Aligned: works.
            assert_eq!(f.read_at(a.buf(), 4096).unwrap(), 4096);
            assert_eq!(a.buf(), &pattern(2, 1 << 16)[4096..8192]);
            // Misaligned offset: EINVAL, as an io::Error.
            let e1 = f.read_at(a.buf(), 1).unwrap_err();
            // Misaligned length through the engines (the threads engine
            // bounces through an aligned buffer but keeps the length).
            let mut b = Aligned::new(4096);
            let e2 = f.write_at(&b.buf()[..100], 0).unwrap_err();
            (e1.raw_os_error(), e2.raw_os_error())
        });
        co.enter();
        ctx.poll_while(|| !co.is_finished());
        assert_eq!(
            co.take_result(),
            Some((Some(libc::EINVAL), Some(libc::EINVAL))),
            "aio={mode}"
        );
        std::fs::remove_file(&p).unwrap();
    }
}

#[test]
fn ten_thousand_coroutines_on_a_small_ring() {
    let _s = serial();
    const N: u64 = 10_000;
    for mode in MODES {
        let ctx = AioContext::new().unwrap();
        if !available(&ctx, mode, "ten_thousand") {
            continue;
        }
        let p = path(&format!("many-{mode}"));
        let data: Vec<u8> = (0..N * 8).flat_map(|i| (i as u16).to_le_bytes()).collect();
        std::fs::write(&p, &data).unwrap();
        let f = Rc::new(CoFile::with_mode(&ctx, open_rw(&p, false).unwrap(), mode));
        // Every read through the engine: this test is about its queue (the
        // file was just written, so the page cache would serve it inline).
        f.set_inline_cached_reads(false);
        let peak = Rc::new(Cell::new(0usize));
        let cos: Vec<_> = (0..N)
            .map(|i| {
                let f = f.clone();
                Coroutine::new(move || {
                    let mut b = [0u8; 16];
                    assert_eq!(f.read_at(&mut b, i * 16).unwrap(), 16);
                    let first = u16::from_le_bytes([b[0], b[1]]) as u64;
                    assert_eq!(first, (i * 8) as u16 as u64);
                    first
                })
            })
            .collect();
        for c in &cos {
            c.enter();
        }
        if let (AioMode::IoUring, Ok(u)) = (mode, ctx.linux_io_uring()) {
            // Everything is queued: the ring (128 SQEs) cannot hold it.
            assert_eq!(u.queued(), N as usize);
        }
        while cos.iter().any(|c| !c.is_finished()) {
            ctx.poll(true);
            if let Ok(u) = ctx.linux_io_uring() {
                peak.set(peak.get().max(u.in_flight()));
            }
        }
        let sum: u64 = cos.iter().map(|c| c.take_result().unwrap()).sum();
        let want: u64 = (0..N).map(|i| (i * 8) as u16 as u64).sum();
        assert_eq!(sum, want, "aio={mode}");
        if mode == AioMode::IoUring {
            assert!(peak.get() <= 256, "in flight {} beyond the CQ", peak.get());
        }
        drop(f);
        std::fs::remove_file(&p).unwrap();
    }
}

#[test]
fn flush_completes_after_the_writes_issued_before_it() {
    let _s = serial();
    for mode in MODES {
        let ctx = AioContext::new().unwrap();
        if !available(&ctx, mode, "flush_order") {
            continue;
        }
        let p = path(&format!("flush-{mode}"));
        let _ = std::fs::remove_file(&p);
        let f = Rc::new(CoFile::with_mode(&ctx, open_rw(&p, false).unwrap(), mode));
        let log = Rc::new(RefCell::new(Vec::new()));
        const N: u64 = 32;
        let mut cos = Vec::new();
        for i in 0..N {
            let (f, log) = (f.clone(), log.clone());
            cos.push(Coroutine::new(move || {
                f.write_all_at(&pattern(i, 65536), i * 65536).unwrap();
                log.borrow_mut().push(format!("w{i}"));
            }));
        }
        let (ff, fl) = (f.clone(), log.clone());
        cos.push(Coroutine::new(move || {
            ff.fdatasync().unwrap();
            fl.borrow_mut().push("flush".to_string());
        }));
        // Entered in order: the 32 writes are in flight when the flush is
        // issued (nothing completes before the loop runs).
        run_all(&ctx, cos);
        let log = log.borrow();
        assert_eq!(log.len(), N as usize + 1);
        assert_eq!(
            log.last().map(String::as_str),
            Some("flush"),
            "aio={mode}: {log:?}"
        );
        drop(f);
        std::fs::remove_file(&p).unwrap();
    }
}

/// A pipe (read end, write end).
fn pipe() -> (File, File) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two new descriptors into `fds`.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    use std::os::fd::FromRawFd;
    // SAFETY: both are new descriptors we own.
    unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
}

#[test]
fn unwound_request_is_cancelled_and_its_buffer_left_alone() {
    let _s = serial();
    let ctx = AioContext::new().unwrap();
    if !available(&ctx, AioMode::IoUring, "unwind") {
        return;
    }
    let (rd, mut wr) = pipe();
    let rd = Rc::new(rd);
    // A heap buffer that outlives the coroutine: the canary.
    let canary = Rc::new(RefCell::new(vec![0xAAu8; 4096]));
    let entered = Rc::new(Cell::new(0));
    let (c2, r2, e2, ctx2) = (canary.clone(), rd.clone(), entered.clone(), ctx.clone());
    let co = Coroutine::new(move || {
        let u = ctx2.linux_io_uring().unwrap();
        let mut buf = c2.borrow_mut();
        let r = u.read_at(r2.as_fd(), &mut buf, 0);
        e2.set(e2.get() + 1); // never reached
        r.map(|_| ())
    });
    co.enter();
    ctx.poll(false); // the read goes to the kernel and waits on the pipe
    assert_eq!(ctx.linux_io_uring().unwrap().in_flight(), 1);
    co.cancel(); // unwinds: cancel, reap, then the unwind goes on
    assert_eq!(ctx.linux_io_uring().unwrap().in_flight(), 0);
    wr.write_all(&[0x55; 4096]).unwrap();
    for _ in 0..10 {
        ctx.poll(false);
    }
    assert!(
        canary.borrow().iter().all(|&b| b == 0xAA),
        "canary overwritten"
    );
    assert_eq!(
        entered.get(),
        0,
        "a completion reached the dropped coroutine"
    );
    // The data is still in the pipe: the kernel request is gone.
    let mut back = [0u8; 4096];
    (&*rd).read_exact(&mut back).unwrap();
    assert!(back.iter().all(|&b| b == 0x55));
}

#[test]
fn completions_seen_while_cancelling_reach_their_coroutines() {
    let _s = serial();
    let ctx = AioContext::new().unwrap();
    if !available(&ctx, AioMode::IoUring, "stash") {
        return;
    }
    let (rd1, _wr1) = pipe();
    let (rd2, mut wr2) = pipe();
    let ctx1 = ctx.clone();
    let a = Coroutine::new(move || {
        let mut b = [0u8; 8];
        ctx1.linux_io_uring()
            .unwrap()
            .read_at(rd1.as_fd(), &mut b, 0)
    });
    let ctx2 = ctx.clone();
    let b = Coroutine::new(move || {
        let mut buf = [0u8; 8];
        let n = ctx2
            .linux_io_uring()
            .unwrap()
            .read_at(rd2.as_fd(), &mut buf, 0)
            .unwrap();
        buf[..n].to_vec()
    });
    a.enter();
    b.enter();
    ctx.poll(false);
    wr2.write_all(b"stashed!").unwrap();
    // b's completion is posted; cancelling a reaps it meanwhile.
    a.cancel();
    ctx.poll_while(|| !b.is_finished());
    assert_eq!(b.take_result().unwrap(), b"stashed!");
}

#[test]
fn context_shutdown_reaps_requests_of_its_coroutines() {
    let _s = serial();
    let ctx = AioContext::new().unwrap();
    if !available(&ctx, AioMode::IoUring, "shutdown") {
        return;
    }
    let (rd, mut wr) = pipe();
    let rd = Rc::new(rd);
    let r2 = rd.clone();
    let ctx2 = ctx.clone();
    let co = Coroutine::new(move || {
        let mut b = vec![0u8; 64];
        let _ = ctx2
            .linux_io_uring()
            .unwrap()
            .read_at(r2.as_fd(), &mut b, 0);
        unreachable!("the read never completes");
    });
    co.enter();
    co.detach();
    ctx.poll(false);
    ctx.shutdown();
    assert_eq!(ctx.linux_io_uring().unwrap().in_flight(), 0);
    wr.write_all(b"still here").unwrap();
    let mut back = [0u8; 10];
    (&*rd).read_exact(&mut back).unwrap();
    assert_eq!(&back, b"still here");
    // New requests after shutdown fail at once.
    let ctx3 = ctx.clone();
    let late = Coroutine::new(move || {
        let mut b = [0u8; 1];
        ctx3.linux_io_uring()
            .unwrap()
            .read_at(rd.as_fd(), &mut b, 0)
    });
    late.enter();
    let e = late.take_result().unwrap().unwrap_err();
    assert!(e.to_string().contains("shut down"), "{e}");
}

#[test]
fn linux_aio_request_unwound_in_flight_is_reaped() {
    let _s = serial();
    let ctx = AioContext::new().unwrap();
    if !available(&ctx, AioMode::Native, "aio_unwind") {
        return;
    }
    let p = path("aio-unwind");
    std::fs::write(&p, pattern(3, 1 << 20)).unwrap();
    let file = match open_rw(&p, true) {
        Ok(f) => Rc::new(f),
        Err(e) => {
            println!("SKIP: aio_unwind: O_DIRECT not supported here: {e}");
            return;
        }
    };
    for round in 0..20 {
        let (f2, ctx2) = (file.clone(), ctx.clone());
        let co = Coroutine::new(move || {
            let mut a = Aligned::new(1 << 20);
            ctx2.linux_aio().unwrap().read_at(f2.as_fd(), a.buf(), 0)
        });
        co.enter();
        if round % 2 == 1 {
            ctx.poll(false); // submitted: in the kernel when cancelled
        }
        co.cancel();
        let aio = ctx.linux_aio().unwrap();
        assert_eq!((aio.in_flight(), aio.queued()), (0, 0), "round {round}");
    }
    // The context still works.
    let (f2, ctx2) = (file.clone(), ctx.clone());
    let co = Coroutine::new(move || {
        let mut a = Aligned::new(4096);
        ctx2.linux_aio()
            .unwrap()
            .read_at(f2.as_fd(), a.buf(), 8192)
            .unwrap();
        a.buf().to_vec()
    });
    co.enter();
    ctx.poll_while(|| !co.is_finished());
    assert_eq!(co.take_result().unwrap(), &pattern(3, 1 << 20)[8192..12288]);
    std::fs::remove_file(&p).unwrap();
}

#[test]
fn engine_calls_outside_a_coroutine_panic_with_the_call_name() {
    let _s = serial();
    let ctx = AioContext::new().unwrap();
    if !available(&ctx, AioMode::IoUring, "outside") {
        return;
    }
    let (rd, _wr) = pipe();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut b = [0u8; 1];
        let _ = ctx.linux_io_uring().unwrap().read_at(rd.as_fd(), &mut b, 0);
    }));
    let msg = *r.unwrap_err().downcast::<String>().unwrap();
    assert_eq!(msg, "IoUring::read_at called outside a coroutine");
}

#[test]
fn a_panicking_coroutine_does_not_strand_the_others_of_its_batch() {
    let _s = serial();
    for mode in [AioMode::IoUring, AioMode::Native] {
        let ctx = AioContext::new().unwrap();
        if !available(&ctx, mode, "panic_batch") {
            continue;
        }
        let p = path(&format!("panic-{mode}"));
        std::fs::write(&p, pattern(4, 8192)).unwrap();
        let f = Rc::new(CoFile::with_mode(&ctx, open_rw(&p, false).unwrap(), mode));
        f.set_inline_cached_reads(false); // one batch in the engine
        let cos: Vec<_> = (0..8u64)
            .map(|i| {
                let f = f.clone();
                Coroutine::new(move || {
                    let mut b = [0u8; 512];
                    f.read_at(&mut b, i * 512).unwrap();
                    if i == 0 {
                        panic!("boom after the read");
                    }
                    b[0]
                })
            })
            .collect();
        for c in &cos {
            c.enter();
        }
        let mut panics = 0;
        while cos.iter().any(|c| !c.is_finished()) {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| ctx.poll(true)));
            panics += usize::from(r.is_err());
        }
        assert_eq!(panics, 1, "aio={mode}");
        for (i, c) in cos.iter().enumerate().skip(1) {
            assert_eq!(
                c.take_result(),
                Some(pattern(4, 8192)[i * 512]),
                "aio={mode}"
            );
        }
        drop(f);
        std::fs::remove_file(&p).unwrap();
    }
}

#[test]
fn a_request_the_kernel_refuses_fails_alone() {
    let _s = serial();
    for mode in [AioMode::IoUring, AioMode::Native] {
        let ctx = AioContext::new().unwrap();
        if !available(&ctx, mode, "refused") {
            continue;
        }
        let p = path(&format!("refused-{mode}"));
        std::fs::write(&p, pattern(5, 4096)).unwrap();
        // Reading a write-only file: EBADF from the kernel (for Linux AIO,
        // from io_submit itself, in the middle of a batch).
        let wo = Rc::new(OpenOptions::new().write(true).open(&p).unwrap());
        let f = Rc::new(CoFile::with_mode(&ctx, open_rw(&p, false).unwrap(), mode));
        let mut cos = Vec::new();
        for i in 0..6u64 {
            let (f, wo, ctx2) = (f.clone(), wo.clone(), ctx.clone());
            cos.push(Coroutine::new(move || {
                let mut b = [0u8; 512];
                if i == 3 {
                    let r = match mode {
                        AioMode::IoUring => {
                            ctx2.linux_io_uring()
                                .unwrap()
                                .read_at(wo.as_fd(), &mut b, 0)
                        }
                        _ => ctx2.linux_aio().unwrap().read_at(wo.as_fd(), &mut b, 0),
                    };
                    return r.unwrap_err().raw_os_error().map(|e| e as u64);
                }
                f.read_at(&mut b, i * 512).unwrap();
                Some(b[0] as u64)
            }));
        }
        let got = run_all(&ctx, cos);
        for (i, g) in got.iter().enumerate() {
            if i == 3 {
                assert_eq!(*g, Some(libc::EBADF as u64), "aio={mode}");
            } else {
                assert_eq!(*g, Some(pattern(5, 4096)[i * 512] as u64), "aio={mode}");
            }
        }
        std::fs::remove_file(&p).unwrap();
    }
}

#[test]
fn cofile_calls_outside_a_coroutine_name_the_call() {
    let _s = serial();
    for mode in MODES {
        let ctx = AioContext::new().unwrap();
        if !available(&ctx, mode, "cofile_outside") {
            continue;
        }
        let p = path(&format!("outside-{mode}"));
        let f = CoFile::with_mode(&ctx, open_rw(&p, false).unwrap(), mode);
        let msg = |r: std::thread::Result<()>| *r.unwrap_err().downcast::<String>().unwrap();
        let mut b = [0u8; 8];
        type Call<'a> = (&'static str, Box<dyn FnOnce() + 'a>);
        let calls: [Call<'_>; 4] = [
            ("CoFile::read_at", Box::new(|| drop(f.read_at(&mut b, 0)))),
            (
                "CoFile::writev_at",
                Box::new(|| drop(f.writev_at(&[IoSlice::new(b"x")], 0))),
            ),
            ("CoFile::fsync", Box::new(|| drop(f.fsync()))),
            ("CoFile::fdatasync", Box::new(|| drop(f.fdatasync()))),
        ];
        for (api, call) in calls {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(call));
            assert_eq!(
                msg(r),
                format!("{api} called outside a coroutine"),
                "aio={mode}"
            );
        }
        std::fs::remove_file(&p).unwrap();
    }
}

/// Buffered reads try the page cache inline first (threads and io_uring
/// by default): a cached read finishes without suspending, the same read
/// with the attempt turned off goes through the engine, and a read that
/// the cache holds only in part gets the rest from the engine (pages
/// dropped with `posix_fadvise(DONTNEED)` after an `fsync`).
#[test]
fn cached_reads_complete_inline_and_the_rest_goes_to_the_engine() {
    let _s = serial();
    for mode in MODES {
        let ctx = AioContext::new().unwrap();
        if !available(&ctx, mode, "inline_reads") {
            continue;
        }
        let p = path(&format!("inline-{mode}"));
        // Large enough that readahead from the cached half cannot refill
        // the dropped half before the inline attempt reaches it.
        const LEN: usize = 4 << 20;
        let data = pattern(9, LEN);
        std::fs::write(&p, &data).unwrap();
        let f = Rc::new(CoFile::with_mode(&ctx, open_rw(&p, false).unwrap(), mode));
        assert_eq!(
            f.inline_cached_reads(),
            mode != AioMode::Native,
            "default for aio={mode}"
        );
        let read_all = |f: &Rc<CoFile>| {
            let f = f.clone();
            Coroutine::new(move || {
                let mut b = vec![0u8; LEN];
                f.read_exact_at(&mut b, 0).unwrap();
                b
            })
        };
        // Cached and the attempt on: done within `enter`.
        if f.inline_cached_reads() {
            let co = read_all(&f);
            co.enter();
            assert!(co.is_finished(), "aio={mode}: a cached read suspended");
            assert!(co.take_result().unwrap() == data, "aio={mode}: inline data");
        }
        // The attempt off: through the engine (the threads engine's is its
        // pool), so the coroutine suspends.
        f.set_inline_cached_reads(false);
        assert!(!f.inline_cached_reads());
        let co = read_all(&f);
        co.enter();
        assert!(
            !co.is_finished(),
            "aio={mode}: the engine's read did not suspend"
        );
        ctx.poll_while(|| !co.is_finished());
        assert!(co.take_result().unwrap() == data, "aio={mode}: engine data");
        // Half the file dropped from the cache: the inline attempt gets
        // what is cached, the engine the rest, in order.
        f.set_inline_cached_reads(mode != AioMode::Native);
        f.file().sync_all().unwrap();
        let fd = f.file().as_raw_fd();
        // SAFETY: a valid fd; advice only.
        let rc = unsafe {
            libc::posix_fadvise(
                fd,
                (LEN / 2) as i64,
                (LEN / 2) as i64,
                libc::POSIX_FADV_DONTNEED,
            )
        };
        assert_eq!(rc, 0);
        let co = read_all(&f);
        co.enter();
        ctx.poll_while(|| !co.is_finished());
        assert!(
            co.take_result().unwrap() == data,
            "aio={mode}: partly cached data"
        );
        drop(f);
        std::fs::remove_file(&p).unwrap();
    }
}

/// Inline buffered writes (opt-in): a write finishes without suspending
/// and lands in the file; off again, writes go to the engine (and
/// suspend); `O_DIRECT` files and Linux AIO never take them.
#[test]
fn inline_buffered_writes_finish_without_suspending() {
    let _s = serial();
    for mode in MODES {
        let ctx = AioContext::new().unwrap();
        if !available(&ctx, mode, "inline_writes") {
            continue;
        }
        let p = path(&format!("inline-w-{mode}"));
        std::fs::write(&p, vec![0u8; 64 * 1024]).unwrap();
        let f = Rc::new(CoFile::with_mode(&ctx, open_rw(&p, false).unwrap(), mode));
        assert!(!f.inline_buffered_writes(), "off by default");
        f.set_inline_buffered_writes(true);
        assert_eq!(
            f.inline_buffered_writes(),
            mode != AioMode::Native,
            "aio={mode}"
        );
        let write = |f: &Rc<CoFile>, block: u64| {
            let f = f.clone();
            Coroutine::new(move || f.write_all_at(&pattern(block, 4096), block * 4096).unwrap())
        };
        let co = write(&f, 1);
        co.enter();
        if mode != AioMode::Native {
            assert!(co.is_finished(), "aio={mode}: an inline write suspended");
        }
        ctx.poll_while(|| !co.is_finished());
        f.set_inline_buffered_writes(false);
        assert!(!f.inline_buffered_writes());
        let co = write(&f, 2);
        co.enter();
        if mode != AioMode::Threads {
            // (The threads engine's `pwritev2(RWF_NOWAIT)` may finish it at
            // once where the filesystem supports it.)
            assert!(
                !co.is_finished(),
                "aio={mode}: the engine's write did not suspend"
            );
        }
        ctx.poll_while(|| !co.is_finished());
        drop(f);
        let data = std::fs::read(&p).unwrap();
        assert!(
            data[4096..8192] == pattern(1, 4096)[..],
            "aio={mode}: inline data"
        );
        assert!(
            data[8192..12288] == pattern(2, 4096)[..],
            "aio={mode}: engine data"
        );
        std::fs::remove_file(&p).unwrap();
        // O_DIRECT: never inline.
        let pd = path(&format!("inline-wd-{mode}"));
        std::fs::write(&pd, vec![0u8; 8192]).unwrap();
        if let Ok(fd) = open_rw(&pd, true) {
            let f = CoFile::with_mode(&ctx, fd, mode);
            f.set_inline_buffered_writes(true);
            assert!(!f.inline_buffered_writes(), "aio={mode}: O_DIRECT");
        }
        std::fs::remove_file(&pd).unwrap();
    }
}
