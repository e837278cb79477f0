//! An NBD server built the way QEMU's is: one coroutine per connection that
//! reads requests sequentially, one coroutine per request, a `CoMutex` that
//! serialises replies on the socket, and a `CoFile` for file I/O on the
//! engine picked with `--aio` — all on one `IoThread`, with coroloop's
//! public API only.
//!
//! ```text
//! cargo run --release --example nbd_server -- [--port N] [--size BYTES] [--read-only]
//!     [--aio threads|io_uring|native] [--cache writeback|none] IMAGE
//! ```
//!
//! `--aio` and `--cache` mean what they mean to `qemu-nbd`: `threads` (the
//! default; page-cache hits are served inline with `RWF_NOWAIT`, the rest
//! on the context's thread pool), `io_uring`, or `native` (Linux AIO);
//! `--cache none` opens the image with `O_DIRECT` (requests not aligned to
//! 4 KiB then go through a second, buffered descriptor on the thread pool).
//! The environment variable `NBD_POLL_MAX_NS` sets the IoThread's adaptive
//! polling limit (QEMU's `poll-max-ns`; default 100000 here, 0 turns it
//! off): a budget that covers a client's turnaround (40-60 µs measured on a
//! 2-vCPU VM) lets the loop see the next request without sleeping, which
//! is what queue-depth-1 latency is made of. Polling stops by itself while
//! the connection is idle. `NBD_TIMING=1` prints, at exit, percentiles of
//! each request's service time (header read to reply written) and of the
//! idle time between a reply and the next request when none was in flight.
//!
//! Serves the raw file IMAGE (created, or extended, sparse to `--size`) as
//! the export named "" on 127.0.0.1 (default port 10809; `--port 0` picks a
//! free one). Once it accepts connections it prints one line,
//! `listening on 127.0.0.1:PORT`. SIGINT / SIGTERM: stop accepting, finish
//! the requests in flight, flush, exit 0. Try it with QEMU's clients:
//!
//! ```text
//! qemu-io -f raw nbd://127.0.0.1:10809 -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M'
//! qemu-img info nbd://127.0.0.1:10809
//! ```
//!
//! Without IMAGE it runs a self-contained demo: it serves a fresh temporary
//! image, drives it with a built-in pipelining client on several
//! connections (and with `qemu-io` if installed), checks every byte, stops
//! itself and prints a summary.
//!
//! Protocol: the NBD project's `proto.md` — fixed newstyle handshake
//! (`NBD_OPT_EXPORT_NAME`, `ABORT`, `LIST`, `INFO`, `GO`; other options get
//! `NBD_REP_ERR_UNSUP`), simple replies, `READ`, `WRITE` (+`FUA`), `FLUSH`,
//! `TRIM`, `WRITE_ZEROES`, `DISC`; up to 16 requests in flight per client.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use coroloop::aio::{
    AioContext, AioMode, ClockType, CoFile, FdHandler, IoThread, IoThreadBuilder, Timer,
};
use coroloop::io::CoFd;
use coroloop::sync::{CoMutex, CoQueue};
use coroloop::Coroutine;

// ---- protocol constants (proto.md) ----
const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
const FLAG_NO_ZEROES: u16 = 1 << 1;
const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
const FLAG_C_NO_ZEROES: u32 = 1 << 1;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_STARTTLS: u32 = 5;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;

const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = 0x8000_0001;
const REP_ERR_POLICY: u32 = 0x8000_0002;
const REP_ERR_INVALID: u32 = 0x8000_0003;
const REP_ERR_UNKNOWN: u32 = 0x8000_0006;

const INFO_EXPORT: u16 = 0;
const INFO_BLOCK_SIZE: u16 = 3;

const TF_HAS_FLAGS: u16 = 1 << 0;
const TF_READ_ONLY: u16 = 1 << 1;
const TF_SEND_FLUSH: u16 = 1 << 2;
const TF_SEND_FUA: u16 = 1 << 3;
const TF_SEND_TRIM: u16 = 1 << 5;
const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
const TF_CAN_MULTI_CONN: u16 = 1 << 8;

const CMD_FLAG_FUA: u16 = 1 << 0;
const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;

const EPERM: u32 = 1;
const EIO: u32 = 5;
const ENOMEM: u32 = 12;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;
const EOVERFLOW: u32 = 75;
const ENOTSUP: u32 = 95;

/// Largest option payload accepted (names are at most 4096 bytes).
const MAX_OPTION_LEN: u32 = 16 * 1024;
/// Largest READ/WRITE (QEMU's NBD_MAX_BUFFER_SIZE).
const MAX_REQUEST_LEN: u32 = 32 * 1024 * 1024;
/// Requests in flight per client (QEMU's NBD_MAX_REQUESTS).
const MAX_IN_FLIGHT: usize = 16;
/// The IoThread's polling budget unless `NBD_POLL_MAX_NS` says otherwise
/// (see the module docs): above a client's turnaround on a VM.
const POLL_MAX_NS: i64 = 100_000;

macro_rules! log {
    ($($t:tt)*) => { eprintln!("nbd_server: {}", format_args!($($t)*)) };
}

// ---- the export and the server's state (on the IoThread) ----

struct Export {
    /// The buffered descriptor: TRIM, WRITE_ZEROES, and with `--cache
    /// none` the requests not aligned for `O_DIRECT`.
    file: Arc<File>,
    /// Reads, writes and flushes, on the `--aio` engine.
    io: CoFile,
    size: u64,
    read_only: bool,
}

