//! The transmission phase: requests in, replies out, many in flight.
//!
//! Worker threads share the connection the way nbdkit's parallel model does: a worker
//! takes the reader lock, reads one request with its payload, lets go, performs the
//! request and writes the reply under the writer lock. At queue depth 1 the same thread
//! reads, does the I/O and replies, with no hand-off; at depth N up to `MAX_WORKERS`
//! requests run at once and replies go out as they finish, out of order. A new worker
//! is started only when a request arrives and nobody is left waiting for the next one.
//!
//! A write may complete later ([`Export::write`]): the worker moves on to the next
//! request, and the thread that completes the write sends its reply (see `replies`).

use std::io::{self, BufReader, Read};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::Scope;
use std::time::Duration;

use tandem_io::poll::Cadence;

use crate::buf::AlignedBuf;
use crate::conn::{Source, Transport};
use crate::export::{Export, Extent, WriteDone, ZeroMode};
use crate::handshake::Negotiated;
use crate::proto::*;
use crate::replies::{self, Replies};
use crate::reply::{Reply, ReplyMode};

const MAX_WORKERS: usize = 16;
/// Reads at least this long send holes as holes (see [`Connection::read`]).
const HOLE_MIN: u64 = 64 << 10;
/// How long a worker serving a connection at queue depth 1 polls for the client's
/// next request before it sleeps (see [`tandem_io::poll`]): a client issuing one
/// request at a time sends the next within microseconds of its reply; a connection
/// is hot while its requests come less than this apart.
const NEXT_REQUEST_POLL: Duration = Duration::from_micros(200);
/// How long a write's data, not there yet after its header, is polled for.
const PAYLOAD_POLL: Duration = Duration::from_micros(200);

#[derive(Debug, Clone, Copy)]
struct Request {
    cookie: u64,
    kind: u16,
    flags: u16,
    offset: u64,
    /// Effect length (bytes to read, write, zero, ...).
    len: u64,
}

/// Why reading requests stopped.
enum Stop {
    /// The client sent DISC or closed its end.
    Done,
    /// The stream cannot be trusted any more; the reason is logged.
    Violation(String),
    /// The stream ended inside a request (client gone, or the server stopping).
    Lost(&'static str),
    Io(io::Error),
}

struct Reader {
    stream: BufReader<Box<dyn Source>>,
    stopped: bool,
}

impl Reader {
    /// Whether another request has (at least partly) arrived already.
    fn more_waiting(&self) -> bool {
        !self.stream.buffer().is_empty() || tandem_io::readable_now(&**self.stream.get_ref())
    }

    /// Reads the next request, and its payload into `buf`.
    fn next_request(
        &mut self,
        mode: ReplyMode,
        buf: &mut AlignedBuf,
    ) -> Result<(Request, usize), Stop> {
        let r = &mut self.stream;
        let extended = mode == ReplyMode::Extended;
        let mut head = [0u8; 32];
        let head = if extended {
            &mut head[..]
        } else {
            &mut head[..28]
        };
        match r.read_exact(&mut head[..1]) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(Stop::Done),
            Err(e) => return Err(Stop::Io(e)),
        }
        r.read_exact(&mut head[1..]).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => Stop::Lost("connection closed inside a request header"),
            _ => Stop::Io(e),
        })?;
        let req = decode_request(head, extended).map_err(Stop::Violation)?;
        if req.kind == CMD_DISC {
            return Err(Stop::Done);
        }
        // A WRITE always carries its data (QEMU does not set PAYLOAD_LEN on it); with
        // extended headers any other command may carry a payload announced by PAYLOAD_LEN.
        let payload = if req.kind == CMD_WRITE || extended && req.flags & CF_PAYLOAD_LEN != 0 {
            req.len
        } else {
            0
        };
        if payload > MAX_PAYLOAD as u64 {
            return Err(Stop::Violation(format!(
                "request payload of {payload} bytes exceeds 32 MiB"
            )));
        }
        // Clients send a write's header and its data in separate calls: the data is due
        // at once, so it is polled for rather than slept for (a wake-up costs more).
        if payload > 0 {
            tandem_io::poll::poll_until(PAYLOAD_POLL, || self.more_waiting());
        }
        self.stream
            .read_exact(buf.get(payload as usize))
            .map_err(|e| match e.kind() {
                io::ErrorKind::UnexpectedEof => {
                    Stop::Lost("connection closed inside a write payload")
                }
                _ => Stop::Io(e),
            })?;
        Ok((req, payload as usize))
    }
}

