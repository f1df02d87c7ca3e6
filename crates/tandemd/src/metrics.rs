//! The node's Prometheus metrics (`GET /metrics`): NBD requests per volume, counted as
//! they happen ([`IoBook`]); everything else (roles, disk and replication states,
//! quorum, out-of-sync bytes, peer links, pools, NBD connections) read from the node's
//! own state at each scrape, so nothing is kept twice.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tandem_api::{ConnectionState, DiskState, ReplicationState, Role};
use tandem_metrics::{
    Collector, Counter, DescriptorEncoder, Family, Gauge, Labels, Latency, MetricType, Unit,
};
use tandem_replication::LinkStats;

use crate::node::Node;

/// The kinds of NBD request counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    Flush,
    Trim,
    Zero,
}

impl Op {
    const ALL: [Op; 5] = [Op::Read, Op::Write, Op::Flush, Op::Trim, Op::Zero];

    fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::Trim => "trim",
            Op::Zero => "write_zeroes",
        }
    }
}

/// One volume's NBD requests on this node, over every connection.
pub struct VolumeIo {
    requests: [Counter; 5],
    errors: [Counter; 5],
    /// Bytes read, written (reads and writes only).
    bytes: [Counter; 2],
    seconds: [Latency; 5],
    in_flight: Gauge,
}

impl VolumeIo {
    fn new() -> VolumeIo {
        VolumeIo {
            requests: Default::default(),
            errors: Default::default(),
            bytes: Default::default(),
            seconds: Default::default(),
            in_flight: Gauge::default(),
        }
    }

    /// A request starts: the moment, to give to [`VolumeIo::done`].
    pub fn start(&self) -> Instant {
        self.in_flight.inc();
        Instant::now()
    }

    /// A request of `len` bytes that started at `at` is over.
    pub fn done<T>(&self, op: Op, at: Instant, len: usize, result: &io::Result<T>) {
        let i = op as usize;
        self.in_flight.dec();
        self.requests[i].inc();
        self.seconds[i].observe(at.elapsed());
        match result {
            Err(_) => {
                self.errors[i].inc();
            }
            Ok(_) if matches!(op, Op::Read | Op::Write) => {
                self.bytes[i].inc_by(len as u64);
            }
            Ok(_) => {}
        }
    }
}

/// The [`VolumeIo`] of every volume served since the start, by name.
#[derive(Default)]
pub struct IoBook {
    volumes: Mutex<BTreeMap<String, Arc<VolumeIo>>>,
}

impl IoBook {
    pub fn volume(&self, name: &str) -> Arc<VolumeIo> {
        self.lock()
            .entry(name.to_owned())
            .or_insert_with(|| Arc::new(VolumeIo::new()))
            .clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<VolumeIo>>> {
        self.volumes.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// What `/metrics` reports on.
pub struct Sources {
    pub node: Arc<Node>,
    pub io: Arc<IoBook>,
    pub nbd: Arc<tandem_nbd::Server>,
    /// The controller candidate, whose controller's figures are reported while it runs.
    pub candidate: Option<Arc<crate::candidate::Candidate>>,
    /// Scrapes must carry this token (`Authorization: Bearer TOKEN`) when set.
    pub token: Option<String>,
}

/// `GET /metrics`.
pub fn router(sources: Arc<Sources>) -> Router {
    Router::new()
        .route("/metrics", get(scrape))
        .with_state(sources)
}

async fn scrape(State(s): State<Arc<Sources>>, headers: HeaderMap) -> Response {
    if let Some(token) = &s.token {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !given.is_some_and(|g| tandem_controller::http::same_secret(g, token)) {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"))],
                "metrics need the scrape token: Authorization: Bearer TOKEN\n",
            )
                .into_response();
        }
    }
    let mut collectors: Vec<Box<dyn Collector>> = vec![Box::new(NodeCollector(s.clone()))];
    if let Some(c) = s.candidate.as_ref().and_then(|c| c.controller()) {
        collectors.push(c.metrics());
    }
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(tandem_metrics::CONTENT_TYPE),
        )],
        tandem_metrics::render(collectors),
    )
        .into_response()
}

struct NodeCollector(Arc<Sources>);

