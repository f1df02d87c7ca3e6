//! Multi-host tests on real network links: a switched topology of Linux network
//! namespaces, and `tandemd` nodes running inside them.
//!
//! ```text
//!   host 0 (netns)          host 1 (netns)              host N-1 (netns)
//!   eth0 198.18.77.1/24     eth0 198.18.77.2/24   ...   eth0 198.18.77.N/24
//!     |  veth                 |  veth                      |  veth
//!   p0 ---------------------- p1 ------------ br0 --------- pN-1   (switch netns)
//! ```
//!
//! The switch (a Linux bridge) lives in a namespace of its own, so nothing is created in
//! the root namespace: its routes, addresses and interfaces are never touched, and the
//! test range (198.18.0.0/15, reserved for benchmarking network devices) exists only
//! inside these namespaces, which have no way out. Each [`Lab`] has its own namespaces
//! (`tlab-<pid>-<n>-...`), so tests may run in parallel; interface names only need to be
//! unique inside a namespace (`eth0`, `br0`, `p<i>`).
//!
//! [`Lab::cut`] pulls a host's cable (its switch port goes down: the host keeps its
//! address and routes, frames are silently dropped, exactly as with a dead link);
//! [`Lab::limit`] shapes a host's link in both directions with `tbf`. Dropping the lab
//! deletes every namespace, which destroys the veths and the bridge, also after a panic.
//!
//! [`NsNode`] is a `tandemd` process started with `ip netns exec` on a host, listening on
//! the host's address only. The test process (root namespace) reaches its API from a
//! thread that joins the host's namespace ([`in_ns`]); NBD clients run in the host's
//! namespace too ([`NsNode::qemu_io`], [`NsNode::qemu_io_session`]). Data files live on
//! the shared file system and are read directly.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

use crate::{Kind, Response, http, scratch, tandemd_bin};

/// The first three octets of every host address (hosts are .1, .2, ...).
const SUBNET: [u8; 3] = [198, 18, 77];
pub const PEER_PORT: u16 = 7700;
pub const API_PORT: u16 = 3370;
pub const NBD_PORT: u16 = 10809;
const PREFIX: &str = "tlab";

/// One host: a network namespace with one interface, `eth0`, on the switch.
#[derive(Debug, Clone)]
pub struct Host {
    /// The namespace's name, for `ip netns exec`.
    pub ns: String,
    pub addr: IpAddr,
    /// The switch port (in the switch namespace) this host's cable plugs into.
    port: String,
}

/// A switch and N hosts on it. Dropping it removes everything it created.
pub struct Lab {
    switch: String,
    hosts: Vec<Host>,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn tc(ns: &str, args: &[&str]) {
    let out = Command::new("tc")
        .args(["-n", ns])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run tc: {e}"));
    assert!(
        out.status.success(),
        "tc -n {ns} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// Deletes namespaces left by lab processes that no longer exist (killed test runs).
fn remove_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let mut parts = name.split('-');
        if parts.next() != Some(PREFIX) {
            continue;
        }
        let Some(pid) = parts.next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "delete", name]);
        }
    }
}