/// `O_DIRECT` alignment used for `--cache none`.
const DIRECT_ALIGN: u64 = 4096;

/// A reply buffer: the 16-byte header right before 4 KiB-aligned data, so
/// that `O_DIRECT` reads land in it and the reply goes out in one write.
struct ReplyBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl ReplyBuf {
    fn new(cookie: u64, len: usize) -> ReplyBuf {
        let mut raw = vec![0u8; len + 16 + DIRECT_ALIGN as usize];
        let data = (raw.as_ptr() as usize + 16).next_multiple_of(DIRECT_ALIGN as usize);
        let start = data - 16 - raw.as_ptr() as usize;
        raw[start..start + 16].copy_from_slice(&simple_reply(cookie, 0, 0));
        ReplyBuf { raw, start, len }
    }
    fn data(&mut self) -> &mut [u8] {
        &mut self.raw[self.start + 16..self.start + 16 + self.len]
    }
    /// The buffer, cut after the data, and where the reply starts in it
    /// (no copy).
    fn into_reply(mut self) -> (Vec<u8>, usize) {
        self.raw.truncate(self.start + 16 + self.len);
        (self.raw, self.start)
    }
}

/// A copy of `data` in a 4 KiB-aligned buffer (for `O_DIRECT` writes).
fn aligned_copy(data: &[u8]) -> (Vec<u8>, usize) {
    let mut raw = vec![0u8; data.len() + DIRECT_ALIGN as usize];
    let at = raw.as_ptr().align_offset(DIRECT_ALIGN as usize);
    raw[at..at + data.len()].copy_from_slice(data);
    (raw, at)
}

impl Export {
    fn transmission_flags(&self) -> u16 {
        let mut f = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_CAN_MULTI_CONN;
        if self.read_only {
            f |= TF_READ_ONLY;
        } else {
            f |= TF_SEND_FUA | TF_SEND_TRIM | TF_SEND_WRITE_ZEROES;
        }
        f
    }
}

struct Server {
    ctx: AioContext,
    export: Export,
    socket: Rc<TcpListener>,
    listener: RefCell<Option<FdHandler<Rc<TcpListener>>>>,
    /// Re-enables accepting after running out of file descriptors.
    resume: RefCell<Option<Timer>>,
    clients: RefCell<HashMap<u64, Rc<TcpStream>>>,
    next_id: Cell<u64>,
    stopping: Cell<bool>,
    stopped: mpsc::Sender<()>,
    served: Cell<u64>,
    /// `NBD_TIMING=1`: per-request times, printed at exit.
    timing: Option<RefCell<Timing>>,
}

/// Where a request's time goes, seen from the server (`NBD_TIMING=1`):
/// `service` from the moment its header has been read to the moment its
/// reply has been written; `idle` from a reply to the next header when
/// nothing was in flight (at queue depth 1: the client's turnaround plus
/// the time the loop took to notice the socket).
#[derive(Default)]
struct Timing {
    service_ns: Vec<u64>,
    idle_ns: Vec<u64>,
    last_reply: Option<Instant>,
}

impl Timing {
    fn report(&mut self) {
        for (name, v) in [
            ("service", &mut self.service_ns),
            ("idle", &mut self.idle_ns),
        ] {
            if v.is_empty() {
                continue;
            }
            v.sort_unstable();
            let p = |q: f64| v[((v.len() - 1) as f64 * q) as usize] as f64 / 1000.0;
            eprintln!(
                "nbd_server: {name:>7} µs over {} requests: p10 {:.1}, p50 {:.1}, p90 {:.1}, p99 {:.1}",
                v.len(),
                p(0.10),
                p(0.50),
                p(0.90),
                p(0.99)
            );
        }
    }
}

impl Server {
    /// Watches the listening socket (again).
    fn listen(self: &Rc<Self>) -> io::Result<()> {
        let s = Rc::downgrade(self);
        let h = self.ctx.set_fd_handler(
            self.socket.clone(),
            false,
            Some(Box::new(move || {
                if let Some(s) = s.upgrade() {
                    s.accept_ready();
                }
            })),
            None,
            None,
        )?;
        *self.listener.borrow_mut() = Some(h);
        Ok(())
    }

    /// Out of file descriptors: stop watching the listener for a while
    /// (it would stay readable and spin the loop), keep serving clients.
    fn pause_accepting(self: &Rc<Self>) {
        drop(self.listener.borrow_mut().take());
        let s = Rc::downgrade(self);
        let t = self.ctx.timer_new(ClockType::Realtime, move || {
            if let Some(s) = s.upgrade() {
                if !s.stopping.get() {
                    if let Err(e) = s.listen() {
                        log!("cannot watch the listener again: {e}");
                    }
                }
            }
        });
        t.mod_after(Duration::from_millis(100));
        *self.resume.borrow_mut() = Some(t);
    }

