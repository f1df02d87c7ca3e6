//! JSON bodies of the HTTP API. Sizes are plain byte counts; names are validated on
//! deserialisation, so a handler never sees an unsafe name.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::{ClusterId, DiskState, NodeName, PoolName, SnapshotName, VolumeName};

/// Every error the API returns: what failed, why, and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correction: Option<String>,
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        if let Some(cause) = &self.cause {
            write!(f, ": {cause}")?;
        }
        if let Some(correction) = &self.correction {
            write!(f, "\n  hint: {correction}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct CreateVolume {
    pub name: VolumeName,
    pub size: u64,
    /// The pool to place the replica in; the node's `default` pool when absent.
    #[serde(default)]
    pub pool: Option<PoolName>,
    /// Preallocate the whole data file instead of growing it on first write.
    #[serde(default)]
    pub thick: bool,
}

/// A change to an existing volume; absent fields stay as they are.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct UpdateVolume {
    /// New size in bytes; volumes only grow.
    #[serde(default)]
    pub size: Option<u64>,
    #[serde(default)]
    pub read_only: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeInfo {
    pub name: VolumeName,
    pub pool: PoolName,
    pub size: u64,
    /// Bytes the data file occupies on its file system.
    pub allocated: u64,
    pub thick: bool,
    pub read_only: bool,
    pub disk: DiskState,
    /// NBD connections that have the volume open.
    pub open: u32,
    /// Why the replica is `Failed`, when it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolInfo {
    pub name: PoolName,
    pub kind: String,
    pub path: String,
    pub capacity: u64,
    pub free: u64,
    pub volumes: u32,
    /// Whether the pool's file system shares blocks between files (reflink: xfs,
    /// btrfs): only then does the pool take snapshots, instantly.
    #[serde(default)]
    pub reflink: bool,
}

/// A snapshot as one replica holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct SnapshotInfo {
    pub volume: VolumeName,
    pub name: SnapshotName,
    /// The volume's size when the snapshot was taken.
    pub size: u64,
    /// When it was taken, in seconds since the Unix epoch.
    pub created: u64,
}

/// `POST .../snapshots`: take a snapshot named `name`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSnapshot {
    pub name: SnapshotName,
}

/// `POST /v1/node/volumes/VOL/snapshots/SNAP/rollback`: the controller rolls a node's
/// part of a volume back, every participant to the same new data generation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollBack {
    pub generation: u64,
}

/// `POST .../snapshots/SNAP/clone`: a new volume named `name`, a copy of the snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloneSnapshot {
    pub name: VolumeName,
}

/// What taking a snapshot did: the replicas that hold it, and why the others do not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct SnapshotTaken {
    pub snapshot: SnapshotInfo,
    /// The nodes whose replica took the snapshot.
    pub replicas: Vec<NodeName>,
    /// The nodes holding data that did not, with the reason.
    #[serde(default)]
    pub missing: Vec<SnapshotMissing>,
    /// How long new writes waited for the snapshot, in microseconds.
    pub paused_us: u64,
}

/// The blocks that changed between two snapshots of a volume (`since`, the older,
/// and `snapshot`): every changed byte is in an extent, and an extent may hold some
/// that did not change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct SnapshotChanges {
    pub volume: VolumeName,
    pub snapshot: SnapshotName,
    pub since: SnapshotName,
    /// The node whose replica was compared.
    pub node: NodeName,
    /// Extents are whole multiples of this many bytes.
    pub granularity: u64,
    /// The sum of the extents' lengths.
    pub changed_bytes: u64,
    pub extents: Vec<ChangedExtent>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangedExtent {
    pub offset: u64,
    pub length: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMissing {
    pub node: NodeName,
    pub reason: String,
}

/// What a node says about itself on `GET /v1/node`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct NodeInfo {
    pub name: NodeName,
    /// The `tandemd` release.
    pub version: String,
    /// The node API's version: a controller manages only nodes speaking its own.
    pub api_version: u32,
    /// `host:port` the node's peers connect to (its `--peer-listen`).
    pub peer_address: String,
    /// The Unix socket its NBD server listens on, for clients on the same host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbd_socket: Option<String>,
    /// The cluster the node has joined, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_id: Option<ClusterId>,
    pub pools: Vec<PoolInfo>,
}

/// Version of the node API (`/v1/node/...`) this build speaks.
pub const NODE_API_VERSION: u32 = 1;

/// `POST /v1/node/join`: a controller makes the node part of its cluster. From then on
/// the node answers its API only to requests that carry the cluster secret
/// (`Authorization: Bearer SECRET`), apart from `GET /v1/node`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct JoinCluster {
    pub cluster_id: ClusterId,
    pub secret: String,
}

/// A new storage pool: a directory on the node, created if missing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct CreatePool {
    pub name: PoolName,
    pub path: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_volume_rejects_unknown_fields_and_bad_names() {
        let ok: CreateVolume = serde_json::from_str(r#"{"name":"vm1","size":4096}"#).unwrap();
        assert_eq!(ok.pool, None);
        assert!(!ok.thick);
        assert!(
            serde_json::from_str::<CreateVolume>(r#"{"name":"vm1","size":1,"sise":2}"#).is_err()
        );
        assert!(serde_json::from_str::<CreateVolume>(r#"{"name":"a/b","size":1}"#).is_err());
        assert!(serde_json::from_str::<CreateVolume>(r#"{"name":"a","size":-1}"#).is_err());
    }
}
