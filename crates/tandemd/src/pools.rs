//! The node's storage pools: those given in the settings, opened at every start, and
//! those created through the API, remembered in `<data-dir>/pools.json` so that the
//! next start opens them again.

use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use anyhow::Context;
use tandem_api::{CreatePool, PoolInfo, PoolName, VolumeName};
use tandem_pool::{CacheMode, Entry, Pool, PoolError};

use crate::durable;

#[derive(Debug, thiserror::Error)]
pub enum PoolsError {
    #[error("pool {pool} does not exist on this node (its pools: {})", list(.pools))]
    Unknown {
        pool: PoolName,
        pools: Vec<PoolName>,
    },
    #[error("pool {0} already exists on this node")]
    Exists(PoolName),
    #[error(
        "pool {name} ({path}) is remembered from an earlier run but its directory could not be opened at this start"
    )]
    Unopened { name: PoolName, path: String },
    #[error("pool path {path:?} is not acceptable: {reason}")]
    BadPath { path: String, reason: String },
    #[error("pool path {path} {relation} the directory of pool {pool}")]
    PathInUse {
        path: String,
        relation: &'static str,
        pool: PoolName,
    },
    #[error("pool {pool} holds volumes: {}", list(.volumes))]
    NotEmpty {
        pool: PoolName,
        volumes: Vec<VolumeName>,
    },
    #[error(
        "pool {0} is given in tandemd's settings (--pool or the config file): it is opened again at every start"
    )]
    Configured(PoolName),
    #[error("cannot open pool {name} at {path}: {error}")]
    Open {
        name: PoolName,
        path: String,
        error: PoolError,
    },
    #[error("cannot remember the node's pools in {path}: {source}")]
    Store {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn list<T: std::fmt::Display>(items: &[T]) -> String {
    if items.is_empty() {
        return "none".into();
    }
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

struct Inner {
    /// Open pools: the configured ones first, in the settings' order, then the
    /// remembered ones in the order they were created.
    live: Vec<Arc<Pool>>,
    /// Names of the pools given in the settings.
    configured: Vec<PoolName>,
    /// `pools.json`: pools created through the API, including any that could not be
    /// opened at this start.
    remembered: Vec<CreatePool>,
}

pub struct Pools {
    file: PathBuf,
    cache: CacheMode,
    inner: RwLock<Inner>,
    /// Serialises pool creations and deletions.
    changes: Mutex<()>,
}

/// `path` with symbolic links resolved as far as it exists; the part that does not
/// exist yet is appended as given. `path` is absolute and has no `..`.
fn resolve(path: &Path) -> std::io::Result<PathBuf> {
    let mut missing = Vec::new();
    let mut at = path;
    loop {
        match at.canonicalize() {
            Ok(mut found) => {
                found.extend(missing.iter().rev());
                return Ok(found);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let (Some(parent), Some(name)) = (at.parent(), at.file_name()) else {
                    return Err(e);
                };
                missing.push(name);
                at = parent;
            }
            Err(e) => return Err(e),
        }
    }
}

fn pool_info(p: &Pool) -> PoolInfo {
    let stats = p.stats().unwrap_or(tandem_pool::PoolStats {
        capacity: 0,
        free: 0,
    });
    PoolInfo {
        name: p.name().clone(),
        kind: "file".into(),
        path: p.dir().display().to_string(),
        capacity: stats.capacity,
        free: stats.free,
        volumes: p.entries().len() as u32,
        reflink: p.reflink(),
    }
}

impl Pools {
    /// Opens the configured pools (any failure stops the start) and the remembered ones
    /// (a failure is logged and the pool left out until a start that can open it; a
    /// missing directory is not created again, as its file system may not be mounted).
    pub fn open(
        configured: &[(PoolName, PathBuf)],
        cache: CacheMode,
        data_dir: &Path,
    ) -> anyhow::Result<Pools> {
        let mut live = Vec::new();
        for (name, dir) in configured {
            let pool = Pool::open(name.clone(), dir, cache)?;
            tracing::info!(pool = %name, dir = %dir.display(), volumes = pool.entries().len(), "pool opened");
            live.push(Arc::new(pool));
        }
        let file = data_dir.join("pools.json");
        let remembered: Vec<CreatePool> = match durable::read(&file)
            .with_context(|| format!("cannot read {}", file.display()))?
        {
            None => Vec::new(),
            Some(bytes) => serde_json::from_slice(&bytes).with_context(|| {
                format!(
                    "the pools file {} is invalid; fix it or remove it while tandemd is stopped \
                         (the pool directories it names are not touched)",
                    file.display()
                )
            })?,
        };
        for p in &remembered {
            let dir = Path::new(&p.path);
            if live.iter().any(|l| l.name() == &p.name) {
                tracing::error!(pool = %p.name, dir = %p.path,
                    "a pool created through the API has the name of a pool in the settings; left out");
                continue;
            }
            if !dir.is_dir() {
                tracing::error!(pool = %p.name, dir = %p.path,
                    "pool directory is missing (file system not mounted?); left out until a restart finds it");
                continue;
            }
            match Pool::open(p.name.clone(), dir, cache) {
                Ok(pool) => {
                    tracing::info!(pool = %p.name, dir = %p.path, volumes = pool.entries().len(), "pool opened");
                    live.push(Arc::new(pool));
                }
                Err(e) => {
                    tracing::error!(pool = %p.name, dir = %p.path, error = %e, "pool not opened; left out");
                }
            }
        }
        Ok(Pools {
            file,
            cache,
            inner: RwLock::new(Inner {
                live,
                configured: configured.iter().map(|(n, _)| n.clone()).collect(),
                remembered,
            }),
            changes: Mutex::new(()),
        })
    }

    pub fn all(&self) -> Vec<Arc<Pool>> {
        self.inner.read().unwrap().live.clone()
    }

    pub fn names(&self) -> Vec<PoolName> {
        self.inner
            .read()
            .unwrap()
            .live
            .iter()
            .map(|p| p.name().clone())
            .collect()
    }

    /// The pool new volumes go to when none is named: the first in the settings.
    pub fn first(&self) -> Arc<Pool> {
        self.inner.read().unwrap().live[0].clone()
    }

    pub fn get(&self, name: &PoolName) -> Result<Arc<Pool>, PoolsError> {
        let inner = self.inner.read().unwrap();
        inner
            .live
            .iter()
            .find(|p| p.name() == name)
            .cloned()
            .ok_or_else(|| PoolsError::Unknown {
                pool: name.clone(),
                pools: inner.live.iter().map(|p| p.name().clone()).collect(),
            })
    }

    /// The pool holding volume `name`, and the volume.
    pub fn find_volume(&self, name: &VolumeName) -> Option<(Arc<Pool>, Entry)> {
        self.inner
            .read()
            .unwrap()
            .live
            .iter()
            .find_map(|p| p.get(name).map(|e| (p.clone(), e)))
    }

    pub fn infos(&self) -> Vec<PoolInfo> {
        self.all().iter().map(|p| pool_info(p)).collect()
    }

    fn store(&self, remembered: &[CreatePool]) -> Result<(), PoolsError> {
        let bytes = serde_json::to_vec_pretty(remembered).expect("serialisable");
        durable::write(&self.file, &bytes, 0o644).map_err(|source| PoolsError::Store {
            path: self.file.clone(),
            source,
        })
    }

    /// Creates a pool: its directory if missing (an existing one is opened with the
    /// volumes it holds), remembered for the next starts.
    pub fn create(&self, req: &CreatePool) -> Result<PoolInfo, PoolsError> {
        let bad = |reason: &str| PoolsError::BadPath {
            path: req.path.clone(),
            reason: reason.into(),
        };
        let given = Path::new(&req.path);
        if !given.is_absolute() {
            return Err(bad("give an absolute path"));
        }
        if given.components().any(|c| c == Component::ParentDir) {
            return Err(bad("give a path without '..'"));
        }
        // Normalised: no repeated or trailing slashes.
        let dir: PathBuf = given.components().collect();
        let _changing = self.changes.lock().unwrap();
        {
            let inner = self.inner.read().unwrap();
            if inner.live.iter().any(|p| p.name() == &req.name) {
                return Err(PoolsError::Exists(req.name.clone()));
            }
            if let Some(p) = inner.remembered.iter().find(|p| p.name == req.name) {
                return Err(PoolsError::Unopened {
                    name: p.name.clone(),
                    path: p.path.clone(),
                });
            }
            let wanted = resolve(&dir).map_err(|e| bad(&e.to_string()))?;
            let others = inner
                .live
                .iter()
                .map(|p| (p.name().clone(), p.dir().to_owned()))
                .chain(
                    inner
                        .remembered
                        .iter()
                        .map(|p| (p.name.clone(), PathBuf::from(&p.path))),
                );
            for (pool, other) in others {
                let Ok(other) = resolve(&other) else { continue };
                let relation = if other == wanted {
                    "is"
                } else if wanted.starts_with(&other) {
                    "is inside"
                } else if other.starts_with(&wanted) {
                    "contains"
                } else {
                    continue;
                };
                return Err(PoolsError::PathInUse {
                    path: dir.display().to_string(),
                    relation,
                    pool,
                });
            }
        }
        match std::fs::metadata(&dir) {
            Ok(m) if !m.is_dir() => return Err(bad("it exists and is not a directory")),
            _ => {}
        }
        let existed = dir.exists();
        let pool = Pool::open(req.name.clone(), &dir, self.cache).map_err(|error| {
            if !existed {
                // Leave nothing behind: the directory was ours.
                let _ = std::fs::remove_file(dir.join(".tandem-pool.lock"));
                let _ = std::fs::remove_dir(&dir);
            }
            PoolsError::Open {
                name: req.name.clone(),
                path: dir.display().to_string(),
                error,
            }
        })?;
        let pool = Arc::new(pool);
        let mut inner = self.inner.write().unwrap();
        let mut remembered = inner.remembered.clone();
        remembered.push(CreatePool {
            name: req.name.clone(),
            path: dir.display().to_string(),
        });
        self.store(&remembered)?;
        inner.remembered = remembered;
        inner.live.push(pool.clone());
        tracing::info!(pool = %req.name, dir = %dir.display(), volumes = pool.entries().len(), "pool created");
        Ok(pool_info(&pool))
    }

    /// Forgets a pool created through the API, which must hold no volume. Its directory
    /// stays. The caller keeps volumes from being created meanwhile.
    pub fn remove(&self, name: &PoolName) -> Result<(), PoolsError> {
        let _changing = self.changes.lock().unwrap();
        let mut inner = self.inner.write().unwrap();
        if inner.configured.contains(name) {
            return Err(PoolsError::Configured(name.clone()));
        }
        let live = inner.live.iter().position(|p| p.name() == name);
        let Some(remembered) = inner.remembered.iter().position(|p| &p.name == name) else {
            return Err(PoolsError::Unknown {
                pool: name.clone(),
                pools: inner.live.iter().map(|p| p.name().clone()).collect(),
            });
        };
        if let Some(i) = live {
            let volumes: Vec<VolumeName> = inner.live[i]
                .entries()
                .iter()
                .map(|e| match e {
                    Entry::Ready(v) => v.name().clone(),
                    Entry::Failed { name, .. } => name.clone(),
                })
                .collect();
            if !volumes.is_empty() {
                return Err(PoolsError::NotEmpty {
                    pool: name.clone(),
                    volumes,
                });
            }
        }
        let mut rest = inner.remembered.clone();
        rest.remove(remembered);
        self.store(&rest)?;
        inner.remembered = rest;
        if let Some(i) = live {
            inner.live.remove(i);
        }
        tracing::info!(pool = %name, "pool forgotten; its directory is left in place");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_follows_links_as_far_as_the_path_exists() {
        let base = std::env::temp_dir().join(format!("tandemd-resolve-{}", std::process::id()));
        std::fs::create_dir_all(base.join("real")).unwrap();
        let _ = std::fs::remove_file(base.join("link"));
        std::os::unix::fs::symlink(base.join("real"), base.join("link")).unwrap();
        let base = base.canonicalize().unwrap();
        assert_eq!(
            resolve(&base.join("link/a/b")).unwrap(),
            base.join("real/a/b")
        );
        assert_eq!(resolve(&base.join("link")).unwrap(), base.join("real"));
        std::fs::remove_dir_all(&base).unwrap();
    }
}
