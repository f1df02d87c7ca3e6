//! One other participant of a volume: the link to it and the requests waiting on it.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tandem_api::{NodeId, NodeName, Participant, ParticipantKind};

use crate::bitmap::Bitmap;
use crate::completion::Completion;
use crate::locks::Locked;
use crate::outbox::{Outbox, Unsent};
use crate::stream::PeerStream;
use crate::wire::Header;

/// A peer silent for this long, or that answers none of the requests waiting on it for
/// this long, is declared dead and its connection closed (the kernel gives up on data
/// it cannot deliver after as long, see `tandem_io::bound_tcp_liveness`).
pub(crate) const DEAD_AFTER: Duration = Duration::from_secs(5);
/// Every peer speaks at least once a second (`PING_AFTER`). One silent for longer than
/// this no longer votes for quorum, though it stays connected until [`DEAD_AFTER`]: a
/// Primary cut off from every peer must stop acknowledging writes on the strength of
/// their votes well before the others declare it dead and a new Primary takes over,
/// however the detection of its several dead links is spread in time.
pub(crate) const VOTE_FRESH: Duration = Duration::from_millis(2500);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// A refused resync is tried again this often while the peer stays connected.
const RETRY_EVERY: Duration = Duration::from_secs(1);

/// The live connection, if any. Whether the volume uses it is the control state's
/// business (see `control::Link`); this is only the plumbing.
struct Live {
    outbox: Arc<Outbox>,
    /// Tells this connection's receiver apart from older ones.
    epoch: u64,
    since: Instant,
}

/// Connection epochs, unique in the process: a peer replaced by a spec change starts
/// afresh without its epochs ever meeting the old one's.
static EPOCHS: AtomicU64 = AtomicU64::new(0);

pub(crate) struct Peer {
    pub id: NodeId,
    pub node: NodeName,
    /// `host:port` of its peer listener.
    pub address: String,
    /// Holds a replica. Fixed for the object's life: a participant gaining or losing
    /// its replica is a new `Peer` (with a new connection and handshake).
    pub diskful: bool,
    link: Mutex<Option<Live>>,
    /// Connections made to this peer.
    connects: AtomicU64,
    pending: Mutex<HashMap<u64, Arc<Completion>>>,
    /// When the peer last answered a request, or a request started waiting on a peer
    /// that owed none: how long it has made no progress on what it owes.
    progress: Stamp,
    /// When bytes last came from the peer (any part of any message).
    last_seen: Stamp,
    last_sent: Stamp,
    /// Bytes handed to the link (sent or queued) and read from it, over every
    /// connection.
    sent: AtomicU64,
    received: AtomicU64,
    dial: Mutex<(Instant, Duration)>,
    /// A dial attempt is under way: never two at once.
    dialing: AtomicBool,
    /// Blocks the peer lacks, when both sides hold data. Shared with the `Peer` that
    /// replaces this one when only the participant's address changes.
    pub tracked: Option<Arc<Mutex<Tracked>>>,
    /// Resync bytes sent to or received from the peer.
    pub transferred: AtomicU64,
    /// No resync retry starts before this.
    retry_at: Mutex<Instant>,
}

/// Traffic on the link to one peer, for metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkStats {
    pub node: NodeName,
    /// Bytes handed to the link (sent, or queued to be), headers included.
    pub sent: u64,
    /// Bytes read from the link.
    pub received: u64,
    /// Bytes waiting for the socket to take them.
    pub queued: u64,
    /// Connections made (the first, and every reconnection).
    pub connects: u64,
}

/// The out-of-sync bitmap towards a peer and the metadata slot it is stored in.
pub(crate) struct Tracked {
    pub slot: usize,
    pub bits: Bitmap,
}

/// The kind as the spec spells it.
pub(crate) fn kind_name(kind: ParticipantKind) -> &'static str {
    match kind {
        ParticipantKind::Diskful => "diskful",
        ParticipantKind::Diskless => "diskless",
        ParticipantKind::Tiebreaker => "tiebreaker",
    }
}

impl Peer {
    pub fn new(participant: &Participant, tracked: Option<Arc<Mutex<Tracked>>>) -> Peer {
        Peer {
            id: participant.node_id,
            node: participant.node.clone(),
            address: participant.address.clone(),
            diskful: participant.kind.diskful(),
            tracked,
            transferred: AtomicU64::new(0),
            retry_at: Mutex::new(Instant::now()),
            link: Mutex::new(None),
            connects: AtomicU64::new(0),
            pending: Mutex::default(),
            progress: Stamp::now(),
            last_seen: Stamp::now(),
            last_sent: Stamp::now(),
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            dialing: AtomicBool::new(false),
            dial: Mutex::new((Instant::now(), BACKOFF_MIN)),
        }
    }

