//! A cluster on loopback: `tandemd` nodes, the first running the controller, the
//! others joined through `tandem node create`; driven through the `tandem` binary.

use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::{Node, json, output, run, wait_for};

pub struct Cluster {
    pub nodes: Vec<Node>,
}

impl Cluster {
    /// Starts `n` nodes named `{prefix}1..`, the first with `--controller`, and joins the
    /// others to it.
    pub fn start(prefix: &str, n: usize) -> Cluster {
        Cluster::start_with(prefix, n, |_| Vec::new())
    }

    /// [`Cluster::start`], each node given the extra `tandemd` flags `args(name)`.
    pub fn start_with(prefix: &str, n: usize, args: impl Fn(&str) -> Vec<String>) -> Cluster {
        let mut nodes = Vec::new();
        for i in 1..=n {
            let name = format!("{prefix}{i}");
            let mut flags = args(&name);
            if i == 1 {
                flags.push("--controller".into());
            }
            let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
            nodes.push(Node::start_with(&name, &flags));
        }
        let cluster = Cluster { nodes };
        for node in &cluster.nodes[1..] {
            run(cluster
                .tandem()
                .args(["node", "create", &node.name, &node.api.to_string()]));
        }
        cluster.wait_nodes_online();
        cluster
    }

    /// `tandem` pointed at the controller.
    pub fn tandem(&self) -> Command {
        self.nodes[0].tandem()
    }

    /// Runs `tandem -o json ARGS` and parses its output.
    pub fn json(&self, args: &[&str]) -> Value {
        json(&run(self.tandem().args(["-o", "json"]).args(args)))
    }

    /// The names of the cluster's volumes (`tandem volume list`), sorted.
    pub fn volume_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .json(&["volume", "list"])
            .as_array()
            .expect("a list")
            .iter()
            .map(|v| v["name"].as_str().expect("a name").to_owned())
            .collect();
        names.sort();
        names
    }

    /// `tandem ARGS`, expected to fail: its stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = output(self.tandem().args(args));
        assert!(
            !out.status.success(),
            "tandem {args:?} succeeded:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    pub fn node(&self, name: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    pub fn node_mut(&mut self, name: &str) -> &mut Node {
        self.nodes
            .iter_mut()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    fn refs(&self) -> Vec<&Node> {
        self.nodes.iter().collect()
    }

    pub fn wait_nodes_online(&self) {
        wait_for(
            "every node is Online",
            Duration::from_secs(30),
            &self.refs(),
            || {
                let nodes = self.json(&["node", "list"]);
                let states: Vec<String> = nodes
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|n| format!("{}:{}", n["name"], n["state"]))
                    .collect();
                if states.len() == self.nodes.len()
                    && states.iter().all(|s| s.ends_with("\"Online\""))
                {
                    Ok(())
                } else {
                    Err(states.join(" "))
                }
            },
        );
    }

    /// Waits until every volume the controller lists is UpToDate.
    pub fn wait_up_to_date(&self, timeout: Duration) -> Value {
        wait_for("every volume is UpToDate", timeout, &self.refs(), || {
            let volumes = self.json(&["volume", "list"]);
            let behind: Vec<String> = volumes
                .as_array()
                .unwrap()
                .iter()
                .filter(|v| v["state"] != "UpToDate")
                .map(|v| format!("{}:{}", v["name"], v["state"]))
                .collect();
            if behind.is_empty() {
                Ok(volumes)
            } else {
                Err(behind.join(" "))
            }
        })
    }

    /// The nodes of a volume's participants of `kind` (diskful, diskless, tiebreaker).
    pub fn participants(volume: &Value, kind: &str) -> Vec<String> {
        volume["participants"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["kind"] == kind)
            .map(|p| p["node"].as_str().unwrap().to_owned())
            .collect()
    }

    /// `tandem health` exit code and output.
    pub fn health(&self) -> (i32, String) {
        let out = output(self.tandem().arg("health"));
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    /// The names of the replicated volumes `node` holds, as it reports them.
    pub fn held_by(&self, node: &str) -> Vec<String> {
        let secret = self.secret();
        let r = self
            .node(node)
            .api_as(&secret, "GET", "/v1/node/replicated", None);
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["spec"]["name"].as_str().unwrap().to_owned())
            .collect()
    }

    /// The cluster secret, read from a joined node's data directory.
    pub fn secret(&self) -> String {
        let path = self.nodes[0].dir.join("cluster.json");
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        json(&text)["secret"].as_str().unwrap().to_owned()
    }
}

/// Up to how many seconds it may take a change to reach the nodes (a few visits).
pub const CONVERGE: Duration = Duration::from_secs(30);
