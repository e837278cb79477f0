//! Event notifiers and fd handlers: the event and external cases of QEMU's
//! tests/unit/test-aio.c, re-derived. Written against `new_context()` so
//! they can be rerun against another fd monitor.

use std::cell::Cell;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::rc::Rc;
use std::sync::Arc;

use coroloop::aio::{AioContext, EventNotifier, FdHandler};

fn new_context() -> AioContext {
    AioContext::new().unwrap()
}

/// QEMU's EventNotifierTestData: counts runs, stops re-arming when
/// `active` reaches 0, optionally sets the notifier again (`auto_set`).
struct Data {
    e: Arc<EventNotifier>,
    n: Rc<Cell<u32>>,
    active: Rc<Cell<u32>>,
}

fn register(
    ctx: &AioContext,
    active: u32,
    auto_set: bool,
    external: bool,
) -> (Data, FdHandler<Arc<EventNotifier>>) {
    let e = Arc::new(EventNotifier::new().unwrap());
    let n = Rc::new(Cell::new(0));
    let act = Rc::new(Cell::new(active));
    let (e2, n2, a2) = (e.clone(), n.clone(), act.clone());
    let h = ctx
        .set_event_notifier(
            e.clone(),
            external,
            Box::new(move || {
                assert!(e2.test_and_clear(), "called only when set");
                n2.set(n2.get() + 1);
                if a2.get() > 0 {
                    a2.set(a2.get() - 1);
                }
                if auto_set && a2.get() > 0 {
                    e2.set().unwrap();
                }
            }),
            None,
        )
        .unwrap();
    (Data { e, n, active: act }, h)
}

fn drain(ctx: &AioContext) {
    while ctx.poll(false) {}
}

// /aio/event/add-remove
#[test]
fn event_add_remove() {
    let ctx = new_context();
    let (d, h) = register(&ctx, 0, false, false);
    assert!(!ctx.poll(false));
    assert_eq!(d.n.get(), 0);
    let e = h.remove();
    assert!(!ctx.poll(false));
    assert_eq!(d.n.get(), 0);
    drop(e);
}

// /aio/event/wait
#[test]
fn event_wait() {
    let ctx = new_context();
    let (d, h) = register(&ctx, 1, false, false);
    drain(&ctx);
    assert_eq!((d.n.get(), d.active.get()), (0, 1));
    d.e.set().unwrap();
    assert!(ctx.poll(false));
    assert_eq!((d.n.get(), d.active.get()), (1, 0));
    assert!(!ctx.poll(false));
    assert_eq!((d.n.get(), d.active.get()), (1, 0));
    drop(h);
    assert!(!ctx.poll(false));
    assert_eq!(d.n.get(), 1);
}

// /aio/event/flush
#[test]
fn event_flush() {
    let ctx = new_context();
    let (d, h) = register(&ctx, 10, true, false);
    drain(&ctx);
    assert_eq!((d.n.get(), d.active.get()), (0, 10));
    d.e.set().unwrap();
    assert!(ctx.poll(false));
    assert_eq!((d.n.get(), d.active.get()), (1, 9));
    assert!(ctx.poll(false));
    while d.active.get() > 0 {
        ctx.poll(true);
    }
    assert_eq!((d.n.get(), d.active.get()), (10, 0));
    assert!(!ctx.poll(false));
    drop(h);
    assert!(!ctx.poll(false));
}

// /aio/event/wait/no-flush-cb
#[test]
fn event_wait_no_flush_cb() {
    let ctx = new_context();
    let (d, h) = register(&ctx, 0, false, false);
    assert!(!ctx.poll(false));
    assert_eq!(d.n.get(), 0);
    d.e.set().unwrap();
    assert!(ctx.poll(true), "must not block: the notifier is set");
    d.n.set(0);
    let (dummy, dh) = register(&ctx, 1, false, false);
    d.e.set().unwrap();
    assert!(ctx.poll(false));
    assert_eq!(d.n.get(), 1);
    assert!(!ctx.poll(false));
    assert_eq!(d.n.get(), 1);
    d.e.set().unwrap();
    assert!(ctx.poll(false));
    assert_eq!(d.n.get(), 2);
    assert!(!ctx.poll(false));
    dummy.e.set().unwrap();
    while dummy.active.get() > 0 {
        ctx.poll(true);
    }
    assert_eq!((d.n.get(), dummy.n.get(), dummy.active.get()), (2, 1, 0));
    drop(dh);
    drop(h);
    assert!(!ctx.poll(false));
    assert_eq!(d.n.get(), 2);
}

