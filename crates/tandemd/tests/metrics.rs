//! `GET /metrics` of a node and of the controller, read the way users read them: parsed
//! by the Prometheus client library's strict OpenMetrics parser, and scraped by a real
//! Prometheus server. Counters must move with traffic and states with a peer's loss.

use std::process::{Command, Stdio};
use std::time::Duration;

use tandem_lab::metrics::{Scrape, parse};
use tandem_lab::{Node, QUORUM_OFF, TWO_REPLICAS, start_replicated, wait_for};

const MIB: u64 = 1 << 20;

#[test]
fn node_metrics_parse_and_move_with_traffic_and_peer_state() {
    let volume = "mv1";
    let [a, mut b] = start_replicated(volume, 64 * MIB, ["ma", "mb"], TWO_REPLICAS, QUORUM_OFF);
    a.wait_connected(volume, Duration::from_secs(20));
    let v = [("volume", volume)];
    let to_b = [("volume", volume), ("peer", "mb")];

    let before = a.metrics();
    for (family, kind) in [
        ("tandem_volume_requests", "counter"),
        ("tandem_volume_transferred_bytes", "counter"),
        ("tandem_volume_request_duration_seconds", "histogram"),
        ("tandem_peer_sent_bytes", "counter"),
        ("tandem_peer_send_queue_bytes", "gauge"),
        ("tandem_peer_connection_state", "gauge"),
        ("tandem_peer_out_of_sync_bytes", "gauge"),
        ("tandem_volume_quorum", "gauge"),
        ("tandem_pool_free_bytes", "gauge"),
        ("tandem_nbd_connections", "gauge"),
    ] {
        assert_eq!(
            before.types.get(family).map(String::as_str),
            Some(kind),
            "family {family}"
        );
    }
    assert_eq!(
        before.value(
            "tandem_peer_connection_state",
            &[("volume", volume), ("peer", "mb"), ("state", "Connected")]
        ),
        1.0
    );
    assert_eq!(
        before.value(
            "tandem_volume_disk_state",
            &[("volume", volume), ("state", "UpToDate")]
        ),
        1.0
    );
    assert_eq!(before.value("tandem_volume_quorum", &v), 1.0);
    assert!(before.value("tandem_pool_capacity_bytes", &[("pool", "default")]) > 0.0);
    let written = |s: &Scrape| {
        s.value(
            "tandem_volume_transferred_bytes_total",
            &[("volume", volume), ("op", "write")],
        )
    };
    let writes = |s: &Scrape| {
        s.value(
            "tandem_volume_requests_total",
            &[("volume", volume), ("op", "write")],
        )
    };
    assert_eq!(writes(&before), 0.0, "series exist before any request");

    a.qemu_io(volume, &["write -P 0x5a 0 4M", "write -P 0x5b 8M 1M"]);
    let after = a.metrics();
    assert!(
        writes(&after) >= writes(&before) + 2.0,
        "two writes counted"
    );
    assert!(written(&after) >= written(&before) + (5 * MIB) as f64);
    assert!(
        after.value("tandem_peer_sent_bytes_total", &to_b)
            >= before.value("tandem_peer_sent_bytes_total", &to_b) + (5 * MIB) as f64,
        "the writes went to the peer"
    );
    let write_latency = [("volume", volume), ("op", "write")];
    assert!(
        after.value(
            "tandem_volume_request_duration_seconds_count",
            &write_latency
        ) >= 2.0
    );
    assert!(after.value("tandem_volume_request_duration_seconds_sum", &write_latency) > 0.0);
    assert_eq!(after.value("tandem_volume_requests_in_flight", &v), 0.0);
    assert_eq!(after.value("tandem_peer_out_of_sync_bytes", &to_b), 0.0);

    // The peer is lost: its connection state changes, and writes meanwhile are marked
    // out of sync for it.
    b.kill();
    wait_for(
        "the peer shows as lost in the metrics",
        Duration::from_secs(15),
        &[&a],
        || {
            a.metrics().value(
                "tandem_peer_connection_state",
                &[("volume", volume), ("peer", "mb"), ("state", "Connecting")],
            ) == 1.0
        },
    );
    a.qemu_io(volume, &["write -P 0x5c 16M 1M"]);
    let cut = a.metrics();
    assert!(cut.value("tandem_peer_out_of_sync_bytes", &to_b) >= MIB as f64);
    assert_eq!(
        cut.value(
            "tandem_peer_replication_state",
            &[("volume", volume), ("peer", "mb"), ("state", "Off")]
        ),
        1.0
    );
    b.restart();
    wait_for(
        "the peer is back and resynced",
        Duration::from_secs(30),
        &[&a, &b],
        || {
            let s = a.metrics();
            s.value("tandem_peer_out_of_sync_bytes", &to_b) == 0.0
                && s.value("tandem_peer_connects_total", &to_b) >= 2.0
                && s.value("tandem_peer_resync_bytes_total", &to_b) >= MIB as f64
        },
    );
}

