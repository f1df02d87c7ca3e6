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
//! file into the `.raw` chunk by chunk (each chunk before the first write that changes
//! it, the rest in one pass), then renames the record into place; deleting renames the
//! record to `.snap.deleting` first. Either marker found when the pool opens is an
//! interrupted step: a creation is undone, a deletion finished. `@` is in no volume or
//! snapshot name, so these files never collide with a volume's.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
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
    /// The snapshot being taken, if one is.
    filling: RwLock<Option<Arc<Filling>>>,
    /// Whether one is: the one thing every write reads.
    active: AtomicBool,
}

/// Bytes of a volume shared into a snapshot at a time: writes wait while a chunk is
/// shared (the file system holds them), as long as the chunk's block map takes (a
/// chunk written in 4 KiB pieces: 64 extents, about a millisecond).
const CHUNK: u64 = 256 << 10;

/// Chunks whose block map the fill reads at once, to pass over holes (16 MiB).
const WINDOW: u64 = 64;

/// The chunks of `[first, last)` that are holes in `data` (none where its map cannot be
/// read: then every chunk is shared).
///
/// Read once for the window, the map stays true of every chunk the fill has not shared
/// when it comes to it: a change shares its chunk before it is made.
fn hole_chunks(data: &DataFile, first: u64, last: u64, size: u64) -> Vec<u64> {
    let start = first * CHUNK;
    let end = (last * CHUNK).min(size);
    let Ok(extents) = data.extents(start, end - start) else {
        return Vec::new();
    };
    let mut holes = Vec::new();
    let mut at = start;
    for e in extents {
        if e.hole {
            // Chunks lying wholly inside this hole.
            let from = at.div_ceil(CHUNK);
            let to = (at + e.len).min(end);
            let to = if to == end { last } else { to / CHUNK };
            holes.extend(from..to.max(from));
        }
        at += e.len;
    }
    holes
}

/// A snapshot begun and not yet complete.
struct Filling {
    record: Record,
    /// Its data file, being filled.
    file: DataFile,
    size: u64,
    /// One bit per chunk: shared already.
    shared: Vec<AtomicU64>,
    /// A chunk is shared under the lock of its stripe, so it is shared once.
    stripes: [Mutex<()>; 64],
    /// The first failure to share a chunk: the snapshot is then given up, the writes
    /// go on.
    failed: Mutex<Option<std::io::Error>>,
}

impl Filling {
    fn is_shared(&self, chunk: u64) -> bool {
        self.shared[(chunk / 64) as usize].load(Ordering::Acquire) & (1 << (chunk % 64)) != 0
    }

    /// Marks a chunk that is a hole in the volume as shared: the snapshot's file is all
    /// holes from its start.
    fn skip_hole(&self, chunk: u64) {
        let _stripe = self.stripes[(chunk % 64) as usize].lock().unwrap();
        self.shared[(chunk / 64) as usize].fetch_or(1 << (chunk % 64), Ordering::AcqRel);
    }

