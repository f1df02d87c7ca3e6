//! A replica's snapshots in a `file` pool: each is a file sharing its blocks with the
//! volume's data file (reflink), so taking one is instant and costs no space until
//! either side is written.
//!
//! ```text
//! <pool dir>/<volume>@<snapshot>.raw    the data as it was, a plain raw image
//! <pool dir>/<volume>@<snapshot>.snap   what the snapshot is (JSON); the snapshot
//!                                       exists exactly when this file does
//! ```
//!
//! Taking one writes `<volume>@<snapshot>.snap.creating` first, then shares the data
//! file into the `.raw`, then renames the record into place; deleting renames the
//! record to `.snap.deleting` first. Either marker found when the pool opens is an
//! interrupted step: a creation is undone, a deletion finished. `@` is in no volume or
//! snapshot name, so these files never collide with a volume's.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tandem_api::{PoolName, SnapshotInfo, SnapshotName, VolumeId, VolumeName};

use crate::data::{CacheMode, DataFile};
use crate::error::PoolError;
use crate::pool::{remove_if_present, sync_dir};

const DATA_EXT: &str = "raw";
const RECORD_EXT: &str = "snap";
const CREATING_EXT: &str = "snap.creating";
const DELETING_EXT: &str = "snap.deleting";

/// What a snapshot's record file holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) struct Record {
    #[serde(flatten)]
    pub info: SnapshotInfo,
    /// The volume the snapshot belongs to, so a record left by a deleted volume of the
    /// same name is never taken for one of the new volume's.
    pub volume_id: VolumeId,
    /// The replica's data generation when it was taken.
    pub generation: u64,
}

/// The snapshots of one replica.
pub(crate) struct Snapshots {
    dir: PathBuf,
    pool: PoolName,
    volume: VolumeName,
    volume_id: VolumeId,
    cache: CacheMode,
    reflink: bool,
    records: Mutex<BTreeMap<SnapshotName, Record>>,
}

fn file_of(dir: &Path, volume: &VolumeName, snap: &SnapshotName, ext: &str) -> PathBuf {
    dir.join(format!("{volume}@{snap}.{ext}"))
}

/// Every `(snapshot, extension)` of `volume`'s snapshot files in `dir`.
fn files_of(
    dir: &Path,
    volume: &VolumeName,
) -> Result<Vec<(SnapshotName, &'static str)>, PoolError> {
    let prefix = format!("{volume}@");
    let mut found = Vec::new();
    let listing =
        std::fs::read_dir(dir).map_err(PoolError::io(format!("listing {}", dir.display())))?;
    for item in listing {
        let item = item.map_err(PoolError::io(format!("listing {}", dir.display())))?;
        let name = item.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(&prefix)) else {
            continue;
        };
        for ext in [CREATING_EXT, DELETING_EXT, RECORD_EXT, DATA_EXT] {
            if let Some(snap) = rest.strip_suffix(ext).and_then(|s| s.strip_suffix('.'))
                && let Ok(snap) = snap.parse::<SnapshotName>()
            {
                found.push((snap, ext));
                break;
            }
        }
    }
    Ok(found)
}

/// Removes every snapshot file of `volume` (the volume is being deleted).
pub(crate) fn remove_all(dir: &Path, volume: &VolumeName) -> Result<(), PoolError> {
    for (snap, ext) in files_of(dir, volume)? {
        remove_if_present(&file_of(dir, volume, &snap, ext))?;
    }
    Ok(())
}

fn write_record(path: &Path, record: &Record) -> Result<(), PoolError> {
    let text = serde_json::to_vec_pretty(record).expect("a record serialises");
    let write = || -> std::io::Result<()> {
        let mut f = File::options().write(true).create_new(true).open(path)?;
        f.write_all(&text)?;
        f.sync_all()
    };
    write().map_err(PoolError::io(format!("writing {}", path.display())))
}

