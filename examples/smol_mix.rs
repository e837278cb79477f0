//! Coroutines and smol in one TCP service, ending with a summary line.
//!
//! * A `smol::LocalExecutor` on the main thread accepts connections on a
//!   `smol::net::TcpListener` (127.0.0.1, an ephemeral port).
//! * Each connection is served by a coroutine wrapped in a
//!   [`CoroutineFuture`] and spawned on that executor. The handler,
//!   `serve`, is ordinary synchronous code (a `loop`, `?`, no `.await`):
//!   it reads `add N` lines, sleeps on a smol timer, updates shared stats
//!   behind a [`CoMutex`] and writes the connection's running total back,
//!   reaching smol's async I/O and timers through [`await_future`].
//! * Every tenth request keeps the `CoMutex` guard across an
//!   `await_future` on a timer: the other coroutines queue on the lock
//!   (FIFO) without blocking the thread, and the smol tasks keep running.
//! * A monitor, a plain async task on the same executor, samples the same
//!   stats with [`CoMutex::lock_async`]: one lock for coroutines and tasks.
//! * The built-in load: 32 clients, async tasks on smol's global executor
//!   (other threads), each sending 50 requests on its own connection and
//!   checking every reply exactly.
//!
//! The example checks the totals (replies, request count, sum, bytes each
//! way) and panics on any mismatch; a watchdog panics if it runs for more
//! than 30 seconds. It needs no arguments and takes a fraction of a second.
//!
//! Run: `cargo run --release --example smol_mix`

use std::io;
use std::net::{Shutdown, SocketAddr};
use std::rc::Rc;
use std::thread::{self, ThreadId};
use std::time::{Duration, Instant};

use coroloop::future::{await_future, CoroutineFuture};
use coroloop::sync::CoMutex;
use smol::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use smol::net::{TcpListener, TcpStream};
use smol::{future, LocalExecutor, Timer};

/// Client connections, one coroutine each on the server side.
const CLIENTS: u64 = 32;
/// Requests per connection.
const REQUESTS: u64 = 50;
/// Every `HOLD_EVERY`-th request of a connection holds the stats lock
/// across a timer.
const HOLD_EVERY: u64 = 10;
/// The "work" of a request: a smol timer awaited from the coroutine.
const WORK: Duration = Duration::from_millis(1);
/// How long a lock holder sleeps with the guard held.
const HOLD: Duration = Duration::from_micros(500);
/// The watchdog: the example never hangs.
const DEADLINE: Duration = Duration::from_secs(30);

/// The shared state every connection coroutine updates.
#[derive(Debug, Default)]
struct Stats {
    /// Connections opened / finished.
    opened: u64,
    closed: u64,
    /// Requests served, and the sum of their values.
    requests: u64,
    total: u64,
    /// Request and reply bytes.
    bytes_in: u64,
    bytes_out: u64,
    /// Guards held across an `await_future`.
    held_across_await: u64,
    /// `lock()` calls that found the lock taken and queued.
    contended: u64,
    /// Set while a holder is suspended with the guard: nobody else may see
    /// it set.
    in_critical: bool,
}

/// The value of request `i` of client `c`.
fn value(c: u64, i: u64) -> u64 {
    c * 1000 + i + 1
}

fn parse_request(line: &str) -> io::Result<u64> {
    line.strip_suffix('\n')
        .and_then(|l| l.strip_prefix("add "))
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("bad request {line:?}")))
}

/// One connection, served inside a coroutine: synchronous-style code that
/// waits on smol futures with `await_future`. Returns the requests served
/// and the connection's total.
fn serve(stream: TcpStream, stats: &CoMutex<Stats>, home: ThreadId) -> io::Result<(u64, u64)> {
    assert_eq!(thread::current().id(), home, "coroutine left its thread");
    stats.lock().opened += 1;
    let mut reader = BufReader::new(stream.clone());
    let mut writer = stream;
    let mut line = String::new();
    let (mut served, mut conn_total) = (0u64, 0u64);
    loop {
        line.clear();
        if await_future(reader.read_line(&mut line))? == 0 {
            break; // the client shut its side down
        }
        let n = parse_request(&line)?;
        await_future(Timer::after(WORK));
        served += 1;
        conn_total += n;
        let reply = format!("{conn_total}\n");
        {
            let (mut g, waited) = match stats.try_lock() {
                Some(g) => (g, false),
                None => (stats.lock(), true), // suspends until handed the lock
            };
            assert!(!g.in_critical, "CoMutex let two holders in");
            g.contended += u64::from(waited);
            if served % HOLD_EVERY == 0 {
                // Keep the guard while this coroutine sleeps on a smol timer.
                g.in_critical = true;
                await_future(Timer::after(HOLD));
                assert!(g.in_critical, "someone else ran in the critical section");
                g.in_critical = false;
                g.held_across_await += 1;
            }
            g.requests += 1;
            g.total += n;
            g.bytes_in += line.len() as u64;
            g.bytes_out += reply.len() as u64;
        }
        await_future(writer.write_all(reply.as_bytes()))?;
    }
    assert_eq!(thread::current().id(), home, "coroutine left its thread");
    stats.lock().closed += 1;
    Ok((served, conn_total))
}

