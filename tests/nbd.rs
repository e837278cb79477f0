//! The NBD server example (`examples/nbd_server.rs`) end to end: QEMU's own
//! clients (`qemu-io`, `qemu-img`) write, read, convert and compare through
//! it, eight of them at once; a raw TCP client speaks the fixed-newstyle
//! protocol byte by byte, malformed input included, and every bad client is
//! followed by a `qemu-io` read proving the server and its other clients are
//! unharmed; SIGTERM must flush and exit 0; `--size` makes a sparse image.
//!
//! The server is the example binary `target/<profile>/examples/nbd_server`,
//! brought up to date by the tests themselves (`cargo build --example`), so
//! `cargo test --test nbd` works too; `NBD_SERVER_BIN` overrides it with
//! any server following the same command-line contract. The qemu tests
//! need `qemu-io` and `qemu-img` on PATH (Debian/Ubuntu: `qemu-utils`) and
//! fail, rather than skip, without them.

use std::fs;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Barrier, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

mod common;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
/// Bound on every socket read and on server start-up and shutdown.
const TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on every `qemu-io` / `qemu-img` run.
const TOOL_TIMEOUT: Duration = Duration::from_secs(30);

// Handshake.
const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = 0x8000_0001;
const INFO_EXPORT: u16 = 0;

// Transmission.
const TFLAG_HAS_FLAGS: u16 = 1;
const TFLAG_READ_ONLY: u16 = 2;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const EPERM: u32 = 1;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;

// ---------------------------------------------------------------------------
// Processes

/// The server binary: `target/<profile>/examples/nbd_server` next to this
/// test's `target/<profile>/deps/nbd-<hash>`, or `$NBD_SERVER_BIN`.
///
/// A full `cargo test` builds the examples, but `cargo test --test nbd`
/// does not (and would run a stale one): when run by cargo, the example is
/// brought up to date first with `cargo build --example nbd_server` for
/// this test's profile, once per test run.
fn server_binary() -> PathBuf {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(find_server_binary)
        .clone()
        .unwrap_or_else(|e| panic!("{e}"))
}

fn find_server_binary() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("NBD_SERVER_BIN") {
        return Ok(p.into());
    }
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| format!("unexpected test executable path {}", exe.display()))?;
    let bin = profile_dir.join("examples").join("nbd_server");
    if let Some(cargo) = std::env::var_os("CARGO") {
        let mut cmd = Command::new(cargo);
        cmd.args([
            "build",
            "--quiet",
            "--example",
            "nbd_server",
            "--manifest-path",
        ])
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"))
        .stdin(Stdio::null());
        match profile_dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") => {}
            Some("release") => {
                cmd.arg("--release");
            }
            Some(other) => {
                cmd.args(["--profile", other]);
            }
            None => {}
        }
        let out = cmd.output().map_err(|e| format!("running {cmd:?}: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "{cmd:?} failed ({}):\n{}",
                out.status,
                lossy(&out.stderr)
            ));
        }
    }
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(format!(
            "NBD server binary not found at {}: build it from examples/nbd_server.rs \
             with `cargo build --example nbd_server` (`--release` for a release test \
             run), or set NBD_SERVER_BIN",
            bin.display()
        ))
    }
}

/// Waits up to `limit` for `child` to exit.
fn wait_timeout(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// Reads a child's pipe to its end on a thread.
fn drain(mut r: impl Read + Send + 'static) -> JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut v = Vec::new();
        let _ = r.read_to_end(&mut v);
        v
    })
}

fn lossy(v: &[u8]) -> String {
    String::from_utf8_lossy(v).into_owned()
}

/// Sends SIGTERM to a child not yet reaped; whether kill(2) succeeded.
fn sigterm(child: &Child) -> bool {
    let Ok(pid) = libc::pid_t::try_from(child.id()) else {
        return false;
    };
    // SAFETY: kill(2) has no memory-safety preconditions; `pid` is our own
    // child, not yet reaped, so it names no other process.
    unsafe { libc::kill(pid, libc::SIGTERM) == 0 }
}

/// A running server; SIGTERM (then SIGKILL) on drop.
struct Server {
    child: Option<Child>,
    port: u16,
    stdout_rest: Option<JoinHandle<Vec<u8>>>,
    stderr: Option<JoinHandle<Vec<u8>>>,
}

impl Server {
    /// Starts `nbd_server --port 0 EXTRA... IMAGE` and waits for its
    /// `listening on 127.0.0.1:PORT` line.
    fn start(image: &Path, extra: &[&str]) -> Server {
        Server::start_with(image, extra, |_| {})
    }

    /// As `start`, with `configure` applied to the command first.
    fn start_with(image: &Path, extra: &[&str], configure: impl FnOnce(&mut Command)) -> Server {
        let bin = server_binary();
        let mut cmd = Command::new(&bin);
        cmd.args(["--port", "0"])
            .args(extra)
            .arg(image)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        configure(&mut cmd);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let stdout: ChildStdout = child.stdout.take().unwrap();
        let stderr: ChildStderr = child.stderr.take().unwrap();
        let mut server = Server {
            child: Some(child),
            port: 0,
            stdout_rest: None,
            stderr: Some(drain(stderr)),
        };
        let (tx, rx) = mpsc::channel();
        server.stdout_rest = Some(thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            let mut line = String::new();
            let first = r.read_line(&mut line).map(|_| line);
            let _ = tx.send(first);
            let mut rest = Vec::new();
            let _ = r.read_to_end(&mut rest);
            rest
        }));
        let line = match rx.recv_timeout(TIMEOUT) {
            Ok(Ok(line)) => line,
            Ok(Err(e)) => panic!("reading the server's stdout: {e}"),
            Err(_) => {
                let err = server.kill_and_stderr();
                panic!("no `listening on` line within {TIMEOUT:?}; stderr:\n{err}")
            }
        };
        let port = line
            .strip_suffix('\n')
            .and_then(|l| l.strip_prefix("listening on 127.0.0.1:"))
            .and_then(|p| p.parse::<u16>().ok())
            .filter(|&p| p != 0);
        match port {
            Some(p) => server.port = p,
            None => {
                let err = server.kill_and_stderr();
                panic!(
                    "expected exactly `listening on 127.0.0.1:PORT\\n` as the first stdout \
                     line, got {line:?}; stderr:\n{err}"
                )
            }
        }
        server
    }

    fn url(&self) -> String {
        format!("nbd://127.0.0.1:{}", self.port)
    }

    fn child(&mut self) -> &mut Child {
        self.child.as_mut().expect("server already stopped")
    }

    fn sigterm(&mut self) {
        let r = sigterm(self.child());
        assert!(r, "kill: {}", std::io::Error::last_os_error());
    }

    /// Panics (with stderr) unless the server is still running.
    fn assert_running(&mut self, after: &str) {
        if let Some(status) = self.child().try_wait().unwrap() {
            self.child = None;
            let err = lossy(&self.stderr.take().unwrap().join().unwrap());
            panic!("the server died after {after}: {status}; stderr:\n{err}");
        }
    }

    /// SIGTERM, then the exit status must be 0 within [`TIMEOUT`] and
    /// nothing but the `listening on` line may have gone to stdout.
    /// Returns the server's stderr.
    fn stop(mut self) -> String {
        self.sigterm();
        let status = wait_timeout(self.child(), TIMEOUT);
        let Some(status) = status else {
            let err = self.kill_and_stderr();
            panic!("the server did not exit within {TIMEOUT:?} of SIGTERM; stderr:\n{err}");
        };
        self.child = None;
        let err = lossy(&self.stderr.take().unwrap().join().unwrap());
        assert!(
            status.success(),
            "the server must exit 0 on SIGTERM, got {status}; stderr:\n{err}"
        );
        let rest = self.stdout_rest.take().unwrap().join().unwrap();
        assert!(
            rest.is_empty(),
            "stdout must hold exactly one line, also got {:?}",
            lossy(&rest)
        );
        err
    }

    fn kill_and_stderr(&mut self) -> String {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        match self.stderr.take() {
            Some(h) => lossy(&h.join().unwrap_or_default()),
            None => String::new(),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if matches!(c.try_wait(), Ok(None)) {
                sigterm(&c);
                if wait_timeout(&mut c, Duration::from_secs(5)).is_none() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
            }
        }
        // A failing test shows what the server logged.
        if thread::panicking() {
            if let Some(h) = self.stderr.take() {
                let err = lossy(&h.join().unwrap_or_default());
                eprintln!("--- nbd_server stderr ---\n{err}--- end of nbd_server stderr ---");
            }
        }
    }
}