    /// Accepts every pending connection; each gets its own coroutine.
    fn accept_ready(self: &Rc<Self>) {
        loop {
            match self.socket.accept() {
                Ok((stream, peer)) => {
                    let id = self.next_id.get();
                    self.next_id.set(id + 1);
                    let stream = Rc::new(stream);
                    self.clients.borrow_mut().insert(id, stream.clone());
                    let srv = self.clone();
                    let co = Coroutine::new(move || {
                        if let Err(e) = srv.serve_client(&stream) {
                            log!("client {peer}: {e}; connection closed");
                        }
                        srv.client_done(id);
                    });
                    co.enter();
                    co.detach(); // the context owns it until it ends
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                    log!("accept: {e}; not accepting for 100 ms");
                    self.pause_accepting();
                    return;
                }
                Err(e) => {
                    // ECONNABORTED and the like: that connection is lost,
                    // the next one may be fine.
                    log!("accept: {e}");
                    return;
                }
            }
        }
    }

    fn client_done(&self, id: u64) {
        if let Some(s) = self.clients.borrow_mut().remove(&id) {
            let _ = s.shutdown(Shutdown::Both);
        }
        if self.stopping.get() && self.clients.borrow().is_empty() {
            let _ = self.stopped.send(());
        }
    }

    /// SIGTERM: stop accepting, let every client finish what it has in
    /// flight (their read side is shut, so they see the end of requests).
    fn stop(&self) {
        self.stopping.set(true);
        drop(self.listener.borrow_mut().take());
        drop(self.resume.borrow_mut().take());
        let clients: Vec<_> = self.clients.borrow().values().cloned().collect();
        for s in clients {
            let _ = s.shutdown(Shutdown::Read);
        }
        if self.clients.borrow().is_empty() {
            let _ = self.stopped.send(());
        }
    }

    fn serve_client(self: &Rc<Self>, stream: &Rc<TcpStream>) -> io::Result<()> {
        stream.set_nodelay(true)?;
        let mut rd = BufReader::with_capacity(128 * 1024, CoFd::new(stream.clone())?);
        let wr = Rc::new(CoMutex::new(CoFd::new(stream.clone())?));
        if !self.handshake(&mut rd, &wr)? {
            return Ok(());
        }
        self.transmission(&mut rd, &wr)
    }

    // ---- handshake ----

    /// Fixed newstyle negotiation; `Ok(true)` when transmission starts.
    fn handshake(&self, rd: &mut impl Read, wr: &CoMutex<CoFd<Rc<TcpStream>>>) -> io::Result<bool> {
        let mut hello = Buf::default();
        hello
            .u64(NBDMAGIC)
            .u64(IHAVEOPT)
            .u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        wr.lock().write_all(&hello.0)?;
        let cflags = read_u32(rd)?;
        if cflags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
            return Err(invalid(format!("unknown client flags {cflags:#x}")));
        }
        if cflags & FLAG_C_FIXED_NEWSTYLE == 0 {
            return Err(invalid("client does not speak fixed newstyle".into()));
        }
        let no_zeroes = cflags & FLAG_C_NO_ZEROES != 0;
        loop {
            let magic = read_u64(rd)?;
            if magic != IHAVEOPT {
                return Err(invalid(format!("bad option magic {magic:#x}")));
            }
            let opt = read_u32(rd)?;
            let len = read_u32(rd)?;
            if len > MAX_OPTION_LEN {
                return Err(invalid(format!("option {opt} of {len} bytes is too long")));
            }
            let mut data = vec![0; len as usize];
            rd.read_exact(&mut data)?;
            let mut w = wr.lock();
            match opt {
                OPT_EXPORT_NAME => {
                    if !data.is_empty() {
                        // No error reply exists for this option: close.
                        return Err(invalid("NBD_OPT_EXPORT_NAME: unknown export".into()));
                    }
                    let mut b = Buf::default();
                    b.u64(self.export.size)
                        .u16(self.export.transmission_flags());
                    if !no_zeroes {
                        b.0.extend_from_slice(&[0; 124]);
                    }
                    w.write_all(&b.0)?;
                    return Ok(true);
                }
                OPT_ABORT => {
                    let _ = opt_reply(&mut *w, opt, REP_ACK, &[]);
                    return Ok(false);
                }
                OPT_LIST => {
                    if !data.is_empty() {
                        opt_reply(&mut *w, opt, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data")?;
                    } else {
                        opt_reply(&mut *w, opt, REP_SERVER, &0u32.to_be_bytes())?;
                        opt_reply(&mut *w, opt, REP_ACK, &[])?;
                    }
                }
                OPT_STARTTLS => {
                    opt_reply(&mut *w, opt, REP_ERR_POLICY, b"TLS is not supported")?;
                }
                OPT_INFO | OPT_GO => match parse_info_request(&data) {
                    Err(msg) => opt_reply(&mut *w, opt, REP_ERR_INVALID, msg.as_bytes())?,
                    Ok((name, _)) if !name.is_empty() => {
                        opt_reply(&mut *w, opt, REP_ERR_UNKNOWN, b"unknown export")?
                    }
                    Ok((_, infos)) => {
                        let mut b = Buf::default();
                        b.u16(INFO_EXPORT)
                            .u64(self.export.size)
                            .u16(self.export.transmission_flags());
                        opt_reply(&mut *w, opt, REP_INFO, &b.0)?;
                        if infos.contains(&INFO_BLOCK_SIZE) {
                            let mut b = Buf::default();
                            b.u16(INFO_BLOCK_SIZE).u32(1).u32(4096).u32(MAX_REQUEST_LEN);
                            opt_reply(&mut *w, opt, REP_INFO, &b.0)?;
                        }
                        opt_reply(&mut *w, opt, REP_ACK, &[])?;
                        if opt == OPT_GO {
                            return Ok(true);
                        }
                    }
                },
                _ => opt_reply(&mut *w, opt, REP_ERR_UNSUP, b"option not supported")?,
            }
        }
    }

