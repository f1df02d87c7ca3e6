//! A volume's control state on this node, and the one function that changes it.
//!
//! Everything that decides how a volume behaves here lives in one [`Control`]: its
//! role, its disk state and data generations, and for each peer the connection, what
//! the peer last said about itself, the resync between the two and the generation
//! this replica had when it started tracking changes for the peer. It changes only
//! through [`step`], a pure function from the state and an [`Event`] to the next state
//! and the [`Action`]s that carry the change out, or a refusal: a transition the table
//! does not allow is refused (and logged by the caller), never applied. The volume's
//! `Owner` (owner.rs) applies events one at a time, stores what must survive a
//! restart before anyone sees it, publishes the result as the immutable view the data
//! path reads, then runs the actions.

use tandem_api::{DiskState, NodeId, ParticipantKind, Role};
use tandem_pool::{GenerationId, Generations, HISTORY};

use crate::handshake::{self, Direction, Side};
use crate::promotion;
use crate::wire::{History, State};

/// The connection to a peer, as far as the volume's behaviour goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Link {
    /// No connection; dialing or waiting to be dialed.
    Down,
    /// Connection `epoch` is live (epochs are unique in the process).
    Up { epoch: u64 },
    /// Refused for a reason that retrying cannot fix (shown as StandAlone).
    Refused(String),
}

/// Resync between this node and a peer. Its changes follow [`Sync::allows`]; losing
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
    /// starts only from Idle; anything may end (back to Idle); a resync source learns
    /// its total; a verify reports progress. Anything else (a resync starting in the
    /// middle of a verify, the two ends of a resync swapping) is a bug, refused.
    pub fn allows(self, next: Sync) -> bool {
        matches!(
            (self, next),
            (_, Self::Idle)
                | (
                    Self::Idle,
                    Self::Source { .. } | Self::Target | Self::Verifying { .. }
                )
                | (Self::Source { .. }, Self::Source { .. })
                | (Self::Verifying { .. }, Self::Verifying { .. })
        )
    }
}

/// One peer's part of the control state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PeerControl {
    pub id: NodeId,
    pub kind: ParticipantKind,
    pub link: Link,
    /// What the peer last said about itself, while connected.
    pub remote: Option<State>,
    /// The peer's earlier generations, newest first, as its Hello gave them and as
    /// its generation changed since.
    pub history: History,
    /// The newest of the peer's generations holding every acknowledged write of its
    /// line, as its Hello gave it: for a replica whose disk failed, the one its data
    /// was last whole at.
    pub confirmed: u64,
    pub sync: Sync,
    /// This replica's generation when it started tracking changes for the peer (0: it
    /// tracks none). Stored in the superblock.
    pub mark: u64,
    /// The peer declined this node's resync because a Primary resyncs it: what is
    /// marked for it is settled once it reports UpToDate at this node's generation.
    pub deferred: bool,
    /// The peer failed a change (or refused a resync) while connected: what is marked
    /// for it is to be resynced without waiting for a reconnect.
    pub resync_due: bool,
    /// The peer failed, or lost, a change that others took, while connected: until
    /// resynced it lacks what it says it holds (see [`Control::voters_agreeing`]).
    pub lacking: bool,
    /// The generation this node started because the peer missed writes (0: none):
    /// while it is current and the peer has not reported it (nor been resynced to
    /// it), the peer cannot hold it, and further writes the peer misses need no new
    /// one. It outlives connections: a peer that connects and drops again without
    /// catching up (one being resynced by another, which refuses this node
    /// meanwhile) would otherwise start a generation per attempt, pushing the ones
    /// the other replicas hold out of every history.
    pub fenced: u64,
}

impl PeerControl {
    pub fn new(id: NodeId, kind: ParticipantKind, mark: u64) -> PeerControl {
        PeerControl {
            id,
            kind,
            link: Link::Down,
            remote: None,
            history: [0; HISTORY + 1],
            confirmed: 0,
            sync: Sync::Idle,
            mark,
            deferred: false,
            resync_due: false,
            lacking: false,
            fenced: 0,
        }
    }

    pub fn connected(&self) -> bool {
        matches!(self.link, Link::Up { .. })
    }

    pub fn epoch(&self) -> Option<u64> {
        match self.link {
            Link::Up { epoch } => Some(epoch),
            _ => None,
        }
    }

    pub fn is_primary(&self) -> bool {
        self.remote.is_some_and(|s| s.role == Role::Primary)
    }

    pub fn remote_disk(&self) -> Option<DiskState> {
        self.remote.map(|s| s.disk)
    }

    /// A connection ended (or was replaced): whatever went on over it ends with it.
    fn forget_connection(&mut self) {
        self.remote = None;
        self.sync = Sync::Idle;
        self.deferred = false;
        self.resync_due = false;
        self.lacking = false;
    }

    /// The peer reports `state` while this node's generation is `current`: once it
    /// holds the current generation's data (whole), a write it misses calls for a new
    /// one again. A peer without data (its disk failed) only repeats the generation.
    fn heard_at(&mut self, state: State, current: u64) {
        if state.generation == current && state.disk == DiskState::UpToDate {
            self.fenced = 0;
        }
    }
}

/// The control state of one volume on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Control {
    pub me: NodeId,
    /// This node holds a replica of the volume.
    pub replica: bool,
    /// NBD clients that have the volume open for writing here: Primary while > 0.
    pub writers: u32,
    /// This node is asking its peers to agree to its promotion.
    pub promoting: bool,
    /// The spec allows two Primaries at once (for live migration).
    pub two_primaries: bool,
    pub disk: DiskState,
    /// The replica's data generations; on a diskless node only `current` is used: the
    /// newest generation a Primary announced.
    pub gens: Generations,
    /// The newest of this node's generations known to hold every acknowledged write
    /// of its line: the current one, unless this node, as Primary, started one that
    /// no majority confirmed yet (no write was acknowledged in it). A whole replica
    /// taking a Primary's generation holds its writes, so it takes it as confirmed.
    pub confirmed: u64,
    /// The generation at which this replica's data was last whole: its current one
    /// while UpToDate, kept when it fails (see [`Event::Trust`]).
    pub whole_at: u64,
    pub peers: Vec<PeerControl>,
}

