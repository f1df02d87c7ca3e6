//! A lab for system tests: `tandemd` nodes as real processes in scratch directories,
//! their API over HTTP, and the real NBD clients (qemu-io, nbdsh, fio, ...) run as
//! commands. Everything lives on loopback and under `target/lab/`.

pub mod netns;
pub mod workload;

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// Directory holding the workspace's built binaries (`target/debug` or `target/release`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test>-<hash>
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>")
        .to_owned()
}

pub fn tandemd_bin() -> PathBuf {
    bin_dir().join("tandemd")
}

pub fn tandem_bin() -> PathBuf {
    bin_dir().join("tandem")
}

/// A fresh scratch directory under `target/lab/`, on the same file system as the build
/// (which supports direct I/O, unlike a tmpfs `/tmp`).
pub fn scratch(label: &str) -> PathBuf {
    let base = bin_dir().parent().expect("target dir").join("lab");
    let dir = base.join(format!("{label}-{}-{}", std::process::id(), unique()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// A free TCP port on loopback.
pub fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
}

/// Runs a command, panicking with its output unless it succeeds; returns stdout.
pub fn run(cmd: &mut Command) -> String {
    let out = output(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command and returns what happened, whatever it was.
pub fn output(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// A minimal HTTP response.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: String,
}

impl Response {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// Sends an HTTP request with an optional raw body and returns status and body,
/// whatever the status.
pub fn http(method: &str, url: &str, body: Option<&str>) -> Result<Response, String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let req = ureq::http::Request::builder()
        .method(method)
        .uri(url)
        .header("content-type", "application/json")
        .body(body.unwrap_or("").to_owned())
        .map_err(|e| e.to_string())?;
    let mut resp = agent.run(req).map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp
        .body_mut()
        .read_to_string()
        .map_err(|e| e.to_string())?;
    Ok(Response { status, body })
}

/// One `tandemd` process and its directories and addresses, which survive restarts.
pub struct Node {
    pub name: String,
    pub dir: PathBuf,
    pub api: SocketAddr,
    pub nbd: SocketAddr,
    pub peer: SocketAddr,
    args: Vec<String>,
    child: Option<Child>,
}

impl Node {
    pub fn start(name: &str) -> Node {
        Node::start_with(name, &[])
    }

    /// Starts a node with extra `tandemd` flags and waits until its API answers.
    pub fn start_with(name: &str, args: &[&str]) -> Node {
        let mut node = Node {
            name: name.to_owned(),
            dir: scratch(name),
            api: free_addr(),
            nbd: free_addr(),
            peer: free_addr(),
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
        let child = Command::new(tandemd_bin())
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
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {:?} ({e}); build it with `cargo build --workspace`",
                    tandemd_bin()
                )
            });
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
            if http("GET", &self.url("/v1/node"), None).is_ok_and(|r| r.status == 200) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("tandemd {} did not come up:\n{}", self.name, self.log());
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.api)
    }

    pub fn api_url(&self) -> String {
        self.url("")
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("nbd.sock")
    }

    /// `nbd://` URI of a volume on this node (TCP).
    pub fn uri(&self, volume: &str) -> String {
        format!("nbd://{}/{volume}", self.nbd)
    }

    /// `nbd+unix://` URI of a volume on this node.
    pub fn unix_uri(&self, volume: &str) -> String {
        format!("nbd+unix:///{volume}?socket={}", self.socket().display())
    }

    pub fn data_file(&self, volume: &str) -> PathBuf {
        self.dir.join("pools/default").join(format!("{volume}.raw"))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("tandemd.log")).unwrap_or_default()
    }

    pub fn create_volume(&self, name: &str, size: u64) {
        let body = format!(r#"{{"name":"{name}","size":{size}}}"#);
        let r = http("POST", &self.url("/v1/node/volumes"), Some(&body)).expect("API reachable");
        assert_eq!(r.status, 201, "creating {name}: {}", r.body);
    }

    pub fn api(&self, method: &str, path: &str, body: Option<&str>) -> Response {
        http(method, &self.url(path), body).expect("API reachable")
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

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
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

impl Node {
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
}

/// The first offset where two files differ (length counts), or `None` if identical.
pub fn first_difference(a: &Path, b: &Path) -> Option<u64> {
    use std::io::Read;
    let open = |p: &Path| std::fs::File::open(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let (mut fa, mut fb) = (open(a), open(b));
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut at = 0u64;
    loop {
        let na = read_full(&mut fa, &mut ba);
        let nb = read_full(&mut fb, &mut bb);
        if let Some(i) = (0..na.min(nb)).find(|&i| ba[i] != bb[i]) {
            return Some(at + i as u64);
        }
        if na != nb {
            return Some(at + na.min(nb) as u64);
        }
        if na == 0 {
            return None;
        }
        at += na as u64;
    }

    fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> usize {
        let mut n = 0;
        while n < buf.len() {
            match f.read(&mut buf[n..]).expect("read") {
                0 => break,
                k => n += k,
            }
        }
        n
    }
}

/// True when a command-line tool is installed.
pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .is_ok_and(|o| o.status.success())
}