    /// Whether a resync retry may start now; if so, the next one may not for a while.
    pub fn retry_now(&self) -> bool {
        let mut at = self.retry_at.locked();
        if Instant::now() < *at {
            return false;
        }
        *at = Instant::now() + RETRY_EVERY;
        true
    }

    /// Whether the participant is the one `p` describes, reachable at the same address
    /// and holding (or not) a replica alike: then it keeps this object and its link.
    pub fn same_as(&self, p: &Participant) -> bool {
        self.id == p.node_id
            && self.node == p.node
            && self.address == p.address
            && self.diskful == p.kind.diskful()
    }

    /// Bytes came from the peer: it is alive, however long its message is.
    pub fn seen(&self) {
        self.last_seen.set();
    }

    pub fn silent_for(&self) -> Duration {
        self.last_seen.elapsed()
    }

    /// Time since this node last sent the peer anything.
    pub fn quiet_for(&self) -> Duration {
        self.last_sent.elapsed()
    }

    /// How long requests have waited on the peer without any of them being answered;
    /// `None` while none waits.
    pub fn unanswered_for(&self) -> Option<Duration> {
        let pending = self.pending.locked();
        (!pending.is_empty()).then(|| self.progress.elapsed())
    }

    /// Bytes queued for the peer, not yet taken by its socket.
    pub fn queued(&self) -> usize {
        self.outbox().map_or(0, |o| o.queued())
    }

    /// The link's traffic so far.
    pub fn link_stats(&self) -> LinkStats {
        LinkStats {
            node: self.node.clone(),
            sent: self.sent.load(Ordering::Relaxed),
            received: self.received.load(Ordering::Relaxed),
            queued: self.queued() as u64,
            connects: self.connects.load(Ordering::Relaxed),
        }
    }

    fn outbox(&self) -> Option<Arc<Outbox>> {
        self.link.locked().as_ref().map(|l| l.outbox.clone())
    }

    /// Makes `stream` the live connection; returns its epoch. A previous connection is
    /// closed (its receiver notices and ends with its own, older epoch); what waited
    /// on it is settled as lost here, as its end would, before the new one is up so
    /// that nothing sent on the new one is among it.
    pub fn attach(&self, stream: &PeerStream) -> io::Result<u64> {
        let outbox = Outbox::new(stream.try_clone()?, self.node.to_string());
        let epoch = EPOCHS.fetch_add(1, Ordering::AcqRel) + 1;
        let mut link = self.link.locked();
        let live = Live {
            outbox,
            epoch,
            since: Instant::now(),
        };
        let stale = match link.replace(live) {
            Some(old) => {
                old.outbox.close();
                self.take_pending()
            }
            None => Vec::new(),
        };
        drop(link);
        self.lose(stale);
        self.connects.fetch_add(1, Ordering::Relaxed);
        self.seen();
        Ok(epoch)
    }

    /// Ends the live connection, if any, before a new one with the peer takes its
    /// place (the peer dialed again: it gave this one up): what waited on it is
    /// settled as lost now, so the changes it missed are marked before the new
    /// connection's handshake reads the bitmap.
    pub fn retire(&self) {
        let epoch = self.link.locked().as_ref().map(|l| l.epoch);
        if let Some(epoch) = epoch {
            self.detach(epoch);
        }
    }

    /// Ends connection `epoch` (its receiver calls this when it stops, and a
    /// connection the volume refused ends here): every request still waiting on the
    /// peer is settled as lost. Nothing if a newer connection replaced it.
    pub fn detach(&self, epoch: u64) {
        let mut link = self.link.locked();
        match &*link {
            Some(live) if live.epoch == epoch => {
                live.outbox.close();
                // A connection that lasted is redialled at once; one refused or lost
                // right after its handshake (the peer is busy with a resync from
                // another node, say) waits out the doubling backoff, instead of a
                // handshake every 100 ms for as long as the peer is busy.
                if live.since.elapsed() >= BACKOFF_MAX {
                    *self.dial.locked() = (Instant::now(), BACKOFF_MIN);
                }
                *link = None;
            }
            _ => return,
        }
        drop(link);
        let lost = self.take_pending();
        self.lose(lost);
    }

    /// Every request waiting on the peer, taken out (to settle once no lock is held:
    /// settling runs what waited on them).
    fn take_pending(&self) -> Vec<Arc<Completion>> {
        self.pending.locked().drain().map(|(_, c)| c).collect()
    }

    /// Settles requests as lost with this peer.
    fn lose(&self, requests: Vec<Arc<Completion>>) {
        for c in requests {
            c.lost(self.id);
        }
    }

    /// Closes the live connection (dead or refused peer, shutdown); its receiver
    /// ends it. Never waits, whatever state the socket is in.
    pub fn disconnect(&self) {
        if let Some(outbox) = self.outbox() {
            outbox.close();
        }
    }

