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
//! [`Lab::start`] starts a [`Node`] with `ip netns exec` on a host, listening on the
//! host's address only. The test process (root namespace) reaches its API from a thread
//! that joins the host's namespace ([`in_ns`]); NBD clients run in the host's namespace
//! too ([`Node::here`], [`Node::qemu_io`], [`Node::qemu_io_session`]). Data files live
//! on the shared file system and are read directly.

use std::ffi::OsStr;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};

use crate::{Node, unique};

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
    pub fn start(&self, i: usize, name: &str) -> Node {
        self.start_with(i, name, &[])
    }

    /// Starts `tandemd` on host `i` as node `name`, with extra flags.
    pub fn start_with(&self, i: usize, name: &str, args: &[&str]) -> Node {
        Node::start_on(&self.hosts[i], name, args)
    }

    /// Starts node `names[i]` on host `i`, for each name (then see
    /// [`crate::put_replicated`]).
    pub fn start_all<const N: usize>(&self, names: [&str; N]) -> [Node; N] {
        let mut host = 0..;
        names.map(|name| self.start(host.next().unwrap(), name))
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
pub fn exec(ns: &str, program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).arg(program);
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

impl Node {
    /// Starts `tandemd` on `host` with extra flags, listening on the host's address only,
    /// and waits until its API answers.
    pub fn start_on(host: &Host, name: &str, args: &[&str]) -> Node {
        let at = |port| SocketAddr::new(host.addr, port);
        Node::launch_new(
            name,
            [at(API_PORT), at(NBD_PORT), at(PEER_PORT)],
            Some(host.ns.clone()),
            args,
        )
    }
}
