//! A `file` pool: one directory, its volumes, and the crash-safe steps that create and
//! delete them.
//!
//! A volume exists exactly when `<name>.meta` exists. Creating goes through
//! `<name>.meta.creating` (removed with its data file if found at start: the creation
//! was never acknowledged); deleting goes through `<name>.meta.deleting` (finished if
//! found at start). A `<name>.raw` without metadata is left alone: it may be an
//! operator's file.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use tandem_api::{DiskState, PoolName, VolumeInfo, VolumeName};

use crate::data::{CacheMode, DataFile};
use crate::error::PoolError;
use crate::meta::{MetaFile, NewVolume, Superblock};
use crate::snapshot::Snapshots;
use crate::volume::{Volume, check_size};

const DATA_EXT: &str = "raw";
const META_EXT: &str = "meta";
const CREATING_EXT: &str = "meta.creating";
const DELETING_EXT: &str = "meta.deleting";
const LOCK_FILE: &str = ".tandem-pool.lock";
/// How long opening a pool waits for another holder of its lock to let go.
const LOCK_PATIENCE: std::time::Duration = std::time::Duration::from_millis(500);

/// A volume as the pool knows it: usable, or refused with the reason.
#[derive(Clone)]
pub enum Entry {
    Ready(Arc<Volume>),
    Failed { name: VolumeName, error: String },
}

impl Entry {
    pub fn info(&self, pool: &PoolName) -> VolumeInfo {
        match self {
            Entry::Ready(v) => v.info(),
            Entry::Failed { name, error } => VolumeInfo {
                name: name.clone(),
                pool: pool.clone(),
                size: 0,
                allocated: 0,
                thick: false,
                read_only: true,
                disk: DiskState::Failed,
                open: 0,
                error: Some(error.clone()),
            },
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    pub capacity: u64,
    pub free: u64,
}

pub struct Pool {
    name: PoolName,
    dir: PathBuf,
    cache: CacheMode,
    /// Whether the directory's file system shares blocks (reflink): snapshots need it.
    reflink: bool,
    entries: RwLock<BTreeMap<VolumeName, Entry>>,
    /// Held (flock) for the pool's lifetime so two daemons never share a directory.
    _lock: File,
}

fn file_of(dir: &Path, name: &VolumeName, ext: &str) -> PathBuf {
    dir.join(format!("{name}.{ext}"))
}

pub(crate) fn sync_dir(dir: &Path) -> Result<(), PoolError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(PoolError::io(format!(
            "syncing directory {}",
            dir.display()
        )))
}

pub(crate) fn remove_if_present(path: &Path) -> Result<(), PoolError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(PoolError::io(format!("removing {}", path.display()))(e))
        }
        _ => Ok(()),
    }
}

