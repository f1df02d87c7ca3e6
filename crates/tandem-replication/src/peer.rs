//! One other participant of a volume: the link to it and the requests waiting on it.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tandem_api::{ConnectionState, NodeId, NodeName, Participant, ParticipantKind};

use crate::bitmap::Bitmap;
use crate::completion::Completion;
use crate::locks::Locked;
use crate::notify::Notify;
use crate::outbox::{Outbox, Unsent};
use crate::stream::PeerStream;
use crate::wire::{Header, State};

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

enum Link {
    /// No connection; dialing or waiting to be dialed.
    Down,
    /// A live connection. `epoch` tells its receiver apart from older ones.
    Up { outbox: Arc<Outbox>, epoch: u64 },
    /// Refused for a reason that retrying cannot fix (shown as StandAlone).
    Refused(String),
}

pub(crate) struct Peer {
    pub id: NodeId,
    pub node: NodeName,
    /// `host:port` of its peer listener.
    pub address: String,
    /// Holds a replica. Fixed for the object's life: a participant gaining or losing
    /// its replica is a new `Peer` (with a new connection and handshake).
    pub diskful: bool,
    /// The participant's kind; only diskless and tiebreaker change in place.
    kind: AtomicU8,
    link: Mutex<Link>,
    /// The state of `link` (see `link_code`), set with it: read on every request
    /// without waiting for a sender holding the link.
    state: AtomicU8,
    epochs: AtomicU64,
    pending: Mutex<HashMap<u64, Arc<Completion>>>,
    /// When the peer last answered a request, or a request started waiting on a peer
    /// that owed none: how long it has made no progress on what it owes.
    progress: Stamp,
    /// What the peer last said about itself.
    remote: Mutex<Option<State>>,
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
    sync: Mutex<Sync>,
    /// Resync bytes sent to or received from the peer.
    pub transferred: AtomicU64,
    /// The peer declined this node's resync because a Primary resyncs it; what is
    /// marked for it is settled once it reports UpToDate.
    pub deferred: AtomicBool,
    /// The peer failed a replicated change while connected: what is marked for it is
    /// to be resynced without waiting for a reconnect.
    pub resync_due: AtomicBool,
    /// No such resync starts before this.
    retry_at: Mutex<Instant>,
    /// Tells the node when the link or what the peer said changes.
    notify: Notify,
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

/// Resync between this node and the peer. Its changes follow [`Sync::allows`]; losing
/// the connection ends any (back to Idle).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sync {
    Idle,
    /// This node sends the peer what its bitmap marks; `total` bytes at the start.
    Source {
        total: u64,
    },
    /// This node receives; its own disk is Inconsistent until the source is done.
    Target,
    /// This node compares checksums with the peer; `done` bytes so far.
    Verifying {
        done: u64,
    },
}

impl Sync {
    /// Whether the resync state may change from `self` to `next`: a resync or verify
    /// starts only from Idle; anything may end (back to Idle, also when it ended
    /// already); a new connection may restart the resync it had (the old one's
    /// receiver may not have ended it yet); a verify reports progress. Anything else
    /// (a resync starting in the middle of a verify, the two ends of a resync swapping)
    /// is a bug, refused.
    pub fn allows(self, next: Sync) -> bool {
        matches!(
            (self, next),
            (_, Self::Idle)
                | (
                    Self::Idle,
                    Self::Source { .. } | Self::Target | Self::Verifying { .. }
                )
                | (Self::Source { .. }, Self::Source { .. })
                | (Self::Target, Self::Target)
                | (Self::Verifying { .. }, Self::Verifying { .. })
        )
    }
}

/// A change of resync state that [`Sync::allows`] refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BadTransition {
    pub from: Sync,
    pub to: Sync,
}

impl std::fmt::Display for BadTransition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "no resync state change from {:?} to {:?}",
            self.from, self.to
        )
    }
}

const DOWN: u8 = 0;
const UP: u8 = 1;
const REFUSED: u8 = 2;

fn link_code(link: &Link) -> u8 {
    match link {
        Link::Down => DOWN,
        Link::Up { .. } => UP,
        Link::Refused(_) => REFUSED,
    }
}

/// The kind as the spec spells it.
pub(crate) fn kind_name(kind: ParticipantKind) -> &'static str {
    match kind {
        ParticipantKind::Diskful => "diskful",
        ParticipantKind::Diskless => "diskless",
        ParticipantKind::Tiebreaker => "tiebreaker",
    }
}

fn kind_code(kind: ParticipantKind) -> u8 {
    match kind {
        ParticipantKind::Diskful => 0,
        ParticipantKind::Diskless => 1,
        ParticipantKind::Tiebreaker => 2,
    }
}

