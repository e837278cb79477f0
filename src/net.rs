//! Sockets for coroutines: TCP and Unix-domain listeners and streams whose
//! `accept`, `connect`, `read` and `write` suspend the calling coroutine
//! until the socket is ready, instead of blocking its thread (QEMU's
//! `QIOChannelSocket` with `qio_channel_yield`).
//!
//! * `bind`, `accept` and `connect` put the sockets in non-blocking mode
//!   themselves: forgetting `set_nonblocking(true)` cannot stall the loop.
//! * The streams implement `std::io::Read` and `Write`, also on a shared
//!   reference, so one coroutine can read a connection while another
//!   writes it (`&stream` in both, or [`try_clone`](TcpStream::try_clone)).
//! * Errors are `io::Error`s as std reports them: `Ok(0)` at end of stream,
//!   `ConnectionReset`, `ConnectionRefused`, `BrokenPipe` (writes never
//!   raise `SIGPIPE`).
//! * Timeouts: [`set_read_timeout`](TcpStream::set_read_timeout) and
//!   [`set_write_timeout`](TcpStream::set_write_timeout) take std's
//!   signature, [`connect_timeout`](TcpStream::connect_timeout) and
//!   [`accept_timeout`](TcpListener::accept_timeout) bound the other two
//!   waits. A wait that runs out fails with `io::ErrorKind::TimedOut`,
//!   where std on Unix reports `WouldBlock`: inside a coroutine
//!   `WouldBlock` would read as "try again".
//! * Outside a coroutine, `accept`, `read` and `write` that would block
//!   return `WouldBlock` (the sockets are non-blocking), and `connect`
//!   blocks the thread as std's does.
//!
//! They wait with the fd handlers of the coroutine's context, so they work
//! with both fd monitors (epoll and io_uring).
//!
//! # Examples
//!
//! A line echo server and a client, on one thread:
//!
//! ```
//! use coroloop::{aio::AioContext, net::{TcpListener, TcpStream}, Coroutine};
//! use std::io::{BufRead, BufReader, Write};
//! use std::time::Duration;
//!
//! let ctx = AioContext::new()?;
//! let listener = TcpListener::bind("127.0.0.1:0")?;
//! let addr = listener.local_addr()?;
//! let server = Coroutine::new(move || -> std::io::Result<()> {
//!     let (conn, _peer) = listener.accept()?;
//!     conn.set_read_timeout(Some(Duration::from_secs(5)))?;
//!     let mut lines = BufReader::new(&conn);
//!     let mut line = String::new();
//!     while lines.read_line(&mut line)? > 0 {
//!         (&conn).write_all(line.as_bytes())?;
//!         line.clear();
//!     }
//!     Ok(())
//! });
//! server.enter(); // waits in accept
//! let client = Coroutine::new(move || -> std::io::Result<String> {
//!     let conn = TcpStream::connect(addr)?;
//!     (&conn).write_all(b"hello\n")?;
//!     let mut back = String::new();
//!     BufReader::new(&conn).read_line(&mut back)?;
//!     Ok(back)
//! });
//! client.enter();
//! ctx.poll_while(|| !client.is_finished());
//! assert_eq!(client.take_result().unwrap()?, "hello\n");
//! ctx.poll_while(|| !server.is_finished()); // the client closed: EOF
//! server.take_result().unwrap()?;
//! # std::io::Result::Ok(())
//! ```

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::net::{Shutdown, SocketAddr, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net as unix;
use std::path::Path;
use std::time::{Duration, Instant};

use rustix::net::{AddressFamily, SendFlags, SocketFlags, SocketType};

use crate::io::{retry_io, wait_fd_until, Timeouts};

/// `Some((deadline, timeout))` for a wait bounded by `timeout`.
fn deadline(timeout: Option<Duration>) -> Option<(Instant, Duration)> {
    timeout.map(|t| (Instant::now() + t, t))
}

fn zero_timeout(api: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("{api}: a zero timeout is invalid"),
    )
}