impl Pool {
    /// Opens (creating if needed) the pool directory and loads its volumes. Volumes whose
    /// files are refused are listed as failed; they never stop the others from loading.
    pub fn open(name: PoolName, dir: &Path, cache: CacheMode) -> Result<Pool, PoolError> {
        std::fs::create_dir_all(dir).map_err(PoolError::io(format!(
            "creating pool directory {}",
            dir.display()
        )))?;
        let lock = File::create(dir.join(LOCK_FILE)).map_err(PoolError::io(format!(
            "opening the lock file in {}",
            dir.display()
        )))?;
        // A lock just released may linger a moment: a process forked meanwhile holds a
        // copy of the descriptor until it execs (descriptors close on exec).
        let deadline = std::time::Instant::now() + LOCK_PATIENCE;
        // SAFETY: plain syscall on a descriptor we own.
        while unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            if std::time::Instant::now() >= deadline {
                return Err(PoolError::Locked {
                    dir: dir.to_owned(),
                });
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let reflink = crate::data::shares_blocks(dir).map_err(PoolError::io(format!(
            "trying whether {} shares blocks between files",
            dir.display()
        )))?;
        let pool = Pool {
            name,
            dir: dir.to_owned(),
            cache,
            reflink,
            entries: RwLock::default(),
            _lock: lock,
        };
        pool.scan()?;
        Ok(pool)
    }

    fn scan(&self) -> Result<(), PoolError> {
        let mut by_ext: BTreeMap<&str, BTreeSet<VolumeName>> = BTreeMap::new();
        let listing = std::fs::read_dir(&self.dir)
            .map_err(PoolError::io(format!("listing {}", self.dir.display())))?;
        for item in listing {
            let item = item.map_err(PoolError::io(format!("listing {}", self.dir.display())))?;
            let file_name = item.file_name();
            let Some(file_name) = file_name.to_str() else {
                continue;
            };
            for ext in [CREATING_EXT, DELETING_EXT, META_EXT, DATA_EXT] {
                let Some(stem) = file_name
                    .strip_suffix(ext)
                    .and_then(|s| s.strip_suffix('.'))
                else {
                    continue;
                };
                if let Ok(name) = stem.parse::<VolumeName>() {
                    by_ext.entry(ext).or_default().insert(name);
                }
                break;
            }
        }
        let names = |ext| by_ext.get(ext).cloned().unwrap_or_default();
        for name in names(CREATING_EXT) {
            tracing::info!(pool = %self.name, volume = %name, "removing a volume whose creation was interrupted");
            remove_if_present(&file_of(&self.dir, &name, DATA_EXT))?;
            remove_if_present(&file_of(&self.dir, &name, CREATING_EXT))?;
        }
        for name in names(DELETING_EXT) {
            tracing::info!(pool = %self.name, volume = %name, "finishing an interrupted deletion");
            crate::snapshot::remove_all(&self.dir, &name)?;
            remove_if_present(&file_of(&self.dir, &name, DATA_EXT))?;
            remove_if_present(&file_of(&self.dir, &name, DELETING_EXT))?;
        }
        let metas = names(META_EXT);
        let mut entries = self.entries.write().unwrap();
        for name in &metas {
            let entry = match self.load(name) {
                Ok(volume) => Entry::Ready(Arc::new(volume)),
                Err(e) => {
                    tracing::error!(pool = %self.name, volume = %name, error = %e, "volume refused");
                    Entry::Failed {
                        name: name.clone(),
                        error: e.to_string(),
                    }
                }
            };
            entries.insert(name.clone(), entry);
        }
        for name in names(DATA_EXT).difference(&metas) {
            let path = file_of(&self.dir, name, DATA_EXT);
            if path.exists() {
                tracing::warn!(pool = %self.name, path = %path.display(),
                    "data file without metadata is not a volume; leaving it alone");
            }
        }
        Ok(())
    }

    fn load(&self, name: &VolumeName) -> Result<Volume, PoolError> {
        let meta = MetaFile::open(&file_of(&self.dir, name, META_EXT))?;
        let sb = meta.superblock();
        if &sb.name != name {
            return Err(PoolError::Failed {
                name: name.clone(),
                error: format!(
                    "its metadata belongs to volume {}; files were renamed by hand",
                    sb.name
                ),
            });
        }
        let data_path = file_of(&self.dir, name, DATA_EXT);
        let data = DataFile::open(&data_path, self.cache)
            .map_err(PoolError::io(format!("opening {}", data_path.display())))?;
        let len = data
            .len()
            .map_err(PoolError::io(format!("reading {}", data_path.display())))?;
        if len < sb.size {
            return Err(PoolError::Failed {
                name: name.clone(),
                error: format!(
                    "data file is {len} bytes but the volume is {} bytes",
                    sb.size
                ),
            });
        }
        if !sb.clean {
            tracing::warn!(pool = %self.name, volume = %name,
                "volume was not closed cleanly (crash or kill); syncing its data file");
            data.flush()
                .map_err(PoolError::io(format!("syncing {}", data_path.display())))?;
        }
        let snapshots = Snapshots::load(
            &self.dir,
            &self.name,
            name,
            sb.volume_id,
            self.cache,
            self.reflink,
        )?;
        tracing::debug!(pool = %self.name, volume = %name, size = sb.size, id = %sb.volume_id, "volume loaded");
        Ok(Volume::new(self.name.clone(), meta, data, snapshots))
    }

    pub fn name(&self) -> &PoolName {
        &self.name
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the pool takes snapshots (its file system shares blocks).
    pub fn reflink(&self) -> bool {
        self.reflink
    }

    pub fn stats(&self) -> Result<PoolStats, PoolError> {
        let c = std::ffi::CString::new(self.dir.as_os_str().as_encoded_bytes())
            .map_err(|_| PoolError::io("pool path")(std::io::ErrorKind::InvalidInput.into()))?;
        // SAFETY: statvfs fills the zeroed struct we own from a valid C path.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
            return Err(PoolError::io(format!("statvfs {}", self.dir.display()))(
                std::io::Error::last_os_error(),
            ));
        }
        let unit = st.f_frsize as u64;
        Ok(PoolStats {
            capacity: st.f_blocks as u64 * unit,
            free: st.f_bavail as u64 * unit,
        })
    }

    pub fn get(&self, name: &VolumeName) -> Option<Entry> {
        self.entries.read().unwrap().get(name).cloned()
    }

    pub fn entries(&self) -> Vec<Entry> {
        self.entries.read().unwrap().values().cloned().collect()
    }

    pub fn contains(&self, name: &VolumeName) -> bool {
        self.entries.read().unwrap().contains_key(name)
    }

    /// Creates a volume; on any failure nothing of it is left behind.
    pub fn create(&self, new: &NewVolume) -> Result<Arc<Volume>, PoolError> {
        self.create_with(new, |path| {
            DataFile::create(path, new.size, new.thick, self.cache).map(drop)
        })
    }

    /// Creates a volume whose data starts as a copy of `source` (a snapshot's data
    /// file, in this pool's file system), sharing its blocks (reflink).
    pub fn create_from(
        &self,
        new: &NewVolume,
        source: &DataFile,
    ) -> Result<Arc<Volume>, PoolError> {
        if !self.reflink {
            return Err(PoolError::NoReflink {
                pool: self.name.clone(),
            });
        }
        self.create_with(new, |path| {
            let data = DataFile::create(path, new.size, false, CacheMode::Writeback)?;
            data.share_range(source, 0, new.size)?;
            data.flush()
        })
    }

    fn create_with(
        &self,
        new: &NewVolume,
        make_data: impl FnOnce(&Path) -> std::io::Result<()>,
    ) -> Result<Arc<Volume>, PoolError> {
        let (name, size, thick) = (&new.name, new.size, new.thick);
        check_size(size)?;
        let mut entries = self.entries.write().unwrap();
        if entries.contains_key(name) {
            return Err(PoolError::Exists { name: name.clone() });
        }
        if thick {
            let free = self.stats()?.free;
            if free < size {
                return Err(PoolError::NoSpace {
                    pool: self.name.clone(),
                    needed: size,
                    free,
                });
            }
        }
        let creating = file_of(&self.dir, name, CREATING_EXT);
        let meta_path = file_of(&self.dir, name, META_EXT);
        let data_path = file_of(&self.dir, name, DATA_EXT);
        for path in [&meta_path, &data_path, &creating] {
            if path.exists() {
                return Err(PoolError::FileInTheWay { path: path.clone() });
            }
        }
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        MetaFile::create(&creating, Superblock::new(new, created))?;
        let result = make_data(&data_path)
            .map_err(|e| PoolError::from_file_error(e, &self.name, &data_path, size))
            .and_then(|_| {
                std::fs::rename(&creating, &meta_path)
                    .map_err(PoolError::io(format!("renaming {}", creating.display())))
            })
            .and_then(|()| sync_dir(&self.dir))
            .and_then(|()| self.load(name));
        let volume = match result {
            Ok(v) => Arc::new(v),
            Err(e) => {
                for path in [&creating, &meta_path, &data_path] {
                    let _ = std::fs::remove_file(path);
                }
                return Err(e);
            }
        };
        entries.insert(name.clone(), Entry::Ready(volume.clone()));
        tracing::info!(pool = %self.name, volume = %name, size, thick, "volume created");
        Ok(volume)
    }

    /// Deletes a volume, its snapshots and its files. Refused while it is open, and for
    /// failed volumes (their files need a person's attention, not removal).
    pub fn delete(&self, name: &VolumeName) -> Result<(), PoolError> {
        let mut entries = self.entries.write().unwrap();
        match entries.get(name) {
            None => return Err(PoolError::NotFound { name: name.clone() }),
            Some(Entry::Failed { error, .. }) => {
                return Err(PoolError::Failed {
                    name: name.clone(),
                    error: error.clone(),
                });
            }
            Some(Entry::Ready(v)) if v.openers() > 0 => {
                return Err(PoolError::InUse {
                    name: name.clone(),
                    openers: v.openers(),
                });
            }
            Some(Entry::Ready(_)) => {}
        }
        let deleting = file_of(&self.dir, name, DELETING_EXT);
        std::fs::rename(file_of(&self.dir, name, META_EXT), &deleting)
            .map_err(PoolError::io(format!("deleting volume {name}")))?;
        entries.remove(name);
        sync_dir(&self.dir)?;
        crate::snapshot::remove_all(&self.dir, name)?;
        remove_if_present(&file_of(&self.dir, name, DATA_EXT))?;
        remove_if_present(&deleting)?;
        tracing::info!(pool = %self.name, volume = %name, "volume deleted");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(dir: &Path) -> Pool {
        Pool::open("default".parse().unwrap(), dir, CacheMode::Writeback).unwrap()
    }

    fn plenty() -> Result<u64, PoolError> {
        Ok(u64::MAX)
    }

    fn name(s: &str) -> VolumeName {
        s.parse().unwrap()
    }

    #[test]
    fn volumes_survive_reopen_with_their_bytes() {
        let dir = tempfile::tempdir().unwrap();
        {
            let p = pool(dir.path());
            let v = p
                .create(&NewVolume::single(name("vm1"), 1 << 20, false))
                .unwrap();
            let h = v.open(true).unwrap();
            h.data().write_at(b"persist me", 4096, false).unwrap();
        }
        let p = pool(dir.path());
        let Some(Entry::Ready(v)) = p.get(&name("vm1")) else {
            panic!("volume missing")
        };
        assert_eq!(v.size(), 1 << 20);
        let mut buf = [0u8; 10];
        v.data().read_at(&mut buf, 4096).unwrap();
        assert_eq!(&buf, b"persist me");
        // The raw file is the volume, byte for byte.
        let raw = std::fs::read(dir.path().join("vm1.raw")).unwrap();
        assert_eq!(&raw[4096..4106], b"persist me");
    }

    #[test]
    fn second_daemon_on_same_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _p = pool(dir.path());
        let again = Pool::open("default".parse().unwrap(), dir.path(), CacheMode::Writeback);
        assert!(matches!(again, Err(PoolError::Locked { .. })));
    }

    #[test]
    fn interrupted_create_and_delete_are_completed_at_start() {
        let dir = tempfile::tempdir().unwrap();
        {
            let p = pool(dir.path());
            p.create(&NewVolume::single(name("half"), 1 << 20, false))
                .unwrap();
            p.create(&NewVolume::single(name("gone"), 1 << 20, false))
                .unwrap();
        }
        std::fs::rename(
            dir.path().join("half.meta"),
            dir.path().join("half.meta.creating"),
        )
        .unwrap();
        std::fs::rename(
            dir.path().join("gone.meta"),
            dir.path().join("gone.meta.deleting"),
        )
        .unwrap();
        std::fs::write(dir.path().join("mine.raw"), b"operator data").unwrap();
        let p = pool(dir.path());
        assert!(p.entries().is_empty());
        let mut left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, [LOCK_FILE, "mine.raw"]);
    }