struct Connection<'s> {
    session: &'s Negotiated,
    reader: Mutex<Reader>,
    replies: Arc<Replies>,
    /// The export's name, for messages from threads that outlive a request.
    export: Arc<str>,
    /// Workers waiting for the reader lock, and workers alive.
    idle: AtomicUsize,
    workers: AtomicUsize,
    broken: AtomicBool,
}

/// Serves requests until the client disconnects; every request read gets its reply
/// before this returns.
pub(crate) fn run(session: &Negotiated, transport: Transport, peer: &str) {
    let conn = Connection {
        session,
        reader: Mutex::new(Reader {
            stream: BufReader::with_capacity(64 << 10, transport.reader),
            stopped: false,
        }),
        replies: Replies::new(transport.writer),
        export: session.name.as_str().into(),
        idle: AtomicUsize::new(0),
        workers: AtomicUsize::new(1),
        broken: AtomicBool::new(false),
    };
    std::thread::scope(|scope| conn.worker(scope, peer));
    conn.replies.close();
}

impl<'s> Connection<'s> {
    fn worker<'scope>(&'scope self, scope: &'scope Scope<'scope, '_>, peer: &'scope str) {
        replies::mark_worker();
        let mut buf = AlignedBuf::new();
        // The reader lock, when this worker keeps it while serving a request.
        let mut kept: Option<MutexGuard<'_, Reader>> = None;
        // Whether requests follow their replies closely (queue depth 1): then this
        // worker polls for the next one before it sleeps in the read.
        let mut cadence = Cadence::new(NEXT_REQUEST_POLL);
        loop {
            // A worker counts as idle until it holds a request: also while it sits in
            // read() under the lock, so a request in flight does not look like a
            // shortage of workers.
            self.replies.wait_room();
            self.idle.fetch_add(1, Ordering::AcqRel);
            let polled = kept
                .as_ref()
                .is_some_and(|r| cadence.poll(|| r.more_waiting()));
            let mut reader = kept.take().unwrap_or_else(|| self.reader.lock().unwrap());
            if reader.stopped {
                self.idle.fetch_sub(1, Ordering::AcqRel);
                break;
            }
            let mode = self.session.mode;
            let next = if polled {
                reader.next_request(mode, &mut buf)
            } else {
                cadence.sleep(|| reader.next_request(mode, &mut buf))
            };
            self.idle.fetch_sub(1, Ordering::AcqRel);
            let (req, payload_len) = match next {
                Ok(r) => r,
                Err(stop) => {
                    reader.stopped = true;
                    match stop {
                        Stop::Done => tracing::debug!(peer, "client ended the session"),
                        Stop::Violation(why) => {
                            tracing::warn!(peer, export = %self.session.name, %why,
                            "closing NBD connection: protocol violation")
                        }
                        Stop::Lost(why) => {
                            tracing::debug!(peer, why, "NBD connection lost mid-request")
                        }
                        Stop::Io(e) => tracing::debug!(peer, error = %e, "NBD connection lost"),
                    }
                    break;
                }
            };
            if reader.more_waiting() {
                // Requests are queued: let another worker read on while this one serves.
                drop(reader);
                if self.idle.load(Ordering::Acquire) == 0
                    && self.workers.load(Ordering::Acquire) < MAX_WORKERS
                {
                    self.workers.fetch_add(1, Ordering::AcqRel);
                    scope.spawn(move || self.worker(scope, peer));
                }
            } else {
                // Nothing else has arrived (queue depth 1): this worker reads the next
                // request itself, sparing a wake-up of another thread per request.
                kept = Some(reader);
            }
            let served = self.serve(&req, payload_len, &mut buf).and_then(|()| {
                if self.replies.broken() {
                    return Err(io::Error::other("a reply could not be written"));
                }
                Ok(())
            });
            if let Err(e) = served {
                if !self.broken.swap(true, Ordering::AcqRel) {
                    tracing::debug!(peer, error = %e, "cannot send reply; client gone");
                }
                match kept.as_mut() {
                    Some(reader) => reader.stopped = true,
                    None => self.reader.lock().unwrap().stopped = true,
                }
                break;
            }
            buf.trim();
        }
        self.workers.fetch_sub(1, Ordering::AcqRel);
    }

    fn send(&self, reply: &Reply<'_>) -> io::Result<()> {
        self.replies.send(reply)
    }

    /// Performs one request and sends its reply.
    fn serve(&self, req: &Request, payload_len: usize, buf: &mut AlignedBuf) -> io::Result<()> {
        let mode = self.session.mode;
        let reply = Reply::new(mode, req.cookie, req.offset);
        if let Err((errno, msg)) = self.check(req) {
            tracing::debug!(cookie = req.cookie, kind = req.kind, ?errno, %msg, "request refused");
            return self.send(&reply.error(errno, &msg));
        }
        let export = &*self.session.export;
        let fua = req.flags & CF_FUA != 0;
        let result = match req.kind {
            CMD_READ => return self.read(req, buf),
            CMD_BLOCK_STATUS => return self.block_status(req),
            _ if req.len == 0 && req.kind != CMD_FLUSH => Ok(()),
            CMD_WRITE => {
                let done = self.late_reply(req);
                export.write(req.offset, buf.get(payload_len), fua, done);
                return Ok(());
            }
            CMD_FLUSH => export.flush(),
            CMD_TRIM => export.trim(req.offset, req.len, fua),
            CMD_CACHE => export.cache(req.offset, req.len),
            CMD_WRITE_ZEROES => {
                let mode = ZeroMode {
                    may_punch: req.flags & CF_NO_HOLE == 0,
                    fast_only: req.flags & CF_FAST_ZERO != 0,
                };
                export.write_zeroes(req.offset, req.len, mode, fua)
            }
            _ => unreachable!("check() refuses unknown commands"),
        };
        self.send(&outcome_reply(mode, req, &self.session.name, result))
    }

    /// Where a write's result goes when the export delivers it: its reply, sent by
    /// whichever thread that is. Dropped uncalled, it replies with an I/O error.
    fn late_reply(&self, req: &Request) -> WriteDone {
        self.replies.owe();
        let mut late = LateReply {
            replies: self.replies.clone(),
            export: self.export.clone(),
            mode: self.session.mode,
            req: *req,
            sent: false,
        };
        Box::new(move |result| late.send(result))
    }

    /// Validates a request against the protocol and the export; the error to reply with.
    fn check(&self, req: &Request) -> Result<(), (Errno, String)> {
        let s = self.session;
        check_request(
            req,
            &Terms {
                name: &s.name,
                mode: s.mode,
                flags: s.flags,
                size: s.export.size(),
                contexts: !s.contexts.is_empty(),
            },
        )
    }

    fn read(&self, req: &Request, buf: &mut AlignedBuf) -> io::Result<()> {
        let mode = self.session.mode;
        let export = &*self.session.export;
        let data = buf.get(req.len as usize);
        let mut reply = Reply::new(mode, req.cookie, req.offset);
        if data.is_empty() {
            return self.send(&reply.ok(true));
        }
        // Holes go out as OFFSET_HOLE chunks, unless the client wants one chunk (DF) or
        // cannot take chunks at all, or the read is small: asking where the holes are
        // costs a system call, which only large reads of sparse data repay.
        let map = if mode == ReplyMode::Simple || req.flags & CF_DF != 0 || req.len < HOLE_MIN {
            None
        } else {
            covering_extents(export, req.offset, req.len).ok()
        };
        let result = match map {
            Some(map) if map.len() > 1 || map[0].hole => {
                let mut at = 0usize;
                let mut chunks = Vec::with_capacity(map.len());
                let mut failed = None;
                for e in &map {
                    let range = at..at + e.len as usize;
                    if !e.hole && failed.is_none() {
                        failed = export
                            .read(req.offset + at as u64, &mut data[range.clone()])
                            .err();
                    }
                    chunks.push((range, e.hole));
                    at += e.len as usize;
                }
                match failed {
                    Some(e) => Err(e),
                    None => {
                        let last = chunks.len() - 1;
                        let data = &*data;
                        for (i, (range, hole)) in chunks.into_iter().enumerate() {
                            let offset = req.offset + range.start as u64;
                            if hole {
                                push_hole(&mut reply, offset, range.len() as u64, i == last);
                            } else {
                                reply.data(offset, &data[range], i == last);
                            }
                        }
                        Ok(())
                    }
                }
            }
            _ => export
                .read(req.offset, data)
                .map(|()| reply.data(req.offset, data, true)),
        };
        match result {
            Ok(()) => self.send(&reply),
            Err(e) => {
                tracing::warn!(export = %self.session.name, offset = req.offset, len = req.len,
                    error = %e, "read failed");
                let reply = Reply::new(mode, req.cookie, req.offset);
                self.send(&reply.error(Errno::from_io(&e), &e.to_string()))
            }
        }
    }

    /// One chunk per meta context the client selected, each with the context's runs.
    fn block_status(&self, req: &Request) -> io::Result<()> {
        let s = self.session;
        let descriptors = |context: &str| -> io::Result<Vec<(u64, u32)>> {
            let mut runs: Vec<(u64, u32)> = if context == BASE_ALLOCATION {
                (merge(s.export.extents(req.offset, req.len)?).into_iter())
                    .map(|e| (e.len, if e.hole { STATE_HOLE | STATE_ZERO } else { 0 }))
                    .collect()
            } else {
                s.export.context_extents(context, req.offset, req.len)?
            };
            if req.flags & CF_REQ_ONE != 0 {
                runs.truncate(1);
            }
            if s.mode != ReplyMode::Extended {
                // 32-bit descriptor lengths; the request length is 32-bit too.
                for d in &mut runs {
                    d.0 = d.0.min(u32::MAX as u64 & !4095);
                }
            }
            Ok(runs)
        };
        let answers: io::Result<Vec<(u32, Vec<(u64, u32)>)>> = (s.contexts.iter())
            .map(|(id, context)| Ok((*id, descriptors(context)?)))
            .collect();
        let mut reply = Reply::new(s.mode, req.cookie, req.offset);
        match answers {
            Ok(answers) => {
                let last = answers.len() - 1;
                for (i, (id, runs)) in answers.iter().enumerate() {
                    reply = reply.block_status(*id, runs, i == last);
                }
            }
            Err(e) => reply = reply.error(Errno::from_io(&e), &e.to_string()),
        }
        self.send(&reply)
    }
}