impl Snapshots {
    /// The snapshots of a volume found in `dir`, finishing interrupted steps first.
    pub fn load(
        dir: &Path,
        pool: &PoolName,
        volume: &VolumeName,
        volume_id: VolumeId,
        cache: CacheMode,
        reflink: bool,
    ) -> Result<Snapshots, PoolError> {
        let files = files_of(dir, volume)?;
        let mut records = BTreeMap::new();
        for (snap, ext) in &files {
            let path = |ext| file_of(dir, volume, snap, ext);
            match *ext {
                CREATING_EXT | DELETING_EXT => {
                    tracing::info!(pool = %pool, volume = %volume, snapshot = %snap, step = ext,
                        "finishing an interrupted snapshot step");
                    remove_if_present(&path(DATA_EXT))?;
                    remove_if_present(&path(ext))?;
                }
                RECORD_EXT => {
                    let bytes = std::fs::read(path(RECORD_EXT)).map_err(PoolError::io(format!(
                        "reading {}",
                        path(RECORD_EXT).display()
                    )))?;
                    match serde_json::from_slice::<Record>(&bytes) {
                        Ok(r)
                            if r.volume_id == volume_id
                                && &r.info.name == snap
                                && path(DATA_EXT).exists() =>
                        {
                            records.insert(snap.clone(), r);
                        }
                        Ok(_) => tracing::warn!(pool = %pool, volume = %volume, snapshot = %snap,
                            "snapshot record of another volume or without its data file; leaving it alone"),
                        Err(e) => {
                            tracing::error!(pool = %pool, volume = %volume, snapshot = %snap, error = %e,
                            "snapshot record is unreadable; leaving it alone")
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(Snapshots {
            dir: dir.to_owned(),
            pool: pool.clone(),
            volume: volume.clone(),
            volume_id,
            cache,
            reflink,
            records: Mutex::new(records),
        })
    }

    pub fn list(&self) -> Vec<SnapshotInfo> {
        let records = self.records.lock().unwrap();
        records.values().map(|r| r.info.clone()).collect()
    }

    pub fn get(&self, snap: &SnapshotName) -> Option<Record> {
        self.records.lock().unwrap().get(snap).cloned()
    }

    pub fn is_empty(&self) -> bool {
        self.records.lock().unwrap().is_empty()
    }

    fn not_found(&self, snap: &SnapshotName) -> PoolError {
        PoolError::SnapshotNotFound {
            volume: self.volume.clone(),
            snapshot: snap.clone(),
        }
    }

    /// Takes snapshot `snap` of `data` (whose writes the caller has drained) at data
    /// generation `generation`. On failure nothing of it is left.
    pub fn take(
        &self,
        data: &DataFile,
        snap: &SnapshotName,
        size: u64,
        generation: u64,
    ) -> Result<SnapshotInfo, PoolError> {
        if !self.reflink {
            return Err(PoolError::NoReflink {
                pool: self.pool.clone(),
            });
        }
        let mut records = self.records.lock().unwrap();
        if records.contains_key(snap) {
            return Err(PoolError::SnapshotExists {
                volume: self.volume.clone(),
                snapshot: snap.clone(),
            });
        }
        let path = |ext| file_of(&self.dir, &self.volume, snap, ext);
        for ext in [DATA_EXT, RECORD_EXT, CREATING_EXT, DELETING_EXT] {
            if path(ext).exists() {
                return Err(PoolError::FileInTheWay { path: path(ext) });
            }
        }
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let record = Record {
            info: SnapshotInfo {
                volume: self.volume.clone(),
                name: snap.clone(),
                size,
                created,
            },
            volume_id: self.volume_id,
            generation,
        };
        let result = write_record(&path(CREATING_EXT), &record)
            .and_then(|()| {
                data.share_into(&path(DATA_EXT))
                    .map_err(|e| PoolError::from_file_error(e, &self.pool, &path(DATA_EXT), size))
            })
            .and_then(|()| {
                std::fs::rename(path(CREATING_EXT), path(RECORD_EXT)).map_err(PoolError::io(
                    format!("renaming {}", path(CREATING_EXT).display()),
                ))
            })
            .and_then(|()| sync_dir(&self.dir));
        if let Err(e) = result {
            for ext in [DATA_EXT, CREATING_EXT, RECORD_EXT] {
                let _ = std::fs::remove_file(path(ext));
            }
            return Err(e);
        }
        tracing::info!(pool = %self.pool, volume = %self.volume, snapshot = %snap, size, "snapshot taken");
        let info = record.info.clone();
        records.insert(snap.clone(), record);
        Ok(info)
    }

    pub fn delete(&self, snap: &SnapshotName) -> Result<(), PoolError> {
        let mut records = self.records.lock().unwrap();
        if !records.contains_key(snap) {
            return Err(self.not_found(snap));
        }
        let path = |ext| file_of(&self.dir, &self.volume, snap, ext);
        std::fs::rename(path(RECORD_EXT), path(DELETING_EXT)).map_err(PoolError::io(format!(
            "deleting snapshot {}@{snap}",
            self.volume
        )))?;
        records.remove(snap);
        sync_dir(&self.dir)?;
        remove_if_present(&path(DATA_EXT))?;
        remove_if_present(&path(DELETING_EXT))?;
        tracing::info!(pool = %self.pool, volume = %self.volume, snapshot = %snap, "snapshot deleted");
        Ok(())
    }

    /// Opens a snapshot's data file for reading.
    pub fn open(&self, snap: &SnapshotName) -> Result<DataFile, PoolError> {
        if !self.records.lock().unwrap().contains_key(snap) {
            return Err(self.not_found(snap));
        }
        let path = file_of(&self.dir, &self.volume, snap, DATA_EXT);
        DataFile::open_read_only(&path, self.cache)
            .map_err(PoolError::io(format!("opening {}", path.display())))
    }
}