/// Accepts on a non-blocking listener, suspending while none is pending.
fn accept_loop<T>(
    fd: BorrowedFd<'_>,
    api: &'static str,
    timeout: Option<Duration>,
    mut accept: impl FnMut() -> io::Result<T>,
) -> io::Result<T> {
    let mut until = None;
    loop {
        match accept() {
            Ok(t) => return Ok(t),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && crate::coroutine::in_coroutine() => {
                if until.is_none() {
                    until = deadline(timeout);
                }
                wait_fd_until(&fd, false, api, until)?;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Connects a new non-blocking socket of `family` to `addr`, suspending
/// until the connection is made, refused, or `timeout` runs out.
fn connect_socket(
    family: AddressFamily,
    addr: &impl rustix::net::addr::SocketAddrArg,
    api: &'static str,
    timeout: Option<Duration>,
) -> io::Result<OwnedFd> {
    let fd = rustix::net::socket_with(
        family,
        SocketType::STREAM,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        None,
    )?;
    let until = deadline(timeout);
    loop {
        match rustix::net::connect(&fd, addr) {
            Ok(()) => return Ok(fd),
            Err(rustix::io::Errno::INTR) => {}
            // TCP: the handshake goes on; writable once it is over.
            Err(rustix::io::Errno::INPROGRESS) => {
                wait_fd_until(&fd, true, api, until)?;
                return match rustix::net::sockopt::socket_error(&fd)? {
                    Ok(()) => Ok(fd),
                    Err(e) => Err(e.into()),
                };
            }
            // Unix: the listener's backlog is full; try again once there
            // is room.
            Err(rustix::io::Errno::AGAIN) => wait_fd_until(&fd, true, api, until)?,
            Err(e) => return Err(e.into()),
        }
    }
}

macro_rules! stream_common {
    ($name:ident, $std:ty, $what:literal) => {
        impl $name {
            /// Wraps a connected std stream, making it non-blocking.
            ///
            /// # Errors
            ///
            /// If the socket's mode cannot be changed.
            pub fn from_std(stream: $std) -> io::Result<$name> {
                stream.set_nonblocking(true)?;
                Ok($name {
                    inner: stream,
                    timeouts: Timeouts::default(),
                })
            }

            /// The std stream inside (non-blocking).
            pub fn get_ref(&self) -> &$std {
                &self.inner
            }

            /// Unwraps into the std stream (it stays non-blocking).
            pub fn into_std(self) -> $std {
                self.inner
            }

            /// A second handle on the same socket (std's `try_clone`),
            /// with this one's timeouts (each handle then keeps its own).
            ///
            /// # Errors
            ///
            /// If the fd cannot be duplicated.
            pub fn try_clone(&self) -> io::Result<$name> {
                let c = $name {
                    inner: self.inner.try_clone()?,
                    timeouts: Timeouts::default(),
                };
                c.timeouts
                    .set(false, self.timeouts.get(false), "try_clone")?;
                c.timeouts.set(true, self.timeouts.get(true), "try_clone")?;
                Ok(c)
            }

            /// Shuts down the read, write or both halves (std's
            /// `shutdown`): a peer reading sees end of stream.
            ///
            /// # Errors
            ///
            /// As std (`NotConnected`).
            pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
                self.inner.shutdown(how)
            }

            /// Bounds each read (std's signature): a read that waits longer
            /// fails with `io::ErrorKind::TimedOut` (std on Unix reports
            /// `WouldBlock`, which inside a coroutine would read as "try
            /// again"). `None`, the default, waits for ever.
            ///
            /// # Errors
            ///
            /// `InvalidInput` for a zero duration, as std.
            pub fn set_read_timeout(&self, dur: Option<Duration>) -> io::Result<()> {
                self.timeouts
                    .set(false, dur, concat!($what, "::set_read_timeout"))
            }

            /// Bounds each write: as
            /// [`set_read_timeout`](Self::set_read_timeout).
            ///
            /// # Errors
            ///
            /// `InvalidInput` for a zero duration, as std.
            pub fn set_write_timeout(&self, dur: Option<Duration>) -> io::Result<()> {
                self.timeouts
                    .set(true, dur, concat!($what, "::set_write_timeout"))
            }

            /// The read timeout.
            pub fn read_timeout(&self) -> io::Result<Option<Duration>> {
                Ok(self.timeouts.get(false))
            }

            /// The write timeout.
            pub fn write_timeout(&self) -> io::Result<Option<Duration>> {
                Ok(self.timeouts.get(true))
            }

            fn read_impl(&self, buf: &mut [u8]) -> io::Result<usize> {
                retry_io(
                    &self.inner,
                    false,
                    concat!($what, "::read"),
                    self.timeouts.get(false),
                    |s| rustix::io::read(s, &mut *buf),
                )
            }

            fn read_vectored_impl(&self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
                retry_io(
                    &self.inner,
                    false,
                    concat!($what, "::read"),
                    self.timeouts.get(false),
                    |s| rustix::io::readv(s, &mut *bufs),
                )
            }

            fn write_impl(&self, buf: &[u8]) -> io::Result<usize> {
                retry_io(
                    &self.inner,
                    true,
                    concat!($what, "::write"),
                    self.timeouts.get(true),
                    |s| rustix::net::send(s, buf, SendFlags::NOSIGNAL),
                )
            }

            fn write_vectored_impl(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
                retry_io(
                    &self.inner,
                    true,
                    concat!($what, "::write"),
                    self.timeouts.get(true),
                    |s| rustix::net::sendmsg(s, bufs, &mut Default::default(), SendFlags::NOSIGNAL),
                )
            }
        }

        impl Read for $name {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                self.read_impl(buf)
            }
            fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
                self.read_vectored_impl(bufs)
            }
        }

        impl Read for &$name {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                self.read_impl(buf)
            }
            fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
                self.read_vectored_impl(bufs)
            }
        }

        impl Write for $name {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                self.write_impl(buf)
            }
            fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
                self.write_vectored_impl(bufs)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }

        impl Write for &$name {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                self.write_impl(buf)
            }
            fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
                self.write_vectored_impl(bufs)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }

        impl AsFd for $name {
            fn as_fd(&self) -> BorrowedFd<'_> {
                self.inner.as_fd()
            }
        }

        impl AsRawFd for $name {
            fn as_raw_fd(&self) -> RawFd {
                self.inner.as_raw_fd()
            }
        }
    };
}