    // ---- transmission ----

    fn transmission(
        self: &Rc<Self>,
        rd: &mut impl Read,
        wr: &Rc<CoMutex<CoFd<Rc<TcpStream>>>>,
    ) -> io::Result<()> {
        let in_flight = Rc::new(Cell::new(0usize));
        let slots = Rc::new(CoQueue::new());
        let result = self.receive_requests(rd, wr, &in_flight, &slots);
        // Whatever ended the loop, answer what is in flight first.
        while in_flight.get() > 0 {
            slots.wait_unlocked();
        }
        result
    }

    fn receive_requests(
        self: &Rc<Self>,
        rd: &mut impl Read,
        wr: &Rc<CoMutex<CoFd<Rc<TcpStream>>>>,
        in_flight: &Rc<Cell<usize>>,
        slots: &Rc<CoQueue>,
    ) -> io::Result<()> {
        loop {
            while in_flight.get() >= MAX_IN_FLIGHT {
                slots.wait_unlocked();
            }
            let mut hdr = [0u8; 28];
            match rd.read_exact(&mut hdr) {
                Ok(()) => {}
                // The client went away (or SIGTERM shut our read side).
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            }
            let received = self.timing.as_ref().map(|t| {
                let now = Instant::now();
                let mut t = t.borrow_mut();
                if let (0, Some(last)) = (in_flight.get(), t.last_reply) {
                    t.idle_ns.push((now - last).as_nanos() as u64);
                }
                now
            });
            let req = Request::parse(&hdr)?;
            if req.kind == CMD_DISC {
                return Ok(());
            }
            let mut payload = Vec::new();
            let mut close_after = false;
            let mut error = self.check(&req);
            if req.kind == CMD_WRITE {
                if req.len > MAX_REQUEST_LEN {
                    // Cannot skip what may never come: answer and close.
                    error = Some(EINVAL);
                    close_after = true;
                } else {
                    payload = vec![0; req.len as usize];
                    if let Err(e) = rd.read_exact(&mut payload) {
                        return Err(io::Error::new(
                            e.kind(),
                            format!("client vanished in the middle of a write: {e}"),
                        ));
                    }
                }
            }
            in_flight.set(in_flight.get() + 1);
            let (srv, wr2, inf, sl) = (self.clone(), wr.clone(), in_flight.clone(), slots.clone());
            let co = Coroutine::new(move || {
                srv.execute(&req, error, payload, &wr2);
                if let (Some(t), Some(at)) = (&srv.timing, received) {
                    let now = Instant::now();
                    let mut t = t.borrow_mut();
                    t.service_ns.push((now - at).as_nanos() as u64);
                    t.last_reply = Some(now);
                }
                inf.set(inf.get() - 1);
                sl.next();
            });
            co.enter(); // runs until its first wait (file I/O, the socket)
            co.detach();
            if close_after {
                return Err(invalid(format!("over-long write of {} bytes", req.len)));
            }
        }
    }

    /// Validates a request against the export: `Some(errno)` to refuse it.
    fn check(&self, req: &Request) -> Option<u32> {
        let size = self.export.size;
        let in_bounds = req
            .offset
            .checked_add(u64::from(req.len))
            .is_some_and(|end| end <= size);
        match req.kind {
            CMD_READ => {
                if req.len > MAX_REQUEST_LEN || !in_bounds {
                    Some(EINVAL)
                } else {
                    None
                }
            }
            CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES => {
                if self.export.read_only {
                    Some(EPERM)
                } else if req.kind == CMD_WRITE && req.len > MAX_REQUEST_LEN {
                    Some(EINVAL)
                } else if !in_bounds {
                    Some(ENOSPC)
                } else {
                    None
                }
            }
            CMD_FLUSH => None,
            _ => Some(EINVAL), // unknown command
        }
    }