impl Peer {
    pub fn new(
        participant: &Participant,
        tracked: Option<Arc<Mutex<Tracked>>>,
        notify: Notify,
    ) -> Peer {
        Peer {
            id: participant.node_id,
            node: participant.node.clone(),
            address: participant.address.clone(),
            diskful: participant.kind.diskful(),
            kind: AtomicU8::new(kind_code(participant.kind)),
            tracked,
            sync: Mutex::new(Sync::Idle),
            transferred: AtomicU64::new(0),
            deferred: AtomicBool::new(false),
            resync_due: AtomicBool::new(false),
            retry_at: Mutex::new(Instant::now()),
            link: Mutex::new(Link::Down),
            state: AtomicU8::new(link_code(&Link::Down)),
            epochs: AtomicU64::new(0),
            pending: Mutex::default(),
            progress: Stamp::now(),
            remote: Mutex::new(None),
            last_seen: Stamp::now(),
            last_sent: Stamp::now(),
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            dialing: AtomicBool::new(false),
            dial: Mutex::new((Instant::now(), BACKOFF_MIN)),
            notify,
        }
    }

    /// Changes the resync state if [`Sync::allows`] it (a refusal is logged); a change
    /// of kind (not mere progress) is reported.
    pub fn set_sync(&self, new: Sync) -> Result<(), BadTransition> {
        let mut sync = self.sync.locked();
        let old = *sync;
        if !old.allows(new) {
            drop(sync);
            let bad = BadTransition { from: old, to: new };
            tracing::error!(peer = %self.node, %bad, "resync state change refused");
            return Err(bad);
        }
        *sync = new;
        drop(sync);
        if std::mem::discriminant(&old) != std::mem::discriminant(&new) {
            self.notify.fire();
        }
        Ok(())
    }

    /// Ends the resync state `was` (back to Idle); whether it was in it.
    pub fn end_sync(&self, was: Sync) -> bool {
        let mut sync = self.sync.locked();
        if *sync != was {
            return false;
        }
        *sync = Sync::Idle;
        drop(sync);
        self.notify.fire();
        true
    }

    pub fn sync(&self) -> Sync {
        *self.sync.locked()
    }

    pub fn kind(&self) -> ParticipantKind {
        match self.kind.load(Ordering::Relaxed) {
            0 => ParticipantKind::Diskful,
            1 => ParticipantKind::Diskless,
            _ => ParticipantKind::Tiebreaker,
        }
    }

    /// Whether a resync retry (see `resync_due`) may start now; if so, the next one
    /// may not for a while.
    pub fn retry_now(&self) -> bool {
        let mut at = self.retry_at.locked();
        if Instant::now() < *at {
            return false;
        }
        *at = Instant::now() + RETRY_EVERY;
        true
    }

    /// Changes the kind of a participant that holds no replica (diskless or tiebreaker).
    pub fn set_kind(&self, kind: ParticipantKind) {
        debug_assert_eq!(kind.diskful(), self.diskful);
        self.kind.store(kind_code(kind), Ordering::Relaxed);
    }

    /// Whether the participant is the one `p` describes, reachable at the same address
    /// and holding (or not) a replica alike: then it keeps this object and its link.
    pub fn same_as(&self, p: &Participant) -> bool {
        self.id == p.node_id
            && self.node == p.node
            && self.address == p.address
            && self.diskful == p.kind.diskful()
    }

    pub fn connection(&self) -> ConnectionState {
        match self.state.load(Ordering::Acquire) {
            UP => ConnectionState::Connected,
            REFUSED => ConnectionState::StandAlone,
            _ => ConnectionState::Connecting,
        }
    }

    /// Replaces the link (whose lock the caller holds).
    fn set_link(&self, link: &mut Link, new: Link) {
        self.state.store(link_code(&new), Ordering::Release);
        *link = new;
    }

    pub fn remote(&self) -> Option<State> {
        *self.remote.locked()
    }

