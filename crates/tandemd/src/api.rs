//! The node's HTTP+JSON API. Node-local routes live under `/v1/node/`, leaving `/v1/`
//! for the cluster-wide API the controller serves on the same port.

use std::sync::Arc;

use axum::extract::Query;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use tandem_api::{
    ApiError, CreatePool, CreateSnapshot, CreateVolume, JoinCluster, PoolName, Resolve, RollBack,
    SnapshotName, UpdateVolume, VolumeName, VolumeSpec,
};
use tandem_pool::PoolError;

use crate::candidate::Candidate;
use crate::cluster::{ClusterError, Controller, Refused};
use tandem_controller::http::{Failure, blocking};

use crate::node::{Node, NodeError};
use crate::pools::PoolsError;

type Shared = State<Arc<Node>>;

/// The node API, and the cluster API: served by the controller when this node (a
/// candidate) runs it, else forwarded to the node that does.
pub fn router(node: Arc<Node>, candidate: Option<Arc<Candidate>>) -> Router {
    Router::new()
        .route("/v1/node", get(node_info))
        .route("/v1/node/join", post(join))
        .route("/v1/node/leave", post(leave))
        .route("/v1/node/replicated", get(replicated))
        .route("/v1/node/pools", get(pools).post(create_pool))
        .route("/v1/node/pools/{name}", delete(delete_pool))
        .route("/v1/node/volumes", get(list).post(create))
        .route(
            "/v1/node/volumes/{name}",
            get(show).patch(update).delete(remove),
        )
        .route("/v1/node/volumes/{name}/spec", put(set_spec))
        .route("/v1/node/volumes/{name}/status", get(status))
        .route("/v1/node/volumes/{name}/events", get(volume_events))
        .route("/v1/node/events", get(node_events))
        .route("/v1/node/snapshots", get(all_snapshots))
        .route("/v1/node/volumes/{name}/resolve", post(resolve))
        .route("/v1/node/volumes/{name}/invalidate", post(invalidate))
        .route("/v1/node/volumes/{name}/trust", post(trust))
        .route("/v1/node/volumes/{name}/verify", post(verify))
        .route(
            "/v1/node/volumes/{name}/snapshots",
            get(snapshots).post(create_snapshot),
        )
        .route(
            "/v1/node/volumes/{name}/snapshots/{snapshot}",
            delete(delete_snapshot),
        )
        .route(
            "/v1/node/volumes/{name}/snapshots/{snapshot}/changes",
            get(changes),
        )
        .route(
            "/v1/node/volumes/{name}/snapshots/{snapshot}/rollback",
            post(roll_back),
        )
        .route("/v1/node/volumes/{name}/reconnect", post(reconnect))
        .route(
            "/v1/node/controller-backups/{created_ms}",
            put(receive_backup).layer(axum::extract::DefaultBodyLimit::max(
                tandem_controller::system::SYSTEM_SIZE as usize,
            )),
        )
        .fallback(move |state: Shared, req: Request| forward(state, candidate.clone(), req))
        .layer(middleware::from_fn_with_state(node.clone(), authenticate))
        .with_state(node)
}

/// Marks a request a node forwarded: it is not forwarded again (no loop between nodes
/// that each take the other for the controller).
const FORWARDED: &str = "x-tandem-forwarded-by";
/// The largest request body forwarded.
const FORWARD_LIMIT: usize = 64 << 20;

fn no_route(correction: &str) -> Response {
    Failure(
        StatusCode::NOT_FOUND,
        ApiError {
            message: "no such API route".into(),
            cause: None,
            correction: Some(correction.into()),
        },
    )
    .into_response()
}