/// Something that happened to the volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Event {
    /// Connection `epoch` to `peer` finished its handshake: the peer's state and
    /// bitmap generation, whether this side knows of ranges the peer lacks, and the
    /// ranges the peer knows this side to differ in.
    Connected {
        peer: NodeId,
        epoch: u64,
        state: State,
        their_mark: u64,
        their_history: History,
        their_confirmed: u64,
        my_dirty: bool,
        theirs: Vec<(u64, u64)>,
    },
    /// Connection `epoch` to `peer` ended.
    Disconnected { peer: NodeId, epoch: u64 },
    /// The peer said what it is now.
    PeerState { peer: NodeId, state: State },
    /// A peer asks to become Primary.
    PromotionAsked { peer: NodeId },
    /// This node starts asking its peers to agree to its promotion; whether it holds
    /// quorum now.
    PromotionStarted { quorum: bool },
    /// The peers answered: all agreed, or not.
    /// The peers answered: all agreed, or not; and whether this node holds quorum now.
    PromotionEnded { agreed: bool, quorum: bool },
    /// Another writer opens the volume on this node, which is Primary already.
    Opened,
    /// A writer closed the volume on this node.
    Closed,
    /// This node starts (or restarts, knowing the total) a resync to `peer` over
    /// connection `epoch`.
    ResyncStarted {
        peer: NodeId,
        epoch: u64,
        total: u64,
    },
    /// This node sent `peer` all it lacked, and said so.
    ResyncSent { peer: NodeId, epoch: u64 },
    /// `peer` refused resync data over connection `epoch`: `declined` when a Primary
    /// resyncs it instead, else it is to be retried.
    ResyncRefused {
        peer: NodeId,
        epoch: u64,
        declined: bool,
    },
    /// A peer still connected is due for a resync retry.
    ResyncRetry { peer: NodeId, epoch: u64 },
    /// The resync source says all is sent: its data generation.
    /// The resync source says all is sent: its data generation, and whether it
    /// follows a Primary this node does not reach.
    ResyncDone {
        peer: NodeId,
        generation: u64,
        primary_elsewhere: bool,
    },
    /// This node declines a resync from `peer` (another peer is Primary).
    TargetDeclined { peer: NodeId },
    /// A majority of the voters reported this Primary's generation `generation`.
    Confirmed { generation: u64 },
    /// Online verify against `peer`: `done` bytes compared, or ended (`None`).
    Verify { peer: NodeId, done: Option<u64> },
    /// `peer` failed a replicated change while connected.
    ChangeFailed { peer: NodeId },
    /// `peer` is to be resynced again shortly, while connected: it refused a change
    /// past its end (it has not grown yet; the change failed, so nothing
    /// acknowledged is missing there), or changes were marked for it as its resync
    /// ended.
    ResyncAgain { peer: NodeId },
    /// Changes stop reaching `peer`: start tracking them for it.
    Track { peer: NodeId },
    /// A write is about to leave for `receiving` only: if a replica that stops
    /// receiving writes still shares the current generation, start generation `next`.
    Rotate { receiving: Vec<NodeId>, next: u64 },
    /// The local replica failed an I/O. On a Primary, its writes go on to the peers in
    /// generation `next`: see the handler.
    LocalIoError { next: u64 },
    /// An operator discards the local replica's data.
    Invalidate,
    /// An operator declares the local replica's data whole as it is, on a volume
    /// with no whole replica left (the disks of every replica failed in turn, then
    /// were repaired): it becomes UpToDate at generation `next`, descending from the
    /// one at which its data was last whole, and resyncs the others. Refused unless
    /// every other replica is connected and none followed writes made after that
    /// point (the replica whose disk failed last is the one to trust).
    Trust { next: u64 },
    /// The volume was rolled back to a snapshot, closed everywhere: every participant
    /// starts data generation `generation` together; this replica `holds` the
    /// snapshot's data now, or (a replica without the snapshot) nothing of its own.
    RolledBack { generation: u64, holds: bool },
    /// Every peer connects afresh (refused ones too), so the handshake decides again.
    Reconnect,
    /// `peer` is refused until the spec changes or an operator reconnects it.
    Refuse { peer: NodeId, why: String },
    /// The spec changed: these are the peers now; `fresh` ones start over (new, or
    /// reachable elsewhere), the others keep their connection and change kind only.
    SpecChanged {
        peers: Vec<(NodeId, ParticipantKind, bool)>,
        two_primaries: bool,
    },
}

/// What carries out a step, after its new state is published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Action {
    /// Tell every connected peer this node's state (and the node that it changed).
    Announce,
    /// Tell the node the volume's state changed.
    Notify,
    /// Close the connection to `peer` (its receiver ends it).
    Disconnect(NodeId),
    /// A peer became Primary: wait for resync data from others being applied.
    PrimaryAppeared(NodeId),
    /// The peer has everything: clear its whole bitmap.
    ClearAll(NodeId),
    /// The peer lacks everything: mark its whole bitmap.
    MarkAll(NodeId),
    /// The peer lacks these ranges (offset, length): mark them in its bitmap.
    Mark {
        peer: NodeId,
        ranges: Vec<(u64, u64)>,
    },
    /// Start sending the peer what its bitmap marks, over connection `epoch`.
    StartResync { peer: NodeId, epoch: u64 },
    /// This replica starts receiving a resync from `peer`.
    ResyncFrom(NodeId),
    /// A resync from `peer` ended: this replica is whole again.
    ResyncFinished(NodeId),
    /// A resync covered the extents a crash left in the activity log.
    SettleSuspect,
    /// The last writer left: the activity log can be emptied.
    ClearActivityLog,
    /// Log why the local replica is no longer used.
    Detached,
    /// Log a new data generation.
    NewGeneration(u64),
    /// A peer reported a generation this replica never had: it was left behind.
    LeftBehind { peer: NodeId, generation: u64 },
    /// Mark for the peer the changes this replica took lately from a Primary.
    MarkRecent(NodeId),
    /// Primary `0` was lost: the writes this replica took from it lately may have
    /// missed the other replicas (they were in flight). They are marked for each, and
    /// resynced from here to the connected ones with a higher node id (the lower id
    /// sends, so two survivors never swap their differences).
    RecentUncertain(NodeId),
    /// Log refusing a connection whose replicas diverged.
    Diverged { peer: NodeId, why: String },
}

/// Why a step was refused: the state stays as it was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refused(pub String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The next state and what carries it out.
pub(crate) type Stepped = (Control, Vec<Action>);

impl Control {
    pub fn role(&self) -> Role {
        if self.writers > 0 {
            Role::Primary
        } else {
            Role::Secondary
        }
    }

    /// What this node tells its peers about itself.
    pub fn state(&self) -> State {
        State {
            role: self.role(),
            disk: self.disk,
            generation: self.gens.current.0,
        }
    }

    pub fn peer(&self, id: NodeId) -> Option<&PeerControl> {
        self.peers.iter().find(|p| p.id == id)
    }

    /// Whether this node keeps a bitmap for `p` (both hold data).
    pub fn tracks(&self, p: &PeerControl) -> bool {
        self.replica && p.kind.diskful()
    }

