#![allow(missing_docs)] // criterion_group! generates undocumented items
//! Random 4 KiB file reads through `CoFile` beside other runtimes' file
//! I/O, in one run: `cargo bench --bench file_io`.
//!
//! The file is `target/file_io_bench.img` (under `CARGO_TARGET_DIR` when
//! set), 1 GiB of non-zero data, created once and reused by later runs
//! (and by `scripts/fio_floor.sh`, the fio floor on the same file).
//!
//! Groups `file_io/{warm,direct}_qd{1,16}`: `warm` reads a buffered file
//! read through once beforehand (every read hits the page cache); `direct`
//! opens it with `O_DIRECT` (skipped with `SKIP: O_DIRECT: ...` when the
//! filesystem refuses). Queue depth QD is QD workers, each reading at
//! 4 KiB-aligned offsets of its own xorshift sequence, one read in flight
//! at a time. Every figure is per read (`Throughput::Elements(1)`:
//! criterion's "thrpt" is reads/s).
//!
//! * `coroloop_io_uring`, `coroloop_native`, `coroloop_threads`: QD
//!   coroutines on one `AioContext`, `CoFile::read_at` with
//!   `AioMode::{IoUring, Native, Threads}` (an engine that cannot be set
//!   up prints `SKIP: <engine>: <err>`). Linux AIO on a buffered file is
//!   synchronous `io_submit` (as in QEMU); it is measured anyway. The
//!   io_uring row sends every read to the ring
//!   (`CoFile::set_inline_cached_reads(false)`): the inline page-cache
//!   attempt, default for threads and io_uring, is what the
//!   `coroloop_threads` row measures.
//! * `tokio_uring`: QD `tokio_uring::spawn`ed tasks on one tokio-uring
//!   runtime, `File::read_at` into an owned aligned buffer.
//! * `tokio_fs_spawn_blocking`: QD tasks on a current-thread tokio
//!   runtime, each read a `spawn_blocking(pread)` (what `tokio::fs` does).
//! * `smol_blocking`: QD tasks on a `smol::LocalExecutor` under
//!   `smol::block_on`, each read a `blocking::unblock(pread)`.
//! * `pread_loop` (QD1) / `psync_16_threads` (QD16): plain `pread` on one
//!   thread / on 16 threads: the floor.
//!
//! Runtimes, contexts and files are set up outside the timed part; each
//! sample spawns its QD workers (coroutines, tasks, threads) and joins
//! them. Every read must return 4096 bytes (asserted), and the workers'
//! read counts must add up, so a failing engine cannot look fast.

use std::cell::Cell;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};

use coroloop::aio::{AioContext, AioMode, CoFile};
use coroloop::Coroutine;

/// The file's size.
const FILE_SIZE: u64 = 1 << 30;
/// One read.
const BS: usize = 4096;
/// Reads fit in the file at these many 4 KiB-aligned offsets.
const BLOCKS: u64 = FILE_SIZE / BS as u64;
/// O_DIRECT buffer alignment.
const ALIGN: usize = 4096;

// ---------------------------------------------------------------------
// The file

fn image_path() -> PathBuf {
    coroloop_benchmarks::target_dir().join("file_io_bench.img")
}

/// Creates the 1 GiB file unless it is already there with the right size.
fn ensure_image() -> PathBuf {
    let path = image_path();
    if std::fs::metadata(&path).is_ok_and(|m| m.len() == FILE_SIZE) {
        return path;
    }
    eprintln!("file_io: creating {} (1 GiB)", path.display());
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).expect("file_io: create the target directory");
    }
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .expect("file_io: create the image");
    let mut rng = XorShift::new(0x00c0_ffee);
    let mut chunk = vec![0u8; 1 << 20];
    for _ in 0..FILE_SIZE / (1 << 20) {
        for w in chunk.chunks_exact_mut(8) {
            // `| 1`: never a zero byte at the start of a word, and never
            // an all-zero block that a filesystem might keep sparse.
            w.copy_from_slice(&(rng.next() | 1).to_le_bytes());
        }
        f.write_all(&chunk).expect("file_io: write the image");
    }
    f.sync_all().expect("file_io: fsync the image");
    path
}