/// A temp file path unique to this process and call, removed on drop.
struct TempImage {
    path: PathBuf,
}

impl TempImage {
    /// A path only: no file is created.
    fn path_only(tag: &str) -> TempImage {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("coroloop-nbd-{}-{n}-{tag}.img", std::process::id()));
        let _ = fs::remove_file(&path);
        TempImage { path }
    }

    /// A file of `len` bytes holding `contents` at its start, zeros after.
    fn with(tag: &str, len: u64, contents: &[u8]) -> TempImage {
        let img = TempImage::path_only(tag);
        let f = fs::File::create(&img.path).unwrap();
        f.set_len(len).unwrap();
        f.write_all_at(contents, 0).unwrap();
        img
    }

    fn read(&self) -> Vec<u8> {
        fs::read(&self.path).unwrap()
    }

    fn arg(&self) -> String {
        self.path.to_str().unwrap().to_owned()
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Asserts two byte strings are equal, naming the first difference.
fn assert_bytes_eq(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {i}: got {:#04x}, expected {:#04x}",
            got[i], want[i]
        );
    }
}

// ---------------------------------------------------------------------------
// qemu-io and qemu-img

struct ToolOutput {
    cmdline: String,
    status: ExitStatus,
    /// stdout then stderr.
    text: String,
}

/// Runs a QEMU tool with a watchdog; a missing tool is a test failure.
fn run_tool(program: &str, args: &[String]) -> ToolOutput {
    let cmdline = std::iter::once(program.to_owned())
        .chain(args.iter().map(|a| format!("'{a}'")))
        .collect::<Vec<_>>()
        .join(" ");
    let mut child = match Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) if e.kind() == ErrorKind::NotFound => panic!(
            "`{program}` not found on PATH: install qemu-utils (e.g. `apt-get install \
             qemu-utils`; CI installs it). The NBD tests are driven by QEMU's own \
             clients and do not skip without them."
        ),
        Err(e) => panic!("cannot run {cmdline}: {e}"),
    };
    let out = drain(child.stdout.take().unwrap());
    let err = drain(child.stderr.take().unwrap());
    let status = wait_timeout(&mut child, TOOL_TIMEOUT);
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let mut text = lossy(&out.join().unwrap());
    text.push_str(&lossy(&err.join().unwrap()));
    let Some(status) = status else {
        panic!("`{cmdline}` hung: killed after {TOOL_TIMEOUT:?}; output:\n{text}");
    };
    ToolOutput {
        cmdline,
        status,
        text,
    }
}

#[derive(Clone, Copy)]
enum Op {
    Write,
    Read,
    AioWrite,
    AioRead,
}

/// One `qemu-io` command: `OP -P PATTERN OFF LEN`.
#[derive(Clone, Copy)]
struct Io {
    op: Op,
    pattern: u8,
    off: u64,
    len: u64,
}

fn write(pattern: u8, off: u64, len: u64) -> Io {
    Io {
        op: Op::Write,
        pattern,
        off,
        len,
    }
}

fn read(pattern: u8, off: u64, len: u64) -> Io {
    Io {
        op: Op::Read,
        pattern,
        off,
        len,
    }
}

/// Runs `qemu-io -f raw [FLAGS] URL -c CMD...`; every command must report
/// its full length at its offset (in any order, for the aio ones), and no
/// line may mention a failure or an error: qemu-io exits 0 after failed
/// pattern checks of aio commands.
fn qemu_io(url: &str, flags: &[&str], cmds: &[Io]) {
    let mut args: Vec<String> = vec!["-f".into(), "raw".into()];
    args.extend(flags.iter().map(|f| f.to_string()));
    args.push(url.into());
    let mut want = Vec::new();
    let mut aio = false;
    for c in cmds {
        let (name, verb) = match c.op {
            Op::Write => ("write", "wrote"),
            Op::Read => ("read", "read"),
            Op::AioWrite => ("aio_write", "wrote"),
            Op::AioRead => ("aio_read", "read"),
        };
        aio |= matches!(c.op, Op::AioWrite | Op::AioRead);
        args.push("-c".into());
        args.push(format!("{name} -P {:#04x} {} {}", c.pattern, c.off, c.len));
        want.push(format!("{verb} {0}/{0} bytes at offset {1}", c.len, c.off));
    }
    if aio {
        args.push("-c".into());
        args.push("aio_flush".into());
    }
    let out = run_tool("qemu-io", &args);
    let bad: Vec<&str> = out
        .text
        .lines()
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            l.contains("fail") || l.contains("error") || l.contains("mismatch")
        })
        .collect();
    let mut got: Vec<String> = out
        .text
        .lines()
        .filter(|l| l.starts_with("wrote ") || l.starts_with("read "))
        .map(str::to_owned)
        .collect();
    got.sort();
    want.sort();
    assert!(
        out.status.success() && bad.is_empty() && got == want,
        "`{}` failed ({}):\n{}",
        out.cmdline,
        out.status,
        out.text
    );
}

/// The fixture of the raw-protocol tests: 1 MiB, 0xa5 in the first 64 KiB.
const FIXTURE_LEN: u64 = MIB;
const FIXTURE_HEAD: u64 = 64 * KIB;

fn fixture(tag: &str) -> (TempImage, Vec<u8>) {
    let mut want = vec![0u8; FIXTURE_LEN as usize];
    want[..FIXTURE_HEAD as usize].fill(0xa5);
    (
        TempImage::with(tag, FIXTURE_LEN, &want[..FIXTURE_HEAD as usize]),
        want,
    )
}