/// A TCP connection whose reads and writes suspend the coroutine (see the
/// [module docs](self)).
#[derive(Debug)]
pub struct TcpStream {
    inner: std::net::TcpStream,
    timeouts: Timeouts,
}

stream_common!(TcpStream, std::net::TcpStream, "TcpStream");

impl TcpStream {
    /// Connects to `addr` (each address it resolves to, in turn, as std),
    /// suspending the coroutine during the handshake. Outside a coroutine
    /// it blocks the thread, as std's `connect`.
    ///
    /// # Errors
    ///
    /// As std: `ConnectionRefused`, the resolver's errors, and the last
    /// address's error.
    #[doc(alias = "qio_channel_socket_connect_sync")]
    pub fn connect(addr: impl ToSocketAddrs) -> io::Result<TcpStream> {
        let mut last = None;
        for a in addr.to_socket_addrs()? {
            match TcpStream::connect_addr(&a, None) {
                Ok(s) => return Ok(s),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "TcpStream::connect: the address resolved to nothing",
            )
        }))
    }

    /// Connects to `addr`, giving up after `timeout` with
    /// `io::ErrorKind::TimedOut` (std's `connect_timeout`).
    ///
    /// # Errors
    ///
    /// As [`connect`](Self::connect); `TimedOut`; `InvalidInput` for a
    /// zero timeout, as std.
    pub fn connect_timeout(addr: &SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
        if timeout.is_zero() {
            return Err(zero_timeout("TcpStream::connect_timeout"));
        }
        TcpStream::connect_addr(addr, Some(timeout))
    }

    fn connect_addr(addr: &SocketAddr, timeout: Option<Duration>) -> io::Result<TcpStream> {
        if !crate::coroutine::in_coroutine() {
            let s = match timeout {
                Some(t) => std::net::TcpStream::connect_timeout(addr, t),
                None => std::net::TcpStream::connect(addr),
            }?;
            return TcpStream::from_std(s);
        }
        let family = if addr.is_ipv4() {
            AddressFamily::INET
        } else {
            AddressFamily::INET6
        };
        let fd = connect_socket(family, addr, "TcpStream::connect", timeout)?;
        Ok(TcpStream {
            inner: std::net::TcpStream::from(fd),
            timeouts: Timeouts::default(),
        })
    }

    /// The remote address.
    ///
    /// # Errors
    ///
    /// As std (`NotConnected`).
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.inner.peer_addr()
    }

    /// The local address.
    ///
    /// # Errors
    ///
    /// As std.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    /// Sets `TCP_NODELAY` (no Nagle delay for small writes).
    ///
    /// # Errors
    ///
    /// As std.
    pub fn set_nodelay(&self, nodelay: bool) -> io::Result<()> {
        self.inner.set_nodelay(nodelay)
    }

    /// Whether `TCP_NODELAY` is set.
    ///
    /// # Errors
    ///
    /// As std.
    pub fn nodelay(&self) -> io::Result<bool> {
        self.inner.nodelay()
    }
}