    pub fn up_to_date(&self) -> bool {
        self.replica && self.disk == DiskState::UpToDate
    }

    /// The mark a Hello to `peer` gives: this replica's generation when it started
    /// tracking changes for the peer. A node without data tracks none, but as Primary
    /// it knows which replicas missed its writes since it started its generation (see
    /// [`PeerControl::fenced`]): for those, the generation it moved on from.
    pub fn mark_for_hello(&self, peer: NodeId) -> u64 {
        match self.peer(peer) {
            Some(p) if self.replica => p.mark,
            Some(p) if p.fenced != 0 && p.fenced == self.gens.current.0 => self.gens.bitmap.0,
            _ => 0,
        }
    }

    /// The confirmed generation a Hello gives: for a replica whose disk failed, the
    /// one its data was last whole at (it holds no acknowledged write after it; its
    /// own confirmed generation may have moved on with the writes it went on
    /// serving through its peers). [`Event::Trust`] on another replica compares it.
    pub fn confirmed_for_peers(&self) -> u64 {
        match self.disk {
            DiskState::Failed if self.replica && self.whole_at != 0 => self.whole_at,
            _ => self.confirmed,
        }
    }

    /// Whether the peer receives every write: it holds data (whole or being resynced)
    /// and is connected.
    pub fn receives_writes(&self, p: &PeerControl) -> bool {
        p.kind.diskful()
            && p.connected()
            && matches!(
                p.remote_disk(),
                Some(DiskState::UpToDate | DiskState::Inconsistent)
            )
    }

    /// Voting peers that are connected and, by `heard`, heard from recently.
    pub fn reachable_voters(&self, heard: impl Fn(NodeId) -> bool) -> usize {
        self.peers
            .iter()
            .filter(|p| p.kind.votes() && p.connected() && heard(p.id))
            .count()
    }

    /// Whether a write of this Primary sent to `receiving` only calls for a new
    /// generation (see [`Event::Rotate`]): a replica that misses it may still share
    /// the current one (it was not started for that replica, or the replica caught
    /// up with it since). Also
    /// on a Primary without a whole replica of its own: the generation names the
    /// data of the whole replicas that take its writes; without any, there is none to
    /// name (and the write is not acknowledged).
    pub fn rotation_due(&self, receiving: &[NodeId]) -> bool {
        let whole_peer = receiving.iter().any(|id| {
            self.peer(*id)
                .is_some_and(|p| p.remote_disk() == Some(DiskState::UpToDate))
        });
        self.writers > 0
            && (self.up_to_date() || whole_peer)
            && self.peers.iter().any(|p| {
                p.kind.diskful() && !receiving.contains(&p.id) && p.fenced != self.gens.current.0
            })
    }

    /// Voting peers that are connected, heard from (by `heard`), and report this
    /// node's current generation: they have confirmed it, and would refuse to promote
    /// a replica of an older one. Not one that says it is whole while this node knows
    /// it lacks changes (a resync to it is due or under way): it could be promoted
    /// with the generation and without the data.
    pub fn voters_agreeing(&self, heard: impl Fn(NodeId) -> bool) -> usize {
        let current = self.gens.current.0;
        self.reachable_voters(|id| {
            heard(id)
                && self.peer(id).is_some_and(|p| {
                    let lacking = p.lacking || matches!(p.sync, Sync::Source { .. });
                    p.remote.is_some_and(|s| {
                        s.generation == current && !(lacking && s.disk == DiskState::UpToDate)
                    })
                })
        })
    }

    /// Why resync data from `source` is declined, if it is. Only a Primary's own
    /// resync is ordered with its writes (it holds the range while a piece travels):
    /// data a Secondary read could land after a newer write of the Primary, be it
    /// another peer or this node. The Primary resyncs this replica instead, or, if
    /// this node is the Primary, the resync runs once it is closed.
    pub fn declines_resync_from(&self, source: NodeId) -> Option<String> {
        if self.peer(source).is_some_and(PeerControl::is_primary) {
            return None;
        }
        if self.writers > 0 {
            return Some("this node is Primary; its replica is resynced once it is closed".into());
        }
        let source_gen = self
            .peer(source)
            .and_then(|p| p.remote)
            .map(|s| s.generation);
        if self.up_to_date() && source_gen != Some(self.gens.current.0) {
            // A resync within a connection runs between replicas in step; one of
            // them moved on meanwhile.
            return Some(format!(
                "node id {source} is not at this replica's generation"
            ));
        }
        (self.primary_besides(source))
            .map(|p| format!("node id {} is Primary and resyncs this replica", p.id))
    }

    /// This replica is not whole, and no peer resyncs it.
    pub fn resynced_by_none(&self) -> bool {
        self.replica
            && self.disk == DiskState::Inconsistent
            && !self.peers.iter().any(|q| q.sync == Sync::Target)
    }

    /// A connected peer other than `except` that is Primary.
    pub fn primary_besides(&self, except: NodeId) -> Option<&PeerControl> {
        self.peers
            .iter()
            .find(|p| p.id != except && p.connected() && p.is_primary())
    }

    /// The generations this node had before its current one, newest first.
    pub fn history(&self) -> History {
        let mut line = self.gens.line().skip(1);
        std::array::from_fn(|_| line.next().unwrap_or_default().0)
    }

    /// Whether the persisted part (disk state, generations, bitmap generations) differs.
    pub fn persisted_differs(&self, other: &Control) -> bool {
        self.replica
            && (self.disk != other.disk
                || self.gens != other.gens
                || self.whole_at != other.whole_at
                || self.confirmed != other.confirmed
                || self
                    .peers
                    .iter()
                    .map(|p| (p.id, p.mark))
                    .ne(other.peers.iter().map(|p| (p.id, p.mark))))
    }

    fn peer_mut(&mut self, id: NodeId) -> Result<&mut PeerControl, Refused> {
        self.peers
            .iter_mut()
            .find(|p| p.id == id)
            .ok_or_else(|| Refused(format!("node id {id} is not a peer of this volume")))
    }

    fn set_sync(&mut self, id: NodeId, next: Sync) -> Result<(), Refused> {
        let p = self.peer_mut(id)?;
        if !p.sync.allows(next) {
            return Err(Refused(format!(
                "no resync state change from {:?} to {next:?} with node id {id}",
                p.sync
            )));
        }
        p.sync = next;
        Ok(())
    }

    /// Starts tracking changes for `id` if this replica is whole and tracks none yet
    /// for it: the generation both still share.
    fn begin_tracking(&mut self, id: NodeId) {
        let (up, current) = (self.up_to_date(), self.gens.current.0);
        let replica = self.replica;
        if let Ok(p) = self.peer_mut(id)
            && replica
            && p.kind.diskful()
            && up
            && p.mark == 0
        {
            p.mark = current;
        }
    }