impl Lab {
    /// Builds a switch and `n` hosts on it, or `None` (with a message saying the test is
    /// skipped) when this process may not create network namespaces.
    pub fn new(n: usize) -> Option<Lab> {
        assert!((1..=250).contains(&n), "1 to 250 hosts");
        // SAFETY: plain syscall.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: network namespaces need root");
            return None;
        }
        remove_stale();
        let id = format!("{PREFIX}-{}-{}", std::process::id(), unique());
        let mut lab = Lab {
            switch: format!("{id}-sw"),
            hosts: Vec::new(),
        };
        if let Err(e) = ip(&["netns", "add", &lab.switch]) {
            eprintln!("skipped: cannot create a network namespace: {e}");
            return None;
        }
        // From here on, `lab` cleans up whatever was made if a step fails.
        let built = (|| -> Result<(), String> {
            let sw = lab.switch.clone();
            ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"])?;
            ip(&["-n", &sw, "link", "set", "br0", "up"])?;
            for i in 0..n {
                let ns = format!("{id}-h{i}");
                ip(&["netns", "add", &ns])?;
                let host = Host {
                    ns: ns.clone(),
                    addr: IpAddr::V4(Ipv4Addr::new(SUBNET[0], SUBNET[1], SUBNET[2], i as u8 + 1)),
                    port: format!("p{i}"),
                };
                lab.hosts.push(host.clone());
                ip(&[
                    "-n", &sw, "link", "add", &host.port, "type", "veth", "peer", "name", "eth0",
                    "netns", &ns,
                ])?;
                ip(&["-n", &sw, "link", "set", &host.port, "master", "br0"])?;
                ip(&["-n", &sw, "link", "set", &host.port, "up"])?;
                ip(&["-n", &ns, "link", "set", "lo", "up"])?;
                let cidr = format!("{}/24", host.addr);
                ip(&["-n", &ns, "addr", "add", &cidr, "dev", "eth0"])?;
                ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            }
            Ok(())
        })();
        if let Err(e) = built {
            eprintln!("skipped: cannot build the network lab: {e}");
            return None;
        }
        Some(lab)
    }

    pub fn host(&self, i: usize) -> &Host {
        &self.hosts[i]
    }

    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// The namespace holding the switch (for `tc -n`, `ip -n`, tcpdump).
    pub fn switch_ns(&self) -> &str {
        &self.switch
    }

    /// Pulls host `i`'s cable: its switch port goes down, the host sees no carrier and
    /// every frame either way is dropped. Sockets are not told; peers notice only by
    /// silence.
    pub fn cut(&self, i: usize) {
        ip(&[
            "-n",
            &self.switch,
            "link",
            "set",
            &self.hosts[i].port,
            "down",
        ])
        .unwrap();
    }

    /// Plugs host `i`'s cable back in.
    pub fn heal(&self, i: usize) {
        ip(&["-n", &self.switch, "link", "set", &self.hosts[i].port, "up"]).unwrap();
    }

    /// Shapes host `i`'s link to `rate` (tc syntax: "2gbit", "100mbit") in both
    /// directions, with a token bucket (tbf).
    pub fn limit(&self, i: usize, rate: &str) {
        let tbf = [
            "qdisc", "replace", "dev", "", "root", "tbf", "rate", rate, "burst", "512kb",
            "latency", "50ms",
        ];
        let h = &self.hosts[i];
        let mut out = tbf;
        out[3] = "eth0";
        tc(&h.ns, &out);
        let mut back = tbf;
        back[3] = &h.port;
        tc(&self.switch, &back);
    }

    /// Removes the limit set by [`Lab::limit`].
    pub fn unlimit(&self, i: usize) {
        let h = &self.hosts[i];
        tc(&h.ns, &["qdisc", "del", "dev", "eth0", "root"]);
        tc(&self.switch, &["qdisc", "del", "dev", &h.port, "root"]);
    }

    /// Starts `tandemd` on host `i` as node `name`.
    pub fn start(&self, i: usize, name: &str) -> NsNode {
        NsNode::start(&self.hosts[i], name, &[])
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Deleting a namespace destroys its interfaces, and a veth dies with either end.
        for h in &self.hosts {
            let _ = ip(&["netns", "delete", &h.ns]);
        }
        let _ = ip(&["netns", "delete", &self.switch]);
    }
}

/// `ip netns exec <ns> <program>`: a command to run in a namespace.
pub fn exec(ns: &str, program: &str) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, program]);
    cmd
}

/// Runs `f` on a thread that has joined network namespace `ns`: sockets it creates
/// belong to that namespace. Other threads are unaffected.
pub fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    use std::os::fd::AsRawFd;
    let path = format!("/run/netns/{ns}");
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
            // SAFETY: joins the namespace for this thread only; `file` is a namespace fd.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    })
}

/// One `tandemd` process on a host, listening on the host's address only; its
/// directory and addresses survive restarts.
pub struct NsNode {
    pub name: String,
    pub ns: String,
    pub addr: IpAddr,
    pub dir: PathBuf,
    pub api: SocketAddr,
    pub nbd: SocketAddr,
    pub peer: SocketAddr,
    args: Vec<String>,
    child: Option<Child>,
}

impl NsNode {
    /// Starts `tandemd` on `host` with extra flags and waits until its API answers.
    pub fn start(host: &Host, name: &str, args: &[&str]) -> NsNode {
        let mut node = NsNode {
            name: name.to_owned(),
            ns: host.ns.clone(),
            addr: host.addr,
            dir: scratch(name),
            api: SocketAddr::new(host.addr, API_PORT),
            nbd: SocketAddr::new(host.addr, NBD_PORT),
            peer: SocketAddr::new(host.addr, PEER_PORT),
            args: args.iter().map(|s| s.to_string()).collect(),
            child: None,
        };
        node.launch();
        node
    }

