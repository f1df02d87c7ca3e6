//! Backups of the controller's database, in `<data-dir>/backups/`: after changes (once
//! they have paused for a second, at most one every ten seconds) and every six hours,
//! each checked as a controller would start from it before it counts; the newest
//! [`KEEP`] are kept, on the controller's node and on every other candidate (a copy
//! sent to each, checked there too: whichever candidate survives has them). On demand
//! too (`GET /v1/cluster/backup`), and a controller starts from one with
//! `tandemd --restore-db FILE` ([`restore`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tandem_api::BackupInfo;

use crate::controller::{Controller, Refusal, RefusalKind};
use crate::store::{Store, StoreError};

/// Backups kept in the data directory.
pub const KEEP: usize = 10;
/// Changes are backed up once they have paused this long...
const QUIET: Duration = Duration::from_secs(1);
/// ... and no sooner than this after the previous backup.
const SPACING: Duration = Duration::from_secs(10);
/// A backup at least this often, changes or not.
const PERIOD: Duration = Duration::from_secs(6 * 3600);

const PREFIX: &str = "controller-";
const SUFFIX: &str = ".db";

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The backups in `dir`, oldest first (their names hold their time).
fn listed(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(PREFIX) && n.ends_with(SUFFIX))
        })
        .collect();
    files.sort();
    files
}

fn info_of(path: &Path, created_ms: u64) -> Result<BackupInfo, StoreError> {
    let (_, volumes) = Store::validate(path)?;
    let bytes = std::fs::metadata(path)
        .map_err(|e| StoreError::Invalid(format!("{}: {e}", path.display())))?
        .len();
    Ok(BackupInfo {
        file: path.display().to_string(),
        created_ms,
        bytes,
        volumes,
    })
}

impl Controller {
    pub(crate) fn backup_dir(&self) -> PathBuf {
        self.data_dir.join("backups")
    }

    /// The newest backup in the data directory, if any.
    pub(crate) fn last_backup(&self) -> Option<BackupInfo> {
        let path = listed(&self.backup_dir()).pop()?;
        let created_ms = path
            .file_name()?
            .to_str()?
            .strip_prefix(PREFIX)?
            .strip_suffix(SUFFIX)?
            .parse()
            .ok()?;
        info_of(&path, created_ms).ok()
    }

    /// Backs the database up into `path` (which must not exist) and checks the copy.
    fn backup_into(&self, path: &Path) -> Result<BackupInfo, Refusal> {
        let created_ms = now_ms();
        let failed = |e: StoreError| {
            let _ = std::fs::remove_file(path);
            Refusal::new(
                RefusalKind::Internal,
                format!(
                    "cannot back the controller's database up into {}",
                    path.display()
                ),
                "check the data directory of the controller node (space, permissions)",
            )
            .with_cause(e)
        };
        self.desired().store.backup_to(path).map_err(failed)?;
        info_of(path, created_ms).map_err(failed)
    }

    /// A backup into the data directory now; older ones beyond [`KEEP`] go.
    pub fn backup(&self) -> Result<BackupInfo, Refusal> {
        let dir = self.backup_dir();
        std::fs::create_dir_all(&dir).map_err(|e| {
            Refusal::new(
                RefusalKind::Internal,
                format!("cannot create {}", dir.display()),
                "check the data directory of the controller node (space, permissions)",
            )
            .with_cause(e)
        })?;
        let info = self.backup_into(&dir.join(file_name(now_ms())))?;
        prune(&dir);
        tracing::info!(file = %info.file, bytes = info.bytes, volumes = info.volumes,
            "controller database backed up");
        Ok(info)
    }

    /// Sends a copy of a backup to every other candidate (a node with the system pool).
    fn share(&self, info: &BackupInfo) {
        let bytes = match std::fs::read(&info.file) {
            Ok(b) => b,
            Err(e) => {
                return tracing::warn!(file = %info.file, error = %e, "backup not shared: cannot read it");
            }
        };
        let candidates: Vec<tandem_api::NodeName> = self.view(|s| {
            (s.model.pools.keys())
                .filter(|(node, pool)| {
                    pool.as_str() == crate::system::SYSTEM_POOL && node != &self.host
                })
                .map(|(node, _)| node.clone())
                .collect()
        });
        for node in candidates {
            let Some(client) = self.client(&node) else {
                continue;
            };
            if let Err(e) = client.put_backup(info.created_ms, bytes.clone()) {
                tracing::warn!(node = %node, error = %e, "backup not copied to a controller candidate");
            }
        }
    }

