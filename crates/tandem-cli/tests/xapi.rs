//! The XCP-ng storage plugins, called as xapi-storage-script calls them: each entry
//! point executed directly (argv `[path, "--json"]`, the parameters as one JSON object
//! on stdin, no shell), every answer checked against the types of xapi-storage 5.0 and
//! every failure against the error shape; the bytes written through the NBD URI a
//! datapath attach returns read back with qemu-io.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde_json::{Value, json};
use tandem_lab::{Cluster, SmallFs, qemu_io, qemu_io_command, qemu_io_result, qemu_io_with, run};

const SR: &str = "5f0c6a47-2b1e-4d4f-9a58-0a1b2c3d4e5f";

/// The plugins installed for each node of a cluster, in a root of their own.
struct Plugins {
    roots: Vec<PathBuf>,
}

/// A call's outcome: the result, or the error object.
type Answer = Result<Value, Value>;

impl Plugins {
    fn install(c: &Cluster) -> Plugins {
        let roots = c
            .nodes
            .iter()
            .map(|n| {
                let root = n.dir.join("xapi");
                run(c.tandem().args([
                    "xapi",
                    "install",
                    "--root",
                    root.to_str().unwrap(),
                    "--api",
                    &n.api_url(),
                    "--host-uuid",
                    &format!("host-{}", n.name),
                ]));
                root
            })
            .collect();
        Plugins { roots }
    }

    /// The entry point of `method`: the datapath plugin's for `Datapath.*` and for
    /// `datapath:METHOD`, else the volume plugin's.
    fn path(&self, node: usize, method: &str) -> PathBuf {
        let (dir, file) = match method.strip_prefix("datapath:") {
            Some(m) => ("datapath/tandem", m),
            None if method.starts_with("Datapath.") => ("datapath/tandem", method),
            None => ("volume/org.xen.xapi.storage.tandem", method),
        };
        self.roots[node].join(dir).join(file)
    }

    /// Runs the entry point with `params` (and a `dbg`) and `env` added.
    fn call_env(
        &self,
        node: usize,
        method: &str,
        params: Value,
        env: &[(&str, &str)],
    ) -> (Option<i32>, String) {
        let mut input = params;
        input["dbg"] = json!("test");
        let mut child = Command::new(self.path(node, method))
            .arg("--json")
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("running {method}: {e}"));
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.to_string().as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    fn call(&self, node: usize, method: &str, params: Value) -> Answer {
        let (code, stdout) = self.call_env(node, method, params, &[]);
        let value: Value = serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("{method} printed no JSON ({e}): {stdout:?}"));
        let method = method.trim_start_matches("datapath:");
        if code == Some(0) {
            check_result(method, &value);
            Ok(value)
        } else {
            check_error(method, &value);
            Err(value)
        }
    }

    fn ok(&self, node: usize, method: &str, params: Value) -> Value {
        self.call(node, method, params)
            .unwrap_or_else(|e| panic!("{method} failed: {e:#}"))
    }

    /// The error a call must fail with: its code and joined parameters.
    fn err(&self, node: usize, method: &str, params: Value) -> (String, String) {
        match self.call(node, method, params) {
            Ok(v) => panic!("{method} succeeded: {v:#}"),
            Err(e) => (
                e["code"].as_str().unwrap().to_owned(),
                e["params"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| p.as_str().unwrap())
                    .collect::<Vec<_>>()
                    .join(" | "),
            ),
        }
    }
}

// ---- the types of xapi-storage 5.0 --------------------------------------------------

fn is_int(v: &Value) -> bool {
    v.is_i64() || v.is_u64()
}

fn is_dict(v: &Value) -> bool {
    v.as_object()
        .is_some_and(|o| o.values().all(Value::is_string))
}

fn is_strings(v: &Value) -> bool {
    v.as_array().is_some_and(|a| a.iter().all(Value::is_string))
}

/// A JSON type.
type Check = fn(&Value) -> bool;

/// Checks `fields` of `v`: (name, type, required).
fn fields(what: &str, v: &Value, fields: &[(&str, Check, bool)]) {
    let o = v
        .as_object()
        .unwrap_or_else(|| panic!("{what} is not an object: {v}"));
    for (name, check, required) in fields {
        match o.get(*name) {
            None => assert!(!required, "{what} lacks {name}: {v:#}"),
            // An option is absent when None: present, it holds the value, never null.
            Some(x) => assert!(check(x), "{what}.{name} has the wrong type: {v:#}"),
        }
    }
}

