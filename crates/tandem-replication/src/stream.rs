//! A connection to a peer: plain TCP, or TCP under mutual TLS.
//!
//! With TLS, the session runs in a pump (two threads, see `tandem_tls::spawn_pump`) and
//! the engine reads and writes the plain end of a socket pair, so that one thread can
//! receive while others send, as on plain TCP.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use tandem_io::Timeouts;
use tandem_tls::rustls;

/// Credentials for mutual TLS between peers: both ends present a certificate signed by
/// the cluster's CA and accept only such certificates.
#[derive(Clone)]
pub struct PeerTls {
    pub server: Arc<rustls::ServerConfig>,
    pub client: Arc<rustls::ClientConfig>,
}

impl PeerTls {
    /// Loads the PEM certificate chain and key of this node and the CA that signs every
    /// node's certificate.
    pub fn load(
        cert: &std::path::Path,
        key: &std::path::Path,
        ca: &std::path::Path,
    ) -> Result<PeerTls, tandem_tls::TlsError> {
        Ok(PeerTls {
            server: tandem_tls::server_config(cert, key, Some(ca))?,
            client: tandem_tls::client_config(cert, key, ca)?,
        })
    }
}

pub(crate) enum PeerStream {
    Tcp(TcpStream),
    /// The plain end of a TLS pump; `sock` is the TCP socket under the session.
    Tls {
        plain: UnixStream,
        sock: TcpStream,
    },
}

/// Runs a TLS handshake on `sock` to its end, within the socket's read timeout.
fn handshake(mut conn: rustls::Connection, sock: &mut TcpStream) -> io::Result<rustls::Connection> {
    while conn.is_handshaking() {
        conn.complete_io(sock)?;
    }
    Ok(conn)
}

impl PeerStream {
    /// An accepted connection, under TLS when `tls` is given.
    pub fn accept(mut sock: TcpStream, tls: Option<&PeerTls>) -> io::Result<PeerStream> {
        match tls {
            None => Ok(PeerStream::Tcp(sock)),
            Some(tls) => {
                let conn =
                    rustls::ServerConnection::new(tls.server.clone()).map_err(io::Error::other)?;
                let conn = handshake(conn.into(), &mut sock)?;
                PeerStream::pump(conn, sock)
            }
        }
    }

    /// A dialed connection to `ip`, under TLS when `tls` is given: the peer's
    /// certificate must be signed by the CA and name that address.
    pub fn dial(mut sock: TcpStream, ip: IpAddr, tls: Option<&PeerTls>) -> io::Result<PeerStream> {
        match tls {
            None => Ok(PeerStream::Tcp(sock)),
            Some(tls) => {
                let name = rustls::pki_types::ServerName::IpAddress(ip.into());
                let conn = rustls::ClientConnection::new(tls.client.clone(), name)
                    .map_err(io::Error::other)?;
                let conn = handshake(conn.into(), &mut sock)?;
                PeerStream::pump(conn, sock)
            }
        }
    }

    fn pump(conn: rustls::Connection, sock: TcpStream) -> io::Result<PeerStream> {
        // Replication messages are latency-bound: no Nagle under the session either.
        sock.set_nodelay(true)?;
        // The handshake's time bound must not end the idle session later.
        sock.set_timeouts(None)?;
        let under = sock.try_clone()?;
        let plain = tandem_tls::spawn_pump(conn, sock, "peer")?;
        Ok(PeerStream::Tls { plain, sock: under })
    }

    pub fn try_clone(&self) -> io::Result<PeerStream> {
        Ok(match self {
            PeerStream::Tcp(s) => PeerStream::Tcp(s.try_clone()?),
            PeerStream::Tls { plain, sock } => PeerStream::Tls {
                plain: plain.try_clone()?,
                sock: sock.try_clone()?,
            },
        })
    }

    /// Ends the connection both ways (its reader sees the end).
    pub fn shutdown(&self) -> io::Result<()> {
        match self {
            PeerStream::Tcp(s) => s.shutdown(Shutdown::Both),
            PeerStream::Tls { plain, sock } => {
                let _ = sock.shutdown(Shutdown::Both);
                plain.shutdown(Shutdown::Both)
            }
        }
    }

    pub fn set_nodelay(&self) -> io::Result<()> {
        match self {
            PeerStream::Tcp(s) => s.set_nodelay(true),
            PeerStream::Tls { .. } => Ok(()),
        }
    }
}

impl Timeouts for PeerStream {
    fn set_timeouts(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            PeerStream::Tcp(s) => s.set_timeouts(timeout),
            PeerStream::Tls { plain, .. } => plain
                .set_read_timeout(timeout)
                .and_then(|()| plain.set_write_timeout(timeout)),
        }
    }
}

impl AsRawFd for PeerStream {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            PeerStream::Tcp(s) => s.as_raw_fd(),
            PeerStream::Tls { plain, .. } => plain.as_raw_fd(),
        }
    }
}

impl Read for &PeerStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            PeerStream::Tcp(s) => (&*s).read(buf),
            PeerStream::Tls { plain, .. } => (&*plain).read(buf),
        }
    }
}

impl Read for PeerStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self).read(buf)
    }
}

impl Write for &PeerStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            PeerStream::Tcp(s) => (&*s).write(buf),
            PeerStream::Tls { plain, .. } => (&*plain).write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            PeerStream::Tcp(s) => (&*s).write_vectored(bufs),
            PeerStream::Tls { plain, .. } => (&*plain).write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Write for PeerStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self).write(buf)
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        (&*self).write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