    /// One request's coroutine: the file operation on the thread pool,
    /// then the reply under the socket's lock.
    fn execute(
        &self,
        req: &Request,
        error: Option<u32>,
        payload: Vec<u8>,
        wr: &CoMutex<CoFd<Rc<TcpStream>>>,
    ) {
        let pool = self.ctx.thread_pool();
        let file = self.export.file.clone();
        let io = &self.export.io;
        let (off, len, flags) = (req.offset, req.len as usize, req.flags);
        // With O_DIRECT, unaligned requests take the buffered descriptor.
        let direct_ok = !io.is_direct() || (off | len as u64) % DIRECT_ALIGN == 0;
        // The reply, and where it starts in its buffer.
        let (reply, at): (Vec<u8>, usize) = match error {
            Some(e) => (simple_reply(req.cookie, e, 0), 0),
            None => match req.kind {
                CMD_READ if direct_ok => {
                    // The threads engine serves page-cache hits inline.
                    let mut buf = ReplyBuf::new(req.cookie, len);
                    match io.read_exact_at(buf.data(), off) {
                        Ok(()) => buf.into_reply(),
                        Err(e) => (simple_reply(req.cookie, errno_of(&e), 0), 0),
                    }
                }
                CMD_READ => {
                    let buf = simple_reply(req.cookie, 0, len);
                    let r = pool.submit_co(move || {
                        let mut buf = buf;
                        let r = file.read_exact_at(&mut buf[16..], off);
                        (buf, r)
                    });
                    match r {
                        (buf, Ok(())) => (buf, 0),
                        (_, Err(e)) => (simple_reply(req.cookie, errno_of(&e), 0), 0),
                    }
                }
                CMD_WRITE if direct_ok => {
                    let r = if io.is_direct() {
                        let (raw, at) = aligned_copy(&payload);
                        io.write_all_at(&raw[at..at + len], off)
                    } else {
                        io.write_all_at(&payload, off)
                    };
                    let r = r.and_then(|()| {
                        if flags & CMD_FLAG_FUA != 0 {
                            io.fdatasync()
                        } else {
                            Ok(())
                        }
                    });
                    (result_reply(req.cookie, r), 0)
                }
                CMD_WRITE => {
                    let r = pool.submit_co(move || {
                        file.write_all_at(&payload, off)?;
                        if flags & CMD_FLAG_FUA != 0 {
                            file.sync_data()?;
                        }
                        Ok::<(), io::Error>(())
                    });
                    (result_reply(req.cookie, r), 0)
                }
                CMD_FLUSH => (result_reply(req.cookie, io.fdatasync()), 0),
                CMD_TRIM | CMD_WRITE_ZEROES => {
                    let zero = req.kind == CMD_WRITE_ZEROES;
                    let r = pool.submit_co(move || {
                        discard(&file, off, len as u64, zero, flags & CMD_FLAG_NO_HOLE != 0)?;
                        if flags & CMD_FLAG_FUA != 0 {
                            file.sync_data()?;
                        }
                        Ok::<(), io::Error>(())
                    });
                    (result_reply(req.cookie, r), 0)
                }
                _ => (simple_reply(req.cookie, EINVAL, 0), 0),
            },
        };
        self.served.set(self.served.get() + 1);
        let mut w = wr.lock();
        if let Err(e) = w.write_all(&reply[at..]) {
            // A reply cut short would misframe every later one: close the
            // connection (its receive coroutine then ends too).
            log!(
                "reply to request {:#x}: {e}; closing the connection",
                req.cookie
            );
            let _ = w.get_ref().shutdown(Shutdown::Both);
        }
    }
}

/// A transmission request header.
#[derive(Clone, Copy)]
struct Request {
    flags: u16,
    kind: u16,
    cookie: u64,
    offset: u64,
    len: u32,
}

impl Request {
    fn parse(h: &[u8; 28]) -> io::Result<Request> {
        let magic = u32::from_be_bytes(h[0..4].try_into().unwrap());
        if magic != REQUEST_MAGIC {
            return Err(invalid(format!("bad request magic {magic:#x}")));
        }
        Ok(Request {
            flags: u16::from_be_bytes(h[4..6].try_into().unwrap()),
            kind: u16::from_be_bytes(h[6..8].try_into().unwrap()),
            cookie: u64::from_be_bytes(h[8..16].try_into().unwrap()),
            offset: u64::from_be_bytes(h[16..24].try_into().unwrap()),
            len: u32::from_be_bytes(h[24..28].try_into().unwrap()),
        })
    }
}

/// A simple reply header followed by `data_len` bytes of room for data.
fn simple_reply(cookie: u64, error: u32, data_len: usize) -> Vec<u8> {
    let mut b = Buf(Vec::with_capacity(16 + data_len));
    b.u32(SIMPLE_REPLY_MAGIC).u32(error).u64(cookie);
    b.0.resize(16 + data_len, 0);
    b.0
}

fn result_reply(cookie: u64, r: io::Result<()>) -> Vec<u8> {
    match r {
        Ok(()) => simple_reply(cookie, 0, 0),
        Err(e) => simple_reply(cookie, errno_of(&e), 0),
    }
}

/// The NBD error for an I/O error (the protocol's small errno set).
fn errno_of(e: &io::Error) -> u32 {
    match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) | Some(libc::EROFS) => EPERM,
        Some(libc::ENOMEM) => ENOMEM,
        Some(libc::EINVAL) => EINVAL,
        Some(libc::ENOSPC) | Some(libc::EFBIG) | Some(libc::EDQUOT) => ENOSPC,
        Some(libc::EOVERFLOW) => EOVERFLOW,
        Some(libc::EOPNOTSUPP) => ENOTSUP,
        _ if e.kind() == io::ErrorKind::UnexpectedEof => EIO,
        _ => EIO,
    }
}

/// TRIM (punch a hole) or WRITE_ZEROES (zero range, or punch a hole when
/// holes are allowed); falls back to writing zeroes.
fn discard(file: &File, off: u64, len: u64, zero: bool, no_hole: bool) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    let mode = if zero && no_hole {
        libc::FALLOC_FL_ZERO_RANGE
    } else {
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
    };
    // SAFETY: fallocate on a valid open fd with in-range values; no
    // memory is passed.
    let r = unsafe { libc::fallocate(file.as_raw_fd(), mode, off as i64, len as i64) };
    if r == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if !zero {
        // TRIM is advisory: a file system without holes just keeps data.
        return Ok(());
    }
    if err.raw_os_error() != Some(libc::EOPNOTSUPP) {
        return Err(err);
    }
    let zeroes = vec![0u8; (len.min(1 << 20)) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(zeroes.len() as u64) as usize;
        file.write_all_at(&zeroes[..n], off + done)?;
        done += n as u64;
    }
    Ok(())
}