fn check_volume(v: &Value) {
    fields(
        "volume",
        v,
        &[
            ("key", Value::is_string, true),
            ("uuid", Value::is_string, false),
            ("name", Value::is_string, true),
            ("description", Value::is_string, true),
            ("read_write", Value::is_boolean, true),
            ("sharable", Value::is_boolean, true),
            ("virtual_size", is_int, true),
            ("physical_utilisation", is_int, true),
            ("uri", is_strings, true),
            ("keys", is_dict, true),
            ("cbt_enabled", Value::is_boolean, false),
            (
                "volume_type",
                |t| {
                    ["Data", "CBT_Metadata", "Data_and_CBT_Metadata"]
                        .contains(&t.as_str().unwrap_or(""))
                },
                false,
            ),
        ],
    );
}

fn check_sr_stat(v: &Value) {
    fields(
        "sr_stat",
        v,
        &[
            ("sr", Value::is_string, true),
            ("name", Value::is_string, true),
            ("uuid", Value::is_string, false),
            ("description", Value::is_string, true),
            ("free_space", is_int, true),
            ("total_space", is_int, true),
            ("datasources", is_strings, true),
            ("clustered", Value::is_boolean, true),
            (
                "health",
                |h| {
                    h.as_array().is_some_and(|a| {
                        a.len() == 2
                            && a[1].is_string()
                            && ["Healthy", "Recovering", "Unreachable", "Unavailable"]
                                .contains(&a[0].as_str().unwrap_or(""))
                    })
                },
                true,
            ),
        ],
    );
}

fn check_result(method: &str, v: &Value) {
    match method {
        "Plugin.Query" => fields(
            "query_result",
            v,
            &[
                ("plugin", Value::is_string, true),
                ("name", Value::is_string, true),
                ("description", Value::is_string, true),
                ("vendor", Value::is_string, true),
                ("copyright", Value::is_string, true),
                ("version", Value::is_string, true),
                ("required_api_version", |x| x == "5.0", true),
                ("features", is_strings, true),
                ("configuration", is_dict, true),
                ("required_cluster_stack", is_strings, true),
            ],
        ),
        "Plugin.diagnostics" | "SR.attach" => assert!(v.is_string(), "{method}: {v}"),
        "Plugin.ls" => assert!(is_strings(v), "{method}: {v}"),
        "SR.create" => assert!(is_dict(v), "{method}: {v}"),
        "SR.stat" => check_sr_stat(v),
        "SR.ls" => v.as_array().unwrap().iter().for_each(check_volume),
        "SR.probe" => {
            for p in v.as_array().unwrap() {
                fields(
                    "probe_result",
                    p,
                    &[
                        ("configuration", is_dict, true),
                        ("complete", Value::is_boolean, true),
                        ("extra_info", is_dict, true),
                    ],
                );
                if let Some(s) = p.get("sr") {
                    check_sr_stat(s);
                }
            }
        }
        "Volume.create" | "Volume.snapshot" | "Volume.clone" | "Volume.stat" => check_volume(v),
        "Volume.list_changed_blocks" => fields(
            "changed blocks",
            v,
            &[
                ("granularity", is_int, true),
                ("bitmap", Value::is_string, true),
            ],
        ),
        "Datapath.attach" => {
            let imps = v["implementations"]
                .as_array()
                .unwrap_or_else(|| panic!("{v}"));
            for i in imps {
                let pair = i.as_array().unwrap();
                assert_eq!(pair.len(), 2, "{i}");
                match pair[0].as_str().unwrap() {
                    "XenDisk" => fields(
                        "XenDisk",
                        &pair[1],
                        &[
                            ("params", Value::is_string, true),
                            ("extra", is_dict, true),
                            (
                                "backend_type",
                                |b| {
                                    ["vbd", "vbd3", "qdisk", "9pfs"]
                                        .contains(&b.as_str().unwrap_or(""))
                                },
                                true,
                            ),
                        ],
                    ),
                    "Nbd" => fields("Nbd", &pair[1], &[("uri", Value::is_string, true)]),
                    other => panic!("unexpected implementation {other}"),
                }
            }
            // xapi needs a XenDisk for a guest's disk.
            assert!(imps.iter().any(|i| i[0] == "XenDisk"), "{v}");
        }
        // Every other method returns unit.
        _ => assert!(v.is_null(), "{method} returned {v}, not null"),
    }
}

fn check_error(method: &str, v: &Value) {
    fields(
        &format!("{method} error"),
        v,
        &[
            ("code", Value::is_string, true),
            ("params", is_strings, true),
            (
                "backtrace",
                |b| b["error"].is_string() && b["files"].is_array() && b["lines"].is_array(),
                true,
            ),
        ],
    );
}