    /// A generation this replica had at some point, or recorded for a peer.
    fn knows_generation(&self, g: u64) -> bool {
        self.line().any(|x| x == g) || self.peers.iter().any(|p| p.mark == g)
    }

    /// As Primary, starts generation `next` for writes some replica no longer takes:
    /// the current one becomes the bitmap generation (what a replica that stopped
    /// there lacks is tracked from it).
    fn start_generation(&mut self, next: u64) {
        let g = &mut self.gens;
        g.remember(g.bitmap);
        g.bitmap = g.current;
        g.current = GenerationId(next);
    }

    /// This replica's generations, newest first: current, bitmap, history (0: none).
    fn line(&self) -> impl Iterator<Item = u64> + '_ {
        self.gens.line().map(|g| g.0)
    }

    /// `g` becomes the current generation, the old one moving into history; and the
    /// confirmed one, on a node whose replica is whole (or that holds none).
    fn adopt_generation(&mut self, g: u64) {
        let gens = &mut self.gens;
        if gens.current.0 != g {
            gens.remember(gens.current);
            gens.current = GenerationId(g);
        }
        if !self.replica || self.disk == DiskState::UpToDate {
            self.confirmed = g;
        }
    }
}

/// `history` with `g` as its newest generation; the oldest is forgotten.
fn pushed(mut history: History, g: u64) -> History {
    history.rotate_right(1);
    history[0] = g;
    history
}

fn require_up(c: &Control, peer: NodeId, epoch: u64) -> Result<(), Refused> {
    match c.peer(peer).map(|p| &p.link) {
        Some(Link::Up { epoch: e }) if *e == epoch => Ok(()),
        _ => Err(Refused(format!(
            "connection {epoch} to node id {peer} is not the live one"
        ))),
    }
}

