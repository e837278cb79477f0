//! Who owns a coroutine (DESIGN.md, "Who owns a coroutine"): a dropped
//! last handle hands a suspended coroutine to its resumer, which runs it to
//! the end; a bare coroutine is unwound; `cancel()` unwinds; a context's
//! shutdown cancels every coroutine it resumes; the library's own
//! references do not keep a context alive.

mod common;

use std::cell::Cell;
use std::future::Future;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use common::on_fresh_thread;
use coroloop::aio::{AioContext, IoThread};
use coroloop::future::{await_future, CoroutineFuture};
use coroloop::{coroutine, Coroutine};

/// The QEMU idiom `Coroutine::new(f).enter()` on a plain context: the
/// temporary handle is gone after `enter`, and the coroutine finishes its
/// work anyway (before: it was unwound at its first sleep and the loop
/// waited forever).
#[test]
fn qemu_idiom_runs_to_completion_on_a_plain_context() {
    on_fresh_thread(|| {
        let ctx = AioContext::new().unwrap();
        let done = Rc::new(Cell::new(0));
        let d = done.clone();
        Coroutine::new(move || {
            for _ in 0..3 {
                coroutine::sleep(Duration::from_millis(1));
                d.set(d.get() + 1);
            }
        })
        .enter();
        assert_eq!(ctx.detached_count(), 1, "its context owns it now");
        let t0 = std::time::Instant::now();
        ctx.poll_while(|| done.get() < 3 && t0.elapsed() < Duration::from_secs(5));
        assert_eq!(done.get(), 3, "the coroutine finished its work");
        // Finished: the context let go of it.
        assert_eq!(ctx.detached_count(), 0);
    });
}

/// The same on an IoThread, from a BH.
#[test]
fn qemu_idiom_runs_to_completion_on_an_iothread() {
    let io = IoThread::spawn("ownership").unwrap();
    let (tx, rx) = mpsc::channel();
    io.context().bh_schedule_oneshot(move || {
        Coroutine::new(move || {
            coroutine::sleep(Duration::from_millis(2));
            tx.send("done after the handle was gone").unwrap();
        })
        .enter();
    });
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(10)),
        Ok("done after the handle was gone")
    );
    io.stop();
}

/// A TCP-server-like shape: a connection coroutine whose handle the
/// accept loop forgot still answers (before: it died at its first wait
/// and the client read an empty line).
#[test]
fn a_connection_coroutine_without_a_handle_still_answers() {
    on_fresh_thread(|| {
        let ctx = AioContext::new().unwrap();
        let (server, mut client) = UnixStream::pair().unwrap();
        server.set_nonblocking(true).unwrap();
        let answered = Rc::new(Cell::new(false));
        let a = answered.clone();
        Coroutine::new(move || {
            let mut buf = [0u8; 5];
            let n = coroloop::io::co_recv(&server, &mut buf).unwrap();
            coroloop::io::co_send(&server, &buf[..n]).unwrap();
            a.set(true);
        })
        .enter();
        client.write_all(b"hello").unwrap();
        let t0 = std::time::Instant::now();
        ctx.poll_while(|| !answered.get() && t0.elapsed() < Duration::from_secs(5));
        let mut back = [0u8; 5];
        std::io::Read::read_exact(&mut client, &mut back).unwrap();
        assert_eq!(&back, b"hello");
    });
}