// ---- helpers ------------------------------------------------------------------------

fn nbd_of(attach: &Value) -> String {
    attach["implementations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i[0] == "Nbd")
        .map(|i| i[1]["uri"].as_str().unwrap().to_owned())
        .unwrap_or_else(|| panic!("no Nbd implementation: {attach}"))
}

fn key_of(v: &Value) -> String {
    v["key"].as_str().unwrap().to_owned()
}

fn uri_of(v: &Value) -> String {
    v["uri"][0].as_str().unwrap().to_owned()
}

fn xfs_cluster(prefix: &str) -> Option<(SmallFs, Cluster)> {
    let fs = SmallFs::xfs(600)?;
    let mnt = fs.mnt.clone();
    let c = Cluster::start_with(prefix, 3, move |name| {
        vec![
            "--pool".into(),
            format!("default={}", mnt.join(name).display()),
        ]
    });
    Some((fs, c))
}

/// Bits set in a base64 bitmap, the first block in the highest bit of the first byte.
fn set_bits(b64: &str) -> Vec<u64> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    (0..bytes.len() as u64 * 8)
        .filter(|i| bytes[(i / 8) as usize] & (0x80 >> (i % 8)) != 0)
        .collect()
}

/// Tandem's volumes and snapshots, as `volume` and `volume@snapshot`.
fn tandem_keys(c: &Cluster) -> Vec<String> {
    let mut keys = c.volume_names();
    for s in c.json(&["snapshot", "list"]).as_array().unwrap() {
        keys.push(format!(
            "{}@{}",
            s["volume"].as_str().unwrap(),
            s["name"].as_str().unwrap()
        ));
    }
    keys.sort();
    keys
}

fn ls_keys(p: &Plugins) -> Vec<String> {
    let mut keys: Vec<String> = p
        .ok(0, "SR.ls", json!({"sr": SR}))
        .as_array()
        .unwrap()
        .iter()
        .map(key_of)
        .collect();
    keys.sort();
    keys
}

// ---- tests --------------------------------------------------------------------------

