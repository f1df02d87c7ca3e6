//! A stream whose reads and writes must all be done by a deadline: a handshake that
//! the other side may not stretch by trickling bytes, as it could if each read only
//! had a timeout of its own.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// A stream that can bound how long each read and write waits.
pub trait Timeouts {
    /// `None`: forever.
    fn set_timeouts(&self, timeout: Option<Duration>) -> io::Result<()>;
}

impl Timeouts for TcpStream {
    fn set_timeouts(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(timeout)?;
        self.set_write_timeout(timeout)
    }
}

/// `stream`, each read and write bounded by what is left until `started + limit`;
/// past it, they fail with `TimedOut`, naming `what`.
pub struct Deadline<'a, S> {
    stream: &'a mut S,
    at: Instant,
    limit: Duration,
    what: &'static str,
}

impl<'a, S: Timeouts> Deadline<'a, S> {
    pub fn new(stream: &'a mut S, started: Instant, limit: Duration, what: &'static str) -> Self {
        Deadline {
            stream,
            at: started + limit,
            limit,
            what,
        }
    }

    /// Sets the stream's timeouts to the time left (for work done on it directly,
    /// such as a TLS handshake).
    pub fn arm(&mut self) -> io::Result<()> {
        let left = self.at.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{} took longer than {:?}", self.what, self.limit),
            ));
        }
        self.stream.set_timeouts(Some(left))
    }
}

impl<S: Read + Timeouts> Read for Deadline<'_, S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.arm()?;
        self.stream.read(buf)
    }
}

impl<S: Write + Timeouts> Write for Deadline<'_, S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.arm()?;
        self.stream.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.arm()?;
        self.stream.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn a_trickle_does_not_stretch_the_deadline() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        let trickle = std::thread::spawn(move || {
            for _ in 0..20 {
                if client.write_all(&[1]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let started = Instant::now();
        let mut timed = Deadline::new(&mut server, started, Duration::from_millis(300), "a test");
        let mut buf = [0u8; 20];
        let err = timed.read_exact(&mut buf).unwrap_err();
        let took = started.elapsed();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
        assert!(
            err.to_string().contains("a test took longer than 300ms"),
            "{err}"
        );
        assert!(took < Duration::from_millis(600), "{took:?}");
        drop(server);
        trickle.join().unwrap();
    }
}