/// Reads the whole file once (buffered), so that warm reads hit the page
/// cache.
fn warm_page_cache(path: &PathBuf) {
    let mut f = File::open(path).expect("file_io: open the image");
    let mut chunk = vec![0u8; 1 << 20];
    while f.read(&mut chunk).expect("file_io: read the image") > 0 {}
}

fn open_image(path: &PathBuf, direct: bool) -> io::Result<File> {
    let mut o = OpenOptions::new();
    o.read(true);
    if direct {
        o.custom_flags(libc::O_DIRECT);
    }
    o.open(path)
}

// ---------------------------------------------------------------------
// Offsets and buffers

/// xorshift64: a cheap per-worker offset sequence.
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> XorShift {
        // Spread the seed (splitmix64's finaliser) and never start at 0.
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        XorShift((z ^ (z >> 31)) | 1)
    }

    #[inline]
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A 4 KiB-aligned offset of a 4 KiB block inside the file.
    #[inline]
    fn offset(&mut self) -> u64 {
        (self.next() % BLOCKS) * BS as u64
    }
}

/// Seeds differ between workers and between samples (so that a sample
/// does not replay the previous one's offsets).
static SEED: AtomicU64 = AtomicU64::new(1);

fn seed() -> u64 {
    SEED.fetch_add(1, Ordering::Relaxed)
}

/// Worker `w`'s share of `iters` reads over `qd` workers.
fn share(iters: u64, qd: usize, w: usize) -> u64 {
    let qd = qd as u64;
    iters / qd + u64::from((w as u64) < iters % qd)
}

/// A zeroed 4 KiB buffer aligned for `O_DIRECT`, owned (it can be handed
/// to tokio-uring, a blocking thread or a coroutine).
struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
}

// SAFETY: it owns its allocation exclusively, like a `Box<[u8; BS]>`.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    fn layout() -> std::alloc::Layout {
        match std::alloc::Layout::from_size_align(BS, ALIGN) {
            Ok(l) => l,
            Err(e) => panic!("file_io: buffer layout: {e}"),
        }
    }

    fn new() -> AlignedBuf {
        let layout = Self::layout();
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { std::alloc::alloc_zeroed(layout) };
        let Some(ptr) = std::ptr::NonNull::new(p) else {
            std::alloc::handle_alloc_error(layout)
        };
        AlignedBuf { ptr }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `BS` initialised (zeroed) bytes are allocated at `ptr`,
        // and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), BS) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout, freed once.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), Self::layout()) };
    }
}

// SAFETY: the pointer is the heap allocation's, which does not move when
// the `AlignedBuf` value moves and stays valid until it is dropped; all
// `BS` bytes are initialised (zeroed at allocation), so `bytes_init` and
// `bytes_total` are both `BS`.
unsafe impl tokio_uring::buf::IoBuf for AlignedBuf {
    fn stable_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    fn bytes_init(&self) -> usize {
        BS
    }

    fn bytes_total(&self) -> usize {
        BS
    }
}

// SAFETY: as for `IoBuf`: a stable, owned, fully initialised allocation
// of `BS` bytes; `stable_mut_ptr` takes `&mut self`, so the runtime has
// exclusive access while it owns the buffer.
unsafe impl tokio_uring::buf::IoBufMut for AlignedBuf {
    fn stable_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    unsafe fn set_init(&mut self, _pos: usize) {
        // Every byte is initialised from the start.
    }
}

/// `pread` of one block, checked.
#[inline]
fn pread_block(f: &File, buf: &mut AlignedBuf, off: u64) {
    let n = f
        .read_at(buf.as_mut_slice(), off)
        .unwrap_or_else(|e| panic!("file_io: pread at {off}: {e}"));
    assert_eq!(n, BS, "file_io: short pread at {off}");
}

// ---------------------------------------------------------------------
// The contenders

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Warm,
    Direct,
}

struct Setup {
    path: PathBuf,
    mode: Mode,
    qd: usize,
}

impl Setup {
    fn open(&self) -> File {
        open_image(&self.path, self.mode == Mode::Direct)
            .unwrap_or_else(|e| panic!("file_io: open {}: {e}", self.path.display()))
    }
}