#[test]
fn a_vm_disk_lives_through_the_plugins_on_three_nodes() {
    let Some((_fs, c)) = xfs_cluster("xa") else {
        eprintln!("skipped: this machine cannot make an xfs file system on a loop device");
        return;
    };
    let p = Plugins::install(&c);

    // The plugins say what they are.
    let q = p.ok(0, "Plugin.Query", json!({}));
    assert_eq!(q["plugin"], "tandem");
    for f in ["VDI_SNAPSHOT", "VDI_CLONE", "VDI_REVERT", "VDI_CONFIG_CBT"] {
        assert!(
            q["features"].as_array().unwrap().iter().any(|x| x == f),
            "{q:#}"
        );
    }
    let dq = p.ok(0, "datapath:Plugin.Query", json!({}));
    assert_eq!(
        (
            dq["plugin"].as_str(),
            dq["features"].as_array().map(Vec::len)
        ),
        (Some("tandem"), Some(0))
    );

    // An SR on every host.
    let config = p.ok(0, "SR.create", json!({
        "uuid": SR, "configuration": {"replicas": "2"}, "name": "tandem", "description": "test SR",
    }));
    assert_eq!(config["sr_uuid"], SR);
    for node in 0..3 {
        assert_eq!(
            p.ok(node, "SR.attach", json!({"configuration": config})),
            SR
        );
    }
    let stat = p.ok(1, "SR.stat", json!({"sr": SR}));
    assert_eq!(stat["health"][0], "Healthy");
    assert!(stat["total_space"].as_u64().unwrap() > 0, "{stat:#}");
    assert_eq!(p.ok(2, "Plugin.ls", json!({})), json!([SR]));

    // A volume (sizes round up to 4 KiB).
    let vol = p.ok(0, "Volume.create", json!({
        "sr": SR, "name": "disk0", "description": "a VM's disk", "size": (32 << 20) + 1, "sharable": false,
    }));
    assert_eq!(vol["virtual_size"], (32 << 20) + 4096);
    assert_eq!(vol["read_write"], true);
    let key = key_of(&vol);
    let uri = uri_of(&vol);
    p.ok(
        0,
        "Volume.set",
        json!({"sr": SR, "key": key, "k": "vdi-type", "v": "user"}),
    );
    let stat = p.ok(1, "Volume.stat", json!({"sr": SR, "key": key}));
    assert_eq!(stat["keys"]["vdi-type"], "user");
    assert_eq!(stat["name"], "disk0");

    // Attached and activated on a node without a replica of it.
    let v = c.json(&["volume", "show", &key]);
    let diskful = Cluster::participants(&v, "diskful");
    let x = (0..3)
        .find(|&i| !diskful.contains(&c.nodes[i].name))
        .unwrap();
    let y = (0..3).find(|&i| i != x).unwrap();
    let dp = json!({"uri": uri, "domain": "7"});
    let attached = p.ok(x, "Datapath.attach", dp.clone());
    let nbd = nbd_of(&attached);
    assert!(nbd.contains(c.nodes[x].socket().to_str().unwrap()), "{nbd}");
    p.ok(x, "Datapath.activate", dp.clone());
    qemu_io(&nbd, &["write -P 0xa1 0 1M"]);

    // A snapshot, then more writes.
    let snap1 = p.ok(0, "Volume.snapshot", json!({"sr": SR, "key": key}));
    assert_eq!(snap1["read_write"], false);
    let s1 = key_of(&snap1);
    p.ok(
        0,
        "Volume.set",
        json!({"sr": SR, "key": s1, "k": "is_a_snapshot", "v": "true"}),
    );
    qemu_io(&nbd, &["write -P 0xb2 0 512K", "write -P 0xb2 8M 64K"]);
    let snap2 = p.ok(0, "Volume.snapshot", json!({"sr": SR, "key": key}));
    let s2 = key_of(&snap2);

    // The first snapshot, through its own URI, holds the earlier bytes.
    let sdp = json!({"uri": uri_of(&snap1), "domain": "0"});
    let snap_nbd = nbd_of(&p.ok(x, "Datapath.attach", sdp.clone()));
    p.ok(x, "Datapath.activate", sdp.clone());
    qemu_io_with(&["-r"], &snap_nbd, &["read -P 0xa1 0 1M"]);
    assert!(
        qemu_io_result(&mut qemu_io_command(
            &["-f", "raw"],
            &["write -P 0 0 4K"],
            &[&snap_nbd]
        ))
        .is_err(),
        "a snapshot took a write"
    );

    // Changed blocks between the snapshots: exactly the 64 KiB blocks written.
    let cbt = p.ok(
        0,
        "Volume.list_changed_blocks",
        json!({
            "sr": SR, "key": s1, "key2": s2, "offset": 0, "length": -1,
        }),
    );
    assert_eq!(cbt["granularity"], 65536);
    let mut expected: Vec<u64> = (0..8).collect();
    expected.push(128);
    assert_eq!(set_bits(cbt["bitmap"].as_str().unwrap()), expected);

    // A clone of the first snapshot: its bytes, writable, independent.
    let clone = p.ok(0, "Volume.clone", json!({"sr": SR, "key": s1}));
    assert_eq!(clone["read_write"], true);
    let cdp = json!({"uri": uri_of(&clone), "domain": "8"});
    let clone_nbd = nbd_of(&p.ok(y, "Datapath.attach", cdp.clone()));
    p.ok(y, "Datapath.activate", cdp.clone());
    qemu_io(&clone_nbd, &["read -P 0xa1 0 1M", "write -P 0xc3 0 4K"]);
    qemu_io(&nbd, &["read -P 0xb2 0 4K"]);

    // Resize: grows; never shrinks.
    p.ok(
        0,
        "Volume.resize",
        json!({"sr": SR, "key": key, "new_size": 64 << 20}),
    );
    assert_eq!(
        p.ok(0, "Volume.stat", json!({"sr": SR, "key": key}))["virtual_size"],
        64 << 20
    );
    let (code, why) = p.err(
        0,
        "Volume.resize",
        json!({"sr": SR, "key": key, "new_size": 16 << 20}),
    );
    assert_eq!(code, "Invalid_argument", "{why}");
    assert!(why.contains("only grow"), "{why}");

    // One writer: another host is told who has it.
    p.ok(y, "Datapath.attach", dp.clone());
    let (code, why) = p.err(y, "Datapath.activate", dp.clone());
    assert_eq!(code, "Activated_on_another_host");
    assert_eq!(
        why,
        format!("Activated_on_another_host | host-{}", c.nodes[x].name)
    );
    // ... and a destroy while attached is refused, naming where.
    let (code, why) = p.err(0, "Volume.destroy", json!({"sr": SR, "key": key}));
    assert_eq!(code, "Volume_in_use", "{why}");

    // Moved: deactivated and detached on x, activated on y, the same bytes.
    p.ok(x, "Datapath.deactivate", dp.clone());
    p.ok(x, "Datapath.detach", dp.clone());
    p.ok(x, "Datapath.deactivate", sdp.clone());
    p.ok(x, "Datapath.detach", sdp.clone());
    let v = c.json(&["volume", "show", &key]);
    assert!(
        v["participants"]
            .as_array()
            .unwrap()
            .iter()
            .all(|q| q["node"] != c.nodes[x].name.as_str() || q["attached"] == false),
        "still attached on {}: {v:#}",
        c.nodes[x].name
    );
    p.ok(y, "Datapath.activate", dp.clone());
    let nbd_y = nbd_of(&p.ok(y, "Datapath.attach", dp.clone()));
    qemu_io(
        &nbd_y,
        &[
            "read -P 0xb2 0 512K",
            "read -P 0xa1 512K 512K",
            "read -P 0xb2 8M 64K",
        ],
    );
    // y's host dies and its attachment is cleaned up (here Tandem detaches it): its
    // activation is stale, and x takes the volume over.
    let (xn, yn) = (c.nodes[x].name.as_str(), c.nodes[y].name.as_str());
    run(c.tandem().args(["volume", "detach", &key, "--node", yn]));
    p.ok(x, "Datapath.attach", dp.clone());
    p.ok(x, "Datapath.activate", dp.clone());
    let holder = c.json(&["sr", "dump", SR])[format!("active/{key}")].clone();
    assert_eq!(holder, format!("host-{xn} {xn} 7"));
    p.ok(x, "Datapath.deactivate", dp.clone());
    p.ok(x, "Datapath.detach", dp.clone());
    // Done again (xapi retries), a detach does nothing.
    p.ok(x, "Datapath.detach", dp.clone());
    for d in [&dp, &cdp] {
        p.ok(y, "Datapath.deactivate", d.clone());
        p.ok(y, "Datapath.detach", d.clone());
    }
    let dump = c.json(&["sr", "dump", SR]);
    assert!(
        dump.as_object()
            .unwrap()
            .keys()
            .all(|k| !k.starts_with("attached/") && !k.starts_with("active/")),
        "marks left: {dump:#}"
    );
    // s1 kept for changed-block tracking only: its bytes out of reach, its changes known.
    p.ok(0, "Volume.data_destroy", json!({"sr": SR, "key": s1}));
    let stat = p.ok(0, "Volume.stat", json!({"sr": SR, "key": s1}));
    assert_eq!(stat["volume_type"], "CBT_Metadata");
    let (code, why) = p.err(x, "Datapath.attach", sdp.clone());
    assert_eq!(code, "Invalid_argument");
    assert!(why.contains("data_destroy"), "{why}");
    let again = p.ok(
        0,
        "Volume.list_changed_blocks",
        json!({
            "sr": SR, "key": s1, "key2": s2, "offset": 0, "length": -1,
        }),
    );
    assert_eq!(again["bitmap"], cbt["bitmap"]);
    let (code, _) = p.err(0, "Volume.data_destroy", json!({"sr": SR, "key": key}));
    assert_eq!(code, "Invalid_argument");
    // Attached by an operator rather than by xapi: in use all the same.
    run(c.tandem().args(["volume", "attach", &key, "--node", xn]));
    let (code, why) = p.err(0, "Volume.destroy", json!({"sr": SR, "key": key}));
    assert_eq!(code, "Volume_in_use", "{why}");
    assert!(why.contains(&format!("{xn} (attached in Tandem)")), "{why}");
    run(c.tandem().args(["volume", "detach", &key, "--node", xn]));

    // Destroying the volume while its snapshots live hides it; they stay readable
    // and it goes with the last of them.
    p.ok(0, "Volume.destroy", json!({"sr": SR, "key": key}));
    let mut keys = vec![key_of(&clone), s1.clone(), s2.clone()];
    keys.sort();
    assert_eq!(ls_keys(&p), keys);
    let (code, _) = p.err(0, "Volume.stat", json!({"sr": SR, "key": key}));
    assert_eq!(code, "Volume_does_not_exist");
    assert!(tandem_keys(&c).contains(&key));
    for k in [&s1, &s2, &key_of(&clone)] {
        p.ok(0, "Volume.destroy", json!({"sr": SR, "key": k}));
    }
    assert_eq!(ls_keys(&p), Vec::<String>::new());
    assert_eq!(tandem_keys(&c), Vec::<String>::new());

    // A host dies holding the SR's lock (cut at a fault point, its lease unrenewed):
    // another host's call waits for the lease to run out, takes the lock over and
    // settles what was left.
    let create =
        json!({"sr": SR, "name": "t", "description": "", "size": 4 << 20, "sharable": false});
    let (code, _) = p.call_env(
        x,
        "Volume.create",
        create.clone(),
        &[("TANDEM_XAPI_FAULT", "create.2")],
    );
    assert_eq!(code, Some(137));
    let started = std::time::Instant::now();
    assert_eq!(p.ok(y, "SR.ls", json!({"sr": SR})), json!([]));
    let waited = started.elapsed();
    assert!(
        waited >= std::time::Duration::from_secs(20)
            && waited <= std::time::Duration::from_secs(60),
        "took the lock over after {waited:?}"
    );
    assert_eq!(
        tandem_keys(&c),
        Vec::<String>::new(),
        "the cut creation was undone"
    );

    // And the SR goes.
    for node in 0..3 {
        p.ok(node, "SR.detach", json!({"sr": SR}));
    }
    p.ok(0, "SR.destroy", json!({"sr": SR}));
    assert_eq!(c.json(&["sr", "list"]), json!([]));
    assert!(!c.json(&["group", "list"]).to_string().contains(SR));
}

