//! The echo example (`examples/echo.rs`) as a test: 64 clients, every byte
//! checked; one stalled client timed out by the server while it keeps
//! serving the others. CI runs it on epoll and on io_uring.

#[path = "../examples/echo.rs"]
mod echo;

use std::sync::atomic::Ordering;

#[test]
fn sixty_four_clients_and_a_staller() {
    let (r, stats) = echo::run(64).unwrap();
    assert_eq!(r.clients_ok, 64);
    assert_eq!(r.bytes, 64 * 64 * 1024);
    assert_eq!(stats.accepted.load(Ordering::Relaxed), 65);
    assert_eq!(
        stats.timed_out.load(Ordering::Relaxed),
        1,
        "only the staller"
    );
    // 3 bytes of the staller + every client's bytes.
    assert_eq!(stats.echoed.load(Ordering::Relaxed), 64 * 64 * 1024 + 3);
    assert!(r.stalled_closed_after >= echo::IDLE_TIMEOUT / 2);
}
