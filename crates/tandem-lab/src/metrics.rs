//! A node's `/metrics`, read through the Prometheus client library's strict
//! OpenMetrics parser (Debian's `python3-prometheus-client`), as a scraper would.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};

use crate::Node;

/// Parses OpenMetrics text from stdin with `prometheus_client` and prints each family
/// as a JSON line ["family", name, type], then each of its samples as [name, labels,
/// value].
const PARSE: &str = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
for family in text_string_to_metric_families(sys.stdin.read()):
    print(json.dumps(["family", family.name, family.type]))
    for s in family.samples:
        print(json.dumps([s.name, s.labels, s.value]))
"#;

/// One scrape, parsed: each sample's value by name and labels, each family's type.
pub struct Scrape {
    samples: BTreeMap<(String, String), f64>,
    pub types: BTreeMap<String, String>,
}

/// Labels as a key: sorted `k=v` pairs.
fn key(pairs: &[(&str, &str)]) -> String {
    let mut v: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
    v.sort();
    v.join(",")
}

impl Scrape {
    /// The sample `name` with exactly `labels`; panics if there is none.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .get(&(name.to_owned(), key(labels)))
            .copied()
            .unwrap_or_else(|| panic!("no sample {name}{{{}}} in the scrape", key(labels)))
    }
}

/// Parses an exposition; panics, with the parser's reason, if it is not valid
/// OpenMetrics.
pub fn parse(text: &str) -> Scrape {
    let mut child = Command::new("/usr/bin/python3")
        .args(["-c", PARSE])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 with prometheus_client (Debian: python3-prometheus-client)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("writing to the parser");
    let out = child.wait_with_output().expect("the parser's output");
    assert!(
        out.status.success(),
        "the OpenMetrics parser refused the exposition: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut scrape = Scrape {
        samples: BTreeMap::new(),
        types: BTreeMap::new(),
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let v = crate::json(line);
        if v[0] == "family" {
            let (name, kind) = (v[1].as_str().expect("name"), v[2].as_str().expect("type"));
            scrape.types.insert(name.to_owned(), kind.to_owned());
            continue;
        }
        let pairs: Vec<(&str, &str)> = v[1]
            .as_object()
            .expect("labels")
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str().expect("label value")))
            .collect();
        let name = v[0].as_str().expect("sample name").to_owned();
        scrape
            .samples
            .insert((name, key(&pairs)), v[2].as_f64().expect("value"));
    }
    scrape
}

impl Node {
    /// The node's `/metrics`, parsed (from inside its namespace, if it has one).
    pub fn metrics(&self) -> Scrape {
        let r = self.api("GET", "/metrics", None);
        assert_eq!(r.status, 200, "/metrics of {}: {}", self.name, r.body);
        parse(&r.body)
    }
}
