//! The node role: this host's pools and the volumes in them.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use tandem_api::{
    ChangedExtent, CreatePool, CreateVolume, JoinCluster, NodeId, NodeInfo, NodeName, PoolInfo,
    PoolName, ReplicaReport, SnapshotChanges, SnapshotInfo, SnapshotName, SnapshotTaken,
    UpdateVolume, VolumeId, VolumeInfo, VolumeName, VolumeSpec, VolumeStatus,
};
use tandem_pool::{CacheMode, Entry, GenerationId, NewVolume, Pool, PoolError, Volume};
use tandem_replication::{ReplicatedVolume, Replicator};

use crate::cluster::{ClusterError, Controller, Membership, Refused};
use crate::events::Events;
use crate::pools::{Pools, PoolsError};

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("volume spec refused: {0}")]
    BadSpec(String),
    #[error("volume {0} is open on this node; its participants cannot change while it is in use")]
    SpecInUse(VolumeName),
    #[error("{0}")]
    Refused(String),
    #[error("volume {0} is not replicated on this node")]
    NotReplicated(VolumeName),
    #[error("cannot store the spec of volume {name}: {source}")]
    SpecStore {
        name: VolumeName,
        source: std::io::Error,
    },
    #[error("volume {name} already exists in pool {pool}")]
    ExistsElsewhere { name: VolumeName, pool: PoolName },
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error(transparent)]
    Pools(#[from] PoolsError),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
}

pub struct Node {
    name: NodeName,
    pools: Pools,
    /// The cluster this node has joined, if any.
    membership: Membership,
    replicator: Arc<Replicator>,
    /// Where the replication engine reports volume state changes.
    events: Arc<Events>,
    /// Where peers and local NBD clients reach this node.
    addresses: Addresses,
    /// Where the specs of replicated volumes are kept, so a restart knows them.
    specs: PathBuf,
    /// Where copies of the controller database's backups are kept.
    backups: PathBuf,
    /// Serialises creations so a name stays unique across pools.
    creating: Mutex<()>,
}

/// What a node tells about where it is reached, on `GET /v1/node`.
pub struct Addresses {
    /// `host:port` peers connect to.
    pub peer: String,
    /// The Unix socket local NBD clients connect to.
    pub nbd_socket: PathBuf,
}

impl Node {
    pub fn open(
        name: NodeName,
        pools: &[(PoolName, PathBuf)],
        cache: CacheMode,
        replicator: Arc<Replicator>,
        events: Arc<Events>,
        addresses: Addresses,
        data_dir: &Path,
    ) -> anyhow::Result<Node> {
        let pools = Pools::open(pools, cache, data_dir)?;
        let membership = Membership::load(data_dir)?;
        let specs = data_dir.join("specs");
        std::fs::create_dir_all(&specs).with_context(|| format!("creating {}", specs.display()))?;
        let node = Node {
            name,
            pools,
            membership,
            replicator,
            events,
            addresses,
            specs,
            backups: data_dir.join("backups"),
            creating: Mutex::new(()),
        };
        node.load_specs()?;
        Ok(node)
    }

    /// Applies the specs stored by earlier runs.
    fn load_specs(&self) -> anyhow::Result<()> {
        for entry in std::fs::read_dir(&self.specs)? {
            let path = entry?.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let text = std::fs::read_to_string(&path)?;
            let spec: VolumeSpec = serde_json::from_str(&text)
                .with_context(|| format!("stored volume spec {} is invalid", path.display()))?;
            let name = spec.name.clone();
            if let Err(e) = self.apply_spec(spec) {
                tracing::error!(volume = %name, error = %e, "stored volume spec not applied");
            }
        }
        Ok(())
    }

    pub fn events(&self) -> &Arc<Events> {
        &self.events
    }

    pub fn name(&self) -> &NodeName {
        &self.name
    }

    fn find(&self, name: &VolumeName) -> Option<(Arc<Pool>, Entry)> {
        self.pools.find_volume(name)
    }

    /// The volume, if it exists and is usable.
    pub fn volume(&self, name: &VolumeName) -> Result<Arc<Volume>, PoolError> {
        match self.find(name) {
            Some((_, Entry::Ready(v))) => Ok(v),
            Some((_, Entry::Failed { error, .. })) => Err(PoolError::Failed {
                name: name.clone(),
                error,
            }),
            None => Err(PoolError::NotFound { name: name.clone() }),
        }
    }

