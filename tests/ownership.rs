//! Who owns a coroutine (ARCHITECTURE.md, "Who owns a coroutine"): a dropped
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

// ---------------------------------------------------------------------
// Found by the review of the ownership change.

/// The resumer's list walk holds each header until it is unlinked: the
/// unwind of an adopted coroutine drops its owner's handle, which used to
/// recycle (and, with a full header pool, free) the header the walk then
/// unlinked (a use-after-free under valgrind). Run under the memcheck
/// script to see it; here it must simply hold.
#[test]
fn shutdown_of_a_context_owning_coroutines_with_a_full_header_pool() {
    on_fresh_thread(|| {
        // Fill this thread's header pool, so recycled headers are freed.
        let many: Vec<_> = (0..600).map(|_| Coroutine::new(|| ())).collect();
        drop(many);
        let ctx = AioContext::new().unwrap();
        for _ in 0..3 {
            Coroutine::new(coroutine::suspend).enter();
        }
        assert_eq!(ctx.detached_count(), 3);
        ctx.shutdown();
        assert_eq!(ctx.detached_count(), 0);
        let fut_owner = CoroutineFuture::new(|| {
            Coroutine::new(|| await_future(std::future::pending::<()>())).enter();
            await_future(std::future::pending::<()>());
        });
        let mut fut = Box::pin(fut_owner);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(fut.as_mut().poll(&mut cx).is_pending());
        drop(fut);
    });
}

/// A fresh coroutine's closure is dropped only after the coroutine is
/// marked finished: a destructor in it that enters the coroutine gets the
/// "finished" panic instead of running the body on a dropped closure.
#[test]
fn cancelling_a_fresh_coroutine_marks_it_finished_before_dropping_its_closure() {
    on_fresh_thread(|| {
        struct EntersOnDrop(Rc<std::cell::RefCell<Option<Coroutine>>>);
        impl Drop for EntersOnDrop {
            fn drop(&mut self) {
                if let Some(co) = self.0.borrow_mut().take() {
                    co.enter();
                }
            }
        }
        let slot: Rc<std::cell::RefCell<Option<Coroutine>>> = Rc::default();
        let e = EntersOnDrop(slot.clone());
        let co = Coroutine::new(move || {
            let _e = &e;
            unreachable!("the body of a cancelled fresh coroutine never runs");
        });
        *slot.borrow_mut() = Some(co.clone());
        assert_eq!(
            common::panic_message(|| co.cancel()),
            "Coroutine::enter: the coroutine has already finished"
        );
        assert!(co.is_finished());
    });
}

/// Dropping the last user handle shuts the context down once, however
/// many handles its destructors make and drop meanwhile (each used to
/// start a nested shutdown: 20,000 adopted coroutines overflowed the
/// stack).
#[test]
fn the_last_handle_starts_one_shutdown_not_one_per_coroutine() {
    on_fresh_thread(|| {
        thread_local!(static DEPTH: Cell<(u32, u32)> = const { Cell::new((0, 0)) });
        struct D;
        impl Drop for D {
            fn drop(&mut self) {
                DEPTH.with(|d| {
                    let (cur, max) = d.get();
                    d.set((cur + 1, max.max(cur + 1)));
                });
                // Makes and drops a user handle of the dying context.
                drop(AioContext::current());
                DEPTH.with(|d| {
                    let (cur, max) = d.get();
                    d.set((cur - 1, max));
                });
            }
        }
        let ctx = AioContext::new().unwrap();
        for _ in 0..50 {
            Coroutine::new(|| {
                let _d = D;
                coroutine::suspend();
            })
            .enter();
        }
        drop(ctx);
        assert_eq!(DEPTH.with(Cell::get), (0, 1), "no nested shutdown");
    });
}