/// Applies `event` to `c`: the next state and its actions, or why it is refused.
pub(crate) fn step(c: &Control, event: &Event) -> Result<Stepped, Refused> {
    let mut n = c.clone();
    let mut actions = Vec::new();
    match event {
        Event::Connected {
            peer,
            epoch,
            state,
            their_mark,
            their_history,
            their_confirmed,
            my_dirty,
            theirs,
        } => {
            let them = Side::replica(
                state.disk,
                state.generation,
                *their_mark,
                !theirs.is_empty(),
                *their_history,
                *their_confirmed,
                state.role == Role::Primary && !n.two_primaries,
            );
            connected(
                &mut n,
                &mut actions,
                (*peer, *epoch),
                *state,
                them,
                (*my_dirty, theirs),
            )?;
            if let Ok(p) = n.peer_mut(*peer)
                && p.epoch() == Some(*epoch)
            {
                p.confirmed = *their_confirmed;
            }
        }
        Event::Disconnected { peer, epoch } => {
            let Ok(p) = n.peer_mut(*peer) else {
                // It left the spec, and its state with it.
                return Ok((n, actions));
            };
            match p.link {
                Link::Up { epoch: e } if e == *epoch => p.link = Link::Down,
                // Refused while connected: this connection's state ends all the same.
                Link::Refused(_) if p.remote.is_some() => {}
                // An older connection, replaced already: nothing of it is left.
                _ => return Ok((n, actions)),
            }
            let was_primary = p.is_primary();
            let was_source = p.sync == Sync::Target;
            p.forget_connection();
            n.begin_tracking(*peer);
            // This replica is not whole and the peer that resynced it is gone (a
            // Primary that died mid-resync, say): the peers holding whole data were
            // declined as sources meanwhile, so a new handshake with them starts the
            // resync again (without, the replica would wait for a reconnect, and a new
            // Primary for its confirmation, forever).
            if was_source && n.resynced_by_none() {
                let whole = (n.peers.iter())
                    .filter(|q| q.connected())
                    .filter(|q| q.remote.is_some_and(|s| s.disk == DiskState::UpToDate));
                actions.extend(whole.map(|q| Action::Disconnect(q.id)));
            }
            if was_primary && n.replica {
                // Its last writes may have reached some replicas and not others.
                actions.push(Action::RecentUncertain(*peer));
            } else if n.replica {
                // The changes taken lately from a Primary may have missed it, its own
                // link to the Primary being dead already, unnoticed.
                actions.push(Action::MarkRecent(*peer));
            }
            actions.push(Action::Notify);
        }
        Event::PeerState { peer, state } => peer_state(&mut n, &mut actions, *peer, *state)?,
        Event::PromotionAsked { peer } => {
            let own = promotion::Own {
                id: n.me,
                primary: n.writers > 0,
                promoting: n.promoting,
                other_primary: n.primary_besides(*peer).is_some(),
            };
            if !promotion::grant(own, *peer, n.two_primaries) {
                return Err(Refused(format!(
                    "node id {peer} may not become Primary: this node is Primary, sees another, or is being promoted"
                )));
            }
            let mine = n.gens.current.0;
            // (An asker holding no data of its own, diskless or generation 0 as far as
            // this node knows, writes to the whole replicas, which the handshake keeps
            // on the newest line.)
            let asker = n
                .peer(*peer)
                .filter(|p| p.remote.is_some() && p.kind.diskful());
            if let Some(p) = asker
                && let Some(g) = p.remote.map(|s| s.generation)
                && mine != 0
                && g != 0
                && g != mine
                && !p.history.contains(&mine)
            {
                // Its data does not descend from the generation this node holds or
                // confirmed: it is older (writes were acknowledged since that it does
                // not hold), or of another line.
                return Err(Refused(format!(
                    "node id {peer} may not become Primary: its data generation {g:016x} does not descend from {mine:016x}"
                )));
            }
            let p = n.peer_mut(*peer)?;
            if let Some(s) = &mut p.remote {
                s.role = Role::Primary;
            }
            // Granted to a lower node id asking at the same time: this node's own
            // promotion is over, whatever its peers answer.
            n.promoting = n.promoting && n.two_primaries;
            actions.extend([Action::PrimaryAppeared(*peer), Action::Notify]);
        }
        Event::PromotionStarted { quorum } => {
            if n.writers > 0 || n.promoting {
                return Err(Refused(
                    "this node is Primary or being promoted already".into(),
                ));
            }
            if !n.two_primaries
                && let Some(p) = n.peers.iter().find(|p| p.is_primary())
            {
                return Err(Refused(format!("node id {} is Primary", p.id)));
            }
            if !quorum {
                // A node cut off from the majority may not take over: the majority
                // may have a Primary already, which it cannot see.
                return Err(Refused("this node has no quorum".into()));
            }
            if n.replica && n.disk == DiskState::Failed {
                return Err(Refused(
                    "this node's replica has failed (see `tandem health`): open the volume on another node until its pool is repaired and tandemd restarted".into(),
                ));
            }
            if n.replica && n.disk != DiskState::UpToDate {
                // Its writes would land on a replica that is not whole, on a line of
                // generations the handshake cannot vouch for.
                return Err(Refused(format!(
                    "this node's replica is {}; it can be promoted once UpToDate",
                    n.disk
                )));
            }
            n.promoting = true;
        }
        Event::PromotionEnded { agreed, quorum } => {
            if !n.promoting {
                return Err(Refused("no promotion is under way".into()));
            }
            n.promoting = false;
            // Meanwhile a peer may have been granted a promotion by this node (a lower
            // node id asking at the same time), or the votes lost with peers that
            // went away unasked.
            let other = n.peers.iter().any(|p| p.connected() && p.is_primary());
            let whole = !n.replica || n.disk == DiskState::UpToDate;
            if *agreed && *quorum && whole && (n.two_primaries || !other) {
                n.writers = 1;
            }
            // Either way: peers that agreed take this node for Primary; correct them
            // if it is not.
            actions.push(Action::Announce);
        }
        Event::Opened => {
            if n.writers == 0 {
                return Err(Refused("this node is not Primary".into()));
            }
            n.writers += 1;
        }
        Event::Closed => {
            if n.writers == 0 {
                return Err(Refused("the volume is not open for writing here".into()));
            }
            n.writers -= 1;
            if n.writers == 0 {
                actions.extend([Action::ClearActivityLog, Action::Announce]);
                if n.replica && n.disk != DiskState::UpToDate {
                    // Its resync was declined while Primary: a new handshake with each
                    // whole peer starts it.
                    let whole = (n.peers.iter()).filter(|p| {
                        n.tracks(p) && p.connected() && p.remote_disk() == Some(DiskState::UpToDate)
                    });
                    actions.extend(whole.map(|p| Action::Disconnect(p.id)));
                }
            }
        }
        Event::ResyncStarted { peer, epoch, total } => {
            require_up(&n, *peer, *epoch)?;
            n.set_sync(*peer, Sync::Source { total: *total })?;
            actions.push(Action::Notify);
        }
        Event::ResyncSent { peer, epoch } => {
            require_up(&n, *peer, *epoch)?;
            let p = n.peer_mut(*peer)?;
            if !matches!(p.sync, Sync::Source { .. }) {
                return Err(Refused(format!("no resync to node id {peer} is under way")));
            }
            p.sync = Sync::Idle;
            p.mark = 0;
            p.lacking = false;
            // It takes this node's generation as it applies the end of the resync.
            p.fenced = 0;
            actions.extend([Action::SettleSuspect, Action::Notify]);
        }
        Event::ResyncRefused {
            peer,
            epoch,
            declined,
        } => {
            require_up(&n, *peer, *epoch)?;
            let (up, current) = (n.up_to_date(), n.gens.current.0);
            let p = n.peer_mut(*peer)?;
            p.sync = Sync::Idle;
            if *declined {
                p.deferred = true;
                // It may report UpToDate at this generation already.
                settle_deferred(p, up, current, &mut actions);
            } else {
                p.resync_due = true;
            }
            actions.push(Action::Notify);
        }
        Event::ResyncRetry { peer, epoch } => {
            require_up(&n, *peer, *epoch)?;
            let (up, current) = (n.up_to_date(), n.gens.current.0);
            let p = n.peer_mut(*peer)?;
            // Only between replicas in step (same generation): anything else is the
            // handshake's to decide, on a new connection.
            let in_step = p.remote.is_some_and(|s| s.generation == current);
            if !p.resync_due || p.sync != Sync::Idle || !up || !in_step || p.is_primary() {
                return Err(Refused(format!(
                    "no resync retry is due for node id {peer}"
                )));
            }
            p.resync_due = false;
            actions.push(Action::StartResync {
                peer: *peer,
                epoch: *epoch,
            });
        }
        Event::ResyncDone {
            peer,
            generation,
            primary_elsewhere,
        } => {
            let p = n.peer_mut(*peer)?;
            if p.sync != Sync::Target {
                return Err(Refused(format!(
                    "resync end from node id {peer}, which this replica is not SyncTarget of"
                )));
            }
            p.sync = Sync::Idle;
            // The source's earlier generations as its Hello (and states since) gave
            // them. It may have moved on since it last said (a Hello read long after
            // it was sent, a new generation not yet announced): the one it last
            // reported is then the newest of them, or this replica's line would miss
            // it and later be taken for another's (seen: a split brain called
            // between two replicas of one line).
            let h = match p.remote.map(|s| s.generation) {
                Some(reported) if reported != 0 && reported != *generation => {
                    pushed(p.history, reported)
                }
                _ => p.history,
            };
            if let Some(primary) = n.primary_besides(*peer).map(|q| q.id)
                && n.declines_resync_from(*peer).is_some()
            {
                // A Primary appeared while a Secondary resynced this replica: its
                // writes may have landed among the pieces. The Primary resyncs it,
                // after a new handshake.
                actions.extend([Action::Disconnect(primary), Action::Notify]);
                return Ok((n, actions));
            }
            let was = n.disk;
            if n.replica {
                // Its data is the source's now, and so is its line of generations:
                // what it was before (or only knew of) is gone. Whole, but behind a
                // Primary whose writes do not reach it: Outdated, until a handshake
                // with that Primary resyncs it.
                n.disk = if *primary_elsewhere {
                    DiskState::Outdated
                } else {
                    DiskState::UpToDate
                };
                // Its data changed by what the source sent, which its bitmaps for
                // the other peers do not hold: they no longer tell alone what those
                // lack (a handshake resyncs them in full, or by generation).
                for q in n.peers.iter_mut().filter(|q| q.id != *peer) {
                    q.mark = 0;
                }
                n.gens = Generations::from_line(std::iter::once(*generation).chain(h));
                n.confirmed = *generation;
            }
            actions.extend([
                Action::ResyncFinished(*peer),
                Action::SettleSuspect,
                Action::Announce,
            ]);
            if was != DiskState::UpToDate {
                // Replicas that waited alongside this one for an UpToDate peer can now
                // be resynced from here: a new handshake decides it.
                for q in &n.peers {
                    if q.id != *peer
                        && n.tracks(q)
                        && q.connected()
                        && q.sync == Sync::Idle
                        && matches!(
                            q.remote_disk(),
                            Some(DiskState::Inconsistent | DiskState::Outdated)
                        )
                    {
                        actions.push(Action::Disconnect(q.id));
                    }
                }
            }
        }
        Event::TargetDeclined { peer } => {
            let p = n.peer_mut(*peer)?;
            if p.sync == Sync::Target {
                p.sync = Sync::Idle;
                actions.push(Action::Notify);
                // Not whole, and resynced by nobody now: a new handshake with the
                // Primary starts its resync.
                let resynced = n.peers.iter().any(|q| q.sync == Sync::Target);
                if n.disk == DiskState::Inconsistent
                    && !resynced
                    && let Some(primary) = n.primary_besides(*peer)
                {
                    actions.push(Action::Disconnect(primary.id));
                }
            }
        }
        Event::Verify { peer, done } => {
            let next = done.map_or(Sync::Idle, |done| Sync::Verifying { done });
            if done.is_none() && !matches!(n.peer_mut(*peer)?.sync, Sync::Verifying { .. }) {
                return Err(Refused(format!(
                    "no verify with node id {peer} is under way"
                )));
            }
            let kind_changes =
                std::mem::discriminant(&n.peer_mut(*peer)?.sync) != std::mem::discriminant(&next);
            n.set_sync(*peer, next)?;
            if kind_changes {
                actions.push(Action::Notify);
            }
        }
        Event::Confirmed { generation } => {
            if *generation != n.gens.current.0 {
                return Err(Refused(format!(
                    "generation {generation:016x} is not the current one"
                )));
            }
            n.confirmed = *generation;
        }
        Event::ChangeFailed { peer } => {
            let p = n.peer_mut(*peer)?;
            if p.connected() {
                p.resync_due = true;
                p.lacking = true;
            }
        }
        Event::ResyncAgain { peer } => {
            let p = n.peer_mut(*peer)?;
            if p.connected() {
                p.resync_due = true;
            }
        }
        Event::Track { peer } => n.begin_tracking(*peer),
        Event::Rotate { receiving, next } => {
            if !n.rotation_due(receiving) {
                return Ok((n, actions));
            }
            let missing: Vec<NodeId> = (n.peers.iter())
                .filter(|p| p.kind.diskful() && !receiving.contains(&p.id))
                .map(|p| p.id)
                .collect();
            for id in &missing {
                n.begin_tracking(*id);
            }
            n.start_generation(*next);
            for id in &missing {
                n.peer_mut(*id)?.fenced = *next;
            }
            actions.extend([Action::NewGeneration(*next), Action::Announce]);
        }
        Event::LocalIoError { next } => {
            if !n.replica {
                return Err(Refused("this node holds no replica".into()));
            }
            if n.disk != DiskState::Failed {
                n.disk = DiskState::Failed;
                actions.extend([Action::Detached, Action::Announce]);
                if n.writers > 0 {
                    // The Primary's own replica stops taking its writes, as a peer's
                    // does when it misses one: the others move on to a new generation
                    // before the next write is acknowledged. A dead disk keeps the
                    // generation it had, which once repaired is one they moved on
                    // from: it is resynced, and never passes for whole (nor sends the
                    // extents its crash left in the activity log to them).
                    n.start_generation(*next);
                    actions.push(Action::NewGeneration(*next));
                }
            }
        }
        Event::Trust { next } => trust(&mut n, &mut actions, *next)?,
        Event::Invalidate => {
            if !n.replica {
                return Err(Refused("this node holds no replica".into()));
            }
            if n.writers > 0 {
                return Err(Refused(
                    "the volume is open on this node; close it first".into(),
                ));
            }
            // It holds no data of its own now: any whole peer's is taken in full.
            n.disk = DiskState::Inconsistent;
            n.adopt_generation(0);
            n.confirmed = 0;
            actions.push(Action::Announce);
            reconnect(&mut n, &mut actions);
        }
        Event::RolledBack { generation, holds } => {
            if n.writers > 0 {
                return Err(Refused(
                    "the volume is open on this node; close it first".into(),
                ));
            }
            if let Some(p) = n.primary_besides(n.me) {
                return Err(Refused(format!("node id {} is Primary", p.id)));
            }
            // Every participant starts one new line together, with nothing before it:
            // no earlier generation or bitmap describes the data any more. A replica
            // without the snapshot holds nothing of its own: it is resynced in full.
            let fresh = n.replica && !holds;
            let current = if fresh { 0 } else { *generation };
            n.gens = Generations {
                current: GenerationId(current),
                ..Generations::default()
            };
            n.confirmed = current;
            if n.replica {
                n.disk = if fresh {
                    DiskState::Inconsistent
                } else {
                    DiskState::UpToDate
                };
            }
            for p in &mut n.peers {
                p.mark = 0;
                p.deferred = false;
                p.resync_due = false;
                p.lacking = false;
                actions.push(Action::ClearAll(p.id));
            }
            actions.push(Action::Announce);
            reconnect(&mut n, &mut actions);
        }
        Event::Reconnect => reconnect(&mut n, &mut actions),
        Event::Refuse { peer, why } => {
            let p = n.peer_mut(*peer)?;
            p.link = Link::Refused(why.clone());
            actions.extend([Action::Disconnect(*peer), Action::Notify]);
        }
        Event::SpecChanged {
            peers,
            two_primaries,
        } => {
            n.two_primaries = *two_primaries;
            let old = std::mem::take(&mut n.peers);
            for (id, kind, fresh) in peers {
                let kept = old.iter().find(|p| p.id == *id);
                n.peers.push(match kept {
                    Some(p) if !fresh => PeerControl {
                        kind: *kind,
                        ..p.clone()
                    },
                    // The superblock keeps the bitmap generation by node id.
                    _ => PeerControl::new(*id, *kind, kept.map_or(0, |p| p.mark)),
                });
            }
            actions.push(Action::Announce);
        }
    }
    if n.up_to_date() {
        n.whole_at = n.gens.current.0;
    }
    Ok((n, actions))
}