    fn launch(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("tandemd.log"))
            .expect("log file");
        // `ip netns exec` execs the program: the child is tandemd itself.
        let child = exec(&self.ns, tandemd_bin().to_str().expect("UTF-8 path"))
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
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {:?} in {}: {e}", tandemd_bin(), self.ns));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "tandemd {} exited at start ({status}):\n{}",
                    self.name,
                    self.log()
                );
            }
            if self
                .try_api("GET", "/v1/node", None)
                .is_ok_and(|r| r.status == 200)
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("tandemd {} did not come up:\n{}", self.name, self.log());
    }

    /// An API request from inside the node's namespace; any HTTP status, or why there
    /// was no answer.
    pub fn try_api(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> Result<Response, String> {
        let url = format!("http://{}{path}", self.api);
        in_ns(&self.ns, || http(method, &url, body))
    }

    /// An API request; panics unless the API answers (with whatever status).
    pub fn api(&self, method: &str, path: &str, body: Option<&str>) -> Response {
        self.try_api(method, path, body)
            .unwrap_or_else(|e| panic!("API of {} unreachable: {e}", self.name))
    }

    /// Gives this node a volume spec; panics unless accepted.
    pub fn put_spec(&self, name: &str, spec: &str) -> serde_json::Value {
        let r = self.api("PUT", &format!("/v1/node/volumes/{name}/spec"), Some(spec));
        assert_eq!(
            r.status, 200,
            "spec for {name} refused by {}: {}",
            self.name, r.body
        );
        r.json()
    }

    /// The volume's status on this node (JSON).
    pub fn status(&self, name: &str) -> serde_json::Value {
        let r = self.api("GET", &format!("/v1/node/volumes/{name}/status"), None);
        assert_eq!(
            r.status, 200,
            "status of {name} on {}: {}",
            self.name, r.body
        );
        r.json()
    }

    /// This node's view of peer `node` of volume `name` (from the status).
    pub fn peer_status(&self, name: &str, node: &str) -> serde_json::Value {
        let status = self.status(name);
        status["peers"]
            .as_array()
            .and_then(|peers| peers.iter().find(|p| p["node"] == node).cloned())
            .unwrap_or_else(|| panic!("{}: no peer {node} in {status:#}", self.name))
    }

    /// Waits until this node sees every peer of `name` connected.
    pub fn wait_connected(&self, name: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.status(name);
            let peers = status["peers"].as_array().cloned().unwrap_or_default();
            if peers.iter().all(|p| p["connection"] == "Connected") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{}: peers of {name} not connected: {status:#}\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `nbd://` URI of a volume on this node; reachable from inside its namespace (see
    /// [`NsNode::qemu_io`]), or from another host's namespace over the lab network.
    pub fn uri(&self, volume: &str) -> String {
        format!("nbd://{}/{volume}", self.nbd)
    }

    /// `nbd+unix://` URI of a volume on this node (a path socket works from any
    /// namespace, but bypasses the network).
    pub fn unix_uri(&self, volume: &str) -> String {
        format!(
            "nbd+unix:///{volume}?socket={}",
            self.dir.join("nbd.sock").display()
        )
    }

    /// Runs `qemu-io -f raw -c <command>... <uri>` in this node's namespace against its
    /// TCP export of `volume`; returns whatever happened.
    pub fn qemu_io(&self, volume: &str, commands: &[&str]) -> Output {
        let mut cmd = exec(&self.ns, "qemu-io");
        cmd.args(["-f", "raw"]);
        for c in commands {
            cmd.args(["-c", c]);
        }
        crate::output(cmd.arg(self.uri(volume)))
    }

    /// An interactive `qemu-io` in this node's namespace, holding `volume` open (and so
    /// this node Primary) until it quits or is killed.
    pub fn qemu_io_session(&self, volume: &str) -> QemuIo {
        QemuIo::spawn(exec(&self.ns, "qemu-io").args(["-f", "raw", &self.uri(volume)]))
    }

    pub fn data_file(&self, volume: &str) -> PathBuf {
        self.dir.join("pools/default").join(format!("{volume}.raw"))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("tandemd.log")).unwrap_or_default()
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
}

impl Drop for NsNode {
    fn drop(&mut self) {
        self.kill();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A replicated volume's spec over `nodes` (node id = position), as JSON; like
/// [`crate::spec`], with the nodes' namespace addresses.
pub fn spec(name: &str, size: u64, nodes: &[(&NsNode, Kind)], options: &str) -> String {
    let participants: Vec<String> = nodes
        .iter()
        .enumerate()
        .map(|(id, (node, kind))| {
            let kind = match kind {
                Kind::Diskful => "diskful",
                Kind::Diskless => "diskless",
                Kind::Tiebreaker => "tiebreaker",
            };
            format!(
                r#"{{"node-id":{id},"node":"{}","address":"{}","kind":"{kind}"}}"#,
                node.name, node.peer
            )
        })
        .collect();
    let mut volume_id = [0u8; 16];
    for (i, b) in name.bytes().enumerate() {
        volume_id[i % 16] ^= b.wrapping_add(i as u8);
    }
    volume_id[15] ^= 0xa5;
    let hex: String = volume_id.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        r#"{{"cluster-id":"0123456789abcdef0123456789abcdef","volume-id":"{hex}","name":"{name}","size":{size},"participants":[{}],"options":{{{options}}}}}"#,
        participants.join(",")
    )
}

/// An interactive `qemu-io`: one command at a time, each answered by its output once
/// the next prompt appears, or not within a timeout (the command hangs; its output can
/// still be awaited with [`QemuIo::wait`]).
pub struct QemuIo {
    child: Child,
    stdin: Option<ChildStdin>,
    output: Receiver<Vec<u8>>,
    pending: Vec<u8>,
    /// The command whose answer has not arrived yet.
    busy: bool,
}

const PROMPT: &[u8] = b"qemu-io> ";

impl QemuIo {
    /// Spawns `cmd` (a qemu-io without `-c`) and waits for its first prompt.
    pub fn spawn(cmd: &mut Command) -> QemuIo {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
        let (tx, output) = channel();
        for mut pipe in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = pipe.read(&mut buf) {
                    if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                        break;
                    }
                }
            });
        }
        let mut session = QemuIo {
            stdin: child.stdin.take(),
            child,
            output,
            pending: Vec::new(),
            busy: true,
        };
        if let Some(text) = session.wait(Duration::from_secs(20)) {
            assert!(
                text.trim().is_empty(),
                "qemu-io said at start: {text}; exit: {:?}",
                session.child.try_wait()
            );
        } else {
            let _ = session.child.kill();
            panic!(
                "qemu-io did not start ({cmd:?}): {}",
                String::from_utf8_lossy(&session.pending)
            );
        }
        session
    }

    /// Sends one command and returns its output, or `None` if it has not finished
    /// within `timeout`.
    pub fn command(&mut self, command: &str, timeout: Duration) -> Option<String> {
        assert!(!self.busy, "the previous command has not finished");
        let stdin = self.stdin.as_mut().expect("qemu-io stdin open");
        writeln!(stdin, "{command}").expect("qemu-io stdin");
        stdin.flush().expect("qemu-io stdin");
        self.busy = true;
        self.wait(timeout)
    }

    /// Waits for the answer of the command in progress (or for the first prompt).
    pub fn wait(&mut self, timeout: Duration) -> Option<String> {
        assert!(self.busy, "no command in progress");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(at) = self.pending.windows(PROMPT.len()).position(|w| w == PROMPT) {
                let text = String::from_utf8_lossy(&self.pending[..at]).into_owned();
                self.pending.drain(..at + PROMPT.len());
                self.busy = false;
                return Some(text);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.output.recv_timeout(left) {
                Ok(chunk) => self.pending.extend(chunk),
                Err(RecvTimeoutError::Timeout) => return None,
                Err(RecvTimeoutError::Disconnected) => {
                    if self.pending.is_empty() {
                        return None;
                    }
                    // Exited: whatever it said last is the answer.
                    let text = String::from_utf8_lossy(&self.pending).into_owned();
                    self.pending.clear();
                    self.busy = false;
                    return Some(text);
                }
            }
        }
    }

    /// True once the process has exited.
    pub fn exited(&mut self) -> bool {
        self.child.try_wait().ok().flatten().is_some()
    }

    /// Quits (closing the export) and waits up to 20 s for the exit; a qemu-io still
    /// busy with a command, or not exiting, is killed instead. `None` when killed.
    pub fn quit(mut self) -> Option<ExitStatus> {
        if !self.busy {
            let _ = writeln!(self.stdin.as_mut().unwrap(), "quit");
            self.stdin.take();
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Some(status) = self.child.try_wait().expect("wait for qemu-io") {
                    return Some(status);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.kill();
        None
    }

    /// SIGKILL: the client dies with whatever it had in flight.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for QemuIo {
    fn drop(&mut self) {
        self.kill();
    }
}