/// A `qemu-io` client reads the whole fixture back: the server is up and
/// serves new clients correctly after whatever came before.
fn fixture_intact(server: &mut Server, after: &str) {
    server.assert_running(after);
    qemu_io(
        &server.url(),
        &["-r"],
        &[
            read(0xa5, 0, FIXTURE_HEAD),
            read(0, FIXTURE_HEAD, FIXTURE_LEN - FIXTURE_HEAD),
        ],
    );
}

// ---------------------------------------------------------------------------
// A raw protocol client

/// Either end reports a closed connection as EOF or as one of these.
fn is_closed(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::UnexpectedEof
            | ErrorKind::ConnectionReset
            | ErrorKind::ConnectionAborted
            | ErrorKind::BrokenPipe
    )
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

struct OptReply {
    opt: u32,
    typ: u32,
    data: Vec<u8>,
}

struct Client {
    s: TcpStream,
    /// The handshake flags of the greeting.
    flags: u16,
}

impl Client {
    /// Connects and checks the server's greeting.
    fn connect(port: u16) -> Client {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        s.set_write_timeout(Some(TIMEOUT)).unwrap();
        s.set_nodelay(true).unwrap();
        let mut c = Client { s, flags: 0 };
        assert_eq!(c.u64(), NBDMAGIC, "greeting: NBDMAGIC");
        assert_eq!(c.u64(), IHAVEOPT, "greeting: IHAVEOPT");
        c.flags = c.u16();
        assert_eq!(
            c.flags & FLAG_FIXED_NEWSTYLE,
            FLAG_FIXED_NEWSTYLE,
            "handshake flags {:#x}: FIXED_NEWSTYLE",
            c.flags
        );
        c
    }

