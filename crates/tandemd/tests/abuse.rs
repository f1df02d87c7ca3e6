//! Bounded resources under abuse. NBD: a flood of connections that never negotiate,
//! and a client that trickles its handshake, against a node that takes at most 32
//! connections: connections past the limit are closed at once and counted; those
//! inside it are dropped 10 s after they connected, however they space their bytes;
//! the node's threads stay within the limit's bound; a client that was connected
//! before the flood reads and writes throughout, and a new one connects once the
//! flood is dropped. The peer port: a flood of silent connections, a Hello announcing
//! a 32 MiB payload, garbage: each closed (at once, or within the 5 s handshake
//! limit), the threads bounded, the replicated volume between the two nodes writing
//! throughout. The HTTP API: a 16 MiB body refused (413, with the reason) without
//! being read to its end, and 300 requests stalled mid-header or mid-body holding no
//! thread while other requests are answered at once.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use tandem_lab::{Node, TWO_REPLICAS, run, start_replicated, wait_for};
use tandem_replication::wire::{self, Header, Kind};

const MIB: u64 = 1 << 20;
const LIMIT: usize = 32;

fn threads(node: &Node) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{}/status", node.pid())).unwrap();
    let line = status.lines().find(|l| l.starts_with("Threads:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// What the server sends first on `conn`, waiting at most `limit`: its greeting, or
/// nothing (closed).
fn first_bytes(conn: &mut TcpStream, limit: Duration) -> Vec<u8> {
    conn.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 18];
    let mut got = 0;
    while got < buf.len() {
        match conn.read(&mut buf[got..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    buf[..got].to_vec()
}

/// Whether the server closed `conn` within `limit`.
fn closed_within(conn: &mut TcpStream, limit: Duration) -> bool {
    conn.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 64];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) => return e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }
}

#[test]
fn a_flood_of_nbd_connections_is_capped_dropped_and_never_stops_a_served_client() {
    let limit = LIMIT.to_string();
    let node = Node::start_with("ab1", &["--nbd-max-connections", &limit]);
    node.create_volume("a1", 64 * MIB);
    let mut served = node.qemu_io_session("a1");
    let idle_threads = threads(&node);

    // The flood: three times the limit, none saying a word. The first to be accepted
    // (the served client holds one place) get the greeting, the rest are closed.
    let flood_started = Instant::now();
    let mut flood: Vec<TcpStream> = (0..3 * LIMIT)
        .map(|_| TcpStream::connect(node.nbd).unwrap())
        .collect();
    let greeted = flood
        .iter_mut()
        .map(|c| first_bytes(c, Duration::from_secs(5)))
        .filter(|first| first.starts_with(b"NBDMAGIC"))
        .count();
    assert_eq!(greeted, LIMIT - 1, "connections greeted within the limit");
    let refused = node
        .metrics()
        .value("tandem_nbd_connections_refused_total", &[]);
    assert_eq!(refused as usize, 2 * LIMIT + 1, "connections refused");
    let busy_threads = threads(&node);
    assert!(
        busy_threads <= idle_threads + LIMIT,
        "threads: {idle_threads} before, {busy_threads} under the flood"
    );
    assert!(
        node.log().contains("NBD connection refused"),
        "the refusal is logged"
    );

    // The client connected before goes on meanwhile.
    let out = served
        .command("write -P 0x5a 0 1M", Duration::from_secs(10))
        .expect("a write during the flood");
    assert!(out.contains("wrote 1048576/1048576"), "{out}");
    let out = served
        .command("read -P 0x5a 0 1M", Duration::from_secs(10))
        .expect("a read during the flood");
    assert!(out.contains("read 1048576/1048576"), "{out}");

    // One of the greeted trickles a valid handshake, a byte every second: dropped
    // with the others 10 s after it connected, not kept alive by the trickle.
    let mut trickler = flood.remove(0);
    let mut handshake = vec![0, 0, 0, 3];
    handshake.extend_from_slice(b"IHAVEOPT");
    handshake.extend_from_slice(&[0, 0, 0, 7, 0, 0, 0, 0]);
    let mut dropped_at = None;
    for byte in handshake {
        if trickler.write_all(&[byte]).is_err()
            || closed_within(&mut trickler, Duration::from_secs(1))
        {
            dropped_at = Some(flood_started.elapsed());
            break;
        }
    }
    let dropped_at = dropped_at.expect("the trickling client was never dropped");
    assert!(
        dropped_at >= Duration::from_secs(9) && dropped_at <= Duration::from_secs(14),
        "the trickling client was dropped after {dropped_at:?}"
    );
    for conn in &mut flood {
        assert!(
            closed_within(conn, Duration::from_secs(5)),
            "a silent connection outlived the negotiation limit"
        );
    }
    wait_for(
        "the flood's connections are gone",
        Duration::from_secs(10),
        &[&node],
        || node.metrics().value("tandem_nbd_connections", &[]) == 1.0,
    );

    // A new client connects, and reads what the served one wrote.
    let out = run(node.here(std::process::Command::new("qemu-io")).args([
        "-f",
        "raw",
        "-r",
        "-c",
        "read -P 0x5a 0 1M",
        &node.uri("a1"),
    ]));
    assert!(out.contains("read 1048576/1048576"), "{out}");
    let out = served
        .command("read -P 0x5a 0 1M", Duration::from_secs(10))
        .expect("the served client still reads");
    assert!(out.contains("read 1048576/1048576"), "{out}");
}

#[test]
fn a_flood_of_peer_connections_and_garbage_leave_replication_going() {
    let [a, b] = start_replicated("pa1", 64 * MIB, ["pa", "pb"], TWO_REPLICAS, "");
    a.wait_peer("pa1", 0, "Established", "UpToDate");
    let idle_threads = threads(&b);

    // A Hello header announcing the largest payload, then nothing: refused on the
    // header, before any buffer is made for it. Garbage: refused.
    let mut big = TcpStream::connect(b.peer).unwrap();
    let mut hello = Header::new(Kind::Hello, 0);
    hello.payload = wire::MAX_PAYLOAD;
    big.write_all(&hello.encode()).unwrap();
    let mut garbage = TcpStream::connect(b.peer).unwrap();
    garbage.write_all(&[0xff; 4096]).unwrap();
    assert!(
        closed_within(&mut big, Duration::from_secs(2)),
        "a 32 MiB Hello waited for"
    );
    assert!(
        closed_within(&mut garbage, Duration::from_secs(2)),
        "garbage kept open"
    );
    wait_for(
        "the refusals are logged",
        Duration::from_secs(5),
        &[&b],
        || {
            let log = b.log();
            log.contains("hello of 33554432 bytes") && log.contains("bad magic")
        },
    );

    let flood_started = Instant::now();
    let mut flood: Vec<TcpStream> = (0..200)
        .map(|_| TcpStream::connect(b.peer).unwrap())
        .collect();
    let busy_threads = threads(&b);
    assert!(
        busy_threads <= idle_threads + 64 + 4,
        "threads: {idle_threads} before, {busy_threads} under the flood"
    );

    // Replication between the two goes on over its established connection.
    let out = a.qemu_io("pa1", &["write -P 0x3c 0 4M", "flush"]);
    assert!(out.contains("wrote 4194304/4194304"), "{out}");
    for conn in &mut flood {
        assert!(
            closed_within(conn, Duration::from_secs(8)),
            "a silent peer connection outlived the handshake limit"
        );
    }
    assert!(
        flood_started.elapsed() < Duration::from_secs(12),
        "the flood lasted {:?}",
        flood_started.elapsed()
    );
    a.wait_peer("pa1", 0, "Established", "UpToDate");
    let out = b.qemu_io("pa1", &["read -P 0x3c 0 4M"]);
    assert!(out.contains("read 4194304/4194304"), "{out}");
    wait_for(
        "the flood's threads are gone",
        Duration::from_secs(10),
        &[&b],
        || threads(&b) <= idle_threads + 4,
    );
    assert!(
        b.log()
            .contains("peer connection closed: as many are in their handshake"),
        "the refusals are logged"
    );
}

#[test]
fn huge_and_stalled_api_requests_leave_the_api_answering() {
    let node = Node::start("ab3");
    let idle_threads = threads(&node);
    // A 16 MiB body is refused with a reason, not read into memory to the end (curl
    // reads the answer that comes before its body is all sent).
    let file = tandem_lab::scratch("abuse-api").join("huge.json");
    let body = format!(
        r#"{{"name":"x","size":1048576,"pad":"{}"}}"#,
        "a".repeat(16 << 20)
    );
    std::fs::write(&file, body).unwrap();
    let out = run(std::process::Command::new("curl")
        .args([
            "-s",
            "-w",
            "\n%{http_code}",
            "-H",
            "Content-Type: application/json",
        ])
        .arg("--data-binary")
        .arg(format!("@{}", file.display()))
        .arg(node.url("/v1/node/volumes")));
    assert!(out.ends_with("\n413"), "{out}");
    assert!(out.contains("length limit exceeded"), "{out}");

    // 300 requests stalled mid-header and mid-body hold no thread, and nobody waits
    // on them.
    let stalled: Vec<TcpStream> = (0..300)
        .map(|i| {
            let mut c = TcpStream::connect(node.api).unwrap();
            let part: &[u8] = if i % 2 == 0 {
                b"GET /v1/node/volumes HTTP/1.1\r\nHost: x\r\n"
            } else {
                b"POST /v1/node/volumes HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"na"
            };
            c.write_all(part).unwrap();
            c
        })
        .collect();
    let started = Instant::now();
    node.create_volume("ok1", MIB);
    let r = node.api("GET", "/v1/node/volumes", None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("\"ok1\""), "{}", r.body);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "requests waited {:?} behind stalled ones",
        started.elapsed()
    );
    let busy_threads = threads(&node);
    assert!(
        busy_threads <= idle_threads + 2,
        "threads: {idle_threads} before, {busy_threads} with 300 stalled requests"
    );
    drop(stalled);
}
