//! An echo server on `coroloop::net`, with per-connection timeouts.
//!
//! The server runs on an IoThread: one coroutine accepts, one coroutine per
//! connection echoes, sequential code with a read timeout that drops a
//! stalled peer. 64 clients (coroutines on the main thread) each send
//! 64 KiB and check every byte that comes back, while one more client
//! stalls after a few bytes: the server times it out and keeps serving the
//! others.
//!
//! ```sh
//! cargo run --release --example echo
//! ```

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use coroloop::aio::{AioContext, IoThread};
use coroloop::net::{TcpListener, TcpStream};
use coroloop::Coroutine;

/// How long a connection may stay silent before the server drops it.
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_millis(300);

/// What the server counted.
#[derive(Debug, Default)]
pub(crate) struct ServerStats {
    /// Connections accepted.
    pub(crate) accepted: AtomicUsize,
    /// Bytes echoed.
    pub(crate) echoed: AtomicUsize,
    /// Connections dropped by the read timeout.
    pub(crate) timed_out: AtomicUsize,
}

/// One connection: echo until end of stream, an error, or a silence longer
/// than `IDLE_TIMEOUT`.
fn serve(conn: TcpStream, stats: &ServerStats) -> io::Result<()> {
    conn.set_read_timeout(Some(IDLE_TIMEOUT))?;
    conn.set_write_timeout(Some(Duration::from_secs(5)))?;
    conn.set_nodelay(true)?;
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match (&conn).read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                stats.timed_out.fetch_add(1, Ordering::Relaxed);
                return Ok(()); // dropping `conn` closes it
            }
            Err(e) => return Err(e),
        };
        (&conn).write_all(&buf[..n])?;
        stats.echoed.fetch_add(n, Ordering::Relaxed);
    }
}

/// Starts the server on `io`: an accept loop owned by the IoThread's
/// context (it ends when the IoThread stops).
pub(crate) fn start_server(io: &IoThread, stats: Arc<ServerStats>) -> io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    io.context().bh_schedule_oneshot(move || {
        let accept_loop = Coroutine::new(move || loop {
            match listener.accept() {
                Ok((conn, _peer)) => {
                    stats.accepted.fetch_add(1, Ordering::Relaxed);
                    let stats = stats.clone();
                    // Started here, then owned by the context: dropping the
                    // handle does not cancel it.
                    Coroutine::new(move || {
                        if let Err(e) = serve(conn, &stats) {
                            eprintln!("echo: connection error: {e}");
                        }
                    })
                    .enter();
                }
                Err(e) => {
                    eprintln!("echo: accept: {e}");
                    return;
                }
            }
        });
        accept_loop.enter();
    });
    Ok(addr)
}

/// What the clients saw.
#[derive(Debug)]
pub(crate) struct Report {
    /// Clients whose 64 KiB came back intact.
    pub(crate) clients_ok: usize,
    /// Bytes checked.
    pub(crate) bytes: usize,
    /// How long the stalled client waited before the server closed it.
    pub(crate) stalled_closed_after: Duration,
}

/// Runs the server and `clients` clients plus one that stalls; checks
/// every byte.
pub(crate) fn run(clients: usize) -> io::Result<(Report, Arc<ServerStats>)> {
    const LEN: usize = 64 * 1024;
    let io = IoThread::spawn("echo-server")?;
    let stats = Arc::new(ServerStats::default());
    let addr = start_server(&io, stats.clone())?;

    let ctx = AioContext::new()?;
    let mut cos = Vec::new();
    for c in 0..clients {
        cos.push(Coroutine::new(move || -> io::Result<usize> {
            let conn = TcpStream::connect(addr)?;
            conn.set_read_timeout(Some(Duration::from_secs(10)))?;
            let data: Vec<u8> = (0..LEN).map(|i| (i * 7 + c) as u8).collect();
            let mut back = vec![0u8; 4096];
            for piece in data.chunks(4096) {
                (&conn).write_all(piece)?;
                let got = &mut back[..piece.len()];
                (&conn).read_exact(got)?;
                if got != piece {
                    return Err(io::Error::other(format!("client {c}: wrong bytes")));
                }
            }
            Ok(LEN)
        }));
    }
    let staller = Coroutine::new(move || -> io::Result<Duration> {
        let conn = TcpStream::connect(addr)?;
        (&conn).write_all(b"hel")?; // ... and nothing more
        let mut b = [0u8; 3];
        (&conn).read_exact(&mut b)?;
        let t0 = Instant::now();
        conn.set_read_timeout(Some(Duration::from_secs(10)))?;
        match (&conn).read(&mut b) {
            Ok(0) => Ok(t0.elapsed()), // the server closed it
            Ok(_) => Err(io::Error::other("stalled client: unexpected data")),
            Err(e) => Err(e),
        }
    });
    staller.enter();
    for co in &cos {
        co.enter();
    }
    ctx.poll_while(|| !staller.is_finished() || cos.iter().any(|c| !c.is_finished()));
    let mut clients_ok = 0;
    let mut bytes = 0;
    for co in &cos {
        bytes += co.take_result().expect("client coroutine panicked")?;
        clients_ok += 1;
    }
    let stalled_closed_after = staller.take_result().expect("staller panicked")?;
    drop(io); // stops the server: its coroutines are cancelled
    Ok((
        Report {
            clients_ok,
            bytes,
            stalled_closed_after,
        },
        stats,
    ))
}

#[allow(dead_code)] // `main` is unused when tests include this file
fn main() -> io::Result<()> {
    // The library's log lines (leaks, fallbacks) go through `log`:
    // show warnings and errors; RUST_LOG=coroloop=debug etc. overrides.
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let t0 = Instant::now();
    let (r, stats) = run(64)?;
    println!(
        "echo: {} clients got their {} bytes back intact, {} bytes echoed in {:.0?}",
        r.clients_ok,
        r.bytes,
        stats.echoed.load(Ordering::Relaxed),
        t0.elapsed()
    );
    println!(
        "echo: the stalled client was closed by the server's {:?} read timeout after {:.0?} \
         ({} connection timed out) while the others were served",
        IDLE_TIMEOUT,
        r.stalled_closed_after,
        stats.timed_out.load(Ordering::Relaxed)
    );
    Ok(())
}
