//! I/O helpers the NBD server and the replication engine share: both read requests
//! from a socket, answer with header-plus-payload writes, and serve queue-depth-1
//! streams where a thread's wake-up costs as much as the work.

pub mod poll;

use std::io::{self, IoSlice, Write};
use std::os::fd::{AsRawFd, RawFd};

/// Whether `source` has data to read right now (or has hit its end), without waiting.
pub fn readable_now(source: &(impl AsRawFd + ?Sized)) -> bool {
    ready_now(source.as_raw_fd(), libc::POLLIN)
}

/// Whether `sink` takes more data right now, without waiting.
pub fn writable_now(sink: &(impl AsRawFd + ?Sized)) -> bool {
    ready_now(sink.as_raw_fd(), libc::POLLOUT)
}

fn ready_now(fd: RawFd, events: libc::c_short) -> bool {
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    // SAFETY: polls one valid descriptor described by a live struct, without waiting.
    unsafe { libc::poll(&mut p, 1, 0) > 0 }
}

/// Writes every byte of `slices`, in order, with as few system calls as the writer
/// allows.
pub fn write_all_vectored(
    w: &mut (impl Write + ?Sized),
    slices: &mut [IoSlice<'_>],
) -> io::Result<()> {
    let mut rest = slices;
    while !rest.is_empty() {
        match w.write_vectored(rest) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut rest, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    /// A writer that takes at most 3 bytes per call, to exercise the resumption.
    struct Trickle(Vec<u8>);

    impl Write for Trickle {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let n = buf.len().min(3);
            self.0.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn vectored_writes_resume_where_a_short_write_stopped() {
        let mut w = Trickle(Vec::new());
        let (a, b, c) = (b"header".as_slice(), b"".as_slice(), b"payload!".as_slice());
        write_all_vectored(
            &mut w,
            &mut [IoSlice::new(a), IoSlice::new(b), IoSlice::new(c)],
        )
        .unwrap();
        assert_eq!(w.0, b"headerpayload!");
    }

    #[test]
    fn writable_until_the_socket_is_full() {
        let (x, _y) = UnixStream::pair().unwrap();
        x.set_nonblocking(true).unwrap();
        assert!(writable_now(&x));
        while (&x).write(&[0u8; 4096]).is_ok() {}
        assert!(!writable_now(&x), "a full socket takes no more");
    }

    #[test]
    fn readable_only_once_data_arrived() {
        let (mut x, y) = UnixStream::pair().unwrap();
        assert!(!readable_now(&y));
        x.write_all(b"a").unwrap();
        assert!(readable_now(&y));
        let mut b = [0u8; 1];
        (&y).read_exact(&mut b).unwrap();
        assert!(!readable_now(&y));
        drop(x);
        assert!(readable_now(&y), "the end of the stream counts as readable");
    }
}