// /aio/external-client: disabled external handlers are not dispatched
// (and do not make the loop spin); disables nest; enabling kicks.
#[test]
fn external_client() {
    for i in 1..=2 {
        let ctx = new_context();
        let (d, h) = register(&ctx, 10, true, true);
        d.e.set().unwrap();
        for _ in 0..i {
            ctx.disable_external();
        }
        assert!(ctx.is_external_disabled());
        for _ in 0..i {
            assert!(!ctx.poll(false));
            assert!(d.e.test_and_clear(), "still set: not dispatched");
            d.e.set().unwrap();
            ctx.enable_external();
        }
        assert!(!ctx.is_external_disabled());
        assert!(ctx.poll(false));
        drop(h);
    }
}

#[test]
fn disabled_external_handler_does_not_busy_loop() {
    let ctx = new_context();
    let (d, _h) = register(&ctx, 10, false, true);
    d.e.set().unwrap();
    ctx.disable_external();
    // A timer 20 ms away is the only event: the blocking poll must sleep,
    // not spin on the readable but disabled fd.
    let t = ctx.timer_new(coroloop::aio::ClockType::Realtime, || {});
    t.mod_after(std::time::Duration::from_millis(20));
    let start = std::time::Instant::now();
    let mut polls = 0;
    while t.is_pending() {
        ctx.poll(true);
        polls += 1;
    }
    assert!(start.elapsed() >= std::time::Duration::from_millis(19));
    assert!(polls <= 3, "{polls} polls: spinning");
    assert_eq!(d.n.get(), 0);
    ctx.enable_external();
    assert!(ctx.poll(false));
    assert_eq!(d.n.get(), 1);
}

// An external handler removed while external handlers are disabled leaves
// the fd monitor: the same fd (kept open elsewhere) registers again. Found
// while writing ARCHITECTURE.md: the removal skipped the monitor, whose
// stale entry then refused the fd (EEXIST) and, on epoll, kept reporting
// its hang-ups.
#[test]
fn external_handler_removed_while_disabled_leaves_the_monitor() {
    let ctx = new_context();
    let (d, h) = register(&ctx, 10, false, true);
    ctx.disable_external();
    assert!(!ctx.poll(false)); // applies the disable
    drop(h);
    ctx.enable_external();
    drain(&ctx);
    // The notifier is still open (`d.e`): the same fd registers again.
    let n = Rc::new(Cell::new(0));
    let (e2, n2) = (d.e.clone(), n.clone());
    let h2 = ctx
        .set_event_notifier(
            d.e.clone(),
            true,
            Box::new(move || {
                assert!(e2.test_and_clear());
                n2.set(n2.get() + 1);
            }),
            None,
        )
        .expect("the removed handler's fd left the monitor");
    d.e.set().unwrap();
    assert!(ctx.poll(false));
    assert_eq!(n.get(), 1);
    assert_eq!(d.n.get(), 0, "the removed handler never runs");
    drop(h2);
}

