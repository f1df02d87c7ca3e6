//! A replicated volume on one node: its local replica (if diskful), its peers, and the
//! data path. Writes follow protocol C: acknowledged once on the local replica and on
//! every connected peer that holds data.

use std::io::{self, BufRead, BufReader};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use tandem_api::{
    ClusterId, ConnectionState, DiskState, NodeId, NodeName, Participant, PeerStatus,
    ReplicationState, Role, VolumeId, VolumeName, VolumeSpec, VolumeStatus,
};
use tandem_io::Timeouts;
use tandem_io::poll::Cadence;
use tandem_pool::{GenerationId, PoolError, Volume, VolumeHandle};

use crate::al::{ActivityLog, Covered, EXTENT};
use crate::bitmap::Bitmap;
use crate::completion::{Completion, Outcome};
use crate::control::{Action, Control, Event, Link, PeerControl, Refused, Sync};
use crate::interval::{Held, IntervalLock};
use crate::locks::{Locked, Shared};
use crate::notify::{Notify, OnChange, Progress};
use crate::owner::Owner;
use crate::peer::{Heard, LinkStats, Peer, Tracked, VOTE_FRESH};
use crate::quorum::{self, Admit, Votes};
use crate::stream::PeerStream;
use crate::wire::{
    self, Buffer, FLAG_FUA, FLAG_MAY_PUNCH, FLAG_RESYNC, Header, Hello, Kind, State, WireError,
};
use crate::workers::Workers;

mod snapshot;
pub use snapshot::SnapshotRefused;

/// How long a replica stays unresynced with a whole peer connected before it has its
/// peers connect afresh (see [`ReplicatedVolume::watch_resync`]): longer than a
/// handshake takes to start a resync.
const RESYNC_STALL: Duration = Duration::from_secs(3);

/// Why a volume cannot be opened on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenRefused(pub String);

/// The spec as this node acts on it, and its peers: replaced as a whole when the spec
/// changes, so each operation works with one version of it.
pub(crate) struct Config {
    pub spec: VolumeSpec,
    pub me: Participant,
    pub peers: Vec<Arc<Peer>>,
}

impl Config {
    pub fn peer(&self, id: NodeId) -> Option<&Arc<Peer>> {
        self.peers.iter().find(|p| p.id == id)
    }

    /// Voting participants reachable from here, and how many vote in all. A peer
    /// counts only while it is heard from (see [`VOTE_FRESH`]): one that fell silent
    /// may be on the other side of a cut already, long before it is declared dead.
    fn votes(&self, view: &Control) -> Votes {
        self.tally(view).0
    }

    /// The votes reachable, and among them those of the voters that confirmed this
    /// node's current generation (see [`Control::voters_agreeing`]).
    fn tally(&self, view: &Control) -> (Votes, Votes) {
        let total = self
            .spec
            .participants
            .iter()
            .filter(|p| p.kind.votes())
            .count();
        let mine = self.me.kind.votes() as usize;
        let heard = |id| self.peer(id).is_some_and(|p| p.silent_for() < VOTE_FRESH);
        let votes = |have| Votes { have, total };
        (
            votes(mine + view.reachable_voters(heard)),
            votes(mine + view.voters_agreeing(heard)),
        )
    }

    fn has_quorum(&self, view: &Control) -> bool {
        quorum::holds(self.spec.options.quorum, self.votes(view))
    }

    /// Peers that hold data and are connected: they receive every write.
    pub fn data_peers(&self, view: &Control) -> Vec<&Arc<Peer>> {
        self.peers
            .iter()
            .filter(|p| p.diskful && view.peer(p.id).is_some_and(|c| view.receives_writes(c)))
            .collect()
    }

    /// Connected peers that hold whole data.
    fn up_to_date_peers<'a>(&'a self, view: &Control) -> Vec<&'a Arc<Peer>> {
        self.data_peers(view)
            .into_iter()
            .filter(|p| is_up_to_date(view, p.id))
            .collect()
    }
}

/// Whether peer `id` said it holds whole data.
fn is_up_to_date(view: &Control, id: NodeId) -> bool {
    view.peer(id)
        .is_some_and(|c| c.remote_disk() == Some(DiskState::UpToDate))
}

pub struct ReplicatedVolume {
    // What a spec may not change: another value is another volume (or node).
    name: VolumeName,
    cluster_id: ClusterId,
    volume_id: VolumeId,
    my_id: NodeId,
    my_node: NodeName,
    /// This object, for the actions that start threads.
    me: Weak<ReplicatedVolume>,
    config: RwLock<Arc<Config>>,
    /// The volume's control state: role, disk, generations, each peer's connection
    /// and resync. Changed only through [`ReplicatedVolume::apply`].
    owner: Owner,
    /// The volume's size (the spec's), read on every request.
    size: AtomicU64,
    /// The size before the last time the volume grew here: a peer refusing a change
    /// past it has not grown yet.
    old_end: AtomicU64,
    /// Held while a spec change is applied.
    pub(crate) changing: Mutex<()>,
    pub(crate) local: Option<Arc<Volume>>,
    pub(crate) intervals: Arc<IntervalLock>,
    next_id: AtomicU64,
    /// Requests of this node's clients being replicated or read from a peer now.
    in_flight: Arc<AtomicUsize>,
    /// Held by the one local open that is asking the peers to agree to a promotion.
    promotion: Mutex<()>,
    al: Option<Arc<ActivityLog>>,
    /// Extents the previous run left in the activity log: after a crash as Primary,
    /// this replica may differ from the others there until a peer resyncs them.
    suspect: Mutex<Vec<u64>>,
    /// Resync data from a peer that is not Primary is applied under a read guard.
    /// Once another peer is Primary such data is declined (only the Primary's own
    /// resync is ordered with its writes); taking the write guard when a Primary
    /// appears waits for any being applied, before its first write can arrive.
    resync_gate: RwLock<()>,
    /// Quorum as last reported (see [`ReplicatedVolume::watch_quorum`]).
    had_quorum: AtomicBool,
    /// Since when this replica has been left unresynced (see
    /// [`ReplicatedVolume::watch_resync`]).
    unresynced_since: Mutex<Option<Instant>>,
    /// Changes taken lately from a Primary (when, offset, length): if it is lost, or a
    /// peer connects again, these may be what the others missed, in flight then.
    recent: Mutex<std::collections::VecDeque<(Instant, u64, u64)>>,
    /// Snapshots a Primary began on this replica, completing in the background.
    fills: Mutex<std::collections::HashMap<tandem_api::SnapshotName, Arc<snapshot::Fill>>>,
    /// Snapshots of this replica that peers read, open.
    snapshot_files:
        Mutex<std::collections::HashMap<tandem_api::SnapshotName, Arc<tandem_pool::DataFile>>>,
    /// Resync and verify progress is reported through this, at most once a second.
    pub(crate) progress: Progress,
    pub(crate) notify: Notify,
}

/// How long, and how many, changes taken from a Primary are remembered as possibly
/// missed by the other replicas (see `ReplicatedVolume::recent`): longer than a
/// dead peer takes to be noticed, so whatever was in flight when it went away is
/// covered.
const RECENT: Duration = Duration::from_secs(10);
const RECENT_MAX: usize = 4096;

/// Threads per connection serving a Primary's requests on the local replica, at most;
/// they start as requests queue up (see [`Workers`]).
const PEER_WORKERS: usize = 8;

/// How long a hot link's receiver polls for the next message before it sleeps (see
/// [`poll`]): a Primary writing at queue depth 1 sends its next request, and a peer its
/// next answer, about a write's time apart. A link is hot while its messages come
/// less than this apart.
const RECV_POLL: Duration = Duration::from_micros(200);
/// How long a request waiting for its peers' answers (once the local replica is done)
/// polls for them before it sleeps (see [`poll`]).
const ANSWER_POLL: Duration = Duration::from_micros(200);

fn is_data_change(kind: Kind) -> bool {
    matches!(kind, Kind::Write | Kind::Zero | Kind::Trim)
}

fn errno(e: &io::Error) -> u32 {
    e.raw_os_error().unwrap_or(libc::EIO) as u32
}