/// A bare coroutine (no context, no future: nobody else could ever enter
/// it) is unwound when its last handle goes; `cancel()` unwinds any.
#[test]
fn a_bare_coroutine_is_unwound_and_cancel_unwinds() {
    on_fresh_thread(|| {
        struct D(Rc<Cell<u32>>);
        impl Drop for D {
            fn drop(&mut self) {
                self.0.set(self.0.get() + 1);
            }
        }
        let drops = Rc::new(Cell::new(0));
        let d = D(drops.clone());
        let co = Coroutine::new(move || {
            let _d = d;
            coroutine::suspend();
        });
        co.enter();
        assert!(co.aio_context().is_none());
        drop(co);
        assert_eq!(drops.get(), 1, "bare: unwound");

        let ctx = AioContext::new().unwrap();
        let d = D(drops.clone());
        let co = Coroutine::new(move || {
            let _d = d;
            coroutine::suspend();
            unreachable!()
        });
        co.enter();
        co.cancel();
        assert_eq!(drops.get(), 2, "cancel unwinds");
        assert!(co.is_finished());
        assert_eq!(co.take_result(), None);
        co.cancel(); // finished: nothing
                     // A fresh one is dropped without running.
        let d = D(drops.clone());
        let co = Coroutine::new(move || {
            let _d = d;
            unreachable!("never runs")
        });
        co.cancel();
        assert!(co.is_finished());
        assert_eq!(drops.get(), 3);
        drop(ctx);
    });
}

/// Cancelling a coroutine on the call chain (itself) unwinds it at its
/// next suspension.
#[test]
fn cancel_of_a_running_coroutine_unwinds_at_its_next_suspension() {
    on_fresh_thread(|| {
        let reached = Rc::new(Cell::new(0));
        let r = reached.clone();
        let co = Coroutine::new(move || {
            Coroutine::current().unwrap().cancel();
            r.set(1); // still runs until it suspends
            coroutine::suspend();
            r.set(2);
        });
        co.enter();
        assert_eq!(reached.get(), 1);
        assert!(co.is_finished());
    });
}

/// Inside a `CoroutineFuture`, a coroutine whose handle is dropped is
/// taken over by the future and runs to completion while it is polled;
/// dropping the future cancels every coroutine it resumes.
#[test]
fn a_coroutine_future_owns_the_coroutines_created_inside() {
    on_fresh_thread(|| {
        let ctx = AioContext::new().unwrap();
        let steps = Rc::new(Cell::new(0));
        let s = steps.clone();
        let fut = CoroutineFuture::new(move || {
            let s2 = s.clone();
            Coroutine::new(move || {
                coroutine::yield_now();
                s2.set(s2.get() + 1);
            })
            .enter();
            // The inner coroutine runs on while this one waits.
            while s.get() == 0 {
                coroutine::yield_now();
            }
            s.get()
        });
        assert_eq!(ctx.block_on(fut), 1);

        struct D(Rc<Cell<u32>>);
        impl Drop for D {
            fn drop(&mut self) {
                self.0.set(self.0.get() + 1);
            }
        }
        let drops = Rc::new(Cell::new(0));
        let d = drops.clone();
        let mut fut = Box::pin(CoroutineFuture::new(move || {
            let d2 = D(d.clone());
            Coroutine::new(move || {
                let _d = d2;
                await_future(std::future::pending::<()>());
            })
            .enter();
            let _d = D(d);
            await_future(std::future::pending::<()>());
        }));
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        assert!(fut.as_mut().poll(&mut cx).is_pending());
        assert_eq!(drops.get(), 0);
        drop(fut);
        assert_eq!(
            drops.get(),
            2,
            "both coroutines were unwound with the future"
        );
    });
}

/// The newcomer's case: a handle-owned coroutine blocked in `co_recv`, and
/// the last user handle of its context dropped. The library's own
/// references (the fd wait) do not keep the context alive: it shuts down,
/// cancels the coroutine, and its handle sees it finished without a
/// result; no thread blocks (before: it waited forever, even after data
/// arrived and `wake()` was called).
#[test]
fn dropping_the_last_context_handle_cancels_a_coroutine_blocked_in_co_recv() {
    on_fresh_thread(|| {
        let ctx = AioContext::new().unwrap();
        let (server, mut client) = UnixStream::pair().unwrap();
        server.set_nonblocking(true).unwrap();
        let co = Coroutine::new(move || {
            let mut buf = [0u8; 8];
            coroloop::io::co_recv(&server, &mut buf)
        });
        co.enter();
        assert!(!co.is_finished());
        drop(ctx);
        assert!(co.is_finished(), "the context's shutdown cancelled it");
        assert!(co.take_result().is_none(), "finished without a result");
        // The coroutine's socket went with its unwind.
        assert!(client.write_all(b"late").is_err());
        co.wake(); // finished: nothing happens, nothing blocks
        assert!(AioContext::current().is_none(), "the context is gone");
    });
}

