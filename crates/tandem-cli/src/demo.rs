//! `tandem demo`: a working three-node cluster on this machine, for a first look.
//!
//! Three `tandemd` processes on loopback, each a controller candidate (the controller
//! starts on the first, which founds the cluster, and moves to another if it stops); a
//! volume `demo` created through it (two replicas and a tiebreaker), its NBD address on
//! every node, and a few commands to try; Ctrl-C stops everything.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tandem_api::{
    ClusterNode, ClusterVolume, CreateClusterVolume, CreateNode, NodeState, ParticipantKind,
    VolumeState,
};

use crate::client::{CliError, Client};

struct DemoNode {
    name: String,
    api: SocketAddr,
    nbd: SocketAddr,
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
        .arg("--controller")
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
    // The first cluster request founds the cluster on n1; a demo directory used before
    // already has the other nodes and the volume (same identity, same data), and its
    // controller runs on whichever candidate wins. Any node answers.
    let controller = &clients[0];
    let fail = |what: &str| {
        let what = what.to_owned();
        move |e: CliError| anyhow::anyhow!("{what}: {e}")
    };
    let known: Vec<ClusterNode> = controller.get("/v1/nodes").map_err(fail("listing nodes"))?;
    for n in &cluster.nodes[1..] {
        if known.iter().all(|k| k.name.as_str() != n.name) {
            let req = CreateNode {
                name: n.name.parse()?,
                address: n.api.to_string(),
            };
            let _: ClusterNode = controller
                .send("POST", "/v1/nodes", &req)
                .map_err(fail(&format!("adding node {}", n.name)))?;
        }
    }
    wait_until("every node online", Duration::from_secs(30), || {
        controller
            .get::<Vec<ClusterNode>>("/v1/nodes")
            .is_ok_and(|ns| ns.len() == 3 && ns.iter().all(|n| n.state == NodeState::Online))
    })?;
    if controller.get::<ClusterVolume>("/v1/volumes/demo").is_err() {
        let req = CreateClusterVolume {
            name: "demo".parse()?,
            size,
            replicas: Some(2),
            group: None,
        };
        let _: ClusterVolume = controller
            .send("POST", "/v1/volumes", &req)
            .map_err(fail("creating volume demo"))?;
    }
    wait_until("volume demo UpToDate", Duration::from_secs(30), || {
        controller
            .get::<ClusterVolume>("/v1/volumes/demo")
            .is_ok_and(|v| v.state == VolumeState::UpToDate)
    })?;
    // Each node holds a replica of the controller's database before the demo says so.
    wait_until(
        "the controller's database on every node",
        Duration::from_secs(30),
        || {
            controller
                .get::<tandem_api::ClusterInfo>("/v1/cluster")
                .is_ok_and(|i| {
                    i.database.is_some_and(|v| {
                        v.state == VolumeState::UpToDate
                            && (v.participants.iter())
                                .filter(|p| p.kind == ParticipantKind::Diskful)
                                .count()
                                == 3
                    })
                })
        },
    )?;
    let volume: ClusterVolume = controller
        .get("/v1/volumes/demo")
        .map_err(fail("reading volume demo"))?;
    let status = controller
        .get_text("/v1/volumes/demo/status?format=text")
        .map_err(fail("reading the status of demo"))?;

    println!(
        "Tandem demo: 3 nodes on this machine, data under {}\n",
        dir.display()
    );
    println!("{:<4}  {:<22}  {:<11}  {}", "NODE", "API", "HOLDS", "NBD");
    for n in &cluster.nodes {
        let kind = volume
            .participants
            .iter()
            .find(|p| p.node.as_str() == n.name)
            .map_or("-", |p| match p.kind {
                ParticipantKind::Diskful => "replica",
                ParticipantKind::Diskless => "diskless",
                ParticipantKind::Tiebreaker => "tiebreaker",
            });
        println!(
            "{:<4}  http://{:<15}  {:<11}  nbd://{}/demo",
            n.name, n.api, kind, n.nbd
        );
    }
    let running_on = controller
        .get::<tandem_api::ClusterInfo>("/v1/cluster")
        .map_or_else(|_| "?".to_owned(), |i| i.controller.to_string());
    println!(
        "\nVolume demo ({}), controller on {running_on} (every node is a candidate):\n",
        tandem_api::ByteSize(volume.size)
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
        "  qemu-io -f raw -c 'read -P 0xab 0 1M' nbd://{}/demo",
        n3.nbd
    );
    let apis: Vec<String> = (cluster.nodes.iter())
        .map(|n| format!("http://{}", n.api))
        .collect();
    println!("  export TANDEM_CONTROLLER={}", apis.join(","));
    println!("  tandem volume status demo; tandem node list; tandem health");
    println!(
        "  kill -9 {}; tandem cluster    # another candidate takes the controller over",
        cluster
            .nodes
            .iter()
            .find(|n| n.name == running_on)
            .map_or(0, |n| n.child.id())
    );
    println!("  curl -s http://{}/metrics | grep ^tandem_volume", n1.api);
    println!("\nPress Ctrl-C to stop the demo.");
    wait_for_interrupt();
    drop(cluster);
    Ok(())
}