/// The reply a write owes until the export delivers its result.
struct LateReply {
    replies: Arc<Replies>,
    export: Arc<str>,
    mode: ReplyMode,
    req: Request,
    sent: bool,
}

impl LateReply {
    fn send(&mut self, result: io::Result<()>) {
        self.sent = true;
        let reply = outcome_reply(self.mode, &self.req, &self.export, result);
        self.replies.late(&reply);
    }
}

impl Drop for LateReply {
    fn drop(&mut self) {
        if !self.sent {
            self.send(Err(io::Error::other("the write was dropped unfinished")));
        }
    }
}

/// The reply to a request that carries no data, from its result (a failure is logged).
fn outcome_reply(
    mode: ReplyMode,
    req: &Request,
    export: &str,
    result: io::Result<()>,
) -> Reply<'static> {
    let reply = Reply::new(mode, req.cookie, req.offset);
    match result {
        Ok(()) => reply.ok(false),
        Err(e) => {
            tracing::warn!(export, kind = req.kind, offset = req.offset, len = req.len,
                error = %e, "request failed");
            reply.error(Errno::from_io(&e), &e.to_string())
        }
    }
}

/// The allocation map of the whole range (an export may answer in pieces).
fn covering_extents(export: &dyn Export, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
    let mut map = Vec::new();
    let mut at = 0;
    while at < len {
        let part = export.extents(offset + at, len - at)?;
        if part.is_empty() || part.iter().any(|e| e.len == 0) {
            return Err(io::Error::other("export returned an empty extent"));
        }
        for e in part {
            let e = Extent {
                len: e.len.min(len - at),
                ..e
            };
            at += e.len;
            map.push(e);
            if at >= len {
                break;
            }
        }
    }
    Ok(merge(map))
}