#[test]
fn socket_read_and_write_handlers() {
    let ctx = new_context();
    let (a, mut b) = UnixStream::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    let a = Rc::new(a);
    let got = Rc::new(std::cell::RefCell::new(Vec::new()));
    let (a2, g2) = (a.clone(), got.clone());
    let h = ctx
        .set_fd_handler(
            a.clone(),
            false,
            Some(Box::new(move || {
                let mut buf = [0u8; 64];
                match (&*a2).read(&mut buf) {
                    Ok(0) => g2.borrow_mut().extend_from_slice(b"<eof>"),
                    Ok(n) => g2.borrow_mut().extend_from_slice(&buf[..n]),
                    Err(_) => {}
                }
            })),
            None,
            None,
        )
        .unwrap();
    assert!(!ctx.poll(false));
    b.write_all(b"hello").unwrap();
    assert!(ctx.poll(true));
    assert_eq!(&*got.borrow(), b"hello");
    drop(b); // peer closes: the read handler sees EOF, no hang
    assert!(ctx.poll(true));
    assert_eq!(&*got.borrow(), b"hello<eof>");
    let fd = h.remove();
    assert_eq!(Rc::strong_count(&fd), 2);
    // Writable handler: a socket with buffer space is writable at once.
    let (c, _d) = UnixStream::pair().unwrap();
    let wrote = Rc::new(Cell::new(0));
    let w = wrote.clone();
    let slot: Rc<std::cell::RefCell<Option<FdHandler<UnixStream>>>> = Rc::default();
    let s2 = slot.clone();
    let h = ctx
        .set_fd_handler(
            c,
            false,
            None,
            Some(Box::new(move || {
                w.set(w.get() + 1);
                // Remove itself from inside its own callback.
                drop(s2.borrow_mut().take());
            })),
            None,
        )
        .unwrap();
    *slot.borrow_mut() = Some(h);
    assert!(ctx.poll(true));
    assert_eq!(wrote.get(), 1);
    assert!(slot.borrow().is_none());
    assert!(!ctx.poll(false));
}

#[test]
fn regular_files_cannot_be_watched() {
    let ctx = new_context();
    let f = std::fs::File::open("/proc/self/status").unwrap();
    let err = ctx
        .set_fd_handler(f, false, Some(Box::new(|| {})), None, None)
        .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("AioContext::set_fd_handler: cannot watch fd"),
        "{err}"
    );
}

/// Grows the context's busy-polling time with a short blocking wait (its
/// poll parameters must allow a maximum above 100 µs).
fn grow_poll_time(ctx: &AioContext) {
    let t = ctx.timer_new(coroloop::aio::ClockType::Realtime, || {});
    t.mod_after(std::time::Duration::from_micros(100));
    while t.is_pending() {
        ctx.poll(true);
    }
    assert!(ctx.poll_ns() > 0, "polling time grew");
}

/// A busy-polled handler: its io_poll hook reports `flag` and counts its
/// calls; its read callback clears the notifier and the flag and counts
/// its runs.
fn flag_polled_notifier(
    ctx: &AioContext,
    e: &Arc<EventNotifier>,
    flag: &Rc<Cell<bool>>,
) -> FlagPolled {
    let reads = Rc::new(Cell::new(0));
    let polled = Rc::new(Cell::new(0u64));
    let (f2, r2, e2) = (flag.clone(), reads.clone(), e.clone());
    let (f3, p3) = (flag.clone(), polled.clone());
    let h = ctx
        .set_event_notifier(
            e.clone(),
            false,
            Box::new(move || {
                e2.test_and_clear();
                f2.set(false);
                r2.set(r2.get() + 1);
            }),
            Some(Box::new(move || {
                p3.set(p3.get() + 1);
                f3.get()
            })),
        )
        .unwrap();
    FlagPolled {
        _h: h,
        reads,
        polled,
    }
}

/// What `flag_polled_notifier` made: the handler (registered while this
/// lives), its read callback's runs and its io_poll calls.
struct FlagPolled {
    _h: FdHandler<Arc<EventNotifier>>,
    reads: Rc<Cell<u32>>,
    polled: Rc<Cell<u64>>,
}

#[test]
fn io_poll_handler_is_busy_polled() {
    let ctx = new_context();
    // A generous maximum: the 100 µs wait below must count as "short" even
    // on a loaded machine, so that the polling time grows.
    ctx.set_poll_params(50_000_000, 0, 0).unwrap();
    let e = Arc::new(EventNotifier::new().unwrap());
    let flag = Rc::new(Cell::new(false));
    let FlagPolled {
        _h, reads, polled, ..
    } = flag_polled_notifier(&ctx, &e, &flag);
    grow_poll_time(&ctx);
    // Work visible only through io_poll: found without the fd being set.
    flag.set(true);
    assert!(ctx.poll(true));
    assert_eq!(reads.get(), 1);
    assert!(polled.get() > 0);
    assert!(ctx.set_poll_params(-1, 0, 0).is_err());
}

