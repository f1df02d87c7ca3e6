//! One replica in a pool: its data file, its metadata, and who has it open.

use std::io;
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tandem_api::{DiskState, NodeId, PoolName, SnapshotInfo, SnapshotName, VolumeInfo, VolumeName};

use crate::data::DataFile;
use crate::error::PoolError;
use crate::meta::{GenerationId, MetaFile, PeerSlot, Superblock};
use crate::snapshot::Snapshots;
use crate::{BLOCK_SIZE, MAX_VOLUME_SIZE};

#[derive(Default)]
struct Openers {
    readers: u32,
    writers: u32,
}

pub struct Volume {
    name: VolumeName,
    pool: PoolName,
    data: DataFile,
    meta: Mutex<MetaFile>,
    // Copies of superblock fields the I/O path reads on every request, without the lock.
    size: AtomicU64,
    read_only: AtomicBool,
    thick: bool,
    openers: Mutex<Openers>,
    snapshots: Snapshots,
}

fn unsupported(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EOPNOTSUPP)
}

/// Checks a requested volume size against what a pool can hold.
pub(crate) fn check_size(size: u64) -> Result<(), PoolError> {
    let reason = if size == 0 {
        "a volume needs at least one block"
    } else if size % BLOCK_SIZE != 0 {
        "sizes are whole multiples of 4 KiB"
    } else if size > MAX_VOLUME_SIZE {
        "volumes are at most 64 TiB"
    } else {
        return Ok(());
    };
    Err(PoolError::InvalidSize {
        size,
        reason: reason.into(),
    })
}

impl Volume {
    pub(crate) fn new(
        pool: PoolName,
        meta: MetaFile,
        data: DataFile,
        snapshots: Snapshots,
    ) -> Volume {
        let sb = meta.superblock();
        Volume {
            name: sb.name.clone(),
            pool,
            size: AtomicU64::new(sb.size),
            read_only: AtomicBool::new(sb.read_only),
            thick: sb.thick,
            data,
            meta: Mutex::new(meta),
            openers: Mutex::default(),
            snapshots,
        }
    }

    pub fn name(&self) -> &VolumeName {
        &self.name
    }

    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    pub fn read_only(&self) -> bool {
        self.read_only.load(Ordering::Acquire)
    }

    pub fn thick(&self) -> bool {
        self.thick
    }

    pub fn data(&self) -> &DataFile {
        &self.data
    }

