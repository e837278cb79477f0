//! Coroutine I/O: an echo server with one coroutine per connection using
//! `CoFd<TcpStream>` and `std::io::copy`, 64 clients, every byte checked.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::rc::Rc;
use std::time::Duration;

use coroloop::aio::AioContext;
use coroloop::io::{co_recv, co_send, CoFd};
use coroloop::Coroutine;

#[test]
fn echo_64_clients_with_std_io_copy() {
    const CLIENTS: usize = 64;
    const BYTES: usize = 64 * 1024;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    listener.set_nonblocking(true).unwrap();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(addr).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                let data: Vec<u8> = (0..BYTES).map(|i| (i * 7 + c) as u8).collect();
                let w = {
                    let mut s = s.try_clone().unwrap();
                    let data = data.clone();
                    std::thread::spawn(move || {
                        s.write_all(&data).unwrap();
                        s.shutdown(std::net::Shutdown::Write).unwrap();
                    })
                };
                let mut back = Vec::new();
                s.read_to_end(&mut back).unwrap();
                w.join().unwrap();
                assert_eq!(back, data, "client {c}: every byte echoed");
            })
        })
        .collect();

    let ctx = AioContext::new().unwrap();
    let served = Rc::new(std::cell::Cell::new(0usize));
    let s2 = served.clone();
    let acceptor = Coroutine::new(move || {
        let listener = CoFd::new(listener).unwrap();
        let mut conns = Vec::new();
        while conns.len() < CLIENTS {
            match listener.get_ref().accept() {
                Ok((sock, _)) => {
                    let served = s2.clone();
                    let co = Coroutine::new(move || {
                        let mut r = CoFd::new(sock.try_clone().unwrap()).unwrap();
                        let mut w = CoFd::new(sock).unwrap();
                        let n = std::io::copy(&mut r, &mut w).unwrap();
                        assert_eq!(n as usize, BYTES);
                        w.get_ref().shutdown(std::net::Shutdown::Write).unwrap();
                        served.set(served.get() + 1);
                    });
                    co.enter();
                    conns.push(co);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    coroloop::io::yield_until_fd_readable(listener.get_ref()).unwrap();
                }
                Err(e) => panic!("accept: {e}"),
            }
        }
        conns
    });
    acceptor.enter();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    ctx.poll_while(|| {
        assert!(std::time::Instant::now() < deadline, "echo timed out");
        served.get() < CLIENTS
    });
    for c in clients {
        c.join().unwrap();
    }
    assert_eq!(served.get(), CLIENTS);
}

#[test]
fn co_send_recv_report_eof_and_errors() {
    let ctx = AioContext::new().unwrap();
    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    b.set_nonblocking(true).unwrap();
    let co = Coroutine::new(move || {
        let mut buf = [0u8; 10];
        // The peer sends 4 bytes then closes: a partial read, not a hang.
        let n = co_recv(&a, &mut buf).unwrap();
        assert_eq!(&buf[..n], b"ping");
        // Sending to a closed peer: an error, not a hang or SIGPIPE.
        let err = co_send(&a, &[1u8; 1 << 20]).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::BrokenPipe);
        n
    });
    co.enter();
    let writer = Coroutine::new(move || {
        assert_eq!(co_send(&b, b"ping").unwrap(), 4);
    });
    writer.enter();
    drop(writer);
    ctx.poll_while(|| !co.is_finished());
    assert_eq!(co.take_result(), Some(4));
}

// A reader and a writer coroutine wait on the same socket at once (QEMU's
// NBD server does this: a receive coroutine and reply writers): both
// directions are watched through one registration; a second waiter for the
// same direction is refused with AlreadyExists.
#[test]
fn reader_and_writer_wait_on_one_socket() {
    use std::os::unix::net::UnixStream;
    let ctx = AioContext::new().unwrap();
    let (ours, theirs) = UnixStream::pair().unwrap();
    let ours = Rc::new(ours);
    const BIG: usize = 8 << 20; // far more than the socket buffer
    let (r, w) = (ours.clone(), ours.clone());
    let reader = Coroutine::new(move || {
        let mut fd = CoFd::new(r).unwrap();
        let mut buf = [0u8; 5];
        fd.read_exact(&mut buf).unwrap(); // waits readable
        buf
    });
    let writer = Coroutine::new(move || {
        let mut fd = CoFd::new(w).unwrap();
        fd.write_all(&vec![7u8; BIG]).unwrap(); // waits writable
        "written"
    });
    reader.enter();
    writer.enter();
    assert!(!reader.is_finished() && !writer.is_finished());
    // A second reader of the same fd is refused while the first waits.
    let r2 = ours.clone();
    let second = Coroutine::new(move || {
        coroloop::io::yield_until_fd_readable(&*r2)
            .unwrap_err()
            .kind()
    });
    second.enter();
    assert_eq!(
        second.take_result(),
        Some(std::io::ErrorKind::AlreadyExists)
    );
    let peer = std::thread::spawn(move || {
        let mut theirs = theirs;
        let mut got = vec![0u8; BIG];
        theirs.read_exact(&mut got).unwrap();
        assert!(got.iter().all(|&b| b == 7));
        theirs.write_all(b"hello").unwrap();
    });
    ctx.poll_while(|| !reader.is_finished() || !writer.is_finished());
    peer.join().unwrap();
    assert_eq!(&reader.take_result().unwrap(), b"hello");
    assert_eq!(writer.take_result(), Some("written"));
}