    #[test]
    fn corrupt_metadata_is_listed_as_failed_and_never_deleted() {
        let dir = tempfile::tempdir().unwrap();
        {
            let p = pool(dir.path());
            p.create(&NewVolume::single(name("ok"), 1 << 20, false))
                .unwrap();
            p.create(&NewVolume::single(name("bad"), 1 << 20, false))
                .unwrap();
        }
        let meta = dir.path().join("bad.meta");
        let mut bytes = std::fs::read(&meta).unwrap();
        bytes[100] ^= 0xff;
        bytes[4096 + 100] ^= 0xff;
        std::fs::write(&meta, &bytes).unwrap();
        let p = pool(dir.path());
        assert!(matches!(p.get(&name("ok")), Some(Entry::Ready(_))));
        let info = p.get(&name("bad")).unwrap().info(p.name());
        assert_eq!(info.disk, DiskState::Failed);
        assert!(
            info.error.unwrap().contains("corrupt"),
            "error names the corruption"
        );
        assert!(matches!(
            p.delete(&name("bad")),
            Err(PoolError::Failed { .. })
        ));
        assert_eq!(
            std::fs::read(&meta).unwrap(),
            bytes,
            "refused metadata is untouched"
        );
    }

    #[test]
    fn open_volumes_cannot_be_deleted_and_volumes_only_grow() {
        let dir = tempfile::tempdir().unwrap();
        let p = pool(dir.path());
        let v = p
            .create(&NewVolume::single(name("vm"), 1 << 20, false))
            .unwrap();
        let h = v.open(true).unwrap();
        assert!(matches!(
            p.delete(&name("vm")),
            Err(PoolError::InUse { openers: 1, .. })
        ));
        assert!(matches!(
            v.update(Some(4096), None, plenty),
            Err(PoolError::Shrink { .. })
        ));
        assert!(matches!(
            v.update(Some((1 << 20) + 1), None, plenty),
            Err(PoolError::InvalidSize { .. })
        ));
        v.update(Some(2 << 20), None, plenty).unwrap();
        assert_eq!(h.data().len().unwrap(), 2 << 20);
        drop(h);
        p.delete(&name("vm")).unwrap();
        assert!(!dir.path().join("vm.raw").exists());
        assert!(!dir.path().join("vm.meta").exists());
    }

