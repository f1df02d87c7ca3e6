//! A lab for system tests: `tandemd` nodes as real processes in scratch directories,
//! their API over HTTP, and the real NBD clients (qemu-io, nbdsh, fio, ...) run as
//! commands. Nodes live on loopback and under `target/lab/`, or on hosts of a switched
//! network of namespaces ([`netns`]).
//!
//! - [`Node`]: one `tandemd`, its API, its volumes and their replication status;
//!   [`start_replicated`] starts several and gives them one replicated volume.
//! - [`clients`]: qemu-io, nbdsh and fio, run the way the tests need them.
//! - [`wait`]: polling until a condition holds, or panicking with what was seen.
//! - [`files`]: byte-level checks of data files, and a small file system to fill.
//! - [`metrics`]: a node's `/metrics`, parsed as Prometheus would.

pub mod changes;
pub mod chaos;
pub mod clients;
mod cluster;
pub mod files;
pub mod metrics;
pub mod netns;
mod node;
mod pki;
pub mod wait;
pub mod workload;

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

pub use clients::{
    HeldClient, QemuIo, fio_jobs, nbdsh, qemu_io, qemu_io_command, qemu_io_result, qemu_io_with,
};
pub use cluster::{CONVERGE, Cluster};
pub use files::{
    SmallFs, assert_file_filled, assert_file_holds, assert_same_bytes, first_difference,
    not_filled, random_bytes, read_range,
};
pub use node::{
    Kind, Node, QUORUM_OFF, TWO_REPLICAS, WITH_TIEBREAKER, assert_same_replicas, logs,
    put_replicated, spec, start_replicated,
};
pub use pki::{make_ca, make_cert, openssl};
pub use wait::{Condition, poll, wait_exit, wait_for};

/// Directory holding the workspace's built binaries (`target/debug` or `target/release`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("executable path");
    // target/<profile>/deps/<test>-<hash>, or target/<profile>/<binary>
    let dir = exe.parent().expect("target/<profile>");
    if dir.ends_with("deps") {
        dir.parent().expect("target/<profile>").to_owned()
    } else {
        dir.to_owned()
    }
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

/// A number not returned before in this process.
pub(crate) fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// A free TCP port on loopback.
pub fn free_addr() -> SocketAddr {
    let [addr] = free_addrs();
    addr
}

/// `N` distinct free TCP ports on loopback: each is held until all are picked, or the
/// kernel could hand out one it had just given (a node's API and NBD ports alike).
pub fn free_addrs<const N: usize>() -> [SocketAddr; N] {
    let held: [TcpListener; N] =
        std::array::from_fn(|_| TcpListener::bind("127.0.0.1:0").expect("free port"));
    held.map(|l| l.local_addr().expect("bound address"))
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

/// Parses JSON; panics with the text when it is not JSON.
pub fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}):\n{text}"))
}

/// A minimal HTTP response.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: String,
}

impl Response {
    pub fn json(&self) -> serde_json::Value {
        json(&self.body)
    }
}

/// Sends an HTTP request with an optional raw body and returns status and body,
/// whatever the status.
pub fn http(method: &str, url: &str, body: Option<&str>) -> Result<Response, String> {
    http_as(None, method, url, body)
}

/// As [`http`], with `Authorization: Bearer SECRET` when a secret is given (the node API
/// of a node that has joined a cluster).
pub fn http_as(
    secret: Option<&str>,
    method: &str,
    url: &str,
    body: Option<&str>,
) -> Result<Response, String> {
    request(secret, method, url, body, HTTP_TIMEOUT)
}

/// An HTTP request with these headers; panics if it gets no answer at all.
pub fn http_headers(method: &str, url: &str, headers: &[(&str, &str)]) -> Response {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(HTTP_TIMEOUT))
        .build()
        .into();
    let mut req = ureq::http::Request::builder().method(method).uri(url);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let mut resp = agent
        .run(req.body(String::new()).expect("a valid request"))
        .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    Response {
        status: resp.status().as_u16(),
        body: resp.body_mut().read_to_string().unwrap_or_default(),
    }
}

/// Every input of fuzz target `target` kept in the repository: its corpus and the
/// crash inputs found (`fuzz/corpus/TARGET/`, `fuzz/artifacts/TARGET/`), sorted.
pub fn fuzz_inputs(target: &str) -> Vec<PathBuf> {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    let mut files = Vec::new();
    for kind in ["corpus", "artifacts"] {
        if let Ok(dir) = std::fs::read_dir(fuzz.join(kind).join(target)) {
            files.extend(dir.map(|e| e.expect("corpus entry").path()));
        }
    }
    files.sort();
    files
}

/// Replays every input of fuzz target `target` (at least `min` of them) through
/// `parse`: each gives a result or a non-empty reason for refusing it (a panic fails
/// the test), and the corpus holds both kinds. The counts, accepted and refused.
pub fn replay_fuzz_corpus(
    target: &str,
    min: usize,
    parse: impl Fn(&[u8]) -> Result<String, String>,
) -> (usize, usize) {
    let files = fuzz_inputs(target);
    assert!(
        files.len() >= min,
        "the corpus of {target} is missing: {files:?}"
    );
    let (mut accepted, mut refused) = (0, 0);
    for path in &files {
        let data = std::fs::read(path).expect("a corpus file");
        match parse(&data) {
            Ok(_) => accepted += 1,
            Err(why) => {
                assert!(
                    !why.is_empty(),
                    "{}: refused without a reason",
                    path.display()
                );
                refused += 1;
            }
        }
    }
    assert!(
        accepted > 0 && refused > 0,
        "{target}: {accepted} accepted, {refused} refused"
    );
    (accepted, refused)
}

/// How long a lab HTTP request may take: more than any API call needs, and a test
/// never hangs on one.
const HTTP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

pub(crate) fn request(
    secret: Option<&str>,
    method: &str,
    url: &str,
    body: Option<&str>,
    timeout: std::time::Duration,
) -> Result<Response, String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(timeout))
        .build()
        .into();
    let mut req = ureq::http::Request::builder()
        .method(method)
        .uri(url)
        .header("content-type", "application/json");
    if let Some(secret) = secret {
        req = req.header("authorization", format!("Bearer {secret}"));
    }
    let req = req
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

/// True when a command-line tool is installed.
pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .is_ok_and(|o| o.status.success())
}
