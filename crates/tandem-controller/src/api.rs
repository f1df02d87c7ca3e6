//! The cluster API under `/v1/` and its OpenAPI document at `/openapi.json`.

use std::sync::Arc;

use axum::extract::Request;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use tandem_api::{
    ChangeReplicas, CloneSnapshot, CreateClusterVolume, CreateNode, CreatePool, CreateSnapshot,
    Group, GroupName, KvValue, NodeName, OnNode, PoolName, ResizeVolume, SnapshotName, StoreName,
    VolumeName,
};

use crate::controller::{Controller, Refusal, RefusalKind};
use crate::http::{Failure, authorized, blocking};

type Shared = State<Arc<Controller>>;

/// The routes of the cluster API; with `token`, every route but `/openapi.json` needs
/// it as a bearer token.
pub fn router(controller: Arc<Controller>, token: Option<String>) -> Router {
    let api = routes(controller);
    let api = match token {
        None => api,
        Some(token) => {
            let token: Arc<str> = token.into();
            api.layer(axum::middleware::from_fn(move |req, next| {
                require_token(token.clone(), req, next)
            }))
        }
    };
    Router::new()
        .route("/openapi.json", get(openapi))
        .merge(api)
        .fallback(|| async {
            Failure::new(
                StatusCode::NOT_FOUND,
                "no such API route",
                "the cluster API's routes are listed in /openapi.json; node routes are under /v1/node/",
            )
        })
}

async fn require_token(token: Arc<str>, req: Request, next: Next) -> Response {
    let header = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if authorized(header, &token) {
        return next.run(req).await;
    }
    let mut response = Failure::new(
        StatusCode::UNAUTHORIZED,
        "the cluster API needs its access token",
        "give it to the CLI in TANDEM_TOKEN, or send `Authorization: Bearer TOKEN`",
    )
    .into_response();
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

fn routes(controller: Arc<Controller>) -> Router {
    Router::new()
        .route("/v1/cluster", get(cluster))
        .route("/v1/cluster/backup", get(backup))
        .route("/v1/health", get(health))
        .route("/v1/nodes", get(nodes).post(create_node))
        .route("/v1/nodes/{node}", get(node).delete(delete_node))
        .route("/v1/nodes/{node}/pools", post(create_pool))
        .route(
            "/v1/nodes/{node}/pools/{pool}",
            axum::routing::delete(delete_pool),
        )
        .route("/v1/pools", get(pools))
        .route("/v1/groups", get(groups).post(create_group))
        .route("/v1/groups/{group}", get(group).delete(delete_group))
        .route("/v1/volumes", get(volumes).post(create_volume))
        .route(
            "/v1/volumes/{volume}",
            get(volume).patch(resize_volume).delete(delete_volume),
        )
        .route("/v1/volumes/{volume}/status", get(status))
        .route("/v1/volumes/{volume}/attach", on_node(Controller::attach))
        .route("/v1/volumes/{volume}/detach", on_node(Controller::detach))
        .route("/v1/volumes/{volume}/adopt", post(adopt))
        .route("/v1/volumes/{volume}/replicas", post(replicas))
        .route("/v1/volumes/{volume}/verify", post(verify))
        .route("/v1/volumes/{volume}/trust", on_node(Controller::trust))
        .route("/v1/volumes/{volume}/resolve", on_node(Controller::resolve))
        .route("/v1/snapshots", get(all_snapshots))
        .route(
            "/v1/volumes/{volume}/snapshots",
            get(snapshots).post(create_snapshot),
        )
        .route(
            "/v1/volumes/{volume}/snapshots/{snapshot}",
            axum::routing::delete(delete_snapshot),
        )
        .route(
            "/v1/volumes/{volume}/snapshots/{snapshot}/changes",
            get(snapshot_changes),
        )
        .route(
            "/v1/volumes/{volume}/snapshots/{snapshot}/clone",
            post(clone_snapshot),
        )
        .route(
            "/v1/volumes/{volume}/snapshots/{snapshot}/rollback",
            post(rollback_snapshot),
        )
        .route("/v1/kv", get(kv_stores))
        .route("/v1/kv/{store}", get(kv_list))
        .route(
            "/v1/kv/{store}/{*key}",
            get(kv_get).put(kv_set).delete(kv_delete),
        )
        .with_state(controller)
}

impl From<Refusal> for Failure {
    fn from(r: Refusal) -> Self {
        let status = match r.kind {
            RefusalKind::BadRequest => StatusCode::BAD_REQUEST,
            RefusalKind::NotFound => StatusCode::NOT_FOUND,
            RefusalKind::Conflict => StatusCode::CONFLICT,
            RefusalKind::Unreachable => StatusCode::BAD_GATEWAY,
            RefusalKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            RefusalKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Failure(status, r.error)
    }
}

#[derive(Deserialize)]
struct Force {
    #[serde(default)]
    force: bool,
}

#[derive(Deserialize)]
struct Format {
    #[serde(default)]
    format: Option<String>,
}

async fn openapi() -> impl IntoResponse {
    Json(crate::openapi::document())
}

async fn cluster(State(c): Shared) -> impl IntoResponse {
    Json(c.info())
}

/// A fresh, checked backup of the controller's database: an SQLite file.
async fn backup(State(c): Shared) -> Result<impl IntoResponse, Failure> {
    let bytes = blocking(move || c.backup_bytes()).await?;
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/vnd.sqlite3"),
        )],
        bytes,
    ))
}