/// Parses NBD_OPT_INFO / NBD_OPT_GO data: the export name and the
/// information types requested.
fn parse_info_request(d: &[u8]) -> Result<(&[u8], Vec<u16>), &'static str> {
    let short = "NBD_OPT_GO/INFO: malformed request";
    let nlen = u32::from_be_bytes(d.get(0..4).ok_or(short)?.try_into().unwrap()) as usize;
    let name = d.get(4..4 + nlen).ok_or(short)?;
    let rest = &d[4 + nlen..];
    let n = u16::from_be_bytes(rest.get(0..2).ok_or(short)?.try_into().unwrap()) as usize;
    let list = rest.get(2..).ok_or(short)?;
    if list.len() != 2 * n {
        return Err(short);
    }
    Ok((
        name,
        list.chunks(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .collect(),
    ))
}

fn opt_reply(w: &mut impl Write, opt: u32, kind: u32, data: &[u8]) -> io::Result<()> {
    let mut b = Buf::default();
    b.u64(OPT_REPLY_MAGIC)
        .u32(opt)
        .u32(kind)
        .u32(data.len() as u32);
    b.0.extend_from_slice(data);
    w.write_all(&b.0)
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

/// Big-endian message building.
#[derive(Default)]
struct Buf(Vec<u8>);

impl Buf {
    fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
}

// ---- process: arguments, signals, start and stop ----

struct Args {
    port: u16,
    size: Option<u64>,
    read_only: bool,
    image: Option<PathBuf>,
    io: IoConfig,
}

/// `--aio` and `--cache`.
#[derive(Clone, Copy)]
struct IoConfig {
    aio: AioMode,
    direct: bool,
}

fn usage() -> ! {
    eprintln!(
        "usage: nbd_server [--port N] [--size BYTES] [--read-only] \
         [--aio threads|io_uring|native] [--cache writeback|none] IMAGE"
    );
    eprintln!("       nbd_server            (no IMAGE: a self-contained demo)");
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut a = Args {
        port: 10809,
        size: None,
        read_only: false,
        image: None,
        io: IoConfig {
            aio: AioMode::Threads,
            direct: false,
        },
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--port" => {
                a.port = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| usage())
            }
            "--size" => {
                a.size = Some(
                    it.next()
                        .and_then(|v| parse_size(&v))
                        .unwrap_or_else(|| usage()),
                )
            }
            "--read-only" => a.read_only = true,
            "--aio" => {
                a.io.aio = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| usage())
            }
            "--cache" => {
                a.io.direct = match it.next().as_deref() {
                    Some("none") => true,
                    Some("writeback") => false,
                    _ => usage(),
                }
            }
            "-h" | "--help" => usage(),
            s if s.starts_with('-') => usage(),
            s => {
                if a.image.replace(PathBuf::from(s)).is_some() {
                    usage();
                }
            }
        }
    }
    a
}

/// Bytes, with an optional K/M/G suffix (powers of 1024).
fn parse_size(s: &str) -> Option<u64> {
    let (num, mul) = match s.as_bytes().last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 1 << 10),
        b'm' | b'M' => (&s[..s.len() - 1], 1 << 20),
        b'g' | b'G' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mul)
}

/// Blocks SIGINT and SIGTERM in this thread and every thread it starts
/// later, so that `wait_for_signal` receives them.
fn block_stop_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset before use;
    // pthread_sigmask only changes this thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn wait_for_signal(set: &libc::sigset_t) -> i32 {
    let mut sig = 0;
    // SAFETY: `set` is an initialised sigset and `sig` a valid out pointer.
    unsafe { libc::sigwait(set, &mut sig) };
    sig
}

fn open_image(path: &Path, size: Option<u64>, read_only: bool) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(!read_only || size.is_some())
        .create(size.is_some())
        .truncate(false)
        .open(path)?;
    if let Some(size) = size {
        if file.metadata()?.len() < size {
            file.set_len(size)?; // sparse
        }
    }
    if read_only && size.is_some() {
        return OpenOptions::new().read(true).open(path);
    }
    Ok(file)
}

/// A running server: its IoThread and how to stop it.
struct Running {
    io: IoThread,
    srv_stop: Box<dyn Fn() + Send>,
    stopped: mpsc::Receiver<()>,
    file: Arc<File>,
    port: u16,
}

/// The descriptor the `CoFile` uses: the image itself, or with `--cache
/// none` the image opened again with `O_DIRECT`.
fn io_file(file: &File, path: &Path, read_only: bool, direct: bool) -> io::Result<File> {
    if !direct {
        return file.try_clone();
    }
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .read(true)
        .write(!read_only)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("--cache none: O_DIRECT open: {e}")))
}