fn coroloop(g: &mut BenchmarkGroup<'_, WallTime>, s: &Setup, name: &str, mode: AioMode) {
    let ctx = AioContext::new().expect("file_io: AioContext::new");
    let file = match CoFile::try_with_mode(&ctx, s.open(), mode) {
        Ok(f) => Rc::new(f),
        Err((_, e)) => {
            println!("SKIP: {name}: {e}");
            return;
        }
    };
    // The io_uring row measures the ring: every read goes through it (by
    // default an io_uring `CoFile` serves page-cache hits inline, as the
    // threads engine does, which `coroloop_threads` measures).
    if mode == AioMode::IoUring {
        file.set_inline_cached_reads(false);
    }
    let qd = s.qd;
    g.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let done = Rc::new(Cell::new(0u64));
            let t = Instant::now();
            let cos: Vec<Coroutine> = (0..qd)
                .map(|w| {
                    let (file, done) = (file.clone(), done.clone());
                    let n = share(iters, qd, w);
                    let mut rng = XorShift::new(seed());
                    Coroutine::new(move || {
                        let mut buf = AlignedBuf::new();
                        for _ in 0..n {
                            let off = rng.offset();
                            let r = file
                                .read_at(buf.as_mut_slice(), off)
                                .unwrap_or_else(|e| panic!("file_io: {mode} read at {off}: {e}"));
                            assert_eq!(r, BS, "file_io: {mode}: short read at {off}");
                        }
                        done.set(done.get() + n);
                    })
                })
                .collect();
            for co in &cos {
                co.enter();
            }
            ctx.poll_while(|| cos.iter().any(|co| !co.is_finished()));
            let elapsed = t.elapsed();
            assert_eq!(done.get(), iters, "file_io: {mode}: reads lost");
            elapsed
        });
    });
}

fn tokio_uring(g: &mut BenchmarkGroup<'_, WallTime>, s: &Setup) {
    let rt = match tokio_uring::Runtime::new(&tokio_uring::builder()) {
        Ok(rt) => rt,
        Err(e) => {
            println!("SKIP: tokio_uring: {e}");
            return;
        }
    };
    let file = Rc::new(tokio_uring::fs::File::from_std(s.open()));
    let qd = s.qd;
    g.bench_function("tokio_uring", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let t = Instant::now();
                let tasks: Vec<_> = (0..qd)
                    .map(|w| {
                        let file = file.clone();
                        let n = share(iters, qd, w);
                        let mut rng = XorShift::new(seed());
                        tokio_uring::spawn(async move {
                            let mut buf = AlignedBuf::new();
                            for _ in 0..n {
                                let off = rng.offset();
                                let (r, b) = file.read_at(buf, off).await;
                                buf = b;
                                let r = r.unwrap_or_else(|e| {
                                    panic!("file_io: tokio_uring read at {off}: {e}")
                                });
                                assert_eq!(r, BS, "file_io: tokio_uring: short read at {off}");
                            }
                            n
                        })
                    })
                    .collect();
                let mut done = 0;
                for task in tasks {
                    done += task.await.expect("file_io: tokio_uring task");
                }
                let elapsed = t.elapsed();
                assert_eq!(done, iters, "file_io: tokio_uring: reads lost");
                elapsed
            })
        });
    });
    drop(file);
    drop(rt);
}

fn tokio_spawn_blocking(g: &mut BenchmarkGroup<'_, WallTime>, s: &Setup) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("file_io: tokio runtime");
    let file = Arc::new(s.open());
    let qd = s.qd;
    g.bench_function("tokio_fs_spawn_blocking", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let t = Instant::now();
                let tasks: Vec<_> = (0..qd)
                    .map(|w| {
                        let file = file.clone();
                        let n = share(iters, qd, w);
                        let mut rng = XorShift::new(seed());
                        tokio::spawn(async move {
                            let mut buf = AlignedBuf::new();
                            for _ in 0..n {
                                let off = rng.offset();
                                let f = file.clone();
                                buf = tokio::task::spawn_blocking(move || {
                                    pread_block(&f, &mut buf, off);
                                    buf
                                })
                                .await
                                .expect("file_io: spawn_blocking");
                            }
                            n
                        })
                    })
                    .collect();
                let mut done = 0;
                for task in tasks {
                    done += task.await.expect("file_io: tokio task");
                }
                let elapsed = t.elapsed();
                assert_eq!(done, iters, "file_io: tokio: reads lost");
                elapsed
            })
        });
    });
}

