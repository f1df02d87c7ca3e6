//! System tests of the node API: the volume life cycle with its JSON bodies, bad input
//! that must change nothing, corrupt metadata, pools, and a second daemon on the same
//! data directory.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use tandem_lab::{Node, SmallFs, output, qemu_io, qemu_io_command, qemu_io_with, run, wait_exit};

const MIB: u64 = 1 << 20;

fn pool_dir(node: &Node) -> PathBuf {
    node.dir.join("pools/default")
}

fn meta_file(node: &Node, vol: &str) -> PathBuf {
    pool_dir(node).join(format!("{vol}.meta"))
}

fn create(node: &Node, body: &str) -> tandem_lab::Response {
    node.api("POST", "/v1/node/volumes", Some(body))
}

fn list(node: &Node) -> Value {
    let r = node.api("GET", "/v1/node/volumes", None);
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

/// The names in a list of volumes, in its order.
fn names(list: &Value) -> Vec<&str> {
    let volumes = list
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {list}"));
    volumes
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect()
}

/// Asserts every field of a healthy volume's JSON body; returns `allocated`.
fn assert_volume(v: &Value, name: &str, size: u64, thick: bool, read_only: bool) -> u64 {
    let obj = v
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"));
    let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "allocated",
            "disk",
            "name",
            "open",
            "pool",
            "read_only",
            "size",
            "thick"
        ],
        "fields of {v}"
    );
    assert_eq!(v["name"], name, "{v}");
    assert_eq!(v["pool"], "default", "{v}");
    assert_eq!(v["size"], size, "{v}");
    assert_eq!(v["thick"], thick, "{v}");
    assert_eq!(v["read_only"], read_only, "{v}");
    assert_eq!(v["disk"], "UpToDate", "{v}");
    assert_eq!(v["open"], 0, "{v}");
    let allocated = v["allocated"].as_u64().expect("allocated is a number");
    if thick {
        assert!(allocated >= size, "thick volume allocates its size: {v}");
    }
    allocated
}

/// Changes a volume (PATCH with `body`, which must be accepted) and asserts every field of
/// the volume it answers with.
fn assert_patched(node: &Node, name: &str, body: &str, size: u64, thick: bool, read_only: bool) {
    assert_volume(&node.patch_volume(name, body), name, size, thick, read_only);
}

/// Asserts an error response: status, and a JSON body with a non-empty message and
/// correction (and a cause, when `cause` is set).
fn assert_error(r: &tandem_lab::Response, status: u16, cause: bool, what: &str) -> Value {
    assert_eq!(r.status, status, "{what}: {}", r.body);
    let e = r.json();
    let text = |k: &str| e[k].as_str().unwrap_or_default().to_owned();
    assert!(!text("message").is_empty(), "{what}: message in {e}");
    assert!(!text("correction").is_empty(), "{what}: correction in {e}");
    if cause {
        assert!(!text("cause").is_empty(), "{what}: cause in {e}");
    }
    for k in e.as_object().unwrap().keys() {
        assert!(
            ["message", "cause", "correction"].contains(&k.as_str()),
            "{what}: unexpected field {k} in {e}"
        );
    }
    e
}

/// Everything in the pool directory: file names and contents.
fn pool_files(node: &Node) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(pool_dir(node))
        .expect("pool dir")
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().into_string().unwrap(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

fn file_names(files: &BTreeMap<String, Vec<u8>>) -> Vec<&str> {
    files.keys().map(String::as_str).collect()
}

/// Greeting, fixed-newstyle flags and NBD_OPT_GO on a raw socket: the socket in
/// transmission, or the error reply's type and message.
fn go(addr: SocketAddr, name: &str) -> Result<TcpStream, (u32, String)> {
    let mut s = TcpStream::connect(addr).expect("connect to NBD");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).expect("greeting");
    assert_eq!(&greeting[..16], b"NBDMAGICIHAVEOPT");
    let mut msg = 1u32.to_be_bytes().to_vec();
    let mut data = (name.len() as u32).to_be_bytes().to_vec();
    data.extend_from_slice(name.as_bytes());
    data.extend_from_slice(&0u16.to_be_bytes());
    msg.extend_from_slice(b"IHAVEOPT");
    msg.extend_from_slice(&7u32.to_be_bytes());
    msg.extend_from_slice(&(data.len() as u32).to_be_bytes());
    msg.extend_from_slice(&data);
    s.write_all(&msg).unwrap();
    loop {
        let mut head = [0u8; 20];
        s.read_exact(&mut head).expect("GO reply");
        let kind = u32::from_be_bytes(head[12..16].try_into().unwrap());
        let mut body = vec![0u8; u32::from_be_bytes(head[16..20].try_into().unwrap()) as usize];
        s.read_exact(&mut body).unwrap();
        match kind {
            1 => return Ok(s),
            3 => continue,
            _ => return Err((kind, String::from_utf8_lossy(&body).into_owned())),
        }
    }
}

/// A raw NBD client that has the volume open until dropped.
fn open_session(addr: SocketAddr, name: &str) -> TcpStream {
    go(addr, name).unwrap_or_else(|(kind, msg)| panic!("GO {name} refused ({kind:#x}): {msg}"))
}

/// The error reply to NBD_OPT_GO for an export that cannot be opened.
fn go_refusal(addr: SocketAddr, name: &str) -> (u32, String) {
    match go(addr, name) {
        Ok(_) => panic!("GO {name} succeeded"),
        Err(e) => e,
    }
}

// ---------------------------------------------------------------------------------------
// 6. The happy path.

