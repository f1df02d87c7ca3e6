//! What the API shows: the model joined with what the nodes report, and the health
//! findings drawn from it.

use std::collections::BTreeMap;

use tandem_api::{
    ClusterNode, ClusterParticipant, ClusterPool, ClusterVolume, ConnectionState, DiskState,
    Finding, Health, NodeName, NodeState, ReplicationState, Role, Severity, VolumeId, VolumeName,
    VolumeSpec, VolumeState, VolumeStatus,
};

use crate::controller::Observed;
use crate::model::{Model, VolumeRow};

/// A pool under this share of free space is reported by `tandem health`.
const LOW_FREE_PERCENT: u64 = 10;

/// A consistent snapshot of the model and the nodes' reports.
pub struct Snapshot<'a> {
    pub model: &'a Model,
    pub observed: &'a BTreeMap<NodeName, Observed>,
}

impl Snapshot<'_> {
    fn online(&self, node: &NodeName) -> bool {
        self.observed.get(node).is_some_and(Observed::online)
    }

    /// A participant's own report of a volume, if its node is online and holds this
    /// very volume (not an older one of the same name).
    fn status(&self, name: &VolumeName, v: &VolumeRow, node: &NodeName) -> Option<&VolumeStatus> {
        let o = self.observed.get(node).filter(|o| o.online())?;
        let r = o.replicas.get(name)?;
        (r.spec.volume_id == v.id).then_some(&r.status)
    }

    pub fn node(&self, name: &NodeName) -> Option<ClusterNode> {
        let row = self.model.nodes.get(name)?;
        let o = self.observed.get(name).cloned().unwrap_or_default();
        Some(ClusterNode {
            name: name.clone(),
            address: row.address.clone(),
            state: o.state,
            version: o.version,
            error: o.error.or_else(|| {
                (!o.failures.is_empty()).then(|| {
                    o.failures
                        .iter()
                        .map(|(v, e)| format!("volume {v}: {e}"))
                        .collect::<Vec<_>>()
                        .join("; ")
                })
            }),
            participants: self.model.participations(name) as u32,
        })
    }

    pub fn nodes(&self) -> Vec<ClusterNode> {
        self.model
            .nodes
            .keys()
            .filter_map(|n| self.node(n))
            .collect()
    }

    pub fn pools(&self) -> Vec<ClusterPool> {
        self.model
            .pools
            .iter()
            .map(|((node, name), row)| {
                let reported = self
                    .observed
                    .get(node)
                    .and_then(|o| o.pools.iter().find(|p| &p.name == name));
                let placed: Vec<u64> = self
                    .model
                    .volumes
                    .values()
                    .filter(|v| {
                        v.participant(node)
                            .is_some_and(|p| p.kind.diskful() && p.pool.as_ref() == Some(name))
                    })
                    .map(|v| v.size)
                    .collect();
                ClusterPool {
                    node: node.clone(),
                    name: name.clone(),
                    kind: row.kind.clone(),
                    path: row.path.clone(),
                    capacity: reported.map(|p| p.capacity),
                    free: reported.map(|p| p.free),
                    replicas: placed.len() as u32,
                    provisioned: placed.iter().sum(),
                    snapshots: reported.map(|p| p.reflink),
                }
            })
            .collect()
    }

    pub fn volume(&self, name: &VolumeName) -> Option<ClusterVolume> {
        let v = self.model.volumes.get(name)?;
        let statuses: Vec<Option<&VolumeStatus>> = v
            .participants
            .iter()
            .map(|p| self.status(name, v, &p.node))
            .collect();
        let participants = v
            .participants
            .iter()
            .zip(&statuses)
            .map(|(p, status)| {
                // How the others see this participant: the least settled state wins.
                let seen: Vec<_> = statuses
                    .iter()
                    .flatten()
                    .flat_map(|s| s.peers.iter().filter(|peer| peer.node == p.node))
                    .collect();
                let replication = seen
                    .iter()
                    .filter(|s| s.kind.diskful())
                    .map(|s| s.replication)
                    .max_by_key(|r| (*r != ReplicationState::Established) as u8);
                let done = seen.iter().find_map(|s| s.done);
                let error = match self.observed.get(&p.node) {
                    Some(o) if !o.online() => Some(format!("node {} is {}", p.node, o.state)),
                    None => Some(format!("node {} has not answered yet", p.node)),
                    Some(o) => o.failures.get(name).cloned(),
                };
                ClusterParticipant {
                    node: p.node.clone(),
                    node_id: p.node_id,
                    kind: p.kind,
                    pool: p.pool.clone(),
                    attached: p.attached,
                    disk: status.map(|s| s.disk),
                    role: status.map(|s| s.role),
                    replication: if p.kind.diskful() { replication } else { None },
                    done,
                    open: status.is_some_and(|s| s.open),
                    quorum: status.map(|s| s.quorum),
                    error,
                }
            })
            .collect();
        Some(ClusterVolume {
            name: name.clone(),
            id: v.id,
            size: v.size,
            group: v.group.clone(),
            replicas: v.replicas,
            state: self.volume_state(v, &statuses),
            participants,
        })
    }

    fn volume_state(&self, v: &VolumeRow, statuses: &[Option<&VolumeStatus>]) -> VolumeState {
        let all_online = v.participants.iter().all(|p| self.online(&p.node));
        let reported: Vec<(&crate::model::ParticipantRow, &VolumeStatus)> = v
            .participants
            .iter()
            .zip(statuses)
            .filter_map(|(p, s)| Some((p, (*s)?)))
            .collect();
        if reported.is_empty() {
            return if all_online && v.diskful().next().is_some() {
                VolumeState::Creating
            } else {
                VolumeState::Failed
            };
        }
        let diskful: Vec<Option<DiskState>> = v
            .participants
            .iter()
            .zip(statuses)
            .filter(|(p, _)| p.kind.diskful())
            .map(|(_, s)| s.map(|s| s.disk))
            .collect();
        let peers = || reported.iter().flat_map(|(_, s)| &s.peers);
        if peers().any(|p| p.connection == ConnectionState::StandAlone) {
            return VolumeState::SplitBrain;
        }
        if diskful.is_empty()
            || diskful.contains(&Some(DiskState::Failed))
            || !diskful.contains(&Some(DiskState::UpToDate))
        {
            return VolumeState::Failed;
        }
        if reported.iter().any(|(_, s)| !s.quorum) {
            return VolumeState::NoQuorum;
        }
        if peers().any(|p| {
            matches!(
                p.replication,
                ReplicationState::SyncSource | ReplicationState::SyncTarget
            )
        }) {
            return VolumeState::Syncing;
        }
        let every_replica_current = diskful.iter().all(|d| *d == Some(DiskState::UpToDate));
        let every_link_up = reported.len() == v.participants.len()
            && peers().all(|p| p.connection == ConnectionState::Connected);
        if every_replica_current && every_link_up {
            VolumeState::UpToDate
        } else {
            VolumeState::Degraded
        }
    }

    pub fn volumes(&self) -> Vec<ClusterVolume> {
        self.model
            .volumes
            .keys()
            .filter_map(|n| self.volume(n))
            .collect()
    }

    /// The node best placed to speak for a volume: where it is Primary, else an online
    /// node holding an UpToDate replica, else any online participant.
    pub fn speaker(&self, name: &VolumeName) -> Option<NodeName> {
        let v = self.model.volumes.get(name)?;
        let report = |p: &&crate::model::ParticipantRow| self.status(name, v, &p.node);
        let ps = &v.participants;
        ps.iter()
            .find(|p| report(p).is_some_and(|s| s.role == Role::Primary))
            .or_else(|| {
                ps.iter().find(|p| {
                    p.kind.diskful() && report(p).is_some_and(|s| s.disk == DiskState::UpToDate)
                })
            })
            .or_else(|| ps.iter().find(|p| report(p).is_some()))
            .map(|p| p.node.clone())
    }

    /// Nodes where the volume is open (in use by an NBD client).
    pub fn open_on(&self, name: &VolumeName) -> Vec<NodeName> {
        let Some(v) = self.model.volumes.get(name) else {
            return Vec::new();
        };
        v.participants
            .iter()
            .filter(|p| self.status(name, v, &p.node).is_some_and(|s| s.open))
            .map(|p| p.node.clone())
            .collect()
    }

    /// Whether `node` holds the only UpToDate replica of a volume, as last reported.
    pub fn sole_up_to_date(&self, name: &VolumeName, node: &NodeName) -> bool {
        let Some(v) = self.model.volumes.get(name) else {
            return false;
        };
        if !v.participant(node).is_some_and(|p| p.kind.diskful()) {
            return false;
        }
        !v.diskful().any(|p| {
            &p.node != node
                && self
                    .status(name, v, &p.node)
                    .is_some_and(|s| s.disk == DiskState::UpToDate)
        })
    }

    /// Volumes nodes reported holding that the controller has no record of (or not
    /// on those nodes), by name and id, with each holder's spec.
    pub fn orphans(&self) -> BTreeMap<(VolumeName, VolumeId), BTreeMap<NodeName, VolumeSpec>> {
        let mut out: BTreeMap<_, BTreeMap<NodeName, VolumeSpec>> = BTreeMap::new();
        for (node, o) in self.observed {
            for (name, spec) in &o.orphans {
                out.entry((name.clone(), spec.volume_id))
                    .or_default()
                    .insert(node.clone(), spec.clone());
            }
        }
        out
    }

    pub fn health(&self) -> Health {
        let mut findings = Vec::new();
        for n in self.nodes() {
            if n.state != NodeState::Online {
                let correction = if n.state == NodeState::VersionMismatch {
                    "run the same tandemd release on every node".to_owned()
                } else {
                    format!(
                        "start tandemd on {} (API {}), or remove it with `tandem node delete {}`",
                        n.name, n.address, n.name
                    )
                };
                findings.push(Finding {
                    severity: Severity::Error,
                    object: format!("node {}", n.name),
                    message: format!(
                        "node is {}{}",
                        n.state,
                        n.error.map(|e| format!(": {e}")).unwrap_or_default()
                    ),
                    correction,
                });
            }
        }
        for p in self.pools() {
            let (Some(capacity), Some(free)) = (p.capacity, p.free) else {
                continue;
            };
            if capacity > 0 && free * 100 < capacity * LOW_FREE_PERCENT {
                findings.push(Finding {
                    severity: Severity::Warning,
                    object: format!("pool {}/{}", p.node, p.name),
                    message: format!(
                        "only {}% free ({} of {})",
                        free * 100 / capacity,
                        tandem_api::ByteSize(free),
                        tandem_api::ByteSize(capacity)
                    ),
                    correction: "free space in the pool's file system, or add a pool on another \
                                 node and move replicas with `tandem volume replicas`"
                        .into(),
                });
            }
        }
        for ((name, id), specs) in self.orphans() {
            let holders: Vec<&str> = specs.keys().map(|n| n.as_str()).collect();
            let known = self.model.volumes.get(&name).is_some_and(|v| v.id == id);
            findings.push(Finding {
                severity: Severity::Warning,
                object: format!("volume {name}"),
                message: {
                    let (nodes, verb) = if holders.len() == 1 {
                        ("node", "holds")
                    } else {
                        ("nodes", "hold")
                    };
                    let who = holders.join(", ");
                    if known {
                        format!("{nodes} {who} {verb} a replica of volume {name} where the controller places none")
                    } else {
                        format!("{nodes} {who} {verb} volume {name} (id {id}), which the controller has no record of")
                    }
                },
                correction: if known {
                    "add it back with `tandem volume replicas NAME --add NODE` once checked, \
                     or have it deleted with `tandem volume delete NAME --orphan`"
                        .into()
                } else {
                    "adopt it with `tandem volume adopt NAME`, or have it deleted with \
                     `tandem volume delete NAME --orphan`"
                        .into()
                },
            });
        }
        for v in self.volumes() {
            let (severity, correction) = match v.state {
                VolumeState::UpToDate => continue,
                VolumeState::Creating => (
                    Severity::Warning,
                    "wait for its nodes to create the replicas".to_owned(),
                ),
                VolumeState::Syncing => (
                    Severity::Error,
                    "wait for the resync to finish; the volume is not redundant until then".into(),
                ),
                VolumeState::Degraded => (
                    Severity::Error,
                    "bring the nodes of its missing replicas back, or replace a lost one with \
                     `tandem volume replicas NAME --add NODE`"
                        .into(),
                ),
                VolumeState::NoQuorum => (
                    Severity::Error,
                    "reconnect the nodes so a majority of its participants see each other".into(),
                ),
                VolumeState::SplitBrain => (
                    Severity::Error,
                    "choose the replica whose changes to give up, and discard it: \
                     `tandem volume resolve NAME --discard NODE`"
                        .into(),
                ),
                VolumeState::Failed => (
                    Severity::Error,
                    "no usable UpToDate replica: check the failed disks and node logs; if every \
                     replica's disk failed, repair them, restart their nodes, and declare the one \
                     that failed last whole with `tandem volume trust NAME --node NODE`"
                        .into(),
                ),
            };
            let detail: Vec<String> = v
                .participants
                .iter()
                .filter(|p| p.kind.diskful() || p.error.is_some())
                .filter(|p| p.disk != Some(DiskState::UpToDate) || p.error.is_some())
                .map(|p| {
                    let pool = match (&p.pool, p.disk) {
                        (Some(pool), Some(DiskState::Failed)) => format!(" in pool {pool}"),
                        _ => String::new(),
                    };
                    format!(
                        "{} {}{pool}",
                        p.node,
                        p.error.clone().unwrap_or_else(|| {
                            p.disk.map_or("not reported".into(), |d| d.to_string())
                        })
                    )
                })
                .collect();
            // A failed disk says what to do about it first: the volume's state follows.
            let failed: Vec<String> = (v.participants.iter())
                .filter(|p| p.disk == Some(DiskState::Failed))
                .map(|p| match &p.pool {
                    Some(pool) => format!("pool {pool} on {}", p.node),
                    None => format!("the pool on {}", p.node),
                })
                .collect();
            let correction = if failed.is_empty() {
                correction
            } else {
                format!(
                    "the file system of {} returns errors: repair or replace it, then restart \
                     tandemd there (the replica resyncs from its peers); meanwhile: {correction}",
                    failed.join(" and ")
                )
            };
            findings.push(Finding {
                severity,
                object: format!("volume {}", v.name),
                message: if detail.is_empty() {
                    format!("volume is {}", v.state)
                } else {
                    format!("volume is {} ({})", v.state, detail.join(", "))
                },
                correction,
            });
        }
        let severity = findings
            .iter()
            .map(|f| f.severity)
            .max_by_key(|s| match s {
                Severity::Ok => 0,
                Severity::Warning => 1,
                Severity::Error => 2,
            })
            .unwrap_or(Severity::Ok);
        Health { severity, findings }
    }
}