    /// Connects and sends the client flags (FIXED_NEWSTYLE, and NO_ZEROES
    /// if offered): ready for options.
    fn options(port: u16) -> Client {
        let mut c = Client::connect(port);
        let flags = c.flags & (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        c.send(&u32::from(flags).to_be_bytes());
        c
    }

    /// Connects and negotiates the export "" with NBD_OPT_GO: returns the
    /// client in transmission, the export size and transmission flags.
    fn open(port: u16) -> (Client, u64, u16) {
        let mut c = Client::options(port);
        let (size, flags) = c.go();
        (c, size, flags)
    }

    fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).expect("sending to the server");
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0; n];
        match self.s.read_exact(&mut v) {
            Ok(()) => v,
            Err(e) if is_timeout(&e) => panic!("the server hung: nothing within {TIMEOUT:?}"),
            Err(e) => panic!("reading {n} bytes from the server: {e}"),
        }
    }

    fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.bytes(2).try_into().unwrap())
    }

    fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.bytes(4).try_into().unwrap())
    }

    fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.bytes(8).try_into().unwrap())
    }

    fn send_option(&mut self, opt: u32, data: &[u8]) {
        let mut m = Vec::with_capacity(16 + data.len());
        m.extend_from_slice(&IHAVEOPT.to_be_bytes());
        m.extend_from_slice(&opt.to_be_bytes());
        m.extend_from_slice(&u32::try_from(data.len()).unwrap().to_be_bytes());
        m.extend_from_slice(data);
        self.send(&m);
    }

    fn option_reply(&mut self) -> OptReply {
        assert_eq!(self.u64(), OPT_REPLY_MAGIC, "option reply magic");
        let opt = self.u32();
        let typ = self.u32();
        let len = self.u32();
        assert!(len <= 1 << 20, "option reply of {len} bytes");
        let data = self.bytes(len as usize);
        OptReply { opt, typ, data }
    }

    /// NBD_OPT_GO for "" with no info requests: NBD_REP_INFO replies (one
    /// NBD_INFO_EXPORT among them), then NBD_REP_ACK.
    fn go(&mut self) -> (u64, u16) {
        self.send_option(OPT_GO, &[0, 0, 0, 0, 0, 0]);
        let mut export = None;
        loop {
            let r = self.option_reply();
            assert_eq!(r.opt, OPT_GO, "reply to NBD_OPT_GO names the option");
            match r.typ {
                REP_INFO => {
                    assert!(r.data.len() >= 2, "NBD_REP_INFO without a type");
                    if u16::from_be_bytes([r.data[0], r.data[1]]) == INFO_EXPORT {
                        assert_eq!(r.data.len(), 12, "NBD_INFO_EXPORT length");
                        let size = u64::from_be_bytes(r.data[2..10].try_into().unwrap());
                        let flags = u16::from_be_bytes([r.data[10], r.data[11]]);
                        export = Some((size, flags));
                    }
                }
                REP_ACK => {
                    assert!(r.data.is_empty(), "NBD_REP_ACK with data");
                    return export.expect("NBD_OPT_GO: no NBD_INFO_EXPORT before the ACK");
                }
                t => panic!(
                    "NBD_OPT_GO: reply type {t:#x} ({:?})",
                    String::from_utf8_lossy(&r.data)
                ),
            }
        }
    }

    fn request_header(typ: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
        let mut m = Vec::with_capacity(28);
        m.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        m.extend_from_slice(&0u16.to_be_bytes());
        m.extend_from_slice(&typ.to_be_bytes());
        m.extend_from_slice(&cookie.to_be_bytes());
        m.extend_from_slice(&offset.to_be_bytes());
        m.extend_from_slice(&len.to_be_bytes());
        m
    }

    fn request(&mut self, typ: u16, cookie: u64, offset: u64, len: u32, payload: &[u8]) {
        let mut m = Client::request_header(typ, cookie, offset, len);
        m.extend_from_slice(payload);
        self.send(&m);
    }

    /// A simple reply: (error, cookie).
    fn reply(&mut self) -> (u32, u64) {
        let magic = self.u32();
        assert_eq!(magic, SIMPLE_REPLY_MAGIC, "simple reply magic");
        let error = self.u32();
        let cookie = self.u64();
        (error, cookie)
    }

    /// A simple reply to `cookie`, its error and, when 0, `len` bytes.
    fn reply_to(&mut self, cookie: u64, len: u32) -> Result<Vec<u8>, u32> {
        let (error, c) = self.reply();
        assert_eq!(c, cookie, "reply cookie");
        if error == 0 {
            Ok(self.bytes(len as usize))
        } else {
            Err(error)
        }
    }

    fn read(&mut self, cookie: u64, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        self.request(CMD_READ, cookie, offset, len, &[]);
        self.reply_to(cookie, len)
    }

    fn write(&mut self, cookie: u64, offset: u64, data: &[u8]) -> Result<(), u32> {
        let len = u32::try_from(data.len()).unwrap();
        self.request(CMD_WRITE, cookie, offset, len, data);
        self.reply_to(cookie, 0).map(drop)
    }

    /// NBD_CMD_DISC: the server closes without a reply.
    fn disconnect(mut self) {
        self.request(CMD_DISC, 0xd15c, 0, 0, &[]);
        self.expect_closed("NBD_CMD_DISC");
    }

    /// The server must close the connection within [`TIMEOUT`]; anything it
    /// sends before is discarded.
    fn expect_closed(&mut self, after: &str) {
        let deadline = Instant::now() + TIMEOUT;
        let mut buf = [0u8; 4096];
        let mut got = 0usize;
        loop {
            match self.s.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => got += n,
                Err(e) if is_closed(&e) => return,
                Err(e) if is_timeout(&e) => {}
                Err(e) => panic!("after {after}: {e}"),
            }
            assert!(
                Instant::now() < deadline,
                "after {after} the server must close the connection; still open after \
                 {TIMEOUT:?} ({got} bytes received)"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// 1-3: qemu-io and qemu-img

/// 64 writes of 64 KiB with distinct patterns at scattered, partly
/// unaligned offsets, 16 per qemu-io run; read back in reverse order, with
/// holes checked to be zero; then the image file itself is compared.
#[test]
fn qemu_io_scattered_patterns() {
    const SIZE: u64 = 64 * MIB;
    const SLOT: u64 = 128 * KIB;
    const LEN: u64 = 64 * KIB;
    const SLOTS: u64 = SIZE / SLOT; // 512
    let img = TempImage::path_only("scattered");
    let server = Server::start(&img.path, &["--size", &SIZE.to_string()]);
    let url = server.url();

    let mut used = [false; SLOTS as usize];
    let writes: Vec<Io> = (0..64u64)
        .map(|i| {
            let slot = (i * 149 + 7) % SLOTS; // 149 is odd: distinct slots
            used[slot as usize] = true;
            let within = (i * 997) % (SLOT - LEN); // mostly unaligned
            write(0x40 + i as u8, slot * SLOT + within, LEN)
        })
        .collect();
    for chunk in writes.chunks(16) {
        qemu_io(&url, &[], chunk);
    }
    let mut reads: Vec<Io> = writes
        .iter()
        .rev()
        .map(|w| read(w.pattern, w.off, w.len))
        .collect();
    // Whole untouched slots read as zeros.
    reads.extend(
        (0..SLOTS)
            .filter(|&s| !used[s as usize])
            .step_by(37)
            .map(|s| read(0, s * SLOT, SLOT)),
    );
    for chunk in reads.chunks(32) {
        qemu_io(&url, &[], chunk);
    }

    // A wrong pattern is caught (the reads above really checked data).
    let w = writes[5];
    let out = run_tool(
        "qemu-io",
        &[
            "-f".into(),
            "raw".into(),
            "-r".into(),
            url.clone(),
            "-c".into(),
            format!("read -P {:#04x} {} {}", w.pattern ^ 0xff, w.off, w.len),
        ],
    );
    assert!(
        out.text
            .contains(&format!("Pattern verification failed at offset {}", w.off)),
        "`{}` did not report the wrong pattern:\n{}",
        out.cmdline,
        out.text
    );

    // The image file, byte for byte, while the server still runs.
    let mut want = vec![0u8; SIZE as usize];
    for w in &writes {
        want[w.off as usize..(w.off + w.len) as usize].fill(w.pattern);
    }
    assert_bytes_eq(&img.read(), &want, "image file");
    server.stop();
}

/// `qemu-img info` sees the size, `qemu-img convert` copies the export
/// byte for byte, `qemu-img compare` finds it identical to the image and
/// finds a planted difference.
#[test]
fn qemu_img_info_convert_compare() {
    const SIZE: u64 = 8 * MIB;
    let img = TempImage::with("convert", SIZE, &[]);
    let mut want = vec![0u8; SIZE as usize];
    let mut x = 0x2545_f491_4f6c_dd1d_u64;
    // Noise in some ranges, holes between them.
    for (off, len) in [
        (0, 300_000),
        (MIB + 17, 5_000),
        (3 * MIB, MIB),
        (SIZE - 999, 999),
    ] {
        for b in &mut want[off as usize..(off + len) as usize] {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = (x >> 32) as u8;
        }
    }
    fs::File::options()
        .write(true)
        .open(&img.path)
        .unwrap()
        .write_all_at(&want, 0)
        .unwrap();
    let server = Server::start(&img.path, &[]);
    let url = server.url();

    let info = run_tool(
        "qemu-img",
        &["info".into(), "--output=json".into(), url.clone()],
    );
    assert!(
        info.status.success() && info.text.contains(&format!("\"virtual-size\": {SIZE},")),
        "`{}` ({}): expected virtual-size {SIZE}:\n{}",
        info.cmdline,
        info.status,
        info.text
    );

    let out = TempImage::path_only("convert-out");
    let conv = run_tool(
        "qemu-img",
        &[
            "convert".into(),
            "-f".into(),
            "raw".into(),
            "-O".into(),
            "raw".into(),
            url.clone(),
            out.arg(),
        ],
    );
    assert!(
        conv.status.success() && conv.text.is_empty(),
        "`{}` ({}):\n{}",
        conv.cmdline,
        conv.status,
        conv.text
    );
    assert_bytes_eq(&out.read(), &want, "qemu-img convert output");

    let compare = |other: &TempImage| {
        run_tool(
            "qemu-img",
            &[
                "compare".into(),
                "-f".into(),
                "raw".into(),
                "-F".into(),
                "raw".into(),
                url.clone(),
                other.arg(),
            ],
        )
    };
    let same = compare(&img);
    assert!(
        same.status.success() && same.text.trim() == "Images are identical.",
        "`{}` ({}):\n{}",
        same.cmdline,
        same.status,
        same.text
    );
    // One byte changed in a copy: compare must see it (exit status 1).
    let off = 3 * MIB + 4321;
    fs::File::options()
        .write(true)
        .open(&out.path)
        .unwrap()
        .write_all_at(&[!want[off as usize]], off)
        .unwrap();
    let diff = compare(&out);
    assert!(
        diff.status.code() == Some(1) && diff.text.contains("Content mismatch at offset"),
        "`{}` ({}) must report a mismatch near {off}:\n{}",
        diff.cmdline,
        diff.status,
        diff.text
    );
    server.stop();
}

/// Eight qemu-io clients at once, each with 16 requests in flight (aio)
/// writing and then verifying its own 1 MiB region.
#[test]
fn eight_concurrent_qemu_io_clients() {
    const CLIENTS: u64 = 8;
    const REGION: u64 = 2 * MIB;
    const LEN: u64 = 64 * KIB;
    const PER: u64 = 16;
    let img = TempImage::path_only("concurrent");
    let server = Server::start(&img.path, &["--size", &(CLIENTS * REGION).to_string()]);
    let url = server.url();
    let pattern = |c: u64, k: u64| (1 + c * PER + k) as u8;
    let barrier = Arc::new(Barrier::new(CLIENTS as usize));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (url, barrier) = (url.clone(), barrier.clone());
            thread::spawn(move || {
                let base = c * REGION;
                let mut cmds: Vec<Io> = (0..PER)
                    .map(|k| Io {
                        op: Op::AioWrite,
                        pattern: pattern(c, k),
                        off: base + k * LEN,
                        len: LEN,
                    })
                    .collect();
                barrier.wait();
                qemu_io(&url, &[], &cmds);
                for cmd in &mut cmds {
                    cmd.op = Op::AioRead;
                }
                cmds.push(read(0, base + PER * LEN, REGION - PER * LEN));
                qemu_io(&url, &[], &cmds);
            })
        })
        .collect();
    let failures: Vec<String> = clients
        .into_iter()
        .enumerate()
        .filter_map(|(c, t)| {
            t.join()
                .err()
                .map(|p| format!("client {c}: {}", common::payload_message(&*p)))
        })
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    let mut want = vec![0u8; (CLIENTS * REGION) as usize];
    for c in 0..CLIENTS {
        for k in 0..PER {
            let off = (c * REGION + k * LEN) as usize;
            want[off..off + LEN as usize].fill(pattern(c, k));
        }
    }
    assert_bytes_eq(&img.read(), &want, "image file");
    server.stop();
}

