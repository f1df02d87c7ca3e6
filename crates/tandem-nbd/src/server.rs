//! Listeners, connection threads, and orderly shutdown.

use std::collections::HashMap;
use std::io;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::conn::{Conn, Socket};
use crate::export::Catalog;
use crate::handshake::{self, Ending, TlsPolicy};
use crate::transmission;

/// An NBD server over a catalog of exports. Listeners and connections run on their own
/// threads; [`Server::shutdown`] stops them all.
///
/// What a client can hold: at most `max_connections` connections at once (more are
/// closed as soon as accepted, counted in [`Server::refused`]); a connection is one
/// thread, plus up to 16 workers while its requests keep them busy; one that has not
/// chosen an export within 10 s is dropped.
pub struct Server {
    inner: Arc<Inner>,
}

struct Inner {
    catalog: Arc<dyn Catalog>,
    /// Sockets of live connections, to stop them from outside.
    conns: Mutex<HashMap<u64, Socket>>,
    drained: Condvar,
    next_id: AtomicU64,
    max_connections: usize,
    refused: AtomicU64,
    /// A flood logs one line a second.
    refusal_logged: tandem_io::OncePerSecond,
    /// Becomes readable when the server stops; wakes every accept loop.
    stop: OwnedFd,
}

impl Server {
    pub fn new(catalog: Arc<dyn Catalog>, max_connections: usize) -> io::Result<Server> {
        // SAFETY: eventfd returns a new descriptor we own, or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh, valid descriptor.
        let stop = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Server {
            inner: Arc::new(Inner {
                catalog,
                conns: Mutex::default(),
                drained: Condvar::new(),
                next_id: AtomicU64::new(1),
                max_connections,
                refused: AtomicU64::new(0),
                refusal_logged: Default::default(),
                stop,
            }),
        })
    }

    /// Serves NBD on a TCP listener.
    pub fn serve_tcp(&self, listener: TcpListener, tls: TlsPolicy) -> io::Result<JoinHandle<()>> {
        self.accept_loop("nbd-accept-tcp", listener, move |l| {
            let (stream, peer) = l.accept()?;
            Ok((
                Socket::Tcp(stream.try_clone()?),
                Conn::Tcp(stream),
                peer.to_string(),
                tls.clone(),
            ))
        })
    }

    /// Serves NBD on a Unix socket listener (never TLS: the socket's permissions guard it).
    pub fn serve_unix(&self, listener: UnixListener) -> io::Result<JoinHandle<()>> {
        self.accept_loop("nbd-accept-unix", listener, |l| {
            let (stream, _) = l.accept()?;
            Ok((
                Socket::Unix(stream.try_clone()?),
                Conn::Unix(stream),
                "unix".into(),
                TlsPolicy::Off,
            ))
        })
    }

    fn accept_loop<L: Listener>(
        &self,
        name: &str,
        listener: L,
        mut accept: impl FnMut(&L) -> io::Result<(Socket, Conn, String, TlsPolicy)> + Send + 'static,
    ) -> io::Result<JoinHandle<()>> {
        // Non-blocking, so a client that vanishes between poll and accept cannot stall it.
        listener.set_nonblocking(true)?;
        let inner = self.inner.clone();
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                while inner.wait_readable(listener.as_raw_fd()) {
                    match accept(&listener) {
                        Ok((socket, conn, peer, tls)) => inner.start(conn, socket, peer, tls),
                        Err(e) => accept_error(e),
                    }
                }
            })
    }

    /// Stops accepting, lets every connection finish the requests it has read, and waits
    /// (up to `grace`) for all of them to close. Returns false if some did not in time.
    pub fn shutdown(&self, grace: Duration) -> bool {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our eventfd.
        unsafe { libc::write(self.inner.stop.as_raw_fd(), (&one as *const u64).cast(), 8) };
        let conns = self.inner.conns.lock().unwrap();
        for socket in conns.values() {
            socket.stop_reading();
        }
        let (conns, timeout) = self
            .inner
            .drained
            .wait_timeout_while(conns, grace, |c| !c.is_empty())
            .unwrap();
        if timeout.timed_out() {
            tracing::warn!(
                connections = conns.len(),
                "NBD connections still busy at shutdown"
            );
        }
        !timeout.timed_out()
    }

    /// Number of open client connections.
    pub fn connections(&self) -> usize {
        self.inner.conns.lock().unwrap().len()
    }

    /// Client connections accepted since the server started.
    pub fn accepted(&self) -> u64 {
        self.inner.next_id.load(Ordering::Relaxed) - 1
    }

    /// Client connections closed at once since the server started: the server held
    /// `max_connections` already.
    pub fn refused(&self) -> u64 {
        self.inner.refused.load(Ordering::Relaxed)
    }
}