    /// A fresh backup, as bytes (the file made for it removed).
    pub fn backup_bytes(&self) -> Result<Vec<u8>, Refusal> {
        let path = self.data_dir.join(format!(
            "download-{}-{}{SUFFIX}",
            std::process::id(),
            now_ms()
        ));
        self.backup_into(&path)?;
        let bytes = std::fs::read(&path);
        let _ = std::fs::remove_file(&path);
        bytes.map_err(|e| {
            Refusal::new(
                RefusalKind::Internal,
                "cannot read the backup just made",
                "check the data directory of the controller node",
            )
            .with_cause(e)
        })
    }

    /// Backs up after changes and periodically, for the controller's life.
    pub(crate) fn start_backups(self: &Arc<Self>) {
        let c = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("db-backups".into())
            .spawn(move || {
                let mut seen = match c.upgrade() {
                    Some(c) => c.generation(),
                    None => return,
                };
                loop {
                    let Some(ctl) = c.upgrade() else { return };
                    let now = ctl.wait_change(seen, PERIOD);
                    if ctl.stopped() {
                        return;
                    }
                    // Let a burst of changes end, then back them up together.
                    let mut settled = now;
                    loop {
                        std::thread::sleep(QUIET);
                        let later = ctl.generation();
                        if later == settled {
                            break;
                        }
                        settled = later;
                    }
                    seen = settled;
                    match ctl.backup() {
                        Ok(info) => ctl.share(&info),
                        Err(e) => tracing::error!(error = %e.error, "automatic backup failed"),
                    }
                    drop(ctl);
                    std::thread::sleep(SPACING);
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the backup thread: no automatic backups");
        }
    }
}

fn file_name(created_ms: u64) -> String {
    format!("{PREFIX}{created_ms}{SUFFIX}")
}

/// Removes all but the newest [`KEEP`] backups in `dir`.
fn prune(dir: &Path) {
    let files = listed(dir);
    for old in files.iter().take(files.len().saturating_sub(KEEP)) {
        let _ = std::fs::remove_file(old);
    }
}

/// Keeps a copy of a backup a controller sent (this node is a candidate) in `dir`, once
/// it passes the same check as the controller's own.
pub fn receive(dir: &Path, created_ms: u64, bytes: &[u8]) -> Result<BackupInfo, StoreError> {
    let io = |e: std::io::Error| StoreError::Invalid(format!("{}: {e}", dir.display()));
    std::fs::create_dir_all(dir).map_err(io)?;
    let path = dir.join(file_name(created_ms));
    let tmp = path.with_extension("receiving");
    std::fs::write(&tmp, bytes).map_err(io)?;
    let checked = info_of(&tmp, created_ms).and_then(|info| {
        std::fs::rename(&tmp, &path).map_err(io)?;
        Ok(BackupInfo {
            file: path.display().to_string(),
            ..info
        })
    });
    if checked.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    prune(dir);
    checked
}

/// Makes the database in `data_dir` a copy of `backup`, once: the database replaced is
/// kept beside it (`controller.db.replaced-MS`), and a marker records the backup
/// restored, so a node started again with the same flag does not roll back again.
/// Whether it restored.
pub fn restore(data_dir: &Path, backup: &Path) -> Result<bool, StoreError> {
    let io = |what: &str, e: std::io::Error| StoreError::Invalid(format!("{what}: {e}"));
    Store::validate(backup)
        .map_err(|e| StoreError::Invalid(format!("backup {}: {e}", backup.display())))?;
    let bytes = std::fs::read(backup).map_err(|e| io(&backup.display().to_string(), e))?;
    let marker = data_dir.join("controller.db.restored");
    let stamp = format!("{} {} bytes", backup.display(), bytes.len());
    if std::fs::read_to_string(&marker).is_ok_and(|m| m.trim() == stamp) {
        return Ok(false);
    }
    std::fs::create_dir_all(data_dir).map_err(|e| io("creating the data directory", e))?;
    let db = data_dir.join("controller.db");
    let ms = now_ms();
    for ext in ["", "-wal", "-shm"] {
        let f = PathBuf::from(format!("{}{ext}", db.display()));
        if f.exists() {
            let aside = PathBuf::from(format!("{}.replaced-{ms}{ext}", db.display()));
            std::fs::rename(&f, &aside).map_err(|e| io("setting the old database aside", e))?;
        }
    }
    std::fs::write(&db, &bytes).map_err(|e| io("writing the restored database", e))?;
    std::fs::write(&marker, format!("{stamp}\n")).map_err(|e| io("writing the marker", e))?;
    Ok(true)
}