#[test]
fn controller_metrics_count_nodes_and_volumes_and_need_no_cluster_secret() {
    let node = Node::start_with("mc", &["--controller"]);
    // The first cluster request founds a cluster on the candidate, and the node joins
    // it: from then on its node API wants the secret...
    tandem_lab::run(node.tandem().arg("cluster"));
    wait_for(
        "the node joined its controller's cluster",
        Duration::from_secs(10),
        &[&node],
        || {
            let r = tandem_lab::http("GET", &node.url("/v1/node/volumes"), None).unwrap();
            (r.status == 401).then_some(())
        },
    );
    // ...its metrics do not (they carry no secrets).
    let s = wait_for(
        "the controller visited its node",
        Duration::from_secs(10),
        &[&node],
        || {
            let s = node.metrics();
            // The node is Online once a visit reached it; the visit's duration is
            // recorded when the visit ends, a moment later.
            let visited = s.value("tandem_cluster_nodes", &[("state", "Online")]) == 1.0
                && s.value("tandem_controller_reconcile_duration_seconds_count", &[]) >= 1.0;
            visited.then_some(s)
        },
    );
    assert_eq!(
        s.value("tandem_cluster_nodes", &[("state", "Offline")]),
        0.0
    );
    tandem_lab::run(node.tandem().args([
        "volume",
        "create",
        "cv",
        "--size",
        "8M",
        "--replicas",
        "1",
    ]));
    wait_for(
        "the volume counts as UpToDate, beside the system volume",
        Duration::from_secs(15),
        &[&node],
        || {
            node.metrics()
                .value("tandem_cluster_volumes", &[("state", "UpToDate")])
                == 2.0
        },
    );
}

#[test]
fn a_scrape_token_guards_the_metrics_when_set() {
    let dir = tandem_lab::scratch("metrics-token");
    let token = dir.join("token");
    std::fs::write(&token, "scrape-token-0123456789\n").unwrap();
    let node = Node::start_with("mt", &["--metrics-token-file", token.to_str().unwrap()]);
    let r = tandem_lab::http("GET", &node.url("/metrics"), None).unwrap();
    assert_eq!(r.status, 401, "{}", r.body);
    let r = tandem_lab::http_as(
        Some("wrong-token-0123456789"),
        "GET",
        &node.url("/metrics"),
        None,
    )
    .unwrap();
    assert_eq!(r.status, 401, "{}", r.body);
    let r = tandem_lab::http_as(
        Some("scrape-token-0123456789"),
        "GET",
        &node.url("/metrics"),
        None,
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    parse(&r.body);
}

#[test]
fn a_prometheus_server_scrapes_a_node() {
    if !tandem_lab::have("prometheus") {
        panic!("prometheus is not installed (Debian: prometheus)");
    }
    let node = Node::start("mp");
    node.create_volume("pv", 8 * MIB);
    node.qemu_io("pv", &["write -P 1 0 1M"]);
    let dir = tandem_lab::scratch("prometheus");
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: tandem\n    static_configs:\n      - targets: ['{}']\n",
            node.api
        ),
    )
    .unwrap();
    let web = tandem_lab::free_addr();
    let mut prometheus = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address={web}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
        .spawn()
        .expect("start prometheus");
    let query = |q: &str| {
        tandem_lab::http("GET", &format!("http://{web}/api/v1/query?query={q}"), None)
            .ok()
            .filter(|r| r.status == 200)
            .map(|r| r.json())
    };
    let found = tandem_lab::poll(Duration::from_secs(30), || {
        let up = query("up")?;
        let up = up["data"]["result"].as_array()?.first()?["value"][1].clone();
        let bytes = query("tandem_volume_transferred_bytes_total")?;
        let series = bytes["data"]["result"]
            .as_array()?
            .iter()
            .find(|r| r["metric"]["volume"] == "pv" && r["metric"]["op"] == "write")?;
        (up == "1").then(|| series["value"][1].clone())
    });
    let _ = prometheus.kill();
    let _ = prometheus.wait();
    let log = std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default();
    assert_eq!(
        found,
        Some(serde_json::Value::String((MIB).to_string())),
        "Prometheus did not scrape the node's metrics:\n{log}"
    );
}