fn error_from(status: u32, what: &str) -> io::Error {
    let e = io::Error::from_raw_os_error(status as i32);
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// The out-of-sync bitmap a diskful node keeps for diskful participant `p`.
pub(crate) fn tracking(
    local: &Volume,
    p: &Participant,
    size: u64,
) -> Result<Arc<Mutex<Tracked>>, PoolError> {
    let slot = local.bitmap_slot(p.node_id)?;
    Ok(Arc::new(Mutex::new(Tracked {
        slot,
        bits: Bitmap::from_words(size, local.read_bitmap(slot)?),
    })))
}

/// The control state a volume starts with: Secondary, its disk and generations as
/// its replica's superblock has them, every peer down.
fn initial_control(spec: &VolumeSpec, me: &Participant, local: Option<&Volume>) -> Control {
    let sb = local.map(Volume::superblock);
    let peers = spec
        .participants
        .iter()
        .filter(|p| p.node_id != me.node_id)
        .map(|p| {
            let mark = sb
                .iter()
                .flat_map(|sb| &sb.peers)
                .find(|slot| slot.node == p.node_id)
                .map_or(0, |slot| slot.bitmap_generation.0);
            PeerControl::new(p.node_id, p.kind, mark)
        })
        .collect();
    Control {
        me: me.node_id,
        replica: local.is_some(),
        writers: 0,
        promoting: false,
        two_primaries: spec.options.allow_two_primaries,
        disk: sb.as_ref().map_or(DiskState::Diskless, |sb| sb.disk_state),
        gens: sb.as_ref().map(|sb| sb.generations).unwrap_or_default(),
        // Recorded: a generation this node started as Primary and no majority
        // confirmed stays unconfirmed across a restart (else its replica, moved apart
        // from the others only by writes never acknowledged, would be split brain
        // with them). Not recorded by older releases: the current one.
        confirmed: sb.as_ref().map_or(0, |sb| match sb.confirmed.0 {
            0 => sb.generations.current.0,
            c => c,
        }),
        whole_at: sb.as_ref().map_or(0, |sb| match sb.disk_state {
            DiskState::UpToDate => sb.generations.current.0,
            _ => sb.whole_at.0,
        }),
        peers,
    }
}

impl ReplicatedVolume {
    /// `local` is this node's replica when the spec makes it diskful.
    /// A diskful node loads, for every other diskful participant, the bitmap of what
    /// that peer lacks.
    pub fn new(
        spec: VolumeSpec,
        me: Participant,
        local: Option<Arc<Volume>>,
        on_change: OnChange,
    ) -> Result<Arc<ReplicatedVolume>, PoolError> {
        let notify = Notify::new(spec.name.clone(), on_change);
        let mut peers = Vec::new();
        for p in spec.participants.iter().filter(|p| p.node_id != me.node_id) {
            let tracked = match &local {
                Some(v) if p.kind.diskful() => Some(tracking(v, p, spec.size)?),
                _ => None,
            };
            peers.push(Arc::new(Peer::new(p, tracked)));
        }
        let (al, suspect) = match &local {
            Some(v) => {
                let (al, left) = ActivityLog::open(v.clone())?;
                if !left.is_empty() {
                    tracing::warn!(volume = %spec.name, extents = left.len(),
                        "this node crashed as Primary: its active extents will be resynced from a peer");
                }
                (Some(Arc::new(al)), left)
            }
            None => (None, Vec::new()),
        };
        let control = initial_control(&spec, &me, local.as_deref());
        Ok(Arc::new_cyclic(|weak| ReplicatedVolume {
            al,
            suspect: Mutex::new(suspect),
            name: spec.name.clone(),
            cluster_id: spec.cluster_id,
            volume_id: spec.volume_id,
            my_id: me.node_id,
            my_node: me.node.clone(),
            me: weak.clone(),
            owner: Owner::new(spec.name.clone(), local.clone(), control),
            size: AtomicU64::new(spec.size),
            old_end: AtomicU64::new(spec.size),
            config: RwLock::new(Arc::new(Config { spec, me, peers })),
            changing: Mutex::new(()),
            local,
            intervals: Arc::default(),
            next_id: AtomicU64::new(1),
            in_flight: Arc::default(),
            promotion: Mutex::new(()),
            resync_gate: RwLock::new(()),
            recent: Mutex::default(),
            had_quorum: AtomicBool::new(false),
            unresynced_since: Mutex::new(None),
            fills: Mutex::default(),
            snapshot_files: Mutex::default(),
            progress: Progress::new(),
            notify,
        }))
    }

    /// The spec in force.
    pub fn spec(&self) -> VolumeSpec {
        self.config().spec.clone()
    }

    pub fn name(&self) -> &VolumeName {
        &self.name
    }

    pub fn volume_id(&self) -> VolumeId {
        self.volume_id
    }

    pub(crate) fn cluster_id(&self) -> ClusterId {
        self.cluster_id
    }

    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Grows the volume (its bitmaps cover the new size already).
    pub(crate) fn set_size(&self, size: u64) {
        let old = self.size.swap(size, Ordering::AcqRel);
        self.old_end.store(old, Ordering::Release);
    }

    pub fn local(&self) -> Option<&Arc<Volume>> {
        self.local.as_ref()
    }

    /// Opens the local replica for a client of the volume (its metadata records the
    /// use), unless there is none or it has failed. One that fails to open (its disk
    /// failing) is given up: the client is served through the peers, as when the
    /// replica fails under it.
    pub fn open_local(&self) -> Option<VolumeHandle> {
        let local = self.local.as_ref()?;
        if self.view().disk == DiskState::Failed {
            return None;
        }
        match local.open(true) {
            Ok(handle) => Some(handle),
            Err(e) => {
                self.detach(&io::Error::other(e.to_string()));
                None
            }
        }
    }

    /// The spec in force and the peers it makes.
    pub(crate) fn config(&self) -> Arc<Config> {
        self.config.reading().clone()
    }

    pub(crate) fn set_config(&self, config: Config) {
        *self.config.writing() = Arc::new(config);
    }

    /// The control state as last published.
    pub(crate) fn view(&self) -> Arc<Control> {
        self.owner.view()
    }

    /// Applies `event` to the control state and carries out what it calls for; why
    /// not, if the transition is refused (logged already).
    pub(crate) fn apply(&self, event: Event) -> Result<(), Refused> {
        let actions = self.owner.apply(event)?;
        self.execute(actions);
        Ok(())
    }

    /// Runs what a step of the control state calls for.
    fn execute(&self, actions: Vec<Action>) {
        let config = self.config();
        for action in actions {
            let peer = |id: NodeId| config.peer(id);
            match action {
                Action::Announce => self.announce(),
                Action::Notify => self.notify.fire(),
                Action::Disconnect(id) => {
                    if let Some(p) = peer(id) {
                        p.disconnect();
                    }
                }
                Action::PrimaryAppeared(_) => drop(self.resync_gate.writing()),
                Action::ClearAll(id) => {
                    if let Some(p) = peer(id) {
                        self.clear(p, 0, self.size());
                        self.store_bitmaps();
                    }
                }
                Action::MarkAll(id) => {
                    if let Some(p) = peer(id) {
                        self.mark(p, 0, self.size());
                    }
                }
                Action::Mark { peer: id, ranges } => {
                    if let Some(p) = peer(id) {
                        for (offset, len) in ranges {
                            self.mark(p, offset, len);
                        }
                    }
                }
                Action::StartResync { peer: id, epoch } => {
                    if let (Some(p), Some(me)) = (peer(id), self.me.upgrade())
                        && let Err(e) = me.start_resync(p, epoch)
                    {
                        // The connection stays (its receiver must run to end it
                        // cleanly); the next one decides again.
                        tracing::error!(volume = %self.name, peer = %p.node, error = %e,
                            "cannot start the resync");
                    }
                }
                Action::ResyncFrom(id) => {
                    if let Some(p) = peer(id) {
                        p.transferred.store(0, Ordering::Relaxed);
                        tracing::info!(volume = %self.name, source = %p.node,
                            "resync starts: this replica is SyncTarget");
                    }
                }
                Action::ResyncFinished(id) => {
                    if let Some(p) = peer(id) {
                        tracing::info!(volume = %self.name, source = %p.node,
                            bytes = p.transferred.load(Ordering::Relaxed),
                            "resync finished: this replica is UpToDate");
                    }
                }
                Action::SettleSuspect => self.settle_suspect(),
                Action::ClearActivityLog => {
                    if let Some(al) = &self.al
                        && let Err(e) = al.clear()
                    {
                        tracing::error!(volume = %self.name, error = %e, "cannot clear the activity log");
                    }
                }
                Action::Detached => {
                    tracing::error!(volume = %self.name,
                        "local replica failed; detached, serving through peers");
                }
                Action::NewGeneration(g) => {
                    tracing::info!(volume = %self.name, generation = format!("{g:016x}"),
                        "new data generation: a replica stopped receiving writes");
                }
                Action::LeftBehind {
                    peer: id,
                    generation,
                } => {
                    tracing::warn!(volume = %self.name, peer = ?peer(id).map(|p| &p.node),
                        generation = format!("{generation:016x}"),
                        "a peer has seen a newer data generation: this replica was left behind and is Outdated");
                }
                Action::MarkRecent(id) => {
                    if let Some(p) = peer(id) {
                        self.mark_recent(p);
                    }
                }
                Action::RecentUncertain(lost) => {
                    let view = self.view();
                    for p in config.peers.iter().filter(|p| p.id != lost) {
                        self.mark_recent(p);
                        let connected = view.peer(p.id).is_some_and(PeerControl::connected);
                        if connected && p.id > self.my_id {
                            let _ = self.apply(Event::ChangeFailed { peer: p.id });
                        }
                    }
                }
                Action::Diverged { peer: id, why } => {
                    tracing::error!(volume = %self.name, peer = ?peer(id).map(|p| &p.node), %why,
                        "replicas diverged; not connecting until an operator discards one");
                }
            }
        }
    }

    pub(crate) fn my_id(&self) -> NodeId {
        self.my_id
    }

    pub(crate) fn disk(&self) -> DiskState {
        self.view().disk
    }

    /// The local replica, unless it failed and was detached.
    fn attached(&self) -> Option<&Arc<Volume>> {
        self.attached_in(&self.view())
    }

    /// The local replica, unless `view` has it failed and detached.
    fn attached_in(&self, view: &Control) -> Option<&Arc<Volume>> {
        self.local
            .as_ref()
            .filter(|_| view.disk != DiskState::Failed)
    }

    /// Stops using a local replica whose I/O failed: the volume goes on with its peers,
    /// and the replica will need a full resync once repaired.
    fn detach(&self, error: &io::Error) {
        if self.view().disk != DiskState::Failed {
            tracing::error!(volume = %self.name, %error, "local replica I/O failed");
            let _ = self.apply(Event::LocalIoError {
                next: GenerationId::random().0,
            });
        }
    }

    pub(crate) fn state(&self) -> State {
        self.view().state()
    }

    pub(crate) fn hello(&self, to: NodeId) -> Hello {
        let view = self.view();
        Hello {
            version_min: wire::VERSION_MIN,
            version_max: wire::VERSION_MAX,
            cluster: self.cluster_id,
            volume: self.volume_id,
            from: self.my_id,
            to,
            state: view.state(),
            bitmap_generation: view.mark_for_hello(to),
            history: view.history(),
            confirmed: view.confirmed_for_peers(),
        }
    }

    /// Marks a range out of sync for `peer` and stores the touched bitmap pages.
    pub(crate) fn mark(&self, peer: &Peer, offset: u64, len: u64) {
        let (Some(tracked), Some(local)) = (&peer.tracked, &self.local) else {
            return;
        };
        let view = self.view();
        if view.up_to_date() && view.peer(peer.id).is_some_and(|p| p.mark == 0) {
            let _ = self.apply(Event::Track { peer: peer.id });
        }
        let mut t = tracked.locked();
        for page in t.bits.mark(offset, len) {
            if let Err(e) = local.write_bitmap_page(t.slot, page as u64, t.bits.page(page)) {
                tracing::error!(volume = %self.name, peer = %peer.node, error = %e,
                    "cannot store the out-of-sync bitmap");
            }
        }
    }

    /// Notes a change taken from a Primary (see `recent`), forgetting old ones.
    fn note_recent(&self, offset: u64, len: u64) {
        let mut recent = self.recent.locked();
        let now = Instant::now();
        while recent
            .front()
            .is_some_and(|(at, ..)| now.duration_since(*at) > RECENT || recent.len() > RECENT_MAX)
        {
            recent.pop_front();
        }
        recent.push_back((now, offset, len));
    }

    /// Marks the changes taken lately from a Primary for `peer`: it may lack them.
    fn mark_recent(&self, peer: &Peer) {
        if peer.tracked.is_none() {
            return;
        }
        let ranges: Vec<(u64, u64)> = self
            .recent
            .locked()
            .iter()
            .map(|(_, o, l)| (*o, *l))
            .collect();
        for (offset, len) in ranges {
            self.mark(peer, offset, len);
        }
    }

    /// Clears a range that `peer` now has, storing the touched pages.
    pub(crate) fn clear(&self, peer: &Peer, offset: u64, len: u64) {
        let (Some(tracked), Some(local)) = (&peer.tracked, &self.local) else {
            return;
        };
        let mut t = tracked.locked();
        for page in t.bits.clear(offset, len) {
            if let Err(e) = local.write_bitmap_page(t.slot, page as u64, t.bits.page(page)) {
                tracing::error!(volume = %self.name, error = %e, "cannot store the out-of-sync bitmap");
            }
        }
    }

    /// Makes the bitmaps written so far durable.
    pub(crate) fn store_bitmaps(&self) {
        if let Some(local) = &self.local
            && let Err(e) = local.sync_meta()
        {
            tracing::error!(volume = %self.name, error = %e, "cannot store the bitmaps");
        }
    }

    /// A Primary starts a new data generation when a replica holding data stops
    /// receiving writes, so that replica's data is recognisably older afterwards.
    fn rotate_if_needed(&self, view: &Control, receiving: Vec<NodeId>) {
        if view.rotation_due(&receiving) {
            let next = GenerationId::random().0;
            let _ = self.apply(Event::Rotate { receiving, next });
        }
    }

    pub(crate) fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Checks a peer's Hello against the spec; the peer it comes from.
    pub(crate) fn check_hello(&self, hello: &Hello) -> Result<Arc<Peer>, String> {
        if hello.cluster != self.cluster_id {
            return Err(format!(
                "peer belongs to cluster {}, not {}",
                hello.cluster, self.cluster_id
            ));
        }
        if hello.to != self.my_id {
            return Err(format!(
                "peer addressed node id {}, this node is {}",
                hello.to, self.my_id
            ));
        }
        let config = self.config();
        let peer = config.peer(hello.from).ok_or_else(|| {
            format!(
                "node id {} is not a participant of volume {}",
                hello.from, self.name
            )
        })?;
        let mine = self.hello(hello.from);
        if mine.agree(hello).is_none() {
            return Err(format!(
                "no common protocol version (peer {}..={}, here {}..={})",
                hello.version_min, hello.version_max, mine.version_min, mine.version_max
            ));
        }
        if !peer.diskful && hello.state.disk != DiskState::Diskless {
            // It would take itself for a replica that receives every write, and get
            // none from here: wait until both sides have the same spec.
            let kind = config
                .spec
                .participants
                .iter()
                .find(|p| p.node_id == peer.id)
                .map_or("diskless", |p| crate::peer::kind_name(p.kind));
            return Err(format!(
                "node {} holds a replica, but the spec here makes it {kind}; waiting for it to get the same spec",
                peer.node,
            ));
        }
        Ok(peer.clone())
    }

    /// Takes a connection whose Hello exchange is done and serves it.
    pub(crate) fn establish(
        self: &Arc<Self>,
        peer: Arc<Peer>,
        stream: PeerStream,
        hello: &Hello,
    ) -> io::Result<()> {
        stream.set_nodelay()?;
        peer.retire();
        // Each side tells the other which ranges it knows to differ (its bitmap for
        // the peer, plus extents left in its activity log by a crash); the resync
        // covers both sets.
        let mine = self.differing_ranges(&peer);
        let theirs =
            exchange_ranges(&stream, &mine).map_err(|e| io::Error::other(e.to_string()))?;
        // The handshake was time-bound; the session may idle (pings keep it alive).
        stream.set_timeouts(None)?;
        let epoch = peer.attach(&stream)?;
        let connected = Event::Connected {
            peer: peer.id,
            epoch,
            state: hello.state,
            their_mark: hello.bitmap_generation,
            their_history: hello.history,
            their_confirmed: hello.confirmed,
            my_dirty: !mine.is_empty(),
            theirs,
        };
        let current = self
            .config()
            .peer(peer.id)
            .is_some_and(|p| Arc::ptr_eq(p, &peer));
        if !current {
            // The spec changed during the handshake and this peer is gone.
            peer.detach(epoch);
            return Err(io::Error::other("the participant left the volume's spec"));
        }
        if let Err(refused) = self.apply(connected) {
            peer.detach(epoch);
            return Err(io::Error::new(io::ErrorKind::ConnectionRefused, refused.0));
        }
        let view = self.view();
        let Some(state) = view.peer(peer.id).filter(|p| p.epoch() == Some(epoch)) else {
            // Refused by the handshake (diverged replicas).
            peer.detach(epoch);
            return Ok(());
        };
        tracing::info!(volume = %self.name, peer = %peer.node, epoch, sync = ?state.sync,
            generation = %format!("{:016x}", view.gens.current.0),
            peer_generation = %format!("{:016x}", hello.state.generation), "peer connected");
        let volume = self.clone();
        std::thread::Builder::new()
            .name(format!("peer-{}", peer.node))
            .spawn(move || volume.receive(peer, stream, epoch))?;
        Ok(())
    }

    fn receive(self: Arc<Self>, peer: Arc<Peer>, stream: PeerStream, epoch: u64) {
        let heard = Heard {
            stream,
            peer: peer.clone(),
        };
        let mut reader = BufReader::with_capacity(256 << 10, heard);
        let mut workers = {
            let (volume, peer) = (self.clone(), peer.clone());
            Workers::new(
                format!("peer-{}", peer.node),
                PEER_WORKERS,
                move |(h, payload): (Header, Buffer)| {
                    if volume.serve_request(&peer, h, payload).is_err() {
                        peer.disconnect();
                    }
                },
            )
        };
        // The link is hot while messages follow each other closely (a Primary writing
        // at a low queue depth, its peer answering): then, once a message is handled,
        // the next one is polled for before the receiver sleeps.
        let mut cadence = Cadence::new(RECV_POLL);
        let why = loop {
            // Not while several requests are in flight here or served for the peer
            // (queue depth > 1): the next message comes soon then anyway, and the CPU
            // is better left to them.
            let lone = || self.in_flight.load(Ordering::Acquire) <= 1 && !workers.busy();
            if reader.buffer().is_empty()
                && !(cadence.is_hot() && lone() && cadence.poll(|| more_waiting(&reader)))
            {
                // Sleeps in the read that fills the buffer.
                if let Err(e) = cadence.sleep(|| reader.fill_buf().map(|_| ()))
                    && e.kind() != io::ErrorKind::Interrupted
                {
                    break format!("connection lost: {e}");
                }
            }
            match self.handle(&peer, &mut reader, &mut workers) {
                Ok(kind) => {
                    if kind == Kind::Ping {
                        cadence.cool();
                    }
                }
                Err(WireError::Io(e)) => break format!("connection lost: {e}"),
                Err(e) => break e.to_string(),
            }
        };
        tracing::warn!(volume = %self.name, peer = %peer.node, %why, "peer disconnected");
        peer.detach(epoch);
        let _ = self.apply(Event::Disconnected {
            peer: peer.id,
            epoch,
        });
    }

    /// Ranges this replica knows to differ from the peer's: its bitmap for the peer,
    /// and the extents a crash as Primary left in its activity log. Coarsened to at
    /// most `wire::MAX_RANGES` (resyncing a little more is harmless).
    fn differing_ranges(&self, peer: &Peer) -> Vec<(u64, u64)> {
        let Some(tracked) = &peer.tracked else {
            return Vec::new();
        };
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        {
            let t = tracked.locked();
            let mut at = 0;
            while let Some(run) = t.bits.next_run(at, u64::MAX) {
                ranges.push((run.start, run.end - run.start));
                at = run.end;
            }
        }
        let size = self.size();
        ranges.extend(
            self.suspect
                .locked()
                .iter()
                .map(|e| (e * EXTENT, EXTENT.min(size.saturating_sub(e * EXTENT)))),
        );
        ranges.sort_unstable();
        coarsen(&mut ranges);
        ranges
    }

    /// Sends the peer what its bitmap marks, in the background.
    pub(crate) fn start_resync(self: &Arc<Self>, peer: &Arc<Peer>, epoch: u64) -> io::Result<()> {
        let total = peer.tracked.as_ref().map_or(0, |t| t.locked().bits.bytes());
        self.apply(Event::ResyncStarted {
            peer: peer.id,
            epoch,
            total,
        })
        .map_err(|refused| io::Error::other(refused.0))?;
        let (volume, p) = (self.clone(), peer.clone());
        std::thread::Builder::new()
            .name(format!("resync-{}", peer.node))
            .spawn(move || volume.resync(p, epoch))?;
        Ok(())
    }

    /// Online verify: compares every 4 KiB block with each connected UpToDate peer by
    /// checksum, marks the blocks that differ, and resyncs them from here. Returns the
    /// number of differing blocks per peer.
    pub fn verify(self: &Arc<Self>) -> Result<Vec<(NodeName, u64)>, String> {
        const CHUNK: u64 = 1 << 20;
        let Some(local) = self.local_up_to_date() else {
            return Err(format!(
                "node {} has no UpToDate replica of {} to verify against",
                self.my_node, self.name
            ));
        };
        let config = self.config();
        let size = self.size();
        let mut report = Vec::new();
        for peer in config.up_to_date_peers(&self.view()) {
            let Some(epoch) = self
                .view()
                .peer(peer.id)
                .filter(|p| p.sync == Sync::Idle)
                .and_then(PeerControl::epoch)
            else {
                continue;
            };
            let mut differing = 0u64;
            let mut at = 0u64;
            let interrupted = |why: &dyn std::fmt::Display| {
                let _ = self.apply(Event::Verify {
                    peer: peer.id,
                    done: None,
                });
                format!("verify against {} interrupted: {why}", peer.node)
            };
            while at < size {
                self.apply(Event::Verify {
                    peer: peer.id,
                    done: Some(at),
                })
                .map_err(|refused| interrupted(&refused))?;
                self.progress.tick(&self.notify);
                let len = CHUNK.min(size - at);
                let _held = self.intervals.lock(at, len);
                let mut data = Buffer::zeroed(len as usize);
                local
                    .data()
                    .read_at(&mut data, at)
                    .map_err(|e| interrupted(&e))?;
                let mut h = Header::new(Kind::Verify, self.next_id());
                h.offset = at;
                h.length = len;
                let completion = Arc::new(Completion::new(1));
                peer.request(&h, &[], &completion);
                let outcome = completion.wait();
                let Some(theirs) = outcome.data else {
                    return Err(interrupted(&"the peer stopped answering"));
                };
                for (i, block) in data.chunks(4096).enumerate() {
                    let mine = crc32c::crc32c(block).to_be_bytes();
                    if theirs.get(i * 4..i * 4 + 4) != Some(&mine[..]) {
                        differing += 1;
                        self.mark(peer, at + i as u64 * 4096, block.len() as u64);
                    }
                }
                at += len;
            }
            let _ = self.apply(Event::Verify {
                peer: peer.id,
                done: None,
            });
            tracing::info!(volume = %self.name, peer = %peer.node, differing, "online verify finished");
            if differing > 0 {
                self.start_resync(peer, epoch).map_err(|e| e.to_string())?;
            }
            report.push((peer.node.clone(), differing));
        }
        Ok(report)
    }

    /// The source says the resync is done: once the received data is durable, this
    /// replica adopts the source's generation and is UpToDate.
    fn finish_target(&self, peer: &Peer, generation: u64, primary_elsewhere: bool) {
        let receiving = self
            .view()
            .peer(peer.id)
            .is_some_and(|p| p.sync == Sync::Target);
        if receiving
            && let Some(local) = self.attached()
            && let Err(e) = local.data().flush()
        {
            self.detach(&e);
            return;
        }
        // Refused (and logged) unless this replica is the peer's SyncTarget: data
        // from a source it is not resyncing from is not all here.
        let _ = self.apply(Event::ResyncDone {
            peer: peer.id,
            generation,
            primary_elsewhere,
        });
    }

    /// A resync (either way) covered the extents a crash left in the activity log.
    pub(crate) fn settle_suspect(&self) {
        if std::mem::take(&mut *self.suspect.locked()).is_empty() {
            return;
        }
        if self.view().writers == 0
            && let Some(al) = &self.al
            && let Err(e) = al.clear()
        {
            tracing::error!(volume = %self.name, error = %e, "cannot clear the activity log");
        }
    }

    /// Reads and handles one message from a peer.
    fn handle(
        self: &Arc<Self>,
        peer: &Peer,
        r: &mut BufReader<Heard>,
        workers: &mut Workers<(Header, Buffer)>,
    ) -> Result<Kind, WireError> {
        let h = wire::read_header(r)?;
        let payload = wire::read_payload(r, h.payload)?;
        let state = wire::check(&h, &payload)?;
        let from = peer.id;
        match h.kind {
            Kind::Ping => {}
            Kind::State => {
                if let Some(state) = state {
                    let _ = self.apply(Event::PeerState { peer: from, state });
                }
            }
            Kind::ResyncDone => {
                let elsewhere = h.flags & wire::FLAG_PRIMARY_ELSEWHERE != 0;
                self.finish_target(peer, h.offset, elsewhere)
            }
            Kind::SnapshotFill => self.answer_snapshot_fill(from, h.id, &payload),
            Kind::Promote => {
                let asked = Event::PromotionAsked { peer: from };
                let mut ack = Header::new(Kind::Ack, h.id);
                if self.apply(asked).is_err() {
                    ack.status = libc::EBUSY as u32;
                }
                peer.send(&ack, &[])?;
            }
            Kind::Ack | Kind::ReadReply | Kind::VerifyReply => {
                if let Some(c) = peer.answered(h.id) {
                    let data = (h.kind != Kind::Ack && h.status == 0).then_some(payload);
                    c.answered(from, h.status, data);
                }
            }
            Kind::Verify
            | Kind::Read
            | Kind::Write
            | Kind::Zero
            | Kind::Trim
            | Kind::Flush
            | Kind::Snapshot
            | Kind::SnapshotStat => {
                if more_waiting(r) {
                    // Served by the connection's workers: the Primary never has two
                    // overlapping writes in flight, so they may complete in any order.
                    workers.push((h, payload));
                } else {
                    // A lone request is served right here, sparing a thread hop.
                    self.serve_request(peer, h, payload)?;
                }
            }
            // Refused by `wire::check` above.
            Kind::Hello | Kind::OutOfSync => {}
        }
        Ok(h.kind)
    }

    /// Whether resync data from `peer` is declined (with EBUSY), and says so the first
    /// time (see [`Control::declines_resync_from`]).
    fn resync_declined(&self, peer: &Peer) -> bool {
        let view = self.view();
        let Some(why) = view.declines_resync_from(peer.id) else {
            return false;
        };
        if view.peer(peer.id).is_some_and(|p| p.sync == Sync::Target) {
            tracing::info!(volume = %self.name, source = %peer.node, %why,
                "resync from a Secondary declined");
            let _ = self.apply(Event::TargetDeclined { peer: peer.id });
        }
        true
    }

    /// Performs a request a peer sent (as Primary) on the local replica and answers it.
    fn serve_request(&self, peer: &Peer, h: Header, payload: Buffer) -> io::Result<()> {
        let from = peer.id;
        match h.kind {
            Kind::Verify => {
                let mut data = Buffer::zeroed(h.length as usize);
                let status = self.serve_peer(&h, |v| v.data().read_at(&mut data, h.offset));
                let sums: Vec<u8> = data
                    .chunks(4096)
                    .flat_map(|b| crc32c::crc32c(b).to_be_bytes())
                    .collect();
                let mut reply = Header::new(Kind::VerifyReply, h.id);
                reply.status = status;
                let sums = if status == 0 { &sums[..] } else { &[][..] };
                reply.payload = sums.len() as u32;
                peer.send(&reply, sums)
            }
            Kind::Read if h.flags & wire::FLAG_SNAPSHOT != 0 => {
                self.serve_snapshot_read(peer, &h, &payload)
            }
            Kind::SnapshotStat => self.serve_snapshot_stat(peer, &h, &payload),
            Kind::Read => {
                let mut data = Buffer::zeroed(h.length as usize);
                let status = self.serve_peer(&h, |v| v.data().read_at(&mut data, h.offset));
                let mut reply = Header::new(Kind::ReadReply, h.id);
                reply.status = status;
                let data = if status == 0 { &data[..] } else { &[][..] };
                reply.payload = data.len() as u32;
                peer.send(&reply, data)
            }
            Kind::Write | Kind::Zero | Kind::Trim | Kind::Flush => {
                let resync = h.flags & FLAG_RESYNC != 0 && is_data_change(h.kind);
                let _gate = resync.then(|| self.resync_gate.reading());
                if resync && self.resync_declined(peer) {
                    let mut ack = Header::new(Kind::Ack, h.id);
                    ack.status = libc::EBUSY as u32;
                    return peer.send(&ack, &[]);
                }
                // On a Secondary, a change is ordered with the resync pieces this node
                // reads for its own resync targets (each holds its range until the
                // target has it): one read before the change is sent again, as the
                // change marks the range, and the piece's end does not clear that
                // mark. Not with two Primaries: each holds its ranges while waiting
                // for the other.
                let _held = (is_data_change(h.kind) && !resync && self.view().writers == 0)
                    .then(|| self.intervals.lock(h.offset, h.length));
                let fua = h.flags & FLAG_FUA != 0;
                let status = self.serve_peer(&h, |v| match h.kind {
                    Kind::Write => v.write_at(&payload, h.offset, fua),
                    Kind::Zero => v.write_zeroes(
                        h.offset,
                        h.length,
                        h.flags & FLAG_MAY_PUNCH != 0,
                        false,
                        fua,
                    ),
                    Kind::Trim => v.trim(h.offset, h.length, fua),
                    _ => v.data().flush(),
                });
                if status == 0 && is_data_change(h.kind) {
                    if !resync {
                        self.note_recent(h.offset, h.length);
                    }
                    if resync {
                        peer.transferred.fetch_add(h.length, Ordering::Relaxed);
                    }
                    // Replicas this node cannot reach may also have missed this change, and
                    // one it resyncs may not be among the Primary's: its resync takes
                    // the change along either way.
                    let view = self.view();
                    for other in self.config().peers.iter().filter(|p| p.id != from) {
                        let c = view.peer(other.id);
                        let reached = c.is_some_and(PeerControl::connected);
                        let resynced = c.is_some_and(|c| matches!(c.sync, Sync::Source { .. }));
                        if !reached || resynced {
                            self.mark(other, h.offset, h.length);
                        }
                    }
                }
                let mut ack = Header::new(Kind::Ack, h.id);
                ack.status = status;
                peer.send(&ack, &[])
            }
            Kind::Snapshot => {
                let mut ack = Header::new(Kind::Ack, h.id);
                ack.status = self.begin_peer_snapshot(&payload);
                peer.send(&ack, &[])
            }
            _ => unreachable!("only requests are queued"),
        }
    }

    /// Runs a peer's request on the local replica; the status to answer with.
    fn serve_peer(&self, h: &Header, op: impl FnOnce(&Volume) -> io::Result<()>) -> u32 {
        let Some(local) = self.attached() else {
            return libc::EIO as u32;
        };
        if matches!(h.kind, Kind::Read | Kind::Verify) && self.local_up_to_date().is_none() {
            // Outdated or being resynced since the peer last heard: its data is not
            // to be read (the peer tries another replica).
            return libc::ESTALE as u32;
        }
        if h.kind != Kind::Flush
            && h.offset
                .checked_add(h.length)
                .is_none_or(|end| end > self.size())
        {
            return libc::EINVAL as u32;
        }
        match op(local) {
            Ok(()) => 0,
            Err(e) => {
                tracing::error!(volume = %self.name, kind = ?h.kind, offset = h.offset, error = %e,
                    "replicated request failed on the local replica");
                if !matches!(h.kind, Kind::Read | Kind::Verify) {
                    self.detach(&e);
                }
                errno(&e)
            }
        }
    }

    pub fn has_quorum(&self) -> bool {
        self.config().has_quorum(&self.view())
    }

    /// How long a client's request polls for its peers' answers before it sleeps:
    /// [`ANSWER_POLL`] when it is the only one in flight (queue depth 1), none when
    /// others are, which can use the CPU better.
    fn answer_poll(&self) -> Duration {
        if self.in_flight.load(Ordering::Acquire) == 1 {
            ANSWER_POLL
        } else {
            Duration::ZERO
        }
    }

    /// Writes may proceed only with quorum: without it, fail or wait, per policy.
    fn require_quorum(&self, config: &Config) -> io::Result<()> {
        let mut since = None;
        loop {
            if let Some(result) = self.quorum_now(config, since) {
                return result;
            }
            since.get_or_insert_with(Instant::now);
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// What [`ReplicatedVolume::require_quorum`] decides now (`since`: when the write
    /// started waiting, if it has), or `None` when it would wait for quorum to come
    /// back (suspend-io) or for the voters to confirm a new generation.
    fn quorum_now(&self, config: &Config, since: Option<Instant>) -> Option<io::Result<()>> {
        let options = &config.spec.options;
        let view = self.view();
        // (A failed replica is detached: the volume goes on with its peers.)
        let behind =
            view.replica && matches!(view.disk, DiskState::Outdated | DiskState::Inconsistent);
        let (votes, agreeing) = config.tally(&view);
        match quorum::admit(
            options.quorum,
            options.on_no_quorum,
            votes,
            agreeing,
            behind,
        ) {
            // A voter that stays connected without ever confirming is stuck: as
            // long as a dead peer takes to be noticed, then the write fails.
            Admit::Confirming if since.is_some_and(|t| t.elapsed() > crate::peer::DEAD_AFTER) => {
                Some(Err(io::Error::other(format!(
                    "volume {}: no majority of the voters confirmed the new data generation",
                    self.name
                ))))
            }
            Admit::Confirming => None,
            Admit::Go if view.writers > 0 && view.confirmed != view.gens.current.0 => {
                // Writes of this generation can be acknowledged from now on.
                let generation = view.gens.current.0;
                let _ = self.apply(Event::Confirmed { generation });
                Some(Ok(()))
            }
            Admit::Go => Some(Ok(())),
            Admit::Fail(Votes { have, total }) => Some(Err(io::Error::other(format!(
                "volume {} has no quorum ({have} of {total} votes reachable)",
                self.name
            )))),
            Admit::Outdated => Some(Err(io::Error::other(format!(
                "volume {}: the replica on node {} is {}, behind its peers; close the volume here and open it again once it is resynced",
                self.name, self.my_node, view.disk
            )))),
            Admit::Wait => None,
        }
    }

    /// Sends `h` to every data peer and runs `local` on the local replica meanwhile;
    /// returns once all have answered (protocol C).
    fn replicate(
        &self,
        config: Arc<Config>,
        h: Header,
        payload: &[u8],
        local: impl FnOnce(&Volume) -> io::Result<()>,
    ) -> io::Result<()> {
        let started = self.start(config, h, None, payload, local)?;
        let outcome = started.completion.wait_polling(self.answer_poll());
        self.settle_outcome(&started, &outcome);
        if let Some(e) = self.past_a_replicas_end(&started, &outcome) {
            return Err(e);
        }
        if is_data_change(started.h.kind) {
            // Quorum may have gone while the request was in flight: then it must not
            // be acknowledged (io-error), or only once quorum is back (suspend-io).
            self.require_quorum(&started.config)?;
        }
        self.verdict(started, outcome)
    }

    /// The first half of [`ReplicatedVolume::replicate`]: sends `h` to every data peer,
    /// then runs `local` on the local replica; the answers are still to come.
    fn start(
        &self,
        config: Arc<Config>,
        h: Header,
        held: Option<Held>,
        payload: &[u8],
        local: impl FnOnce(&Volume) -> io::Result<()>,
    ) -> io::Result<Started> {
        let in_flight = InFlight::enter(&self.in_flight);
        // One view of the state for the whole request.
        let view = self.view();
        if is_data_change(h.kind) && view.writers == 0 {
            // Peers take a change from whoever sends it: one from a node that is no
            // longer Primary (a writer left behind by a demotion, say) would land on
            // the replicas of the Primary that replaced it.
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "volume {}: node {} is not Primary (the volume is not open for writing here)",
                    self.name, self.my_node
                ),
            ));
        }
        let attached = self.attached_in(&view);
        let covered = match &self.al {
            Some(al) if is_data_change(h.kind) && attached.is_some() => {
                Some(al.cover(h.offset, h.length).map_err(io::Error::other)?)
            }
            _ => None,
        };
        let targets: Vec<Arc<Peer>> = config.data_peers(&view).into_iter().cloned().collect();
        if is_data_change(h.kind) {
            self.rotate_if_needed(&view, targets.iter().map(|t| t.id).collect());
        }
        let whole = targets.iter().map(|p| is_up_to_date(&view, p.id)).collect();
        let completion = Arc::new(Completion::new(targets.len()));
        for p in &targets {
            p.request(&h, payload, &completion);
        }
        let local_whole = attached.is_some() && view.up_to_date();
        let local_result = attached.map(|v| local(v));
        Ok(Started {
            h,
            config,
            targets,
            whole,
            local_whole,
            local_result,
            completion,
            _held: held,
            _covered: covered,
            _in_flight: in_flight,
        })
    }

    /// Records what the peers' answers mean for them: blocks marked out of sync for
    /// those that did not take a change, a resync due for those that failed it.
    fn settle_outcome(&self, s: &Started, outcome: &Outcome) {
        let h = &s.h;
        for (peer, status) in &outcome.failed {
            tracing::error!(volume = %self.name, peer = %peer, kind = ?h.kind, offset = h.offset,
                status, "peer failed a replicated request");
        }
        if !is_data_change(h.kind) {
            return;
        }
        let view = self.view();
        let failed = |id: NodeId| outcome.failed.iter().any(|(f, _)| *f == id);
        for p in s.config.peers.iter().filter(|p| !s.reached(p.id, outcome)) {
            self.mark(p, h.offset, h.length);
        }
        if self.past_a_replicas_end(s, outcome).is_some() {
            // The change fails: the replicas that took it get it again from here once
            // the others have grown; nobody is behind on anything acknowledged.
            for t in s.targets.iter().filter(|t| failed(t.id)) {
                let _ = self.apply(Event::ResyncAgain { peer: t.id });
            }
            return;
        }
        for t in s.targets.iter().filter(|t| !s.reached(t.id, outcome)) {
            // Failed it while connected, or lost it with a connection that a new one
            // replaced already (whose handshake may have found nothing to resync):
            // resync what it lacks without waiting for a reconnect.
            if failed(t.id) || view.peer(t.id).is_some_and(PeerControl::connected) {
                let _ = self.apply(Event::ChangeFailed { peer: t.id });
            }
        }
        // A replica that was sent the change and did not take it is behind from now
        // on: before the write is acknowledged, the generation moves on, as when a
        // write starts without it.
        let reached: Vec<NodeId> = (s.targets.iter())
            .filter(|t| s.reached(t.id, outcome))
            .map(|t| t.id)
            .collect();
        self.rotate_if_needed(&view, reached);
    }

    /// A request past the end of a replica that has not grown yet fails: the space is
    /// not usable until every replica has it. It is no write a replica missed, so it
    /// neither waits for quorum nor for a new generation to be confirmed.
    fn past_a_replicas_end(&self, s: &Started, outcome: &Outcome) -> Option<io::Error> {
        let h = &s.h;
        let (id, _) = outcome
            .failed
            .iter()
            .find(|(_, status)| *status == libc::EINVAL as u32)
            .filter(|_| h.kind != Kind::Flush)
            .filter(|_| h.offset + h.length > self.old_end.load(Ordering::Acquire))?;
        let node = s
            .config
            .peer(*id)
            .map_or_else(|| id.to_string(), |p| p.node.to_string());
        Some(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "volume {}: the replica on node {node} does not reach offset {} yet (growing?)",
                self.name,
                h.offset + h.length
            ),
        ))
    }

    /// The result of a replicated request once its answers are in and settled, and
    /// quorum checked.
    fn verdict(&self, s: Started, outcome: Outcome) -> io::Result<()> {
        if let Some(e) = self.past_a_replicas_end(&s, &outcome) {
            return Err(e);
        }
        let acked = s
            .targets
            .iter()
            .filter(|t| s.reached(t.id, &outcome))
            .count();
        let whole_acked = s
            .targets
            .iter()
            .zip(&s.whole)
            .any(|(t, w)| *w && s.reached(t.id, &outcome));
        match s.local_result {
            Some(Err(e)) => {
                self.detach(&e);
                if whole_acked { Ok(()) } else { Err(e) }
            }
            // Acknowledged only once it is on a replica that holds whole data.
            Some(Ok(())) if s.local_whole || whole_acked => Ok(()),
            None if whole_acked => Ok(()),
            _ if acked == 0 && self.local.is_none() => Err(io::Error::other(format!(
                "volume {}: no replica holding data is reachable from this node",
                self.name
            ))),
            _ => Err(io::Error::other(format!(
                "volume {}: no UpToDate replica is reachable from this node",
                self.name
            ))),
        }
    }

    /// Finishes a write started by [`ReplicatedVolume::write`] on the thread that
    /// saw its last answer, which may be a peer link's receiver: that must never wait
    /// for quorum to come back (suspend-io), so such a wait moves to a thread of its own.
    fn finish_write(
        self: Arc<Self>,
        started: Started,
        outcome: Outcome,
        done: impl FnOnce(io::Result<()>) + Send + 'static,
    ) {
        self.settle_outcome(&started, &outcome);
        if let Some(e) = self.past_a_replicas_end(&started, &outcome) {
            return done(Err(e));
        }
        let config = started.config.clone();
        if let Some(quorum) = self.quorum_now(&config, None) {
            return done(quorum.and_then(|()| self.verdict(started, outcome)));
        }
        let volume = self.clone();
        let finish = move || {
            let result = volume
                .require_quorum(&config)
                .and_then(|()| volume.verdict(started, outcome));
            done(result);
        };
        // The closure is moved into the thread only if it starts; else it runs here.
        let finish = Arc::new(Mutex::new(Some(finish)));
        let f = finish.clone();
        let spawned = std::thread::Builder::new()
            .name("quorum-wait".into())
            .spawn(move || {
                if let Some(finish) = f.locked().take() {
                    finish();
                }
            });
        if spawned.is_err()
            && let Some(finish) = finish.locked().take()
        {
            finish();
        }
    }

    /// Writes `data` at `offset` on every replica (protocol C), returning as soon as it
    /// is sent to the peers and done on the local replica: `done` gets the result once
    /// every peer answered, on the thread that sees the last answer (often a peer
    /// link's receiver), or on this one if they have already. No thread waits
    /// meanwhile. The write holds its range (and activity-log extents) until `done` is
    /// called.
    pub fn write(
        self: &Arc<Self>,
        offset: u64,
        data: &[u8],
        fua: bool,
        done: impl FnOnce(io::Result<()>) + Send + 'static,
    ) {
        let config = self.config();
        if let Err(e) = self.require_quorum(&config) {
            return done(Err(e));
        }
        let held = self.intervals.lock(offset, data.len() as u64);
        let mut h = Header::new(Kind::Write, self.next_id());
        h.offset = offset;
        h.length = data.len() as u64;
        h.payload = data.len() as u32;
        h.flags = if fua { FLAG_FUA } else { 0 };
        let local = |v: &Volume| v.write_at(data, offset, fua);
        match self.start(config, h, Some(held), data, local) {
            Ok(started) => {
                let (volume, completion) = (self.clone(), started.completion.clone());
                completion.then(move |outcome| volume.finish_write(started, outcome, done));
            }
            Err(e) => done(Err(e)),
        }
    }

    pub fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_punch: bool,
        fast_only: bool,
        fua: bool,
    ) -> io::Result<()> {
        let config = self.config();
        self.require_quorum(&config)?;
        let _held = self.intervals.lock(offset, len);
        let mut h = Header::new(Kind::Zero, self.next_id());
        h.offset = offset;
        h.length = len;
        h.flags = if fua { FLAG_FUA } else { 0 } | if may_punch { FLAG_MAY_PUNCH } else { 0 };
        self.replicate(config, h, &[], |v| {
            v.write_zeroes(offset, len, may_punch, fast_only, fua)
        })
    }

    pub fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        let config = self.config();
        self.require_quorum(&config)?;
        let _held = self.intervals.lock(offset, len);
        let mut h = Header::new(Kind::Trim, self.next_id());
        h.offset = offset;
        h.length = len;
        h.flags = if fua { FLAG_FUA } else { 0 };
        self.replicate(config, h, &[], |v| v.trim(offset, len, fua))
    }

    pub fn flush(&self) -> io::Result<()> {
        let config = self.config();
        self.replicate(config, Header::new(Kind::Flush, self.next_id()), &[], |v| {
            v.data().flush()
        })
    }

    /// The local replica when reads may be served from it: attached and UpToDate.
    pub fn local_up_to_date(&self) -> Option<&Arc<Volume>> {
        self.local.as_ref().filter(|_| self.view().up_to_date())
    }

    /// Reads from the local replica when it is UpToDate, else from an UpToDate peer.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        // A reconnect or a resync changing hands can leave no UpToDate replica in reach
        // for a moment: wait for one as long as a dead peer takes to be noticed.
        let deadline = Instant::now() + crate::peer::DEAD_AFTER;
        loop {
            if let Some(local) = self.local_up_to_date() {
                return local.data().read_at(buf, offset);
            }
            let mut last = None;
            let config = self.config();
            for peer in config.up_to_date_peers(&self.view()) {
                match self.read_from(peer, offset, buf, None) {
                    Ok(()) => return Ok(()),
                    Err(e) => last = Some(e),
                }
            }
            if Instant::now() >= deadline {
                return Err(last.unwrap_or_else(|| {
                    io::Error::other(format!(
                        "volume {}: no UpToDate replica is reachable from this node",
                        self.name
                    ))
                }));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Reads from `peer`'s replica, or from its snapshot `snapshot`.
    fn read_from(
        &self,
        peer: &Peer,
        offset: u64,
        buf: &mut [u8],
        snapshot: Option<&tandem_api::SnapshotName>,
    ) -> io::Result<()> {
        let mut h = Header::new(Kind::Read, self.next_id());
        h.offset = offset;
        h.length = buf.len() as u64;
        let name = snapshot.map_or(&[][..], |s| s.as_str().as_bytes());
        if snapshot.is_some() {
            h.flags = wire::FLAG_SNAPSHOT;
            h.payload = name.len() as u32;
        }
        let _in_flight = InFlight::enter(&self.in_flight);
        let completion = Arc::new(Completion::new(1));
        peer.request(&h, name, &completion);
        let outcome = completion.wait_polling(self.answer_poll());
        match (outcome.data, outcome.failed.first()) {
            (Some(data), _) if data.len() == buf.len() => {
                buf.copy_from_slice(&data);
                Ok(())
            }
            (_, Some(&(_, status))) => Err(error_from(status, "peer read failed")),
            _ => Err(io::Error::other("peer connection lost during a read")),
        }
    }

    /// Whether this node can reach whole data: its own replica UpToDate, or a connected
    /// UpToDate peer.
    fn reaches_up_to_date(&self) -> bool {
        let view = self.view();
        view.up_to_date() || !self.config().up_to_date_peers(&view).is_empty()
    }

    /// Opens the volume on this node. Writing makes this node Primary, which is refused
    /// while another node is Primary (unless two primaries are allowed), and while this
    /// node reaches no UpToDate replica (a replica still being resynced, say, holds no
    /// data to stand on).
    pub fn open(&self, writable: bool) -> Result<(), OpenRefused> {
        if !writable {
            return Ok(());
        }
        let _one = self.promotion.locked();
        if self.view().writers > 0 {
            match self.apply(Event::Opened) {
                Ok(()) => return Ok(()),
                // The last writer closed meanwhile (closes do not wait for opens): this
                // node is no longer Primary, and is promoted again below.
                Err(_) if self.view().writers == 0 => {}
                Err(refused) => return Err(OpenRefused(refused.0)),
            }
        }
        // A peer may be reconnecting: give it as long as a dead one takes to be noticed.
        let deadline = Instant::now() + crate::peer::DEAD_AFTER;
        while !self.reaches_up_to_date() {
            if Instant::now() >= deadline {
                return Err(OpenRefused(format!(
                    "volume {}: node {} reaches no UpToDate replica (its own is {}); wait for a resync or for a replica to return",
                    self.name,
                    self.my_node,
                    self.disk()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let config = self.config();
        let two_primaries = config.spec.options.allow_two_primaries;
        let view = self.view();
        if !two_primaries && let Some(holder) = view.peers.iter().find(|p| p.is_primary()) {
            return Err(self.held_by(holder.id, &config));
        }
        let quorum = config.has_quorum(&view);
        self.apply(Event::PromotionStarted { quorum })
            .map_err(|refused| OpenRefused(format!("volume {}: {refused}", self.name)))?;
        // Promoted only with a majority of the voters granting it explicitly: a
        // peer lost meanwhile may have been asked by, or granted, another node.
        let (refused_by, quorum) = if two_primaries {
            (None, config.has_quorum(&self.view()))
        } else {
            let (refused_by, granted) = self.ask_promotion(&config);
            (
                refused_by,
                quorum::holds(config.spec.options.quorum, granted),
            )
        };
        let view = self.view();
        let _ = self.apply(Event::PromotionEnded {
            agreed: refused_by.is_none(),
            quorum,
        });
        if let Some(id) = refused_by {
            let node = config
                .peer(id)
                .map_or_else(|| id.to_string(), |p| p.node.to_string());
            return Err(OpenRefused(format!(
                "volume {}: node {node} refused to let node {} become Primary (it is Primary or knows one, or holds data newer than this node's)",
                self.name, self.my_node
            )));
        }
        if self.view().writers == 0 {
            return Err(match view.peers.iter().find(|p| p.is_primary()) {
                Some(holder) => self.held_by(holder.id, &config),
                None => OpenRefused(format!(
                    "volume {}: no majority of the voters granted node {} its promotion (a peer was lost meanwhile?)",
                    self.name, self.my_node
                )),
            });
        }
        tracing::info!(volume = %self.name, "promoted to Primary");
        Ok(())
    }

    fn held_by(&self, id: NodeId, config: &Config) -> OpenRefused {
        let node = config
            .peer(id)
            .map_or_else(|| id.to_string(), |p| p.node.to_string());
        OpenRefused(format!(
            "volume {} is open for writing on node {node}; close it there first",
            self.name
        ))
    }

    /// Asks every connected peer to agree that this node becomes Primary (two nodes
    /// asking at once: the lower node id wins); the first that refused, if any, and
    /// the votes of this node and of the voters that granted it.
    fn ask_promotion(&self, config: &Config) -> (Option<NodeId>, Votes) {
        let view = self.view();
        let asked: Vec<&Arc<Peer>> = config
            .peers
            .iter()
            .filter(|p| view.peer(p.id).is_some_and(PeerControl::connected))
            .collect();
        let completion = Arc::new(Completion::new(asked.len()));
        for p in &asked {
            p.request(
                &Header::new(Kind::Promote, self.next_id()),
                &[],
                &completion,
            );
        }
        let outcome = completion.wait();
        // A grant holds while the connection it came on does: a peer that lost it
        // forgot it, and may grant another node meanwhile.
        let now = self.view();
        let epoch = |v: &Control, id| v.peer(id).and_then(PeerControl::epoch);
        let granted = (asked.iter())
            .filter(|p| view.peer(p.id).is_some_and(|c| c.kind.votes()))
            .filter(|p| {
                !outcome.lost.contains(&p.id) && !outcome.failed.iter().any(|f| f.0 == p.id)
            })
            .filter(|p| epoch(&now, p.id).is_some() && epoch(&now, p.id) == epoch(&view, p.id))
            .count();
        let total = (config.spec.participants.iter())
            .filter(|p| p.kind.votes())
            .count();
        let votes = Votes {
            have: config.me.kind.votes() as usize + granted,
            total,
        };
        (outcome.failed.first().map(|(id, _)| *id), votes)
    }

    pub fn close(&self, writable: bool) {
        if !writable {
            return;
        }
        if self.apply(Event::Closed).is_ok() && self.view().writers == 0 {
            tracing::info!(volume = %self.name, "demoted to Secondary");
        }
    }

    /// Reports a change of quorum that no event caused: a peer's vote lapsing as it
    /// falls silent (see `VOTE_FRESH`). Called by the node's ticker.
    pub(crate) fn watch_quorum(&self) {
        let now = self.has_quorum();
        if self.had_quorum.swap(now, Ordering::AcqRel) != now {
            self.notify.fire();
        }
    }

    /// A replica that is not whole, resynced by no one, while a peer holding whole data
    /// is connected: the handshakes that should have started its resync were cut short
    /// (a Primary lost in the same instant this replica closed its connection to
    /// restart one, say). After [`RESYNC_STALL`] of that it has every peer connect
    /// afresh, so the handshakes decide again. Called by the node's ticker.
    pub(crate) fn watch_resync(&self) {
        let view = self.view();
        let stalled = view.resynced_by_none()
            && (view.peers.iter())
                .any(|p| p.connected() && p.remote.is_some_and(|s| s.disk == DiskState::UpToDate));
        let mut since = self.unresynced_since.lock().unwrap();
        if !stalled {
            *since = None;
            return;
        }
        if since.get_or_insert_with(Instant::now).elapsed() >= RESYNC_STALL {
            *since = None;
            drop(since);
            tracing::warn!(volume = %self.name,
                "not whole and resynced by no peer: every peer connects afresh");
            self.reconnect();
        }
    }

    /// Tells every connected peer this node's current state, and the node that it
    /// changed.
    pub(crate) fn announce(&self) {
        self.notify.fire();
        let state = self.state().encode();
        let mut h = Header::new(Kind::State, 0);
        h.payload = state.len() as u32;
        for p in &self.config().peers {
            let _ = p.send(&h, &state);
        }
    }

    /// Whether an NBD client has the volume open for writing on this node.
    pub fn is_open(&self) -> bool {
        self.view().writers > 0
    }

    pub fn status(&self) -> VolumeStatus {
        let config = self.config();
        let view = self.view();
        let size = self.size();
        let peers = config
            .peers
            .iter()
            .filter_map(|p| Some((p, view.peer(p.id)?)))
            .map(|(p, c)| {
                let connection = match c.link {
                    Link::Up { .. } => ConnectionState::Connected,
                    Link::Down => ConnectionState::Connecting,
                    Link::Refused(_) => ConnectionState::StandAlone,
                };
                let out_of_sync = p.tracked.as_ref().map_or(0, |t| t.locked().bits.bytes());
                let (replication, done) = match c.sync {
                    _ if connection != ConnectionState::Connected || !p.diskful => {
                        (ReplicationState::Off, None)
                    }
                    // The peer line shows the peer's part in the resync.
                    Sync::Source { total } => {
                        let left = out_of_sync.min(total);
                        let done = if total == 0 {
                            100.0
                        } else {
                            100.0 * (total - left) as f64 / total as f64
                        };
                        (
                            ReplicationState::SyncTarget,
                            Some((done * 100.0).floor() / 100.0),
                        )
                    }
                    Sync::Target => (ReplicationState::SyncSource, None),
                    Sync::Idle => (ReplicationState::Established, None),
                    Sync::Verifying { done } => {
                        let pct = 100.0 * done as f64 / size.max(1) as f64;
                        (
                            ReplicationState::VerifyT,
                            Some((pct * 100.0).floor() / 100.0),
                        )
                    }
                };
                PeerStatus {
                    node: p.node.clone(),
                    node_id: p.id,
                    kind: c.kind,
                    connection,
                    replication,
                    disk: c.remote_disk().unwrap_or(if p.diskful {
                        DiskState::DUnknown
                    } else {
                        DiskState::Diskless
                    }),
                    role: c.remote.map_or(Role::Secondary, |s| s.role),
                    done,
                    out_of_sync,
                    resync_transferred: p.transferred.load(Ordering::Relaxed),
                }
            })
            .collect();
        VolumeStatus {
            name: self.name.clone(),
            node: self.my_node.clone(),
            kind: config.me.kind,
            role: view.role(),
            disk: view.disk,
            open: view.writers > 0,
            quorum: config.has_quorum(&view),
            peers,
        }
    }

    /// Traffic on the link to each peer.
    pub fn links(&self) -> Vec<LinkStats> {
        self.config().peers.iter().map(|p| p.link_stats()).collect()
    }

    /// Makes every peer connect afresh, so the handshake decides again (after an
    /// invalidate, or after split brain was resolved).
    pub fn reconnect(&self) {
        let _ = self.apply(Event::Reconnect);
    }

    /// Discards the local replica's data: it is Inconsistent until a full resync from
    /// a peer completes. Refused while the volume is open here.
    pub fn invalidate(&self) -> Result<(), String> {
        if self.local.is_none() {
            return Err(format!(
                "node {} holds no replica of volume {}",
                self.my_node, self.name
            ));
        }
        self.apply(Event::Invalidate)
            .map_err(|refused| format!("volume {}: {refused}", self.name))?;
        tracing::warn!(volume = %self.name, "local replica invalidated: a full resync follows");
        Ok(())
    }

    /// Declares the local replica whole as it is (see [`Event::Trust`]).
    pub fn trust(&self) -> Result<(), String> {
        if self.local.is_none() {
            return Err(format!(
                "node {} holds no replica of volume {}",
                self.my_node, self.name
            ));
        }
        let next = GenerationId::random().0;
        self.apply(Event::Trust { next })
            .map_err(|refused| format!("volume {}: {refused}", self.name))?;
        tracing::warn!(volume = %self.name, generation = format!("{next:016x}"),
            "local replica declared whole by an operator: the others are resynced from it");
        Ok(())
    }

    /// Resolves split brain: the node named `discard` gives up its data; every other
    /// node merely reconnects.
    pub fn resolve(&self, discard: &NodeName) -> Result<(), String> {
        if *discard == self.my_node {
            return self.invalidate();
        }
        if !self.config().peers.iter().any(|p| p.node == *discard) {
            return Err(format!(
                "node {discard} is not a participant of volume {}",
                self.name
            ));
        }
        self.reconnect();
        Ok(())
    }

    /// Closes every peer connection (the volume is being removed or replaced).
    pub fn shut_down(&self) {
        for p in &self.config().peers {
            let _ = self.apply(Event::Refuse {
                peer: p.id,
                why: "volume removed from this node".into(),
            });
        }
    }
}

/// A replicated request under way: sent to its targets and done on the local replica,
/// its answers still to come. What it holds (its range, its activity-log extents, its
/// place among the requests in flight) is let go when it is dropped.
struct Started {
    h: Header,
    config: Arc<Config>,
    targets: Vec<Arc<Peer>>,
    /// Whether each target held whole data when the request left.
    whole: Vec<bool>,
    /// Whether the local replica held whole data when the request ran on it.
    local_whole: bool,
    local_result: Option<io::Result<()>>,
    completion: Arc<Completion>,
    _held: Option<Held>,
    _covered: Option<Covered>,
    _in_flight: InFlight,
}

impl Started {
    /// Whether peer `id` took the request.
    fn reached(&self, id: NodeId, outcome: &Outcome) -> bool {
        self.targets.iter().any(|t| t.id == id)
            && !outcome.lost.contains(&id)
            && !outcome.failed.iter().any(|(f, _)| *f == id)
    }
}

/// Counts a request in flight while it lives.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn enter(count: &Arc<AtomicUsize>) -> InFlight {
        count.fetch_add(1, Ordering::AcqRel);
        InFlight(count.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Whether another message has (at least partly) arrived already.
fn more_waiting(r: &BufReader<Heard>) -> bool {
    !r.buffer().is_empty() || tandem_io::readable_now(r.get_ref())
}

/// Merges sorted, possibly overlapping ranges, then joins neighbours across the
/// smallest gaps until at most `wire::MAX_RANGES` remain.
fn coarsen(ranges: &mut Vec<(u64, u64)>) {
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for &(offset, len) in ranges.iter() {
        match merged.last_mut() {
            Some((o, l)) if offset <= *o + *l => *l = (*l).max(offset + len - *o),
            _ => merged.push((offset, len)),
        }
    }
    while merged.len() > wire::MAX_RANGES {
        let mut gaps: Vec<u64> = merged
            .windows(2)
            .map(|w| w[1].0 - (w[0].0 + w[0].1))
            .collect();
        gaps.sort_unstable();
        let limit = gaps[gaps.len() / 2];
        let mut joined: Vec<(u64, u64)> = Vec::with_capacity(merged.len() / 2 + 1);
        for (offset, len) in merged {
            match joined.last_mut() {
                Some((o, l)) if offset - (*o + *l) <= limit => *l = offset + len - *o,
                _ => joined.push((offset, len)),
            }
        }
        merged = joined;
    }
    *ranges = merged;
}

/// Sends this side's differing ranges and reads the peer's (one OutOfSync message
/// each way, right after Hello).
fn exchange_ranges(stream: &PeerStream, mine: &[(u64, u64)]) -> Result<Vec<(u64, u64)>, WireError> {
    let payload: Vec<u8> = mine
        .iter()
        .flat_map(|(o, l)| [o.to_be_bytes(), l.to_be_bytes()].concat())
        .collect();
    let mut h = Header::new(Kind::OutOfSync, 0);
    h.payload = payload.len() as u32;
    let mut writer = stream;
    wire::send(&mut writer, &h, &payload)?;
    let mut reader = stream;
    let theirs = wire::read_header(&mut reader)?;
    if theirs.kind != Kind::OutOfSync {
        return Err(WireError::Malformed(format!(
            "expected the peer's range list, got {:?}",
            theirs.kind
        )));
    }
    let body = wire::read_payload(&mut reader, theirs.payload)?;
    wire::decode_ranges(&theirs, &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_merge_and_coarsen_without_losing_any() {
        let mut r = vec![(0, 4096), (4096, 4096), (100_000, 10), (100_005, 100)];
        coarsen(&mut r);
        assert_eq!(r, [(0, 8192), (100_000, 105)]);
        let mut many: Vec<(u64, u64)> = (0..10_000u64).map(|i| (i * 16384, 4096)).collect();
        let original = many.clone();
        coarsen(&mut many);
        assert!(many.len() <= wire::MAX_RANGES);
        for (o, l) in original {
            assert!(
                many.iter().any(|(mo, ml)| *mo <= o && o + l <= mo + ml),
                "range {o} lost"
            );
        }
    }

    /// A volume of one diskful participant (node n1) on a pool in `dir`.
    fn lone_volume(dir: &std::path::Path) -> Arc<ReplicatedVolume> {
        use tandem_api::{ParticipantKind, VolumeOptions};
        let node_id = NodeId::new(0).unwrap();
        let me = Participant {
            node_id,
            node: "n1".parse().unwrap(),
            address: "127.0.0.1:7700".into(),
            kind: ParticipantKind::Diskful,
            pool: None,
            fresh: false,
        };
        let spec = VolumeSpec {
            cluster_id: tandem_api::ClusterId::random(),
            volume_id: tandem_api::VolumeId::random(),
            name: "v1".parse().unwrap(),
            revision: 1,
            size: 1 << 20,
            participants: vec![me.clone()],
            options: VolumeOptions::default(),
            origin: None,
        };
        let pool = tandem_pool::Pool::open(
            "p1".parse().unwrap(),
            dir,
            tandem_pool::CacheMode::Writeback,
        )
        .unwrap();
        let local = pool
            .create(&tandem_pool::NewVolume {
                name: spec.name.clone(),
                size: spec.size,
                thick: false,
                id: spec.volume_id,
                node_id,
                generation: GenerationId::random(),
            })
            .unwrap();
        ReplicatedVolume::new(spec, me, Some(local), Arc::new(|_| {})).unwrap()
    }

    fn write_now(v: &Arc<ReplicatedVolume>, offset: u64, data: &[u8]) -> io::Result<()> {
        let (tx, rx) = std::sync::mpsc::channel();
        v.write(offset, data, false, move |r| tx.send(r).unwrap());
        rx.recv().unwrap()
    }

    #[test]
    fn a_generation_no_majority_confirmed_stays_unconfirmed_across_a_restart() {
        // Seen in a chaos run: a Primary started a generation and lost quorum before
        // any voter confirmed it, then was killed; restarted, it took that generation
        // for confirmed, and the others (moved on from the one before) were split
        // brain with it instead of resyncing it.
        let dir = tempfile::tempdir().unwrap();
        let v = lone_volume(dir.path());
        let local = v.local().unwrap().clone();
        local
            .update_superblock(|sb| {
                sb.generations.current = GenerationId(0x22);
                sb.confirmed = GenerationId(0x11);
            })
            .unwrap();
        let me = v.config().me.clone();
        let again = ReplicatedVolume::new(v.spec(), me, Some(local), Arc::new(|_| {})).unwrap();
        assert_eq!(again.view().confirmed, 0x11);
        assert_eq!(again.hello(NodeId::new(1).unwrap()).confirmed, 0x11);
    }

    #[test]
    fn a_node_that_is_not_primary_changes_nothing() {
        // The controller's database is written through the volume by the controller's
        // threads; a controller stopped late (its node demoted meanwhile) must not
        // reach the replicas, nor any other writer left behind by a demotion.
        let dir = tempfile::tempdir().unwrap();
        let v = lone_volume(dir.path());
        v.open(true).unwrap();
        write_now(&v, 0, &[7; 4096]).unwrap();
        v.close(true);
        let refused = [
            write_now(&v, 0, &[9; 4096]).unwrap_err(),
            v.write_zeroes(0, 4096, true, false, false).unwrap_err(),
            v.trim(0, 4096, false).unwrap_err(),
        ];
        for e in refused {
            assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
            assert!(e.to_string().contains("is not Primary"), "{e}");
        }
        let mut back = vec![0; 4096];
        v.read(0, &mut back).unwrap();
        assert!(back.iter().all(|&b| b == 7));
    }
}
