//! The sending side of one peer connection. Whoever sends (a client's request, the
//! ticker's ping, a receiver's answer) never waits for the socket: a message goes out
//! at once when the socket takes it, and otherwise what it could not take waits in a
//! queue that a sender thread of the connection writes. So a peer that stops reading (a
//! pulled cable, a frozen host) fills its own queue and stalls nobody else; a queue
//! that outgrows its bound closes the connection, as does a failed write.
//!
//! Messages never interleave: at most one thread writes at a time (`writing`), and
//! what is queued goes out in order after the bytes already on their way.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use crate::locks::Locked;
use crate::stream::PeerStream;
use crate::wire::{HEADER_LEN, Header};

/// Bytes a connection may hold queued for its peer: a few seconds of a fast link. A
/// peer further behind is not keeping up with synchronous replication.
pub(crate) const MAX_QUEUED: usize = 256 << 20;

/// Why a message was not sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unsent {
    /// The connection is closed (or closing).
    Closed,
    /// The queue would outgrow [`MAX_QUEUED`]: the connection is closed.
    Overflow,
}

impl From<Unsent> for io::Error {
    fn from(u: Unsent) -> io::Error {
        match u {
            Unsent::Closed => io::Error::new(io::ErrorKind::NotConnected, "peer not connected"),
            Unsent::Overflow => io::Error::new(
                io::ErrorKind::WouldBlock,
                "peer is not keeping up: its send queue is full",
            ),
        }
    }
}

#[derive(Default)]
struct State {
    /// Messages (or the tail of one) waiting for the sender thread, in order.
    queue: VecDeque<Vec<u8>>,
    queued: usize,
    /// A thread is writing to the socket: nobody else may.
    writing: bool,
    sender_started: bool,
    closed: bool,
}

pub(crate) struct Outbox {
    stream: PeerStream,
    /// Names the sender thread.
    peer: String,
    limit: usize,
    state: Mutex<State>,
    wake: Condvar,
}

impl Outbox {
    /// Sends on `stream` (a handle of the connection's own); `peer` names it in logs.
    pub fn new(stream: PeerStream, peer: String) -> Arc<Outbox> {
        Outbox::with_limit(stream, peer, MAX_QUEUED)
    }

    fn with_limit(stream: PeerStream, peer: String, limit: usize) -> Arc<Outbox> {
        Arc::new(Outbox {
            stream,
            peer,
            limit,
            state: Mutex::default(),
            wake: Condvar::new(),
        })
    }

    /// Sends a message without waiting: written now as far as the socket takes it, the
    /// rest queued for the sender thread.
    pub fn send(self: &Arc<Self>, header: &Header, payload: &[u8]) -> Result<(), Unsent> {
        debug_assert_eq!(header.payload as usize, payload.len());
        let head = header.encode();
        let total = HEADER_LEN + payload.len();
        let mut s = self.state.locked();
        if s.closed {
            return Err(Unsent::Closed);
        }
        if s.writing || !s.queue.is_empty() {
            return self.enqueue(s, &head, payload);
        }
        s.writing = true;
        drop(s);
        let sent = tandem_io::send_now(
            &self.stream,
            &mut [IoSlice::new(&head), IoSlice::new(payload)],
        );
        let mut s = self.state.locked();
        s.writing = false;
        match sent {
            Ok(_) if s.closed => Err(Unsent::Closed),
            Ok(n) if n == total => {
                if !s.queue.is_empty() {
                    // Queued behind this one while it went out.
                    self.kick(s);
                }
                Ok(())
            }
            Ok(n) => {
                // The rest goes first: it is the tail of a message already started.
                let mut rest = Vec::with_capacity(total - n);
                if n < HEADER_LEN {
                    rest.extend_from_slice(&head[n..]);
                    rest.extend_from_slice(payload);
                } else {
                    rest.extend_from_slice(&payload[n - HEADER_LEN..]);
                }
                s.queued += rest.len();
                s.queue.push_front(rest);
                self.kick(s);
                Ok(())
            }
            Err(e) => {
                tracing::debug!(peer = %self.peer, error = %e, "peer send failed; closing the connection");
                drop(s);
                self.close();
                Err(Unsent::Closed)
            }
        }
    }

    fn enqueue(
        self: &Arc<Self>,
        mut s: MutexGuard<'_, State>,
        head: &[u8],
        payload: &[u8],
    ) -> Result<(), Unsent> {
        let total = head.len() + payload.len();
        if s.queued + total > self.limit {
            let queued = s.queued;
            drop(s);
            tracing::warn!(peer = %self.peer, queued, "peer is not keeping up; closing the connection");
            self.close();
            return Err(Unsent::Overflow);
        }
        let mut message = Vec::with_capacity(total);
        message.extend_from_slice(head);
        message.extend_from_slice(payload);
        s.queued += total;
        s.queue.push_back(message);
        self.kick(s);
        Ok(())
    }

