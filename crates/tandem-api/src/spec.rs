//! A replicated volume as a node is told about it (the spec), and as the node reports
//! it back (the status).

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::{
    ClusterId, ConnectionState, DiskState, NodeId, NodeName, PoolName, ReplicationState, Role,
    SnapshotName, VolumeId, VolumeName,
};

/// What a participant contributes to a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ParticipantKind {
    /// Holds a replica of the data.
    Diskful,
    /// Holds no data; reads and writes over the network.
    Diskless,
    /// Holds no data and votes for quorum.
    Tiebreaker,
}

impl ParticipantKind {
    pub fn diskful(self) -> bool {
        self == ParticipantKind::Diskful
    }

    /// Counts towards quorum.
    pub fn votes(self) -> bool {
        self != ParticipantKind::Diskless
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Participant {
    pub node_id: NodeId,
    pub node: NodeName,
    /// `host:port` of the node's peer listener.
    pub address: String,
    pub kind: ParticipantKind,
    /// The pool holding a diskful participant's replica; the node's first pool when
    /// absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<PoolName>,
    /// A diskful participant added to a volume that may already hold data: its new
    /// replica starts Inconsistent and takes a full resync. Replicas created with the
    /// volume start in sync (they all hold zeros).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fresh: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum QuorumPolicy {
    /// Writes need a majority of the voting participants.
    #[default]
    Majority,
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnNoQuorum {
    /// Fail I/O with an error.
    #[default]
    IoError,
    /// Hold I/O until quorum returns.
    SuspendIo,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct VolumeOptions {
    #[serde(default)]
    pub quorum: QuorumPolicy,
    #[serde(default)]
    pub on_no_quorum: OnNoQuorum,
    #[serde(default)]
    pub allow_two_primaries: bool,
    /// Resync bandwidth limit in bytes per second; unlimited when absent.
    #[serde(default)]
    pub resync_rate: Option<u64>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A volume's full participant list and options, as the controller (or an operator)
/// gives it to each participating node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct VolumeSpec {
    pub cluster_id: ClusterId,
    pub volume_id: VolumeId,
    pub name: VolumeName,
    /// Raised by the controller with every change of the volume: a node refuses a
    /// spec older than the one it holds (one delayed on the way, or sent by a
    /// controller that was replaced).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub revision: u64,
    pub size: u64,
    pub participants: Vec<Participant>,
    #[serde(default)]
    pub options: VolumeOptions,
    /// The snapshot the volume was cloned from: a replica created on a node holding it
    /// starts as a copy of it sharing its blocks (reflink); one created elsewhere starts
    /// Inconsistent and takes a full resync.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<Origin>,
}

/// A snapshot of another volume, as the origin of a clone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Origin {
    pub volume: VolumeName,
    pub snapshot: SnapshotName,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.volume, self.snapshot)
    }
}

impl VolumeSpec {
    /// Checks the spec on its own and from the point of view of node `me`.
    pub fn validate(&self, me: &NodeName) -> Result<(), String> {
        let n = self.participants.len();
        if !(1..=32).contains(&n) {
            return Err(format!("a volume has 1 to 32 participants, not {n}"));
        }
        let ids: BTreeSet<_> = self.participants.iter().map(|p| p.node_id).collect();
        let names: BTreeSet<_> = self.participants.iter().map(|p| &p.node).collect();
        if ids.len() != n || names.len() != n {
            return Err("participants' node ids and node names must be unique".into());
        }
        if !self.participants.iter().any(|p| p.kind.diskful()) {
            return Err("a volume needs at least one diskful participant".into());
        }
        if let Some(p) = self
            .participants
            .iter()
            .find(|p| p.address.parse::<std::net::SocketAddr>().is_err())
        {
            return Err(format!(
                "participant {} has address {:?}, not host:port",
                p.node, p.address
            ));
        }
        if self.me(me).is_none() {
            return Err(format!(
                "node {me} is not a participant of volume {}",
                self.name
            ));
        }
        Ok(())
    }

    pub fn me(&self, me: &NodeName) -> Option<&Participant> {
        self.participants.iter().find(|p| &p.node == me)
    }

    pub fn participant(&self, id: NodeId) -> Option<&Participant> {
        self.participants.iter().find(|p| p.node_id == id)
    }
}

/// Ends a split brain: the named node's replica is discarded and resynced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Resolve {
    pub discard: NodeName,
}

/// One peer as a node sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct PeerStatus {
    pub node: NodeName,
    pub node_id: NodeId,
    pub kind: ParticipantKind,
    pub connection: ConnectionState,
    pub replication: ReplicationState,
    pub disk: DiskState,
    pub role: Role,
    /// Resync progress in percent, while syncing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub done: Option<f64>,
    /// Bytes marked out of sync towards this peer.
    pub out_of_sync: u64,
    /// Bytes resync has sent or received with this peer.
    pub resync_transferred: u64,
}