fn merge(map: Vec<Extent>) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::with_capacity(map.len());
    for e in map {
        match out.last_mut() {
            Some(last) if last.hole == e.hole => last.len += e.len,
            _ => out.push(e),
        }
    }
    out
}

/// OFFSET_HOLE lengths are 32-bit: long holes become several chunks.
fn push_hole(reply: &mut Reply<'_>, mut offset: u64, mut len: u64, done: bool) {
    const MAX_HOLE: u64 = u32::MAX as u64 & !4095;
    while len > 0 {
        let n = len.min(MAX_HOLE);
        len -= n;
        reply.hole(offset, n as u32, done && len == 0);
        offset += n;
    }
}

/// A request header (28 bytes, or 32 with extended headers) as it arrives.
fn decode_request(head: &[u8], extended: bool) -> Result<Request, String> {
    let want_len = if extended { 32 } else { 28 };
    if head.len() != want_len {
        return Err(format!(
            "a request header has {want_len} bytes, not {}",
            head.len()
        ));
    }
    let be16 = |at: usize| u16::from_be_bytes([head[at], head[at + 1]]);
    let be32 = |at: usize| u32::from_be_bytes(head[at..at + 4].try_into().expect("4 bytes"));
    let be64 = |at: usize| u64::from_be_bytes(head[at..at + 8].try_into().expect("8 bytes"));
    let want = if extended {
        EXTENDED_REQUEST_MAGIC
    } else {
        REQUEST_MAGIC
    };
    if be32(0) != want {
        return Err(format!("bad request magic {:#010x}", be32(0)));
    }
    Ok(Request {
        flags: be16(4),
        kind: be16(6),
        cookie: be64(8),
        offset: be64(16),
        len: if extended { be64(24) } else { be32(24) as u64 },
    })
}