async fn health(State(c): Shared) -> impl IntoResponse {
    Json(c.health())
}

async fn nodes(State(c): Shared) -> impl IntoResponse {
    Json(c.view(|s| s.nodes()))
}

async fn node(
    State(c): Shared,
    path: Result<Path<NodeName>, PathRejection>,
) -> Result<impl IntoResponse, Failure> {
    let Path(name) = path?;
    Ok(Json(c.node(&name)?))
}

async fn create_node(
    State(c): Shared,
    body: Result<Json<CreateNode>, JsonRejection>,
) -> Result<impl IntoResponse, Failure> {
    let Json(req) = body?;
    let node = blocking(move || c.create_node(&req)).await?;
    Ok((StatusCode::CREATED, Json(node)))
}

async fn delete_node(
    State(c): Shared,
    path: Result<Path<NodeName>, PathRejection>,
    Query(q): Query<Force>,
) -> Result<impl IntoResponse, Failure> {
    let Path(name) = path?;
    blocking(move || c.delete_node(&name, q.force)).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn pools(State(c): Shared) -> impl IntoResponse {
    Json(c.view(|s| s.pools()))
}

async fn create_pool(
    State(c): Shared,
    path: Result<Path<NodeName>, PathRejection>,
    body: Result<Json<CreatePool>, JsonRejection>,
) -> Result<impl IntoResponse, Failure> {
    let Path(node) = path?;
    let Json(req) = body?;
    let pool = blocking(move || c.create_pool(&node, &req)).await?;
    Ok((StatusCode::CREATED, Json(pool)))
}

async fn delete_pool(
    State(c): Shared,
    path: Result<Path<(NodeName, PoolName)>, PathRejection>,
) -> Result<impl IntoResponse, Failure> {
    let Path((node, pool)) = path?;
    blocking(move || c.delete_pool(&node, &pool)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The operators' groups (the system volume's own is left out).
async fn groups(State(c): Shared) -> impl IntoResponse {
    Json(c.view(|s| {
        (s.model.groups.values())
            .filter(|g| g.name.as_str() != crate::system::SYSTEM_POOL)
            .cloned()
            .collect::<Vec<_>>()
    }))
}

async fn group(
    State(c): Shared,
    path: Result<Path<GroupName>, PathRejection>,
) -> Result<impl IntoResponse, Failure> {
    let Path(name) = path?;
    c.view(|s| s.model.groups.get(&name).cloned())
        .map(Json)
        .ok_or_else(|| {
            Refusal::new(
                RefusalKind::NotFound,
                format!("group {name} does not exist"),
                "list groups with `tandem group list`",
            )
            .into()
        })
}

async fn create_group(
    State(c): Shared,
    body: Result<Json<Group>, JsonRejection>,
) -> Result<impl IntoResponse, Failure> {
    let Json(group) = body?;
    let group = blocking(move || c.create_group(&group)).await?;
    Ok((StatusCode::CREATED, Json(group)))
}

async fn delete_group(
    State(c): Shared,
    path: Result<Path<GroupName>, PathRejection>,
) -> Result<impl IntoResponse, Failure> {
    let Path(name) = path?;
    blocking(move || c.delete_group(&name)).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ListVolumes {
    /// Include the system volume (the controller's database).
    #[serde(default)]
    all: bool,
}

async fn volumes(
    State(c): Shared,
    query: Result<Query<ListVolumes>, QueryRejection>,
) -> Result<impl IntoResponse, Failure> {
    let Query(q) = query.map_err(|e| {
        Failure::new(
            StatusCode::BAD_REQUEST,
            e.body_text(),
            "the only parameter is all=true (include the system volume)",
        )
    })?;
    let mut volumes = c.view(|s| s.volumes());
    if !q.all {
        volumes.retain(|v| !crate::system::is_system(&v.name));
    }
    Ok(Json(volumes))
}

async fn volume(
    State(c): Shared,
    path: Result<Path<VolumeName>, PathRejection>,
) -> Result<impl IntoResponse, Failure> {
    let Path(name) = path?;
    Ok(Json(c.volume(&name)?))
}

async fn create_volume(
    State(c): Shared,
    body: Result<Json<CreateClusterVolume>, JsonRejection>,
) -> Result<impl IntoResponse, Failure> {
    let Json(req) = body?;
    let volume = blocking(move || c.create_volume(&req)).await?;
    Ok((StatusCode::CREATED, Json(volume)))
}

async fn resize_volume(
    State(c): Shared,
    path: Result<Path<VolumeName>, PathRejection>,
    body: Result<Json<ResizeVolume>, JsonRejection>,
) -> Result<impl IntoResponse, Failure> {
    let Path(name) = path?;
    let Json(req) = body?;
    Ok(Json(
        blocking(move || c.resize_volume(&name, req.size)).await?,
    ))
}

/// `?force=true`: even while open or with snapshots; `?orphan=true`: the volumes of
/// that name nodes hold and the controller has no record of.
#[derive(Deserialize)]
struct DeleteVolume {
    #[serde(default)]
    force: bool,
    #[serde(default)]
    orphan: bool,
}

async fn delete_volume(
    State(c): Shared,
    path: Result<Path<VolumeName>, PathRejection>,
    Query(q): Query<DeleteVolume>,
) -> Result<impl IntoResponse, Failure> {
    let Path(name) = path?;
    if q.orphan {
        blocking(move || c.delete_orphan(&name)).await?;
        return Ok(StatusCode::ACCEPTED);
    }
    blocking(move || c.delete_volume(&name, q.force)).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn adopt(
    State(c): Shared,
    path: Result<Path<VolumeName>, PathRejection>,
) -> Result<impl IntoResponse, Failure> {
    let Path(name) = path?;
    Ok(Json(blocking(move || c.adopt_volume(&name)).await?))
}

async fn status(
    State(c): Shared,
    path: Result<Path<VolumeName>, PathRejection>,
    Query(q): Query<Format>,
) -> Result<Response, Failure> {
    let Path(name) = path?;
    let text = q.format.as_deref() == Some("text");
    let body = blocking(move || c.status(&name, text)).await?;
    Ok(if text {
        body.into_response()
    } else {
        (
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response()
    })
}

/// `POST` on a volume's route whose body names a node: `op` on the controller.
fn on_node(
    op: fn(&Controller, &VolumeName, &NodeName) -> Result<tandem_api::ClusterVolume, Refusal>,
) -> MethodRouter<Arc<Controller>> {
    post(
        move |State(c): Shared,
              path: Result<Path<VolumeName>, PathRejection>,
              body: Result<Json<OnNode>, JsonRejection>| async move {
            let Path(name) = path?;
            let Json(req) = body?;
            Ok::<_, Failure>(Json(blocking(move || op(&c, &name, &req.node)).await?))
        },
    )
}

async fn replicas(
    State(c): Shared,
    path: Result<Path<VolumeName>, PathRejection>,
    body: Result<Json<ChangeReplicas>, JsonRejection>,
) -> Result<impl IntoResponse, Failure> {
    let Path(name) = path?;
    let Json(req) = body?;
    Ok(Json(
        blocking(move || c.change_replicas(&name, &req)).await?,
    ))
}

async fn verify(
    State(c): Shared,
    path: Result<Path<VolumeName>, PathRejection>,
) -> Result<impl IntoResponse, Failure> {
    let Path(name) = path?;
    Ok(Json(blocking(move || c.verify(&name)).await?))
}

async fn all_snapshots(State(c): Shared) -> Result<impl IntoResponse, Failure> {
    Ok(Json(c.snapshots(None)?))
}

async fn snapshots(
    State(c): Shared,
    path: Result<Path<VolumeName>, PathRejection>,
) -> Result<impl IntoResponse, Failure> {
    let Path(name) = path?;
    Ok(Json(c.snapshots(Some(&name))?))
}

async fn create_snapshot(
    State(c): Shared,
    path: Result<Path<VolumeName>, PathRejection>,
    body: Result<Json<CreateSnapshot>, JsonRejection>,
) -> Result<impl IntoResponse, Failure> {
    let Path(name) = path?;
    let Json(req) = body?;
    let taken = blocking(move || c.create_snapshot(&name, &req.name)).await?;
    Ok((StatusCode::CREATED, Json(taken)))
}

#[derive(Deserialize)]
struct Since {
    since: SnapshotName,
}

async fn snapshot_changes(
    State(c): Shared,
    path: Result<Path<(VolumeName, SnapshotName)>, PathRejection>,
    query: Result<Query<Since>, QueryRejection>,
) -> Result<impl IntoResponse, Failure> {
    let Path((name, snap)) = path?;
    let Query(q) = query.map_err(|e| {
        Failure::new(
            StatusCode::BAD_REQUEST,
            e.body_text(),
            "give the older snapshot: ?since=NAME",
        )
    })?;
    Ok(Json(
        blocking(move || c.snapshot_changes(&name, &snap, &q.since)).await?,
    ))
}

async fn clone_snapshot(
    State(c): Shared,
    path: Result<Path<(VolumeName, SnapshotName)>, PathRejection>,
    body: Result<Json<CloneSnapshot>, JsonRejection>,
) -> Result<impl IntoResponse, Failure> {
    let Path((name, snap)) = path?;
    let Json(req) = body?;
    let volume = blocking(move || c.clone_snapshot(&name, &snap, &req.name)).await?;
    Ok((StatusCode::CREATED, Json(volume)))
}

async fn rollback_snapshot(
    State(c): Shared,
    path: Result<Path<(VolumeName, SnapshotName)>, PathRejection>,
) -> Result<impl IntoResponse, Failure> {
    let Path((name, snap)) = path?;
    Ok(Json(
        blocking(move || c.rollback_snapshot(&name, &snap)).await?,
    ))
}

async fn delete_snapshot(
    State(c): Shared,
    path: Result<Path<(VolumeName, SnapshotName)>, PathRejection>,
) -> Result<impl IntoResponse, Failure> {
    let Path((name, snap)) = path?;
    blocking(move || c.delete_snapshot(&name, &snap)).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn kv_stores(State(c): Shared) -> impl IntoResponse {
    Json(c.kv_stores())
}

async fn kv_list(
    State(c): Shared,
    path: Result<Path<StoreName>, PathRejection>,
) -> Result<impl IntoResponse, Failure> {
    let Path(store) = path?;
    Ok(Json(c.kv_list(&store)))
}

async fn kv_get(
    State(c): Shared,
    path: Result<Path<(StoreName, String)>, PathRejection>,
) -> Result<impl IntoResponse, Failure> {
    let Path((store, key)) = path?;
    Ok(Json(c.kv_get(&store, &key)?))
}

async fn kv_set(
    State(c): Shared,
    path: Result<Path<(StoreName, String)>, PathRejection>,
    body: Result<Json<KvValue>, JsonRejection>,
) -> Result<impl IntoResponse, Failure> {
    let Path((store, key)) = path?;
    let Json(req) = body?;
    Ok(Json(
        blocking(move || c.kv_set(&store, &key, &req.value, req.only_if.as_ref())).await?,
    ))
}

/// `?if-value=V`: delete the key only if it holds V.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct KvDeleteQuery {
    if_value: Option<String>,
}

async fn kv_delete(
    State(c): Shared,
    path: Result<Path<(StoreName, String)>, PathRejection>,
    query: Result<Query<KvDeleteQuery>, QueryRejection>,
) -> Result<impl IntoResponse, Failure> {
    let Path((store, key)) = path?;
    let Query(query) = query.map_err(|e| {
        Failure::new(
            StatusCode::BAD_REQUEST,
            e.body_text(),
            "the only parameter is ?if-value=VALUE",
        )
    })?;
    blocking(move || c.kv_delete(&store, &key, query.if_value.as_deref())).await?;
    Ok(StatusCode::NO_CONTENT)
}