    #[test]
    fn crash_while_open_is_noticed_as_unclean() {
        let dir = tempfile::tempdir().unwrap();
        let p = pool(dir.path());
        let v = p
            .create(&NewVolume::single(name("vm"), 1 << 20, false))
            .unwrap();
        let h = v.open(true).unwrap();
        let sb = MetaFile::open(&dir.path().join("vm.meta"))
            .unwrap()
            .superblock()
            .clone();
        assert!(!sb.clean);
        drop(h);
        let sb = MetaFile::open(&dir.path().join("vm.meta"))
            .unwrap()
            .superblock()
            .clone();
        assert!(sb.clean);
    }

    /// Snapshots where the file system shares blocks (reflink); a clear refusal where
    /// it does not. The system tests run both on purpose-made xfs and ext4.
    #[test]
    fn snapshots_keep_their_bytes_and_roll_back_or_are_refused_without_reflink() {
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let snap: tandem_api::SnapshotName = "s1".parse().unwrap();
        let p = pool(dir.path());
        let v = p
            .create(&NewVolume::single(name("vm"), 1 << 20, false))
            .unwrap();
        v.data().write_at(b"before", 4096, false).unwrap();
        if !p.reflink() {
            assert!(matches!(
                v.begin_snapshot(&snap).and_then(|()| v.fill_snapshot()),
                Err(PoolError::NoReflink { .. })
            ));
            assert!(v.snapshots().is_empty());
            assert_eq!(
                std::fs::read_dir(dir.path()).unwrap().count(),
                3,
                "lock, meta and data only"
            );
            return;
        }
        let info = v
            .begin_snapshot(&snap)
            .and_then(|()| v.fill_snapshot())
            .unwrap();
        assert_eq!((info.size, info.volume.as_str()), (1 << 20, "vm"));
        assert!(matches!(
            v.begin_snapshot(&snap).and_then(|()| v.fill_snapshot()),
            Err(PoolError::SnapshotExists { .. })
        ));
        v.data().write_at(b"after!", 4096, false).unwrap();
        let mut buf = [0u8; 6];
        v.open_snapshot(&snap)
            .unwrap()
            .read_at(&mut buf, 4096)
            .unwrap();
        assert_eq!(&buf, b"before");
        // Known after a restart; rolled back only while closed.
        drop(p);
        let p = pool(dir.path());
        let Some(Entry::Ready(v)) = p.get(&name("vm")) else {
            panic!("volume missing")
        };
        assert_eq!(v.snapshots(), vec![info]);
        let h = v.open(true).unwrap();
        assert!(matches!(v.roll_back(&snap), Err(PoolError::InUse { .. })));
        drop(h);
        v.roll_back(&snap).unwrap();
        v.data().read_at(&mut buf, 4096).unwrap();
        assert_eq!(&buf, b"before");
        v.delete_snapshot(&snap).unwrap();
        assert!(matches!(
            v.open_snapshot(&snap),
            Err(PoolError::SnapshotNotFound { .. })
        ));
        assert!(!dir.path().join("vm@s1.raw").exists());
    }

