//! When io_uring or Linux AIO cannot be set up, the error says so and
//! `CoFile` falls back to the thread pool with a log line, never a panic.
//! Unavailability is simulated with `COROLOOP_DISABLE_IO_URING` /
//! `COROLOOP_DISABLE_LINUX_AIO` (read when an engine is set up), in this
//! binary of its own since the environment is process-wide.

use std::fs::OpenOptions;
use std::path::PathBuf;

use coroloop::aio::{AioContext, AioMode, CoFile};
use coroloop::Coroutine;

fn file(name: &str) -> (PathBuf, std::fs::File) {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("file_io");
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(format!("{name}-{}", std::process::id()));
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&p)
        .unwrap();
    (p, f)
}

#[test]
fn unavailable_engines_report_why_and_cofile_falls_back_to_threads() {
    std::env::set_var("COROLOOP_DISABLE_IO_URING", "1");
    std::env::set_var("COROLOOP_DISABLE_LINUX_AIO", "1");
    let ctx = AioContext::new().unwrap();

    let e = ctx.linux_io_uring().unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::Unsupported);
    assert!(e.to_string().starts_with("io_uring unavailable: "), "{e}");
    // Asked again: the same answer, from the cache.
    assert_eq!(ctx.linux_io_uring().unwrap_err().to_string(), e.to_string());
    let e = ctx.linux_aio().unwrap_err();
    assert!(e.to_string().starts_with("Linux AIO unavailable: "), "{e}");

    for mode in [AioMode::IoUring, AioMode::Native] {
        let (p, f) = file(&format!("fallback-{mode}"));
        // Without fallback: the error, and the file back.
        let (f, err) = CoFile::try_with_mode(&ctx, f, mode).unwrap_err();
        assert!(err.to_string().contains("unavailable"), "{err}");
        // With fallback: threads, and the I/O works.
        let cf = CoFile::with_mode(&ctx, f, mode);
        assert_eq!(cf.mode(), AioMode::Threads);
        let co = Coroutine::new(move || {
            cf.write_all_at(b"fallback works", 100).unwrap();
            cf.fdatasync().unwrap();
            let mut b = [0u8; 14];
            cf.read_exact_at(&mut b, 100).unwrap();
            b
        });
        co.enter();
        ctx.poll_while(|| !co.is_finished());
        assert_eq!(&co.take_result().unwrap(), b"fallback works");
        std::fs::remove_file(p).unwrap();
    }

    // The context's default mode is used by CoFile::new.
    ctx.set_default_aio_mode(AioMode::IoUring);
    let (p, f) = file("fallback-default");
    assert_eq!(CoFile::new(&ctx, f).mode(), AioMode::Threads);
    std::fs::remove_file(p).unwrap();
    // A context created afterwards with the engines allowed again gets them.
    std::env::remove_var("COROLOOP_DISABLE_IO_URING");
    let ctx2 = AioContext::new().unwrap();
    if let Err(e) = ctx2.linux_io_uring() {
        println!("SKIP: io_uring really unavailable here: {e}");
    }
}