// A handler that busy polling finds ready, whose fd the monitor reports too
// (the pass asks the kernel because another handler has no io_poll hook),
// runs once per pass, as in QEMU's ready list. Found while writing
// ARCHITECTURE.md: its read callback ran twice.
#[test]
fn handler_found_by_polling_and_by_the_monitor_runs_once() {
    let ctx = new_context();
    ctx.set_poll_params(50_000_000, 0, 0).unwrap();
    let e = Arc::new(EventNotifier::new().unwrap());
    let flag = Rc::new(Cell::new(false)); // set with the notifier
    let FlagPolled { _h, reads, .. } = flag_polled_notifier(&ctx, &e, &flag);
    // A handler without io_poll: every pass asks the kernel.
    let other = Arc::new(EventNotifier::new().unwrap());
    let _h2 = ctx
        .set_event_notifier(other.clone(), false, Box::new(|| {}), None)
        .unwrap();
    grow_poll_time(&ctx);
    flag.set(true);
    e.set().unwrap(); // seen by io_poll and by the monitor
    assert!(ctx.poll(true));
    assert_eq!(reads.get(), 1, "one pass, one call");
}

/// Busy polling also asks the fd monitor (zero timeout) when a handler has
/// no io_poll hook, so a socket a coroutine waits on is noticed in the
/// first polling round instead of after the polling budget (before, busy
/// polling could not see it and only delayed the sleep). The coroutine is
/// resumed once per readiness and reads its data.
#[test]
fn busy_polling_sees_sockets_without_io_poll_hooks() {
    let ctx = new_context();
    ctx.set_poll_params(50_000_000, 0, 0).unwrap();
    // A pollable handler that never has work: counts the polling rounds.
    let idle = Arc::new(EventNotifier::new().unwrap());
    let FlagPolled {
        _h, polled: rounds, ..
    } = flag_polled_notifier(&ctx, &idle, &Rc::new(Cell::new(false)));
    let (a, mut b) = UnixStream::pair().unwrap();
    let got = Rc::new(std::cell::RefCell::new(Vec::new()));
    let g2 = got.clone();
    let co = coroloop::Coroutine::new(move || {
        let mut a = coroloop::io::CoFd::new(a).unwrap();
        for _ in 0..2 {
            let mut buf = [0u8; 1];
            a.read_exact(&mut buf).unwrap();
            g2.borrow_mut().push(buf[0]);
        }
    });
    co.enter(); // waits for the socket on `ctx` (this thread's context)
    for (i, byte) in [7u8, 9].into_iter().enumerate() {
        grow_poll_time(&ctx);
        b.write_all(&[byte]).unwrap();
        rounds.set(0);
        assert!(ctx.poll(true));
        assert_eq!(got.borrow().len(), i + 1, "the socket's coroutine ran");
        assert_eq!(rounds.get(), 1, "found in the first polling round");
    }
    assert!(co.is_finished());
    assert_eq!(*got.borrow(), [7, 9]);
}

/// A remote wake-up that the busy loop's monitor call reports (the notify
/// eventfd) is not lost: the BH scheduled from another thread runs.
#[test]
fn busy_polling_monitor_call_keeps_remote_wakeups() {
    let ctx = new_context();
    ctx.set_poll_params(50_000_000, 0, 0).unwrap();
    // An fd handler without io_poll: busy polling asks the monitor.
    let other = Arc::new(EventNotifier::new().unwrap());
    let _h = ctx
        .set_event_notifier(other.clone(), false, Box::new(|| {}), None)
        .unwrap();
    grow_poll_time(&ctx);
    for round in 0..3 {
        let ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (r2, c2) = (ran.clone(), ctx.clone());
        let t = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(1));
            c2.bh_schedule_oneshot(move || r2.store(true, std::sync::atomic::Ordering::SeqCst));
        });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !ran.load(std::sync::atomic::Ordering::SeqCst) {
            assert!(
                std::time::Instant::now() < deadline,
                "round {round}: the BH never ran"
            );
            ctx.poll(true);
        }
        t.join().unwrap();
    }
    // A bare notify while the loop busy-polls (with the monitor asked
    // every round) ends the blocking pass and is not progress.
    grow_poll_time(&ctx);
    let c2 = ctx.clone();
    let t = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(1));
        c2.notify();
    });
    assert!(!ctx.poll(true), "a bare notify counted as progress");
    t.join().unwrap();
}
