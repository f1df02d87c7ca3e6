//! `tandemd` nodes, on loopback or on the hosts of a [`crate::netns::Lab`], and
//! replicated volumes across them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::{
    QemuIo, Response, first_difference, free_addrs, http, http_as, netns, poll, qemu_io_command,
    qemu_io_result, scratch, tandem_bin, tandemd_bin, wait_for,
};

/// One `tandemd` process and its directories and addresses, which survive restarts.
///
/// On loopback ([`Node::start`]) it runs in the test's own network namespace; on a host
/// of a [`crate::netns::Lab`] it runs in the host's namespace and listens on the host's
/// address only: its API is then reached from a thread that joins the namespace, and
/// clients started with [`Node::here`] run there too. Data files live on the shared
/// file system either way.
pub struct Node {
    pub name: String,
    pub dir: PathBuf,
    pub api: SocketAddr,
    pub nbd: SocketAddr,
    pub peer: SocketAddr,
    /// The network namespace it runs in; `None` for the test's own (loopback).
    pub ns: Option<String>,
    args: Vec<String>,
    child: Option<Child>,
}

impl Node {
    pub fn start(name: &str) -> Node {
        Node::start_with(name, &[])
    }

    /// Starts a node on loopback with extra `tandemd` flags and waits until its API answers.
    pub fn start_with(name: &str, args: &[&str]) -> Node {
        Node::launch_new(name, free_addrs(), None, args)
    }

    /// Starts a node listening on `[api, nbd, peer]`, in namespace `ns` if any, and waits
    /// until its API answers.
    pub(crate) fn launch_new(
        name: &str,
        [api, nbd, peer]: [SocketAddr; 3],
        ns: Option<String>,
        args: &[&str],
    ) -> Node {
        let mut node = Node {
            name: name.to_owned(),
            dir: scratch(name),
            api,
            nbd,
            peer,
            ns,
            args: args.iter().map(|s| s.to_string()).collect(),
            child: None,
        };
        // Ports picked free may be taken before tandemd binds them (by another test's
        // node, or an outgoing connection): a loopback node then starts again on
        // others. A node in a namespace has its host's address to itself.
        for _ in 0..5 {
            match node.try_launch() {
                Ok(()) => return node,
                Err(log) if node.ns.is_none() && log.contains("Address already in use") => {
                    // The log starts afresh (tests read it); the clash stays beside it.
                    let _ = std::fs::rename(
                        node.dir.join("tandemd.log"),
                        node.dir.join("tandemd-port-clash.log"),
                    );
                    [node.api, node.nbd, node.peer] = free_addrs();
                }
                Err(log) => panic!("tandemd {} exited at start:\n{log}", node.name),
            }
        }
        panic!("tandemd {} found no free ports:\n{}", node.name, node.log())
    }

    fn launch(&mut self) {
        if let Err(log) = self.try_launch() {
            panic!("tandemd {} exited at start:\n{log}", self.name);
        }
    }

