//! The `tandem` command against a real `tandemd`.

use std::process::Command;

use tandem_lab::{CONVERGE, Cluster, Node, output, run, wait_for};

#[test]
fn volume_lifecycle_through_the_cli() {
    // A one-host cluster: the controller and the only node in one tandemd.
    let c = Cluster::start("cli1", 1);
    let node = &c.nodes[0];
    let table =
        run(c
            .tandem()
            .args(["volume", "create", "vm1", "--size", "1G", "--replicas", "1"]));
    assert!(table.starts_with("NAME"), "{table}");
    assert!(table.contains("vm1") && table.contains("1G"), "{table}");
    run(c.tandem().args([
        "volume",
        "create",
        "vm2",
        "--size",
        "64M",
        "--replicas",
        "1",
    ]));
    let list = c.wait_up_to_date(CONVERGE);
    let sizes: Vec<(String, u64, u64)> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["name"].as_str().unwrap().to_owned(),
                v["size"].as_u64().unwrap(),
                v["replicas"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        sizes,
        [("vm1".into(), 1 << 30, 1), ("vm2".into(), 64 << 20, 1)]
    );
    assert_eq!(
        std::fs::metadata(node.data_file("vm1")).unwrap().len(),
        1 << 30
    );

    run(c.tandem().args(["volume", "resize", "vm1", "--size", "2G"]));
    wait_for("the replica grew", CONVERGE, &[node], || {
        std::fs::metadata(node.data_file("vm1")).unwrap().len() == 2 << 30
    });

    run(c.tandem().args(["volume", "delete", "vm2"]));
    wait_for("the replica is gone", CONVERGE, &[node], || {
        !node.data_file("vm2").exists()
    });
    let json = run(c.tandem().args(["-o", "json", "volume", "list"]));
    assert!(!json.contains("vm2"), "{json}");
}

#[test]
fn cli_errors_say_what_to_do_and_exit_non_zero() {
    let c = Cluster::start("cli2", 1);
    run(c
        .tandem()
        .args(["volume", "create", "vm1", "--size", "1G", "--replicas", "1"]));
    let cases: [(&[&str], &str); 5] = [
        (
            &["volume", "create", "vm1", "--size", "1G"],
            "already exists",
        ),
        (&["volume", "create", "x", "--size", "12Q"], "12Q"),
        (&["volume", "resize", "vm1", "--size", "1M"], "only grow"),
        (&["volume", "delete", "nope"], "does not exist"),
        (
            &["volume", "create", "x", "--size", "1000"],
            "multiple of 4",
        ),
    ];
    for (args, expected) in cases {
        let stderr = c.fails(args);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
    // Nothing changed.
    let list = c.json(&["volume", "list"]);
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["size"], 1u64 << 30);

    let out = output(Command::new(tandem_lab::tandem_bin()).args([
        "--controller",
        "http://127.0.0.1:1",
        "volume",
        "list",
    ]));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("TANDEM_CONTROLLER"));

    // A node without the controller says where the cluster API is.
    let plain = Node::start("cli2b");
    let out = output(plain.tandem().args(["volume", "list"]));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--controller"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn controller_url_comes_from_the_environment() {
    let c = Cluster::start("cli3", 1);
    let json = run(Command::new(tandem_lab::tandem_bin())
        .env("TANDEM_CONTROLLER", c.nodes[0].api_url())
        .args(["-o", "json", "pool", "list"]));
    let pools: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(pools[0]["name"], "default");
    assert_eq!(pools[0]["node"], "cli31");
    assert_eq!(pools[0]["kind"], "file");
    assert!(pools[0]["capacity"].as_u64().unwrap() >= pools[0]["free"].as_u64().unwrap());
}

#[test]
fn demo_serves_a_replicated_volume_on_every_node_and_ctrl_c_stops_it_all() {
    use std::io::{BufRead, BufReader};
    let dir = tandem_lab::scratch("demo");
    let mut demo = Command::new(tandem_lab::tandem_bin())
        .args(["demo", "--dir"])
        .arg(&dir)
        .args(["--size", "64M"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut uris = Vec::new();
    let (mut apis, mut kill) = (None, None);
    let mut lines = BufReader::new(demo.stdout.take().unwrap()).lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(at) = line.find("nbd://") {
            if line.starts_with('n') {
                uris.push(line[at..].trim().to_owned());
            }
        }
        if let Some(list) = line.trim().strip_prefix("export TANDEM_CONTROLLER=") {
            apis = Some(list.to_owned());
        }
        if let Some(rest) = line.trim().strip_prefix("kill -9 ") {
            kill = rest.split(';').next().and_then(|p| p.parse::<i32>().ok());
        }
        if line.contains("Press Ctrl-C") {
            break;
        }
    }
    assert_eq!(uris.len(), 3, "one NBD address per node: {uris:?}");
    // Write on one replica's node, then read on the other replica's and the tiebreaker's.
    tandem_lab::qemu_io(&uris[0], &["write -P 0xd7 0 1M", "flush"]);
    for uri in &uris[1..] {
        tandem_lab::qemu_io(uri, &["read -P 0xd7 0 1M"]);
    }
    // Every node is a controller candidate: with the controller's node killed (the
    // demo says how), the CLI given every node goes on working through the others.
    let (apis, pid) = (
        apis.expect("the demo names its APIs"),
        kill.expect("and the kill"),
    );
    let cluster = || {
        let out = output(Command::new(tandem_lab::tandem_bin()).args([
            "--controller",
            &apis,
            "-o",
            "json",
            "cluster",
        ]));
        out.status
            .success()
            .then(|| tandem_lab::json(&String::from_utf8_lossy(&out.stdout)))
    };
    let before = cluster().expect("the cluster answers")["controller"].clone();
    // SAFETY: a tandemd the demo started, by the PID it printed.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let after = tandem_lab::poll(std::time::Duration::from_secs(10), || {
        cluster().filter(|c| c["controller"] != before)
    })
    .expect("another candidate runs the controller");
    assert_eq!(after["database"]["name"], "tandem-controller", "{after:#}");
    let volumes =
        run(Command::new(tandem_lab::tandem_bin()).args(["--controller", &apis, "volume", "list"]));
    assert!(volumes.contains("demo"), "{volumes}");
    // SAFETY: signals the child we started.
    unsafe { libc::kill(demo.id() as i32, libc::SIGINT) };
    let status = demo.wait().unwrap();
    assert!(status.success(), "demo exited with {status}");
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(rest.iter().any(|l| l.contains("demo stopped")), "{rest:?}");
    let left = output(Command::new("pgrep").arg("-f").arg(dir.to_str().unwrap()));
    assert!(
        left.stdout.is_empty(),
        "processes left behind: {}",
        String::from_utf8_lossy(&left.stdout)
    );
    let _ = std::fs::remove_dir_all(dir);
}