    /// Deallocates a range (a hint: file systems that cannot leave the data). A thick
    /// volume keeps its blocks reserved: the range is zeroed in place instead.
    pub fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        self.snapshots.before_write(&self.data, offset, len);
        let result = if self.thick {
            self.data.zero_range(offset, len)
        } else {
            self.data.punch_hole(offset, len)
        };
        match result {
            Err(e) if unsupported(&e) => Ok(()),
            other => other,
        }?;
        self.sync_if(fua)
    }

    /// Zeroes a range: by punching a hole when `may_punch` and the volume is thin, else
    /// in place. When the file system has no fast way, zeros are written, unless
    /// `fast_only` asks for `EOPNOTSUPP` instead.
    pub fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_punch: bool,
        fast_only: bool,
        fua: bool,
    ) -> io::Result<()> {
        self.snapshots.before_write(&self.data, offset, len);
        let fast = if may_punch && !self.thick {
            self.data.punch_hole(offset, len)
        } else {
            self.data.zero_range(offset, len)
        };
        match fast {
            Err(e) if unsupported(&e) && !fast_only => self.data.write_zeros(offset, len),
            other => other,
        }?;
        self.sync_if(fua)
    }

    fn sync_if(&self, fua: bool) -> io::Result<()> {
        if fua { self.data.flush() } else { Ok(()) }
    }

    pub fn disk_state(&self) -> DiskState {
        self.meta.lock().unwrap().superblock().disk_state
    }

    /// The current data generation (read without copying the superblock: the
    /// replication write path asks on every write).
    pub fn generation(&self) -> GenerationId {
        self.meta.lock().unwrap().superblock().generations.current
    }

    /// The generation recorded when this replica started tracking changes for `peer`
    /// (0 when it tracks none).
    pub fn bitmap_generation(&self, peer: NodeId) -> GenerationId {
        let meta = self.meta.lock().unwrap();
        meta.superblock()
            .peers
            .iter()
            .find(|p| p.node == peer)
            .map_or(GenerationId(0), |p| p.bitmap_generation)
    }

    /// A copy of the replica's superblock.
    pub fn superblock(&self) -> Superblock {
        self.meta.lock().unwrap().superblock().clone()
    }

    /// The bitmap slot that tracks changes for `peer`, taken on first use.
    pub fn bitmap_slot(&self, peer: NodeId) -> Result<usize, PoolError> {
        let mut meta = self.meta.lock().unwrap();
        if let Some(i) = meta.superblock().peers.iter().position(|p| p.node == peer) {
            return Ok(i);
        }
        let slots = meta.superblock().layout.bitmap_slots as usize;
        let slot = meta.superblock().peers.len();
        if slot >= slots {
            return Err(PoolError::Failed {
                name: self.name.clone(),
                error: format!("all {slots} bitmap slots are taken"),
            });
        }
        meta.update(|sb| {
            sb.peers.push(PeerSlot {
                node: peer,
                bitmap_generation: GenerationId(0),
            })
        })?;
        Ok(slot)
    }

    pub fn read_bitmap(&self, slot: usize) -> Result<Vec<u64>, PoolError> {
        Ok(self.meta.lock().unwrap().read_bitmap(slot)?)
    }

    pub fn write_bitmap_page(
        &self,
        slot: usize,
        page: u64,
        words: &[u64],
    ) -> Result<(), PoolError> {
        Ok(self
            .meta
            .lock()
            .unwrap()
            .write_bitmap_page(slot, page, words)?)
    }

    pub fn read_activity_log(&self) -> Result<Vec<Vec<u8>>, PoolError> {
        Ok(self.meta.lock().unwrap().read_activity_log()?)
    }

    pub fn write_activity_log(&self, index: u32, block: &[u8]) -> Result<(), PoolError> {
        Ok(self.meta.lock().unwrap().write_activity_log(index, block)?)
    }

    /// Makes bitmap pages written so far durable.
    pub fn sync_meta(&self) -> Result<(), PoolError> {
        Ok(self.meta.lock().unwrap().sync()?)
    }

    /// Changes the superblock durably (generation identifiers, disk state, peers).
    pub fn update_superblock(&self, change: impl FnOnce(&mut Superblock)) -> Result<(), PoolError> {
        Ok(self.meta.lock().unwrap().update(change)?)
    }

    pub fn snapshots(&self) -> Vec<SnapshotInfo> {
        self.snapshots.list()
    }

    /// Snapshot `snap`, if this replica holds it.
    pub fn snapshot(&self, snap: &SnapshotName) -> Option<SnapshotInfo> {
        self.snapshots.get(snap).map(|r| r.info)
    }

    /// Starts snapshot `snap` of the data as it is now: the caller has drained the writes
    /// that must be in it and holds back those that must not until this returns, which
    /// is at once. Until [`Volume::fill_snapshot`] completes it, a write first shares
    /// the old content of the blocks it changes into the snapshot.
    pub fn begin_snapshot(&self, snap: &SnapshotName) -> Result<(), PoolError> {
        let generation = self.generation().0;
        self.snapshots.begin(snap, self.size(), generation)
    }

    /// Completes the snapshot begun: shares the blocks no write has shared yet, makes it
    /// durable and records it. Takes as long as the data file's block map is large.
    pub fn fill_snapshot(&self) -> Result<SnapshotInfo, PoolError> {
        self.snapshots.fill(&self.data)
    }

    /// Writes `data` at `offset` (see [`DataFile::write_at`]), first keeping what it
    /// overwrites for a snapshot being filled.
    pub fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        self.snapshots
            .before_write(&self.data, offset, data.len() as u64);
        self.data.write_at(data, offset, fua)
    }

    pub fn delete_snapshot(&self, snap: &SnapshotName) -> Result<(), PoolError> {
        self.snapshots.delete(snap)
    }

    /// The data file of snapshot `snap`, for reading.
    pub fn open_snapshot(&self, snap: &SnapshotName) -> Result<DataFile, PoolError> {
        self.snapshots.open(snap)
    }

    /// Puts the data back as it was at snapshot `snap`; refused while the volume is open.
    /// Blocks past the snapshot's size (the volume grew since) read as zeros.
    pub fn roll_back(&self, snap: &SnapshotName) -> Result<(), PoolError> {
        let openers = self.openers.lock().unwrap();
        if openers.readers + openers.writers > 0 {
            return Err(PoolError::InUse {
                name: self.name.clone(),
                openers: openers.readers + openers.writers,
            });
        }
        let source = self.snapshots.open(snap)?;
        let size = self.snapshots.get(snap).map_or(0, |r| r.info.size);
        let path = self.data.path().to_owned();
        // A snapshot still being filled keeps the data it was begun with.
        self.snapshots.before_write(&self.data, 0, self.size());
        self.data
            .share_range(&source, 0, size)
            .and_then(|()| match self.size() {
                end if end > size => self.data.punch_hole(size, end - size),
                _ => Ok(()),
            })
            .and_then(|()| self.data.flush())
            .map_err(PoolError::io(format!(
                "rolling {} back to snapshot {snap}",
                path.display()
            )))?;
        tracing::info!(volume = %self.name, snapshot = %snap, "volume rolled back");
        Ok(())
    }

    pub fn openers(&self) -> u32 {
        let o = self.openers.lock().unwrap();
        o.readers + o.writers
    }

    pub fn info(&self) -> VolumeInfo {
        // Lock order is openers, then meta (as in open and close).
        let open = self.openers();
        let meta = self.meta.lock().unwrap();
        let sb = meta.superblock();
        VolumeInfo {
            name: self.name.clone(),
            pool: self.pool.clone(),
            size: sb.size,
            allocated: self.data.allocated().unwrap_or(0),
            thick: sb.thick,
            read_only: sb.read_only,
            disk: sb.disk_state,
            open,
            error: None,
        }
    }

    /// Opens the volume for I/O. While writers have it open the metadata says "not
    /// clean", so a crash is noticed at the next start.
    pub fn open(self: &Arc<Self>, writable: bool) -> Result<VolumeHandle, PoolError> {
        let mut o = self.openers.lock().unwrap();
        if writable && o.writers == 0 {
            self.meta.lock().unwrap().update(|sb| sb.clean = false)?;
        }
        if writable {
            o.writers += 1;
        } else {
            o.readers += 1;
        }
        Ok(VolumeHandle {
            volume: self.clone(),
            writable,
        })
    }

    fn close(&self, writable: bool) {
        let mut o = self.openers.lock().unwrap();
        if !writable {
            o.readers -= 1;
            return;
        }
        o.writers -= 1;
        if o.writers > 0 {
            return;
        }
        let result = self
            .data
            .flush()
            .map_err(PoolError::io("flushing the data file"))
            .and_then(|()| Ok(self.meta.lock().unwrap().update(|sb| sb.clean = true)?));
        match result {
            Ok(()) => tracing::debug!(volume = %self.name, "last writer closed; metadata clean"),
            Err(e) => tracing::error!(volume = %self.name, error = %e,
                "could not mark the volume clean after its last writer closed"),
        }
    }

    /// Applies a change of size (grow only) and/or access mode, all or nothing. The
    /// data file grows first, then one metadata update records everything, so a crash
    /// in between leaves the old size in force over a longer file.
    pub fn update(
        &self,
        size: Option<u64>,
        read_only: Option<bool>,
        free: impl FnOnce() -> Result<u64, PoolError>,
    ) -> Result<(), PoolError> {
        let openers = self.openers.lock().unwrap();
        if read_only == Some(true) && openers.writers > 0 {
            // Writers were promised a writable export.
            return Err(PoolError::InUse {
                name: self.name.clone(),
                openers: openers.writers,
            });
        }
        let mut meta = self.meta.lock().unwrap();
        let current = meta.superblock().size;
        let size = size.unwrap_or(current);
        check_size(size)?;
        if size < current {
            return Err(PoolError::Shrink {
                name: self.name.clone(),
                size: current,
                requested: size,
            });
        }
        if size > current {
            if self.thick {
                let free = free()?;
                if free < size - current {
                    return Err(PoolError::NoSpace {
                        pool: self.pool.clone(),
                        needed: size - current,
                        free,
                    });
                }
            }
            self.data
                .grow(size, self.thick)
                .map_err(|e| PoolError::from_file_error(e, &self.pool, self.data.path(), size))?;
        }
        let read_only = read_only.unwrap_or(meta.superblock().read_only);
        meta.update(|sb| {
            sb.size = size;
            sb.read_only = read_only;
        })?;
        self.size.store(size, Ordering::Release);
        self.read_only.store(read_only, Ordering::Release);
        tracing::info!(volume = %self.name, from = current, to = size, read_only, "volume updated");
        Ok(())
    }
}

/// An open volume; dropping it closes it.
pub struct VolumeHandle {
    volume: Arc<Volume>,
    writable: bool,
}

impl VolumeHandle {
    pub fn writable(&self) -> bool {
        self.writable
    }
}

impl Deref for VolumeHandle {
    type Target = Volume;
    fn deref(&self) -> &Volume {
        &self.volume
    }
}

impl Drop for VolumeHandle {
    fn drop(&mut self) {
        self.volume.close(self.writable);
    }
}