    pub fn set_remote(&self, state: State) {
        let old = self.remote.locked().replace(state);
        if old != Some(state) {
            self.notify.fire();
        }
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
            connects: self.epochs.load(Ordering::Relaxed),
        }
    }

    fn outbox(&self) -> Option<Arc<Outbox>> {
        match &*self.link.locked() {
            Link::Up { outbox, .. } => Some(outbox.clone()),
            _ => None,
        }
    }

    /// Makes `stream` the live connection; returns its epoch. A previous connection is
    /// closed (its receiver notices and detaches with its own, older epoch). Refused
    /// while the peer is refused (a connection that raced with a removal, say).
    pub fn attach(&self, stream: &PeerStream, remote: State, sync: Sync) -> io::Result<u64> {
        let outbox = Outbox::new(stream.try_clone()?, self.node.to_string());
        let mut link = self.link.locked();
        match &*link {
            Link::Up { outbox: old, .. } => old.close(),
            Link::Refused(why) => {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    format!("peer {} is refused: {why}", self.node),
                ));
            }
            Link::Down => {}
        }
        // The old connection's receiver will find its epoch stale and leave all to this
        // one: what waited on the old connection is settled here, as its end would.
        // Taken before the new one is up, so nothing sent on the new one is among it.
        let stale = match *link {
            Link::Up { .. } => self.forget_connection(),
            _ => Vec::new(),
        };
        *self.sync.locked() = sync;
        let epoch = self.epochs.fetch_add(1, Ordering::AcqRel) + 1;
        self.set_link(&mut link, Link::Up { outbox, epoch });
        drop(link);
        for c in stale {
            c.lost(self.id);
        }
        self.set_remote(remote);
        self.notify.fire();
        self.seen();
        *self.dial.locked() = (Instant::now(), BACKOFF_MIN);
        Ok(epoch)
    }

    /// Called by the receiver of connection `epoch` when it ends: every request still
    /// waiting on this peer is settled as lost.
    pub fn detach(&self, epoch: u64) {
        let mut link = self.link.locked();
        match &*link {
            Link::Up { epoch: e, outbox } if *e == epoch => {
                outbox.close();
                self.set_link(&mut link, Link::Down);
            }
            // Refused while connected (the participant left, say): no newer connection
            // can exist, so what waits on this one is settled all the same.
            Link::Refused(_) if self.epochs.load(Ordering::Acquire) == epoch => {}
            _ => return,
        }
        drop(link);
        *self.remote.locked() = None;
        for c in self.forget_connection() {
            c.lost(self.id);
        }
        self.notify.fire();
    }

    /// A connection ended: its resync (either way) ends with it; the requests that
    /// waited on it are returned, for the caller to settle as lost once it holds no
    /// lock (settling runs what waited on them).
    fn forget_connection(&self) -> Vec<Arc<Completion>> {
        *self.sync.locked() = Sync::Idle;
        self.deferred.store(false, Ordering::Relaxed);
        self.resync_due.store(false, Ordering::Relaxed);
        self.pending.locked().drain().map(|(_, c)| c).collect()
    }

    /// Refuses the peer for good (until the spec changes), closing any connection.
    pub fn refuse(&self, reason: String) {
        let mut link = self.link.locked();
        if let Link::Up { outbox, .. } = &*link {
            outbox.close();
        }
        self.set_link(&mut link, Link::Refused(reason));
        drop(link);
        self.notify.fire();
    }

    /// Lets a refused peer connect again (after an operator resolved the reason).
    pub fn unrefuse(&self) {
        let mut link = self.link.locked();
        if matches!(*link, Link::Refused(_)) {
            self.set_link(&mut link, Link::Down);
            drop(link);
            self.notify.fire();
        }
    }

    /// Closes the live connection (dead peer, shutdown); its receiver detaches.
    /// Never waits, whatever state the socket is in.
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

    /// Whether to dial now; if so, the next attempt is pushed back (doubling, capped)
    /// and [`Peer::dialed`] must follow.
    pub fn dial_due(&self) -> bool {
        if !matches!(*self.link.locked(), Link::Down) || self.dialing.load(Ordering::Acquire) {
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

    /// The epoch of the live connection, if any.
    pub fn epoch(&self) -> Option<u64> {
        match &*self.link.locked() {
            Link::Up { epoch, .. } => Some(*epoch),
            _ => None,
        }
    }

    pub fn refusal(&self) -> Option<String> {
        match &*self.link.locked() {
            Link::Refused(r) => Some(r.clone()),
            _ => None,
        }
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

    #[test]
    fn resync_state_changes_follow_the_table() {
        let (src, vfy) = (Sync::Source { total: 8 }, Sync::Verifying { done: 4 });
        let (idle, target) = (Sync::Idle, Sync::Target);
        let allowed = [
            (idle, idle),
            (idle, src),
            (idle, target),
            (idle, vfy),
            (src, idle),
            (src, Sync::Source { total: 2 }),
            (target, idle),
            (target, target),
            (vfy, Sync::Verifying { done: 8 }),
            (vfy, idle),
        ];
        let refused = [
            (src, target),
            (src, vfy),
            (target, src),
            (target, vfy),
            (vfy, src),
            (vfy, target),
        ];
        for (from, to) in allowed {
            assert!(from.allows(to), "{from:?} -> {to:?} must be allowed");
        }
        for (from, to) in refused {
            assert!(!from.allows(to), "{from:?} -> {to:?} must be refused");
        }
    }
}