/// The same for `coroutine::sleep` and a coroutine on an IoThread that is
/// stopped: every coroutine the context resumes is cancelled, whoever
/// owns it.
#[test]
fn shutdown_cancels_sleeping_and_handle_owned_coroutines() {
    on_fresh_thread(|| {
        let ctx = AioContext::new().unwrap();
        let co = Coroutine::new(|| coroutine::sleep(Duration::from_secs(3600)));
        co.enter();
        drop(ctx);
        assert!(co.is_finished());
    });
    static UNWOUND: AtomicUsize = AtomicUsize::new(0);
    struct D;
    impl Drop for D {
        fn drop(&mut self) {
            UNWOUND.fetch_add(1, Ordering::SeqCst);
        }
    }
    let io = IoThread::spawn("ownership-stop").unwrap();
    let (tx, rx) = mpsc::channel();
    io.context().bh_schedule_oneshot(move || {
        let co = Coroutine::new(|| {
            let _d = D;
            coroutine::sleep(Duration::from_secs(3600));
        });
        co.enter();
        // A handle kept in a thread-local: owned by the user, resumed by
        // the context.
        thread_local!(static KEEP: std::cell::RefCell<Vec<Coroutine>> = const { std::cell::RefCell::new(Vec::new()) });
        KEEP.with(|k| k.borrow_mut().push(co));
        tx.send(()).unwrap();
    });
    rx.recv_timeout(Duration::from_secs(10)).unwrap();
    io.stop();
    assert_eq!(UNWOUND.load(Ordering::SeqCst), 1, "stop cancelled it");
}

/// An io call that would wait on a shut-down context fails with an
/// `io::Error` saying so (here the coroutine shut its own context down).
#[test]
fn an_io_wait_on_a_shut_down_context_is_an_error() {
    on_fresh_thread(|| {
        let ctx = AioContext::new().unwrap();
        let (server, _client) = UnixStream::pair().unwrap();
        server.set_nonblocking(true).unwrap();
        let ctx2 = ctx.clone();
        let co = Coroutine::new(move || {
            ctx2.shutdown();
            let mut buf = [0u8; 4];
            coroloop::io::co_recv(&server, &mut buf)
        });
        co.enter();
        // It is cancelled at its next suspension; its io call failed first.
        assert!(co.is_finished());
        let r = co.take_result().expect("returned");
        let e = r.unwrap_err();
        assert!(
            e.to_string().contains("the context is shut down"),
            "unexpected error: {e}"
        );
    });
}

/// Dropping the last handle while the coroutine runs (from inside it):
/// when it suspends, its context takes it over.
#[test]
fn a_handle_dropped_from_inside_hands_the_coroutine_over_when_it_suspends() {
    on_fresh_thread(|| {
        let ctx = AioContext::new().unwrap();
        let slot: Rc<std::cell::RefCell<Option<Coroutine>>> = Rc::default();
        let s = slot.clone();
        let done = Rc::new(Cell::new(false));
        let d = done.clone();
        let co = Coroutine::new(move || {
            drop(s.borrow_mut().take()); // its only handle
            coroutine::yield_now();
            d.set(true);
        });
        ctx.co_schedule(&co);
        *slot.borrow_mut() = Some(co); // the only handle now
        assert!(ctx.poll(false)); // runs, drops its handle, yields
        assert!(slot.borrow().is_none());
        assert_eq!(ctx.detached_count(), 1, "handed over at its suspension");
        let t0 = std::time::Instant::now();
        ctx.poll_while(|| !done.get() && t0.elapsed() < Duration::from_secs(5));
        assert!(done.get());
        assert_eq!(ctx.detached_count(), 0);
    });
}
