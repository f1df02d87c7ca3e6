//! The Tandem cluster as the plugins use it: the controller's API for everything
//! cluster-wide, this host's node for its own name and NBD socket.

use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tandem_api::{
    ApiError, ClusterNode, ClusterPool, ClusterSnapshot, ClusterVolume, CreateClusterVolume, Group,
    GroupName, KvCondition, KvEntry, KvValue, NodeInfo, NodeName, OnNode, ResizeVolume,
    SnapshotChanges, SnapshotName, StoreName, VolumeName, encode_path,
};

use crate::error::XapiError;

/// One HTTP call to a Tandem API: the answer's body, or why there is none.
pub trait Transport: Send + Sync {
    fn call(&self, method: &str, path: &str, body: Option<String>) -> Result<String, ApiFailure>;
}

#[derive(Debug, Clone)]
pub struct ApiFailure {
    /// The HTTP status; `None` when the API could not be reached.
    pub status: Option<u16>,
    pub error: ApiError,
}

/// Cloned into the thread that renews an SR lock's lease.
#[derive(Clone)]
pub struct Tandem {
    controller: Arc<dyn Transport>,
    /// This host's node API; absent for tools that need only the controller.
    node: Option<Arc<dyn Transport>>,
}

fn decode<T: DeserializeOwned>(what: &str, text: &str) -> Result<T, XapiError> {
    serde_json::from_str(text).map_err(|e| {
        XapiError::backend(format!(
            "tandemd gave an unexpected answer to {what}: {e}; are tandemd and the plugin the same version?"
        ))
    })
}

impl Tandem {
    pub fn new(controller: Arc<dyn Transport>, node: Option<Arc<dyn Transport>>) -> Tandem {
        Tandem { controller, node }
    }

    fn call(&self, method: &str, path: &str, body: Option<String>) -> Result<String, ApiFailure> {
        self.controller.call(method, path, body)
    }

    fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, XapiError> {
        let text = self.call("GET", path, None).map_err(XapiError::from_api)?;
        decode(path, &text)
    }

    /// A GET whose 404 means "there is none".
    fn find<T: DeserializeOwned>(&self, path: &str) -> Result<Option<T>, XapiError> {
        match self.call("GET", path, None) {
            Ok(text) => decode(path, &text).map(Some),
            Err(f) if f.status == Some(404) => Ok(None),
            Err(f) => Err(XapiError::from_api(f)),
        }
    }