/// See [`Event::Trust`].
fn trust(n: &mut Control, actions: &mut Vec<Action>, next: u64) -> Result<(), Refused> {
    if !n.replica {
        return Err(Refused("this node holds no replica".into()));
    }
    if n.writers > 0 {
        return Err(Refused(
            "the volume is open on this node; close it first".into(),
        ));
    }
    if n.disk == DiskState::UpToDate {
        return Err(Refused("this node's replica is UpToDate already".into()));
    }
    if n.whole_at == 0 {
        return Err(Refused(
            "this replica's data was never recorded whole: it cannot be trusted".into(),
        ));
    }
    let line: Vec<u64> = n.line().collect();
    let at = |g: u64| line.iter().position(|x| *x == g);
    for p in n.peers.iter().filter(|p| p.kind.diskful()) {
        let Some(s) = p.remote.filter(|_| p.connected()) else {
            return Err(Refused(format!(
                "node id {} is not connected: its replica may hold newer data (connect every replica's node first)",
                p.id
            )));
        };
        if s.disk == DiskState::UpToDate {
            return Err(Refused(format!(
                "node id {} holds whole data: it resyncs this replica",
                p.id
            )));
        }
        // Where the peer's data was last whole, on the line of generations this
        // replica followed (the same Primaries'): at or before its own whole point,
        // or the peer holds newer data.
        let newer = match (at(p.confirmed), at(n.whole_at)) {
            _ if p.confirmed == 0 || p.confirmed == n.whole_at => false,
            (Some(theirs), Some(mine)) => theirs < mine,
            _ => true,
        };
        if newer {
            return Err(Refused(format!(
                "node id {} holds data whole at generation {:016x}, newer than this replica's ({:016x}): another replica failed after this one",
                p.id, p.confirmed, n.whole_at
            )));
        }
    }
    // A new line, descending from every generation this replica followed (the others
    // are at one of them: they are found behind it, and resynced).
    let mut gens = vec![next];
    for g in line {
        if g != 0 && !gens.contains(&g) {
            gens.push(g);
        }
    }
    n.gens = Generations::from_line(gens);
    n.disk = DiskState::UpToDate;
    n.confirmed = next;
    actions.push(Action::Announce);
    reconnect(n, actions);
    Ok(())
}