// ---------------------------------------------------------------------------
// 4: malformed and unusual input from a raw client

/// Garbage client flags, a bad option magic, a truncated handshake and a
/// huge option length: each connection is closed (or dropped by us), and
/// the server keeps serving.
#[test]
fn raw_malformed_handshake() {
    let (img, _) = fixture("bad-handshake");
    let mut server = Server::start(&img.path, &[]);

    // Garbage where the client flags belong (unknown flag bits).
    let mut c = Client::connect(server.port);
    c.send(b"GARBAGE!GARBAGE!GARBAGE!GARBAGE!");
    c.expect_closed("garbage client flags");
    fixture_intact(&mut server, "garbage client flags");

    // Valid flags, then an option with a bad magic.
    let mut c = Client::options(server.port);
    let mut m = 0x1122_3344_5566_7788_u64.to_be_bytes().to_vec();
    m.extend_from_slice(&OPT_GO.to_be_bytes());
    m.extend_from_slice(&6u32.to_be_bytes());
    m.extend_from_slice(&[0; 6]);
    c.send(&m);
    c.expect_closed("a bad option magic");
    fixture_intact(&mut server, "a bad option magic");

    // Half the client flags, then gone; half an option header, then gone.
    let mut c = Client::connect(server.port);
    c.send(&[0, 0]);
    drop(c);
    let mut c = Client::options(server.port);
    c.send(&IHAVEOPT.to_be_bytes()[..5]);
    drop(c);
    fixture_intact(&mut server, "truncated handshakes");

    // An option claiming ~4 GiB of data: the server must not try to hold
    // it; whatever it does (error reply, close, discard), it survives us
    // leaving.
    let mut c = Client::options(server.port);
    let mut m = IHAVEOPT.to_be_bytes().to_vec();
    m.extend_from_slice(&OPT_GO.to_be_bytes());
    m.extend_from_slice(&0xffff_fff0_u32.to_be_bytes());
    m.extend_from_slice(&[0; 64]);
    c.send(&m);
    thread::sleep(Duration::from_millis(100));
    drop(c);
    fixture_intact(&mut server, "an option length of 0xfffffff0");
    server.stop();
}

/// An unknown option gets NBD_REP_ERR_UNSUP (its data skipped), and the
/// same connection then goes through NBD_OPT_GO and reads.
#[test]
fn raw_unknown_option() {
    let (img, want) = fixture("unknown-opt");
    let mut server = Server::start(&img.path, &[]);
    let mut c = Client::options(server.port);
    c.send_option(0x1234, b"some option data");
    let r = c.option_reply();
    assert_eq!(r.opt, 0x1234, "the reply names the option");
    assert_eq!(r.typ, REP_ERR_UNSUP, "reply type to an unknown option");
    // Again, without data.
    c.send_option(0x7fff_0000, &[]);
    let r = c.option_reply();
    assert_eq!((r.opt, r.typ), (0x7fff_0000, REP_ERR_UNSUP));

    let (size, flags) = c.go();
    assert_eq!(size, FIXTURE_LEN, "export size");
    assert_eq!(flags & TFLAG_HAS_FLAGS, TFLAG_HAS_FLAGS, "HAS_FLAGS");
    assert_eq!(flags & TFLAG_READ_ONLY, 0, "not READ_ONLY");
    let data = c.read(1, FIXTURE_HEAD - 100, 200).expect("READ");
    assert_bytes_eq(&data, &want[(FIXTURE_HEAD - 100) as usize..][..200], "READ");
    c.disconnect();
    fixture_intact(&mut server, "unknown options");
    server.stop();
}

/// An unknown command type gets EINVAL with its cookie, and the connection
/// stays usable: single reads, then pipelined reads answered by cookie.
#[test]
fn raw_unknown_command() {
    let (img, want) = fixture("unknown-cmd");
    let mut server = Server::start(&img.path, &[]);
    let (mut c, _, _) = Client::open(server.port);
    c.request(77, 0xabcd_ef01_2345_6789, 0, 0, &[]);
    assert_eq!(
        c.reply(),
        (EINVAL, 0xabcd_ef01_2345_6789),
        "unknown command 77: (error, cookie)"
    );
    let data = c.read(2, 0, 4096).expect("READ after an unknown command");
    assert_bytes_eq(&data, &want[..4096], "READ");

    // Eight pipelined READs: each answered once, by cookie, with its data.
    let reqs: Vec<(u64, u64, u32)> = (0..8u64)
        .map(|i| (100 + i, FIXTURE_HEAD - 4096 + i * 1000, 4096 + i as u32))
        .collect();
    let mut m = Vec::new();
    for &(cookie, off, len) in &reqs {
        m.extend_from_slice(&Client::request_header(CMD_READ, cookie, off, len));
    }
    c.send(&m);
    let mut seen = Vec::new();
    for _ in &reqs {
        let (error, cookie) = c.reply();
        let &(_, off, len) = reqs
            .iter()
            .find(|r| r.0 == cookie)
            .unwrap_or_else(|| panic!("reply with unknown cookie {cookie}"));
        assert_eq!(error, 0, "pipelined READ {cookie}");
        let data = c.bytes(len as usize);
        assert_bytes_eq(
            &data,
            &want[off as usize..][..len as usize],
            "pipelined READ",
        );
        seen.push(cookie);
    }
    seen.sort();
    assert_eq!(seen, (100..108).collect::<Vec<_>>(), "one reply per READ");
    c.disconnect();
    fixture_intact(&mut server, "an unknown command");
    server.stop();
}

/// Pseudo-random bytes (xorshift), distinct per `seed`.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 32) as u8
        })
        .collect()
}