/// Routes the node does not serve: the cluster API (`/v1/...` outside `/v1/node`, and
/// `/openapi.json`) is served by the controller when it runs on this node, else
/// forwarded to it, wherever it runs, so any node answers it.
async fn forward(State(node): Shared, candidate: Option<Arc<Candidate>>, req: Request) -> Response {
    let path = req.uri().path();
    let node_api = path == "/v1/node" || path.starts_with("/v1/node/");
    let cluster_api = (path.starts_with("/v1/") && !node_api) || path == "/openapi.json";
    if !cluster_api {
        return no_route(
            "node routes are under /v1/node/; the cluster API (/v1/volumes, /v1/nodes, ...) \
             is served by the controller, and forwarded to it by the nodes of its cluster",
        );
    }
    if let Some(c) = &candidate {
        if c.may_found() {
            let c = c.clone();
            if let Err(e) = blocking(move || c.found().map_err(founding_failed)).await {
                return e.into_response();
            }
        }
        if let Some(routes) = c.routes() {
            use tower::ServiceExt;
            return routes.oneshot(req).await.into_response();
        }
    }
    let no_controller = |why: String| {
        Failure(
            StatusCode::SERVICE_UNAVAILABLE,
            ApiError {
                message: format!("no controller: {why}"),
                cause: None,
                correction: Some(
                    "retry in a few seconds: a controller candidate takes over when a majority \
                     of them see each other"
                        .into(),
                ),
            },
        )
        .into_response()
    };
    // What this node knows of the election, when it is a candidate.
    let election = || {
        candidate
            .as_ref()
            .map_or_else(|| "election in progress".to_owned(), |c| c.election())
    };
    if req.headers().contains_key(FORWARDED) {
        // Sent here as to the controller, which this node no longer runs.
        return no_controller(format!(
            "node {} does not run it (any more); {}",
            node.name(),
            election()
        ));
    }
    let Some(controller) = node.controller() else {
        if candidate.is_some() {
            return no_controller(format!(
                "node {} is a candidate that knows no controller yet; {}",
                node.name(),
                election()
            ));
        }
        return Failure(
            StatusCode::SERVICE_UNAVAILABLE,
            ApiError {
                message: format!(
                    "node {} knows no controller: it has not been made part of a cluster yet",
                    node.name()
                ),
                cause: None,
                correction: Some(
                    "ask a node running tandemd --controller, or add this node to a cluster \
                     (tandem node create)"
                        .into(),
                ),
            },
        )
        .into_response();
    };
    let (parts, body) = req.into_parts();
    let body = match axum::body::to_bytes(body, FORWARD_LIMIT).await {
        Ok(b) => b,
        Err(e) => {
            return Failure(
                StatusCode::PAYLOAD_TOO_LARGE,
                ApiError {
                    message: format!("request body not read: {e}"),
                    cause: None,
                    correction: Some(format!("send at most {FORWARD_LIMIT} bytes")),
                },
            )
            .into_response();
        }
    };
    let name = node.name().to_string();
    let relayed = blocking(move || relay(&controller, &name, &parts, body.to_vec())).await;
    match relayed {
        Ok(response) => response,
        Err(failure) => failure.into_response(),
    }
}

fn founding_failed(e: anyhow::Error) -> Failure {
    Failure(
        StatusCode::INTERNAL_SERVER_ERROR,
        ApiError {
            message: "cannot found a cluster on this node".into(),
            cause: Some(format!("{e:#}")),
            correction: Some(
                "see the node's log; check its data directory (space, permissions)".into(),
            ),
        },
    )
}

/// Sends a request on to the controller and brings its answer back as it is.
fn relay(
    controller: &str,
    name: &str,
    parts: &axum::http::request::Parts,
    body: Vec<u8>,
) -> Result<Response, Failure> {
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let url = format!("http://{controller}{path}");
    let unreachable = |e: String| {
        Failure(
            StatusCode::SERVICE_UNAVAILABLE,
            ApiError {
                message: format!(
                    "no controller: the last one known, at {controller}, does not answer (tried by node {name}); election in progress if candidates remain"
                ),
                cause: Some(e),
                correction: Some(
                    "retry in a few seconds, or start tandemd --controller on a candidate".into(),
                ),
            },
        )
    };
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_connect(Some(std::time::Duration::from_secs(2)))
        .timeout_global(Some(std::time::Duration::from_secs(600)))
        .build()
        .into();
    let mut req = ureq::http::Request::builder()
        .method(parts.method.clone())
        .uri(&url)
        .header(FORWARDED, name);
    for h in [header::CONTENT_TYPE, header::AUTHORIZATION, header::ACCEPT] {
        if let Some(v) = parts.headers.get(&h) {
            req = req.header(h, v.clone());
        }
    }
    let req = req.body(body).map_err(|e| unreachable(e.to_string()))?;
    let mut answer = agent.run(req).map_err(|e| unreachable(e.to_string()))?;
    let status = answer.status();
    let content_type = answer.headers().get(header::CONTENT_TYPE).cloned();
    let bytes = answer
        .body_mut()
        .with_config()
        .limit(u64::MAX)
        .read_to_vec()
        .map_err(|e| unreachable(e.to_string()))?;
    let mut response = (status, bytes).into_response();
    if let Some(ct) = content_type {
        response.headers_mut().insert(header::CONTENT_TYPE, ct);
    }
    Ok(response)
}