fn smol_blocking(g: &mut BenchmarkGroup<'_, WallTime>, s: &Setup) {
    let ex = smol::LocalExecutor::new();
    let file = Arc::new(s.open());
    let qd = s.qd;
    g.bench_function("smol_blocking", |b| {
        b.iter_custom(|iters| {
            smol::block_on(ex.run(async {
                let t = Instant::now();
                let tasks: Vec<_> = (0..qd)
                    .map(|w| {
                        let file = file.clone();
                        let n = share(iters, qd, w);
                        let mut rng = XorShift::new(seed());
                        ex.spawn(async move {
                            let mut buf = AlignedBuf::new();
                            for _ in 0..n {
                                let off = rng.offset();
                                let f = file.clone();
                                buf = blocking::unblock(move || {
                                    pread_block(&f, &mut buf, off);
                                    buf
                                })
                                .await;
                            }
                            n
                        })
                    })
                    .collect();
                let mut done = 0;
                for task in tasks {
                    done += task.await;
                }
                let elapsed = t.elapsed();
                assert_eq!(done, iters, "file_io: smol: reads lost");
                elapsed
            }))
        });
    });
}

/// Plain `pread` on one thread (QD1) or on `qd` threads.
fn pread_threads(g: &mut BenchmarkGroup<'_, WallTime>, s: &Setup) {
    let file = s.open();
    let qd = s.qd;
    let name = if qd == 1 {
        "pread_loop".to_string()
    } else {
        format!("psync_{qd}_threads")
    };
    g.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let worker = |n: u64, seed: u64| {
                let mut rng = XorShift::new(seed);
                let mut buf = AlignedBuf::new();
                for _ in 0..n {
                    pread_block(&file, &mut buf, rng.offset());
                }
                n
            };
            if qd == 1 {
                let seed = seed();
                let t = Instant::now();
                worker(iters, seed);
                return t.elapsed();
            }
            let t = Instant::now();
            let done: u64 = std::thread::scope(|sc| {
                let threads: Vec<_> = (0..qd)
                    .map(|w| {
                        let (n, seed) = (share(iters, qd, w), seed());
                        sc.spawn(move || worker(n, seed))
                    })
                    .collect();
                threads
                    .into_iter()
                    .map(|th| th.join().expect("file_io: pread thread"))
                    .sum()
            });
            let elapsed = t.elapsed();
            assert_eq!(done, iters, "file_io: pread: reads lost");
            elapsed
        });
    });
}

// ---------------------------------------------------------------------
// The groups

fn run_group(c: &mut Criterion, mode: Mode, qd: usize) {
    let path = ensure_image();
    let tag = match mode {
        Mode::Warm => "warm",
        Mode::Direct => "direct",
    };
    match mode {
        Mode::Warm => warm_page_cache(&path),
        Mode::Direct => {
            if let Err(e) = open_image(&path, true) {
                println!("SKIP: O_DIRECT: {e} (file_io/{tag}_qd{qd})");
                return;
            }
        }
    }
    let s = Setup { path, mode, qd };
    let mut g = c.benchmark_group(format!("file_io/{tag}_qd{qd}"));
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Elements(1));
    coroloop(&mut g, &s, "coroloop_io_uring", AioMode::IoUring);
    coroloop(&mut g, &s, "coroloop_native", AioMode::Native);
    coroloop(&mut g, &s, "coroloop_threads", AioMode::Threads);
    tokio_uring(&mut g, &s);
    tokio_spawn_blocking(&mut g, &s);
    smol_blocking(&mut g, &s);
    pread_threads(&mut g, &s);
    g.finish();
}

fn warm_qd1(c: &mut Criterion) {
    run_group(c, Mode::Warm, 1);
}

fn warm_qd16(c: &mut Criterion) {
    run_group(c, Mode::Warm, 16);
}

fn direct_qd1(c: &mut Criterion) {
    run_group(c, Mode::Direct, 1);
}

fn direct_qd16(c: &mut Criterion) {
    run_group(c, Mode::Direct, 16);
}

criterion_group!(benches, warm_qd1, warm_qd16, direct_qd1, direct_qd16);
criterion_main!(benches);