#[cfg(test)]
mod tests {
    use tandem_api::{NodeId, ParticipantKind, PeerStatus, ReplicaReport};

    use super::*;
    use crate::model::{Cluster, NodeRow, ParticipantRow};

    fn model() -> Model {
        let mut nodes = BTreeMap::new();
        for (i, n) in ["n1", "n2", "n3"].iter().enumerate() {
            nodes.insert(
                n.parse().unwrap(),
                NodeRow {
                    address: format!("127.0.0.1:{}", 3370 + i),
                    peer_address: format!("127.0.0.1:{}", 7700 + i),
                },
            );
        }
        let part = |node: &str, id, kind| ParticipantRow {
            node: node.parse().unwrap(),
            node_id: NodeId::new(id).unwrap(),
            kind,
            pool: None,
            attached: false,
            fresh: false,
        };
        let mut volumes = BTreeMap::new();
        volumes.insert(
            "vm1".parse().unwrap(),
            VolumeRow {
                id: tandem_api::VolumeId([7; 16]),
                revision: 1,
                size: 1 << 30,
                group: "default".parse().unwrap(),
                replicas: 2,
                participants: vec![
                    part("n1", 0, ParticipantKind::Diskful),
                    part("n2", 1, ParticipantKind::Diskful),
                    part("n3", 2, ParticipantKind::Tiebreaker),
                ],
                origin: None,
            },
        );
        Model {
            cluster: Cluster {
                id: tandem_api::ClusterId([1; 16]),
                secret: "s".into(),
                epoch: 1,
            },
            nodes,
            pools: BTreeMap::new(),
            groups: BTreeMap::new(),
            volumes,
            kv: BTreeMap::new(),
            snapshots: BTreeMap::new(),
            deletions: Default::default(),
        }
    }

