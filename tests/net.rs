//! `coroloop::net`: accept, connect, read and write suspend the coroutine;
//! every error path, and the timeouts. Runs on the fd monitor chosen by
//! `COROLOOP_FDMON` (CI runs it on epoll and on io_uring).

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use common::on_fresh_thread;
use coroloop::aio::AioContext;
use coroloop::io::CoFd;
use coroloop::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use coroloop::Coroutine;

/// Runs `f` in a coroutine on a fresh context until it finishes.
fn in_coroutine<R: 'static>(f: impl FnOnce() -> R + 'static) -> R {
    let ctx = AioContext::new().unwrap();
    let co = Coroutine::new(f);
    co.enter();
    ctx.poll_while(|| !co.is_finished());
    co.take_result().expect("the coroutine panicked")
}

#[test]
fn tcp_echo_with_a_reader_and_a_writer_on_one_connection() {
    on_fresh_thread(|| {
        let ctx = AioContext::new().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = Coroutine::new(move || {
            let (conn, peer) = listener.accept().unwrap();
            assert_eq!(peer, conn.peer_addr().unwrap());
            let mut buf = vec![0u8; 4096];
            let mut total = 0;
            loop {
                let n = (&conn).read(&mut buf).unwrap();
                if n == 0 {
                    break total;
                }
                (&conn).write_all(&buf[..n]).unwrap();
                total += n;
            }
        });
        server.enter();
        const LEN: usize = 1 << 20;
        let conn = std::rc::Rc::new(TcpStream::connect(addr).unwrap());
        conn.set_nodelay(true).unwrap();
        assert!(conn.nodelay().unwrap());
        assert_eq!(conn.peer_addr().unwrap(), addr);
        // One coroutine writes 1 MiB (more than the socket buffers) while
        // another reads it back: both wait on the same fd.
        let w = conn.clone();
        let writer = Coroutine::new(move || {
            let data: Vec<u8> = (0..LEN).map(|i| (i % 251) as u8).collect();
            (&*w).write_all(&data).unwrap();
            w.shutdown(Shutdown::Write).unwrap();
        });
        let r = conn.clone();
        let reader = Coroutine::new(move || {
            let mut back = Vec::new();
            (&*r).read_to_end(&mut back).unwrap();
            back
        });
        writer.enter();
        reader.enter();
        ctx.poll_while(|| !reader.is_finished() || !server.is_finished());
        let back = reader.take_result().unwrap();
        assert_eq!(back.len(), LEN);
        assert!(back.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
        assert_eq!(server.take_result(), Some(LEN));
    });
}

#[test]
fn unix_stream_pair_clone_and_listener() {
    on_fresh_thread(|| {
        let dir = std::env::temp_dir().join(format!("coroloop-net-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        let path = dir.clone();
        let out = in_coroutine(move || {
            let listener = UnixListener::bind(&path).unwrap();
            let p2 = path.clone();
            let client = Coroutine::new(move || {
                let mut c = UnixStream::connect(&p2).unwrap();
                c.write_all(b"ping").unwrap();
                let mut b = [0u8; 4];
                c.read_exact(&mut b).unwrap();
                b
            });
            client.enter();
            let (conn, _) = listener.accept().unwrap();
            let clone = conn.try_clone().unwrap();
            let mut b = [0u8; 4];
            (&conn).read_exact(&mut b).unwrap();
            (&clone).write_all(b"pong").unwrap();
            while !client.is_finished() {
                coroloop::coroutine::yield_now();
            }
            let (a, mut b2) = UnixStream::pair().unwrap();
            (&a).write_all(b"x").unwrap();
            let mut one = [0u8; 1];
            b2.read_exact(&mut one).unwrap();
            (b, client.take_result().unwrap(), one)
        });
        let _ = std::fs::remove_file(&dir);
        assert_eq!(out, (*b"ping", *b"pong", *b"x"));
    });
}

#[test]
fn end_of_stream_reset_refused_and_broken_pipe_are_io_errors() {
    on_fresh_thread(|| {
        in_coroutine(|| {
            // Refused: nothing listens on a port we just closed.
            let port = {
                let l = TcpListener::bind("127.0.0.1:0").unwrap();
                l.local_addr().unwrap()
            };
            let e = TcpStream::connect(port).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{e}");

            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            // End of stream: the peer shuts down its write half.
            let c = TcpStream::connect(addr).unwrap();
            let (s, _) = listener.accept().unwrap();
            c.shutdown(Shutdown::Write).unwrap();
            let mut b = [0u8; 8];
            assert_eq!((&s).read(&mut b).unwrap(), 0);
            drop((c, s));
            // Reset: the peer closes with SO_LINGER 0.
            let c = TcpStream::connect(addr).unwrap();
            let (s, _) = listener.accept().unwrap();
            rustix::net::sockopt::set_socket_linger(c.as_fd(), Some(Duration::ZERO)).unwrap();
            drop(c);
            let e = (&s).read(&mut b).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}");
            // Broken pipe (no SIGPIPE): writing after the peer went.
            let c = TcpStream::connect(addr).unwrap();
            let (s, _) = listener.accept().unwrap();
            drop(c);
            let mut err = None;
            for _ in 0..100 {
                if let Err(e) = (&s).write_all(&[0u8; 65536]) {
                    err = Some(e);
                    break;
                }
            }
            let e = err.expect("writes to a closed peer fail");
            assert!(
                matches!(e.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset),
                "{e}"
            );
        });
    });
}

#[test]
fn timeouts_end_waits_with_timed_out_and_the_stream_stays_usable() {
    on_fresh_thread(|| {
        in_coroutine(|| {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            // accept
            let t0 = Instant::now();
            let e = listener
                .accept_timeout(Duration::from_millis(30))
                .unwrap_err();
            assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}");
            assert!(e.to_string().contains("TcpListener::accept"), "{e}");
            assert!(t0.elapsed() >= Duration::from_millis(30));
            // read
            let c = TcpStream::connect(addr).unwrap();
            let (s, _) = listener.accept_timeout(Duration::from_secs(5)).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(30))).unwrap();
            assert_eq!(s.read_timeout().unwrap(), Some(Duration::from_millis(30)));
            let mut b = [0u8; 4];
            let e = (&s).read(&mut b).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}");
            assert!(e.to_string().contains("TcpStream::read"), "{e}");
            // Still usable after a timeout.
            (&c).write_all(b"late").unwrap();
            (&s).read_exact(&mut b).unwrap();
            assert_eq!(&b, b"late");
            // write: fill the peer's buffers, never read them.
            s.set_write_timeout(Some(Duration::from_millis(30)))
                .unwrap();
            let big = vec![0u8; 1 << 16];
            let e = loop {
                if let Err(e) = (&s).write(&big) {
                    break e;
                }
            };
            assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}");
            // Zero is invalid, as in std; None clears.
            let e = s.set_read_timeout(Some(Duration::ZERO)).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidInput);
            s.set_read_timeout(None).unwrap();
            assert_eq!(s.read_timeout().unwrap(), None);
            let e = TcpStream::connect_timeout(&addr, Duration::ZERO).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidInput);
            drop(c);
        });
    });
}