fn start(
    file: File,
    io_file: File,
    cfg: IoConfig,
    read_only: bool,
    port: u16,
) -> io::Result<Running> {
    let file = Arc::new(file);
    let size = file.metadata()?.len();
    let listener = TcpListener::bind(("127.0.0.1", port))?;
    listener.set_nonblocking(true)?;
    let port = listener.local_addr()?.port();
    let poll_max_ns: i64 = std::env::var("NBD_POLL_MAX_NS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(POLL_MAX_NS);
    let io = IoThreadBuilder::new("nbd-io")
        .poll_params(poll_max_ns, 0, 0)
        .spawn()?;
    let (stopped_tx, stopped) = mpsc::channel();
    let (ready_tx, ready) = mpsc::channel();
    let f = file.clone();
    io.context().bh_schedule_oneshot(move || {
        let ctx = AioContext::current().expect("on the IoThread");
        let io = CoFile::with_mode(&ctx, io_file, cfg.aio);
        if io.mode() != cfg.aio {
            log!("--aio {} unavailable here: using {}", cfg.aio, io.mode());
        }
        // Page-cache writes on the loop thread (paused for a second after
        // any write that blocks over 1 ms): cheaper than a thread hop.
        io.set_inline_buffered_writes(true);
        let srv = Rc::new(Server {
            ctx: ctx.clone(),
            export: Export {
                io,
                file: f,
                size,
                read_only,
            },
            socket: Rc::new(listener),
            listener: RefCell::new(None),
            resume: RefCell::new(None),
            clients: RefCell::new(HashMap::new()),
            next_id: Cell::new(0),
            stopping: Cell::new(false),
            stopped: stopped_tx,
            served: Cell::new(0),
            timing: std::env::var_os("NBD_TIMING").map(|_| RefCell::new(Timing::default())),
        });
        let r = srv.listen();
        if r.is_ok() {
            SERVER.with(|g| *g.borrow_mut() = Some(srv));
        }
        let _ = ready_tx.send(r);
    });
    ready
        .recv()
        .map_err(|_| io::Error::other("the IoThread did not start the server"))??;
    let ctx = io.context().clone();
    let srv_stop = Box::new(move || {
        ctx.bh_schedule_oneshot(|| {
            SERVER.with(|g| {
                if let Some(s) = g.borrow().as_ref() {
                    s.stop();
                }
            })
        })
    });
    Ok(Running {
        io,
        srv_stop,
        stopped,
        file,
        port,
    })
}

thread_local! {
    /// The server, on its IoThread.
    static SERVER: RefCell<Option<Rc<Server>>> = const { RefCell::new(None) };
}

impl Running {
    /// Graceful stop: no new connections, in-flight requests answered,
    /// data flushed to disk.
    fn stop(self) -> io::Result<u64> {
        (self.srv_stop)();
        if self.stopped.recv_timeout(Duration::from_secs(60)).is_err() {
            log!("clients did not finish within 60 s; stopping anyway");
        }
        let (tx, rx) = mpsc::channel();
        self.io.context().bh_schedule_oneshot(move || {
            let served = SERVER.with(|g| {
                g.borrow_mut().take().map_or(0, |s| {
                    if let Some(t) = &s.timing {
                        t.borrow_mut().report();
                    }
                    s.served.get()
                })
            });
            let _ = tx.send(served);
        });
        let served = rx.recv_timeout(Duration::from_secs(10)).unwrap_or(0);
        self.io.stop();
        self.file.sync_all()?;
        Ok(served)
    }
}

fn main() {
    // The library's log lines (leaks, fallbacks) go through `log`:
    // show warnings and errors; RUST_LOG=coroloop=debug etc. overrides.
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let args = parse_args();
    let signals = block_stop_signals();
    match args.image {
        Some(ref path) => {
            let file = open_image(path, args.size, args.read_only).unwrap_or_else(|e| {
                log!("cannot open {}: {e}", path.display());
                std::process::exit(1)
            });
            let iof = io_file(&file, path, args.read_only, args.io.direct).unwrap_or_else(|e| {
                log!("cannot open {}: {e}", path.display());
                std::process::exit(1)
            });
            let run = start(file, iof, args.io, args.read_only, args.port).unwrap_or_else(|e| {
                log!("cannot start: {e}");
                std::process::exit(1)
            });
            println!("listening on 127.0.0.1:{}", run.port);
            let _ = io::stdout().flush();
            let sig = wait_for_signal(&signals);
            log!("signal {sig}: stopping");
            match run.stop() {
                Ok(n) => log!("stopped after {n} requests"),
                Err(e) => {
                    log!("flush failed: {e}");
                    std::process::exit(1)
                }
            }
        }
        None => demo(args.port, args.io),
    }
}

// ---- the self-contained demo ----

/// A minimal pipelining NBD client for the demo.
struct Client {
    s: TcpStream,
    size: u64,
}

impl Client {
    fn connect(port: u16) -> io::Result<Client> {
        let mut s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut hello = [0; 18];
        s.read_exact(&mut hello)?;
        assert_eq!(&hello[..8], &NBDMAGIC.to_be_bytes());
        s.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())?;
        let mut b = Buf::default();
        b.u64(IHAVEOPT).u32(OPT_GO).u32(6).u32(0).u16(0);
        s.write_all(&b.0)?;
        let mut size = 0;
        loop {
            let mut h = [0; 20];
            s.read_exact(&mut h)?;
            let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
            let mut data = vec![0; len as usize];
            s.read_exact(&mut data)?;
            match kind {
                REP_INFO if u16::from_be_bytes([data[0], data[1]]) == INFO_EXPORT => {
                    size = u64::from_be_bytes(data[2..10].try_into().unwrap());
                }
                REP_INFO => {}
                REP_ACK => return Ok(Client { s, size }),
                k => return Err(io::Error::other(format!("NBD_OPT_GO refused: {k:#x}"))),
            }
        }
    }

    fn send(
        &mut self,
        kind: u16,
        flags: u16,
        cookie: u64,
        off: u64,
        data: &[u8],
        len: u32,
    ) -> io::Result<()> {
        let mut b = Buf::default();
        b.u32(REQUEST_MAGIC)
            .u16(flags)
            .u16(kind)
            .u64(cookie)
            .u64(off)
            .u32(len);
        b.0.extend_from_slice(data);
        self.s.write_all(&b.0)
    }

    fn reply(&mut self, data_len: usize) -> io::Result<(u64, u32, Vec<u8>)> {
        let mut h = [0; 16];
        self.s.read_exact(&mut h)?;
        assert_eq!(
            u32::from_be_bytes(h[0..4].try_into().unwrap()),
            SIMPLE_REPLY_MAGIC
        );
        let err = u32::from_be_bytes(h[4..8].try_into().unwrap());
        let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
        let mut data = vec![0; if err == 0 { data_len } else { 0 }];
        self.s.read_exact(&mut data)?;
        Ok((cookie, err, data))
    }
}

