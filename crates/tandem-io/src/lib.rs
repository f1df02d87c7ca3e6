//! I/O helpers the NBD server and the replication engine share: both read requests
//! from a socket, answer with header-plus-payload writes, and serve queue-depth-1
//! streams where a thread's wake-up costs as much as the work.

mod deadline;
mod every;
pub mod poll;

pub use deadline::{Deadline, Timeouts};
pub use every::OncePerSecond;

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

/// Writes what `slices` hold, in order, as far as the socket `fd` takes it right now:
/// never waits for room. Returns how many bytes went (fewer than all when its send
/// buffer filled up). For sockets that other threads read in blocking mode: the
/// descriptor itself stays blocking, only these calls do not.
pub fn send_now(fd: &(impl AsRawFd + ?Sized), slices: &mut [IoSlice<'_>]) -> io::Result<usize> {
    let mut rest = slices;
    let mut sent = 0;
    while !rest.is_empty() {
        // SAFETY: a zeroed msghdr is valid; it points at the live slices (IoSlice is
        // ABI-compatible with iovec) for the duration of the call.
        let n = unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = rest.as_mut_ptr().cast();
            msg.msg_iovlen = rest.len().min(libc::UIO_MAXIOV as usize) as _;
            libc::sendmsg(
                fd.as_raw_fd(),
                &msg,
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => break,
                _ => return Err(e),
            }
        }
        let n = n as usize;
        sent += n;
        IoSlice::advance_slices(&mut rest, n);
    }
    Ok(sent)
}

/// Bounds how long a TCP connection to a peer that vanished (a pulled cable, a dead
/// host) lives, in the kernel: data left unacknowledged for `timeout` ends it
/// (`TCP_USER_TIMEOUT`), and an idle connection is probed every second after a second
/// of silence (keepalive), so a half-open connection dies within seconds rather than
/// the kernel's default of many minutes.
pub fn bound_tcp_liveness(
    sock: &(impl AsRawFd + ?Sized),
    timeout: std::time::Duration,
) -> io::Result<()> {
    let fd = sock.as_raw_fd();
    let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
    let probes = (timeout.as_secs() as libc::c_int).clamp(1, 10);
    for (level, name, value) in [
        (libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1),
        (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 1),
        (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 1),
        (libc::IPPROTO_TCP, libc::TCP_KEEPCNT, probes),
        (libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, ms),
    ] {
        // SAFETY: sets an integer option on a valid descriptor.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
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
    fn send_now_stops_where_the_socket_is_full_and_never_waits() {
        let (x, y) = UnixStream::pair().unwrap();
        let big = vec![7u8; 16 << 20];
        let head = b"head".as_slice();
        let sent = send_now(&x, &mut [IoSlice::new(head), IoSlice::new(&big)]).unwrap();
        assert!(
            sent > head.len() && sent < head.len() + big.len(),
            "sent {sent}"
        );
        assert_eq!(send_now(&x, &mut [IoSlice::new(b"more")]).unwrap(), 0);
        // The descriptor itself still blocks for readers and other writers.
        let mut got = vec![0u8; 4];
        (&y).read_exact(&mut got).unwrap();
        assert_eq!(got, b"head");
    }

    #[test]
    fn tcp_liveness_bounds_are_accepted() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let s = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        bound_tcp_liveness(&s, std::time::Duration::from_secs(5)).unwrap();
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
