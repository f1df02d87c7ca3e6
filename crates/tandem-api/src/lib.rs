//! The vocabulary shared by `tandemd` and the `tandem` CLI: validated names, ids, byte
//! sizes, states in DRBD's words, and the JSON bodies of the HTTP API.

mod body;
mod ids;
mod names;
mod size;
mod spec;
mod states;

pub use body::{ApiError, CreateVolume, NodeInfo, PoolInfo, UpdateVolume, VolumeInfo};
pub use ids::{ClusterId, NodeId, VolumeId};
pub use names::{NameError, NodeName, PoolName, VolumeName};
pub use size::{ByteSize, SizeError};
pub use spec::{
    OnNoQuorum, Participant, ParticipantKind, PeerStatus, QuorumPolicy, Resolve, VolumeOptions,
    VolumeSpec, VolumeStatus,
};
pub use states::{ConnectionState, DiskState, ReplicationState, Role};