/// A coroutine created and entered by a destructor that runs during a
/// shutdown's cancellations is cancelled normally at its first suspension
/// (it used to abort: its suspend saw the other coroutine's unwind).
#[test]
fn a_coroutine_created_during_cancellation_is_cancelled_without_abort() {
    on_fresh_thread(|| {
        let late_done = Rc::new(Cell::new(false));
        struct MakesOne(Rc<Cell<bool>>);
        impl Drop for MakesOne {
            fn drop(&mut self) {
                let d = self.0.clone();
                let co = Coroutine::new(move || {
                    coroutine::suspend();
                    d.set(true);
                });
                co.enter();
                // Its list was closed: cancelled at its first suspension.
                assert!(co.is_finished());
            }
        }
        let ctx = AioContext::new().unwrap();
        let m = MakesOne(late_done.clone());
        Coroutine::new(move || {
            let _m = m;
            coroutine::suspend();
        })
        .enter();
        ctx.shutdown();
        assert!(!late_done.get());
    });
}

/// A `CoroutineFuture` made inside a coroutine whose context shut down
/// (the coroutine runs on until its next suspension) is not born
/// cancelled: it runs on the live context that drives it.
#[test]
fn a_coroutine_future_made_in_a_cancelled_coroutine_still_runs() {
    on_fresh_thread(|| {
        let a = AioContext::new().unwrap();
        let b = AioContext::new().unwrap();
        let (a2, b2) = (a.clone(), b.clone());
        let co = Coroutine::new(move || {
            a2.shutdown();
            b2.block_on(CoroutineFuture::new(|| {
                coroutine::yield_now();
                5
            }))
        });
        co.enter();
        assert_eq!(co.take_result(), Some(5));
        drop((a, b));
    });
}

/// The QEMU idiom inside a `CoroutineFuture` and inside `spawn_coroutine`:
/// the child finishes its work; the future (and the task) completes once
/// the coroutines it took over have finished.
#[test]
fn the_qemu_idiom_inside_a_future_or_a_spawned_coroutine_finishes_its_work() {
    on_fresh_thread(|| {
        let ctx = AioContext::new().unwrap();
        let done = std::sync::Arc::new(AtomicUsize::new(0));
        let d = done.clone();
        let v = ctx.block_on(CoroutineFuture::new(move || {
            Coroutine::new(move || {
                coroutine::sleep(Duration::from_millis(2));
                d.fetch_add(1, Ordering::SeqCst);
            })
            .enter();
            1
        }));
        assert_eq!(v, 1);
        assert_eq!(done.load(Ordering::SeqCst), 1, "the child finished first");
        let d = done.clone();
        let task = ctx.spawn_coroutine(move || {
            Coroutine::new(move || {
                coroutine::sleep(Duration::from_millis(2));
                d.fetch_add(1, Ordering::SeqCst);
            })
            .enter();
            2
        });
        assert_eq!(ctx.block_on(task), 2);
        assert_eq!(done.load(Ordering::SeqCst), 2);
    });
}

/// A `CoroutineFuture`'s coroutine sleeping on a context that shuts down
/// is cancelled instead of waiting forever; the future says so.
#[test]
fn a_future_sleeping_on_a_context_that_shuts_down_does_not_hang() {
    on_fresh_thread(|| {
        let ctx = AioContext::new().unwrap();
        let ctx2 = ctx.clone();
        let msg = common::panic_message(|| {
            ctx.block_on(CoroutineFuture::new(move || {
                ctx2.shutdown();
                coroutine::sleep(Duration::from_millis(10));
                7
            }))
        });
        assert!(msg.contains("it was cancelled"), "{msg}");
    });
}

/// `detach()` inside a `CoroutineFuture` gives the coroutine to the
/// future (its resumer), which lets go of it when it finishes (it used to
/// stay in the context's map).
#[test]
fn detach_inside_a_future_is_released_when_it_finishes() {
    on_fresh_thread(|| {
        let ctx = AioContext::new().unwrap();
        for _ in 0..3 {
            ctx.block_on(CoroutineFuture::new(|| {
                let co = Coroutine::new(coroutine::yield_now);
                co.enter();
                co.detach();
            }));
        }
        assert_eq!(ctx.detached_count(), 0);
    });
}