/// Sixteen 2 MiB WRITEs, then batches of 2 MiB READs, each batch sent
/// before any reply is read: the replies overflow the socket buffers, so
/// the server's reply writer waits for the socket to become writable while
/// its request reader waits for it to become readable. Every reply comes
/// once, intact, matched by cookie.
#[test]
fn raw_pipelined_large_requests() {
    const N: u64 = 16;
    const LEN: u64 = 2 * MIB;
    let img = TempImage::path_only("pipelined");
    let server = Server::start(&img.path, &["--size", &(N * LEN).to_string()]);
    let (mut c, _, _) = Client::open(server.port);
    let chunks: Vec<Vec<u8>> = (0..N).map(|i| noise(i + 1, LEN as usize)).collect();

    let mut writer = c.s.try_clone().unwrap();
    let to_send = chunks.clone();
    let sender = thread::spawn(move || {
        for (i, chunk) in to_send.iter().enumerate() {
            let i = i as u64;
            // Out of order on the disk: 0, 9, 2, 11, ...
            let slot = (i * 9) % N;
            let mut m = Client::request_header(CMD_WRITE, 1000 + i, slot * LEN, LEN as u32);
            m.extend_from_slice(chunk);
            writer.write_all(&m).unwrap();
        }
    });
    let mut acked = Vec::new();
    for _ in 0..N {
        let (error, cookie) = c.reply();
        assert_eq!(error, 0, "pipelined WRITE {cookie}");
        acked.push(cookie);
    }
    sender.join().unwrap();
    acked.sort();
    assert_eq!(
        acked,
        (1000..1000 + N).collect::<Vec<_>>(),
        "one reply per WRITE"
    );

    // Batches of READs, most smaller than a server's in-flight cap (so its
    // request reader is waiting on the socket too), all sent before any
    // reply is read.
    for batch in [0..8, 8..16, 0..16, 5..9, 2..14] {
        let mut m = Vec::new();
        for i in batch.clone() {
            let h = Client::request_header(CMD_READ, 2000 + i, i * LEN, LEN as u32);
            m.extend_from_slice(&h);
        }
        c.send(&m);
        thread::sleep(Duration::from_millis(50)); // let the replies back up
        let mut seen = Vec::new();
        for _ in batch.clone() {
            let (error, cookie) = c.reply();
            assert_eq!(error, 0, "pipelined READ {cookie}");
            let slot = cookie.wrapping_sub(2000);
            assert!(
                batch.contains(&slot) && !seen.contains(&cookie),
                "reply with unexpected cookie {cookie:#x} (replies interleaved or duplicated?)"
            );
            seen.push(cookie);
            // The chunk written at `slot` is the i with (i * 9) % N == slot.
            let i = (0..N).find(|i| (i * 9) % N == slot).unwrap();
            let data = c.bytes(LEN as usize);
            let what = format!("pipelined READ {cookie}");
            assert_bytes_eq(&data, &chunks[i as usize], &what);
        }
    }
    c.disconnect();
    server.stop();
}

/// READs past the end (also with an offset that overflows) get EINVAL; a
/// WRITE past the end gets ENOSPC or EINVAL, its payload consumed, and
/// nothing is written; the connection stays usable throughout.
#[test]
fn raw_past_the_end() {
    let (img, want) = fixture("past-end");
    let mut server = Server::start(&img.path, &[]);
    let (mut c, size, _) = Client::open(server.port);
    assert_eq!(size, FIXTURE_LEN);
    for (cookie, off, len) in [
        (1, FIXTURE_LEN - 512, 1024),
        (2, FIXTURE_LEN, 1),
        (3, FIXTURE_LEN + MIB, 4096),
        (4, u64::MAX - 1000, 4096), // offset + length overflows u64
        (5, u64::MAX, 1),
    ] {
        assert_eq!(
            c.read(cookie, off, len),
            Err(EINVAL),
            "READ of {len} at {off} (export size {FIXTURE_LEN})"
        );
    }
    // The last byte is still readable.
    assert_eq!(c.read(6, FIXTURE_LEN - 1, 1), Ok(vec![0]));

    for (cookie, off) in [
        (7, FIXTURE_LEN - 100),
        (8, FIXTURE_LEN),
        (9, u64::MAX - 100),
    ] {
        let r = c.write(cookie, off, &[0x5a; 4096]);
        assert!(
            r == Err(ENOSPC) || r == Err(EINVAL),
            "WRITE of 4096 at {off} (export size {FIXTURE_LEN}): {r:?}, expected ENOSPC or EINVAL"
        );
        // The payload was consumed: the next request parses.
        let data = c
            .read(cookie + 100, 0, 16)
            .expect("READ after a failed WRITE");
        assert_bytes_eq(&data, &want[..16], "READ after a failed WRITE");
    }
    c.disconnect();
    let meta = fs::metadata(&img.path).unwrap();
    assert_eq!(meta.len(), FIXTURE_LEN, "the image must not grow");
    assert_bytes_eq(&img.read(), &want, "image after WRITEs past the end");
    fixture_intact(&mut server, "requests past the end");
    server.stop();
}

/// Over-long READs (beyond any sane maximum) get EINVAL or a closed
/// connection, never a hang or a crash.
#[test]
fn raw_overlong_read() {
    let (img, want) = fixture("long-read");
    let mut server = Server::start(&img.path, &[]);
    for len in [64 * MIB as u32, 0x8000_0000, u32::MAX] {
        let (mut c, _, _) = Client::open(server.port);
        c.request(CMD_READ, 42, 0, len, &[]);
        let mut b = [0u8; 16];
        match c.s.read_exact(&mut b) {
            Ok(()) => {
                let magic = u32::from_be_bytes(b[0..4].try_into().unwrap());
                let error = u32::from_be_bytes(b[4..8].try_into().unwrap());
                let cookie = u64::from_be_bytes(b[8..16].try_into().unwrap());
                assert_eq!(
                    (magic, error, cookie),
                    (SIMPLE_REPLY_MAGIC, EINVAL, 42),
                    "READ of {len:#x} bytes: expected an EINVAL reply (or a close)"
                );
                // Still usable after the error.
                let data = c.read(43, 0, 512).expect("READ after an over-long READ");
                assert_bytes_eq(&data, &want[..512], "READ after an over-long READ");
                c.disconnect();
            }
            Err(e) if is_closed(&e) => {}
            Err(e) if is_timeout(&e) => {
                panic!("READ of {len:#x} bytes: no reply and no close within {TIMEOUT:?}")
            }
            Err(e) => panic!("READ of {len:#x} bytes: {e}"),
        }
        fixture_intact(&mut server, &format!("a READ of {len:#x} bytes"));
    }
    server.stop();
}

/// A WRITE header announcing ~4 GiB: an EINVAL reply or a close within
/// the timeout (the server must not wait for, or allocate, 4 GiB).
#[test]
fn raw_overlong_write() {
    let (img, want) = fixture("long-write");
    let mut server = Server::start(&img.path, &[]);
    let (mut c, _, _) = Client::open(server.port);
    c.request(CMD_WRITE, 7, 0, u32::MAX, &[]);
    // Some payload; the server may already have closed.
    let _ = c.s.write_all(&[0x77; 64 * 1024]);
    let mut b = [0u8; 16];
    match c.s.read_exact(&mut b) {
        Ok(()) => {
            let magic = u32::from_be_bytes(b[0..4].try_into().unwrap());
            let error = u32::from_be_bytes(b[4..8].try_into().unwrap());
            let cookie = u64::from_be_bytes(b[8..16].try_into().unwrap());
            assert_eq!(
                (magic, error, cookie),
                (SIMPLE_REPLY_MAGIC, EINVAL, 7),
                "WRITE of 0xffffffff bytes: expected an EINVAL reply (or a close)"
            );
        }
        Err(e) if is_closed(&e) => {}
        Err(e) if is_timeout(&e) => panic!(
            "WRITE of 0xffffffff bytes: no reply and no close within {TIMEOUT:?} (is the \
             server waiting for 4 GiB of payload?)"
        ),
        Err(e) => panic!("WRITE of 0xffffffff bytes: {e}"),
    }
    drop(c);
    fixture_intact(&mut server, "a WRITE of 0xffffffff bytes");
    assert_bytes_eq(&img.read(), &want, "image after an over-long WRITE");
    server.stop();
}