/// A TCP listener whose `accept` suspends the coroutine (see the
/// [module docs](self)).
#[derive(Debug)]
pub struct TcpListener {
    inner: std::net::TcpListener,
}

impl TcpListener {
    /// Binds to `addr` (std's `bind`) in non-blocking mode.
    ///
    /// # Errors
    ///
    /// As std (`AddrInUse`, ...).
    pub fn bind(addr: impl ToSocketAddrs) -> io::Result<TcpListener> {
        TcpListener::from_std(std::net::TcpListener::bind(addr)?)
    }

    /// Wraps a bound std listener, making it non-blocking.
    ///
    /// # Errors
    ///
    /// If the socket's mode cannot be changed.
    pub fn from_std(l: std::net::TcpListener) -> io::Result<TcpListener> {
        l.set_nonblocking(true)?;
        Ok(TcpListener { inner: l })
    }

    /// Waits for a connection, suspending the coroutine; the stream is
    /// non-blocking. Outside a coroutine, `WouldBlock` if none is pending.
    ///
    /// # Errors
    ///
    /// As std (`EMFILE` when out of descriptors, ...).
    #[doc(alias = "qio_channel_socket_accept")]
    pub fn accept(&self) -> io::Result<(TcpStream, SocketAddr)> {
        self.accept_inner(None)
    }

    /// [`accept`](Self::accept), giving up after `timeout` with
    /// `io::ErrorKind::TimedOut`.
    ///
    /// # Errors
    ///
    /// As `accept`; `TimedOut`; `InvalidInput` for a zero timeout.
    pub fn accept_timeout(&self, timeout: Duration) -> io::Result<(TcpStream, SocketAddr)> {
        if timeout.is_zero() {
            return Err(zero_timeout("TcpListener::accept_timeout"));
        }
        self.accept_inner(Some(timeout))
    }

    fn accept_inner(&self, timeout: Option<Duration>) -> io::Result<(TcpStream, SocketAddr)> {
        let (s, a) = accept_loop(self.inner.as_fd(), "TcpListener::accept", timeout, || {
            self.inner.accept()
        })?;
        Ok((TcpStream::from_std(s)?, a))
    }

    /// The local address (the port chosen for `:0`).
    ///
    /// # Errors
    ///
    /// As std.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    /// The std listener inside (non-blocking).
    pub fn get_ref(&self) -> &std::net::TcpListener {
        &self.inner
    }
}

impl AsFd for TcpListener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.as_fd()
    }
}

/// A Unix-domain stream whose reads and writes suspend the coroutine (see
/// the [module docs](self)).
#[derive(Debug)]
pub struct UnixStream {
    inner: unix::UnixStream,
    timeouts: Timeouts,
}

stream_common!(UnixStream, unix::UnixStream, "UnixStream");

impl UnixStream {
    /// Connects to the socket at `path`, suspending the coroutine while the
    /// listener's backlog is full. Outside a coroutine it blocks the
    /// thread, as std's `connect`.
    ///
    /// # Errors
    ///
    /// As std: `NotFound`, `ConnectionRefused`.
    pub fn connect(path: impl AsRef<Path>) -> io::Result<UnixStream> {
        UnixStream::connect_inner(path.as_ref(), None)
    }

