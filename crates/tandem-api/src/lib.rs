//! The vocabulary shared by `tandemd` and the `tandem` CLI: validated names, ids, byte
//! sizes, states in DRBD's words, and the JSON bodies of the HTTP API.

mod body;
mod cluster;
mod fuzz;
mod ids;
mod names;
mod size;
mod spec;
mod states;

pub use body::{
    ApiError, ChangedExtent, CloneSnapshot, CreatePool, CreateSnapshot, CreateVolume, JoinCluster,
    NODE_API_VERSION, NodeInfo, PoolInfo, RollBack, SnapshotChanges, SnapshotInfo, SnapshotMissing,
    SnapshotTaken, UpdateVolume, VolumeInfo,
};
pub use cluster::{
    BackupInfo, ChangeReplicas, ClusterInfo, ClusterNode, ClusterParticipant, ClusterPool,
    ClusterSnapshot, ClusterVolume, CreateClusterVolume, CreateNode, Finding, Group, Health,
    KV_KEY_MAX, KvCondition, KvEntry, KvValue, NodeState, OnNode, ResizeVolume, Severity,
    VolumeState, check_kv_key, encode_path,
};
pub use fuzz::fuzz_body;
pub use ids::{ClusterId, NodeId, VolumeId};
pub use names::{GroupName, NameError, NodeName, PoolName, SnapshotName, StoreName, VolumeName};
pub use size::{ByteSize, SizeError};
pub use spec::{
    OnNoQuorum, Origin, Participant, ParticipantKind, PeerStatus, QuorumPolicy, ReplicaReport,
    Resolve, VolumeEvent, VolumeOptions, VolumeSpec, VolumeStatus,
};
pub use states::{ConnectionState, DiskState, ReplicationState, Role};