    /// A snapshot begun is what the data was then, though writes come before it is
    /// filled: each first shares the chunk it changes. On xfs, made for the test.
    #[test]
    fn writes_while_a_snapshot_fills_leave_it_as_it_was_begun() {
        let Some(fs) = tandem_lab::SmallFs::xfs(300) else {
            eprintln!("skipped: needs root, loop devices and mkfs.xfs (Debian: xfsprogs)");
            return;
        };
        let p = pool(&fs.mnt.join("pool"));
        assert!(p.reflink());
        let size = 16 << 20;
        let v = p
            .create(&NewVolume::single(name("vm"), size, false))
            .unwrap();
        let old = vec![0x11u8; size as usize];
        v.write_at(&old, 0, false).unwrap();
        let snap: tandem_api::SnapshotName = "s".parse().unwrap();
        v.begin_snapshot(&snap).unwrap();
        assert!(
            matches!(
                v.begin_snapshot(&"t".parse().unwrap()),
                Err(PoolError::Failed { .. })
            ),
            "one at a time"
        );
        // Writes across chunk boundaries, a zeroing and a trim, before the fill.
        v.write_at(&[0x22; 8192], (2 << 20) - 4096, false).unwrap();
        v.write_zeroes(5 << 20, 1 << 20, true, false, false)
            .unwrap();
        v.trim(9 << 20, 4096, false).unwrap();
        let info = v.fill_snapshot().unwrap();
        assert_eq!(info.size, size);
        v.write_at(&[0x33; 4096], 12 << 20, false).unwrap();
        let mut got = vec![0u8; size as usize];
        v.open_snapshot(&snap)
            .unwrap()
            .read_at(&mut got, 0)
            .unwrap();
        assert!(got == old, "the snapshot holds the data as it was begun");
        v.data().read_at(&mut got, 0).unwrap();
        assert_eq!(got[(2 << 20) - 4096..(2 << 20) + 4096], [0x22; 8192]);
        assert!(got[5 << 20..6 << 20].iter().all(|&b| b == 0));
        assert_eq!(got[12 << 20], 0x33);
        // Only what was written differs.
        let changed: u64 = (v
            .data()
            .changes_against(&v.open_snapshot(&snap).unwrap(), 0, size)
            .unwrap())
        .iter()
        .filter(|s| s.changed)
        .map(|s| s.len)
        .sum();
        assert_eq!(changed, 8192 + (1 << 20) + 4096 + 4096);
    }