    /// Starts tandemd and waits until its API answers; its log if it exits first.
    fn try_launch(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("tandemd.log"))
            .expect("log file");
        let mut tandemd = Command::new(tandemd_bin());
        tandemd
            .args(["--name", &self.name, "--log-level", "debug"])
            .arg("--data-dir")
            .arg(&self.dir)
            .args([
                "--api-listen",
                &self.api.to_string(),
                "--nbd-listen",
                &self.nbd.to_string(),
                "--peer-listen",
                &self.peer.to_string(),
            ])
            .args(&self.args);
        // `ip netns exec` execs the program: the child is tandemd itself.
        let child = self
            .here(tandemd)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {:?} in namespace {:?} ({e}); build it with `cargo build --workspace`",
                    tandemd_bin(),
                    self.ns
                )
            });
        self.child = Some(child);
        let up = poll(Duration::from_secs(20), || {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return Some(Err(format!("({status})\n{}", self.log())));
            }
            self.answers().then_some(Ok(()))
        });
        up.unwrap_or_else(|| panic!("tandemd {} did not come up:\n{}", self.name, self.log()))
    }

    /// `cmd` (its program and arguments), to run where this node runs: as it is on
    /// loopback, through `ip netns exec` in the node's namespace.
    pub fn here(&self, cmd: Command) -> Command {
        let Some(ns) = &self.ns else { return cmd };
        let mut inside = netns::exec(ns, cmd.get_program());
        inside.args(cmd.get_args());
        inside
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.api)
    }

    pub fn api_url(&self) -> String {
        self.url("")
    }

    /// An API request (from inside the node's namespace, if it has one); any HTTP
    /// status, or why there was no answer.
    pub fn try_api(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> Result<Response, String> {
        let url = self.url(path);
        match &self.ns {
            None => http(method, &url, body),
            Some(ns) => netns::in_ns(ns, || http(method, &url, body)),
        }
    }

    /// Whether the node's API answers `GET /v1/node` within a second: at start, its
    /// address may belong to something else that accepts and says nothing.
    fn answers(&self) -> bool {
        let url = self.url("/v1/node");
        let get = || {
            crate::request(None, "GET", &url, None, Duration::from_secs(1))
                .is_ok_and(|r| r.status == 200)
        };
        match &self.ns {
            None => get(),
            Some(ns) => netns::in_ns(ns, get),
        }
    }

    /// An API request; panics unless the API answers (with whatever status).
    pub fn api(&self, method: &str, path: &str, body: Option<&str>) -> Response {
        self.try_api(method, path, body)
            .unwrap_or_else(|e| panic!("API of {} unreachable: {e}", self.name))
    }

    /// An API request carrying a cluster secret (`Authorization: Bearer SECRET`); panics
    /// unless the API answers (with whatever status).
    pub fn api_as(&self, secret: &str, method: &str, path: &str, body: Option<&str>) -> Response {
        let url = self.url(path);
        let result = match &self.ns {
            None => http_as(Some(secret), method, &url, body),
            Some(ns) => netns::in_ns(ns, || http_as(Some(secret), method, &url, body)),
        };
        result.unwrap_or_else(|e| panic!("API of {} unreachable: {e}", self.name))
    }

    /// The `tandem` command, pointed at this node's API.
    pub fn tandem(&self) -> Command {
        let mut cmd = Command::new(tandem_bin());
        cmd.args(["--controller", &self.api_url()]);
        cmd
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("nbd.sock")
    }

    /// `nbd://` URI of a volume on this node (TCP); for a node in a namespace, reachable
    /// from inside it (see [`Node::here`]) or from another host's namespace.
    pub fn uri(&self, volume: &str) -> String {
        format!("nbd://{}/{volume}", self.nbd)
    }

    /// `nbd+unix://` URI of a volume on this node (a path socket works from any
    /// namespace, but bypasses the network).
    pub fn unix_uri(&self, volume: &str) -> String {
        format!("nbd+unix:///{volume}?socket={}", self.socket().display())
    }

    pub fn data_file(&self, volume: &str) -> PathBuf {
        self.dir.join("pools/default").join(format!("{volume}.raw"))
    }

    /// Removes this candidate's replica of the system volume (the controller's
    /// database) and its spec, as a lost disk would; the node must be stopped.
    pub fn destroy_system_volume(&self) {
        assert!(self.child.is_none(), "stop or kill the node first");
        for file in [
            "specs/tandem-controller.json",
            "system-pool/tandem-controller.raw",
            "system-pool/tandem-controller.meta",
        ] {
            let path = self.dir.join(file);
            std::fs::remove_file(&path)
                .unwrap_or_else(|e| panic!("removing {}: {e}", path.display()));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("tandemd.log")).unwrap_or_default()
    }

    pub fn create_volume(&self, name: &str, size: u64) {
        let body = format!(r#"{{"name":"{name}","size":{size}}}"#);
        let r = self.api("POST", "/v1/node/volumes", Some(&body));
        assert_eq!(r.status, 201, "creating {name}: {}", r.body);
    }

    /// The volume as the API shows it (JSON); panics unless it is there.
    pub fn volume(&self, name: &str) -> Value {
        let r = self.api("GET", &format!("/v1/node/volumes/{name}"), None);
        assert_eq!(r.status, 200, "GET volume {name}: {}", r.body);
        r.json()
    }

    /// Changes a volume (PATCH with `body`); panics unless accepted; returns the volume.
    pub fn patch_volume(&self, name: &str, body: &str) -> Value {
        let r = self.api("PATCH", &format!("/v1/node/volumes/{name}"), Some(body));
        assert_eq!(r.status, 200, "PATCH {name} with {body}: {}", r.body);
        r.json()
    }

    /// Waits until `want` NBD clients have the volume open (connections are torn down
    /// asynchronously).
    pub fn wait_open(&self, volume: &str, want: u64) {
        wait_for(
            &format!("{volume} is open {want} times"),
            Duration::from_secs(10),
            &[self],
            || {
                let open = self.volume(volume)["open"].as_u64();
                if open == Some(want) {
                    Ok(())
                } else {
                    Err(format!("open={open:?}"))
                }
            },
        )
    }

    /// Gives this node a volume spec; panics unless accepted.
    pub fn put_spec(&self, name: &str, spec: &str) -> Value {
        let r = self.api("PUT", &format!("/v1/node/volumes/{name}/spec"), Some(spec));
        assert_eq!(
            r.status, 200,
            "spec for {name} refused by {}: {}",
            self.name, r.body
        );
        r.json()
    }

    /// The volume's status on this node (JSON).
    pub fn status(&self, name: &str) -> Value {
        let r = self.api("GET", &format!("/v1/node/volumes/{name}/status"), None);
        assert_eq!(
            r.status, 200,
            "status of {name} on {}: {}",
            self.name, r.body
        );
        r.json()
    }

    /// This node's view of peer `node` of volume `name` (from the status).
    pub fn peer_status(&self, name: &str, node: &str) -> Value {
        let status = self.status(name);
        status["peers"]
            .as_array()
            .and_then(|peers| peers.iter().find(|p| p["node"] == node).cloned())
            .unwrap_or_else(|| panic!("{}: no peer {node} in {status:#}", self.name))
    }

    /// Waits until the status of `name` on this node satisfies `ok`, for at most
    /// `timeout`, and returns it; on timeout panics with `what` was awaited, the last
    /// status and the node's log.
    pub fn wait_status(
        &self,
        name: &str,
        what: &str,
        timeout: Duration,
        mut ok: impl FnMut(&Value) -> bool,
    ) -> Value {
        wait_for(&format!("{}: {what}", self.name), timeout, &[self], || {
            let status = self.status(name);
            if ok(&status) {
                Ok(status)
            } else {
                Err(format!("status of {name}: {status:#}"))
            }
        })
    }

    /// Waits until this node sees every peer of `name` connected.
    pub fn wait_connected(&self, name: &str, timeout: Duration) {
        self.wait_status(name, "every peer is connected", timeout, |status| {
            status["peers"]
                .as_array()
                .is_none_or(|peers| peers.iter().all(|p| p["connection"] == "Connected"))
        });
    }

    /// Waits (up to 60 s) until this node sees peer `peer_index` of `name` in the given
    /// replication state and disk state; returns the status.
    pub fn wait_peer(&self, name: &str, peer_index: usize, replication: &str, disk: &str) -> Value {
        self.wait_status(
            name,
            &format!("peer {peer_index} is {replication}/{disk}"),
            Duration::from_secs(60),
            |status| {
                let peer = &status["peers"][peer_index];
                peer["replication"] == replication && peer["disk"] == disk
            },
        )
    }

    /// Runs `qemu-io -f raw -c <command>...` where this node runs, against its TCP export
    /// of `volume`; panics (with the node's log) unless every command succeeds; returns
    /// stdout.
    pub fn qemu_io(&self, volume: &str, commands: &[&str]) -> String {
        let cmd = qemu_io_command(&["-f", "raw"], commands, &[&self.uri(volume)]);
        qemu_io_result(&mut self.here(cmd)).unwrap_or_else(|e| {
            panic!(
                "qemu-io on {} ({commands:?}) failed: {e}\n{}",
                self.name,
                logs(&[self])
            )
        })
    }

    /// An interactive `qemu-io` where this node runs, holding `volume` open (and so this
    /// node Primary) until it quits or is killed.
    pub fn qemu_io_session(&self, volume: &str) -> QemuIo {
        let cmd = qemu_io_command(&["-f", "raw"], &[], &[&self.uri(volume)]);
        QemuIo::spawn(&mut self.here(cmd))
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGTERM, then waits for a clean exit.
    pub fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        // SAFETY: signals our own child process.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        child.wait().expect("wait for tandemd")
    }

    /// SIGTERM, then up to `limit` for a clean exit; past it, SIGKILL and `None`.
    pub fn stop_within(&mut self, limit: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take().expect("running");
        // SAFETY: signals our own child process.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let status = crate::wait_exit(&mut child, limit);
        if status.is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
        status
    }

    /// SIGKILL: a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop or kill the node first");
        self.launch();
    }

    /// Restarts it with `extra` flags from now on (`--restore-db FILE`, say).
    pub fn restart_with(&mut self, extra: &[&str]) {
        self.args.extend(extra.iter().map(|s| s.to_string()));
        self.restart();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The logs of `nodes`, one after the other.
pub fn logs(nodes: &[&Node]) -> String {
    nodes
        .iter()
        .map(|n| format!("---- tandemd.log of {} ----\n{}", n.name, n.log()))
        .collect()
}

/// What a participant holds in a replicated volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Diskful,
    Diskless,
    Tiebreaker,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Diskful => "diskful",
            Kind::Diskless => "diskless",
            Kind::Tiebreaker => "tiebreaker",
        }
    }
}