#[test]
fn bad_calls_get_error_objects_xapi_can_show() {
    let c = Cluster::start("xb", 1);
    let p = Plugins::install(&c);
    let expect = |method: &str, params: Value, code: &str, words: &str| {
        let (got, why) = p.err(0, method, params.clone());
        assert_eq!(got, code, "{method} {params}: {why}");
        assert!(
            why.contains(words),
            "{method} {params}: {why:?} lacks {words:?}"
        );
    };
    let create = |config: Value| json!({"uuid": SR, "configuration": config, "name": "n", "description": "d"});
    expect(
        "SR.create",
        create(json!({"replicas": "2", "colour": "blue"})),
        "Invalid_argument",
        "colour",
    );
    expect(
        "SR.create",
        create(json!({"replicas": "7"})),
        "Invalid_argument",
        "replicas",
    );
    expect(
        "SR.create",
        create(json!({"group": "nope"})),
        "Invalid_argument",
        "no resource group nope",
    );
    expect(
        "SR.create",
        create(json!({"group": "default", "replicas": "1"})),
        "Invalid_argument",
        "either group",
    );
    expect("SR.stat", json!({"sr": SR}), "SR_does_not_exist", SR);
    expect(
        "SR.probe",
        json!({"configuration": {"colour": "blue"}}),
        "Invalid_argument",
        "colour",
    );
    assert_eq!(
        p.ok(0, "SR.probe", json!({"configuration": {"sr_uuid": SR}})),
        json!([])
    );
    p.ok(0, "SR.create", create(json!({"replicas": "1"})));
    expect(
        "SR.create",
        create(json!({})),
        "Invalid_argument",
        "already has an SR",
    );

    let vol = |extra: Value| {
        let mut v =
            json!({"sr": SR, "name": "a", "description": "", "size": 1 << 20, "sharable": false});
        for (k, x) in extra.as_object().unwrap() {
            if x.is_null() {
                v.as_object_mut().unwrap().remove(k);
            } else {
                v[k] = x.clone();
            }
        }
        v
    };
    expect(
        "Volume.create",
        vol(json!({"colour": "blue"})),
        "Invalid_argument",
        "unknown field `colour`",
    );
    expect(
        "Volume.create",
        vol(json!({"size": null})),
        "Invalid_argument",
        "missing field `size`",
    );
    expect(
        "Volume.create",
        vol(json!({"size": "abc"})),
        "Invalid_argument",
        "invalid type",
    );
    expect(
        "Volume.create",
        vol(json!({"size": 0})),
        "Invalid_argument",
        "positive size",
    );
    expect(
        "Volume.create",
        vol(json!({"size": -5})),
        "Invalid_argument",
        "positive size",
    );
    expect(
        "Volume.create",
        vol(json!({"sharable": true})),
        "Invalid_argument",
        "one writer",
    );
    expect(
        "Volume.create",
        vol(json!({"sr": "../../etc"})),
        "Invalid_argument",
        "not an SR uuid",
    );
    expect(
        "Volume.create",
        vol(json!({"size": 1u64 << 50})),
        "No_space",
        "free, needs 1024T",
    );
    // No Tandem volume was made by any of them.
    assert_eq!(tandem_keys(&c), Vec::<String>::new());

    let v = p.ok(0, "Volume.create", vol(json!({})));
    let key = key_of(&v);
    expect(
        "Volume.stat",
        json!({"sr": SR, "key": "vdi-000000000000"}),
        "Volume_does_not_exist",
        "vdi-000000000000",
    );
    expect(
        "Volume.stat",
        json!({"sr": SR, "key": "a b"}),
        "Invalid_argument",
        "not a volume key",
    );
    // A key of another SR.
    let other = "6f0c6a47-2b1e-4d4f-9a58-0a1b2c3d4e5f";
    p.ok(
        0,
        "SR.create",
        json!({"uuid": other, "configuration": {"replicas": "1"}, "name": "o", "description": ""}),
    );
    expect(
        "Volume.stat",
        json!({"sr": other, "key": key}),
        "Volume_does_not_exist",
        &key,
    );
    expect(
        "Volume.snapshot",
        json!({"sr": SR, "key": key, "extra": 1}),
        "Invalid_argument",
        "unknown field",
    );
    expect(
        "Volume.list_changed_blocks",
        json!({"sr": SR, "key": key, "key2": key, "offset": 0, "length": -1}),
        "Invalid_argument",
        "two snapshots",
    );
    expect(
        "Datapath.attach",
        json!({"uri": "nbd://x/y", "domain": "0"}),
        "Invalid_argument",
        "not a Tandem volume URI",
    );
    expect("SR.destroy", json!({"sr": SR}), "Volume_in_use", &key);

    // Input that is not an object, or lacks dbg; a method the plugin lacks.
    let raw = |method: &str, input: &str| {
        let mut child = Command::new(tandem_lab::tandem_bin())
            .args([
                "--controller",
                &c.nodes[0].api_url(),
                "xapi",
                "call",
                "--plugin",
                "volume",
                "--api",
                &c.nodes[0].api_url(),
                method,
                "--json",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{method} {input:?}");
        let e: Value = serde_json::from_slice(&out.stdout).unwrap();
        check_error(method, &e);
        (
            e["code"].as_str().unwrap().to_owned(),
            e["params"].to_string(),
        )
    };
    assert_eq!(raw("SR.ls", "not json").0, "Invalid_argument");
    assert_eq!(raw("SR.ls", "[1]").0, "Invalid_argument");
    assert!(raw("SR.ls", r#"{"sr": "x"}"#).1.contains("dbg"));
    assert_eq!(
        raw("Volume.compose", r#"{"dbg": "t"}"#),
        ("Unimplemented".into(), r#"["Volume.compose"]"#.into())
    );

    // Everything still there, nothing half made.
    assert_eq!(ls_keys(&p), vec![key.clone()]);
    assert_eq!(tandem_keys(&c), vec![key]);
}

/// One node on xfs (snapshots need reflink) with the plugins and an SR of 1 replica.
fn one_node_sr(prefix: &str) -> Option<(SmallFs, Cluster, Plugins)> {
    let Some(fs) = SmallFs::xfs(300) else {
        eprintln!("skipped: this machine cannot make an xfs file system on a loop device");
        return None;
    };
    let mnt = fs.mnt.clone();
    let c = Cluster::start_with(prefix, 1, move |name| {
        vec![
            "--pool".into(),
            format!("default={}", mnt.join(name).display()),
        ]
    });
    let p = Plugins::install(&c);
    p.ok(
        0,
        "SR.create",
        json!({"uuid": SR, "configuration": {"replicas": "1"}, "name": "n", "description": ""}),
    );
    Some((fs, c, p))
}

/// What a call cut short at a fault point leaves: after the next scan (`SR.ls`), the
/// SR's volumes are exactly Tandem's volumes and snapshots, no intent is pending, and
/// the operation is whole or absent.
#[test]
fn operations_killed_at_any_step_are_completed_or_undone() {
    let Some((_fs, c, p)) = one_node_sr("xc") else {
        return;
    };
    let create =
        json!({"sr": SR, "name": "v", "description": "", "size": 4 << 20, "sharable": false});
    let base = key_of(&p.ok(0, "Volume.create", create.clone()));
    let snap = key_of(&p.ok(0, "Volume.snapshot", json!({"sr": SR, "key": base})));

    let consistent = |label: &str| -> Vec<String> {
        let keys = ls_keys(&p);
        assert_eq!(tandem_keys(&c), keys, "{label}: the SR and Tandem disagree");
        let dump = c.json(&["sr", "dump", SR]);
        assert!(
            dump.as_object()
                .unwrap()
                .keys()
                .all(|k| !k.starts_with("journal/") && k != "lock"),
            "{label}: {dump:#}"
        );
        keys
    };
    let cut = |label: &str, method: &str, params: Value| {
        let (code, stdout) = p.call_env(0, method, params, &[("TANDEM_XAPI_FAULT", label)]);
        assert_eq!(code, Some(137), "{label}: the call was not cut ({stdout})");
        assert!(stdout.is_empty(), "{label}: {stdout}");
    };

    let before = consistent("start");
    for (step, done) in [(1, false), (2, false), (3, true)] {
        let label = format!("create.{step}");
        cut(&label, "Volume.create", create.clone());
        // Until the next call settles it, `tandem health` tells.
        let (code, report) = c.health();
        assert!(
            code >= 1 && report.contains("an operation was cut short"),
            "{label}: {report}"
        );
        let after = consistent(&label);
        assert_eq!(
            after.len(),
            before.len() + usize::from(done),
            "{label}: {after:?}"
        );
        for k in after.iter().filter(|k| !before.contains(k)) {
            p.ok(0, "Volume.destroy", json!({"sr": SR, "key": k}));
        }
    }
    for (step, done) in [(1, false), (2, false), (3, true)] {
        let label = format!("snapshot.{step}");
        cut(&label, "Volume.snapshot", json!({"sr": SR, "key": base}));
        let after = consistent(&label);
        assert_eq!(
            after.len(),
            before.len() + usize::from(done),
            "{label}: {after:?}"
        );
        for k in after.iter().filter(|k| !before.contains(k)) {
            assert!(k.starts_with(&format!("{base}@")), "{label}: {k}");
            p.ok(0, "Volume.destroy", json!({"sr": SR, "key": k}));
        }
    }
    // Clones of the volume itself, through a snapshot taken for them: never left behind.
    for (step, done) in [(1, false), (2, false), (3, false), (4, true)] {
        let label = format!("clone.{step}");
        cut(&label, "Volume.clone", json!({"sr": SR, "key": base}));
        let after = consistent(&label);
        assert_eq!(
            after.len(),
            before.len() + usize::from(done),
            "{label}: {after:?}"
        );
        for k in after.iter().filter(|k| !before.contains(k)) {
            assert!(
                !k.contains('@'),
                "{label}: the clone's snapshot stayed: {k}"
            );
            p.ok(0, "Volume.destroy", json!({"sr": SR, "key": k}));
        }
    }
    // Destruction always completes, of a volume and of a snapshot.
    for step in [1, 2] {
        let label = format!("destroy.{step}");
        let v = key_of(&p.ok(0, "Volume.create", create.clone()));
        cut(&label, "Volume.destroy", json!({"sr": SR, "key": v}));
        assert_eq!(consistent(&label), before, "{label}");
        let s = key_of(&p.ok(0, "Volume.snapshot", json!({"sr": SR, "key": base})));
        cut(&label, "Volume.destroy", json!({"sr": SR, "key": s}));
        assert_eq!(consistent(&label), before, "{label}");
    }
    assert_eq!(before, {
        let mut k = vec![base, snap];
        k.sort();
        k
    });
}

#[test]
fn concurrent_calls_on_one_sr_leave_it_consistent() {
    let Some((_fs, c, p)) = one_node_sr("xd") else {
        return;
    };
    let create =
        json!({"sr": SR, "name": "v", "description": "", "size": 4 << 20, "sharable": false});
    let made: Vec<String> = (0..11)
        .map(|_| key_of(&p.ok(0, "Volume.create", create.clone())))
        .collect();
    let (kept, doomed) = made.split_at(5);
    // 20 calls at once, as xapi makes them: 8 creations, 6 snapshots, 6 destructions.
    let mut calls: Vec<(&str, Value)> = Vec::new();
    calls.extend((0..8).map(|_| ("Volume.create", create.clone())));
    calls.extend((0..6).map(|i| ("Volume.snapshot", json!({"sr": SR, "key": kept[i % 5]}))));
    calls.extend(
        doomed
            .iter()
            .map(|k| ("Volume.destroy", json!({"sr": SR, "key": k}))),
    );
    let answers: Vec<(&str, Value)> = std::thread::scope(|s| {
        let handles: Vec<_> = calls
            .iter()
            .map(|(m, params)| {
                let p = &p;
                s.spawn(move || (*m, p.ok(0, m, params.clone())))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut expected: Vec<String> = kept.to_vec();
    for (method, answer) in &answers {
        match *method {
            "Volume.create" => expected.push(key_of(answer)),
            "Volume.snapshot" => {
                let k = key_of(answer);
                assert!(kept.iter().any(|v| k.starts_with(&format!("{v}@"))), "{k}");
                expected.push(k);
            }
            _ => assert!(answer.is_null()),
        }
    }
    expected.sort();
    expected.dedup();
    assert_eq!(expected.len(), 5 + 8 + 6, "two calls answered the same key");
    assert_eq!(ls_keys(&p), expected);
    assert_eq!(tandem_keys(&c), expected);
}
