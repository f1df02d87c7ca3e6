//! One replica in a pool: its data file, its metadata, and who has it open.

use std::ops::Deref;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tandem_api::{PoolName, VolumeInfo, VolumeName};

use crate::data::DataFile;
use crate::error::PoolError;
use crate::meta::MetaFile;
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
    pub(crate) fn new(pool: PoolName, meta: MetaFile, data: DataFile) -> Volume {
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