fn pattern(client: u64, block: u64) -> u8 {
    (client * 31 + block * 7 + 1) as u8
}

fn demo(port: u16, cfg: IoConfig) {
    let path = std::env::temp_dir().join(format!("coroloop-nbd-demo-{}.img", std::process::id()));
    let size = 64 << 20;
    let file = open_image(&path, Some(size), false).expect("create the demo image");
    let iof = io_file(&file, &path, false, cfg.direct).expect("open the demo image");
    let run = start(file, iof, cfg, false, if port == 10809 { 0 } else { port })
        .expect("start the server");
    println!(
        "demo: aio={} cache={}",
        cfg.aio,
        if cfg.direct { "none" } else { "writeback" }
    );
    let port = run.port;
    println!("listening on 127.0.0.1:{port}");
    println!(
        "demo: serving a fresh {} MiB image {}",
        size >> 20,
        path.display()
    );
    println!("demo: try  qemu-io -f raw nbd://127.0.0.1:{port} -c 'read -v 0 64'");

    // Four clients, each with 16 requests in flight: writes (every fourth
    // with FUA), a flush, then reads checked byte by byte.
    const CLIENTS: u64 = 4;
    const BLOCKS: u64 = 64;
    const BS: usize = 64 * 1024;
    let t0 = Instant::now();
    let workers: Vec<_> = (0..CLIENTS)
        .map(|c| {
            std::thread::spawn(move || -> io::Result<u64> {
                let mut cl = Client::connect(port)?;
                assert_eq!(cl.size, 64 << 20);
                let base = c * BLOCKS * BS as u64;
                let mut requests = 0;
                for chunk in (0..BLOCKS).collect::<Vec<_>>().chunks(MAX_IN_FLIGHT) {
                    for &b in chunk {
                        let data = vec![pattern(c, b); BS];
                        let fua = if b % 4 == 0 { CMD_FLAG_FUA } else { 0 };
                        cl.send(CMD_WRITE, fua, b, base + b * BS as u64, &data, BS as u32)?;
                    }
                    for _ in chunk {
                        let (_, err, _) = cl.reply(0)?;
                        assert_eq!(err, 0, "write failed");
                        requests += 1;
                    }
                }
                cl.send(CMD_FLUSH, 0, 999, 0, &[], 0)?;
                assert_eq!(cl.reply(0)?.1, 0, "flush failed");
                for chunk in (0..BLOCKS).collect::<Vec<_>>().chunks(MAX_IN_FLIGHT) {
                    for &b in chunk {
                        cl.send(CMD_READ, 0, b, base + b * BS as u64, &[], BS as u32)?;
                    }
                    for _ in chunk {
                        let (cookie, err, data) = cl.reply(BS)?;
                        assert_eq!(err, 0, "read failed");
                        assert!(data.iter().all(|&x| x == pattern(c, cookie)), "bad data");
                        requests += 1;
                    }
                }
                // A read past the end is refused, and the connection goes on.
                cl.send(CMD_READ, 0, 7, cl.size, &[], 512)?;
                assert_eq!(cl.reply(512)?.1, EINVAL);
                cl.send(CMD_DISC, 0, 0, 0, &[], 0)?;
                Ok(requests + 1)
            })
        })
        .collect();
    let mut requests = 0;
    for w in workers {
        requests += w.join().expect("client thread").expect("client I/O");
    }
    let el = t0.elapsed();
    let mib = (CLIENTS * BLOCKS * BS as u64 * 2) as f64 / (1 << 20) as f64;
    println!(
        "demo: {CLIENTS} clients, {requests} requests checked in {el:.2?} ({:.0} MiB/s)",
        mib / el.as_secs_f64()
    );

    let qemu = std::process::Command::new("qemu-io")
        .args(["-f", "raw", &format!("nbd://127.0.0.1:{port}")])
        .args(["-c", "write -P 0x5a 1M 1M", "-c", "read -P 0x5a 1M 1M"])
        .output();
    match qemu {
        Ok(out) => {
            let text = String::from_utf8_lossy(&out.stdout);
            print!("demo: qemu-io says:\n{text}");
            assert!(
                out.status.success() && !text.contains("fail"),
                "qemu-io failed"
            );
        }
        Err(_) => println!("demo: qemu-io not installed (apt install qemu-utils); skipped"),
    }

    let served = run.stop().expect("flush");
    let _ = std::fs::remove_file(&path);
    println!("demo: server answered {served} requests; stopped cleanly");
    println!("nbd_server demo: all checks passed");
}
