//! The cluster's desired state: what the controller keeps in its database, and the
//! volume specs it derives from it for each node.

use std::collections::{BTreeMap, BTreeSet};

use tandem_api::{
    ClusterId, Group, GroupName, NodeId, NodeName, Origin, Participant, ParticipantKind, PoolName,
    SnapshotName, StoreName, VolumeId, VolumeName, VolumeOptions, VolumeSpec,
};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    pub id: ClusterId,
    /// Presented by the controller to its nodes (`Authorization: Bearer`).
    pub secret: String,
    /// The controller epoch: raised by each controller that starts; nodes refuse calls
    /// from an older one.
    pub epoch: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRow {
    /// The node's API address, `host:port`.
    pub address: String,
    /// Where its peers reach it; learnt from the node, empty until it has answered.
    pub peer_address: String,
}

/// A pool as last reported by its node (kept so pools of offline nodes stay listed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolRow {
    pub kind: String,
    pub path: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParticipantRow {
    pub node: NodeName,
    pub node_id: NodeId,
    pub kind: ParticipantKind,
    pub pool: Option<PoolName>,
    /// Exported over NBD on its node by the operator's request.
    pub attached: bool,
    /// Added after the volume was created: starts empty and takes a full resync.
    pub fresh: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeRow {
    pub id: VolumeId,
    /// Raised with every change of the row (see [`VolumeSpec::revision`]).
    pub revision: u64,
    pub size: u64,
    pub group: GroupName,
    /// Diskful replicas wanted.
    pub replicas: u8,
    pub participants: Vec<ParticipantRow>,
    /// The snapshot it was cloned from, if it is a clone.
    pub origin: Option<Origin>,
}

impl VolumeRow {
    pub fn participant(&self, node: &NodeName) -> Option<&ParticipantRow> {
        self.participants.iter().find(|p| &p.node == node)
    }

    pub fn diskful(&self) -> impl Iterator<Item = &ParticipantRow> {
        self.participants.iter().filter(|p| p.kind.diskful())
    }

    /// The lowest node id no participant uses.
    pub fn free_node_id(&self) -> Option<NodeId> {
        (0..=NodeId::MAX)
            .filter_map(NodeId::new)
            .find(|id| self.participants.iter().all(|p| p.node_id != *id))
    }
}

/// Everything the controller persists.
#[derive(Debug, Clone)]
pub struct Model {
    pub cluster: Cluster,
    pub nodes: BTreeMap<NodeName, NodeRow>,
    pub pools: BTreeMap<(NodeName, PoolName), PoolRow>,
    pub groups: BTreeMap<GroupName, Group>,
    pub volumes: BTreeMap<VolumeName, VolumeRow>,
    pub kv: BTreeMap<(StoreName, String), String>,
    pub snapshots: BTreeMap<(VolumeName, SnapshotName), SnapshotRow>,
    /// Replicas to drop from nodes (recorded when they leave the model).
    pub deletions: BTreeSet<Part>,
}

/// What every call of the controller to a node carries: the cluster secret, where the
/// controller's API is, and its epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub secret: String,
    pub controller: String,
    pub epoch: u64,
}

/// A volume's part on a node (a replica, a diskless or tiebreaker participant):
/// what the controller deletes from nodes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Part {
    pub node: NodeName,
    pub volume: VolumeName,
    pub id: VolumeId,
}

/// A snapshot of a volume, and the nodes whose replica holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRow {
    /// Seconds since the Unix epoch.
    pub created: u64,
    pub size: u64,
    pub replicas: Vec<NodeName>,
}

impl Model {
    /// The spec of a volume as every participant must see it, or `None` while it
    /// cannot be given to nodes (no diskful participant left, or a participant whose
    /// peer address is not known yet).
    pub fn spec(&self, name: &VolumeName) -> Option<VolumeSpec> {
        let v = self.volumes.get(name)?;
        if v.diskful().next().is_none() {
            return None;
        }
        let group = self.groups.get(&v.group);
        let participants = v
            .participants
            .iter()
            .map(|p| {
                let node = self.nodes.get(&p.node)?;
                if node.peer_address.is_empty() {
                    return None;
                }
                Some(Participant {
                    node_id: p.node_id,
                    node: p.node.clone(),
                    address: node.peer_address.clone(),
                    kind: p.kind,
                    pool: p.pool.clone(),
                    fresh: p.fresh,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        Some(VolumeSpec {
            cluster_id: self.cluster.id,
            volume_id: v.id,
            name: name.clone(),
            revision: v.revision,
            size: v.size,
            participants,
            options: VolumeOptions {
                quorum: group.map(|g| g.quorum).unwrap_or_default(),
                on_no_quorum: group.map(|g| g.on_no_quorum).unwrap_or_default(),
                ..VolumeOptions::default()
            },
            origin: v.origin.clone(),
        })
    }

    /// The specs a node must hold, by volume name.
    pub fn specs_for(&self, node: &NodeName) -> BTreeMap<VolumeName, VolumeSpec> {
        self.volumes
            .iter()
            .filter(|(_, v)| v.participant(node).is_some())
            .filter_map(|(name, _)| Some((name.clone(), self.spec(name)?)))
            .collect()
    }

    /// How the controller running on `host` presents itself to nodes.
    pub fn caller(&self, host: &NodeName) -> Caller {
        Caller {
            secret: self.cluster.secret.clone(),
            controller: self
                .nodes
                .get(host)
                .map_or("", |r| r.address.as_str())
                .to_owned(),
            epoch: self.cluster.epoch,
        }
    }

    /// Every volume's part on every node.
    pub fn parts(&self) -> BTreeSet<Part> {
        self.volumes
            .iter()
            .flat_map(|(name, v)| {
                v.participants.iter().map(move |p| Part {
                    node: p.node.clone(),
                    volume: name.clone(),
                    id: v.id,
                })
            })
            .collect()
    }

    /// Volumes a node takes part in.
    pub fn participations(&self, node: &NodeName) -> usize {
        self.volumes
            .values()
            .filter(|v| v.participant(node).is_some())
            .count()
    }
}
