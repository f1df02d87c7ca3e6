use std::io;
use std::path::PathBuf;

use tandem_api::{PoolName, SnapshotName, VolumeName};

use crate::meta::MetaError;

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("volume {name} does not exist")]
    NotFound { name: VolumeName },
    #[error("volume {name} already exists")]
    Exists { name: VolumeName },
    #[error("{path} already exists and is not a Tandem volume; move it out of the pool directory")]
    FileInTheWay { path: PathBuf },
    #[error("volume {name} is open by {openers} NBD connection(s); disconnect them first")]
    InUse { name: VolumeName, openers: u32 },
    #[error("invalid size {size} bytes: {reason}")]
    InvalidSize { size: u64, reason: String },
    #[error("volume {name} is {size} bytes; volumes only grow, so {requested} bytes is refused")]
    Shrink {
        name: VolumeName,
        size: u64,
        requested: u64,
    },
    #[error("pool {pool} has {free} bytes free but {needed} are needed")]
    NoSpace {
        pool: PoolName,
        needed: u64,
        free: u64,
    },
    #[error("volume {name} cannot be used: {error}")]
    Failed { name: VolumeName, error: String },
    #[error("snapshot {volume}@{snapshot} does not exist")]
    SnapshotNotFound {
        volume: VolumeName,
        snapshot: SnapshotName,
    },
    #[error("snapshot {volume}@{snapshot} already exists")]
    SnapshotExists {
        volume: VolumeName,
        snapshot: SnapshotName,
    },
    #[error(
        "pool {pool} cannot take snapshots: its file system does not share blocks between files (reflink); use xfs or btrfs"
    )]
    NoReflink { pool: PoolName },
    #[error("pool directory {dir} is in use by another tandemd")]
    Locked { dir: PathBuf },
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
}

impl PoolError {
    /// Classifies a failure to create or grow a data file to `size` bytes.
    pub(crate) fn from_file_error(
        e: io::Error,
        pool: &PoolName,
        path: &std::path::Path,
        size: u64,
    ) -> PoolError {
        match e.raw_os_error() {
            Some(libc::ENOSPC | libc::EDQUOT) => PoolError::NoSpace {
                pool: pool.clone(),
                needed: size,
                free: 0,
            },
            Some(libc::EFBIG) => PoolError::InvalidSize {
                size,
                reason: format!("the file system of pool {pool} cannot hold a file this large"),
            },
            _ => PoolError::Io {
                context: format!("sizing {}", path.display()),
                source: e,
            },
        }
    }

    /// A write that failed for want of space as [`PoolError::NoSpace`], naming the pool
    /// (`needed`: what the write asked for).
    pub(crate) fn or_no_space(self, pool: &PoolName, needed: u64) -> PoolError {
        match &self {
            PoolError::Io { source, .. }
                if matches!(source.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)) =>
            {
                PoolError::NoSpace {
                    pool: pool.clone(),
                    needed,
                    free: 0,
                }
            }
            _ => self,
        }
    }

    pub fn io(context: impl Into<String>) -> impl FnOnce(io::Error) -> PoolError {
        let context = context.into();
        move |source| PoolError::Io { context, source }
    }
}
