//! The reply side of a connection in transmission.
//!
//! Workers write their replies under one lock, waiting as long as the client takes.
//! A write whose result comes later ([`crate::Export::write`]) is answered by the
//! thread that completes it, usually a thread of the export (a replication link's
//! receiver, say) that must never wait for an NBD client: its reply goes out at once
//! if the writer is free and the socket has room, else it is queued, and whoever holds
//! the writer next writes the queue before letting go, or, when the socket is full, a
//! thread of the connection started for that writes it, waiting as long as needed.

use std::cell::Cell;
use std::collections::VecDeque;
use std::io::{self, Write};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, TryLockError};

use crate::conn::Sink;
use crate::reply::Reply;

/// Late replies a connection may owe at once: beyond, its workers read no further
/// request until some are written (the client reads its replies).
pub(crate) const MAX_OWED: usize = 128;

thread_local! {
    /// The thread is one of a connection's workers: it may wait for the client.
    static WORKER: Cell<bool> = const { Cell::new(false) };
}

/// Marks the current thread as a worker of a connection (see [`Replies::late`]).
pub(crate) fn mark_worker() {
    WORKER.with(|w| w.set(true));
}

#[derive(Default)]
struct Late {
    /// Encoded replies waiting for the writer.
    queue: VecDeque<Vec<u8>>,
    /// Late replies promised and not yet written (or dropped, the client being gone).
    owed: usize,
    /// The thread writing queued replies when the socket is full is running.
    flusher: bool,
    /// The socket is full: the flusher is to write the queue.
    stuck: bool,
    /// The connection is over: the flusher ends.
    closed: bool,
    /// A worker waits for fewer late replies to be owed.
    waiting: bool,
}

pub(crate) struct Replies {
    writer: Mutex<Box<dyn Sink>>,
    fd: RawFd,
    late: Mutex<Late>,
    changed: Condvar,
    /// A reply could not be written: the client is gone.
    broken: AtomicBool,
}

impl Replies {
    pub fn new(writer: Box<dyn Sink>) -> Arc<Replies> {
        Arc::new(Replies {
            fd: writer.as_raw_fd(),
            writer: Mutex::new(writer),
            late: Mutex::default(),
            changed: Condvar::new(),
            broken: AtomicBool::new(false),
        })
    }

    pub fn broken(&self) -> bool {
        self.broken.load(Ordering::Acquire)
    }

    /// Writes a reply, waiting for the writer and the client (workers only).
    pub fn send(self: &Arc<Self>, reply: &Reply<'_>) -> io::Result<()> {
        let mut w = self.writer.lock().unwrap();
        let result = reply.send(&mut **w).and_then(|()| w.flush());
        if result.is_err() {
            self.broken.store(true, Ordering::Release);
        }
        self.write_queue(&mut w, true);
        drop(w);
        self.after_unlock();
        result
    }

    /// Promises a late reply: the connection does not end before it is written.
    pub fn owe(&self) {
        self.late.lock().unwrap().owed += 1;
    }

    /// Waits while [`MAX_OWED`] late replies are owed (workers only, before they read
    /// another request).
    pub fn wait_room(&self) {
        let mut late = self.late.lock().unwrap();
        while late.owed >= MAX_OWED {
            late.waiting = true;
            late = self.changed.wait(late).unwrap();
        }
    }

    /// Delivers a late reply promised by [`Replies::owe`], from any thread: a worker
    /// writes it as [`Replies::send`] does, another thread never waits for the client.
    pub fn late(self: &Arc<Self>, reply: &Reply<'_>) {
        let mut bytes = Vec::with_capacity(32);
        let _ = reply.send(&mut bytes);
        self.late.lock().unwrap().queue.push_back(bytes);
        if WORKER.with(|w| w.get()) {
            let mut w = self.writer.lock().unwrap();
            self.write_queue(&mut w, true);
            drop(w);
            self.after_unlock();
        } else {
            self.try_write();
        }
    }

    /// Writes the queue if the writer is free, as far as the socket takes it without
    /// waiting; what it does not take is left to the flusher.
    fn try_write(self: &Arc<Self>) {
        loop {
            let mut w = match self.writer.try_lock() {
                Ok(w) => w,
                Err(TryLockError::Poisoned(e)) => e.into_inner(),
                // The holder writes the queue before it lets go (see `after_unlock`).
                Err(TryLockError::WouldBlock) => return,
            };
            let written = self.write_queue(&mut w, false);
            drop(w);
            if !written {
                self.wake_flusher();
                return;
            }
            if self.late.lock().unwrap().queue.is_empty() {
                return;
            }
            // Replies were queued while the writer was held here: write them too.
        }
    }

    /// After letting go of the writer: replies queued meanwhile by threads that found
    /// it held are written now.
    fn after_unlock(self: &Arc<Self>) {
        if !self.late.lock().unwrap().queue.is_empty() {
            self.try_write();
        }
    }