/// The listeners NBD is served on.
trait Listener: AsRawFd + Send + 'static {
    fn set_nonblocking(&self, on: bool) -> io::Result<()>;
}

impl Listener for TcpListener {
    fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        TcpListener::set_nonblocking(self, on)
    }
}

impl Listener for UnixListener {
    fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        UnixListener::set_nonblocking(self, on)
    }
}

fn accept_error(e: io::Error) {
    match e.kind() {
        io::ErrorKind::WouldBlock
        | io::ErrorKind::Interrupted
        | io::ErrorKind::ConnectionAborted => {}
        _ => {
            tracing::error!(error = %e, "accept failed");
            // Out of descriptors or memory: back off instead of spinning.
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Inner {
    /// Waits until `fd` can be accepted from; false once the server is stopping.
    fn wait_readable(&self, fd: RawFd) -> bool {
        let mut fds = [
            libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        loop {
            // SAFETY: polls two valid descriptors described by a live array.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if rc < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return fds[1].revents == 0;
        }
    }

    fn start(self: &Arc<Self>, conn: Conn, socket: Socket, peer: String, tls: TlsPolicy) {
        if let Err(e) = conn.set_blocking() {
            return tracing::error!(peer, error = %e, "cannot set up the connection");
        }
        let mut conns = self.conns.lock().unwrap();
        if conns.len() >= self.max_connections {
            drop(conns);
            return self.refuse(&peer);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        conns.insert(id, socket);
        drop(conns);
        let inner = self.clone();
        let spawned = std::thread::Builder::new()
            .name("nbd-conn".into())
            .spawn(move || {
                inner.connection(conn, &peer, tls);
                let mut conns = inner.conns.lock().unwrap();
                conns.remove(&id);
                if conns.is_empty() {
                    inner.drained.notify_all();
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start a connection thread");
            self.conns.lock().unwrap().remove(&id);
        }
    }

    /// A connection over the limit is closed (its socket dropped by the caller) before
    /// anything is said: NBD has no way to refuse one politely before negotiation.
    fn refuse(&self, peer: &str) {
        let refused = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
        if self.refusal_logged.due() {
            tracing::warn!(
                peer,
                limit = self.max_connections,
                refused,
                "NBD connection refused: the server holds as many connections as it takes"
            );
        }
    }

    fn connection(&self, conn: Conn, peer: &str, tls: TlsPolicy) {
        let session = match handshake::negotiate(conn, &*self.catalog, tls) {
            Ok(s) => s,
            Err(Ending::Left) => return tracing::debug!(peer, "client left during negotiation"),
            Err(Ending::Dropped(why)) => return tracing::warn!(peer, %why, "NBD negotiation ended"),
            Err(Ending::Io(e)) => {
                return tracing::debug!(peer, error = %e, "NBD negotiation failed");
            }
        };
        let (conn, session) = (session.conn, session.negotiated);
        tracing::info!(peer, export = %session.name, mode = ?session.mode, tls = conn.is_tls(),
            "NBD client connected");
        match conn.into_transport() {
            Ok(transport) => transmission::run(&session, transport, peer),
            Err(e) => tracing::error!(peer, error = %e, "cannot set up the connection"),
        }
        tracing::info!(peer, export = %session.name, "NBD client disconnected");
    }
}
