//! The node role: this host's pools and the volumes in them.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tandem_api::{
    CreateVolume, NodeInfo, NodeName, PoolInfo, PoolName, UpdateVolume, VolumeInfo, VolumeName,
};
use tandem_pool::{CacheMode, Entry, Pool, PoolError, Volume};

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("pool {0} does not exist on this node")]
    UnknownPool(PoolName),
    #[error("volume {name} already exists in pool {pool}")]
    ExistsElsewhere { name: VolumeName, pool: PoolName },
    #[error(transparent)]
    Pool(#[from] PoolError),
}

pub struct Node {
    name: NodeName,
    pools: Vec<Pool>,
    /// Serialises creations so a name stays unique across pools.
    creating: Mutex<()>,
}

impl Node {
    pub fn open(
        name: NodeName,
        pools: &[(PoolName, PathBuf)],
        cache: CacheMode,
    ) -> Result<Node, PoolError> {
        let pools = pools
            .iter()
            .map(|(name, dir)| {
                let pool = Pool::open(name.clone(), dir, cache)?;
                tracing::info!(pool = %name, dir = %dir.display(), volumes = pool.entries().len(), "pool opened");
                Ok(pool)
            })
            .collect::<Result<Vec<_>, PoolError>>()?;
        Ok(Node {
            name,
            pools,
            creating: Mutex::new(()),
        })
    }

    pub fn name(&self) -> &NodeName {
        &self.name
    }

    fn find(&self, name: &VolumeName) -> Option<(&Pool, Entry)> {
        self.pools.iter().find_map(|p| p.get(name).map(|e| (p, e)))
    }

    /// The volume, if it exists and is usable.
    pub fn volume(&self, name: &VolumeName) -> Result<Arc<Volume>, PoolError> {
        match self.find(name) {
            Some((_, Entry::Ready(v))) => Ok(v),
            Some((_, Entry::Failed { error, .. })) => Err(PoolError::Failed {
                name: name.clone(),
                error,
            }),
            None => Err(PoolError::NotFound { name: name.clone() }),
        }
    }

    pub fn info(&self) -> NodeInfo {
        NodeInfo {
            name: self.name.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            pools: self.pools(),
        }
    }

    pub fn pools(&self) -> Vec<PoolInfo> {
        self.pools
            .iter()
            .map(|p| {
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
                }
            })
            .collect()
    }

    pub fn volumes(&self) -> Vec<VolumeInfo> {
        let mut all: Vec<VolumeInfo> = self
            .pools
            .iter()
            .flat_map(|p| p.entries().into_iter().map(|e| e.info(p.name())))
            .collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    pub fn get(&self, name: &VolumeName) -> Result<VolumeInfo, NodeError> {
        let (pool, entry) = self
            .find(name)
            .ok_or_else(|| PoolError::NotFound { name: name.clone() })?;
        Ok(entry.info(pool.name()))
    }

    pub fn create(&self, req: &CreateVolume) -> Result<VolumeInfo, NodeError> {
        let pool_name = req
            .pool
            .clone()
            .unwrap_or_else(|| self.pools[0].name().clone());
        let pool = self
            .pools
            .iter()
            .find(|p| *p.name() == pool_name)
            .ok_or_else(|| NodeError::UnknownPool(pool_name.clone()))?;
        let _guard = self.creating.lock().unwrap();
        if let Some((other, _)) = self.find(&req.name) {
            return Err(NodeError::ExistsElsewhere {
                name: req.name.clone(),
                pool: other.name().clone(),
            });
        }
        Ok(pool.create(&req.name, req.size, req.thick)?.info())
    }

    pub fn update(
        &self,
        name: &VolumeName,
        change: &UpdateVolume,
    ) -> Result<VolumeInfo, NodeError> {
        let (pool, entry) = self
            .find(name)
            .ok_or_else(|| PoolError::NotFound { name: name.clone() })?;
        let volume = match entry {
            Entry::Ready(v) => v,
            Entry::Failed { error, .. } => {
                return Err(PoolError::Failed {
                    name: name.clone(),
                    error,
                }
                .into());
            }
        };
        volume.update(change.size, change.read_only, || Ok(pool.stats()?.free))?;
        Ok(volume.info())
    }

    pub fn delete(&self, name: &VolumeName) -> Result<(), NodeError> {
        let (pool, _) = self
            .find(name)
            .ok_or_else(|| PoolError::NotFound { name: name.clone() })?;
        Ok(pool.delete(name)?)
    }
}
