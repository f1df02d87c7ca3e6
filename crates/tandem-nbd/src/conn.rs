//! The byte streams a connection runs over: TCP, a Unix socket, or TLS on TCP.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use tandem_io::Timeouts;

/// A connection's stream during negotiation.
pub(crate) enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
    Tls(Box<rustls::StreamOwned<rustls::ServerConnection, TcpStream>>),
    /// The stream has moved on (into TLS, or into a session).
    Closed,
}

fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "stream has moved on")
}

/// The two halves of a connection in transmission: one reader, one writer, usable from
/// different threads.
pub(crate) struct Transport {
    pub reader: Box<dyn Source>,
    pub writer: Box<dyn Sink>,
}

/// The read half of a connection; its descriptor tells whether more is waiting.
pub(crate) trait Source: Read + AsRawFd + Send {}

impl<T: Read + AsRawFd + Send> Source for T {}

/// The write half of a connection; its descriptor tells whether it takes more now.
pub(crate) trait Sink: Write + AsRawFd + Send {}

impl<T: Write + AsRawFd + Send> Sink for T {}

impl Conn {
    /// Accepted sockets may inherit non-blocking mode from their listener.
    pub fn set_blocking(&self) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => s.set_nonblocking(false),
            Conn::Unix(s) => s.set_nonblocking(false),
            Conn::Tls(_) | Conn::Closed => Ok(()),
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Conn::Tls(_))
    }

    pub fn is_tcp(&self) -> bool {
        !matches!(self, Conn::Unix(_))
    }

    /// Runs the TLS handshake as server; the caller has already acknowledged STARTTLS.
    pub fn start_tls(self, config: Arc<rustls::ServerConfig>) -> io::Result<Conn> {
        let Conn::Tcp(mut sock) = self else {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "TLS runs on TCP only",
            ));
        };
        let mut tls = rustls::ServerConnection::new(config).map_err(io::Error::other)?;
        while tls.is_handshaking() {
            tls.complete_io(&mut sock)?;
        }
        Ok(Conn::Tls(Box::new(rustls::StreamOwned::new(tls, sock))))
    }

    pub fn into_transport(self) -> io::Result<Transport> {
        // Negotiation is time-bounded; an open export may sit idle as long as it likes.
        self.set_timeouts(None)?;
        Ok(match self {
            Conn::Closed => return Err(closed()),
            Conn::Tcp(s) => {
                s.set_nodelay(true)?;
                Transport {
                    reader: Box::new(s.try_clone()?),
                    writer: Box::new(s),
                }
            }
            Conn::Unix(s) => Transport {
                reader: Box::new(s.try_clone()?),
                writer: Box::new(s),
            },
            Conn::Tls(stream) => {
                let rustls::StreamOwned { conn, sock } = *stream;
                sock.set_nodelay(true)?;
                let plain = tandem_tls::spawn_pump(conn, sock, "nbd")?;
                Transport {
                    reader: Box::new(plain.try_clone()?),
                    writer: Box::new(plain),
                }
            }
        })
    }
}

impl Timeouts for Conn {
    fn set_timeouts(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => s.set_timeouts(timeout),
            Conn::Unix(s) => s
                .set_read_timeout(timeout)
                .and_then(|()| s.set_write_timeout(timeout)),
            Conn::Tls(s) => s.sock.set_timeouts(timeout),
            Conn::Closed => Ok(()),
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.read(buf),
            Conn::Unix(s) => s.read(buf),
            Conn::Tls(s) => s.read(buf),
            Conn::Closed => Err(closed()),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.write(buf),
            Conn::Unix(s) => s.write(buf),
            Conn::Tls(s) => s.write(buf),
            Conn::Closed => Err(closed()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => s.flush(),
            Conn::Unix(s) => s.flush(),
            Conn::Tls(s) => s.flush(),
            Conn::Closed => Err(closed()),
        }
    }
}

/// A second handle on a connection's socket, kept by the server to end the connection
/// from outside (shutdown of the daemon).
pub(crate) enum Socket {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Socket {
    /// Stops the connection from reading further requests; requests already read still
    /// complete and get their replies.
    pub fn stop_reading(&self) {
        let _ = match self {
            Socket::Tcp(s) => s.shutdown(Shutdown::Read),
            Socket::Unix(s) => s.shutdown(Shutdown::Read),
        };
    }
}
