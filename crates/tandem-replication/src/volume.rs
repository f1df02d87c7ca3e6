//! A replicated volume on one node: its local replica (if diskful), its peers, and the
//! data path. Writes follow protocol C: acknowledged once on the local replica and on
//! every connected peer that holds data.

use std::io::{self, BufReader};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tandem_api::{
    ConnectionState, DiskState, NodeId, OnNoQuorum, Participant, PeerStatus, QuorumPolicy,
    ReplicationState, Role, VolumeSpec, VolumeStatus,
};
use tandem_pool::Volume;

use crate::completion::Completion;
use crate::interval::IntervalLock;
use crate::peer::Peer;
use crate::wire::{self, FLAG_FUA, FLAG_MAY_PUNCH, Header, Hello, Kind, State, WireError};

/// Why a volume cannot be opened on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenRefused(pub String);

pub struct ReplicatedVolume {
    spec: VolumeSpec,
    me: Participant,
    local: Option<Arc<Volume>>,
    peers: Vec<Arc<Peer>>,
    intervals: IntervalLock,
    next_id: AtomicU64,
    writers: Mutex<u32>,
}

fn errno(e: &io::Error) -> u32 {
    e.raw_os_error().unwrap_or(libc::EIO) as u32
}

fn error_from(status: u32, what: &str) -> io::Error {
    let e = io::Error::from_raw_os_error(status as i32);
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

impl ReplicatedVolume {
    /// `local` is this node's replica when the spec makes it diskful.
    pub fn new(spec: VolumeSpec, me: Participant, local: Option<Arc<Volume>>) -> ReplicatedVolume {
        let peers = spec
            .participants
            .iter()
            .filter(|p| p.node_id != me.node_id)
            .map(|p| Arc::new(Peer::new(p.clone())))
            .collect();
        ReplicatedVolume {
            spec,
            me,
            local,
            peers,
            intervals: IntervalLock::default(),
            next_id: AtomicU64::new(1),
            writers: Mutex::new(0),
        }
    }

    pub fn spec(&self) -> &VolumeSpec {
        &self.spec
    }

    pub fn size(&self) -> u64 {
        self.spec.size
    }

    pub fn local(&self) -> Option<&Arc<Volume>> {
        self.local.as_ref()
    }

    pub(crate) fn peers(&self) -> &[Arc<Peer>] {
        &self.peers
    }

    pub(crate) fn me(&self) -> &Participant {
        &self.me
    }

    fn role(&self) -> Role {
        if *self.writers.lock().unwrap() > 0 {
            Role::Primary
        } else {
            Role::Secondary
        }
    }

    fn disk(&self) -> DiskState {
        self.local
            .as_ref()
            .map_or(DiskState::Diskless, |v| v.disk_state())
    }

    pub(crate) fn state(&self) -> State {
        State {
            role: self.role(),
            disk: self.disk(),
            generation: self
                .local
                .as_ref()
                .map_or(0, |v| v.superblock().generations.current.0),
        }
    }

    pub(crate) fn hello(&self, to: NodeId) -> Hello {
        Hello {
            version_min: wire::VERSION_MIN,
            version_max: wire::VERSION_MAX,
            cluster: self.spec.cluster_id,
            volume: self.spec.volume_id,
            from: self.me.node_id,
            to,
            state: self.state(),
        }
    }

    fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Checks a peer's Hello against the spec; the peer it comes from.
    pub(crate) fn check_hello(&self, hello: &Hello) -> Result<Arc<Peer>, String> {
        if hello.cluster != self.spec.cluster_id {
            return Err(format!(
                "peer belongs to cluster {}, not {}",
                hello.cluster, self.spec.cluster_id
            ));
        }
        if hello.to != self.me.node_id {
            return Err(format!(
                "peer addressed node id {}, this node is {}",
                hello.to, self.me.node_id
            ));
        }
        let peer = self
            .peers
            .iter()
            .find(|p| p.participant.node_id == hello.from)
            .ok_or_else(|| {
                format!(
                    "node id {} is not a participant of volume {}",
                    hello.from, self.spec.name
                )
            })?;
        let mine = self.hello(hello.from);
        if mine.agree(hello).is_none() {
            return Err(format!(
                "no common protocol version (peer {}..={}, here {}..={})",
                hello.version_min, hello.version_max, mine.version_min, mine.version_max
            ));
        }
        // Two diskful replicas that both claim to be current but hold different data
        // generations have diverged; resync decides that, and is not run here yet.
        if peer.participant.kind.diskful() && self.local.is_some() {
            let here = self.state();
            if here.disk == DiskState::UpToDate
                && hello.state.disk == DiskState::UpToDate
                && here.generation != hello.state.generation
            {
                return Err(format!(
                    "data generations differ ({:016x} here, {:016x} on the peer): the replicas need a resync",
                    here.generation, hello.state.generation
                ));
            }
        }
        Ok(peer.clone())
    }

    /// Takes a connection whose Hello exchange is done and serves it.
    pub(crate) fn establish(
        self: &Arc<Self>,
        peer: Arc<Peer>,
        stream: TcpStream,
        hello: &Hello,
    ) -> io::Result<()> {
        stream.set_read_timeout(None)?;
        stream.set_nodelay(true)?;
        let epoch = peer.attach(&stream, hello.state)?;
        tracing::info!(volume = %self.spec.name, peer = %peer.participant.node, epoch, "peer connected");
        let volume = self.clone();
        std::thread::Builder::new()
            .name(format!("peer-{}", peer.participant.node))
            .spawn(move || volume.receive(peer, stream, epoch))?;
        Ok(())
    }

    fn receive(self: Arc<Self>, peer: Arc<Peer>, stream: TcpStream, epoch: u64) {
        let mut reader = BufReader::with_capacity(256 << 10, stream);
        let why = loop {
            match self.handle(&peer, &mut reader) {
                Ok(()) => peer.seen(),
                Err(WireError::Io(e)) => break format!("connection lost: {e}"),
                Err(e) => break e.to_string(),
            }
        };
        tracing::warn!(volume = %self.spec.name, peer = %peer.participant.node, %why, "peer disconnected");
        peer.detach(epoch);
    }

    /// Reads and handles one message from a peer.
    fn handle(&self, peer: &Peer, r: &mut BufReader<TcpStream>) -> Result<(), WireError> {
        let h = wire::read_header(r)?;
        let payload = wire::read_payload(r, h.payload)?;
        let from = peer.participant.node_id;
        match h.kind {
            Kind::Ping => {}
            Kind::State => peer.set_remote(State::decode(&payload)?),
            Kind::Ack | Kind::ReadReply => {
                if let Some(c) = peer.answered(h.id) {
                    let data = (h.kind == Kind::ReadReply && h.status == 0).then_some(payload);
                    c.answered(from, h.status, data);
                }
            }
            Kind::Read => {
                let mut data = vec![0u8; h.length as usize];
                let status = self.serve_peer(&h, |v| v.data().read_at(&mut data, h.offset));
                let mut reply = Header::new(Kind::ReadReply, h.id);
                reply.status = status;
                let data = if status == 0 { &data[..] } else { &[][..] };
                reply.payload = data.len() as u32;
                peer.send(&reply, data)?;
            }
            Kind::Write | Kind::Zero | Kind::Trim | Kind::Flush => {
                if h.kind == Kind::Write && h.length != payload.len() as u64 {
                    return Err(WireError::Malformed(
                        "write length differs from its payload".into(),
                    ));
                }
                let fua = h.flags & FLAG_FUA != 0;
                let status = self.serve_peer(&h, |v| match h.kind {
                    Kind::Write => v.data().write_at(&payload, h.offset, fua),
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
                let mut ack = Header::new(Kind::Ack, h.id);
                ack.status = status;
                peer.send(&ack, &[])?;
            }
            Kind::Hello => {
                return Err(WireError::Malformed(
                    "Hello on an established connection".into(),
                ));
            }
        }
        Ok(())
    }

    /// Runs a peer's request on the local replica; the status to answer with.
    fn serve_peer(&self, h: &Header, op: impl FnOnce(&Volume) -> io::Result<()>) -> u32 {
        let Some(local) = &self.local else {
            return libc::EIO as u32;
        };
        if h.kind != Kind::Flush
            && h.offset
                .checked_add(h.length)
                .is_none_or(|end| end > self.spec.size)
        {
            return libc::EINVAL as u32;
        }
        match op(local) {
            Ok(()) => 0,
            Err(e) => {
                tracing::error!(volume = %self.spec.name, kind = ?h.kind, offset = h.offset, error = %e,
                    "replicated request failed on the local replica");
                errno(&e)
            }
        }
    }

    /// Voting participants reachable from here, and how many vote in all.
    fn votes(&self) -> (usize, usize) {
        let total = self
            .spec
            .participants
            .iter()
            .filter(|p| p.kind.votes())
            .count();
        let mine = self.me.kind.votes() as usize;
        let reachable = self
            .peers
            .iter()
            .filter(|p| p.participant.kind.votes() && p.connection() == ConnectionState::Connected)
            .count();
        (mine + reachable, total)
    }

    pub fn has_quorum(&self) -> bool {
        let (have, total) = self.votes();
        self.spec.options.quorum == QuorumPolicy::Off || 2 * have > total
    }

    /// Writes may proceed only with quorum: without it, fail or wait, per policy.
    fn require_quorum(&self) -> io::Result<()> {
        loop {
            if self.has_quorum() {
                return Ok(());
            }
            if self.spec.options.on_no_quorum == OnNoQuorum::IoError {
                let (have, total) = self.votes();
                return Err(io::Error::other(format!(
                    "volume {} has no quorum ({have} of {total} votes reachable)",
                    self.spec.name
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Peers that hold data and are connected: they receive every write.
    fn data_peers(&self) -> Vec<&Arc<Peer>> {
        self.peers
            .iter()
            .filter(|p| {
                p.participant.kind.diskful()
                    && p.connection() == ConnectionState::Connected
                    && p.remote().is_some_and(|s| {
                        matches!(s.disk, DiskState::UpToDate | DiskState::Inconsistent)
                    })
            })
            .collect()
    }

    /// Sends `h` to every data peer and runs `local` on the local replica meanwhile;
    /// returns once all have answered (protocol C).
    fn replicate(
        &self,
        h: &Header,
        payload: &[u8],
        local: impl FnOnce(&Volume) -> io::Result<()>,
    ) -> io::Result<()> {
        let targets = self.data_peers();
        let completion = Arc::new(Completion::new(targets.len()));
        for p in &targets {
            p.request(h, payload, &completion);
        }
        let local_result = self.local.as_ref().map(|v| local(v));
        let outcome = completion.wait();
        for (peer, status) in &outcome.failed {
            tracing::error!(volume = %self.spec.name, peer = %peer, kind = ?h.kind, offset = h.offset,
                status, "peer failed a replicated request");
        }
        let acked = targets.len() - outcome.lost.len() - outcome.failed.len();
        match local_result {
            Some(Err(e)) => Err(e),
            None if acked == 0 => Err(io::Error::other(format!(
                "volume {}: no replica holding data is reachable from this node",
                self.spec.name
            ))),
            _ => Ok(()),
        }
    }

    pub fn write(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        self.require_quorum()?;
        let _held = self.intervals.lock(offset, data.len() as u64);
        let mut h = Header::new(Kind::Write, self.next_id());
        h.offset = offset;
        h.length = data.len() as u64;
        h.payload = data.len() as u32;
        if fua {
            h.flags |= FLAG_FUA;
        }
        self.replicate(&h, data, |v| v.data().write_at(data, offset, fua))
    }

    pub fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_punch: bool,
        fast_only: bool,
        fua: bool,
    ) -> io::Result<()> {
        self.require_quorum()?;
        let _held = self.intervals.lock(offset, len);
        let mut h = Header::new(Kind::Zero, self.next_id());
        h.offset = offset;
        h.length = len;
        h.flags = if fua { FLAG_FUA } else { 0 } | if may_punch { FLAG_MAY_PUNCH } else { 0 };
        self.replicate(&h, &[], |v| {
            v.write_zeroes(offset, len, may_punch, fast_only, fua)
        })
    }

    pub fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        self.require_quorum()?;
        let _held = self.intervals.lock(offset, len);
        let mut h = Header::new(Kind::Trim, self.next_id());
        h.offset = offset;
        h.length = len;
        h.flags = if fua { FLAG_FUA } else { 0 };
        self.replicate(&h, &[], |v| v.trim(offset, len, fua))
    }

    pub fn flush(&self) -> io::Result<()> {
        self.replicate(&Header::new(Kind::Flush, self.next_id()), &[], |v| {
            v.data().flush()
        })
    }

    fn local_up_to_date(&self) -> Option<&Arc<Volume>> {
        self.local
            .as_ref()
            .filter(|v| v.disk_state() == DiskState::UpToDate)
    }

    /// Reads from the local replica when it is UpToDate, else from an UpToDate peer.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if let Some(local) = self.local_up_to_date() {
            return local.data().read_at(buf, offset);
        }
        let mut last = None;
        for peer in self.data_peers() {
            if peer.remote().is_none_or(|s| s.disk != DiskState::UpToDate) {
                continue;
            }
            let mut h = Header::new(Kind::Read, self.next_id());
            h.offset = offset;
            h.length = buf.len() as u64;
            let completion = Arc::new(Completion::new(1));
            peer.request(&h, &[], &completion);
            let outcome = completion.wait();
            match (outcome.data, outcome.failed.first()) {
                (Some(data), _) if data.len() == buf.len() => {
                    buf.copy_from_slice(&data);
                    return Ok(());
                }
                (_, Some(&(_, status))) => last = Some(error_from(status, "peer read failed")),
                _ => last = Some(io::Error::other("peer connection lost during a read")),
            }
        }
        Err(last.unwrap_or_else(|| {
            io::Error::other(format!(
                "volume {}: no UpToDate replica is reachable from this node",
                self.spec.name
            ))
        }))
    }

    /// Opens the volume on this node. Writing makes this node Primary, which is refused
    /// while another node is Primary (unless two primaries are allowed).
    pub fn open(&self, writable: bool) -> Result<(), OpenRefused> {
        if !writable {
            return Ok(());
        }
        let mut writers = self.writers.lock().unwrap();
        if *writers == 0 && !self.spec.options.allow_two_primaries {
            if let Some(holder) = self
                .peers
                .iter()
                .find(|p| p.remote().is_some_and(|s| s.role == Role::Primary))
            {
                return Err(OpenRefused(format!(
                    "volume {} is open for writing on node {}; close it there first",
                    self.spec.name, holder.participant.node
                )));
            }
        }
        *writers += 1;
        if *writers == 1 {
            drop(writers);
            tracing::info!(volume = %self.spec.name, "promoted to Primary");
            self.announce();
        }
        Ok(())
    }

    pub fn close(&self, writable: bool) {
        if !writable {
            return;
        }
        let mut writers = self.writers.lock().unwrap();
        *writers -= 1;
        if *writers == 0 {
            drop(writers);
            tracing::info!(volume = %self.spec.name, "demoted to Secondary");
            self.announce();
        }
    }

    /// Tells every connected peer this node's current state.
    fn announce(&self) {
        let state = self.state().encode();
        let mut h = Header::new(Kind::State, 0);
        h.payload = state.len() as u32;
        for p in &self.peers {
            let _ = p.send(&h, &state);
        }
    }

    pub fn status(&self) -> VolumeStatus {
        let peers = self
            .peers
            .iter()
            .map(|p| {
                let remote = p.remote();
                let connection = match p.refusal() {
                    Some(_) => ConnectionState::StandAlone,
                    None => p.connection(),
                };
                let replication =
                    if connection == ConnectionState::Connected && p.participant.kind.diskful() {
                        ReplicationState::Established
                    } else {
                        ReplicationState::Off
                    };
                PeerStatus {
                    node: p.participant.node.clone(),
                    node_id: p.participant.node_id,
                    kind: p.participant.kind,
                    connection,
                    replication,
                    disk: remote.map_or(
                        if p.participant.kind.diskful() {
                            DiskState::DUnknown
                        } else {
                            DiskState::Diskless
                        },
                        |s| s.disk,
                    ),
                    role: remote.map_or(Role::Secondary, |s| s.role),
                    done: None,
                    out_of_sync: 0,
                    resync_transferred: 0,
                }
            })
            .collect();
        VolumeStatus {
            name: self.spec.name.clone(),
            node: self.me.node.clone(),
            kind: self.me.kind,
            role: self.role(),
            disk: self.disk(),
            open: *self.writers.lock().unwrap() > 0,
            quorum: self.has_quorum(),
            peers,
        }
    }

    /// Closes every peer connection (the volume is being removed or replaced).
    pub fn shut_down(&self) {
        for p in &self.peers {
            p.refuse("volume removed from this node".into());
        }
    }
}