/// Found by the third review: a `CoroutineFuture`'s coroutine already
/// sleeping (or in `CoSleep::sleep_for`, or owning a sleeping child) when
/// the context shuts down is woken by the shutdown (the timer callbacks
/// are dropped there) and cancelled; the future resolves instead of
/// staying pending forever.
#[test]
fn future_sleeps_in_progress_end_when_their_context_shuts_down() {
    on_fresh_thread(|| {
        type Body = Box<dyn FnOnce()>;
        let bodies: Vec<(&str, Body)> = vec![
            (
                "sleep",
                Box::new(|| coroutine::sleep(Duration::from_secs(3))),
            ),
            (
                "CoSleep::sleep_for",
                Box::new(|| {
                    coroloop::sync::CoSleep::new()
                        .sleep_for(coroloop::aio::ClockType::Realtime, Duration::from_secs(3));
                }),
            ),
            (
                "a sleeping child",
                Box::new(|| {
                    Coroutine::new(|| coroutine::sleep(Duration::from_secs(3))).enter();
                }),
            ),
        ];
        for (name, body) in bodies {
            let ctx = AioContext::new().unwrap();
            let mut fut = Box::pin(CoroutineFuture::new(body));
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            assert!(fut.as_mut().poll(&mut cx).is_pending(), "{name}");
            ctx.shutdown();
            let mut ended = false;
            for _ in 0..3 {
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    fut.as_mut().poll(&mut cx)
                }));
                match r {
                    Ok(std::task::Poll::Pending) => continue,
                    Ok(std::task::Poll::Ready(())) | Err(_) => {
                        ended = true;
                        break;
                    }
                }
            }
            assert!(
                ended,
                "{name}: the future still waits after its context shut down"
            );
        }
    });
}

/// Found by the third review: a destructor run by `shutdown` that creates
/// a coroutine which sleeps or is detached must not panic (the process
/// aborted): the coroutine belongs to the dying context and is cancelled.
#[test]
fn coroutines_made_by_destructors_during_shutdown_are_cancelled_quietly() {
    on_fresh_thread(|| {
        struct MakesCoroutines;
        impl Drop for MakesCoroutines {
            fn drop(&mut self) {
                let a = Coroutine::new(|| coroutine::sleep(Duration::from_secs(1)));
                a.enter();
                assert!(a.is_finished());
                let b = Coroutine::new(coroutine::suspend);
                b.enter();
                b.detach();
            }
        }
        let ctx = AioContext::new().unwrap();
        let m = MakesCoroutines;
        ctx.bh_schedule_oneshot_local(move || {
            let _m = &m;
        });
        ctx.shutdown();
        assert_eq!(ctx.detached_count(), 0);
    });
}

/// Found by the API fuzzer (program seed 6510184892687580034): a coroutine
/// detached before it started was adopted by its resumer but never
/// entered: inside a `CoroutineFuture` (which completes once the
/// coroutines it took over finish) `block_on` hung; on a context it sat
/// unrun until shutdown. It starts at the resumer's next pass now.
#[test]
fn a_fresh_coroutine_detached_starts() {
    common::on_fresh_thread(|| {
        let ctx = AioContext::new().unwrap();
        let ran = Rc::new(Cell::new(0));
        let r = ran.clone();
        Coroutine::new(move || r.set(r.get() + 1)).detach();
        assert_eq!(ran.get(), 0, "detach does not enter it");
        ctx.poll(false);
        assert_eq!(ran.get(), 1);
        let r = ran.clone();
        ctx.block_on(coroloop::future::CoroutineFuture::new(move || {
            let r2 = r.clone();
            Coroutine::new(move || r2.set(r2.get() + 10)).detach();
        }));
        assert_eq!(ran.get(), 11);
    });
}

/// Found by the API fuzzer (program seed 17666636564805800179): a coroutine
/// created by a callback (here a BH) that a nested `poll` ran inside a
/// `CoroutineFuture`'s coroutine inherited the future as its resumer; once
/// detached, the future waited for it to finish, for ever. What a loop's
/// callback creates belongs to the loop's context.
#[test]
fn a_coroutine_created_by_a_callback_of_a_nested_poll_belongs_to_the_context() {
    on_fresh_thread(|| {
        let ctx = AioContext::new().unwrap();
        let c2 = ctx.clone();
        let bh = ctx.bh_new_local(|| {
            Coroutine::new(coroloop::coroutine::suspend).detach();
        });
        bh.schedule();
        ctx.block_on(coroloop::future::CoroutineFuture::new(move || {
            c2.poll(false); // runs the BH on this coroutine's stack
        }));
        assert_eq!(ctx.detached_count(), 1, "the context owns it");
        ctx.shutdown();
    });
}