    /// Every node online, each reporting the volume with the given own disk state and
    /// every link connected.
    fn observed(model: &Model, disks: [DiskState; 3]) -> BTreeMap<NodeName, Observed> {
        let name: VolumeName = "vm1".parse().unwrap();
        let spec = model.spec(&name).unwrap();
        let mut all = BTreeMap::new();
        for (i, p) in spec.participants.iter().enumerate() {
            let peers = spec
                .participants
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(j, q)| PeerStatus {
                    node: q.node.clone(),
                    node_id: q.node_id,
                    kind: q.kind,
                    connection: ConnectionState::Connected,
                    replication: ReplicationState::Established,
                    disk: disks[j],
                    role: Role::Secondary,
                    done: None,
                    out_of_sync: 0,
                    resync_transferred: 0,
                })
                .collect();
            let status = VolumeStatus {
                name: name.clone(),
                node: p.node.clone(),
                kind: p.kind,
                role: Role::Secondary,
                disk: disks[i],
                open: false,
                quorum: true,
                peers,
            };
            let mut o = Observed {
                state: NodeState::Online,
                ..Observed::default()
            };
            o.replicas.insert(
                name.clone(),
                ReplicaReport {
                    spec: spec.clone(),
                    status,
                },
            );
            all.insert(p.node.clone(), o);
        }
        all
    }

    const HEALTHY: [DiskState; 3] = [
        DiskState::UpToDate,
        DiskState::UpToDate,
        DiskState::Diskless,
    ];

    #[test]
    fn a_volume_is_up_to_date_only_with_every_replica_and_link() {
        let m = model();
        let o = observed(&m, HEALTHY);
        let s = Snapshot {
            model: &m,
            observed: &o,
        };
        let v = s.volume(&"vm1".parse().unwrap()).unwrap();
        assert_eq!(v.state, VolumeState::UpToDate);
        assert_eq!(
            v.participants[1].replication,
            Some(ReplicationState::Established)
        );
        assert_eq!(s.health().severity, Severity::Ok);
    }

    #[test]
    fn an_offline_node_makes_the_volume_degraded_and_health_an_error() {
        let m = model();
        let mut o = observed(&m, HEALTHY);
        let n2: NodeName = "n2".parse().unwrap();
        o.get_mut(&n2).unwrap().state = NodeState::Offline;
        let s = Snapshot {
            model: &m,
            observed: &o,
        };
        let v = s.volume(&"vm1".parse().unwrap()).unwrap();
        assert_eq!(v.state, VolumeState::Degraded);
        let health = s.health();
        assert_eq!(health.severity, Severity::Error);
        let objects: Vec<&str> = health.findings.iter().map(|f| f.object.as_str()).collect();
        assert_eq!(objects, ["node n2", "volume vm1"]);
        assert!(s.sole_up_to_date(&"vm1".parse().unwrap(), &"n1".parse().unwrap()));
    }

    #[test]
    fn resync_and_split_brain_are_told_apart() {
        let m = model();
        let name: VolumeName = "vm1".parse().unwrap();
        let mut o = observed(
            &m,
            [
                DiskState::UpToDate,
                DiskState::Inconsistent,
                DiskState::Diskless,
            ],
        );
        let n1: NodeName = "n1".parse().unwrap();
        let peer = &mut o
            .get_mut(&n1)
            .unwrap()
            .replicas
            .get_mut(&name)
            .unwrap()
            .status
            .peers[0];
        peer.replication = ReplicationState::SyncSource;
        peer.done = Some(40.0);
        let s = Snapshot {
            model: &m,
            observed: &o,
        };
        let v = s.volume(&name).unwrap();
        assert_eq!(v.state, VolumeState::Syncing);
        assert_eq!(v.participants[1].done, Some(40.0));
        let peer = &mut o
            .get_mut(&n1)
            .unwrap()
            .replicas
            .get_mut(&name)
            .unwrap()
            .status
            .peers[0];
        peer.connection = ConnectionState::StandAlone;
        let s = Snapshot {
            model: &m,
            observed: &o,
        };
        assert_eq!(s.volume(&name).unwrap().state, VolumeState::SplitBrain);
    }
}