    /// The fill passes over the volume's holes (the snapshot's file starts as holes),
    /// even where a write lands in one before the fill comes to it.
    #[test]
    fn a_snapshot_of_a_sparse_volume_keeps_its_holes() {
        let Some(fs) = tandem_lab::SmallFs::xfs(300) else {
            eprintln!("skipped: needs root, loop devices and mkfs.xfs (Debian: xfsprogs)");
            return;
        };
        let p = pool(&fs.mnt.join("pool"));
        // 40 MiB and a bit: more than one window of the fill, a last chunk cut short.
        let size = (40 << 20) + 8192;
        let v = p
            .create(&NewVolume::single(name("vm"), size, false))
            .unwrap();
        let mut old = vec![0u8; size as usize];
        for at in [1 << 20, (17 << 20) + 4096, size - 4096] {
            v.write_at(&[0x11; 4096], at, false).unwrap();
            old[at as usize..at as usize + 4096].fill(0x11);
        }
        let snap: tandem_api::SnapshotName = "s".parse().unwrap();
        v.begin_snapshot(&snap).unwrap();
        // Into a hole, before the fill: the snapshot keeps the hole.
        v.write_at(&[0x22; 4096], 30 << 20, false).unwrap();
        v.fill_snapshot().unwrap();
        let copy = v.open_snapshot(&snap).unwrap();
        let mut got = vec![0u8; size as usize];
        copy.read_at(&mut got, 0).unwrap();
        assert!(got == old, "the snapshot holds the data as it was begun");
        assert!(
            copy.allocated().unwrap() <= 3 * (256 << 10),
            "holes stay holes: {} bytes allocated",
            copy.allocated().unwrap()
        );
    }