/// A copy of a backup of the controller's database, from the controller (this node is
/// a controller candidate); kept once it passes the same check as the original.
async fn receive_backup(
    State(node): Shared,
    path: Result<Path<u64>, axum::extract::rejection::PathRejection>,
    body: axum::body::Bytes,
) -> Result<impl IntoResponse, Failure> {
    let Path(created_ms) = path.map_err(|e| {
        Failure::new(
            StatusCode::BAD_REQUEST,
            e.body_text(),
            "name the backup by its creation time in milliseconds since the epoch",
        )
    })?;
    let info = blocking(move || {
        node.receive_backup(created_ms, &body).map_err(|e| {
            Failure::new(
                StatusCode::BAD_REQUEST,
                format!("backup not kept: {e}"),
                "send a backup of the controller database that passes its checks",
            )
        })
    })
    .await?;
    Ok((StatusCode::CREATED, Json(info)))
}

/// Once the node has joined a cluster, its routes need the cluster secret
/// (`Authorization: Bearer SECRET`), apart from `GET /v1/node` and the join itself
/// (which carries the secret in its body).
async fn authenticate(State(node): Shared, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let node_route = path == "/v1/node" || path.starts_with("/v1/node/");
    let open = matches!(
        (req.method(), path),
        (&Method::GET | &Method::HEAD, "/v1/node") | (&Method::POST, "/v1/node/join")
    );
    if node_route && !open {
        let value = |name| req.headers().get(name).and_then(|v| v.to_str().ok());
        let authorization = value(header::AUTHORIZATION.as_str());
        // A controller's calls say which it is; other callers (an operator with the
        // secret) say nothing and are not fenced.
        let controller = match (
            value(tandem_controller::EPOCH_HEADER).map(str::parse::<u64>),
            value(tandem_controller::CONTROLLER_HEADER),
        ) {
            (Some(Ok(epoch)), Some(address)) => Some(Controller {
                epoch,
                address: address.to_owned(),
            }),
            (Some(Err(_)), _) => {
                return Failure(
                    StatusCode::BAD_REQUEST,
                    ApiError {
                        message: format!("{} is not a number", tandem_controller::EPOCH_HEADER),
                        cause: None,
                        correction: Some("send the controller epoch as a decimal number".into()),
                    },
                )
                .into_response();
            }
            _ => None,
        };
        match node.authorize_call(authorization, controller) {
            Ok(()) => {}
            Err(Refused::Stranger(cluster)) => {
                tracing::debug!(method = %req.method(), path, "API request without the cluster secret refused");
                let mut response = Failure(
                    StatusCode::UNAUTHORIZED,
                    ApiError {
                        message: format!(
                            "node {} belongs to cluster {cluster}; its API needs the cluster secret",
                            node.name()
                        ),
                        cause: None,
                        correction: Some("manage it through the cluster's controller".into()),
                    },
                )
                .into_response();
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                return response;
            }
            Err(Refused::Stale { epoch, newest }) => {
                return Failure(
                    StatusCode::CONFLICT,
                    ApiError {
                        message: format!(
                            "controller epoch {epoch} is older than {} (the controller at {}): this controller was replaced",
                            newest.epoch, newest.address
                        ),
                        cause: None,
                        correction: Some(
                            "stop this controller; the cluster is managed by the newer one".into(),
                        ),
                    },
                )
                .into_response();
            }
        }
    }
    next.run(req).await
}