    /// Makes the sender thread take the queue, starting it the first time.
    fn kick(self: &Arc<Self>, mut s: MutexGuard<'_, State>) {
        if s.sender_started {
            drop(s);
            self.wake.notify_one();
            return;
        }
        s.sender_started = true;
        drop(s);
        let outbox = self.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("peer-send-{}", self.peer))
            .spawn(move || outbox.sender());
        if let Err(e) = spawned {
            tracing::error!(peer = %self.peer, error = %e, "cannot start a peer sender; closing the connection");
            self.close();
        }
    }

    /// The sender thread: writes what is queued, in order, waiting on the socket as
    /// long as it takes (a write that never ends ends with [`Outbox::close`]).
    fn sender(&self) {
        loop {
            let mut s = self.state.locked();
            while !s.closed && (s.writing || s.queue.is_empty()) {
                s = crate::locks::wait(&self.wake, s);
            }
            if s.closed {
                return;
            }
            let message = s.queue.pop_front().expect("queue not empty");
            s.writing = true;
            drop(s);
            let result =
                tandem_io::write_all_vectored(&mut &self.stream, &mut [IoSlice::new(&message)]);
            let mut s = self.state.locked();
            s.writing = false;
            if s.closed {
                return;
            }
            s.queued -= message.len();
            if let Err(e) = result {
                drop(s);
                tracing::debug!(peer = %self.peer, error = %e, "peer send failed; closing the connection");
                self.close();
                return;
            }
        }
    }

    /// Bytes waiting to be sent.
    pub fn queued(&self) -> usize {
        self.state.locked().queued
    }

    /// Ends the connection both ways: a sender blocked in a write returns, the receiver
    /// sees the end. What is queued is dropped. Never waits.
    pub fn close(&self) {
        {
            let mut s = self.state.locked();
            s.closed = true;
            s.queue.clear();
            s.queued = 0;
        }
        self.wake.notify_all();
        let _ = self.stream.shutdown();
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{self, Kind};
    use std::io::Read;
    use std::net::{TcpListener, TcpStream};
    use std::time::{Duration, Instant};

    fn pair() -> (PeerStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        (PeerStream::Tcp(a), b)
    }

    fn write(id: u64, len: usize) -> (Header, Vec<u8>) {
        let mut h = Header::new(Kind::Write, id);
        h.length = len as u64;
        h.payload = len as u32;
        (h, vec![id as u8; len])
    }

    #[test]
    fn a_peer_that_stops_reading_never_blocks_a_sender() {
        let (a, b) = pair();
        let outbox = Outbox::new(a, "b".into());
        // Far more than the socket buffers hold; b reads nothing.
        let started = Instant::now();
        for id in 0..16 {
            let (h, p) = write(id, 4 << 20);
            outbox.send(&h, &p).unwrap();
        }
        outbox.send(&Header::new(Kind::Ping, 0), &[]).unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "sending took {:?}",
            started.elapsed()
        );
        assert!(outbox.queued() > 0, "the socket cannot have taken 64 MiB");
        // Then it reads: every message arrives whole, in order.
        let mut r = std::io::BufReader::new(b);
        for id in 0..16 {
            let h = wire::read_header(&mut r).unwrap();
            assert_eq!((h.kind, h.id), (Kind::Write, id));
            let p = wire::read_payload(&mut r, h.payload).unwrap();
            assert!(p.iter().all(|x| *x == id as u8), "message {id} garbled");
        }
        assert_eq!(wire::read_header(&mut r).unwrap().kind, Kind::Ping);
    }

    #[test]
    fn an_overflowing_queue_closes_the_connection() {
        let (a, mut b) = pair();
        let outbox = Outbox::with_limit(a, "b".into(), 8 << 20);
        let mut refused = None;
        for id in 0..64 {
            let (h, p) = write(id, 1 << 20);
            if let Err(e) = outbox.send(&h, &p) {
                refused = Some(e);
                break;
            }
        }
        assert_eq!(refused, Some(Unsent::Overflow));
        assert_eq!(
            outbox.send(&Header::new(Kind::Ping, 0), &[]),
            Err(Unsent::Closed)
        );
        // The peer sees the end of the stream after whatever had gone out.
        let mut sink = Vec::new();
        b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        b.read_to_end(&mut sink).unwrap();
    }

    #[test]
    fn close_ends_a_sender_blocked_in_a_write() {
        let (a, _b) = pair();
        let outbox = Outbox::new(a, "b".into());
        for id in 0..8 {
            let (h, p) = write(id, 4 << 20);
            outbox.send(&h, &p).unwrap();
        }
        let started = Instant::now();
        outbox.close();
        assert!(started.elapsed() < Duration::from_millis(500));
        assert_eq!(outbox.queued(), 0);
        let (h, p) = write(99, 10);
        assert_eq!(outbox.send(&h, &p), Err(Unsent::Closed));
    }
}