    /// On a file system with no room left, a snapshot is taken (sharing needs no data
    /// blocks) or refused naming the pool, nothing of it left; the volume's bytes stay.
    #[test]
    fn a_snapshot_on_a_full_pool_is_taken_or_cleanly_refused() {
        use std::io::Write;
        let Some(fs) = tandem_lab::SmallFs::xfs(300) else {
            eprintln!("skipped: needs root, loop devices and mkfs.xfs (Debian: xfsprogs)");
            return;
        };
        let dir = fs.mnt.join("pool");
        let p = pool(&dir);
        let size = 16 << 20;
        let v = p
            .create(&NewVolume::single(name("vm"), size, false))
            .unwrap();
        let old = vec![0x11u8; size as usize];
        v.write_at(&old, 0, false).unwrap();
        let filler = fs.mnt.join("filler");
        let mut f = std::fs::File::create(&filler).unwrap();
        let mib = vec![0xeeu8; 1 << 20];
        let full = loop {
            if let Err(e) = f.write_all(&mib) {
                break e;
            }
        };
        assert_eq!(full.raw_os_error(), Some(libc::ENOSPC), "{full}");
        let _ = f.sync_all();
        let snap: tandem_api::SnapshotName = "s".parse().unwrap();
        let taken = v
            .begin_snapshot(&snap)
            .and_then(|()| v.fill_snapshot().map(drop));
        let mut got = vec![0u8; size as usize];
        match &taken {
            Ok(()) => {
                v.open_snapshot(&snap)
                    .unwrap()
                    .read_at(&mut got, 0)
                    .unwrap();
                assert!(got == old, "the snapshot holds the volume's bytes");
            }
            Err(e) => {
                assert!(matches!(e, PoolError::NoSpace { .. }), "{e}");
                assert!(e.to_string().contains("pool"), "{e}");
                assert!(v.snapshots().is_empty());
                let left: Vec<_> = std::fs::read_dir(&dir)
                    .unwrap()
                    .filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with("vm@"))
                    .collect();
                assert!(left.is_empty(), "left behind: {left:?}");
            }
        }
        v.data().read_at(&mut got, 0).unwrap();
        assert!(got == old, "the volume's bytes are unchanged");
        // With room again, it is taken.
        drop(f);
        std::fs::remove_file(&filler).unwrap();
        if taken.is_err() {
            v.begin_snapshot(&snap).unwrap();
            v.fill_snapshot().unwrap();
        }
        assert_eq!(v.snapshots().len(), 1);
    }

    #[test]
    fn interrupted_snapshot_steps_are_finished_when_the_pool_opens() {
        let dir = tempfile::tempdir().unwrap();
        {
            let p = pool(dir.path());
            p.create(&NewVolume::single(name("vm"), 1 << 20, false))
                .unwrap();
        }
        for f in [
            "vm@half.raw",
            "vm@half.snap.creating",
            "vm@gone.raw",
            "vm@gone.snap.deleting",
            "vm@orphan.raw",
            "vmx@other.raw",
        ] {
            std::fs::write(dir.path().join(f), b"x").unwrap();
        }
        let p = pool(dir.path());
        let Some(Entry::Ready(v)) = p.get(&name("vm")) else {
            panic!("volume missing")
        };
        assert!(v.snapshots().is_empty());
        for f in [
            "vm@half.raw",
            "vm@half.snap.creating",
            "vm@gone.raw",
            "vm@gone.snap.deleting",
            "vm@orphan.raw",
        ] {
            assert!(!dir.path().join(f).exists(), "{f} is left");
        }
        assert!(
            dir.path().join("vmx@other.raw").exists(),
            "another volume's files are not touched"
        );
    }

    #[test]
    fn bad_sizes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = pool(dir.path());
        for size in [0, 1000, crate::MAX_VOLUME_SIZE + 4096] {
            assert!(matches!(
                p.create(&NewVolume::single(name("x"), size, false)),
                Err(PoolError::InvalidSize { .. })
            ));
        }
        assert!(p.entries().is_empty());
    }
}