/// What one client saw.
struct ClientReport {
    total: u64,
    bytes_out: u64,
    bytes_in: u64,
}

/// One client of the built-in load: sends `add N` requests one at a time
/// and checks each reply (the connection's running total).
async fn client(addr: SocketAddr, c: u64) -> io::Result<ClientReport> {
    let stream = TcpStream::connect(addr).await?;
    let mut reader = BufReader::new(stream.clone());
    let mut writer = stream.clone();
    let mut report = ClientReport {
        total: 0,
        bytes_out: 0,
        bytes_in: 0,
    };
    let mut line = String::new();
    for i in 0..REQUESTS {
        let n = value(c, i);
        let req = format!("add {n}\n");
        writer.write_all(req.as_bytes()).await?;
        report.bytes_out += req.len() as u64;
        line.clear();
        reader.read_line(&mut line).await?;
        report.bytes_in += line.len() as u64;
        report.total += n;
        assert_eq!(
            line,
            format!("{}\n", report.total),
            "client {c}, request {i}: wrong reply"
        );
    }
    // End of requests: the server's coroutine sees EOF, returns, and its
    // dropped stream closes the connection.
    stream.shutdown(Shutdown::Write)?;
    line.clear();
    assert_eq!(
        reader.read_line(&mut line).await?,
        0,
        "client {c}: data after the last reply: {line:?}"
    );
    Ok(report)
}

fn main() -> io::Result<()> {
    // The library's log lines (leaks, fallbacks) go through `log`:
    // show warnings and errors; RUST_LOG=coroloop=debug etc. overrides.
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let home = thread::current().id();
    let stats = Rc::new(CoMutex::new(Stats::default()));
    let ex = LocalExecutor::new();
    let run = async {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let start = Instant::now();

        // The load: plain async tasks on smol's global executor threads.
        let clients: Vec<_> = (0..CLIENTS).map(|c| smol::spawn(client(addr, c))).collect();

        // The monitor: an async task sharing the coroutines' CoMutex.
        let s = stats.clone();
        let monitor = ex.spawn(async move {
            let mut samples = 0u64;
            loop {
                Timer::after(Duration::from_millis(5)).await;
                let g = s.lock_async().await;
                samples += 1;
                if g.closed == CLIENTS {
                    return samples;
                }
            }
        });

        // Accept: one coroutine per connection, as a future on this
        // thread's executor.
        let mut servers = Vec::new();
        for _ in 0..CLIENTS {
            let (stream, _) = listener.accept().await?;
            let s = stats.clone();
            servers.push(ex.spawn(CoroutineFuture::new(move || serve(stream, &s, home))));
        }

        let mut served = (0, 0);
        for server in servers {
            let (requests, total) = server.await?;
            assert_eq!(requests, REQUESTS, "a connection served too few requests");
            served = (served.0 + requests, served.1 + total);
        }
        let mut seen = ClientReport {
            total: 0,
            bytes_out: 0,
            bytes_in: 0,
        };
        for client in clients {
            let r = client.await?;
            seen.total += r.total;
            seen.bytes_out += r.bytes_out;
            seen.bytes_in += r.bytes_in;
        }
        let samples = monitor.await;
        let elapsed = start.elapsed();

        let g = stats.lock_async().await;
        let expected: u64 = (0..CLIENTS)
            .flat_map(|c| (0..REQUESTS).map(move |i| value(c, i)))
            .sum();
        let requests = CLIENTS * REQUESTS;
        assert_eq!(g.opened, CLIENTS);
        assert_eq!(g.closed, CLIENTS);
        assert_eq!(g.requests, requests);
        assert_eq!(served.0, requests);
        assert_eq!(g.total, expected);
        assert_eq!(served.1, expected);
        assert_eq!(seen.total, expected);
        assert_eq!(g.bytes_in, seen.bytes_out, "request bytes differ");
        assert_eq!(g.bytes_out, seen.bytes_in, "reply bytes differ");
        assert_eq!(g.held_across_await, CLIENTS * (REQUESTS / HOLD_EVERY));
        assert!(!g.in_critical);

        println!(
            "smol_mix: {CLIENTS} connections on {addr}, each served by a coroutine \
             on a smol LocalExecutor"
        );
        println!(
            "requests: {} served, total {} (expected {expected}), {} bytes in, {} bytes out",
            g.requests, g.total, g.bytes_in, g.bytes_out
        );
        println!(
            "CoMutex: held across await_future {} times, {} lock() calls queued, \
             {samples} lock_async samples by the monitor task",
            g.held_across_await, g.contended
        );
        println!(
            "elapsed {elapsed:.2?}, {:.0} requests/s",
            requests as f64 / elapsed.as_secs_f64()
        );
        println!("smol_mix: all checks passed");
        io::Result::Ok(())
    };
    let watchdog = async {
        Timer::after(DEADLINE).await;
        panic!("smol_mix: not done after {DEADLINE:?}");
    };
    smol::block_on(ex.run(future::or(run, watchdog)))
}
