//! JSON bodies of the cluster API the controller serves under `/v1/`.

use serde::{Deserialize, Serialize};

use crate::{
    ClusterId, DiskState, GroupName, NodeId, NodeName, OnNoQuorum, ParticipantKind, PoolName,
    QuorumPolicy, ReplicationState, Role, SnapshotName, StoreName, VolumeId, VolumeName,
};

crate::states::words!(
    /// A node as the controller sees it.
    NodeState { Online, Offline, Connecting, VersionMismatch }
);
crate::states::words!(
    /// A volume's condition across its replicas, worst first when summarised.
    VolumeState { Failed, SplitBrain, NoQuorum, Degraded, Syncing, Creating, UpToDate }
);
crate::states::words!(
    /// How bad a health finding is.
    Severity { Ok, Warning, Error }
);

/// `GET /v1/cluster`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ClusterInfo {
    pub cluster_id: ClusterId,
    /// The node running the controller.
    pub controller: NodeName,
    pub version: String,
    /// The controller epoch: raised by each controller that starts; nodes refuse calls
    /// from an older one.
    pub epoch: u64,
    /// The newest backup of the controller's database in its data directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_backup: Option<BackupInfo>,
    /// The nodes that may run the controller (started with `tandemd --controller`).
    #[serde(default)]
    pub candidates: Vec<NodeName>,
    /// The system volume that holds the controller's database, replicated across the
    /// candidates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<ClusterVolume>,
}

/// A backup of the controller's database, checked when it was made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BackupInfo {
    /// Its file, on the controller's node.
    pub file: String,
    /// Milliseconds since the Unix epoch.
    pub created_ms: u64,
    pub bytes: u64,
    /// Volumes it records.
    pub volumes: usize,
}

/// `POST /v1/nodes`: manage the `tandemd` whose API answers at `address`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct CreateNode {
    pub name: NodeName,
    /// The node's API address, `host:port`.
    pub address: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ClusterNode {
    pub name: NodeName,
    pub address: String,
    pub state: NodeState,
    /// The node's `tandemd` release, once it has answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Why the node is not Online, or what its last reconciliation failed on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Replicas and diskless participants the node has.
    pub participants: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ClusterPool {
    pub node: NodeName,
    pub name: PoolName,
    pub kind: String,
    pub path: String,
    /// Last reported by the node; absent until it has answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free: Option<u64>,
    /// Replicas placed in the pool.
    pub replicas: u32,
    /// Sum of the sizes of those replicas.
    pub provisioned: u64,
    /// Whether the pool takes snapshots (its file system shares blocks: reflink), as
    /// last reported; absent until the node has answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshots: Option<bool>,
}

/// Placement rules for the volumes created in a group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Group {
    pub name: GroupName,
    /// Diskful replicas per volume, 1..=31.
    #[serde(default = "default_replicas")]
    pub replicas: u8,
    /// The pool replicas go in, on every node.
    #[serde(default = "default_pool")]
    pub pool: PoolName,
    /// Only these nodes hold replicas; any node when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<NodeName>,
    #[serde(default)]
    pub quorum: QuorumPolicy,
    #[serde(default)]
    pub on_no_quorum: OnNoQuorum,
}

fn default_replicas() -> u8 {
    2
}

fn default_pool() -> PoolName {
    "default".parse().expect("valid name")
}

/// `POST /v1/volumes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct CreateClusterVolume {
    pub name: VolumeName,
    pub size: u64,
    /// The group's replica count when absent.
    #[serde(default)]
    pub replicas: Option<u8>,
    /// The group `default` when absent.
    #[serde(default)]
    pub group: Option<GroupName>,
}

/// `PATCH /v1/volumes/NAME`: grow a volume on every replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ResizeVolume {
    pub size: u64,
}

/// `POST /v1/volumes/NAME/attach` and `.../detach`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct OnNode {
    pub node: NodeName,
}