    /// Sends one message without waiting for the socket (see [`Outbox`]); a failure
    /// closes the connection.
    pub fn send(&self, header: &Header, payload: &[u8]) -> io::Result<()> {
        let outbox = self.outbox().ok_or(Unsent::Closed)?;
        outbox.send(header, payload)?;
        self.last_sent.set();
        self.sent.fetch_add(
            (crate::wire::HEADER_LEN + payload.len()) as u64,
            Ordering::Relaxed,
        );
        Ok(())
    }

    /// Sends a request whose answer settles `completion`. Registered before sending, so
    /// an answer cannot outrun it; if sending fails the request counts as lost.
    pub fn request(&self, header: &Header, payload: &[u8], completion: &Arc<Completion>) {
        {
            let mut pending = self.pending.locked();
            if pending.is_empty() {
                // The peer owed nothing until now: its silence counts from here.
                self.progress.set();
            }
            pending.insert(header.id, completion.clone());
        }
        if self.send(header, payload).is_err() {
            if let Some(c) = self.pending.locked().remove(&header.id) {
                c.lost(self.id);
            }
        }
    }

    /// The completion waiting for answer `id`, taken out.
    pub fn answered(&self, id: u64) -> Option<Arc<Completion>> {
        let c = self.pending.locked().remove(&id);
        self.progress.set();
        c
    }

    /// Whether to dial now (no connection, none being dialed, and the backoff over);
    /// if so, the next attempt is pushed back (doubling, capped) and [`Peer::dialed`]
    /// must follow.
    pub fn dial_due(&self) -> bool {
        if self.link.locked().is_some() || self.dialing.load(Ordering::Acquire) {
            return false;
        }
        let mut dial = self.dial.locked();
        if Instant::now() < dial.0 {
            return false;
        }
        let backoff = dial.1;
        *dial = (Instant::now() + backoff, (backoff * 2).min(BACKOFF_MAX));
        self.dialing.store(true, Ordering::Release);
        true
    }

    /// The dial attempt started by [`Peer::dial_due`] is over.
    pub fn dialed(&self) {
        self.dialing.store(false, Ordering::Release);
    }
}

/// The receiving end of a connection: every read that brings bytes proves the peer
/// alive, so a long message on a slow link is not taken for silence.
pub(crate) struct Heard {
    pub stream: PeerStream,
    pub peer: Arc<Peer>,
}

impl io::Read for Heard {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.stream.read(buf)?;
        if n > 0 {
            self.peer.seen();
            self.peer.received.fetch_add(n as u64, Ordering::Relaxed);
        }
        Ok(n)
    }
}

impl std::os::fd::AsRawFd for Heard {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.stream.as_raw_fd()
    }
}

/// A moment, stored in an atomic so that it is set and read without a lock (the
/// receiver marks every read with it).
struct Stamp(AtomicU64);

/// The origin of every [`Stamp`].
fn origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

impl Stamp {
    fn now() -> Stamp {
        let s = Stamp(AtomicU64::new(0));
        s.set();
        s
    }

    fn set(&self) {
        self.0
            .store(origin().elapsed().as_nanos() as u64, Ordering::Release);
    }

    fn elapsed(&self) -> Duration {
        let at = Duration::from_nanos(self.0.load(Ordering::Acquire));
        origin().elapsed().saturating_sub(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    fn peer() -> Peer {
        Peer::new(
            &Participant {
                node_id: NodeId::new(2).unwrap(),
                node: "n2".parse().unwrap(),
                address: "127.0.0.1:1".into(),
                kind: ParticipantKind::Diskful,
                pool: None,
                fresh: false,
            },
            None,
        )
    }

    fn stream() -> PeerStream {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let s = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        PeerStream::Tcp(s)
    }

    /// Seen in a chaos run: a replica being resynced by one node refused another's
    /// connection right after each handshake, and the other dialled again every 100 ms
    /// for as long as the resync lasted.
    #[test]
    fn a_connection_lost_at_once_is_redialled_after_a_growing_backoff() {
        let p = peer();
        let mut waits = Vec::new();
        for _ in 0..5 {
            let started = Instant::now();
            while !p.dial_due() {
                std::thread::sleep(Duration::from_millis(5));
            }
            waits.push(started.elapsed());
            p.dialed();
            let epoch = p.attach(&stream()).unwrap();
            p.detach(epoch);
        }
        // 0, then 100, 200, 400, 800 ms (the first dial is due at once).
        assert!(waits[0] < Duration::from_millis(50), "{waits:?}");
        for (i, w) in waits.iter().enumerate().skip(1) {
            let floor = BACKOFF_MIN * (1 << (i - 1));
            assert!(*w >= floor - Duration::from_millis(20), "{waits:?}");
        }
    }
}