/// What a request is checked against: the terms its session was negotiated on.
struct Terms<'a> {
    name: &'a str,
    mode: ReplyMode,
    /// Transmission flags.
    flags: u16,
    size: u64,
    /// Meta contexts were selected.
    contexts: bool,
}

/// Whether a request may be served, else the error it gets and why.
fn check_request(req: &Request, s: &Terms<'_>) -> Result<(), (Errno, String)> {
    let inval = |msg: String| Err((Errno::Inval, msg));
    let allowed = match req.kind {
        CMD_READ => CF_FUA | CF_DF,
        CMD_WRITE => CF_FUA | CF_PAYLOAD_LEN,
        CMD_FLUSH | CMD_TRIM | CMD_CACHE => CF_FUA,
        CMD_WRITE_ZEROES => CF_FUA | CF_NO_HOLE | CF_FAST_ZERO,
        CMD_BLOCK_STATUS => CF_FUA | CF_REQ_ONE,
        other => return inval(format!("unknown command {other}")),
    };
    if req.flags & !allowed != 0 {
        return inval(format!(
            "flags {:#x} are not valid for command {}",
            req.flags & !allowed,
            req.kind
        ));
    }
    if req.flags & CF_PAYLOAD_LEN != 0 && s.mode != ReplyMode::Extended {
        return inval("PAYLOAD_LEN needs extended headers".into());
    }
    if req.flags & CF_DF != 0 && s.flags & TF_SEND_DF == 0 {
        return inval("DF needs structured replies".into());
    }
    if req.flags & CF_FAST_ZERO != 0 && s.flags & TF_SEND_FAST_ZERO == 0 {
        return inval("FAST_ZERO was not offered".into());
    }
    let writes = matches!(req.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && s.flags & TF_READ_ONLY != 0 {
        return Err((Errno::Perm, format!("export {} is read-only", s.name)));
    }
    if req.kind == CMD_FLUSH && (req.offset != 0 || req.len != 0) {
        return inval("FLUSH takes no offset or length".into());
    }
    let size = s.size;
    if req.offset.checked_add(req.len).is_none_or(|end| end > size) {
        let errno = if matches!(req.kind, CMD_WRITE | CMD_WRITE_ZEROES) {
            Errno::NoSpc
        } else {
            Errno::Inval
        };
        return Err((
            errno,
            format!(
                "request [{}, +{}) goes past the end of the export ({size} bytes)",
                req.offset, req.len
            ),
        ));
    }
    if req.kind == CMD_READ && req.len > MAX_PAYLOAD as u64 {
        let errno = if s.mode == ReplyMode::Simple {
            Errno::Inval
        } else {
            Errno::Overflow
        };
        return Err((
            errno,
            format!("READ of {} bytes exceeds the 32 MiB maximum", req.len),
        ));
    }
    if req.kind == CMD_BLOCK_STATUS {
        if !s.contexts {
            return inval(
                "BLOCK_STATUS needs a meta context (base:allocation, qemu:dirty-bitmap:...)".into(),
            );
        }
        if req.len == 0 {
            return inval("BLOCK_STATUS of zero bytes".into());
        }
    }
    Ok(())
}

/// The fuzz target `nbd_request` (and the replay of its corpus): the first byte picks
/// the session's terms (bits 0-1 the reply mode: simple, structured, extended; 0x04
/// read-only; 0x08 FAST_ZERO offered; 0x10 meta contexts selected), the next 8 the
/// export's size, the rest is a request header decoded and checked as a connection
/// does.
/// Returns the request or why it is refused; never panics.
#[doc(hidden)]
pub fn fuzz_request(data: &[u8]) -> Result<String, String> {
    if data.len() < 9 {
        return Err("too short".into());
    }
    let pick = data[0];
    let size = u64::from_be_bytes(data[1..9].try_into().expect("8 bytes"));
    let mode = match pick & 0x03 {
        0 => ReplyMode::Simple,
        1 => ReplyMode::Structured,
        _ => ReplyMode::Extended,
    };
    let mut flags = TF_HAS_FLAGS;
    if pick & 0x04 != 0 {
        flags |= TF_READ_ONLY;
    }
    if mode != ReplyMode::Simple {
        flags |= TF_SEND_DF;
    }
    if pick & 0x08 != 0 {
        flags |= TF_SEND_FAST_ZERO;
    }
    let terms = Terms {
        name: "fuzz",
        mode,
        flags,
        size,
        contexts: pick & 0x10 != 0,
    };
    let head = &data[9..];
    let req = decode_request(head, mode == ReplyMode::Extended)?;
    check_request(&req, &terms).map_err(|(errno, why)| format!("{errno:?}: {why}"))?;
    Ok(format!("{req:?}"))
}