/// Two diskful replicas and a tiebreaker: quorum survives the loss of any one node.
pub const WITH_TIEBREAKER: [Kind; 3] = [Kind::Diskful, Kind::Diskful, Kind::Tiebreaker];

/// Two diskful replicas and nothing else (usually with [`QUORUM_OFF`]).
pub const TWO_REPLICAS: [Kind; 2] = [Kind::Diskful, Kind::Diskful];

/// Volume options (see [`spec`]) that turn quorum off.
pub const QUORUM_OFF: &str = r#""quorum":"off""#;

/// A replicated volume's spec over `nodes` (node id = position), as JSON.
pub fn spec(name: &str, size: u64, nodes: &[(&Node, Kind)], options: &str) -> String {
    let participants: Vec<String> = nodes
        .iter()
        .enumerate()
        .map(|(id, (node, kind))| {
            format!(
                r#"{{"node-id":{id},"node":"{}","address":"{}","kind":"{}"}}"#,
                node.name,
                node.peer,
                kind.as_str()
            )
        })
        .collect();
    // One id per volume name within a test run is enough: derive it from the name.
    let mut volume_id = [0u8; 16];
    for (i, b) in name.bytes().enumerate() {
        volume_id[i % 16] ^= b.wrapping_add(i as u8);
    }
    volume_id[15] ^= 0x5a;
    let hex: String = volume_id.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        r#"{{"cluster-id":"0123456789abcdef0123456789abcdef","volume-id":"{hex}","name":"{name}","size":{size},"participants":[{}],"options":{{{options}}}}}"#,
        participants.join(",")
    )
}