/// A connect that cannot complete: a Unix listener whose backlog is full.
#[test]
fn connect_timeout_when_the_backlog_is_full() {
    on_fresh_thread(|| {
        let path = std::env::temp_dir().join(format!("coroloop-net-bl-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let p = path.clone();
        let e = in_coroutine(move || {
            let fd = rustix::net::socket(
                rustix::net::AddressFamily::UNIX,
                rustix::net::SocketType::STREAM,
                None,
            )
            .unwrap();
            let addr = rustix::net::SocketAddrUnix::new(&p).unwrap();
            rustix::net::bind(&fd, &addr).unwrap();
            rustix::net::listen(&fd, 0).unwrap();
            let mut kept = Vec::new();
            loop {
                match UnixStream::connect_timeout(&p, Duration::from_millis(30)) {
                    Ok(s) => kept.push(s),
                    Err(e) => break e,
                }
                assert!(kept.len() < 100, "the backlog never filled");
            }
        });
        let _ = std::fs::remove_file(&path);
        assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}");
    });
}

#[test]
fn cofd_timeouts() {
    on_fresh_thread(|| {
        in_coroutine(|| {
            let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
            let mut a = CoFd::new(a).unwrap();
            a.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
            let e = a.read(&mut [0u8; 1]).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}");
            assert!(e.to_string().contains("CoFd::read"), "{e}");
            a.set_write_timeout(Some(Duration::from_millis(20)))
                .unwrap();
            let big = vec![0u8; 1 << 16];
            let e = loop {
                if let Err(e) = a.write(&big) {
                    break e;
                }
            };
            assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}");
            assert_eq!(
                a.set_write_timeout(Some(Duration::ZERO))
                    .unwrap_err()
                    .kind(),
                ErrorKind::InvalidInput
            );
        });
    });
}

/// Outside a coroutine the sockets are plain non-blocking ones.
#[test]
fn outside_a_coroutine_would_block_is_returned() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    assert_eq!(listener.accept().unwrap_err().kind(), ErrorKind::WouldBlock);
    let c = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let mut b = [0u8; 1];
    assert_eq!((&c).read(&mut b).unwrap_err().kind(), ErrorKind::WouldBlock);
}

/// A context shut down while a coroutine waits in `accept` cancels it:
/// the wait ends (no hang) and the handle sees it finished, no result.
#[test]
fn shutdown_ends_an_accept() {
    on_fresh_thread(|| {
        let ctx = AioContext::new().unwrap();
        let co = Coroutine::new(|| {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.accept().map(|_| ())
        });
        co.enter();
        assert!(!co.is_finished(), "waits in accept");
        ctx.shutdown();
        assert!(co.is_finished());
        assert!(co.take_result().is_none(), "cancelled");
    });
}