    /// [`connect`](Self::connect), giving up after `timeout` with
    /// `io::ErrorKind::TimedOut`.
    ///
    /// # Errors
    ///
    /// As `connect`; `TimedOut`; `InvalidInput` for a zero timeout.
    pub fn connect_timeout(path: impl AsRef<Path>, timeout: Duration) -> io::Result<UnixStream> {
        if timeout.is_zero() {
            return Err(zero_timeout("UnixStream::connect_timeout"));
        }
        UnixStream::connect_inner(path.as_ref(), Some(timeout))
    }

    fn connect_inner(path: &Path, timeout: Option<Duration>) -> io::Result<UnixStream> {
        if !crate::coroutine::in_coroutine() {
            return UnixStream::from_std(unix::UnixStream::connect(path)?);
        }
        let addr = rustix::net::SocketAddrUnix::new(path)?;
        let fd = connect_socket(AddressFamily::UNIX, &addr, "UnixStream::connect", timeout)?;
        Ok(UnixStream {
            inner: unix::UnixStream::from(fd),
            timeouts: Timeouts::default(),
        })
    }

    /// A connected pair (std's `pair`), both non-blocking.
    ///
    /// # Errors
    ///
    /// As std.
    pub fn pair() -> io::Result<(UnixStream, UnixStream)> {
        let (a, b) = unix::UnixStream::pair()?;
        Ok((UnixStream::from_std(a)?, UnixStream::from_std(b)?))
    }

    /// The remote address.
    ///
    /// # Errors
    ///
    /// As std.
    pub fn peer_addr(&self) -> io::Result<unix::SocketAddr> {
        self.inner.peer_addr()
    }

    /// The local address.
    ///
    /// # Errors
    ///
    /// As std.
    pub fn local_addr(&self) -> io::Result<unix::SocketAddr> {
        self.inner.local_addr()
    }
}

/// A Unix-domain listener whose `accept` suspends the coroutine (see the
/// [module docs](self)).
#[derive(Debug)]
pub struct UnixListener {
    inner: unix::UnixListener,
}

impl UnixListener {
    /// Binds to `path` (std's `bind`) in non-blocking mode.
    ///
    /// # Errors
    ///
    /// As std (`AddrInUse` if the path exists).
    pub fn bind(path: impl AsRef<Path>) -> io::Result<UnixListener> {
        UnixListener::from_std(unix::UnixListener::bind(path)?)
    }

    /// Wraps a bound std listener, making it non-blocking.
    ///
    /// # Errors
    ///
    /// If the socket's mode cannot be changed.
    pub fn from_std(l: unix::UnixListener) -> io::Result<UnixListener> {
        l.set_nonblocking(true)?;
        Ok(UnixListener { inner: l })
    }

    /// Waits for a connection, suspending the coroutine; the stream is
    /// non-blocking. Outside a coroutine, `WouldBlock` if none is pending.
    ///
    /// # Errors
    ///
    /// As std.
    pub fn accept(&self) -> io::Result<(UnixStream, unix::SocketAddr)> {
        self.accept_inner(None)
    }

    /// [`accept`](Self::accept), giving up after `timeout` with
    /// `io::ErrorKind::TimedOut`.
    ///
    /// # Errors
    ///
    /// As `accept`; `TimedOut`; `InvalidInput` for a zero timeout.
    pub fn accept_timeout(&self, timeout: Duration) -> io::Result<(UnixStream, unix::SocketAddr)> {
        if timeout.is_zero() {
            return Err(zero_timeout("UnixListener::accept_timeout"));
        }
        self.accept_inner(Some(timeout))
    }

    fn accept_inner(
        &self,
        timeout: Option<Duration>,
    ) -> io::Result<(UnixStream, unix::SocketAddr)> {
        let (s, a) = accept_loop(self.inner.as_fd(), "UnixListener::accept", timeout, || {
            self.inner.accept()
        })?;
        Ok((UnixStream::from_std(s)?, a))
    }

    /// The local address.
    ///
    /// # Errors
    ///
    /// As std.
    pub fn local_addr(&self) -> io::Result<unix::SocketAddr> {
        self.inner.local_addr()
    }

    /// The std listener inside (non-blocking).
    pub fn get_ref(&self) -> &unix::UnixListener {
        &self.inner
    }
}

impl AsFd for UnixListener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.as_fd()
    }
}