/// Gives each of `nodes` the spec of replicated volume `name` over all of them (node id =
/// position, `kinds[i]` for `nodes[i]`); panics unless every node accepts it.
pub fn put_replicated(nodes: &[Node], name: &str, size: u64, kinds: &[Kind], options: &str) {
    assert_eq!(nodes.len(), kinds.len(), "one kind per node");
    let members: Vec<(&Node, Kind)> = nodes.iter().zip(kinds.iter().copied()).collect();
    let spec = spec(name, size, &members, options);
    for n in nodes {
        n.put_spec(name, &spec);
    }
}

/// Starts a loopback node per name in `nodes` and gives them all replicated volume `name`,
/// `kinds[i]` on `nodes[i]` (see [`put_replicated`]). Nothing waits for them to connect.
pub fn start_replicated<const N: usize>(
    name: &str,
    size: u64,
    nodes: [&str; N],
    kinds: [Kind; N],
    options: &str,
) -> [Node; N] {
    let nodes = nodes.map(Node::start);
    put_replicated(&nodes, name, size, &kinds, options);
    nodes
}

/// Asserts `a` and `b` hold the same bytes in their data files of `volume`; panics with
/// the first difference and both nodes' logs.
pub fn assert_same_replicas(a: &Node, b: &Node, volume: &str) {
    if let Some(at) = first_difference(&a.data_file(volume), &b.data_file(volume)) {
        panic!(
            "the replicas of {volume} on {} and {} differ at byte {at}\n{}",
            a.name,
            b.name,
            logs(&[a, b])
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_whose_port_is_taken_starts_on_others() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let [nbd, peer] = free_addrs();
        let node = Node::launch_new("clash", [taken.local_addr().unwrap(), nbd, peer], None, &[]);
        assert_ne!(node.api, taken.local_addr().unwrap());
        assert!(
            node.log().contains("serving the node API"),
            "{}",
            node.log()
        );
        let clash = std::fs::read_to_string(node.dir.join("tandemd-port-clash.log")).unwrap();
        assert!(clash.contains("Address already in use"), "{clash}");
    }
}