    /// Shares chunk `chunk` of `data` into the snapshot, unless it was already.
    fn share(&self, data: &DataFile, chunk: u64) {
        if self.is_shared(chunk) {
            return;
        }
        let _stripe = self.stripes[(chunk % 64) as usize].lock().unwrap();
        if self.is_shared(chunk) {
            return;
        }
        let offset = chunk * CHUNK;
        let len = CHUNK.min(self.size - offset);
        if let Err(e) = self.file.share_range(data, offset, len) {
            let mut failed = self.failed.lock().unwrap();
            if failed.is_none() {
                tracing::error!(snapshot = %self.record.info.name, offset, error = %e,
                    "cannot share data into the snapshot; it is given up");
                *failed = Some(e);
            }
        }
        self.shared[(chunk / 64) as usize].fetch_or(1 << (chunk % 64), Ordering::AcqRel);
    }
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

/// Writes a record; it is made durable before it is renamed into place.
fn write_record(path: &Path, record: &Record) -> Result<(), PoolError> {
    let text = serde_json::to_vec_pretty(record).expect("a record serialises");
    let write = || -> std::io::Result<()> {
        let mut f = File::options().write(true).create_new(true).open(path)?;
        f.write_all(&text)
    };
    write().map_err(PoolError::io(format!("writing {}", path.display())))
}

/// Makes a file's content durable.
fn sync_file(path: &Path) -> Result<(), PoolError> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(PoolError::io(format!("syncing {}", path.display())))
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
            // A data file with no record nor marker: a creation cut short before its
            // marker reached the disk (it is written without waiting).
            if *ext == DATA_EXT && files.iter().filter(|(s, _)| s == snap).count() == 1 {
                tracing::info!(pool = %pool, volume = %volume, snapshot = %snap,
                    "removing the data of a snapshot whose creation was interrupted");
                remove_if_present(&file_of(dir, volume, snap, DATA_EXT))?;
                continue;
            }
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
            filling: RwLock::new(None),
            active: AtomicBool::new(false),
        })
    }

    pub fn list(&self) -> Vec<SnapshotInfo> {
        let records = self.records.lock().unwrap();
        records.values().map(|r| r.info.clone()).collect()
    }

    pub fn get(&self, snap: &SnapshotName) -> Option<Record> {
        self.records.lock().unwrap().get(snap).cloned()
    }

    fn not_found(&self, snap: &SnapshotName) -> PoolError {
        PoolError::SnapshotNotFound {
            volume: self.volume.clone(),
            snapshot: snap.clone(),
        }
    }

    /// Begins snapshot `snap` of the data file (whose writes the caller has drained)
    /// at data generation `generation`: records it as being created and makes its data
    /// file, empty. Its blocks are shared from the data file by [`Snapshots::fill`], or
    /// earlier, range by range, by [`Snapshots::before_write`]: sharing a whole data file
    /// takes time in proportion to its block map (seconds for a file written at random),
    /// during which the file system holds its writes, so a snapshot never does it at once.
    pub fn begin(&self, snap: &SnapshotName, size: u64, generation: u64) -> Result<(), PoolError> {
        if !self.reflink {
            return Err(PoolError::NoReflink {
                pool: self.pool.clone(),
            });
        }
        let records = self.records.lock().unwrap();
        let mut filling = self.filling.write().unwrap();
        if let Some(f) = filling.as_ref() {
            return Err(PoolError::Failed {
                name: self.volume.clone(),
                error: format!("snapshot {} is still being taken", f.record.info.name),
            });
        }
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
        // Nothing waits for the disk here (writes are held back meanwhile): a crash
        // leaves a marker or a data file alone, both undone when the pool opens.
        let file = write_record(&path(CREATING_EXT), &record)
            .map_err(|e| e.or_no_space(&self.pool, 4096))
            .and_then(|()| {
                DataFile::create_unsynced(&path(DATA_EXT), size)
                    .map_err(|e| PoolError::from_file_error(e, &self.pool, &path(DATA_EXT), size))
            });
        let file = match file {
            Ok(f) => f,
            Err(e) => {
                self.remove_files(snap);
                return Err(e);
            }
        };
        let chunks = size.div_ceil(CHUNK);
        *filling = Some(Arc::new(Filling {
            record,
            file,
            size,
            shared: (0..chunks.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            stripes: std::array::from_fn(|_| Mutex::new(())),
            failed: Mutex::new(None),
        }));
        self.active.store(true, Ordering::Release);
        Ok(())
    }

    /// Before a change of `[offset, offset + len)` of `data`: the snapshot being filled,
    /// if any, first takes the old content of the chunks the change touches.
    pub fn before_write(&self, data: &DataFile, offset: u64, len: u64) {
        if !self.active.load(Ordering::Acquire) {
            return;
        }
        let Some(f) = self.filling.read().unwrap().clone() else {
            return;
        };
        let end = (offset + len.max(1)).min(f.size);
        for chunk in offset / CHUNK..end.div_ceil(CHUNK) {
            f.share(data, chunk);
        }
    }

    /// Completes the snapshot begun: every chunk not shared yet is, the snapshot's data
    /// is made durable and its record put in place. On failure nothing of it is left.
    pub fn fill(&self, data: &DataFile) -> Result<SnapshotInfo, PoolError> {
        let Some(f) = self.filling.read().unwrap().clone() else {
            return Err(PoolError::Failed {
                name: self.volume.clone(),
                error: "no snapshot is being taken".into(),
            });
        };
        let snap = f.record.info.name.clone();
        let chunks = f.size.div_ceil(CHUNK);
        for first in (0..chunks).step_by(WINDOW as usize) {
            let last = (first + WINDOW).min(chunks);
            let holes = hole_chunks(data, first, last, f.size);
            for chunk in first..last {
                if holes.contains(&chunk) {
                    f.skip_hole(chunk);
                    continue;
                }
                // Sharing holds the file's writes (xfs drains and locks them out);
                // resting as long as each share took lets them through between chunks,
                // so the fill slows writes rather than stops them.
                let started = std::time::Instant::now();
                f.share(data, chunk);
                std::thread::sleep(started.elapsed());
            }
        }
        let path = |ext| file_of(&self.dir, &self.volume, &snap, ext);
        let failed = f.failed.lock().unwrap().take();
        let result = match failed {
            Some(e) => Err(PoolError::from_file_error(
                e,
                &self.pool,
                &path(DATA_EXT),
                f.size,
            )),
            None => f
                .file
                .flush()
                .map_err(PoolError::io(format!(
                    "syncing {}",
                    path(DATA_EXT).display()
                )))
                .and_then(|()| sync_file(&path(CREATING_EXT)))
                .and_then(|()| {
                    std::fs::rename(path(CREATING_EXT), path(RECORD_EXT)).map_err(PoolError::io(
                        format!("renaming {}", path(CREATING_EXT).display()),
                    ))
                })
                .and_then(|()| sync_dir(&self.dir)),
        };
        let mut records = self.records.lock().unwrap();
        self.active.store(false, Ordering::Release);
        *self.filling.write().unwrap() = None;
        if let Err(e) = result {
            self.remove_files(&snap);
            return Err(e);
        }
        tracing::info!(pool = %self.pool, volume = %self.volume, snapshot = %snap, size = f.size, "snapshot taken");
        let info = f.record.info.clone();
        records.insert(snap, f.record.clone());
        Ok(info)
    }

    fn remove_files(&self, snap: &SnapshotName) {
        for ext in [DATA_EXT, CREATING_EXT, RECORD_EXT] {
            let _ = std::fs::remove_file(file_of(&self.dir, &self.volume, snap, ext));
        }
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