/// `POST /v1/volumes/NAME/replicas`: exactly one of `add` and `remove`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ChangeReplicas {
    #[serde(default)]
    pub add: Option<NodeName>,
    #[serde(default)]
    pub remove: Option<NodeName>,
}

/// One participant of a volume: as placed, and as its node last reported it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ClusterParticipant {
    pub node: NodeName,
    pub node_id: NodeId,
    pub kind: ParticipantKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<PoolName>,
    /// The volume is attached (exported over NBD) on this node.
    pub attached: bool,
    /// Absent until the node has reported the volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<DiskState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    /// The worst replication state towards this node seen by the other participants.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication: Option<ReplicationState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub done: Option<f64>,
    pub open: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quorum: Option<bool>,
    /// Why the node has not (yet) applied its part.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ClusterVolume {
    pub name: VolumeName,
    pub id: VolumeId,
    pub size: u64,
    pub group: GroupName,
    pub replicas: u8,
    pub state: VolumeState,
    pub participants: Vec<ClusterParticipant>,
}

/// A snapshot as the controller records it: where it exists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ClusterSnapshot {
    pub volume: VolumeName,
    pub name: SnapshotName,
    /// Seconds since the Unix epoch.
    pub created: u64,
    /// The volume's size when it was taken.
    pub size: u64,
    /// The nodes whose replica holds it.
    pub replicas: Vec<NodeName>,
}

/// `PUT /v1/kv/STORE/KEY`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct KvValue {
    pub value: String,
    /// Set the key only if it is in this state now (409 Conflict otherwise): what tools
    /// sharing a store build locks and journals on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub only_if: Option<KvCondition>,
}

/// What a conditional change of a key expects to find.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub enum KvCondition {
    /// The key does not exist.
    Absent,
    /// The key holds exactly this value.
    Value(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct KvEntry {
    pub store: StoreName,
    pub key: String,
    pub value: String,
}

/// Longest key of a key-value store.
pub const KV_KEY_MAX: usize = 1024;

/// Keys are namespaced paths (`sr/vdi/NAME`): printable, no spaces, no empty segment.
pub fn check_kv_key(key: &str) -> Result<(), String> {
    if key.is_empty() || key.len() > KV_KEY_MAX {
        return Err(format!("a key has 1 to {KV_KEY_MAX} bytes"));
    }
    if key.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(format!(
            "key {key:?} contains a space or a control character"
        ));
    }
    if key.split('/').any(str::is_empty) {
        return Err(format!("key {key:?} has an empty segment"));
    }
    Ok(())
}

/// Percent-encodes a path of segments (a key-value key) for a URL; `/` stays a separator.
pub fn encode_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for b in path.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// One thing `tandem health` found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Finding {
    pub severity: Severity,
    /// `node n1`, `pool n1/default`, `volume vm1`.
    pub object: String,
    pub message: String,
    pub correction: String,
}

/// `GET /v1/health`: the worst severity and every finding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Health {
    pub severity: Severity,
    pub findings: Vec<Finding>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_percent_encoded_but_keep_their_segments() {
        assert_eq!(encode_path("sr/vdi/vm-1.x_y~"), "sr/vdi/vm-1.x_y~");
        assert_eq!(encode_path("a?b#c%d"), "a%3Fb%23c%25d");
        assert_eq!(encode_path("sr/é"), "sr/%C3%A9");
    }

    #[test]
    fn kv_keys_are_namespaced_paths() {
        assert!(check_kv_key("sr/vdi/vm1").is_ok());
        for bad in ["", "a//b", "/a", "a b", "a\nb", &"k".repeat(KV_KEY_MAX + 1)] {
            assert!(check_kv_key(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn group_defaults_fill_absent_fields() {
        let g: Group = serde_json::from_str(r#"{"name":"fast"}"#).unwrap();
        assert_eq!((g.replicas, g.pool.as_str()), (2, "default"));
        assert!(serde_json::from_str::<Group>(r#"{"name":"g","replica":3}"#).is_err());
    }
}