/// Clients vanishing mid-request: a WRITE of 4096 with 100 bytes of
/// payload, a half request header. The server survives and applies no
/// partial write.
#[test]
fn raw_truncated_requests() {
    let (img, want) = fixture("truncated");
    let mut server = Server::start(&img.path, &[]);

    let (mut c, _, _) = Client::open(server.port);
    c.request(CMD_WRITE, 1, 4096, 4096, &[0x3c; 100]);
    thread::sleep(Duration::from_millis(50));
    drop(c);
    fixture_intact(&mut server, "a WRITE with a truncated payload");

    let (mut c, _, _) = Client::open(server.port);
    c.send(&Client::request_header(CMD_READ, 2, 0, 4096)[..10]);
    drop(c);
    fixture_intact(&mut server, "a truncated request header");

    // A client gone with a READ reply still to be sent.
    let (mut c, _, _) = Client::open(server.port);
    c.request(CMD_READ, 3, 0, FIXTURE_LEN as u32, &[]);
    drop(c);
    fixture_intact(&mut server, "a client gone before its READ reply");

    assert_bytes_eq(&img.read(), &want, "image after a truncated WRITE");
    server.stop();
}

/// `--read-only`: READ_ONLY in the transmission flags, WRITE gets EPERM
/// (its payload consumed), nothing changes.
#[test]
fn raw_read_only() {
    let (img, want) = fixture("read-only");
    let mut server = Server::start(&img.path, &["--read-only"]);
    let (mut c, size, flags) = Client::open(server.port);
    assert_eq!(size, FIXTURE_LEN);
    assert_eq!(
        flags & (TFLAG_HAS_FLAGS | TFLAG_READ_ONLY),
        TFLAG_HAS_FLAGS | TFLAG_READ_ONLY,
        "transmission flags {flags:#x}: HAS_FLAGS and READ_ONLY"
    );
    assert_eq!(c.write(1, 0, &[0x99; 4096]), Err(EPERM), "WRITE");
    assert_eq!(c.write(2, FIXTURE_LEN - 10, &[0x99; 10]), Err(EPERM));
    let data = c.read(3, 0, 8192).expect("READ after a refused WRITE");
    assert_bytes_eq(&data, &want[..8192], "READ");
    c.disconnect();

    // qemu-io cannot write either.
    let out = run_tool(
        "qemu-io",
        &[
            "-f".into(),
            "raw".into(),
            server.url(),
            "-c".into(),
            "write -P 0x99 0 4096".into(),
        ],
    );
    assert!(
        !out.text.contains("wrote 4096/4096"),
        "`{}` wrote to a read-only export:\n{}",
        out.cmdline,
        out.text
    );
    fixture_intact(&mut server, "refused writes");
    assert_bytes_eq(&img.read(), &want, "read-only image");
    server.stop();
}

/// NBD_OPT_LIST: one NBD_REP_SERVER naming "", then NBD_REP_ACK;
/// NBD_OPT_ABORT: (an optional ACK, then) the server closes.
#[test]
fn raw_list_and_abort() {
    let (img, _) = fixture("list");
    let mut server = Server::start(&img.path, &[]);
    let mut c = Client::options(server.port);
    c.send_option(OPT_LIST, &[]);
    let mut names = Vec::new();
    loop {
        let r = c.option_reply();
        assert_eq!(r.opt, OPT_LIST, "the reply names NBD_OPT_LIST");
        match r.typ {
            REP_SERVER => {
                assert!(r.data.len() >= 4, "NBD_REP_SERVER too short");
                let n = u32::from_be_bytes(r.data[..4].try_into().unwrap()) as usize;
                assert!(4 + n <= r.data.len(), "NBD_REP_SERVER name overruns");
                names.push(r.data[4..4 + n].to_vec());
            }
            REP_ACK => {
                assert!(r.data.is_empty());
                break;
            }
            t => panic!("NBD_OPT_LIST: reply type {t:#x}"),
        }
    }
    assert_eq!(names, vec![Vec::<u8>::new()], "exports listed");
    // LIST with data is invalid; the server must say so, not close.
    c.send_option(OPT_LIST, b"x");
    let r = c.option_reply();
    assert_eq!(r.opt, OPT_LIST);
    assert!(
        r.typ & 0x8000_0000 != 0,
        "NBD_OPT_LIST with data: {:#x}",
        r.typ
    );

    c.send_option(OPT_ABORT, &[]);
    c.expect_closed("NBD_OPT_ABORT");
    fixture_intact(&mut server, "LIST and ABORT");

    // LIST then GO on one connection.
    let mut c = Client::options(server.port);
    c.send_option(OPT_LIST, &[]);
    while c.option_reply().typ != REP_ACK {}
    assert_eq!(c.go().0, FIXTURE_LEN);
    c.disconnect();
    server.stop();
}

// ---------------------------------------------------------------------------
// 5: shutdown

/// Data written by qemu-io is in the image after SIGTERM and exit 0.
#[test]
fn sigterm_flushes_and_exits_zero() {
    const SIZE: u64 = 4 * MIB;
    let img = TempImage::path_only("durable");
    let server = Server::start(&img.path, &["--size", &SIZE.to_string()]);
    let cmds: Vec<Io> = (0..16u64)
        .map(|i| write(0xc0 + i as u8, i * 200 * KIB + i * 3, 100 * KIB))
        .collect();
    qemu_io(&server.url(), &[], &cmds);
    server.stop();
    let mut want = vec![0u8; SIZE as usize];
    for w in &cmds {
        want[w.off as usize..(w.off + w.len) as usize].fill(w.pattern);
    }
    assert_bytes_eq(&img.read(), &want, "image after SIGTERM");
}

/// SIGTERM with a connected, idle client: the server exits 0 promptly and
/// the client sees the connection close.
#[test]
fn sigterm_with_idle_client() {
    let (img, want) = fixture("idle");
    let server = Server::start(&img.path, &[]);
    let (mut c, _, _) = Client::open(server.port);
    assert_bytes_eq(&c.read(1, 0, 512).unwrap(), &want[..512], "READ");
    server.stop();
    c.expect_closed("the server's exit");
}