    fn send<B: Serialize, T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: &B,
    ) -> Result<T, XapiError> {
        let body = serde_json::to_string(body).expect("serialisable");
        let text = self
            .call(method, path, Some(body))
            .map_err(XapiError::from_api)?;
        decode(path, &text)
    }

    /// This host's node, as it describes itself.
    pub fn node(&self) -> Result<NodeInfo, XapiError> {
        let node = self.node.as_ref().ok_or_else(|| {
            XapiError::backend("this call needs the node API of this host (--api URL)")
        })?;
        let text = node
            .call("GET", "/v1/node", None)
            .map_err(XapiError::from_api)?;
        decode("/v1/node", &text)
    }

    pub fn nodes(&self) -> Result<Vec<ClusterNode>, XapiError> {
        self.get("/v1/nodes")
    }

    pub fn volume(&self, name: &VolumeName) -> Result<Option<ClusterVolume>, XapiError> {
        self.find(&format!("/v1/volumes/{name}"))
    }

    pub fn volumes(&self) -> Result<Vec<ClusterVolume>, XapiError> {
        self.get("/v1/volumes")
    }

    pub fn create_volume(&self, req: &CreateClusterVolume) -> Result<ClusterVolume, XapiError> {
        self.send("POST", "/v1/volumes", req)
    }

    /// Deletes a volume; `false` if there was none. Without force: refused while it has
    /// snapshots (one made outside xapi, say) or is open.
    pub fn delete_volume(&self, name: &VolumeName) -> Result<bool, XapiError> {
        gone(self.call("DELETE", &format!("/v1/volumes/{name}"), None))
    }

    pub fn resize_volume(&self, name: &VolumeName, size: u64) -> Result<ClusterVolume, XapiError> {
        self.send(
            "PATCH",
            &format!("/v1/volumes/{name}"),
            &ResizeVolume { size },
        )
    }

    pub fn attach(&self, name: &VolumeName, node: &NodeName) -> Result<ClusterVolume, XapiError> {
        let req = OnNode { node: node.clone() };
        self.send("POST", &format!("/v1/volumes/{name}/attach"), &req)
    }

    pub fn detach(&self, name: &VolumeName, node: &NodeName) -> Result<ClusterVolume, XapiError> {
        let req = OnNode { node: node.clone() };
        self.send("POST", &format!("/v1/volumes/{name}/detach"), &req)
    }

    pub fn snapshots(&self, volume: &VolumeName) -> Result<Vec<ClusterSnapshot>, XapiError> {
        Ok(self
            .find(&format!("/v1/volumes/{volume}/snapshots"))?
            .unwrap_or_default())
    }

    pub fn all_snapshots(&self) -> Result<Vec<ClusterSnapshot>, XapiError> {
        self.get("/v1/snapshots")
    }

    pub fn create_snapshot(
        &self,
        volume: &VolumeName,
        snap: &SnapshotName,
    ) -> Result<(), XapiError> {
        let req = serde_json::json!({ "name": snap });
        let _taken: serde_json::Value =
            self.send("POST", &format!("/v1/volumes/{volume}/snapshots"), &req)?;
        Ok(())
    }

    pub fn rollback(&self, volume: &VolumeName, snap: &SnapshotName) -> Result<(), XapiError> {
        let _done: serde_json::Value = self.send(
            "POST",
            &format!("/v1/volumes/{volume}/snapshots/{snap}/rollback"),
            &serde_json::json!({}),
        )?;
        Ok(())
    }

    /// Deletes a snapshot; `false` if there was none.
    pub fn delete_snapshot(
        &self,
        volume: &VolumeName,
        snap: &SnapshotName,
    ) -> Result<bool, XapiError> {
        gone(self.call(
            "DELETE",
            &format!("/v1/volumes/{volume}/snapshots/{snap}"),
            None,
        ))
    }

    pub fn clone_snapshot(
        &self,
        volume: &VolumeName,
        snap: &SnapshotName,
        new: &VolumeName,
    ) -> Result<ClusterVolume, XapiError> {
        let req = serde_json::json!({ "name": new });
        self.send(
            "POST",
            &format!("/v1/volumes/{volume}/snapshots/{snap}/clone"),
            &req,
        )
    }

    pub fn changes(
        &self,
        volume: &VolumeName,
        snap: &SnapshotName,
        since: &SnapshotName,
    ) -> Result<SnapshotChanges, XapiError> {
        self.get(&format!(
            "/v1/volumes/{volume}/snapshots/{snap}/changes?since={since}"
        ))
    }

    pub fn group(&self, name: &GroupName) -> Result<Option<Group>, XapiError> {
        self.find(&format!("/v1/groups/{name}"))
    }

    pub fn create_group(&self, group: &Group) -> Result<Group, XapiError> {
        self.send("POST", "/v1/groups", group)
    }

    pub fn delete_group(&self, name: &GroupName) -> Result<bool, XapiError> {
        gone(self.call("DELETE", &format!("/v1/groups/{name}"), None))
    }

    pub fn pools(&self) -> Result<Vec<ClusterPool>, XapiError> {
        self.get("/v1/pools")
    }

    pub fn kv_stores(&self) -> Result<Vec<StoreName>, XapiError> {
        self.get("/v1/kv")
    }

    pub fn kv_list(&self, store: &StoreName) -> Result<Vec<KvEntry>, XapiError> {
        self.get(&format!("/v1/kv/{store}"))
    }

    pub fn kv_get(&self, store: &StoreName, key: &str) -> Result<Option<String>, XapiError> {
        let entry: Option<KvEntry> = self.find(&format!("/v1/kv/{store}/{}", encode_path(key)))?;
        Ok(entry.map(|e| e.value))
    }

    /// Sets a key; with a condition, `false` if it did not hold (nothing changed).
    pub fn kv_set(
        &self,
        store: &StoreName,
        key: &str,
        value: &str,
        only_if: Option<KvCondition>,
    ) -> Result<bool, XapiError> {
        let req = KvValue {
            value: value.to_owned(),
            only_if,
        };
        let path = format!("/v1/kv/{store}/{}", encode_path(key));
        let body = serde_json::to_string(&req).expect("serialisable");
        match self.call("PUT", &path, Some(body)) {
            Ok(_) => Ok(true),
            Err(f) if f.status == Some(409) => Ok(false),
            Err(f) => Err(XapiError::from_api(f)),
        }
    }

    /// Deletes a key (with `if_value`, only if it holds that); `false` if it did not
    /// exist or held something else.
    pub fn kv_delete(
        &self,
        store: &StoreName,
        key: &str,
        if_value: Option<&str>,
    ) -> Result<bool, XapiError> {
        let mut path = format!("/v1/kv/{store}/{}", encode_path(key));
        if let Some(v) = if_value {
            path.push_str(&format!("?if-value={}", encode_path(v).replace('/', "%2F")));
        }
        match self.call("DELETE", &path, None) {
            Ok(_) => Ok(true),
            Err(f) if matches!(f.status, Some(404 | 409)) => Ok(false),
            Err(f) => Err(XapiError::from_api(f)),
        }
    }
}

/// The outcome of a DELETE: `false` when there was nothing to delete.
fn gone(result: Result<String, ApiFailure>) -> Result<bool, XapiError> {
    match result {
        Ok(_) => Ok(true),
        Err(f) if f.status == Some(404) => Ok(false),
        Err(f) => Err(XapiError::from_api(f)),
    }
}