impl From<NodeError> for Failure {
    fn from(e: NodeError) -> Self {
        let message = e.to_string();
        let (status, correction) = match &e {
            NodeError::BadSpec(_) => (StatusCode::BAD_REQUEST, "fix the spec and send it again".into()),
            NodeError::Refused(_) => (StatusCode::CONFLICT, "see the volume's status for why".into()),
            NodeError::SpecInUse(_) => (StatusCode::CONFLICT, "disconnect the NBD clients, then retry".into()),
            NodeError::NotReplicated(_) => (
                StatusCode::NOT_FOUND,
                "give the node the volume's spec with PUT /v1/node/volumes/NAME/spec".into(),
            ),
            NodeError::SpecStore { .. } => (StatusCode::INTERNAL_SERVER_ERROR, "check the data directory".into()),
            NodeError::Pools(p) => match p {
                PoolsError::Unknown { .. } => (StatusCode::NOT_FOUND, "list pools with GET /v1/node/pools".into()),
                PoolsError::Exists(_) => (StatusCode::CONFLICT, "choose another name".into()),
                PoolsError::Unopened { name, .. } => (
                    StatusCode::CONFLICT,
                    format!(
                        "restore its directory and restart tandemd, or forget it with DELETE /v1/node/pools/{name}"
                    ),
                ),
                PoolsError::BadPath { .. } => (
                    StatusCode::BAD_REQUEST,
                    "give the absolute path of a directory, e.g. /srv/tandem/fast".into(),
                ),
                PoolsError::PathInUse { .. } => {
                    (StatusCode::CONFLICT, "give each pool a directory of its own".into())
                }
                PoolsError::NotEmpty { .. } => (StatusCode::CONFLICT, "delete its volumes first".into()),
                PoolsError::Configured(_) => (
                    StatusCode::CONFLICT,
                    "remove it from tandemd's settings and restart tandemd".into(),
                ),
                PoolsError::Open {
                    error: PoolError::Locked { .. },
                    ..
                } => (StatusCode::CONFLICT, "give a directory no other tandemd uses".into()),
                PoolsError::Open { .. } => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "check that tandemd can create and write the directory".into(),
                ),
                PoolsError::Store { .. } => (StatusCode::INTERNAL_SERVER_ERROR, "check the data directory".into()),
            },
            NodeError::Cluster(c) => match c {
                ClusterError::BadSecret(_) => (
                    StatusCode::BAD_REQUEST,
                    format!(
                        "send a secret of {} to {} visible ASCII characters",
                        crate::cluster::MIN_SECRET_LEN,
                        crate::cluster::MAX_SECRET_LEN
                    ),
                ),
                ClusterError::OtherCluster { node, file, .. } => (
                    StatusCode::CONFLICT,
                    format!(
                        "to release the node, delete it from its cluster's controller (`tandem node delete {node}`), \
                         or remove {} while tandemd is stopped",
                        file.display()
                    ),
                ),
                ClusterError::Store { .. } => (StatusCode::INTERNAL_SERVER_ERROR, "check the data directory".into()),
            },
            NodeError::ExistsElsewhere { .. } => (StatusCode::CONFLICT, "choose another name".into()),
            NodeError::Pool(p) => match p {
                PoolError::NotFound { .. } => (StatusCode::NOT_FOUND, "list volumes with `tandem volume list`".into()),
                PoolError::Exists { .. } => (StatusCode::CONFLICT, "choose another name".into()),
                PoolError::FileInTheWay { .. } => (StatusCode::CONFLICT, "move the file away or choose another name".into()),
                PoolError::InUse { .. } => (StatusCode::CONFLICT, "disconnect the NBD clients, then retry".into()),
                PoolError::InvalidSize { .. } => {
                    (StatusCode::BAD_REQUEST, "give a size that is a multiple of 4K, e.g. 10G".into())
                }
                PoolError::Shrink { .. } => (
                    StatusCode::BAD_REQUEST,
                    "give a size at least the current one; to get a smaller volume, create a new one and copy".into(),
                ),
                PoolError::NoSpace { .. } => {
                    (StatusCode::INSUFFICIENT_STORAGE, "free space in the pool or use a thin volume".into())
                }
                PoolError::Failed { .. } => (
                    StatusCode::CONFLICT,
                    "inspect the volume's files in the pool directory; the daemon log says why they were refused".into(),
                ),
                PoolError::SnapshotNotFound { .. } => {
                    (StatusCode::NOT_FOUND, "list snapshots with `tandem snapshot list`".into())
                }
                PoolError::SnapshotExists { .. } => (StatusCode::CONFLICT, "choose another name".into()),
                PoolError::NoReflink { .. } => (
                    StatusCode::CONFLICT,
                    "put the pool on xfs (mkfs.xfs -m reflink=1) or btrfs".into(),
                ),
                _ => (StatusCode::INTERNAL_SERVER_ERROR, "see the tandemd log on this node".into()),
            },
        };
        Failure(
            status,
            ApiError {
                message,
                cause: None,
                correction: Some(correction),
            },
        )
    }
}

fn volume_name(raw: &str) -> Result<VolumeName, Failure> {
    path_name(raw)
}

