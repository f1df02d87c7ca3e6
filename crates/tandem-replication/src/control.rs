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
use tandem_pool::{GenerationId, Generations};

use crate::handshake::{self, Direction, Side};
use crate::promotion;
use crate::wire::State;

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
}

impl PeerControl {
    pub fn new(id: NodeId, kind: ParticipantKind, mark: u64) -> PeerControl {
        PeerControl {
            id,
            kind,
            link: Link::Down,
            remote: None,
            sync: Sync::Idle,
            mark,
            deferred: false,
            resync_due: false,
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
    pub disk: DiskState,
    /// The replica's data generations; on a diskless node only `current` is used: the
    /// newest generation a Primary announced.
    pub gens: Generations,
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
        my_dirty: bool,
        theirs: Vec<(u64, u64)>,
    },
    /// Connection `epoch` to `peer` ended.
    Disconnected { peer: NodeId, epoch: u64 },
    /// The peer said what it is now.
    PeerState { peer: NodeId, state: State },
    /// A peer asks to become Primary.
    PromotionAsked { peer: NodeId, two_primaries: bool },
    /// This node starts asking its peers to agree to its promotion.
    PromotionStarted { two_primaries: bool },
    /// The peers answered: all agreed, or not.
    PromotionEnded { agreed: bool },
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
    ResyncDone { peer: NodeId, generation: u64 },
    /// This node declines a resync from `peer` (another peer is Primary).
    TargetDeclined { peer: NodeId },
    /// Online verify against `peer`: `done` bytes compared, or ended (`None`).
    Verify { peer: NodeId, done: Option<u64> },
    /// `peer` failed a replicated change while connected.
    ChangeFailed { peer: NodeId },
    /// Changes stop reaching `peer`: start tracking them for it.
    Track { peer: NodeId },
    /// A write is about to leave for `receiving` only: if a replica that stops
    /// receiving writes still shares the current generation, start generation `next`.
    Rotate { receiving: Vec<NodeId>, next: u64 },
    /// The local replica failed an I/O.
    LocalIoError,
    /// An operator discards the local replica's data.
    Invalidate,
    /// Every peer connects afresh (refused ones too), so the handshake decides again.
    Reconnect,
    /// `peer` is refused until the spec changes or an operator reconnects it.
    Refuse { peer: NodeId, why: String },
    /// The spec changed: these are the peers now; `fresh` ones start over (new, or
    /// reachable elsewhere), the others keep their connection and change kind only.
    SpecChanged {
        peers: Vec<(NodeId, ParticipantKind, bool)>,
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

    /// A connected peer other than `except` that is Primary.
    pub fn primary_besides(&self, except: NodeId) -> Option<&PeerControl> {
        self.peers
            .iter()
            .find(|p| p.id != except && p.connected() && p.is_primary())
    }

    /// Whether the persisted part (disk state, generations, bitmap generations) differs.
    pub fn persisted_differs(&self, other: &Control) -> bool {
        self.replica
            && (self.disk != other.disk
                || self.gens != other.gens
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
        let gens = &self.gens;
        [gens.current, gens.bitmap, gens.history[0], gens.history[1]]
            .iter()
            .any(|x| x.0 == g)
            || self.peers.iter().any(|p| p.mark == g)
    }

    /// `g` becomes the current generation, the old one moving into history.
    fn adopt_generation(&mut self, g: u64) {
        let gens = &mut self.gens;
        if gens.current.0 != g {
            gens.history = [gens.current, gens.history[0]];
            gens.current = GenerationId(g);
        }
    }
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
            my_dirty,
            theirs,
        } => connected(
            &mut n,
            &mut actions,
            *peer,
            *epoch,
            *state,
            *their_mark,
            (*my_dirty, theirs),
        )?,
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
            p.forget_connection();
            n.begin_tracking(*peer);
            actions.push(Action::Notify);
        }
        Event::PeerState { peer, state } => peer_state(&mut n, &mut actions, *peer, *state)?,
        Event::PromotionAsked {
            peer,
            two_primaries,
        } => {
            let own = promotion::Own {
                id: n.me,
                primary: n.writers > 0,
                promoting: n.promoting,
            };
            if !promotion::grant(own, *peer, *two_primaries) {
                return Err(Refused(format!(
                    "node id {peer} may not become Primary: this node is Primary or being promoted"
                )));
            }
            let p = n.peer_mut(*peer)?;
            if let Some(s) = &mut p.remote {
                s.role = Role::Primary;
            }
            actions.extend([Action::PrimaryAppeared(*peer), Action::Notify]);
        }
        Event::PromotionStarted { two_primaries } => {
            if n.writers > 0 || n.promoting {
                return Err(Refused(
                    "this node is Primary or being promoted already".into(),
                ));
            }
            if !two_primaries && let Some(p) = n.peers.iter().find(|p| p.is_primary()) {
                return Err(Refused(format!("node id {} is Primary", p.id)));
            }
            n.promoting = true;
        }
        Event::PromotionEnded { agreed } => {
            if !n.promoting {
                return Err(Refused("no promotion is under way".into()));
            }
            n.promoting = false;
            if *agreed {
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
            actions.extend([Action::SettleSuspect, Action::Notify]);
        }
        Event::ResyncRefused {
            peer,
            epoch,
            declined,
        } => {
            require_up(&n, *peer, *epoch)?;
            let p = n.peer_mut(*peer)?;
            p.sync = Sync::Idle;
            if *declined {
                p.deferred = true;
            } else {
                p.resync_due = true;
            }
            actions.push(Action::Notify);
        }
        Event::ResyncRetry { peer, epoch } => {
            require_up(&n, *peer, *epoch)?;
            let up = n.up_to_date();
            let p = n.peer_mut(*peer)?;
            if !p.resync_due || p.sync != Sync::Idle || !up {
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
        Event::ResyncDone { peer, generation } => {
            let p = n.peer_mut(*peer)?;
            if p.sync != Sync::Target {
                return Err(Refused(format!(
                    "resync end from node id {peer}, which this replica is not SyncTarget of"
                )));
            }
            p.sync = Sync::Idle;
            let was = n.disk;
            if n.replica {
                n.adopt_generation(*generation);
                n.disk = DiskState::UpToDate;
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
        Event::ChangeFailed { peer } => {
            let p = n.peer_mut(*peer)?;
            if p.connected() {
                p.resync_due = true;
            }
        }
        Event::Track { peer } => n.begin_tracking(*peer),
        Event::Rotate { receiving, next } => {
            if !n.up_to_date() {
                // Only data that is whole gets a generation others can descend from.
                return Ok((n, actions));
            }
            let mut stale = false;
            let missing: Vec<NodeId> = n
                .peers
                .iter()
                .filter(|p| n.tracks(p) && !receiving.contains(&p.id))
                .map(|p| p.id)
                .collect();
            for id in missing {
                n.begin_tracking(id);
                stale |= n.peer(id).is_some_and(|p| p.mark == n.gens.current.0);
            }
            if stale {
                let g = &mut n.gens;
                g.history = [g.bitmap, g.history[0]];
                g.bitmap = g.current;
                g.current = GenerationId(*next);
                actions.extend([Action::NewGeneration(*next), Action::Announce]);
            }
        }
        Event::LocalIoError => {
            if !n.replica {
                return Err(Refused("this node holds no replica".into()));
            }
            if n.disk != DiskState::Failed {
                n.disk = DiskState::Failed;
                actions.extend([Action::Detached, Action::Announce]);
            }
        }
        Event::Invalidate => {
            if !n.replica {
                return Err(Refused("this node holds no replica".into()));
            }
            if n.writers > 0 {
                return Err(Refused(
                    "the volume is open on this node; close it first".into(),
                ));
            }
            n.disk = DiskState::Inconsistent;
            actions.push(Action::Announce);
            reconnect(&mut n, &mut actions);
        }
        Event::Reconnect => reconnect(&mut n, &mut actions),
        Event::Refuse { peer, why } => {
            let p = n.peer_mut(*peer)?;
            p.link = Link::Refused(why.clone());
            actions.extend([Action::Disconnect(*peer), Action::Notify]);
        }
        Event::SpecChanged { peers } => {
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
    Ok((n, actions))
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
    id: NodeId,
    epoch: u64,
    state: State,
    their_mark: u64,
    (my_dirty, theirs): (bool, &[(u64, u64)]),
) -> Result<(), Refused> {
    let (me_first, replica) = (n.me < id, n.replica);
    let p = n
        .peer(id)
        .ok_or_else(|| Refused(format!("node id {id} is not a peer")))?;
    if let Link::Refused(why) = &p.link {
        return Err(Refused(format!("node id {id} is refused: {why}")));
    }
    let direction = if !n.tracks(p) || state.disk == DiskState::Diskless {
        // A peer without a replica (yet: its spec may still say diskless) gets no data
        // until it reconnects with one.
        Direction::InSync
    } else {
        let me = Side {
            up_to_date: n.disk == DiskState::UpToDate,
            generation: n.gens.current.0,
            mark: p.mark,
            dirty: my_dirty,
        };
        let theirs = Side {
            up_to_date: state.disk == DiskState::UpToDate,
            generation: state.generation,
            mark: their_mark,
            dirty: !theirs.is_empty(),
        };
        handshake::decide(me, theirs, me_first)
    };
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
    // A diskless participant remembers the newest generation a Primary announced; a
    // whole replica that hears from one of a generation it never had was left behind
    // while partitioned, and is Outdated.
    let generation = state.generation;
    if !replica {
        if state.role == Role::Primary || n.gens.current.0 == 0 {
            n.gens.current = GenerationId(generation);
        }
    } else if !p.kind.diskful()
        && generation != 0
        && n.disk == DiskState::UpToDate
        && !n.knows_generation(generation)
    {
        n.disk = DiskState::Outdated;
        actions.extend([
            Action::LeftBehind {
                peer: id,
                generation,
            },
            Action::Announce,
        ]);
    }
    let p = n.peer_mut(id)?;
    p.forget_connection();
    p.link = Link::Up { epoch };
    p.remote = Some(state);
    // The connection comes up already in the resync the handshake decided, so its
    // status never shows it Established in between.
    p.sync = match direction {
        Direction::Source { .. } => Sync::Source { total: 0 },
        Direction::Target => Sync::Target,
        _ => Sync::Idle,
    };
    if state.role == Role::Primary {
        actions.push(Action::PrimaryAppeared(id));
    }
    match direction {
        Direction::Target => {
            // The source resyncs what this side knew to differ as well.
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
    let sync = p.sync;
    if state.role == Role::Primary && state.generation != n.gens.current.0 {
        if !n.replica {
            // Carried to replicas that were cut off (see `connected`).
            n.gens.current = GenerationId(state.generation);
        } else if n.disk == DiskState::UpToDate && sync == Sync::Idle {
            // This replica received all the Primary's writes: its new generation is
            // this replica's too.
            n.adopt_generation(state.generation);
        }
    }
    let (up, current) = (n.up_to_date(), n.gens.current.0);
    let p = n.peer_mut(id)?;
    let was_primary = p.is_primary();
    let changed = p.remote != Some(state);
    p.remote = Some(state);
    if state.role == Role::Primary && !was_primary {
        actions.push(Action::PrimaryAppeared(id));
    }
    // A peer whose resync from here was declined (a Primary resynced it) reports
    // UpToDate at this replica's generation: what was marked for it is settled.
    if p.deferred
        && state.disk == DiskState::UpToDate
        && p.sync == Sync::Idle
        && up
        && current == state.generation
    {
        p.deferred = false;
        p.mark = 0;
        actions.push(Action::ClearAll(id));
    }
    if changed {
        actions.push(Action::Notify);
    }
    Ok(())
}

#[cfg(test)]
mod tests;