    /// Writes queued replies; without `wait`, only while the socket has room. Whether
    /// the queue was emptied.
    fn write_queue(&self, w: &mut MutexGuard<'_, Box<dyn Sink>>, wait: bool) -> bool {
        loop {
            if !wait && !tandem_io::writable_now(&self.fd) {
                return false;
            }
            let Some(bytes) = self.late.lock().unwrap().queue.pop_front() else {
                return true;
            };
            if !self.broken() && w.write_all(&bytes).and_then(|()| w.flush()).is_err() {
                self.broken.store(true, Ordering::Release);
            }
            let mut late = self.late.lock().unwrap();
            late.owed -= 1;
            if late.owed == 0 || late.waiting && late.owed < MAX_OWED {
                late.waiting = false;
                self.changed.notify_all();
            }
        }
    }

    /// The socket is full: the flusher (started the first time) writes the queue,
    /// waiting for the client.
    fn wake_flusher(self: &Arc<Self>) {
        let mut late = self.late.lock().unwrap();
        late.stuck = true;
        if late.flusher {
            self.changed.notify_all();
            return;
        }
        let replies = self.clone();
        let spawned = std::thread::Builder::new()
            .name("nbd-replies".into())
            .spawn(move || replies.flush());
        match spawned {
            Ok(_) => late.flusher = true,
            Err(e) => {
                // Nobody else may come to write them: write them here, waiting.
                tracing::error!(error = %e, "cannot start a thread to write NBD replies");
                drop(late);
                let mut w = self.writer.lock().unwrap();
                self.write_queue(&mut w, true);
            }
        }
    }

    fn flush(self: Arc<Self>) {
        let mut late = self.late.lock().unwrap();
        loop {
            if late.stuck {
                late.stuck = false;
                drop(late);
                let mut w = self.writer.lock().unwrap();
                self.write_queue(&mut w, true);
                drop(w);
                self.after_unlock();
                late = self.late.lock().unwrap();
                continue;
            }
            if late.closed {
                late.flusher = false;
                return;
            }
            late = self.changed.wait(late).unwrap();
        }
    }

    /// Waits until every late reply is written (or dropped), then lets the flusher end.
    pub fn close(&self) {
        let mut late = self
            .changed
            .wait_while(self.late.lock().unwrap(), |l| l.owed > 0)
            .unwrap();
        late.closed = true;
        self.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reply::ReplyMode;
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    fn ok(cookie: u64) -> Reply<'static> {
        Reply::new(ReplyMode::Simple, cookie, 0).ok(false)
    }

    /// The cookies of the simple replies read from `r`, `n` of them.
    fn cookies(r: &mut UnixStream, n: usize) -> Vec<u64> {
        let mut got = Vec::new();
        for _ in 0..n {
            let mut b = [0u8; 16];
            r.read_exact(&mut b).unwrap();
            got.push(u64::from_be_bytes(b[8..].try_into().unwrap()));
        }
        got.sort();
        got
    }

    #[test]
    fn late_replies_from_other_threads_all_go_out_before_close() {
        let (ours, mut client) = UnixStream::pair().unwrap();
        let replies = Replies::new(Box::new(ours));
        for _ in 0..3 {
            replies.owe();
        }
        // One while a worker holds the writer: queued, and written by that worker.
        let held = replies.writer.lock().unwrap();
        let r = replies.clone();
        std::thread::spawn(move || r.late(&ok(1))).join().unwrap();
        assert_eq!(replies.late.lock().unwrap().queue.len(), 1);
        drop(held);
        replies.after_unlock();
        // One from another thread, the writer free; one from a worker.
        let r = replies.clone();
        std::thread::spawn(move || r.late(&ok(2))).join().unwrap();
        mark_worker();
        replies.late(&ok(3));
        replies.close();
        assert_eq!(cookies(&mut client, 3), [1, 2, 3]);
    }

    #[test]
    fn a_full_socket_never_holds_up_the_completing_thread() {
        let (ours, mut client) = UnixStream::pair().unwrap();
        let replies = Replies::new(Box::new(ours));
        // Fill the socket until it takes no more without waiting.
        let filler = Reply::new(ReplyMode::Simple, 0, 0).ok(false);
        let mut filled = 0;
        while tandem_io::writable_now(&replies.fd) {
            replies.send(&filler).unwrap();
            filled += 1;
        }
        let n = 200;
        for _ in 0..n {
            replies.owe();
        }
        let r = replies.clone();
        // Returns although nobody reads: the replies wait in the queue.
        std::thread::spawn(move || (0..n).for_each(|c| r.late(&ok(1000 + c as u64))))
            .join()
            .unwrap();
        let reader = std::thread::spawn(move || {
            let mut b = vec![0u8; 16 * filled];
            client.read_exact(&mut b).unwrap();
            cookies(&mut client, n)
        });
        replies.close();
        let got = reader.join().unwrap();
        assert_eq!(got, (0..n).map(|c| 1000 + c as u64).collect::<Vec<_>>());
    }
}