/// A name taken from the request's path, checked as names are.
fn path_name<T: std::str::FromStr<Err = tandem_api::NameError>>(raw: &str) -> Result<T, Failure> {
    raw.parse().map_err(|e: tandem_api::NameError| {
        Failure(
            StatusCode::BAD_REQUEST,
            ApiError {
                message: e.to_string(),
                cause: None,
                correction: Some("use letters, digits, '_', '.', '-'".into()),
            },
        )
    })
}

async fn node_info(State(node): Shared) -> impl IntoResponse {
    Json(node.info())
}

async fn pools(State(node): Shared) -> impl IntoResponse {
    Json(node.pools())
}

/// Joins a cluster: from then on the API needs its secret.
async fn join(
    State(node): Shared,
    body: Result<Json<JoinCluster>, JsonRejection>,
) -> Result<impl IntoResponse, Failure> {
    let Json(req) = body?;
    Ok(Json(blocking(move || node.join(req)).await?))
}

/// Forgets the cluster (the controller deletes the node); any body is ignored.
async fn leave(State(node): Shared) -> Result<impl IntoResponse, Failure> {
    Ok(Json(blocking(move || node.leave()).await?))
}

/// Spec and status of every replicated volume on the node, by name.
async fn replicated(State(node): Shared) -> impl IntoResponse {
    Json(node.replica_reports())
}

async fn create_pool(
    State(node): Shared,
    body: Result<Json<CreatePool>, JsonRejection>,
) -> Result<impl IntoResponse, Failure> {
    let Json(req) = body?;
    let info = blocking(move || node.create_pool(&req)).await?;
    Ok((StatusCode::CREATED, Json(info)))
}