/// A volume as one node sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct VolumeStatus {
    pub name: VolumeName,
    pub node: NodeName,
    pub kind: ParticipantKind,
    pub role: Role,
    pub disk: DiskState,
    pub open: bool,
    pub quorum: bool,
    pub peers: Vec<PeerStatus>,
}

/// One event of a node's stream (`GET /v1/node/events`): a replicated volume's status
/// after a change, or none once the volume is gone from the node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct VolumeEvent {
    pub volume: VolumeName,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<VolumeStatus>,
}

/// A replicated volume on one node: what it was told and what it sees
/// (`GET /v1/node/replicated`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ReplicaReport {
    pub spec: VolumeSpec,
    pub status: VolumeStatus,
}

impl fmt::Display for VolumeStatus {
    /// The `drbdadm status` form.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let primary = if self.role == Role::Primary {
            Some(&self.node)
        } else {
            self.peers
                .iter()
                .find(|p| p.role == Role::Primary)
                .map(|p| &p.node)
        };
        write!(f, "{} role:{}", self.name, self.role)?;
        if let Some(p) = primary {
            write!(f, " on:{p}")?;
        }
        if !self.quorum {
            write!(f, " quorum:no")?;
        }
        writeln!(f)?;
        writeln!(
            f,
            "  {} disk:{} open:{}",
            self.node,
            self.disk,
            if self.open { "yes" } else { "no" }
        )?;
        for p in &self.peers {
            write!(f, "  {}", p.node)?;
            if p.connection != ConnectionState::Connected {
                write!(f, " connection:{}", p.connection)?;
            }
            write!(f, " disk:{}", p.disk)?;
            match p.kind {
                ParticipantKind::Tiebreaker => write!(f, " tiebreaker:yes")?,
                _ if p.connection == ConnectionState::Connected && p.kind.diskful() => {
                    write!(f, " replication:{}", p.replication)?
                }
                _ => {}
            }
            if let Some(done) = p.done {
                write!(f, " done:{done:.2}")?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> VolumeSpec {
        serde_json::from_str(
            r#"{"cluster-id":"00112233445566778899aabbccddeeff","volume-id":"ffeeddccbbaa99887766554433221100",
                "name":"vm1","size":1048576,
                "participants":[
                  {"node-id":0,"node":"n1","address":"127.0.0.1:7700","kind":"diskful"},
                  {"node-id":1,"node":"n2","address":"127.0.0.1:7701","kind":"diskful"},
                  {"node-id":2,"node":"n3","address":"127.0.0.1:7702","kind":"tiebreaker"}]}"#,
        )
        .unwrap()
    }

    #[test]
    fn spec_is_checked_from_the_nodes_point_of_view() {
        let s = spec();
        assert!(s.validate(&"n2".parse().unwrap()).is_ok());
        assert!(
            s.validate(&"n9".parse().unwrap())
                .unwrap_err()
                .contains("not a participant")
        );
        let mut dup = spec();
        dup.participants[1].node_id = NodeId::new(0).unwrap();
        assert!(dup.validate(&"n1".parse().unwrap()).is_err());
        let mut diskless = spec();
        diskless
            .participants
            .iter_mut()
            .for_each(|p| p.kind = ParticipantKind::Diskless);
        assert!(diskless.validate(&"n1".parse().unwrap()).is_err());
    }

    #[test]
    fn status_reads_like_drbdadm() {
        let peer = |node: &str, id, kind, disk, replication, done| PeerStatus {
            node: node.parse().unwrap(),
            node_id: NodeId::new(id).unwrap(),
            kind,
            connection: ConnectionState::Connected,
            replication,
            disk,
            role: Role::Secondary,
            done,
            out_of_sync: 0,
            resync_transferred: 0,
        };
        let status = VolumeStatus {
            name: "vm1".parse().unwrap(),
            node: "n1".parse().unwrap(),
            kind: ParticipantKind::Diskful,
            role: Role::Primary,
            disk: DiskState::UpToDate,
            open: true,
            quorum: true,
            peers: vec![
                peer(
                    "n2",
                    1,
                    ParticipantKind::Diskful,
                    DiskState::UpToDate,
                    ReplicationState::Established,
                    None,
                ),
                peer(
                    "n3",
                    2,
                    ParticipantKind::Diskful,
                    DiskState::Inconsistent,
                    ReplicationState::SyncTarget,
                    Some(42.17),
                ),
                peer(
                    "n4",
                    3,
                    ParticipantKind::Tiebreaker,
                    DiskState::Diskless,
                    ReplicationState::Off,
                    None,
                ),
            ],
        };
        assert_eq!(
            status.to_string(),
            "vm1 role:Primary on:n1\n  n1 disk:UpToDate open:yes\n  n2 disk:UpToDate replication:Established\n  \
             n3 disk:Inconsistent replication:SyncTarget done:42.17\n  n4 disk:Diskless tiebreaker:yes\n"
        );
    }
}
