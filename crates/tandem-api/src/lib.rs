//! The vocabulary shared by `tandemd` and the `tandem` CLI: validated names, byte sizes
//! and the JSON bodies of the HTTP API.

mod body;
mod names;
mod size;

pub use body::{ApiError, CreateVolume, DiskState, NodeInfo, PoolInfo, UpdateVolume, VolumeInfo};
pub use names::{NameError, NodeName, PoolName, VolumeName};
pub use size::{ByteSize, SizeError};