/// SIGTERM right behind 32 pipelined WRITEs: every reply that arrives is a
/// success for a distinct cookie, and every acknowledged WRITE is in the
/// image after exit 0.
#[test]
fn sigterm_with_writes_in_flight() {
    const N: u64 = 32;
    const LEN: u64 = 64 * KIB;
    let img = TempImage::path_only("in-flight");
    let server = Server::start(&img.path, &["--size", &(N * LEN).to_string()]);
    let (mut c, _, _) = Client::open(server.port);
    let mut writer = c.s.try_clone().unwrap();
    let sender = thread::spawn(move || {
        for i in 0..N {
            let mut m = Client::request_header(CMD_WRITE, i, i * LEN, LEN as u32);
            m.extend(std::iter::repeat(0x80 + i as u8).take(LEN as usize));
            if writer.write_all(&m).is_err() {
                break; // the server is gone
            }
        }
    });
    // Let some WRITEs arrive, then stop the server under them.
    let (error, first) = c.reply();
    assert_eq!(error, 0, "WRITE {first}");
    let mut acked = vec![first];
    let err = server.stop();
    loop {
        let mut b = [0u8; 16];
        match c.s.read_exact(&mut b) {
            Ok(()) => {
                let magic = u32::from_be_bytes(b[0..4].try_into().unwrap());
                let error = u32::from_be_bytes(b[4..8].try_into().unwrap());
                let cookie = u64::from_be_bytes(b[8..16].try_into().unwrap());
                assert_eq!(magic, SIMPLE_REPLY_MAGIC);
                assert_eq!(error, 0, "WRITE {cookie} during shutdown");
                assert!(cookie < N && !acked.contains(&cookie), "cookie {cookie}");
                acked.push(cookie);
            }
            Err(e) if is_closed(&e) => break,
            Err(e) => panic!("reading replies after SIGTERM: {e}; server stderr:\n{err}"),
        }
    }
    sender.join().unwrap();
    let image = img.read();
    for &i in &acked {
        let off = (i * LEN) as usize;
        assert!(
            image[off..off + LEN as usize]
                .iter()
                .all(|&b| b == 0x80 + i as u8),
            "acknowledged WRITE {i} is not in the image"
        );
    }
}

// ---------------------------------------------------------------------------
// 6: --size

/// `--size` creates a sparse image of exactly that size, exported as such;
/// on an existing smaller image it extends it, keeping the contents.
#[test]
fn size_creates_sparse_image() {
    const SIZE: u64 = 1 << 30;
    let img = TempImage::path_only("sparse");
    let server = Server::start(&img.path, &["--size", &SIZE.to_string()]);
    let meta = fs::metadata(&img.path).expect("--size must create the image");
    assert_eq!(meta.len(), SIZE, "image length");
    assert!(
        meta.blocks() * 512 <= MIB,
        "the image must be sparse: {} bytes allocated",
        meta.blocks() * 512
    );
    let (c, size, _) = Client::open(server.port);
    assert_eq!(size, SIZE, "export size");
    c.disconnect();
    let info = run_tool(
        "qemu-img",
        &["info".into(), "--output=json".into(), server.url()],
    );
    assert!(
        info.status.success() && info.text.contains(&format!("\"virtual-size\": {SIZE},")),
        "`{}` ({}): expected virtual-size {SIZE}:\n{}",
        info.cmdline,
        info.status,
        info.text
    );
    server.stop();

    // Extending an existing image keeps its contents.
    let head: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
    let img = TempImage::with("extend", 4096, &head);
    let server = Server::start(&img.path, &["--size", &(2 * MIB).to_string()]);
    assert_eq!(fs::metadata(&img.path).unwrap().len(), 2 * MIB);
    let (mut c, size, _) = Client::open(server.port);
    assert_eq!(size, 2 * MIB, "export size");
    let data = c.read(1, 0, 8192).unwrap();
    assert_bytes_eq(&data[..4096], &head, "the old contents");
    assert_bytes_eq(&data[4096..], &[0; 4096], "the extension");
    c.disconnect();
    server.stop();
}

// EMFILE on accept: with a tiny fd limit, connections beyond it are not
// accepted for a while (logged), the loop does not spin, the clients it
// has are served, and once they leave new clients are served again.
#[test]
fn emfile_on_accept_is_logged_and_survived() {
    use std::os::unix::process::CommandExt;
    let (img, _) = fixture("emfile");
    let mut server = Server::start_with(&img.path, &[], |cmd| {
        // SAFETY: between fork and exec only setrlimit (async-signal-safe)
        // runs, on a stack-local struct.
        unsafe {
            cmd.pre_exec(|| {
                let lim = libc::rlimit {
                    rlim_cur: 24,
                    rlim_max: 24,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    });
    // More connections than the server has descriptors for. The kernel
    // completes them (backlog); the server accepts until EMFILE.
    let clients: Vec<TcpStream> = (0..40)
        .map(|_| TcpStream::connect(("127.0.0.1", server.port)).expect("connect"))
        .collect();
    thread::sleep(Duration::from_millis(300));
    server.assert_running("40 connections against a limit of 24 descriptors");
    drop(clients);
    // Clients gone: descriptors come back, accepting resumes.
    let t0 = Instant::now();
    loop {
        let out = run_tool(
            "qemu-io",
            &[
                "-r".into(),
                "-f".into(),
                "raw".into(),
                server.url(),
                "-c".into(),
                format!("read -P 0xa5 0 {FIXTURE_HEAD}"),
            ],
        );
        if out.status.success() && !out.text.contains("fail") && !out.text.contains("rror") {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "not serving again after EMFILE: {}",
            out.text
        );
        thread::sleep(Duration::from_millis(100));
    }
    let err = server.stop();
    assert!(
        err.contains("not accepting for 100 ms"),
        "EMFILE was not logged; stderr:\n{err}"
    );
}

// ---------------------------------------------------------------------------
// Every file-I/O engine behind the server: --aio threads|io_uring|native,
// --cache writeback|none (O_DIRECT; unaligned requests take the buffered
// descriptor). The image lives under target/: /tmp may be tmpfs, where
// O_DIRECT fails.

#[test]
fn qemu_io_on_every_aio_mode() {
    const SIZE: u64 = 16 * MIB;
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    for (aio, cache) in [
        ("threads", "writeback"),
        ("io_uring", "writeback"),
        ("native", "none"),
        ("io_uring", "none"),
        ("threads", "none"),
    ] {
        let path = dir.join(format!("nbd-aio-{}-{aio}-{cache}.img", std::process::id()));
        let _ = fs::remove_file(&path);
        let img = TempImage { path };
        fs::File::create(&img.path).unwrap().set_len(SIZE).unwrap();
        let mut server = Server::start(&img.path, &["--aio", aio, "--cache", cache]);
        let url = server.url();
        // Aligned and unaligned writes, then reads of both.
        let writes: Vec<Io> = (0..16u64)
            .map(|i| {
                let off = i * 512 * KIB + if i % 2 == 0 { 0 } else { 1000 + i };
                write(0x10 + i as u8, off, 64 * KIB)
            })
            .collect();
        qemu_io(&url, &[], &writes);
        let reads: Vec<Io> = writes
            .iter()
            .map(|w| read(w.pattern, w.off, w.len))
            .collect();
        qemu_io(&url, &[], &reads);
        server.assert_running(&format!("aio={aio} cache={cache}"));
        let stderr = server.stop();
        let data = img.read();
        for w in &writes {
            let got = &data[w.off as usize..(w.off + w.len) as usize];
            assert!(
                got.iter().all(|&b| b == w.pattern),
                "aio={aio} cache={cache}: write at {} not in the file; server: {stderr}",
                w.off
            );
        }
        if stderr.contains("unavailable here") {
            println!("SKIP: aio={aio} cache={cache} fell back: {stderr}");
        }
    }
}
