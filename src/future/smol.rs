//! The `smol` feature: an AioContext driven from inside a smol executor
//! (QEMU's GSource, in async form).

use std::future::Future;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use async_io::{Async, Timer};
use futures_lite::future;

use crate::aio::AioContext;

/// Ends a `prepare` with a `pending` however the wait ends (the driver
/// future may be dropped while it waits).
struct Prepared<'a>(&'a AioContext);

impl Drop for Prepared<'_> {
    fn drop(&mut self) {
        self.0.pending();
    }
}

impl AioContext {
    /// An async driver for this context, to run inside a smol executor on
    /// the home thread: it waits for the context's fd (epoll) and its next
    /// timer through async-io, then dispatches, yielding to the executor's
    /// other tasks after every pass that did work. One thread then runs
    /// smol tasks and the context (BHs, fd handlers, timers, coroutines,
    /// tasks) together.
    ///
    /// The future never completes; drop it (or race it with
    /// `futures_lite::future::or`) to stop driving the context. It is
    /// `!Send`: spawn it on a `LocalExecutor` (or `block_on`) of the home
    /// thread:
    ///
    /// ```compile_fail
    /// fn assert_send<T: Send>(_: T) {}
    /// let ctx = coroloop::aio::AioContext::new().unwrap();
    /// assert_send(ctx.run_in_smol()); // error: the driver is `!Send`
    /// ```
    ///
    /// # Panics
    ///
    /// When polled off the home thread.
    ///
    /// # Examples
    ///
    /// ```
    /// use coroloop::{aio::AioContext, Coroutine, coroutine};
    /// use std::time::Duration;
    ///
    /// let ctx = AioContext::new()?;
    /// let co = Coroutine::new(|| coroutine::sleep(Duration::from_millis(2)));
    /// co.enter(); // sleeps on the context's timer
    /// let ex = smol::LocalExecutor::new();
    /// ex.spawn(ctx.run_in_smol()).detach();
    /// smol::block_on(ex.run(async {
    ///     smol::Timer::after(Duration::from_millis(20)).await; // a smol task
    /// }));
    /// assert!(co.is_finished());
    /// # std::io::Result::Ok(())
    /// ```
    #[doc(alias = "aio_get_g_source")]
    pub fn run_in_smol(&self) -> impl Future<Output = ()> + 'static {
        let ctx = self.clone();
        async move {
            // The driver stays on the home thread: keep the future !Send.
            let _home_only = std::marker::PhantomData::<*const ()>;
            // A duplicate of the epoll fd for async-io to own and register.
            // It sets O_NONBLOCK on the shared file description, which
            // `epoll_wait` and `ppoll` on the epoll fd ignore.
            let fd: OwnedFd = match ctx.as_fd().try_clone_to_owned() {
                Ok(fd) => fd,
                Err(e) => panic!("AioContext::run_in_smol: cannot duplicate the epoll fd: {e}"),
            };
            let fd = match Async::new(fd) {
                Ok(fd) => fd,
                Err(e) => panic!("AioContext::run_in_smol: cannot register with async-io: {e}"),
            };
            loop {
                if ctx.poll(false) {
                    future::yield_now().await;
                    continue;
                }
                let timeout = ctx.prepare();
                let prepared = Prepared(&ctx);
                match timeout {
                    Some(Duration::ZERO) => {}
                    None => {
                        let _ = fd.readable().await;
                    }
                    Some(d) => {
                        future::or(
                            async {
                                let _ = fd.readable().await;
                            },
                            async {
                                Timer::after(d).await;
                            },
                        )
                        .await
                    }
                }
                drop(prepared);
                // Keeps the marker alive across the awaits above.
                let _ = &_home_only;
            }
        }
    }
}
