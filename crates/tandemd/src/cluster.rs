//! The cluster this node has joined, kept in `<data-dir>/cluster.json`: its id and the
//! secret its controller authenticates with. A node that never joined answers anyone;
//! a joined node answers its API only to requests carrying the secret.

use std::path::{Path, PathBuf};
use std::sync::RwLock;

use anyhow::Context;
use tandem_api::{ClusterId, JoinCluster};

use crate::durable;

/// Shortest secret a node accepts.
pub const MIN_SECRET_LEN: usize = 32;
/// Longest secret a node accepts (it travels in a header of every request).
pub const MAX_SECRET_LEN: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("the cluster secret is not acceptable: {0}")]
    BadSecret(String),
    /// Already a member of another cluster (or of this one under another secret).
    #[error("node {node} already belongs to cluster {cluster}{}", if *.same_id { " (the secret differs)" } else { "" })]
    OtherCluster {
        node: String,
        cluster: ClusterId,
        same_id: bool,
        /// `cluster.json`, which records the membership.
        file: PathBuf,
    },
    #[error("cannot store the cluster membership in {path}: {source}")]
    Store {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Why a secret is refused, if it is.
pub fn check_secret(secret: &str) -> Result<(), String> {
    let n = secret.chars().count();
    if n < MIN_SECRET_LEN {
        return Err(format!(
            "it has {n} characters; a secret has at least {MIN_SECRET_LEN}"
        ));
    }
    if n > MAX_SECRET_LEN {
        return Err(format!(
            "it has {n} characters; a secret has at most {MAX_SECRET_LEN}"
        ));
    }
    if !secret.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(
            "it may only contain visible ASCII characters (no spaces), as it is sent in an HTTP header"
                .into(),
        );
    }
    Ok(())
}

pub struct Membership {
    path: PathBuf,
    current: RwLock<Option<JoinCluster>>,
    /// `<data-dir>/controller`: the newest controller that called (`EPOCH ADDRESS`).
    controller_path: PathBuf,
    controller: RwLock<Option<Controller>>,
}

/// The newest controller that called: its epoch and API address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Controller {
    pub epoch: u64,
    pub address: String,
}

impl Controller {
    fn parse(text: &str) -> Option<Controller> {
        let (epoch, address) = text.trim().split_once(' ')?;
        Some(Controller {
            epoch: epoch.parse().ok()?,
            address: address.to_owned(),
        })
    }
}

/// Why a call to the node API is refused.
#[derive(Debug)]
pub enum Refused {
    /// The node belongs to this cluster and the call lacks its secret.
    Stranger(ClusterId),
    /// From a controller older than one that has called since (deposed, or stale).
    Stale { epoch: u64, newest: Controller },
}

impl Membership {
    /// Reads `<data_dir>/cluster.json`, if the node has joined a cluster.
    pub fn load(data_dir: &Path) -> anyhow::Result<Membership> {
        let path = data_dir.join("cluster.json");
        let fix = || {
            format!(
                "if this node should leave its cluster, remove {} while tandemd is stopped",
                path.display()
            )
        };
        let current = match durable::read(&path)
            .with_context(|| format!("cannot read {}", path.display()))?
        {
            None => None,
            Some(bytes) => {
                let joined: JoinCluster = serde_json::from_slice(&bytes).with_context(|| {
                    format!(
                        "cluster membership {} is invalid; {}",
                        path.display(),
                        fix()
                    )
                })?;
                check_secret(&joined.secret).map_err(|e| {
                    anyhow::anyhow!(
                        "cluster membership {}: the secret is not acceptable ({e}); {}",
                        path.display(),
                        fix()
                    )
                })?;
                tracing::info!(cluster = %joined.cluster_id, "member of a cluster: the node API needs its secret");
                Some(joined)
            }
        };
        let controller_path = data_dir.join("controller");
        let controller = durable::read(&controller_path)
            .with_context(|| format!("cannot read {}", controller_path.display()))?
            .and_then(|b| Controller::parse(&String::from_utf8_lossy(&b)));
        Ok(Membership {
            path,
            current: RwLock::new(current),
            controller_path,
            controller: RwLock::new(controller),
        })
    }

