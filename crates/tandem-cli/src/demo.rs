//! `tandem demo`: a working three-node cluster on this machine, for a first look.
//!
//! Three `tandemd` processes on loopback, a replicated volume `demo` (two replicas and a
//! tiebreaker), its NBD address on every node, and a few commands to try; Ctrl-C stops
//! everything.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tandem_api::{
    ClusterId, NodeId, Participant, ParticipantKind, VolumeId, VolumeOptions, VolumeSpec,
    VolumeStatus,
};

use crate::client::Client;

struct DemoNode {
    name: String,
    api: SocketAddr,
    nbd: SocketAddr,
    peer: SocketAddr,
    child: Child,
}

/// The demo's processes; they are stopped however the demo ends.
struct Cluster {
    nodes: Vec<DemoNode>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            // SAFETY: signals our own child process.
            unsafe { libc::kill(n.child.id() as i32, libc::SIGTERM) };
        }
        for n in &mut self.nodes {
            let deadline = Instant::now() + Duration::from_secs(30);
            while n.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = n.child.kill();
            let _ = n.child.wait();
        }
        println!("demo stopped");
    }
}

/// `preferred` if it is free, else any free loopback port.
fn port(preferred: u16) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(("127.0.0.1", preferred))
        .or_else(|_| TcpListener::bind("127.0.0.1:0"))?;
    Ok(listener.local_addr()?)
}

fn tandemd() -> PathBuf {
    let beside = std::env::current_exe()
        .ok()
        .and_then(|e| Some(e.parent()?.join("tandemd")));
    beside
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("tandemd"))
}

fn start(dir: &Path, i: u16) -> anyhow::Result<DemoNode> {
    let name = format!("n{}", i + 1);
    let data = dir.join(&name);
    std::fs::create_dir_all(&data).with_context(|| format!("creating {}", data.display()))?;
    let (api, nbd, peer) = (port(3370 + i)?, port(10809 + i)?, port(7700 + i)?);
    let log = std::fs::File::create(data.join("tandemd.log"))?;
    let child = Command::new(tandemd())
        .args(["--name", &name])
        .arg("--data-dir")
        .arg(&data)
        .args([
            "--api-listen",
            &api.to_string(),
            "--nbd-listen",
            &nbd.to_string(),
        ])
        .args(["--peer-listen", &peer.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| {
            format!(
                "starting {} (is tandemd built or on PATH?)",
                tandemd().display()
            )
        })?;
    Ok(DemoNode {
        name,
        api,
        nbd,
        peer,
        child,
    })
}

fn wait_until(
    what: &str,
    timeout: Duration,
    mut ready: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !ready() {
        if Instant::now() > deadline {
            bail!("{what} did not happen within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Waits for SIGINT or SIGTERM. The signals are blocked only now, after the children
/// were started, so they keep their default handling.
fn wait_for_interrupt() {
    // SAFETY: plain signal-mask calls on a set we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        let mut signal = 0;
        libc::sigwait(&set, &mut signal);
    }
}

pub fn run(dir: &Path, size: u64) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut cluster = Cluster { nodes: Vec::new() };
    for i in 0..3 {
        cluster.nodes.push(start(dir, i)?);
    }
    let clients: Vec<Client> = cluster
        .nodes
        .iter()
        .map(|n| Client::new(&format!("http://{}", n.api)))
        .collect();
    for (node, client) in cluster.nodes.iter_mut().zip(&clients) {
        wait_until(
            &format!("{} answering", node.name),
            Duration::from_secs(20),
            || client.get::<serde_json::Value>("/v1/node").is_ok(),
        )
        .map_err(|e| {
            let status = node.child.try_wait().ok().flatten();
            anyhow::anyhow!(
                "{e}; tandemd exited: {status:?}; see {}",
                dir.join(&node.name).join("tandemd.log").display()
            )
        })?;
    }
    let kinds = [
        ParticipantKind::Diskful,
        ParticipantKind::Diskful,
        ParticipantKind::Tiebreaker,
    ];
    // A demo directory used before keeps its volume: same identity, same data.
    let earlier: Option<VolumeSpec> = std::fs::read_to_string(dir.join("n1/specs/demo.json"))
        .ok()
        .and_then(|text| serde_json::from_str(&text).ok());
    let spec = VolumeSpec {
        cluster_id: earlier
            .as_ref()
            .map_or_else(ClusterId::random, |s| s.cluster_id),
        volume_id: earlier
            .as_ref()
            .map_or_else(VolumeId::random, |s| s.volume_id),
        name: "demo".parse()?,
        size: earlier.as_ref().map_or(size, |s| s.size.max(size)),
        participants: cluster
            .nodes
            .iter()
            .zip(kinds)
            .enumerate()
            .map(|(i, (n, kind))| Participant {
                node_id: NodeId::new(i as u8).expect("three nodes"),
                node: n.name.parse().expect("valid name"),
                address: n.peer.to_string(),
                kind,
                pool: None,
                fresh: false,
            })
            .collect(),
        options: VolumeOptions::default(),
    };
    for client in &clients {
        let _: VolumeStatus = client
            .send("PUT", "/v1/node/volumes/demo/spec", &spec)
            .map_err(|e| anyhow::anyhow!("configuring the demo volume: {e}"))?;
    }
    wait_until("the replicas connecting", Duration::from_secs(20), || {
        clients[0]
            .get::<VolumeStatus>("/v1/node/volumes/demo/status")
            .is_ok_and(|s| {
                s.peers
                    .iter()
                    .all(|p| p.connection == tandem_api::ConnectionState::Connected)
            })
    })?;
    let status: VolumeStatus = clients[0]
        .get("/v1/node/volumes/demo/status")
        .map_err(|e| anyhow::anyhow!("{e}"))?;

    println!(
        "Tandem demo: 3 nodes on this machine, data under {}\n",
        dir.display()
    );
    println!("{:<4}  {:<22}  {:<22}  {}", "NODE", "API", "PEERS", "NBD");
    for n in &cluster.nodes {
        println!(
            "{:<4}  http://{:<15}  {:<22}  nbd://{}/demo",
            n.name, n.api, n.peer, n.nbd
        );
    }
    println!(
        "\nVolume demo ({}), replicas on n1 and n2, tiebreaker n3:\n",
        tandem_api::ByteSize(spec.size)
    );
    print!("{status}");
    let (n1, n3) = (&cluster.nodes[0], &cluster.nodes[2]);
    println!("\nTry:");
    println!("  qemu-img info nbd://{}/demo", n1.nbd);
    println!(
        "  qemu-io -f raw -c 'write -P 0xab 0 1M' nbd://{}/demo",
        n1.nbd
    );
    println!(
        "  qemu-io -f raw -c 'read -P 0xab 0 1M' nbd://{}/demo     # n3 reads over the network",
        n3.nbd
    );
    println!("  tandem --controller http://{} volume status demo", n1.api);
    println!("\nPress Ctrl-C to stop the demo.");
    wait_for_interrupt();
    drop(cluster);
    Ok(())
}