fn reconnect(n: &mut Control, actions: &mut Vec<Action>) {
    for p in &mut n.peers {
        if matches!(p.link, Link::Refused(_)) {
            p.link = Link::Down;
        }
        actions.push(Action::Disconnect(p.id));
    }
    actions.push(Action::Notify);
}

fn connected(
    n: &mut Control,
    actions: &mut Vec<Action>,
    (id, epoch): (NodeId, u64),
    state: State,
    them: Side,
    (my_dirty, theirs): (bool, &[(u64, u64)]),
) -> Result<(), Refused> {
    let me_first = n.me < id;
    let p = n
        .peer(id)
        .ok_or_else(|| Refused(format!("node id {id} is not a peer")))?;
    if let Link::Refused(why) = &p.link {
        return Err(Refused(format!("node id {id} is refused: {why}")));
    }
    if !n.replica
        && state.role == Role::Primary
        && n.gens.current.0 != 0
        && state.generation != n.gens.current.0
        && !them.moved_on_from(n.gens.current.0)
    {
        // This node confirmed a generation this Primary does not descend from: it
        // was promoted elsewhere and lost quorum meanwhile, or its data diverged.
        return Err(Refused(format!(
            "node id {id} is Primary of generation {:016x}, which does not descend from {:016x}, the one this node confirmed",
            state.generation, n.gens.current.0
        )));
    }
    if state.role == Role::Primary && !n.two_primaries {
        // One of them was promoted while they were apart (the other without quorum):
        // they connect once one of them is closed. A third node connects to only one
        // of them, or each would count its vote.
        if n.writers > 0 {
            return Err(Refused(format!(
                "node id {id} and this node are both Primary; close the volume on one of them"
            )));
        }
        if let Some(other) = n.primary_besides(id) {
            return Err(Refused(format!(
                "node id {id} and node id {} are both Primary; close the volume on one of them",
                other.id
            )));
        }
    }
    let direction = if !n.tracks(p) || state.disk == DiskState::Diskless {
        // A peer without a replica (yet: its spec may still say diskless) gets no data
        // until it reconnects with one.
        Direction::InSync
    } else {
        let me = Side::replica(
            n.disk,
            n.gens.current.0,
            p.mark,
            my_dirty,
            n.history(),
            n.confirmed,
            n.writers > 0,
        );
        handshake::decide(me, them, me_first)
    };
    if direction == Direction::Target
        && let Some(source) = n
            .peers
            .iter()
            .find(|q| q.id != id && q.sync == Sync::Target)
    {
        // One source at a time: two could interleave pieces of different data. The
        // peer dials again, and the handshake decides anew once this resync is over.
        return Err(Refused(format!(
            "this replica is being resynced from node id {}; node id {id} waits",
            source.id
        )));
    }
    if let Direction::Diverged(why) = direction {
        let p = n.peer_mut(id)?;
        p.forget_connection();
        p.link = Link::Refused(why.clone());
        actions.extend([
            Action::Diverged { peer: id, why },
            Action::Disconnect(id),
            Action::Notify,
        ]);
        return Ok(());
    }
    let sync = match direction {
        Direction::Source { .. } => Sync::Source { total: 0 },
        Direction::Target => Sync::Target,
        _ => Sync::Idle,
    };
    // A Primary without data moved on from this replica's generation by one step and
    // does not hold it among the replicas that missed its writes since (its Hello's
    // mark for this node is 0): this replica took every write of the new generation
    // it sent, and follows it, as it would had the announcement not been lost with
    // the connection before. (Else it heard of a generation it never had: left
    // behind.)
    let previous =
        (state.role == Role::Primary && state.disk == DiskState::Diskless && them.mark == 0)
            .then_some(them.history[0])
            .filter(|g| *g != 0);
    hear_generation(n, actions, id, state, sync, previous);
    let current = n.gens.current.0;
    let p = n.peer_mut(id)?;
    p.forget_connection();
    p.link = Link::Up { epoch };
    p.remote = Some(state);
    p.history = them.history;
    p.heard_at(state, current);
    // The connection comes up already in the resync the handshake decided, so its
    // status never shows it Established in between.
    p.sync = sync;
    if state.role == Role::Primary {
        actions.push(Action::PrimaryAppeared(id));
    }
    match direction {
        // Nothing differs: the bitmap for the peer starts afresh when it next misses
        // a write.
        Direction::InSync if !my_dirty => n.peer_mut(id)?.mark = 0,
        Direction::Behind => {
            n.disk = DiskState::Outdated;
            actions.extend([
                Action::LeftBehind {
                    peer: id,
                    generation: state.generation,
                },
                Action::Announce,
            ]);
        }
        Direction::Target => {
            // Resyncs this side was sending others would go on with data about to
            // change under them: they end, and those peers connect afresh.
            let sending = (n.peers.iter())
                .filter(|q| q.id != id && matches!(q.sync, Sync::Source { .. }))
                .map(|q| Action::Disconnect(q.id));
            actions.extend(sending);
            // The source resyncs what this side knew to differ as well.
            n.peer_mut(id)?.mark = 0;
            n.disk = DiskState::Inconsistent;
            actions.extend([
                Action::ClearAll(id),
                Action::ResyncFrom(id),
                Action::Announce,
            ]);
        }
        Direction::Source { full } => {
            if full {
                actions.push(Action::MarkAll(id));
            } else if !theirs.is_empty() {
                actions.push(Action::Mark {
                    peer: id,
                    ranges: theirs.to_vec(),
                });
            }
            actions.push(Action::StartResync { peer: id, epoch });
        }
        _ => {}
    }
    actions.push(Action::Notify);
    Ok(())
}