async fn delete_pool(
    State(node): Shared,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, Failure> {
    let name: PoolName = name.parse().map_err(|e: tandem_api::NameError| {
        Failure(
            StatusCode::BAD_REQUEST,
            ApiError {
                message: e.to_string(),
                cause: None,
                correction: Some("use letters, digits, '_', '.', '-'".into()),
            },
        )
    })?;
    blocking(move || node.delete_pool(&name)).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list(State(node): Shared) -> impl IntoResponse {
    Json(node.volumes())
}

async fn show(State(node): Shared, Path(name): Path<String>) -> Result<impl IntoResponse, Failure> {
    let name = volume_name(&name)?;
    Ok(Json(node.get(&name)?))
}

async fn create(
    State(node): Shared,
    body: Result<Json<CreateVolume>, JsonRejection>,
) -> Result<impl IntoResponse, Failure> {
    let Json(req) = body?;
    let info = blocking(move || node.create(&req)).await?;
    Ok((StatusCode::CREATED, Json(info)))
}

async fn update(
    State(node): Shared,
    Path(name): Path<String>,
    body: Result<Json<UpdateVolume>, JsonRejection>,
) -> Result<impl IntoResponse, Failure> {
    let name = volume_name(&name)?;
    let Json(change) = body?;
    Ok(Json(blocking(move || node.update(&name, &change)).await?))
}

async fn remove(
    State(node): Shared,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, Failure> {
    let name = volume_name(&name)?;
    blocking(move || node.delete(&name)).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn set_spec(
    State(node): Shared,
    Path(name): Path<String>,
    body: Result<Json<VolumeSpec>, JsonRejection>,
) -> Result<impl IntoResponse, Failure> {
    let name = volume_name(&name)?;
    let Json(spec) = body?;
    if spec.name != name {
        return Err(Failure(
            StatusCode::BAD_REQUEST,
            ApiError {
                message: format!("spec names volume {}, the route names {name}", spec.name),
                cause: None,
                correction: Some("send the spec to /v1/node/volumes/<its name>/spec".into()),
            },
        ));
    }
    Ok(Json(
        blocking(move || {
            node.check_placement(&spec)?;
            node.set_spec(spec)
        })
        .await?,
    ))
}

#[derive(serde::Deserialize)]
struct StatusQuery {
    #[serde(default)]
    format: Option<String>,
}

/// A replicated volume's status: JSON, or `?format=text` for the drbdadm-like form.
async fn status(
    State(node): Shared,
    Path(name): Path<String>,
    Query(query): Query<StatusQuery>,
) -> Result<Response, Failure> {
    let name = volume_name(&name)?;
    let status = node.status(&name)?;
    Ok(match query.format.as_deref() {
        Some("text") => status.to_string().into_response(),
        _ => Json(status).into_response(),
    })
}

async fn resolve(
    State(node): Shared,
    Path(name): Path<String>,
    body: Result<Json<Resolve>, JsonRejection>,
) -> Result<impl IntoResponse, Failure> {
    let name = volume_name(&name)?;
    let Json(req) = body?;
    Ok(Json(
        blocking(move || node.resolve(&name, &req.discard)).await?,
    ))
}

async fn invalidate(
    State(node): Shared,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, Failure> {
    let name = volume_name(&name)?;
    Ok(Json(blocking(move || node.invalidate(&name)).await?))
}

async fn trust(
    State(node): Shared,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, Failure> {
    let name = volume_name(&name)?;
    Ok(Json(blocking(move || node.trust(&name)).await?))
}

/// Runs online verify; answers the number of differing 4 KiB blocks per peer.
async fn verify(
    State(node): Shared,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, Failure> {
    let name = volume_name(&name)?;
    let report = blocking(move || node.verify(&name)).await?;
    let peers: Vec<_> = report
        .into_iter()
        .map(|(node, blocks)| serde_json::json!({ "node": node, "differing-blocks": blocks }))
        .collect();
    Ok(Json(serde_json::json!({ "peers": peers })))
}

async fn snapshots(
    State(node): Shared,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, Failure> {
    let name = volume_name(&name)?;
    Ok(Json(node.snapshots(&name)?))
}

async fn all_snapshots(State(node): Shared) -> impl IntoResponse {
    Json(node.all_snapshots())
}

/// Takes a snapshot on every replica this node reaches (see [`Node::snapshot`]).
async fn create_snapshot(
    State(node): Shared,
    Path(name): Path<String>,
    body: Result<Json<CreateSnapshot>, JsonRejection>,
) -> Result<impl IntoResponse, Failure> {
    let name = volume_name(&name)?;
    let Json(req) = body?;
    let taken = blocking(move || node.snapshot(&name, &req.name)).await?;
    Ok((StatusCode::CREATED, Json(taken)))
}

#[derive(serde::Deserialize)]
struct Since {
    since: String,
}

/// The blocks changed between snapshot `since` and this one (`?since=OLDER`).
async fn changes(
    State(node): Shared,
    Path((name, snapshot)): Path<(String, String)>,
    query: Result<Query<Since>, axum::extract::rejection::QueryRejection>,
) -> Result<impl IntoResponse, Failure> {
    let (name, snapshot) = (volume_name(&name)?, path_name::<SnapshotName>(&snapshot)?);
    let Query(q) = query.map_err(|e| {
        Failure::new(
            StatusCode::BAD_REQUEST,
            e.body_text(),
            "give the older snapshot: ?since=NAME",
        )
    })?;
    let since = path_name::<SnapshotName>(&q.since)?;
    Ok(Json(
        blocking(move || node.changes(&name, &snapshot, &since)).await?,
    ))
}

/// Rolls this node's part of the volume back to a snapshot (the controller does it on
/// every participant, with one generation).
async fn roll_back(
    State(node): Shared,
    Path((name, snapshot)): Path<(String, String)>,
    body: Result<Json<RollBack>, JsonRejection>,
) -> Result<impl IntoResponse, Failure> {
    let (name, snapshot) = (volume_name(&name)?, path_name::<SnapshotName>(&snapshot)?);
    let Json(req) = body?;
    Ok(Json(
        blocking(move || node.roll_back(&name, &snapshot, req.generation)).await?,
    ))
}

async fn reconnect(
    State(node): Shared,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, Failure> {
    let name = volume_name(&name)?;
    Ok(Json(blocking(move || node.reconnect(&name)).await?))
}

async fn delete_snapshot(
    State(node): Shared,
    Path((name, snapshot)): Path<(String, String)>,
) -> Result<impl IntoResponse, Failure> {
    let (name, snapshot) = (volume_name(&name)?, path_name::<SnapshotName>(&snapshot)?);
    blocking(move || node.delete_snapshot(&name, &snapshot)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Server-sent events: the volume's status each time it changes, starting with the
/// current one.
async fn volume_events(State(node): Shared, Path(name): Path<String>) -> Result<Response, Failure> {
    let name = volume_name(&name)?;
    node.status(&name)?;
    Ok(crate::events::one(node, name))
}

/// Server-sent events: every replicated volume's status each time it changes.
async fn node_events(State(node): Shared) -> Response {
    crate::events::all(node)
}
