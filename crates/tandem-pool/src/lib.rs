//! The `file` storage pool: a directory of volumes, each a sparse raw data file (byte `i`
//! of the volume at offset `i`, usable without Tandem) and a crash-safe metadata file.
//!
//! ```text
//! <pool dir>/<volume>.raw    the data, a plain raw image
//! <pool dir>/<volume>.meta   superblock (two checksummed slots), activity log, bitmaps
//! <pool dir>/<volume>@<snapshot>.raw, .snap    a snapshot: its data and its record
//! ```

mod blockmap;
mod buffer;
mod changes;
mod data;
mod error;
pub mod meta;
mod pool;
mod snapshot;
mod volume;

pub use buffer::Buffer;
pub use changes::Span;
pub use data::{CacheMode, DataFile, Extent, shares_blocks};
pub use error::PoolError;
pub use meta::{GenerationId, Generations, HISTORY, MetaError, NewVolume, Superblock};
pub use pool::{Entry, Pool, PoolStats};
pub use volume::{Volume, VolumeHandle};

/// Granularity of bitmaps and the unit volume sizes are multiples of.
pub const BLOCK_SIZE: u64 = 4096;

/// Largest volume a pool accepts; also bounds the metadata file's bitmap area.
pub const MAX_VOLUME_SIZE: u64 = 64 << 40;