fn peer_state(
    n: &mut Control,
    actions: &mut Vec<Action>,
    id: NodeId,
    state: State,
) -> Result<(), Refused> {
    let p = n
        .peer(id)
        .ok_or_else(|| Refused(format!("node id {id} is not a peer")))?;
    if !p.connected() {
        return Err(Refused(format!(
            "state from node id {id}, which is not connected"
        )));
    }
    let previous = p.remote.map(|s| s.generation);
    hear_generation(n, actions, id, state, p.sync, previous);
    let (up, current) = (n.up_to_date(), n.gens.current.0);
    // Two peers became Primary, each granted by a part of the cluster that could not
    // see the other: this node stays with the one it knew first, or its vote would
    // count for both.
    let second_primary = state.role == Role::Primary
        && !n.two_primaries
        && n.peer(id).is_some_and(|p| !p.is_primary())
        && n.primary_besides(id).is_some();
    // A peer whose disk just failed may have lost writes it had acknowledged and not
    // yet made durable (a file system shut down drops them): when it comes back with
    // the disk repaired, all of it is resynced, not only what it missed since.
    let disk_failed = state.disk == DiskState::Failed
        && n.peer(id).is_some_and(|p| {
            p.kind.diskful() && p.remote.is_none_or(|s| s.disk != DiskState::Failed)
        });
    if disk_failed && n.replica && up {
        n.begin_tracking(id);
        actions.push(Action::MarkAll(id));
    }
    let p = n.peer_mut(id)?;
    let was_primary = p.is_primary();
    let changed = p.remote != Some(state);
    if let Some(old) = p.remote.filter(|old| old.generation != state.generation) {
        p.history = pushed(p.history, old.generation);
    }
    p.remote = Some(state);
    p.heard_at(state, current);
    if state.role == Role::Primary && !was_primary {
        actions.push(Action::PrimaryAppeared(id));
        // A Primary resyncs the replicas that are not whole, from its handshake: one
        // that no one resyncs (its source, or the Primary it declined others for, went
        // away) reconnects to the new Primary so that its handshake does.
        if n.resynced_by_none() && !second_primary {
            actions.push(Action::Disconnect(id));
        }
    }
    if second_primary {
        actions.push(Action::Disconnect(id));
    }
    // (Every deferred peer: this state may have moved this replica's generation to
    // theirs.)
    for q in &mut n.peers {
        settle_deferred(q, up, current, actions);
    }
    if changed {
        actions.push(Action::Notify);
    }
    Ok(())
}

/// A peer whose resync from here was declined (a Primary resynced it) reports
/// UpToDate at this replica's generation (`current`, this replica being whole: `up`):
/// what was marked for it is settled.
fn settle_deferred(p: &mut PeerControl, up: bool, current: u64, actions: &mut Vec<Action>) {
    let whole_here = p
        .remote
        .is_some_and(|s| s.disk == DiskState::UpToDate && s.generation == current);
    if p.deferred && whole_here && p.sync == Sync::Idle && up {
        p.deferred = false;
        p.mark = 0;
        actions.push(Action::ClearAll(p.id));
    }
}

/// What a peer's state says about data generations (`previous`: the generation it
/// reported before, on a live connection). A Primary's current generation becomes
/// this node's when this node follows it: a participant without data (or whose disk
/// failed) remembers it (and the ones before it); a whole replica takes it when it was at the Primary's
/// previous generation and in step with it (no resync from it due): it received
/// every write since. Either tells its peers: the Primary counts who has confirmed
/// its generation before acknowledging writes (see [`Control::voters_agreeing`]), and
/// a later promotion of a replica left behind is refused by whoever knows a newer
/// one. A replica being resynced by the Primary takes its generation too, to know it.
///
/// A whole replica connected to no Primary that hears of a generation it never had
/// was left behind while apart: from a participant without data (which only repeats
/// a Primary), it is Outdated; from a whole replica, it is Outdated too, and
/// reconnects so that the handshake resyncs it. Connected to a Primary, it waits for
/// the Primary's own word, which may merely be slower to arrive.
fn hear_generation(
    n: &mut Control,
    actions: &mut Vec<Action>,
    id: NodeId,
    state: State,
    sync: Sync,
    previous: Option<u64>,
) {
    let g = state.generation;
    if g == 0 || g == n.gens.current.0 {
        return;
    }
    let in_step = previous == Some(n.gens.current.0)
        && matches!(sync, Sync::Idle | Sync::Source { .. })
        && n.disk == DiskState::UpToDate;
    // A replica the Primary resyncs takes the generation too: it confirms it to the
    // Primary, so it must never fall back to an older line (a handshake finds a
    // whole replica of one behind it).
    // (At the handshake that makes it the Primary's target, it is not marked
    // Inconsistent yet.)
    let resynced =
        sync == Sync::Target && (n.disk == DiskState::Inconsistent || previous.is_none());
    // A replica whose disk failed holds no data any more: like a participant without
    // data, it repeats the Primary's generation, so that it still counts among the
    // voters agreeing with the Primary (a two-replica volume writes on when one disk
    // dies).
    let holds_data = n.replica && n.disk != DiskState::Failed;
    if state.role == Role::Primary && (!holds_data || in_step || resynced)
        || !n.replica && n.gens.current.0 == 0
    {
        n.adopt_generation(g);
        if resynced {
            n.confirmed = g;
        }
        actions.push(Action::Announce);
        return;
    }
    let Some(peer) = n.peer(id) else { return };
    let told_by = match (peer.kind.diskful(), state.disk) {
        (false, _) => Some(false),
        (true, DiskState::UpToDate) if sync == Sync::Idle => Some(true),
        _ => None,
    };
    let primary_here = n.peers.iter().any(|p| p.connected() && p.is_primary());
    if let Some(whole_peer) = told_by
        && n.up_to_date()
        && !primary_here
        && !n.knows_generation(g)
    {
        n.disk = DiskState::Outdated;
        actions.extend([
            Action::LeftBehind {
                peer: id,
                generation: g,
            },
            Action::Announce,
        ]);
        if whole_peer {
            actions.push(Action::Disconnect(id));
        }
    }
}

#[cfg(test)]
mod sim;
#[cfg(test)]
mod tests;