    pub fn info(&self) -> NodeInfo {
        NodeInfo {
            name: self.name.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            api_version: tandem_api::NODE_API_VERSION,
            peer_address: self.addresses.peer.clone(),
            nbd_socket: Some(self.addresses.nbd_socket.display().to_string()),
            cluster_id: self.membership.cluster_id(),
            pools: self.pools(),
        }
    }

    pub fn pools(&self) -> Vec<PoolInfo> {
        self.pools.infos()
    }

    /// Creates a pool at run time (see [`Pools::create`]).
    pub fn create_pool(&self, req: &CreatePool) -> Result<PoolInfo, NodeError> {
        Ok(self.pools.create(req)?)
    }

    /// Forgets a pool created at run time; refused while it holds volumes.
    pub fn delete_pool(&self, name: &PoolName) -> Result<(), NodeError> {
        // No volume may be created in it meanwhile.
        let _guard = self.creating.lock().unwrap();
        Ok(self.pools.remove(name)?)
    }

    /// Joins a cluster (idempotent for the same cluster and secret).
    pub fn join(&self, req: JoinCluster) -> Result<NodeInfo, NodeError> {
        self.membership.join(self.name.as_str(), req)?;
        Ok(self.info())
    }

    /// Forgets the cluster this node belongs to, if any.
    pub fn leave(&self) -> Result<NodeInfo, NodeError> {
        self.membership.leave()?;
        Ok(self.info())
    }

    /// Whether a request with this `Authorization` header may use the node API; the
    /// cluster's id when it may not. A request carrying the secret also tells where
    /// the controller runs.
    pub fn authorize_call(
        &self,
        header: Option<&str>,
        controller: Option<Controller>,
    ) -> Result<(), Refused> {
        let member = self
            .membership
            .authorize_member(header)
            .map_err(Refused::Stranger)?;
        match controller {
            Some(c) if member => self.membership.check_controller(c),
            _ => Ok(()),
        }
    }

    /// The API address of the cluster's controller, as it last told.
    /// Keeps a copy of a backup of the controller's database that the controller sent.
    pub fn receive_backup(
        &self,
        created_ms: u64,
        bytes: &[u8],
    ) -> Result<tandem_api::BackupInfo, tandem_controller::StoreError> {
        tandem_controller::backups::receive(&self.backups, created_ms, bytes)
    }

    /// The cluster the node has joined, if any.
    pub fn cluster_id(&self) -> Option<tandem_api::ClusterId> {
        self.membership.cluster_id()
    }

    pub fn controller(&self) -> Option<String> {
        self.membership.controller().map(|c| c.address)
    }

    /// Every replicated volume configured here: its spec and its status, by name.
    pub fn replica_reports(&self) -> Vec<ReplicaReport> {
        let mut reports: Vec<ReplicaReport> = self
            .replicator
            .volumes()
            .iter()
            .map(|v| ReplicaReport {
                spec: v.spec().clone(),
                status: v.status(),
            })
            .collect();
        reports.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
        reports
    }

