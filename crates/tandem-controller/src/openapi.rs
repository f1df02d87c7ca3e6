//! The OpenAPI 3.0 description of the cluster API, served at `/openapi.json`.

use serde_json::{Map, Value, json};

/// One operation: method, path, summary, request body schema, success status and
/// response schema (`None`: no body).
type Operation = (
    &'static str,
    &'static str,
    &'static str,
    Option<&'static str>,
    u16,
    Option<Value>,
);

fn schema(name: &str) -> Value {
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

fn list(name: &str) -> Value {
    json!({ "type": "array", "items": schema(name) })
}

fn operations() -> Vec<Operation> {
    vec![
        (
            "get",
            "/v1/cluster",
            "The cluster's id and controller",
            None,
            200,
            Some(schema("ClusterInfo")),
        ),
        (
            "get",
            "/v1/cluster/backup",
            "A fresh backup of the controller's database (an SQLite file, application/vnd.sqlite3)",
            None,
            200,
            None,
        ),
        (
            "get",
            "/v1/health",
            "Problems that need attention, worst severity first",
            None,
            200,
            Some(schema("Health")),
        ),
        (
            "get",
            "/v1/nodes",
            "List nodes",
            None,
            200,
            Some(list("Node")),
        ),
        (
            "post",
            "/v1/nodes",
            "Add a running tandemd to the cluster",
            Some("CreateNode"),
            201,
            Some(schema("Node")),
        ),
        (
            "get",
            "/v1/nodes/{node}",
            "Show a node",
            None,
            200,
            Some(schema("Node")),
        ),
        (
            "delete",
            "/v1/nodes/{node}",
            "Remove a node (?force=true even if it holds the only UpToDate replica of a volume)",
            None,
            204,
            None,
        ),
        (
            "post",
            "/v1/nodes/{node}/pools",
            "Create a storage pool on a node",
            Some("CreatePool"),
            201,
            Some(schema("Pool")),
        ),
        (
            "delete",
            "/v1/nodes/{node}/pools/{pool}",
            "Delete an empty storage pool",
            None,
            204,
            None,
        ),
        (
            "get",
            "/v1/pools",
            "List the pools of every node",
            None,
            200,
            Some(list("Pool")),
        ),
        (
            "get",
            "/v1/groups",
            "List resource groups",
            None,
            200,
            Some(list("Group")),
        ),
        (
            "post",
            "/v1/groups",
            "Create a resource group",
            Some("Group"),
            201,
            Some(schema("Group")),
        ),
        (
            "get",
            "/v1/groups/{group}",
            "Show a resource group",
            None,
            200,
            Some(schema("Group")),
        ),
        (
            "delete",
            "/v1/groups/{group}",
            "Delete an unused resource group",
            None,
            204,
            None,
        ),
        (
            "get",
            "/v1/volumes",
            "List volumes with the state of every participant (?all=true: with the system volume holding the controller's database)",
            None,
            200,
            Some(list("Volume")),
        ),
        (
            "post",
            "/v1/volumes",
            "Create and place a volume",
            Some("CreateVolume"),
            201,
            Some(schema("Volume")),
        ),
        (
            "get",
            "/v1/volumes/{volume}",
            "Show a volume",
            None,
            200,
            Some(schema("Volume")),
        ),
        (
            "patch",
            "/v1/volumes/{volume}",
            "Grow a volume on every replica",
            Some("ResizeVolume"),
            200,
            Some(schema("Volume")),
        ),
        (
            "delete",
            "/v1/volumes/{volume}",
            "Delete a volume (?force=true even while open or with snapshots; ?orphan=true: \
             have the nodes delete the volumes of that name the controller has no record of, \
             202)",
            None,
            204,
            None,
        ),
        (
            "post",
            "/v1/volumes/{volume}/adopt",
            "Take into the model a volume nodes hold that the controller has no record of",
            None,
            200,
            Some(schema("Volume")),
        ),
        (
            "get",
            "/v1/volumes/{volume}/status",
            "Replication status as a node sees it (?format=text for the drbdadm-like text)",
            None,
            200,
            Some(json!({"type": "object"})),
        ),
        (
            "post",
            "/v1/volumes/{volume}/attach",
            "Make a volume usable over NBD on a node",
            Some("OnNode"),
            200,
            Some(schema("Volume")),
        ),
        (
            "post",
            "/v1/volumes/{volume}/detach",
            "Stop using a volume on a node",
            Some("OnNode"),
            200,
            Some(schema("Volume")),
        ),
        (
            "post",
            "/v1/volumes/{volume}/replicas",
            "Add or remove a diskful replica",
            Some("ChangeReplicas"),
            200,
            Some(schema("Volume")),
        ),
        (
            "post",
            "/v1/volumes/{volume}/trust",
            "Declare the replica on a node whole as it is, when no replica is (every disk failed in turn, then was repaired): the node refuses any but the replica that held the data last",
            Some("OnNode"),
            200,
            Some(schema("Volume")),
        ),
        (
            "post",
            "/v1/volumes/{volume}/resolve",
            "End a split brain, or a replica refused as unrelated data: the replica on the node named gives up its data and is resynced in full from the others; refused unless another replica is UpToDate",
            Some("OnNode"),
            200,
            Some(schema("Volume")),
        ),
        (
            "post",
            "/v1/volumes/{volume}/verify",
            "Compare replicas by checksum; differences are resynced",
            None,
            200,
            Some(json!({"type": "object"})),
        ),
        (
            "get",
            "/v1/snapshots",
            "List every volume's snapshots",
            None,
            200,
            Some(list("Snapshot")),
        ),
        (
            "get",
            "/v1/volumes/{volume}/snapshots",
            "List a volume's snapshots and the nodes holding each",
            None,
            200,
            Some(list("Snapshot")),
        ),
        (
            "post",
            "/v1/volumes/{volume}/snapshots",
            "Take a snapshot at one point of the write order on every replica reached; read it over NBD as VOLUME@SNAPSHOT",
            Some("CreateSnapshot"),
            201,
            Some(schema("SnapshotTaken")),
        ),
        (
            "get",
            "/v1/volumes/{volume}/snapshots/{snapshot}/changes",
            "The extents changed between snapshot ?since=OLDER and this one (what an incremental backup copies)",
            None,
            200,
            Some(schema("SnapshotChanges")),
        ),
        (
            "post",
            "/v1/volumes/{volume}/snapshots/{snapshot}/clone",
            "A new volume, a copy of the snapshot (its replicas share the snapshot's blocks where it is held)",
            Some("CloneSnapshot"),
            201,
            Some(schema("Volume")),
        ),
        (
            "post",
            "/v1/volumes/{volume}/snapshots/{snapshot}/rollback",
            "Put the volume back as it was at the snapshot, on every replica (closed everywhere, every participant online)",
            None,
            200,
            Some(schema("Volume")),
        ),
        (
            "delete",
            "/v1/volumes/{volume}/snapshots/{snapshot}",
            "Delete a snapshot: its record at once, each node's copy now or, for a node that does not answer, when it is next visited",
            None,
            204,
            None,
        ),
        (
            "get",
            "/v1/kv",
            "List the key-value stores holding at least one key",
            None,
            200,
            Some(json!({"type": "array", "items": {"type": "string"}})),
        ),
        (
            "get",
            "/v1/kv/{store}",
            "List the keys of a key-value store",
            None,
            200,
            Some(list("KvEntry")),
        ),
        (
            "get",
            "/v1/kv/{store}/{key}",
            "Read a key",
            None,
            200,
            Some(schema("KvEntry")),
        ),
        (
            "put",
            "/v1/kv/{store}/{key}",
            "Set a key (with only-if: only if it is absent or holds a value; 409 otherwise)",
            Some("KvValue"),
            200,
            Some(schema("KvEntry")),
        ),
        (
            "delete",
            "/v1/kv/{store}/{key}",
            "Delete a key (with ?if-value=V: only if it holds V; 409 otherwise)",
            None,
            204,
            None,
        ),
    ]
}

fn object(required: &[&str], properties: Value) -> Value {
    json!({ "type": "object", "required": required, "properties": properties })
}

fn schemas() -> Value {
    let name = json!({ "type": "string", "pattern": "^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$" });
    let size = json!({ "type": "integer", "format": "int64", "minimum": 4096, "description": "bytes, a multiple of 4096" });
    let kind = json!({ "type": "string", "enum": ["diskful", "diskless", "tiebreaker"] });
    json!({
        "Error": object(&["message"], json!({
            "message": {"type": "string"}, "cause": {"type": "string"}, "correction": {"type": "string"}})),
        "ClusterInfo": object(&["cluster-id", "controller", "version", "epoch"], json!({
            "cluster-id": {"type": "string"}, "controller": name, "version": {"type": "string"},
            "epoch": {"type": "integer"},
            "candidates": {"type": "array", "items": name},
            "database": schema("Volume"),
            "last-backup": object(&["file", "created-ms", "bytes", "volumes"], json!({
                "file": {"type": "string"}, "created-ms": {"type": "integer"},
                "bytes": {"type": "integer"}, "volumes": {"type": "integer"}}))})),
        "Finding": object(&["severity", "object", "message", "correction"], json!({
            "severity": {"type": "string", "enum": ["Ok", "Warning", "Error"]},
            "object": {"type": "string"}, "message": {"type": "string"}, "correction": {"type": "string"}})),
        "Health": object(&["severity", "findings"], json!({
            "severity": {"type": "string", "enum": ["Ok", "Warning", "Error"]},
            "findings": list("Finding")})),
        "CreateNode": object(&["name", "address"], json!({
            "name": name, "address": {"type": "string", "description": "the node's API address, host:port"}})),
        "Node": object(&["name", "address", "state", "participants"], json!({
            "name": name, "address": {"type": "string"},
            "state": {"type": "string", "enum": ["Online", "Offline", "Connecting", "VersionMismatch"]},
            "version": {"type": "string"}, "error": {"type": "string"},
            "participants": {"type": "integer"}})),
        "CreatePool": object(&["name", "path"], json!({
            "name": name, "path": {"type": "string", "description": "absolute directory on the node"}})),
        "Pool": object(&["node", "name", "kind", "path", "replicas", "provisioned"], json!({
            "node": name, "name": name, "kind": {"type": "string", "enum": ["file"]}, "path": {"type": "string"},
            "capacity": {"type": "integer"}, "free": {"type": "integer"},
            "replicas": {"type": "integer"}, "provisioned": {"type": "integer"},
            "snapshots": {"type": "boolean", "description": "the pool's file system shares blocks (reflink)"}})),
        "Group": object(&["name"], json!({
            "name": name, "replicas": {"type": "integer", "minimum": 1, "maximum": 31, "default": 2},
            "pool": {"type": "string", "default": "default"},
            "nodes": {"type": "array", "items": name, "description": "only these nodes hold replicas"},
            "quorum": {"type": "string", "enum": ["majority", "off"], "default": "majority"},
            "on-no-quorum": {"type": "string", "enum": ["io-error", "suspend-io"], "default": "io-error"}})),
        "CreateVolume": object(&["name", "size"], json!({
            "name": name, "size": size, "replicas": {"type": "integer", "minimum": 1, "maximum": 31},
            "group": name})),
        "ResizeVolume": object(&["size"], json!({ "size": size })),
        "OnNode": object(&["node"], json!({ "node": name })),
        "ChangeReplicas": json!({ "type": "object", "description": "exactly one of add and remove",
            "properties": { "add": name, "remove": name } }),
        "Participant": object(&["node", "node-id", "kind", "attached", "open"], json!({
            "node": name, "node-id": {"type": "integer", "minimum": 0, "maximum": 31}, "kind": kind,
            "pool": name, "attached": {"type": "boolean"},
            "disk": {"type": "string", "enum": ["UpToDate", "Inconsistent", "Outdated", "Diskless", "Failed", "DUnknown"]},
            "role": {"type": "string", "enum": ["Primary", "Secondary"]},
            "replication": {"type": "string"}, "done": {"type": "number"},
            "open": {"type": "boolean"}, "quorum": {"type": "boolean"}, "error": {"type": "string"}})),
        "Volume": object(&["name", "id", "size", "group", "replicas", "state", "participants"], json!({
            "name": name, "id": {"type": "string"}, "size": size, "group": name,
            "replicas": {"type": "integer"},
            "state": {"type": "string", "enum": ["Failed", "SplitBrain", "NoQuorum", "Degraded", "Syncing", "Creating", "UpToDate"]},
            "participants": list("Participant")})),
        "CreateSnapshot": object(&["name"], json!({ "name": name })),
        "CloneSnapshot": object(&["name"], json!({ "name": name })),
        "Snapshot": object(&["volume", "name", "created", "size", "replicas"], json!({
            "volume": name, "name": name, "created": {"type": "integer", "description": "seconds since the Unix epoch"},
            "size": size, "replicas": {"type": "array", "items": name}})),
        "SnapshotTaken": object(&["snapshot", "replicas", "missing", "paused-us"], json!({
            "snapshot": object(&["volume", "name", "size", "created"], json!({
                "volume": name, "name": name, "size": size, "created": {"type": "integer"}})),
            "replicas": {"type": "array", "items": name},
            "missing": {"type": "array", "items": object(&["node", "reason"], json!({"node": name, "reason": {"type": "string"}}))},
            "paused-us": {"type": "integer", "description": "how long new writes waited, in microseconds"}})),
        "SnapshotChanges": object(&["volume", "snapshot", "since", "node", "granularity", "changed-bytes", "extents"], json!({
            "volume": name, "snapshot": name, "since": name, "node": name,
            "granularity": {"type": "integer"}, "changed-bytes": {"type": "integer"},
            "extents": {"type": "array", "items": object(&["offset", "length"], json!({
                "offset": {"type": "integer"}, "length": {"type": "integer"}}))}})),
        "KvValue": object(&["value"], json!({
            "value": {"type": "string"},
            "only-if": {"oneOf": [
                {"type": "string", "enum": ["absent"]},
                object(&["value"], json!({ "value": {"type": "string"} })),
            ]},
        })),
        "KvEntry": object(&["store", "key", "value"], json!({
            "store": name, "key": {"type": "string"}, "value": {"type": "string"}})),
    })
}

pub fn document() -> Value {
    let mut paths = Map::new();
    for (method, path, summary, body, status, response) in operations() {
        let parameters: Vec<Value> = path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{')?.strip_suffix('}'))
            .map(|p| json!({"name": p, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        let mut op = json!({
            "summary": summary,
            "parameters": parameters,
            "responses": {
                status.to_string(): match &response {
                    Some(s) => json!({"description": "success", "content": {"application/json": {"schema": s}}}),
                    None => json!({"description": "success"}),
                },
                "default": {"description": "error", "content": {"application/json": {"schema": schema("Error")}}},
            },
        });
        if let Some(body) = body {
            op["requestBody"] = json!({"required": true, "content": {"application/json": {"schema": schema(body)}}});
        }
        paths
            .entry(path)
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .expect("object")
            .insert(method.into(), op);
    }
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "Tandem cluster API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Nodes, pools, resource groups, volumes, snapshots and key-value stores of a Tandem cluster. Errors are {message, cause, correction}.",
        },
        "paths": paths,
        "components": { "schemas": schemas() },
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_referenced_schema_exists() {
        let doc = super::document();
        let text = doc.to_string();
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        for piece in text.split("#/components/schemas/").skip(1) {
            let name = piece.split('"').next().unwrap();
            assert!(
                schemas.contains_key(name),
                "{name} is referenced but not defined"
            );
        }
        assert!(doc["paths"]["/v1/volumes/{volume}"]["patch"]["requestBody"].is_object());
    }
}