impl fmt::Debug for NodeCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NodeCollector")
    }
}

fn names<T: Copy>(all: &[T], name: impl Fn(T) -> &'static str) -> Vec<&'static str> {
    all.iter().map(|s| name(*s)).collect()
}

impl Collector for NodeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let s = &self.0;
        let mut f = Family::new(&mut encoder);
        self.encode_io(&mut f)?;
        self.encode_volumes(&mut f)?;

        let pools = s.node.pools();
        let pool = |p: &tandem_api::PoolInfo| vec![("pool", p.name.to_string())];
        f.gauge(
            "pool_capacity",
            "Size of the file system holding the pool.",
            Some(Unit::Bytes),
            pools.iter().map(|p| (pool(p), p.capacity as f64)),
        )?;
        f.gauge(
            "pool_free",
            "Free space in the file system holding the pool.",
            Some(Unit::Bytes),
            pools.iter().map(|p| (pool(p), p.free as f64)),
        )?;
        f.gauge(
            "nbd_connections",
            "NBD client connections open now.",
            None,
            [(vec![], s.nbd.connections() as f64)],
        )?;
        f.counter(
            "nbd_connections_accepted",
            "NBD client connections accepted since the start.",
            None,
            [(vec![], s.nbd.accepted())],
        )?;
        f.counter(
            "nbd_connections_refused",
            "NBD client connections closed at once since the start: the node held as many as it takes (--nbd-max-connections).",
            None,
            [(vec![], s.nbd.refused())],
        )
    }
}

impl NodeCollector {
    /// NBD requests per volume, for volumes this node still has.
    fn encode_io(&self, f: &mut Family<'_, '_>) -> fmt::Result {
        let s = &self.0;
        let present: Vec<String> = s
            .node
            .volumes()
            .into_iter()
            .map(|v| v.name.to_string())
            .chain(s.node.replicated_names().into_iter().map(|n| n.to_string()))
            .collect();
        let io: Vec<(String, Arc<VolumeIo>)> = {
            let mut book = s.io.lock();
            // Every volume has its series from the start, at 0; a deleted one's go
            // once no client holds it open.
            book.retain(|name, v| present.contains(name) || Arc::strong_count(v) > 1);
            for name in present {
                book.entry(name)
                    .or_insert_with(|| Arc::new(VolumeIo::new()));
            }
            book.iter().map(|(n, v)| (n.clone(), v.clone())).collect()
        };
        let per_op =
            |op: Op, name: &String| vec![("volume", name.clone()), ("op", op.name().into())];
        f.live(
            "volume_requests",
            "NBD requests completed, by volume and kind.",
            None,
            MetricType::Counter,
            io.iter()
                .flat_map(|(n, v)| Op::ALL.map(|op| (per_op(op, n), &v.requests[op as usize]))),
        )?;
        f.live(
            "volume_request_errors",
            "NBD requests that failed, by volume and kind.",
            None,
            MetricType::Counter,
            io.iter()
                .flat_map(|(n, v)| Op::ALL.map(|op| (per_op(op, n), &v.errors[op as usize]))),
        )?;
        f.live(
            "volume_transferred",
            "Bytes read and written by NBD clients, by volume.",
            Some(Unit::Bytes),
            MetricType::Counter,
            io.iter().flat_map(|(n, v)| {
                [Op::Read, Op::Write].map(|op| (per_op(op, n), &v.bytes[op as usize]))
            }),
        )?;
        f.live(
            "volume_request_duration",
            "Time from an NBD request's arrival to its completion, by volume and kind.",
            Some(Unit::Seconds),
            MetricType::Histogram,
            io.iter()
                .flat_map(|(n, v)| Op::ALL.map(|op| (per_op(op, n), &v.seconds[op as usize]))),
        )?;
        f.live(
            "volume_requests_in_flight",
            "NBD requests under way now, by volume.",
            None,
            MetricType::Gauge,
            io.iter()
                .map(|(n, v)| (vec![("volume", n.clone())], &v.in_flight)),
        )
    }