    /// Checks where a spec places this node's replica, before it is applied: the spec's
    /// cluster is the one this node joined (if any), the pool it names exists, and an
    /// existing replica is in that pool.
    pub fn check_placement(&self, spec: &VolumeSpec) -> Result<(), NodeError> {
        if let Some(joined) = self
            .membership
            .cluster_id()
            .filter(|joined| *joined != spec.cluster_id)
        {
            return Err(NodeError::BadSpec(format!(
                "it belongs to cluster {}, and node {} to cluster {joined}",
                spec.cluster_id, self.name
            )));
        }
        let Some(me) = spec.me(&self.name).filter(|p| p.kind.diskful()) else {
            return Ok(());
        };
        let Some(wanted) = &me.pool else {
            return Ok(());
        };
        if self.pools.get(wanted).is_err() {
            return Err(NodeError::BadSpec(format!(
                "it places this node's replica in pool {wanted}, which node {} does not have (its pools: {})",
                self.name,
                self.pools
                    .names()
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        if let Some((pool, _)) = self.find(&spec.name).filter(|(p, _)| p.name() != wanted) {
            return Err(NodeError::BadSpec(format!(
                "it places this node's replica in pool {wanted}, but volume {} is in pool {} here",
                spec.name,
                pool.name()
            )));
        }
        Ok(())
    }

    /// The pool a new replica of `spec` goes to: the one its participant on this node
    /// names, else the first.
    fn replica_pool(&self, spec: &VolumeSpec) -> Result<Arc<Pool>, NodeError> {
        match spec.me(&self.name).and_then(|p| p.pool.as_ref()) {
            Some(pool) => Ok(self.pools.get(pool)?),
            None => Ok(self.pools.first()),
        }
    }

    pub fn volumes(&self) -> Vec<VolumeInfo> {
        let mut all: Vec<VolumeInfo> = self
            .pools
            .all()
            .iter()
            .flat_map(|p| p.entries().into_iter().map(|e| e.info(p.name())))
            .collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    pub fn get(&self, name: &VolumeName) -> Result<VolumeInfo, NodeError> {
        let (pool, entry) = self
            .find(name)
            .ok_or_else(|| PoolError::NotFound { name: name.clone() })?;
        Ok(entry.info(pool.name()))
    }

    pub fn create(&self, req: &CreateVolume) -> Result<VolumeInfo, NodeError> {
        let pool = match &req.pool {
            Some(name) => self.pools.get(name)?,
            None => self.pools.first(),
        };
        let _guard = self.creating.lock().unwrap();
        if let Some((other, _)) = self.find(&req.name) {
            return Err(NodeError::ExistsElsewhere {
                name: req.name.clone(),
                pool: other.name().clone(),
            });
        }
        Ok(pool
            .create(&NewVolume::single(req.name.clone(), req.size, req.thick))?
            .info())
    }

    pub fn update(
        &self,
        name: &VolumeName,
        change: &UpdateVolume,
    ) -> Result<VolumeInfo, NodeError> {
        if self.replicator.get(name).is_some() {
            // Changing one replica alone would make the replicas disagree.
            return Err(NodeError::Refused(format!(
                "volume {name} is replicated: change its size in its spec, on every participant"
            )));
        }
        let (pool, entry) = self
            .find(name)
            .ok_or_else(|| PoolError::NotFound { name: name.clone() })?;
        let volume = match entry {
            Entry::Ready(v) => v,
            Entry::Failed { error, .. } => {
                return Err(PoolError::Failed {
                    name: name.clone(),
                    error,
                }
                .into());
            }
        };
        volume.update(change.size, change.read_only, || Ok(pool.stats()?.free))?;
        Ok(volume.info())
    }

    /// Deletes a volume: this node's part of a replicated one (spec and replica), or a
    /// local volume.
    /// Unknown names are `NotFound`. A stored spec that could not be applied at start
    /// is removed too, so it does not come back at the next one.
    pub fn delete(&self, name: &VolumeName) -> Result<(), NodeError> {
        let replicated = self.replicator.get(name);
        if replicated.as_ref().is_some_and(|v| v.is_open()) {
            return Err(PoolError::InUse {
                name: name.clone(),
                openers: 1,
            }
            .into());
        }
        // The spec goes first: from then on a crash cannot bring the volume back.
        let path = self.spec_path(&name);
        let had_spec = crate::durable::remove(&path).map_err(|e| NodeError::SpecStore {
            name: name.clone(),
            source: e,
        })?;
        if replicated.is_some() {
            self.replicator.remove(name);
        }
        match self.find(name) {
            Some((pool, _)) => Ok(pool.delete(name)?),
            None if had_spec || replicated.is_some() => Ok(()),
            None => Err(PoolError::NotFound { name: name.clone() }.into()),
        }
    }

    pub fn replicated(&self, name: &VolumeName) -> Option<Arc<ReplicatedVolume>> {
        self.replicator.get(name)
    }

    pub fn replicated_names(&self) -> Vec<VolumeName> {
        self.replicator
            .volumes()
            .iter()
            .map(|v| v.spec().name.clone())
            .collect()
    }

    /// Makes this node a participant of a replicated volume as `spec` says: creates the
    /// local replica when this node is diskful and has none, and remembers the spec.
    /// A volume open here changes in place (participants, kinds, size, options); a
    /// change that would give or take this node's replica, or make it another volume,
    /// is refused until it is closed here.
    pub fn set_spec(&self, spec: VolumeSpec) -> Result<VolumeStatus, NodeError> {
        spec.validate(&self.name).map_err(NodeError::BadSpec)?;
        if let Some(current) = self.replicator.get(&spec.name).map(|v| v.spec())
            && current.volume_id == spec.volume_id
            && spec.revision < current.revision
        {
            tracing::warn!(volume = %spec.name, revision = spec.revision, held = current.revision,
                "older spec refused");
            return Err(NodeError::Refused(format!(
                "volume {}: spec revision {} is older than the one this node holds ({})",
                spec.name, spec.revision, current.revision
            )));
        }
        if let Some(current) = self.replicator.get(&spec.name).filter(|v| v.is_open()) {
            let me = spec.me(&self.name).expect("validated");
            if let Err(why) = current.in_place(&spec, me, None) {
                return Err(NodeError::Refused(format!(
                    "volume {} is open on this node, and this change needs it closed here: {why}",
                    spec.name
                )));
            }
        }
        let name = spec.name.clone();
        let path = self.spec_path(&name);
        let tmp = path.with_extension("json.tmp");
        let store = |e| NodeError::SpecStore {
            name: name.clone(),
            source: e,
        };
        std::fs::write(
            &tmp,
            serde_json::to_vec_pretty(&spec).expect("serialisable"),
        )
        .map_err(store)?;
        let volume = match self.apply_spec(spec) {
            Ok(v) => v,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        std::fs::rename(&tmp, &path).map_err(store)?;
        Ok(volume.status())
    }

    fn apply_spec(&self, spec: VolumeSpec) -> Result<Arc<ReplicatedVolume>, NodeError> {
        let me = spec.me(&self.name).ok_or_else(|| {
            NodeError::BadSpec(format!("node {} is not a participant", self.name))
        })?;
        let diskful = me.kind.diskful();
        let local = if diskful {
            Some(self.local_replica(&spec, me.node_id)?)
        } else {
            None
        };
        let name = spec.name.clone();
        let volume_id = spec.volume_id;
        let volume = self.replicator.apply(spec, local).map_err(|e| match e {
            tandem_replication::ApplyError::Invalid(why) => NodeError::BadSpec(why),
            // Opened meanwhile (set_spec checked before).
            tandem_replication::ApplyError::InUse(_) => NodeError::SpecInUse(name.clone()),
        })?;
        if !diskful {
            self.drop_former_replica(&name, volume_id)?;
        }
        Ok(volume)
    }

    /// A replica this node kept from when it was diskful gets no writes any more: it is
    /// deleted (the volume's data lives on its current replicas), or, while something
    /// still holds it, marked Outdated so it never passes for current if this node holds
    /// a replica again.
    fn drop_former_replica(&self, name: &VolumeName, volume_id: VolumeId) -> Result<(), NodeError> {
        let Some((pool, Entry::Ready(v))) = self.find(name) else {
            return Ok(());
        };
        let sb = v.superblock();
        if sb.volume_id != volume_id {
            return Ok(());
        }
        drop(v);
        match pool.delete(name) {
            Ok(()) => {
                tracing::info!(volume = %name, pool = %pool.name(), "this node is no longer diskful: its former replica is deleted");
            }
            Err(e) => {
                if let Some((_, Entry::Ready(v))) = self.find(name) {
                    if v.superblock().disk_state == tandem_api::DiskState::UpToDate {
                        v.update_superblock(|sb| sb.disk_state = tandem_api::DiskState::Outdated)?;
                    }
                }
                tracing::warn!(volume = %name, error = %e, "this node is no longer diskful: its former replica is kept, Outdated");
            }
        }
        Ok(())
    }

    fn spec_path(&self, name: &VolumeName) -> PathBuf {
        self.specs.join(format!("{name}.json"))
    }

    /// Whether the spec this node stored for the volume made it hold a replica.
    fn held_before(&self, spec: &VolumeSpec) -> bool {
        std::fs::read_to_string(self.spec_path(&spec.name))
            .ok()
            .and_then(|text| serde_json::from_str::<VolumeSpec>(&text).ok())
            .is_some_and(|stored| {
                stored.volume_id == spec.volume_id
                    && stored.me(&self.name).is_some_and(|p| p.kind.diskful())
            })
    }

    /// This node's replica of a spec'd volume, created empty if missing.
    fn local_replica(&self, spec: &VolumeSpec, node_id: NodeId) -> Result<Arc<Volume>, NodeError> {
        let _guard = self.creating.lock().unwrap();
        let volume = match self.find(&spec.name) {
            Some((_, Entry::Ready(v))) => v,
            Some((_, Entry::Failed { error, .. })) => {
                return Err(PoolError::Failed {
                    name: spec.name.clone(),
                    error,
                }
                .into());
            }
            None => {
                // Empty replicas created from one spec hold the same (zero) data, so they
                // start at one generation derived from the volume id: no initial sync.
                // A replica added to a volume that may hold data (`fresh`) starts with
                // no generation and Inconsistent: its first connection to an UpToDate
                // replica resyncs it in full, and until then it is never read from
                // nor stood on to become Primary.
                // A replica this node held before and lost (files removed, disk
                // replaced) is no different: its peers may hold data.
                let lost = self.held_before(spec);
                if lost {
                    tracing::warn!(volume = %spec.name, "this node's replica is missing: recreated empty, to be resynced in full");
                }
                let fresh = lost || spec.participant(node_id).is_some_and(|p| p.fresh);
                // A clone's replica starts as a copy of its snapshot where this node
                // holds it; elsewhere it is resynced in full from one that does.
                let origin = match &spec.origin {
                    Some(o) if !fresh => {
                        let data = self
                            .volume(&o.volume)
                            .and_then(|v| v.open_snapshot(&o.snapshot));
                        if let Err(e) = &data {
                            tracing::warn!(volume = %spec.name, origin = %o, error = %e,
                                "the clone's snapshot is not on this node: its replica is resynced in full");
                        }
                        Some(data.ok())
                    }
                    _ => None,
                };
                let fresh = fresh || matches!(origin, Some(None));
                let generation = if fresh {
                    GenerationId(0)
                } else {
                    GenerationId(u64::from_le_bytes(spec.volume_id.0[..8].try_into().unwrap()) | 1)
                };
                let new = NewVolume {
                    name: spec.name.clone(),
                    size: spec.size,
                    thick: false,
                    id: spec.volume_id,
                    node_id,
                    generation,
                };
                let pool = self.replica_pool(spec)?;
                let created = match origin.flatten() {
                    Some(data) => pool.create_from(&new, &data)?,
                    None => pool.create(&new)?,
                };
                if fresh {
                    created.update_superblock(|sb| {
                        sb.disk_state = tandem_api::DiskState::Inconsistent
                    })?;
                    tracing::info!(volume = %spec.name, "new replica for a volume that may hold data: Inconsistent until a full resync");
                }
                created
            }
        };
        let sb = volume.superblock();
        if sb.volume_id != spec.volume_id {
            return Err(NodeError::BadSpec(format!(
                "a different volume named {} (id {}) already exists on this node",
                spec.name, sb.volume_id
            )));
        }
        if sb.size > spec.size {
            return Err(NodeError::BadSpec(format!(
                "the local replica is larger ({} bytes) than the spec",
                sb.size
            )));
        }
        if sb.size < spec.size {
            volume.update(Some(spec.size), None, || Ok(u64::MAX))?;
        }
        if sb.node_id != node_id {
            volume.update_superblock(|sb| sb.node_id = node_id)?;
        }
        // A replica without a generation holds no data of its own (a fresh one whose
        // creation was cut short before it was marked Inconsistent, say).
        if sb.generations.current.0 == 0 && sb.disk_state == tandem_api::DiskState::UpToDate {
            volume.update_superblock(|sb| sb.disk_state = tandem_api::DiskState::Inconsistent)?;
        }
        Ok(volume)
    }

    fn replica(&self, name: &VolumeName) -> Result<Arc<ReplicatedVolume>, NodeError> {
        self.replicator
            .get(name)
            .ok_or_else(|| NodeError::NotReplicated(name.clone()))
    }

    /// Ends a split brain on this node's side (see [`ReplicatedVolume::resolve`]).
    pub fn resolve(
        &self,
        name: &VolumeName,
        discard: &NodeName,
    ) -> Result<VolumeStatus, NodeError> {
        let volume = self.replica(name)?;
        volume.resolve(discard).map_err(NodeError::Refused)?;
        Ok(volume.status())
    }

    /// Online verify against every connected peer; differing blocks per peer.
    pub fn verify(&self, name: &VolumeName) -> Result<Vec<(NodeName, u64)>, NodeError> {
        self.replica(name)?.verify().map_err(NodeError::Refused)
    }

    /// Discards this node's replica in favour of a full resync from a peer.
    pub fn invalidate(&self, name: &VolumeName) -> Result<VolumeStatus, NodeError> {
        let volume = self.replica(name)?;
        volume.invalidate().map_err(NodeError::Refused)?;
        Ok(volume.status())
    }

    /// Declares this node's replica whole as it is, on a volume with none left (see
    /// `ReplicatedVolume::trust`).
    pub fn trust(&self, name: &VolumeName) -> Result<VolumeStatus, NodeError> {
        let volume = self.replica(name)?;
        volume.trust().map_err(NodeError::Refused)?;
        Ok(volume.status())
    }

    /// Takes a snapshot of a replicated volume on every replica it reaches, at one
    /// point of the write order. This node must be able to be Primary: it is already
    /// (the volume is open here), or becomes so for the snapshot when the volume is
    /// closed everywhere.
    pub fn snapshot(
        &self,
        name: &VolumeName,
        snap: &SnapshotName,
    ) -> Result<SnapshotTaken, NodeError> {
        let volume = self.replica(name)?;
        volume.open(true).map_err(|e| NodeError::Refused(e.0))?;
        let taken = volume.snapshot(snap);
        volume.close(true);
        taken.map_err(|e| NodeError::Refused(e.0))
    }

    /// The snapshots this node's replica of `name` holds (none on a diskless node).
    pub fn snapshots(&self, name: &VolumeName) -> Result<Vec<SnapshotInfo>, NodeError> {
        match self.find(name) {
            Some((_, Entry::Ready(v))) => Ok(v.snapshots()),
            Some((_, Entry::Failed { error, .. })) => Err(PoolError::Failed {
                name: name.clone(),
                error,
            }
            .into()),
            None if self.replicator.get(name).is_some() => Ok(Vec::new()),
            None => Err(PoolError::NotFound { name: name.clone() }.into()),
        }
    }

    /// Every snapshot the replicas in this node's pools hold (those of a failed
    /// replica cannot be read): what the controller compares with its record.
    pub fn all_snapshots(&self) -> Vec<SnapshotInfo> {
        (self.pools.all().iter())
            .flat_map(|p| p.entries())
            .flat_map(|e| match e {
                Entry::Ready(v) => v.snapshots(),
                Entry::Failed { .. } => Vec::new(),
            })
            .collect()
    }

    /// The blocks that changed between two snapshots this node's replica holds.
    pub fn changes(
        &self,
        name: &VolumeName,
        snap: &SnapshotName,
        since: &SnapshotName,
    ) -> Result<SnapshotChanges, NodeError> {
        let volume = self.volume(name)?;
        let size = (volume.snapshots().into_iter())
            .find(|s| &s.name == snap)
            .ok_or_else(|| PoolError::SnapshotNotFound {
                volume: name.clone(),
                snapshot: snap.clone(),
            })?
            .size;
        let (newer, older) = (volume.open_snapshot(snap)?, volume.open_snapshot(since)?);
        let spans = newer
            .changes_against(&older, 0, size)
            .map_err(PoolError::io(format!(
                "comparing snapshots {since} and {snap} of {name}"
            )))?;
        let mut extents = Vec::new();
        let mut at = 0;
        for s in spans {
            if s.changed {
                extents.push(ChangedExtent {
                    offset: at,
                    length: s.len,
                });
            }
            at += s.len;
        }
        Ok(SnapshotChanges {
            volume: name.clone(),
            snapshot: snap.clone(),
            since: since.clone(),
            node: self.name.clone(),
            granularity: tandem_pool::BLOCK_SIZE,
            changed_bytes: extents.iter().map(|e| e.length).sum(),
            extents,
        })
    }

    /// Rolls this node's part of a volume back to a snapshot (see
    /// [`ReplicatedVolume::roll_back`]).
    pub fn roll_back(
        &self,
        name: &VolumeName,
        snap: &SnapshotName,
        generation: u64,
    ) -> Result<VolumeStatus, NodeError> {
        let volume = self.replica(name)?;
        volume
            .roll_back(snap, generation)
            .map_err(NodeError::Refused)?;
        Ok(volume.status())
    }

    /// Every peer of the volume connects afresh, refused ones too.
    pub fn reconnect(&self, name: &VolumeName) -> Result<VolumeStatus, NodeError> {
        let volume = self.replica(name)?;
        volume.reconnect();
        Ok(volume.status())
    }

    /// Deletes this node's copy of a snapshot.
    pub fn delete_snapshot(&self, name: &VolumeName, snap: &SnapshotName) -> Result<(), NodeError> {
        Ok(self.volume(name)?.delete_snapshot(snap)?)
    }

    pub fn status(&self, name: &VolumeName) -> Result<VolumeStatus, NodeError> {
        self.replicator
            .get(name)
            .map(|v| v.status())
            .ok_or_else(|| NodeError::NotReplicated(name.clone()))
    }
}