#[test]
fn volume_life_cycle_through_the_api() {
    let mut node = Node::start("apiflow");
    assert_eq!(list(&node), json!([]));

    let r = create(&node, r#"{"name":"alpha","size":8388608}"#);
    assert_eq!(r.status, 201, "{}", r.body);
    let created = r.json();
    assert_volume(&created, "alpha", 8 * MIB, false, false);
    assert!(
        created["allocated"].as_u64().unwrap() < 8 * MIB,
        "a thin volume starts sparse: {created}"
    );
    assert_eq!(node.volume("alpha"), created);
    assert_eq!(
        std::fs::metadata(node.data_file("alpha")).unwrap().len(),
        8 * MIB
    );
    assert!(meta_file(&node, "alpha").is_file());

    let r = create(
        &node,
        r#"{"name":"beta","size":4194304,"pool":"default","thick":true}"#,
    );
    assert_eq!(r.status, 201, "{}", r.body);
    assert_volume(&r.json(), "beta", 4 * MIB, true, false);

    // Listed in name order, each as GET shows it.
    let all = list(&node);
    assert_eq!(names(&all), ["alpha", "beta"]);
    assert_eq!(all[0], node.volume("alpha"));
    assert_eq!(all[1], node.volume("beta"));

    // Data written over NBD shows up in `allocated`.
    qemu_io(&node.uri("alpha"), &["write -P 0x11 0 1M", "flush"]);
    node.wait_open("alpha", 0);
    let allocated = assert_volume(&node.volume("alpha"), "alpha", 8 * MIB, false, false);
    assert!(allocated >= MIB, "after writing 1 MiB: {allocated}");

    // Grow.
    let grow = r#"{"size":16777216}"#;
    assert_patched(&node, "alpha", grow, 16 * MIB, false, false);
    assert_eq!(
        std::fs::metadata(node.data_file("alpha")).unwrap().len(),
        16 * MIB
    );
    let size = run(Command::new("nbdinfo").args(["--size", &node.uri("alpha")]));
    assert_eq!(size.trim(), (16 * MIB).to_string());
    // To the same size: nothing to do.
    assert_patched(&node, "alpha", grow, 16 * MIB, false, false);
    // A thick volume stays fully allocated when it grows.
    assert_patched(&node, "beta", r#"{"size":12582912}"#, 12 * MIB, true, false);

    // Read-only, and back.
    assert_patched(
        &node,
        "alpha",
        r#"{"read_only":true}"#,
        16 * MIB,
        false,
        true,
    );
    // An empty change.
    assert_patched(&node, "alpha", "{}", 16 * MIB, false, true);

    // Everything survives a restart.
    assert!(node.stop().success());
    node.restart();
    assert_volume(&node.volume("alpha"), "alpha", 16 * MIB, false, true);
    assert_volume(&node.volume("beta"), "beta", 12 * MIB, true, false);
    // Read-only: qemu-io must open it read-only too, and cannot open it for writing.
    qemu_io_with(&["-r"], &node.uri("alpha"), &["read -P 0x11 0 1M"]);
    let rw = output(&mut qemu_io_command(
        &["-f", "raw"],
        &["write 0 4k"],
        &[&node.uri("alpha")],
    ));
    assert!(!rw.status.success(), "qemu-io wrote to a read-only volume");
    assert_patched(
        &node,
        "alpha",
        r#"{"read_only":false}"#,
        16 * MIB,
        false,
        false,
    );

    // Delete.
    node.wait_open("alpha", 0);
    let r = node.api("DELETE", "/v1/node/volumes/alpha", None);
    assert_eq!(r.status, 204, "{}", r.body);
    assert_eq!(r.body, "");
    let files = pool_files(&node);
    assert_eq!(
        file_names(&files),
        [".tandem-pool.lock", "beta.meta", "beta.raw"],
        "alpha's .raw and .meta are gone"
    );
    let r = node.api("GET", "/v1/node/volumes/alpha", None);
    assert_error(&r, 404, false, "GET after DELETE");
    assert_eq!(names(&list(&node)), ["beta"]);
    let r = node.api("DELETE", "/v1/node/volumes/beta", None);
    assert_eq!(r.status, 204, "{}", r.body);
    assert_eq!(list(&node), json!([]));
    assert_eq!(file_names(&pool_files(&node)), [".tandem-pool.lock"]);

    // The name is free again.
    let r = create(&node, r#"{"name":"alpha","size":4096}"#);
    assert_eq!(r.status, 201, "{}", r.body);
    assert_volume(&r.json(), "alpha", 4096, false, false);
}

// ---------------------------------------------------------------------------------------
// 7. Bad input changes nothing.

#[test]
fn bad_requests_are_refused_with_json_errors_and_change_nothing() {
    let node = Node::start("apibad");
    node.create_volume("keep", 4 * MIB);
    qemu_io(&node.uri("keep"), &["write -P 0x42 0 64k", "flush"]);
    node.wait_open("keep", 0);
    // A file an operator left in the pool, in the way of a new volume's name.
    std::fs::write(pool_dir(&node).join("stray.raw"), b"operator data").unwrap();
    let volumes = list(&node);
    let files = pool_files(&node);
    let unchanged = |what: &str| {
        assert_eq!(list(&node), volumes, "volumes after {what}");
        assert!(pool_files(&node) == files, "pool files changed by {what}");
    };

    for (body, cause, what) in [
        (r#"{"name":"x","size":"#, true, "truncated JSON"),
        ("not json at all", true, "not JSON"),
        ("", true, "empty body"),
        ("[1,2]", true, "an array"),
        (
            r#"{"name":"x","size":4096,"sise":1}"#,
            true,
            "unknown field",
        ),
        (r#"{"name":"x"}"#, true, "missing size"),
        (r#"{"size":4096}"#, true, "missing name"),
        (r#"{"name":"../x","size":4096}"#, true, "name ../x"),
        (r#"{"name":"a b","size":4096}"#, true, "name with a space"),
        (r#"{"name":"a/b","size":4096}"#, true, "name with a slash"),
        (r#"{"name":"","size":4096}"#, true, "empty name"),
        (
            r#"{"name":".hidden","size":4096}"#,
            true,
            "name starting with .",
        ),
        (r#"{"name":"-x","size":4096}"#, true, "name starting with -"),
        (r#"{"name":"x","size":-4096}"#, true, "negative size"),
        (r#"{"name":"x","size":"4K"}"#, true, "size as a string"),
        (r#"{"name":"x","size":4096.5}"#, true, "fractional size"),
        (
            r#"{"name":"x","size":4096,"pool":"../p"}"#,
            true,
            "pool ../p",
        ),
        (
            r#"{"name":"x","size":4096,"thick":"yes"}"#,
            true,
            "thick as a string",
        ),
        (r#"{"name":"x","size":0}"#, false, "size 0"),
        (r#"{"name":"x","size":1000}"#, false, "size 1000"),
        (r#"{"name":"x","size":4097}"#, false, "size 4097"),
        (
            r#"{"name":"x","size":70368744181760}"#,
            false,
            "size 64 TiB + 4 KiB",
        ),
    ] {
        let e = assert_error(&create(&node, body), 400, cause, what);
        unchanged(what);
        if what == "unknown field" {
            assert!(e["cause"].as_str().unwrap().contains("sise"), "{e}");
        }
        if !cause {
            assert!(e["message"].as_str().unwrap().contains("size"), "{e}");
        }
    }
    let long = "x".repeat(65);
    let what = "65-character name";
    assert_error(
        &create(&node, &format!(r#"{{"name":"{long}","size":4096}}"#)),
        400,
        true,
        what,
    );
    unchanged(what);

    // Refused for what is already there (or is not): the message names it.
    for (body, status, named, what) in [
        (
            r#"{"name":"keep","size":8192}"#,
            409,
            "keep",
            "duplicate name",
        ),
        (
            r#"{"name":"keep","size":4096,"pool":"default","thick":true}"#,
            409,
            "",
            "duplicate name, thick, in the pool named",
        ),
        (
            r#"{"name":"x","size":4096,"pool":"nosuch"}"#,
            404,
            "nosuch",
            "unknown pool",
        ),
        (
            r#"{"name":"stray","size":4096}"#,
            409,
            "",
            "a stray file in the way",
        ),
    ] {
        let e = assert_error(&create(&node, body), status, false, what);
        assert!(e["message"].as_str().unwrap().contains(named), "{e}");
        unchanged(what);
    }

    let keep = "/v1/node/volumes/keep";
    for (body, status, cause, what) in [
        (r#"{"size":8192}"#, 400, false, "shrink"),
        (r#"{"size":4190208}"#, 400, false, "shrink by one block"),
        (r#"{"size":0}"#, 400, false, "grow to 0"),
        (
            r#"{"size":4195304}"#,
            400,
            false,
            "grow to a size not a multiple of 4K",
        ),
        (
            r#"{"size":8388608,"colour":"red"}"#,
            400,
            true,
            "unknown field",
        ),
        (r#"{"size":"8M"}"#, 400, true, "size as a string"),
        (r#"{"read_only":"yes"}"#, 400, true, "read_only as a string"),
        (r#"{"size":"#, 400, true, "truncated JSON"),
        ("", 400, true, "empty body"),
    ] {
        assert_error(&node.api("PATCH", keep, Some(body)), status, cause, what);
        unchanged(what);
    }
    for (method, path, body, status, what) in [
        (
            "PATCH",
            "/v1/node/volumes/nosuch",
            Some(r#"{"size":8192}"#),
            404,
            "PATCH unknown",
        ),
        (
            "PATCH",
            "/v1/node/volumes/a%20b",
            Some(r#"{"size":8192}"#),
            400,
            "PATCH invalid name",
        ),
        ("GET", "/v1/node/volumes/nosuch", None, 404, "GET unknown"),
        ("GET", "/v1/node/volumes/.x", None, 400, "GET invalid name"),
        (
            "DELETE",
            "/v1/node/volumes/nosuch",
            None,
            404,
            "DELETE unknown",
        ),
        (
            "DELETE",
            "/v1/node/volumes/a%20b",
            None,
            400,
            "DELETE invalid name",
        ),
        ("DELETE", "/v1/node/volumes/%2E%2E", None, 400, "DELETE .."),
        ("GET", "/v1/node/nothing-here", None, 404, "unknown route"),
        (
            "GET",
            "/v1/volumes",
            None,
            503,
            "cluster route on a node outside any cluster",
        ),
    ] {
        assert_error(&node.api(method, path, body), status, false, what);
        unchanged(what);
    }
    // Methods the routes do not have.
    for (method, path, body, what) in [
        ("PUT", keep, Some("{}"), "PUT"),
        (
            "DELETE",
            "/v1/node/volumes",
            None,
            "DELETE on the collection",
        ),
    ] {
        let r = node.api(method, path, body);
        assert!(
            r.status == 405 || r.status == 404,
            "{what} is not a method here: {} {}",
            r.status,
            r.body
        );
        unchanged(what);
    }

    // Deleting an open volume: refused while a writer has it, and while a reader has
    // it. Opening for writing records "not clean" in keep.meta and closing records
    // "clean" again, so from here on that file may differ and nothing else.
    let unchanged_but_meta = |what: &str| {
        assert_eq!(list(&node), volumes, "volumes after {what}");
        let now = pool_files(&node);
        assert_eq!(file_names(&now), file_names(&files), "after {what}");
        for (name, bytes) in &files {
            if name != "keep.meta" {
                assert!(&now[name] == bytes, "{name} changed by {what}");
            }
        }
    };
    let session = open_session(node.nbd, "keep");
    node.wait_open("keep", 1);
    let e = assert_error(
        &node.api("DELETE", keep, None),
        409,
        false,
        "DELETE while open",
    );
    assert!(e["message"].as_str().unwrap().contains("open"), "{e}");
    assert_eq!(node.volume("keep")["open"], 1);
    drop(session);
    node.wait_open("keep", 0);
    unchanged_but_meta("DELETE while open");

    node.patch_volume("keep", r#"{"read_only":true}"#);
    let session = open_session(node.nbd, "keep");
    node.wait_open("keep", 1);
    assert_error(
        &node.api("DELETE", keep, None),
        409,
        false,
        "DELETE while a reader has it open",
    );
    drop(session);
    node.wait_open("keep", 0);
    node.patch_volume("keep", r#"{"read_only":false}"#);
    unchanged_but_meta("DELETE while a reader has it open");
    qemu_io(&node.uri("keep"), &["read -P 0x42 0 64k"]);
}

/// Sizes the API accepts (up to 64 TiB) may exceed what the pool's file system can hold
/// in one file (16 TiB on ext4 with 4 KiB blocks): that is the client's request failing
/// on this pool, not an internal error, and nothing may be left behind. (On a file
/// system that holds such a file, the volume is simply created.)
#[test]
fn volume_too_large_for_the_pool_file_system_is_a_client_error() {
    let node = Node::start("apihuge");
    node.create_volume("small", 4 * MIB);
    let files = pool_files(&node);
    let volumes = list(&node);
    let mut problems = Vec::new();
    let mut judge = |r: &tandem_lab::Response, what: &str| {
        let e = assert_error(r, r.status, false, what);
        if !((400..500).contains(&r.status) || r.status == 507) {
            problems.push(format!("{what}: answered {} {e}", r.status));
        }
    };
    for (body, what) in [
        (
            r#"{"name":"huge","size":70368744177664}"#,
            "create 64 TiB thin",
        ),
        (
            r#"{"name":"huge","size":70368744177664,"thick":true}"#,
            "create 64 TiB thick",
        ),
    ] {
        let r = create(&node, body);
        if r.status == 201 {
            let r = node.api("DELETE", "/v1/node/volumes/huge", None);
            assert_eq!(r.status, 204, "{}", r.body);
        } else {
            judge(&r, what);
        }
        assert_eq!(list(&node), volumes, "{what}");
        assert!(pool_files(&node) == files, "{what} left files behind");
    }

    // Growing to such a size: the same, and the volume keeps its size.
    let r = node.api(
        "PATCH",
        "/v1/node/volumes/small",
        Some(r#"{"size":70368744177664}"#),
    );
    if r.status != 200 {
        judge(&r, "grow to 64 TiB thin");
        assert_eq!(list(&node), volumes, "after the failed grow");
        assert_eq!(
            std::fs::metadata(node.data_file("small")).unwrap().len(),
            4 * MIB
        );
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Growing a thick volume beyond the pool's free space must fail as "no space" (507,
/// like creating one) and leave the volume, its data file and the pool's free space as
/// they were.
#[test]
fn failed_grow_of_a_thick_volume_changes_nothing() {
    let Some(fs) = SmallFs::ext4(64) else {
        eprintln!("skipped: cannot mount a small ext4 file system on this machine");
        return;
    };
    let pool = fs.mnt.join("pool");
    let node = Node::start_with(
        "apifull",
        &["--pool", &format!("default={}", pool.display())],
    );
    let free = || {
        let r = node.api("GET", "/v1/node/pools", None);
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()[0]["free"].as_u64().unwrap()
    };
    let r = create(&node, r#"{"name":"t","size":8388608,"thick":true}"#);
    assert_eq!(r.status, 201, "{}", r.body);
    let volume = node.volume("t");
    let free_before = free();
    assert!(
        free_before > 16 * MIB && free_before < 64 * MIB,
        "{free_before}"
    );

    let r = node.api(
        "PATCH",
        "/v1/node/volumes/t",
        Some(r#"{"size":1073741824}"#),
    );
    let e = assert_error(&r, r.status, false, "grow beyond free space");
    let mut problems = Vec::new();
    if r.status != 507 {
        problems.push(format!("answered {} {e}, not 507", r.status));
    }
    let now = node.volume("t");
    if now != volume {
        problems.push(format!("volume was {volume}, is {now}"));
    }
    let len = std::fs::metadata(pool.join("t.raw")).unwrap().len();
    if len != 8 * MIB {
        problems.push(format!("t.raw is {len} bytes, was {}", 8 * MIB));
    }
    let free_after = free();
    if free_after + MIB < free_before {
        problems.push(format!(
            "pool free space went from {free_before} to {free_after} bytes"
        ));
    }
    let r = create(&node, r#"{"name":"u","size":4194304,"thick":true}"#);
    if r.status != 201 {
        problems.push(format!(
            "a 4 MiB thick volume no longer fits: {} {}",
            r.status, r.body
        ));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// A PATCH that both grows and marks read-only while a writer has the volume open is
/// refused (409), and must then change nothing: not even the size.
#[test]
fn refused_patch_changes_nothing_even_when_it_also_grows() {
    let node = Node::start("apipatch");
    node.create_volume("vol", 4 * MIB);
    let session = open_session(node.nbd, "vol");
    node.wait_open("vol", 1);
    let before = node.volume("vol");
    let r = node.api(
        "PATCH",
        "/v1/node/volumes/vol",
        Some(r#"{"size":8388608,"read_only":true}"#),
    );
    assert_error(&r, 409, false, "grow + read-only with a writer connected");
    let after = node.volume("vol");
    drop(session);
    assert_eq!(
        after["size"], before["size"],
        "a refused PATCH grew the volume: before {before}, after {after}"
    );
    assert_eq!(
        std::fs::metadata(node.data_file("vol")).unwrap().len(),
        4 * MIB,
        "a refused PATCH grew the data file"
    );
}

// ---------------------------------------------------------------------------------------
// 8. Corrupt metadata.

#[test]
fn corrupt_metadata_is_reported_failed_and_never_touched() {
    let mut node = Node::start("corrupt");
    node.create_volume("good", 4 * MIB);
    node.create_volume("bad", 4 * MIB);
    qemu_io(&node.uri("good"), &["write -P 0x61 0 64k", "flush"]);
    qemu_io(&node.uri("bad"), &["write -P 0x62 0 64k", "flush"]);
    assert!(node.stop().success());

    let meta = meta_file(&node, "bad");
    let mut bytes = std::fs::read(&meta).unwrap();
    bytes[100] ^= 0xff;
    bytes[4096 + 100] ^= 0xff;
    std::fs::write(&meta, &bytes).unwrap();
    let raw = std::fs::read(node.data_file("bad")).unwrap();

    let before = node.log().len();
    node.restart();
    let log = node.log()[before..].to_owned();
    assert!(log.contains("volume refused"), "{log}");

    let all = list(&node);
    assert_eq!(names(&all), ["bad", "good"]);
    let bad = node.volume("bad");
    assert_eq!(all[0], bad);
    assert_eq!(bad["disk"], "Failed", "{bad}");
    assert_eq!(bad["pool"], "default", "{bad}");
    let error = bad["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("corrupt"),
        "error names the corruption: {bad}"
    );
    assert!(error.contains("bad.meta"), "error names the file: {bad}");
    assert_volume(&node.volume("good"), "good", 4 * MIB, false, false);

    // The healthy volume works as before.
    qemu_io(
        &node.uri("good"),
        &["read -P 0x61 0 64k", "write -P 0x63 64k 4k", "flush"],
    );

    // NBD refuses the failed one with its reason; it is not even listed.
    let out = output(Command::new("nbdinfo").arg(node.uri("bad")));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "nbdinfo on a failed volume succeeded"
    );
    assert!(
        stderr.contains("opt_go") && stderr.contains("bad"),
        "nbdinfo's error names the export: {stderr}"
    );
    // On the wire: NBD_REP_ERR_PLATFORM with the reason for people.
    let (kind, message) = go_refusal(node.nbd, "bad");
    assert_eq!(kind, 0x8000_0004, "{message}");
    assert!(message.contains("corrupt"), "{message}");
    let exports = run(Command::new("nbdinfo").args(["--list", &node.uri("")]));
    assert!(exports.contains("good"), "{exports}");
    assert!(!exports.contains("export=\"bad\""), "{exports}");
    let qemu = output(&mut qemu_io_command(
        &["-f", "raw"],
        &["read 0 4k"],
        &[&node.unix_uri("bad")],
    ));
    assert!(!qemu.status.success(), "qemu-io opened a failed volume");

    // Refused: delete, grow, read-only, re-create.
    let e = assert_error(
        &node.api("DELETE", "/v1/node/volumes/bad", None),
        409,
        false,
        "DELETE failed volume",
    );
    assert!(e["message"].as_str().unwrap().contains("corrupt"), "{e}");
    assert_error(
        &node.api("PATCH", "/v1/node/volumes/bad", Some(r#"{"size":8388608}"#)),
        409,
        false,
        "grow failed volume",
    );
    assert_error(
        &node.api(
            "PATCH",
            "/v1/node/volumes/bad",
            Some(r#"{"read_only":true}"#),
        ),
        409,
        false,
        "read-only on a failed volume",
    );
    assert_error(
        &create(&node, r#"{"name":"bad","size":4096}"#),
        409,
        false,
        "re-create failed volume",
    );

    // Its files are exactly as they were, through all of that and another restart.
    assert!(node.stop().success());
    node.restart();
    assert_eq!(node.volume("bad")["disk"], "Failed");
    assert!(std::fs::read(&meta).unwrap() == bytes, "bad.meta changed");
    assert!(
        std::fs::read(node.data_file("bad")).unwrap() == raw,
        "bad.raw changed"
    );
    assert!(pool_dir(&node).join("good.meta").is_file());
    assert_eq!(node.volume("good")["disk"], "UpToDate");
}

// ---------------------------------------------------------------------------------------
// 9. Pools, node info, a second daemon.

#[test]
fn logs_in_a_file_carry_no_colour_codes_and_json_logs_are_one_object_per_line() {
    let text = Node::start("logtext");
    let log = text.log();
    assert!(log.contains("serving the node API"), "{log}");
    assert!(
        !log.contains('\x1b'),
        "escape sequences in a log file:\n{log}"
    );

    let json = Node::start_with("logjson", &["--log-format", "json"]);
    let log = json.log();
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["message"] == "serving the node API" && l["addr"].is_string()),
        "{log}"
    );
    for l in &lines {
        assert!(l["timestamp"].is_string() && l["level"].is_string(), "{l}");
        assert!(l["message"].is_string(), "{l}");
    }
}

#[test]
fn node_and_pool_info() {
    let node = Node::start("info1");
    node.create_volume("a", 4 * MIB);
    node.create_volume("b", 8 * MIB);

    let r = node.api("GET", "/v1/node/pools", None);
    assert_eq!(r.status, 200, "{}", r.body);
    let pools = r.json();
    let pools = pools.as_array().expect("a list of pools");
    assert_eq!(pools.len(), 1, "{pools:?}");
    let p = &pools[0];
    assert_eq!(p["name"], "default", "{p}");
    assert_eq!(p["kind"], "file", "{p}");
    assert_eq!(
        Path::new(p["path"].as_str().unwrap()),
        pool_dir(&node),
        "{p}"
    );
    assert_eq!(p["volumes"], 2, "{p}");
    let capacity = p["capacity"].as_u64().expect("capacity");
    let free = p["free"].as_u64().expect("free");
    assert!(capacity > free && free > 0, "{p}");

    let r = node.api("GET", "/v1/node", None);
    assert_eq!(r.status, 200, "{}", r.body);
    let info = r.json();
    assert_eq!(info["name"], "info1", "{info}");
    assert_eq!(info["version"], env!("CARGO_PKG_VERSION"), "{info}");
    assert_eq!(info["pools"].as_array().unwrap().len(), 1, "{info}");
    assert_eq!(info["pools"][0]["name"], "default", "{info}");
    assert_eq!(info["pools"][0]["kind"], "file", "{info}");
}

/// Starts `tandemd` on `dir` with fresh ports; returns the child.
fn second_daemon(dir: &Path, extra: &[&str]) -> std::process::Child {
    let [api, nbd] = tandem_lab::free_addrs();
    Command::new(tandem_lab::tandemd_bin())
        .args(["--name", "intruder", "--data-dir"])
        .arg(dir)
        .args([
            "--api-listen",
            &api.to_string(),
            "--nbd-listen",
            &nbd.to_string(),
        ])
        .args(extra)
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start a second tandemd")
}

fn stderr_of(child: &mut std::process::Child) -> String {
    let mut s = String::new();
    child.stderr.take().unwrap().read_to_string(&mut s).unwrap();
    s
}

/// Whether the first daemon still serves its volume over both NBD transports and its
/// API; the reason when it does not.
fn first_serves(node: &Node) -> Result<(), String> {
    let r = node.api("GET", "/v1/node", None);
    if r.status != 200 || r.json()["name"] != "owner" {
        return Err(format!("API: {} {}", r.status, r.body));
    }
    for uri in [node.uri("vol"), node.unix_uri("vol")] {
        let out = output(Command::new("nbdinfo").args(["--size", &uri]));
        if !out.status.success() {
            return Err(format!(
                "nbdinfo {uri}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    Ok(())
}

#[test]
fn second_daemon_on_the_same_data_dir_refuses_to_start() {
    let node = Node::start("owner");
    node.create_volume("vol", 4 * MIB);

    let mut child = second_daemon(&node.dir, &[]);
    let Some(status) = wait_exit(&mut child, Duration::from_secs(10)) else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("a second tandemd on the same data dir kept running");
    };
    let stderr = stderr_of(&mut child);
    assert!(!status.success(), "second tandemd exited with {status}");
    assert!(
        stderr.contains("in use by another tandemd"),
        "a clear reason: {stderr}"
    );
    assert!(
        stderr.contains(&node.dir.display().to_string()),
        "names the data directory: {stderr}"
    );
    assert_eq!(
        first_serves(&node),
        Ok(()),
        "after the refused second daemon"
    );
    assert_eq!(node.volume("vol")["disk"], "UpToDate");
}

/// Same data directory, but the second daemon is given another pool: the pool locks do
/// not meet, yet the data directory (and its NBD socket) is still the first daemon's.
#[test]
fn second_daemon_with_another_pool_does_not_take_over_the_nbd_socket() {
    let node = Node::start("owner");
    node.create_volume("vol", 4 * MIB);
    let other_pool = node.dir.join("other-pool");

    let mut child = second_daemon(
        &node.dir,
        &[&format!("--pool=other={}", other_pool.display())],
    );
    let early = wait_exit(&mut child, Duration::from_secs(2));
    let while_running = first_serves(&node);
    if early.is_none() {
        // SAFETY: signals our own child process.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        if wait_exit(&mut child, Duration::from_secs(10)).is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
    let stderr = stderr_of(&mut child);
    let afterwards = first_serves(&node);
    assert!(
        while_running.is_ok() && afterwards.is_ok(),
        "a second tandemd on the same data dir ({}) broke the first one:\n\
         while it ran: {while_running:?}\nafter it stopped: {afterwards:?}\n\
         the first's socket {} exists: {}\nsecond daemon's log:\n{stderr}",
        match early {
            Some(s) => format!("exited at once with {s}"),
            None => "started and ran".into(),
        },
        node.socket().display(),
        node.socket().exists(),
    );
}

// ---------------------------------------------------------------------------------------
// 10. What a cluster controller uses: joining, pools at run time, replicated volumes.

/// The cluster id `tandem_lab::spec` puts in its specs.
const CLUSTER: &str = "0123456789abcdef0123456789abcdef";
const OTHER_CLUSTER: &str = "fedcba9876543210fedcba9876543210";
const SECRET: &str = "s3cret-of-the-cluster-0123456789abcdef";

fn join_body(cluster: &str, secret: &str) -> String {
    json!({ "cluster-id": cluster, "secret": secret }).to_string()
}

/// The pools a node lists: (name, path).
fn pool_list(r: &tandem_lab::Response) -> Vec<(String, PathBuf)> {
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {}", r.body))
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_owned(),
                PathBuf::from(p["path"].as_str().unwrap()),
            )
        })
        .collect()
}

fn file_mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

#[test]
fn joined_node_answers_only_with_the_cluster_secret() {
    let mut node = Node::start("join1");
    let cluster_file = node.dir.join("cluster.json");
    let info = node.api("GET", "/v1/node", None).json();
    assert!(info.get("cluster-id").is_none(), "a fresh node: {info}");
    assert_eq!(info["api-version"], 1, "{info}");

    // Refused joins change nothing: the node stays open.
    for (body, what) in [
        (join_body(CLUSTER, "short"), "a short secret"),
        (
            join_body(CLUSTER, &"x".repeat(31)),
            "a secret of 31 characters",
        ),
        (
            join_body(CLUSTER, &format!("{SECRET} with spaces")),
            "a secret with spaces",
        ),
        (join_body("0123", SECRET), "a bad cluster id"),
        (json!({ "cluster-id": CLUSTER }).to_string(), "no secret"),
        (
            json!({ "cluster-id": CLUSTER, "secret": SECRET, "x": 1 }).to_string(),
            "an unknown field",
        ),
    ] {
        let e = assert_error(
            &node.api("POST", "/v1/node/join", Some(&body)),
            400,
            false,
            what,
        );
        if what.contains("secret of") || what == "a short secret" {
            assert!(e["message"].as_str().unwrap().contains("32"), "{what}: {e}");
        }
        assert!(!cluster_file.exists(), "{what} wrote cluster.json");
        assert_eq!(list(&node), json!([]), "{what}: the API is still open");
    }

    // Join.
    let r = node.api("POST", "/v1/node/join", Some(&join_body(CLUSTER, SECRET)));
    assert_eq!(r.status, 200, "{}", r.body);
    let info = r.json();
    assert_eq!(info["cluster-id"], CLUSTER, "{info}");
    assert_eq!(info["name"], "join1", "{info}");
    assert_eq!(
        file_mode(&cluster_file),
        0o600,
        "cluster.json holds the secret"
    );
    let stored: Value = serde_json::from_slice(&std::fs::read(&cluster_file).unwrap()).unwrap();
    assert_eq!(stored["cluster-id"], CLUSTER, "{stored}");
    assert_eq!(stored["secret"], SECRET, "{stored}");
    assert!(!node.dir.join("cluster.json.tmp").exists());

    // Without the secret, or with a wrong one: 401 everywhere but GET /v1/node.
    let expected_message =
        format!("node join1 belongs to cluster {CLUSTER}; its API needs the cluster secret");
    let spec = tandem_lab::spec("rv", 4 * MIB, &[(&node, tandem_lab::Kind::Diskful)], "");
    let refused = |r: &tandem_lab::Response, what: &str| {
        let e = assert_error(r, 401, false, what);
        assert_eq!(e["message"], expected_message.as_str(), "{what}");
        assert_eq!(
            e["correction"], "manage it through the cluster's controller",
            "{what}"
        );
    };
    let near_miss = format!("{}X", &SECRET[..SECRET.len() - 1]);
    let routes: [(&str, &str, Option<&str>); 11] = [
        ("GET", "/v1/node/volumes", None),
        (
            "POST",
            "/v1/node/volumes",
            Some(r#"{"name":"x","size":4096}"#),
        ),
        ("GET", "/v1/node/volumes/x", None),
        ("DELETE", "/v1/node/volumes/x", None),
        ("PUT", "/v1/node/volumes/rv/spec", Some(&spec)),
        ("GET", "/v1/node/pools", None),
        (
            "POST",
            "/v1/node/pools",
            Some(r#"{"name":"p","path":"/tmp/p"}"#),
        ),
        ("DELETE", "/v1/node/pools/default", None),
        ("GET", "/v1/node/replicated", None),
        ("POST", "/v1/node/leave", Some("{}")),
        ("GET", "/v1/node/nothing-here", None),
    ];
    for (method, path, body) in routes {
        refused(
            &node.api(method, path, body),
            &format!("{method} {path} without a secret"),
        );
        for secret in [&near_miss, &SECRET[..SECRET.len() - 1], "", "wrong"] {
            refused(
                &node.api_as(secret, method, path, body),
                &format!("{method} {path} with secret {secret:?}"),
            );
        }
    }
    assert!(
        cluster_file.exists(),
        "an unauthenticated leave was refused"
    );
    assert!(
        !node.dir.join("specs/rv.json").exists(),
        "an unauthenticated spec was refused"
    );
    let info = node.api("GET", "/v1/node", None);
    assert_eq!(info.status, 200, "{}", info.body);
    assert_eq!(info.json()["cluster-id"], CLUSTER);

    // With the secret.
    let r = node.api_as(
        SECRET,
        "POST",
        "/v1/node/volumes",
        Some(r#"{"name":"v1","size":4194304}"#),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let r = node.api_as(SECRET, "GET", "/v1/node/volumes", None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(names(&r.json()), ["v1"]);
    let r = node.api_as(SECRET, "PUT", "/v1/node/volumes/rv/spec", Some(&spec));
    assert_eq!(r.status, 200, "a spec of the node's cluster: {}", r.body);
    // A spec of another cluster is refused.
    let foreign = spec
        .replace(CLUSTER, OTHER_CLUSTER)
        .replace("\"rv\"", "\"rw\"");
    let e = assert_error(
        &node.api_as(SECRET, "PUT", "/v1/node/volumes/rw/spec", Some(&foreign)),
        400,
        false,
        "a spec of another cluster",
    );
    let message = e["message"].as_str().unwrap();
    assert!(
        message.contains(OTHER_CLUSTER) && message.contains(CLUSTER),
        "{e}"
    );
    assert!(!node.dir.join("specs/rw.json").exists());

    // Joining again: the same cluster and secret is fine; anything else is refused
    // with how to release the node.
    let r = node.api("POST", "/v1/node/join", Some(&join_body(CLUSTER, SECRET)));
    assert_eq!(r.status, 200, "the same join again: {}", r.body);
    assert_eq!(r.json()["cluster-id"], CLUSTER);
    let other_secret = format!("{SECRET}-other");
    for (body, what) in [
        (join_body(OTHER_CLUSTER, SECRET), "another cluster"),
        (
            join_body(OTHER_CLUSTER, &other_secret),
            "another cluster and secret",
        ),
        (
            join_body(CLUSTER, &other_secret),
            "the same cluster, another secret",
        ),
    ] {
        let e = assert_error(
            &node.api("POST", "/v1/node/join", Some(&body)),
            409,
            false,
            what,
        );
        let message = e["message"].as_str().unwrap();
        assert!(
            message.contains(CLUSTER) && message.contains("join1"),
            "{what}: {e}"
        );
        let correction = e["correction"].as_str().unwrap();
        assert!(
            correction.contains("tandem node delete join1") && correction.contains("cluster.json"),
            "{what}: {e}"
        );
        let stored: Value = serde_json::from_slice(&std::fs::read(&cluster_file).unwrap()).unwrap();
        assert_eq!(stored["cluster-id"], CLUSTER, "{what}");
        assert_eq!(stored["secret"], SECRET, "{what}");
    }

    // The membership survives a restart.
    assert!(node.stop().success());
    node.restart();
    assert_eq!(
        node.api("GET", "/v1/node", None).json()["cluster-id"],
        CLUSTER
    );
    refused(
        &node.api("GET", "/v1/node/volumes", None),
        "after a restart",
    );
    let r = node.api_as(SECRET, "GET", "/v1/node/volumes", None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(names(&r.json()), ["rv", "v1"]);

    // Leaving: the node is open again, and stays so across a restart.
    let r = node.api_as(SECRET, "POST", "/v1/node/leave", Some("{}"));
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.json().get("cluster-id").is_none(), "{}", r.body);
    assert!(!cluster_file.exists(), "leave removes cluster.json");
    assert_eq!(names(&list(&node)), ["rv", "v1"]);
    let r = node.api("POST", "/v1/node/leave", None);
    assert_eq!(r.status, 200, "leaving again: {}", r.body);
    assert!(node.stop().success());
    node.restart();
    assert!(
        node.api("GET", "/v1/node", None)
            .json()
            .get("cluster-id")
            .is_none()
    );
    assert_eq!(names(&list(&node)), ["rv", "v1"]);
    // Now another cluster may have it.
    let r = node.api(
        "POST",
        "/v1/node/join",
        Some(&join_body(OTHER_CLUSTER, &other_secret)),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["cluster-id"], OTHER_CLUSTER);
    refused_by(&node, OTHER_CLUSTER);
}

/// Asserts the node refuses an unauthenticated listing, naming `cluster`.
fn refused_by(node: &Node, cluster: &str) {
    let r = node.api("GET", "/v1/node/volumes", None);
    let e = assert_error(&r, 401, false, "unauthenticated");
    assert!(e["message"].as_str().unwrap().contains(cluster), "{e}");
}

/// A corrupt cluster.json stops the start with the file named and what to do.
#[test]
fn invalid_cluster_file_stops_the_start_with_a_reason() {
    let mut node = Node::start("join2");
    assert!(node.stop().success());
    std::fs::write(node.dir.join("cluster.json"), "{\"cluster-id\": 12").unwrap();
    let [api, nbd, peer] = tandem_lab::free_addrs();
    let mut child = Command::new(tandem_lab::tandemd_bin())
        .args(["--name", "join2", "--data-dir"])
        .arg(&node.dir)
        .args([
            "--api-listen",
            &api.to_string(),
            "--nbd-listen",
            &nbd.to_string(),
            "--peer-listen",
            &peer.to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let Some(status) = wait_exit(&mut child, Duration::from_secs(10)) else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("tandemd started with a corrupt cluster.json");
    };
    let stderr = stderr_of(&mut child);
    assert!(!status.success());
    assert!(
        stderr.contains("cluster.json") && stderr.contains("while tandemd is stopped"),
        "{stderr}"
    );
    std::fs::remove_file(node.dir.join("cluster.json")).unwrap();
    node.restart();
}

#[test]
fn pools_are_created_and_deleted_at_run_time() {
    let mut node = Node::start("pools1");
    let default_dir = pool_dir(&node);
    let fast_dir = node.dir.join("disks/fast/pool");
    let pools_file = node.dir.join("pools.json");
    let pools = |node: &Node| pool_list(&node.api("GET", "/v1/node/pools", None));
    assert_eq!(pools(&node), [("default".to_owned(), default_dir.clone())]);

    // Create: the directory (and its parents) are made.
    let body = json!({ "name": "fast", "path": fast_dir }).to_string();
    let r = node.api("POST", "/v1/node/pools", Some(&body));
    assert_eq!(r.status, 201, "{}", r.body);
    let created = r.json();
    assert_eq!(created["name"], "fast", "{created}");
    assert_eq!(created["kind"], "file", "{created}");
    assert_eq!(
        Path::new(created["path"].as_str().unwrap()),
        fast_dir,
        "{created}"
    );
    assert_eq!(created["volumes"], 0, "{created}");
    assert!(created["capacity"].as_u64().unwrap() > 0, "{created}");
    assert!(fast_dir.is_dir());
    let listed = node.api("GET", "/v1/node/pools", None).json();
    let without_free = |p: &Value| {
        let mut p = p.clone();
        p.as_object_mut().unwrap().remove("free");
        p
    };
    assert_eq!(without_free(&listed[1]), without_free(&created));
    assert_eq!(
        pools(&node),
        [
            ("default".to_owned(), default_dir.clone()),
            ("fast".to_owned(), fast_dir.clone())
        ]
    );
    let info = node.api("GET", "/v1/node", None).json();
    assert_eq!(info["pools"].as_array().unwrap().len(), 2, "{info}");
    let stored: Value = serde_json::from_slice(&std::fs::read(&pools_file).unwrap()).unwrap();
    assert_eq!(stored, json!([{ "name": "fast", "path": fast_dir }]));

    // Bad requests change nothing.
    let plain_file = node.dir.join("a-file");
    std::fs::write(&plain_file, "x").unwrap();
    let before = std::fs::read(&pools_file).unwrap();
    let other = node.dir.join("other");
    for (body, status, cause, what) in [
        (
            json!({"name": "p", "path": "relative/dir"}),
            400,
            false,
            "a relative path",
        ),
        (
            json!({"name": "p", "path": ""}),
            400,
            false,
            "an empty path",
        ),
        (
            json!({"name": "p", "path": format!("{}/../x", node.dir.display())}),
            400,
            false,
            "a path with ..",
        ),
        (
            json!({"name": "p", "path": plain_file}),
            400,
            false,
            "a file",
        ),
        (
            json!({"name": "../p", "path": other}),
            400,
            true,
            "an invalid name",
        ),
        (json!({"name": "p"}), 400, true, "no path"),
        (
            json!({"name": "p", "path": other, "kind": "lvm"}),
            400,
            true,
            "an unknown field",
        ),
        (
            json!({"name": "fast", "path": other}),
            409,
            false,
            "a name in use",
        ),
        (
            json!({"name": "default", "path": other}),
            409,
            false,
            "the settings' pool's name",
        ),
        (
            json!({"name": "p", "path": fast_dir}),
            409,
            false,
            "another pool's directory",
        ),
        (
            json!({"name": "p", "path": format!("{}/", fast_dir.display())}),
            409,
            false,
            "another pool's directory with a slash",
        ),
        (
            json!({"name": "p", "path": default_dir}),
            409,
            false,
            "the settings' pool's directory",
        ),
        (
            json!({"name": "p", "path": fast_dir.join("inner")}),
            409,
            false,
            "inside another pool",
        ),
        (
            json!({"name": "p", "path": node.dir.join("disks")}),
            409,
            false,
            "around another pool",
        ),
    ] {
        let r = node.api("POST", "/v1/node/pools", Some(&body.to_string()));
        let e = assert_error(&r, status, cause, what);
        if status == 409 {
            let message = e["message"].as_str().unwrap();
            assert!(
                message.contains("fast") || message.contains("default"),
                "{what}: names the other pool: {e}"
            );
        }
        assert_eq!(pools(&node).len(), 2, "{what}");
        assert!(
            std::fs::read(&pools_file).unwrap() == before,
            "{what} changed pools.json"
        );
        assert!(
            !other.exists() && !node.dir.join("relative").exists(),
            "{what} made a directory"
        );
        assert!(!fast_dir.join("inner").exists(), "{what} made a directory");
    }

    // A volume in the new pool; the pool cannot be deleted while it holds it.
    let r = create(&node, r#"{"name":"quick","size":4194304,"pool":"fast"}"#);
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.json()["pool"], "fast");
    assert!(fast_dir.join("quick.raw").is_file() && fast_dir.join("quick.meta").is_file());
    let e = assert_error(
        &node.api("DELETE", "/v1/node/pools/fast", None),
        409,
        false,
        "a pool with a volume",
    );
    assert!(e["message"].as_str().unwrap().contains("quick"), "{e}");
    let e = assert_error(
        &node.api("DELETE", "/v1/node/pools/default", None),
        409,
        false,
        "the settings' pool",
    );
    assert!(
        e["message"].as_str().unwrap().contains("every start"),
        "{e}"
    );
    let e = assert_error(
        &node.api("DELETE", "/v1/node/pools/nosuch", None),
        404,
        false,
        "an unknown pool",
    );
    let message = e["message"].as_str().unwrap();
    assert!(
        message.contains("nosuch") && message.contains("default, fast"),
        "{e}"
    );
    assert_error(
        &node.api("DELETE", "/v1/node/pools/a%20b", None),
        400,
        false,
        "an invalid pool name",
    );
    assert_eq!(pools(&node).len(), 2);

    // The pool and its volume survive a restart.
    assert!(node.stop().success());
    node.restart();
    assert_eq!(
        pools(&node),
        [
            ("default".to_owned(), default_dir.clone()),
            ("fast".to_owned(), fast_dir.clone())
        ]
    );
    assert_eq!(node.volume("quick")["pool"], "fast");
    qemu_io(&node.uri("quick"), &["write -P 0x17 0 64k", "flush"]);
    node.wait_open("quick", 0);

    // Emptied, it is forgotten; its directory stays.
    let r = node.api("DELETE", "/v1/node/volumes/quick", None);
    assert_eq!(r.status, 204, "{}", r.body);
    let r = node.api("DELETE", "/v1/node/pools/fast", None);
    assert_eq!(r.status, 204, "{}", r.body);
    assert_eq!(pools(&node), [("default".to_owned(), default_dir.clone())]);
    assert!(fast_dir.is_dir(), "the directory is left in place");
    let stored: Value = serde_json::from_slice(&std::fs::read(&pools_file).unwrap()).unwrap();
    assert_eq!(stored, json!([]));
    assert_error(
        &node.api("DELETE", "/v1/node/pools/fast", None),
        404,
        false,
        "deleting it again",
    );
    assert!(node.stop().success());
    node.restart();
    assert_eq!(pools(&node).len(), 1, "a forgotten pool stays forgotten");

    // The same directory again, under another name.
    let body = json!({ "name": "again", "path": fast_dir }).to_string();
    let r = node.api("POST", "/v1/node/pools", Some(&body));
    assert_eq!(r.status, 201, "{}", r.body);

    // A remembered pool whose directory is gone at a start (an unmounted disk) is left
    // out, not made again; it can then be forgotten.
    assert!(node.stop().success());
    std::fs::remove_dir_all(&fast_dir).unwrap();
    node.restart();
    assert_eq!(pools(&node).len(), 1);
    assert!(
        !fast_dir.exists(),
        "a missing pool directory was made again"
    );
    assert!(
        node.log().contains("pool directory is missing"),
        "{}",
        node.log()
    );
    let body = json!({ "name": "again", "path": other }).to_string();
    let e = assert_error(
        &node.api("POST", "/v1/node/pools", Some(&body)),
        409,
        false,
        "the name of a pool left out",
    );
    assert!(e["correction"].as_str().unwrap().contains("DELETE"), "{e}");
    let r = node.api("DELETE", "/v1/node/pools/again", None);
    assert_eq!(r.status, 204, "{}", r.body);
    let stored: Value = serde_json::from_slice(&std::fs::read(&pools_file).unwrap()).unwrap();
    assert_eq!(stored, json!([]));
}

/// A spec with `"pool"` on this node's participant.
fn spec_in_pool(node: &Node, volume: &str, pool: Option<&str>) -> String {
    let spec = tandem_lab::spec(volume, 4 * MIB, &[(node, tandem_lab::Kind::Diskful)], "");
    let mut spec: Value = serde_json::from_str(&spec).unwrap();
    if let Some(pool) = pool {
        spec["participants"][0]["pool"] = json!(pool);
    }
    spec.to_string()
}

fn put_spec(node: &Node, volume: &str, spec: &str) -> tandem_lab::Response {
    node.api(
        "PUT",
        &format!("/v1/node/volumes/{volume}/spec"),
        Some(spec),
    )
}

#[test]
fn specs_place_replicas_in_the_pool_they_name_and_are_reported() {
    let mut node = Node::start("place1");
    let fast_dir = node.dir.join("fast");
    let specs_dir = node.dir.join("specs");
    let spec_files = || -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&specs_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    };
    let replicated = |node: &Node| {
        let r = node.api("GET", "/v1/node/replicated", None);
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()
    };
    assert_eq!(replicated(&node), json!([]));

    // A pool the node does not have: refused, naming it and the node's pools.
    let in_fast = spec_in_pool(&node, "vf", Some("fast"));
    let r = put_spec(&node, "vf", &in_fast);
    let e = assert_error(&r, 400, false, "a spec naming an unknown pool");
    let message = e["message"].as_str().unwrap();
    assert!(
        message.contains("fast") && message.contains("default"),
        "{e}"
    );
    assert!(spec_files().is_empty(), "{:?}", spec_files());
    assert_eq!(list(&node), json!([]));

    let body = json!({ "name": "fast", "path": fast_dir }).to_string();
    let r = node.api("POST", "/v1/node/pools", Some(&body));
    assert_eq!(r.status, 201, "{}", r.body);
    let r = put_spec(&node, "vf", &in_fast);
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(fast_dir.join("vf.raw").is_file() && fast_dir.join("vf.meta").is_file());
    assert!(!pool_dir(&node).join("vf.meta").exists());
    assert_eq!(node.volume("vf")["pool"], "fast");
    // Without a pool: the first one.
    let r = put_spec(&node, "vd", &spec_in_pool(&node, "vd", None));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(node.volume("vd")["pool"], "default");
    // An existing replica is not moved: a spec placing it elsewhere is refused.
    let e = assert_error(
        &put_spec(&node, "vd", &spec_in_pool(&node, "vd", Some("fast"))),
        400,
        false,
        "a spec placing an existing replica in another pool",
    );
    assert!(e["message"].as_str().unwrap().contains("default"), "{e}");
    let e = assert_error(
        &node.api("DELETE", "/v1/node/pools/fast", None),
        409,
        false,
        "a pool holding a replica",
    );
    assert!(e["message"].as_str().unwrap().contains("vf"), "{e}");

    // Both reported with spec and status, by name.
    let check_report = |node: &Node, report: &Value| {
        let all = report.as_array().unwrap_or_else(|| panic!("{report}"));
        let names: Vec<&str> = all
            .iter()
            .map(|r| r["spec"]["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["vd", "vf"], "{report}");
        for r in all {
            let name = r["spec"]["name"].as_str().unwrap();
            assert_eq!(r["spec"]["cluster-id"], CLUSTER, "{r}");
            assert_eq!(r["spec"]["size"], 4 * MIB, "{r}");
            assert_eq!(r["status"]["name"], name, "{r}");
            assert_eq!(r["status"]["node"], "place1", "{r}");
            assert_eq!(r["status"]["kind"], "diskful", "{r}");
            assert_eq!(r["status"], node.status(name), "{r}");
        }
        assert_eq!(
            all[1]["spec"]["participants"][0]["pool"], "fast",
            "{report}"
        );
        assert!(
            all[0]["spec"]["participants"][0].get("pool").is_none(),
            "{report}"
        );
    };
    check_report(&node, &replicated(&node));

    // After a restart: the same.
    assert!(node.stop().success());
    node.restart();
    check_report(&node, &replicated(&node));
    assert_eq!(node.volume("vf")["pool"], "fast");

    // The pool's file system missing at a start: its replica's spec cannot be applied;
    // deleting the volume still removes the spec, so it does not come back.
    assert!(node.stop().success());
    let moved = node.dir.join("fast-unmounted");
    std::fs::rename(&fast_dir, &moved).unwrap();
    node.restart();
    let report = replicated(&node);
    let names: Vec<&str> = report
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["spec"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["vd"], "{report}");
    let r = node.api("DELETE", "/v1/node/volumes/vf", None);
    assert_eq!(r.status, 204, "{}", r.body);
    assert_eq!(spec_files(), ["vd.json"]);
    assert_error(
        &node.api("DELETE", "/v1/node/volumes/vf", None),
        404,
        false,
        "deleting it again",
    );

    // A replicated volume that is not open: spec and replica go; then 404.
    let r = node.api("DELETE", "/v1/node/volumes/vd", None);
    assert_eq!(r.status, 204, "{}", r.body);
    assert!(spec_files().is_empty(), "{:?}", spec_files());
    assert!(!pool_dir(&node).join("vd.meta").exists());
    assert!(!pool_dir(&node).join("vd.raw").exists());
    assert_eq!(replicated(&node), json!([]));
    assert_eq!(list(&node), json!([]));
    assert_error(
        &node.api("DELETE", "/v1/node/volumes/vd", None),
        404,
        false,
        "deleting a replicated volume again",
    );
    assert!(node.stop().success());
    node.restart();
    assert_eq!(replicated(&node), json!([]));
    assert_eq!(list(&node), json!([]));
}

#[test]
fn a_spec_older_than_the_one_held_is_refused() {
    let node = Node::start("rev1");
    let spec = |revision: u64, size: u64| {
        let mut v: serde_json::Value = tandem_lab::json(&tandem_lab::spec(
            "vr",
            size,
            &[(&node, tandem_lab::Kind::Diskful)],
            "",
        ));
        v["revision"] = revision.into();
        v.to_string()
    };
    let held = |node: &Node| {
        let r = node.api("GET", "/v1/node/replicated", None);
        let v = r.json()[0]["spec"].clone();
        (
            v["revision"].as_u64().unwrap_or(0),
            v["size"].as_u64().unwrap(),
        )
    };
    assert_eq!(put_spec(&node, "vr", &spec(5, 16 << 20)).status, 200);
    // A delayed, older spec (a smaller size, say) is refused and changes nothing.
    let r = put_spec(&node, "vr", &spec(3, 8 << 20));
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(
        r.body
            .contains("spec revision 3 is older than the one this node holds (5)"),
        "{}",
        r.body
    );
    assert_eq!(held(&node), (5, 16 << 20));
    // The same revision again, and newer ones, are taken.
    assert_eq!(put_spec(&node, "vr", &spec(5, 16 << 20)).status, 200);
    assert_eq!(put_spec(&node, "vr", &spec(6, 32 << 20)).status, 200);
    assert_eq!(held(&node), (6, 32 << 20));
}