    /// The newest controller that called, if any.
    pub fn controller(&self) -> Option<Controller> {
        self.controller.read().unwrap().clone()
    }

    /// Checks a call of a controller (one that carried the cluster secret) against the
    /// newest seen: an older epoch is refused; a newer one is remembered, across
    /// restarts (where the node forwards the cluster API, which epochs it refuses).
    pub fn check_controller(&self, called: Controller) -> Result<(), Refused> {
        let mut newest = self.controller.write().unwrap();
        match newest.as_ref() {
            Some(n) if called.epoch < n.epoch => {
                tracing::warn!(epoch = called.epoch, newest = n.epoch, from = %called.address,
                    "call from a deposed controller refused");
                return Err(Refused::Stale {
                    epoch: called.epoch,
                    newest: n.clone(),
                });
            }
            Some(n) if *n == called => return Ok(()),
            _ => {}
        }
        let text = format!("{} {}\n", called.epoch, called.address);
        if let Err(e) = durable::write(&self.controller_path, text.as_bytes(), 0o644) {
            tracing::warn!(error = %e, path = %self.controller_path.display(),
                "cannot store the controller's epoch and address; kept in memory");
        }
        tracing::info!(epoch = called.epoch, controller = %called.address, "controller of the cluster");
        *newest = Some(called);
        Ok(())
    }

    pub fn cluster_id(&self) -> Option<ClusterId> {
        self.current.read().unwrap().as_ref().map(|j| j.cluster_id)
    }

    /// Joins `req`'s cluster; joining the same cluster with the same secret again changes
    /// nothing. `node` names this node in errors.
    pub fn join(&self, node: &str, req: JoinCluster) -> Result<(), ClusterError> {
        check_secret(&req.secret).map_err(ClusterError::BadSecret)?;
        let mut current = self.current.write().unwrap();
        if let Some(joined) = current.as_ref() {
            let same_id = joined.cluster_id == req.cluster_id;
            if same_id && tandem_controller::http::same_secret(&req.secret, &joined.secret) {
                return Ok(());
            }
            return Err(ClusterError::OtherCluster {
                node: node.to_owned(),
                cluster: joined.cluster_id,
                same_id,
                file: self.path.clone(),
            });
        }
        let bytes = serde_json::to_vec_pretty(&req).expect("serialisable");
        durable::write(&self.path, &bytes, 0o600).map_err(|source| ClusterError::Store {
            path: self.path.clone(),
            source,
        })?;
        tracing::info!(cluster = %req.cluster_id, "joined a cluster: the node API now needs its secret");
        *current = Some(req);
        Ok(())
    }

    /// Forgets the cluster; the cluster it was a member of, if any.
    pub fn leave(&self) -> Result<Option<ClusterId>, ClusterError> {
        let mut current = self.current.write().unwrap();
        durable::remove(&self.path).map_err(|source| ClusterError::Store {
            path: self.path.clone(),
            source,
        })?;
        let left = current.take().map(|j| j.cluster_id);
        if let Some(id) = left {
            tracing::info!(cluster = %id, "left the cluster: the node API is open again");
        }
        Ok(left)
    }

    /// Whether a request with this `Authorization` header may use the node API: always
    /// on a node that has not joined a cluster; else `Err` with the cluster's id unless
    /// the header carries its secret. Whether it carried the secret (`false` on a node
    /// that has not joined a cluster).
    pub fn authorize_member(&self, header: Option<&str>) -> Result<bool, ClusterId> {
        let current = self.current.read().unwrap();
        let Some(joined) = current.as_ref() else {
            return Ok(false);
        };
        if tandem_controller::http::authorized(header, &joined.secret) {
            Ok(true)
        } else {
            Err(joined.cluster_id)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_must_be_long_and_printable() {
        assert!(check_secret(&"x".repeat(32)).is_ok());
        assert!(check_secret(&"x".repeat(31)).is_err());
        assert!(check_secret(&format!("{} y", "x".repeat(32))).is_err());
        assert!(check_secret(&"é".repeat(40)).is_err());
        assert!(check_secret(&"x".repeat(MAX_SECRET_LEN + 1)).is_err());
    }
}
