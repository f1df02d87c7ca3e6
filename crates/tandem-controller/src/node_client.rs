//! The controller's calls to a node's API (`/v1/node/...`), authenticated with the
//! cluster secret.

use std::time::Duration;

use crate::model::Caller;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tandem_api::{
    ApiError, NodeInfo, NodeName, ReplicaReport, Resolve, VolumeEvent, VolumeName, VolumeSpec,
    VolumeStatus,
};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Creating a replica syncs metadata to disk; a few seconds is plenty.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    /// The node could not be reached or answered something that is not its API.
    #[error("{0}")]
    Unreachable(String),
    /// The node answered with an error.
    #[error("{}", .1)]
    Refused(u16, ApiError),
}

pub struct NodeClient {
    base: String,
    /// Told to the node with every call: the secret, the controller's own API address
    /// (the node forwards the cluster API there), its epoch (the node refuses older).
    caller: Caller,
    agent: ureq::Agent,
}

/// The header carrying the controller's API address (`host:port`) on its calls to nodes.
pub const CONTROLLER_HEADER: &str = "x-tandem-controller";
/// The header carrying the controller's epoch on its calls to nodes.
pub const EPOCH_HEADER: &str = "x-tandem-epoch";

impl NodeClient {
    pub fn new(address: &str, caller: Caller) -> NodeClient {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(CONNECT_TIMEOUT))
            .timeout_global(Some(REQUEST_TIMEOUT))
            .build()
            .into();
        NodeClient {
            base: format!("http://{address}"),
            caller,
            agent,
        }
    }

    /// Sends a request with `agent`; the response, whatever its status.
    fn request(
        &self,
        agent: &ureq::Agent,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<ureq::http::Response<ureq::Body>, CallError> {
        let url = format!("{}{path}", self.base);
        let unreachable = |e: String| CallError::Unreachable(format!("{method} {url}: {e}"));
        let req = ureq::http::Request::builder()
            .method(method)
            .uri(&url)
            .header("content-type", "application/json")
            .header("authorization", format!("Bearer {}", self.caller.secret))
            .header(CONTROLLER_HEADER, &self.caller.controller)
            .header(EPOCH_HEADER, self.caller.epoch.to_string())
            .body(body.unwrap_or_default())
            .map_err(|e| unreachable(e.to_string()))?;
        agent.run(req).map_err(|e| unreachable(e.to_string()))
    }

    fn call(&self, method: &str, path: &str, body: Option<String>) -> Result<String, CallError> {
        self.call_bytes(method, path, body.map(String::into_bytes))
    }

    fn call_bytes(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<String, CallError> {
        let mut resp = self.request(&self.agent, method, path, body)?;
        let url = format!("{}{path}", self.base);
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .read_to_string()
            .map_err(|e| CallError::Unreachable(format!("{method} {url}: {e}")))?;
        if status >= 400 {
            let error = serde_json::from_str::<ApiError>(&text).unwrap_or(ApiError {
                message: format!("HTTP {status} from {url}"),
                cause: Some(text),
                correction: None,
            });
            return Err(CallError::Refused(status, error));
        }
        Ok(text)
    }

    fn json<T: DeserializeOwned>(&self, text: &str) -> Result<T, CallError> {
        serde_json::from_str(text).map_err(|e| {
            CallError::Unreachable(format!(
                "{} answered something that is not the tandemd node API: {e}",
                self.base
            ))
        })
    }

    fn send<B: Serialize, T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: &B,
    ) -> Result<T, CallError> {
        let text = self.call(
            method,
            path,
            Some(serde_json::to_string(body).expect("serialisable")),
        )?;
        self.json(&text)
    }

    /// Gives a candidate a copy of a backup of the controller's database, made at
    /// `created_ms`.
    pub fn put_backup(&self, created_ms: u64, bytes: Vec<u8>) -> Result<(), CallError> {
        let path = format!("/v1/node/controller-backups/{created_ms}");
        self.call_bytes("PUT", &path, Some(bytes)).map(drop)
    }

    pub fn info(&self) -> Result<NodeInfo, CallError> {
        let text = self.call("GET", "/v1/node", None)?;
        self.json(&text)
    }

    pub fn join(&self, join: &tandem_api::JoinCluster) -> Result<NodeInfo, CallError> {
        self.send("POST", "/v1/node/join", join)
    }

    pub fn leave(&self) -> Result<(), CallError> {
        self.call("POST", "/v1/node/leave", Some("{}".into()))
            .map(|_| ())
    }

    pub fn replicated(&self) -> Result<Vec<ReplicaReport>, CallError> {
        let text = self.call("GET", "/v1/node/replicated", None)?;
        self.json(&text)
    }

    pub fn put_spec(&self, spec: &VolumeSpec) -> Result<VolumeStatus, CallError> {
        self.send("PUT", &format!("/v1/node/volumes/{}/spec", spec.name), spec)
    }

    /// Deletes the node's part of a volume; one it does not have counts as deleted.
    pub fn delete_volume(&self, name: &VolumeName) -> Result<(), CallError> {
        match self.call("DELETE", &format!("/v1/node/volumes/{name}"), None) {
            Err(CallError::Refused(404, _)) | Ok(_) => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub fn create_pool(
        &self,
        pool: &tandem_api::CreatePool,
    ) -> Result<tandem_api::PoolInfo, CallError> {
        self.send("POST", "/v1/node/pools", pool)
    }

    pub fn delete_pool(&self, name: &tandem_api::PoolName) -> Result<(), CallError> {
        self.call("DELETE", &format!("/v1/node/pools/{name}"), None)
            .map(|_| ())
    }

    /// The volume's status on this node, as JSON or as the drbdadm-like text.
    pub fn status(&self, name: &VolumeName, text: bool) -> Result<String, CallError> {
        let query = if text { "?format=text" } else { "" };
        self.call(
            "GET",
            &format!("/v1/node/volumes/{name}/status{query}"),
            None,
        )
    }

    pub fn create_snapshot(
        &self,
        name: &VolumeName,
        snapshot: &tandem_api::SnapshotName,
    ) -> Result<tandem_api::SnapshotTaken, CallError> {
        let body = tandem_api::CreateSnapshot {
            name: snapshot.clone(),
        };
        self.send("POST", &format!("/v1/node/volumes/{name}/snapshots"), &body)
    }

    pub fn changes(
        &self,
        name: &VolumeName,
        snapshot: &tandem_api::SnapshotName,
        since: &tandem_api::SnapshotName,
    ) -> Result<tandem_api::SnapshotChanges, CallError> {
        let path = format!("/v1/node/volumes/{name}/snapshots/{snapshot}/changes?since={since}");
        let text = self.call("GET", &path, None)?;
        self.json(&text)
    }

    pub fn roll_back(
        &self,
        name: &VolumeName,
        snapshot: &tandem_api::SnapshotName,
        generation: u64,
    ) -> Result<VolumeStatus, CallError> {
        let path = format!("/v1/node/volumes/{name}/snapshots/{snapshot}/rollback");
        self.send("POST", &path, &tandem_api::RollBack { generation })
    }

    pub fn reconnect(&self, name: &VolumeName) -> Result<VolumeStatus, CallError> {
        self.send("POST", &format!("/v1/node/volumes/{name}/reconnect"), &())
    }

    /// Deletes the node's copy of a snapshot; one it does not have counts as deleted.
    /// Every snapshot the node's replicas hold.
    pub fn snapshots(&self) -> Result<Vec<tandem_api::SnapshotInfo>, CallError> {
        let text = self.call("GET", "/v1/node/snapshots", None)?;
        self.json(&text)
    }

    pub fn delete_snapshot(
        &self,
        name: &VolumeName,
        snapshot: &tandem_api::SnapshotName,
    ) -> Result<(), CallError> {
        let path = format!("/v1/node/volumes/{name}/snapshots/{snapshot}");
        match self.call("DELETE", &path, None) {
            Err(CallError::Refused(404, _)) | Ok(_) => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub fn trust(&self, name: &VolumeName) -> Result<VolumeStatus, CallError> {
        self.send("POST", &format!("/v1/node/volumes/{name}/trust"), &())
    }

    pub fn resolve(
        &self,
        name: &VolumeName,
        discard: &NodeName,
    ) -> Result<VolumeStatus, CallError> {
        let req = Resolve {
            discard: discard.clone(),
        };
        self.send("POST", &format!("/v1/node/volumes/{name}/resolve"), &req)
    }

    pub fn verify(&self, name: &VolumeName) -> Result<serde_json::Value, CallError> {
        self.send("POST", &format!("/v1/node/volumes/{name}/verify"), &())
    }

    /// Follows the node's event stream (`GET /v1/node/events`): `on_event` gets each
    /// event until it returns false, the stream ends, or nothing at all (the node sends
    /// a keep-alive every few seconds) arrives for `silence`.
    pub fn follow(
        &self,
        silence: Duration,
        mut on_event: impl FnMut(VolumeEvent) -> bool,
    ) -> Result<(), CallError> {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(CONNECT_TIMEOUT))
            .timeout_per_read(Some(silence))
            .build()
            .into();
        let mut resp = self.request(&agent, "GET", "/v1/node/events", None)?;
        let status = resp.status().as_u16();
        let lost = |e: std::io::Error| {
            CallError::Unreachable(format!("event stream of {}: {e}", self.base))
        };
        if status != 200 {
            return Err(CallError::Unreachable(format!(
                "event stream of {}: HTTP {status}",
                self.base
            )));
        }
        let reader = std::io::BufReader::new(resp.body_mut().as_reader());
        let mut parser = crate::follow::SseParser::default();
        for line in std::io::BufRead::lines(reader) {
            let Some((kind, data)) = parser.line(&line.map_err(lost)?) else {
                continue;
            };
            if kind != "volume" {
                continue;
            }
            let event: VolumeEvent = self.json(&data)?;
            if !on_event(event) {
                return Ok(());
            }
        }
        Ok(())
    }
}