    /// States of the replicated volumes and their peers.
    fn encode_volumes(&self, f: &mut Family<'_, '_>) -> fmt::Result {
        let node = &self.0.node;
        let volumes: Vec<_> = node
            .replicated_names()
            .into_iter()
            .filter_map(|n| node.replicated(&n))
            .map(|v| (v.status(), v.links()))
            .collect();
        let vol = |name: &tandem_api::VolumeName| vec![("volume", name.to_string())];
        let roles = names(Role::ALL, Role::as_str);
        let disks = names(DiskState::ALL, DiskState::as_str);
        let replications = names(ReplicationState::ALL, ReplicationState::as_str);
        let connections = names(ConnectionState::ALL, ConnectionState::as_str);
        f.states(
            "volume_role",
            "Role of this node for the volume.",
            volumes
                .iter()
                .map(|(s, _)| (vol(&s.name), &roles[..], s.role.as_str())),
        )?;
        f.states(
            "volume_disk_state",
            "State of this node's replica of the volume (Diskless without one).",
            volumes
                .iter()
                .map(|(s, _)| (vol(&s.name), &disks[..], s.disk.as_str())),
        )?;
        f.gauge(
            "volume_quorum",
            "1 while this node has quorum for the volume.",
            None,
            volumes
                .iter()
                .map(|(s, _)| (vol(&s.name), f64::from(u8::from(s.quorum)))),
        )?;
        f.gauge(
            "volume_open",
            "1 while an NBD client has the volume open for writing on this node.",
            None,
            volumes
                .iter()
                .map(|(s, _)| (vol(&s.name), f64::from(u8::from(s.open)))),
        )?;
        // Each peer's status and the traffic on its link, matched by name: they come
        // from two reads of the volume, between which the spec may have changed.
        let peers: Vec<(Labels, &tandem_api::PeerStatus, Option<&LinkStats>)> = volumes
            .iter()
            .flat_map(|(s, links)| {
                s.peers.iter().map(move |p| {
                    (
                        vec![("volume", s.name.to_string()), ("peer", p.node.to_string())],
                        p,
                        links.iter().find(|l| l.node == p.node),
                    )
                })
            })
            .collect();
        f.states(
            "peer_connection_state",
            "Connection to the peer, by volume.",
            peers
                .iter()
                .map(|(l, p, _)| (l.clone(), &connections[..], p.connection.as_str())),
        )?;
        f.states(
            "peer_replication_state",
            "Replication towards the peer, by volume.",
            peers
                .iter()
                .map(|(l, p, _)| (l.clone(), &replications[..], p.replication.as_str())),
        )?;
        f.states(
            "peer_disk_state",
            "State of the peer's replica as this node knows it, by volume.",
            peers
                .iter()
                .map(|(l, p, _)| (l.clone(), &disks[..], p.disk.as_str())),
        )?;
        f.gauge(
            "peer_out_of_sync",
            "Bytes marked out of sync towards the peer, by volume.",
            Some(Unit::Bytes),
            peers
                .iter()
                .map(|(l, p, _)| (l.clone(), p.out_of_sync as f64)),
        )?;
        f.counter(
            "peer_resync",
            "Bytes resynced with the peer (either way) since the current resync began.",
            Some(Unit::Bytes),
            peers
                .iter()
                .map(|(l, p, _)| (l.clone(), p.resync_transferred)),
        )?;
        let link = |value: fn(&LinkStats) -> u64| {
            peers
                .iter()
                .filter_map(move |(l, _, link)| Some((l.clone(), value(link.as_ref()?))))
        };
        f.counter(
            "peer_sent",
            "Bytes handed to the link to the peer (headers included), by volume.",
            Some(Unit::Bytes),
            link(|s| s.sent),
        )?;
        f.counter(
            "peer_received",
            "Bytes read from the link to the peer, by volume.",
            Some(Unit::Bytes),
            link(|s| s.received),
        )?;
        f.gauge(
            "peer_send_queue",
            "Bytes waiting for the link to the peer to take them, by volume.",
            Some(Unit::Bytes),
            link(|s| s.queued).map(|(l, v)| (l, v as f64)),
        )?;
        f.counter(
            "peer_connects",
            "Connections made to the peer (the first and every reconnection), by volume.",
            None,
            link(|s| s.connects),
        )
    }
}
