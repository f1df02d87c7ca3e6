//! System tests: a real `tandemd` driven by the real NBD clients people attach to it
//! (nbdinfo, qemu-io, qemu-img, nbdcopy, nbdsh, fio). Every test checks bytes and states,
//! on the wire and in the volume's raw data file, not only exit codes.

use std::os::unix::fs::{FileExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tandem_lab::{
    HeldClient, Node, assert_file_filled, assert_file_holds, assert_same_bytes, fio_jobs, json,
    nbdsh, output, qemu_io, qemu_io_command, qemu_io_with, random_bytes, read_range, run, scratch,
    wait_for,
};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// Writes a sparse image of `len` random bytes with real holes at `holes` (offset, len);
/// returns its contents.
fn make_image(path: &Path, len: u64, holes: &[(u64, u64)], seed: u64) -> Vec<u8> {
    let mut content = random_bytes(len as usize, seed);
    for &(off, n) in holes {
        content[off as usize..(off + n) as usize].fill(0);
    }
    let file = std::fs::File::create(path).unwrap();
    file.set_len(len).unwrap();
    let mut at = 0;
    while at < len {
        let end = holes
            .iter()
            .filter(|&&(off, _)| off >= at)
            .map(|&(off, _)| off)
            .min()
            .unwrap_or(len);
        file.write_all_at(&content[at as usize..end as usize], at)
            .unwrap();
        at = holes
            .iter()
            .find(|&&(off, _)| off == end)
            .map_or(len, |&(off, n)| off + n);
    }
    file.sync_all().unwrap();
    content
}

/// Node `name` with a volume `vm1` of `size`, and in a scratch directory an image
/// `in.raw` of that size (see [`make_image`]): the node, the directory, the image's path
/// and its contents.
fn node_and_image(
    name: &str,
    size: u64,
    holes: &[(u64, u64)],
    seed: u64,
) -> (Node, PathBuf, PathBuf, Vec<u8>) {
    let node = Node::start(name);
    node.create_volume("vm1", size);
    let dir = scratch(&format!("{name}-files"));
    let image = dir.join("in.raw");
    let content = make_image(&image, size, holes, seed);
    (node, dir, image, content)
}

fn sha256(path: &Path) -> String {
    let out = run(Command::new("sha256sum").arg(path));
    out.split_whitespace().next().unwrap().to_owned()
}

/// Waits until the node's log shows `n` NBD connections made.
fn wait_for_connections(node: &Node, n: usize) {
    wait_for(
        &format!("{n} NBD clients connected"),
        Duration::from_secs(15),
        &[node],
        || node.log().matches("NBD client connected").count() >= n,
    );
}

/// The direct-I/O alignment the kernel reports for a file, computed the way tandemd does:
/// what it advertises as the minimum block size.
fn dio_alignment(path: &Path) -> u64 {
    let file = std::fs::File::open(path).unwrap();
    // SAFETY: statx fills the zeroed struct we own; empty path with AT_EMPTY_PATH on a
    // valid descriptor.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    let rc = unsafe {
        libc::statx(
            std::os::fd::AsRawFd::as_raw_fd(&file),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if rc == 0 && stx.stx_mask & libc::STATX_DIOALIGN != 0 && stx.stx_dio_offset_align != 0 {
        (stx.stx_dio_offset_align.max(stx.stx_dio_mem_align) as u64).max(512)
    } else {
        4096
    }
}

// ---------------------------------------------------------------------------------------
// 1. What clients are told during negotiation
// ---------------------------------------------------------------------------------------

#[test]
fn nbdinfo_reports_every_advertised_feature_and_block_size() {
    let node = Node::start("info");
    node.create_volume("vm1", 64 * MIB);
    let expected_minimum = dio_alignment(&node.data_file("vm1"));
    assert!(
        [512, 1024, 2048, 4096].contains(&expected_minimum),
        "odd alignment {expected_minimum}"
    );

    for uri in [node.uri("vm1"), node.unix_uri("vm1")] {
        let info = json(&run(Command::new("nbdinfo").arg("--json").arg(&uri)));
        assert_eq!(info["protocol"], "newstyle-fixed", "{uri}: {info:#}");
        assert_eq!(info["TLS"], false, "{uri}");
        assert_eq!(info["structured"], true, "{uri}: structured replies");
        let exports = info["exports"].as_array().expect("exports array");
        assert_eq!(exports.len(), 1, "{uri}: {info:#}");
        let e = &exports[0];
        assert_eq!(e["export-name"], "vm1");
        assert_eq!(e["description"], "Tandem volume vm1");
        assert_eq!(e["export-size"], 64 * MIB, "{uri}");
        assert_eq!(e["is_read_only"], false, "{uri}");
        for flag in [
            "can_flush",
            "can_fua",
            "can_trim",
            "can_zero",
            "can_fast_zero",
            "can_multi_conn",
            "can_cache",
            "can_df",
        ] {
            assert_eq!(e[flag], true, "{uri}: {flag} in {e:#}");
        }
        let contexts = e["contexts"].as_array().expect("contexts array");
        assert!(
            contexts.iter().any(|c| c == "base:allocation"),
            "{uri}: contexts {contexts:?}"
        );
        assert_eq!(e["block_size_minimum"], expected_minimum, "{uri}");
        assert_eq!(e["block_size_preferred"], 4096, "{uri}");
        assert_eq!(e["block_size_maximum"], 32 * MIB, "{uri}");
    }
}

#[test]
fn nbdinfo_lists_every_volume_with_its_size() {
    let node = Node::start("list");
    node.create_volume("vm1", 64 * MIB);
    node.create_volume("data2", 8 * MIB);
    let list = json(&run(Command::new("nbdinfo")
        .args(["--json", "--list"])
        .arg(node.unix_uri(""))));
    let mut seen: Vec<(String, u64)> = list["exports"]
        .as_array()
        .expect("exports")
        .iter()
        .map(|e| {
            (
                e["export-name"].as_str().unwrap().to_owned(),
                e["export-size"].as_u64().unwrap(),
            )
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        [("data2".to_owned(), 8 * MIB), ("vm1".to_owned(), 64 * MIB)]
    );
}

// ---------------------------------------------------------------------------------------
// 2. qemu-io: every kind of request, checked in the raw data file
// ---------------------------------------------------------------------------------------

/// Runs a fixed mix of qemu-io requests (qemu-io options `opts`) against a 16 MiB volume
/// and returns what the volume must hold afterwards.
fn qemu_io_request_mix(opts: &[&str], target: &str) -> Vec<u8> {
    let mut model = vec![0u8; (16 * MIB) as usize];
    let mut fill = |off: u64, len: u64, byte: u8| {
        model[off as usize..(off + len) as usize].fill(byte);
    };
    fill(0, 8 * MIB, 0x11);
    fill(0, MIB, 0xab);
    fill(MIB, MIB, 0); // write -z (NO_HOLE)
    fill(2 * MIB, MIB, 0); // write -z -u (may unmap)
    fill(3 * MIB, MIB, 0); // discard (thin volume: punched, reads as zeros)
    fill(4 * MIB, 64 * KIB, 0xcd); // FUA write
    fill(5 * MIB, 128 * KIB, 0xef);
    fill(6 * MIB, 4 * KIB, 0xee);
    fill(6 * MIB + 12 * KIB, 8 * KIB, 0xed);
    fill(7 * MIB + 100, 1000, 0x5a); // unaligned: read-modify-write in qemu
    fill(12 * MIB, 4 * MIB, 0x77);

    let out = qemu_io_with(
        opts,
        target,
        &[
            "write -P 0x11 0 8M",
            "write -P 0xab 0 1M",
            "read -P 0xab 0 1M",
            "write -z 1M 1M",
            "write -z -u 2M 1M",
            "discard 3M 1M",
            "write -f -P 0xcd 4M 64k",
            "aio_write -P 0xef 5M 128k",
            "aio_write -P 0xee 6M 4k",
            "aio_write -P 0xed 6303744 8k",
            "aio_flush",
            "write -P 0x5a 7340132 1000",
            "write -P 0x77 12M 4M",
            "flush",
            "read -P 0 1M 3M",
            "read -P 0xcd 4M 64k",
            "read -P 0x11 4259840 983040",
            "read -P 0xef 5M 128k",
            "read -P 0xee 6M 4k",
            "read -P 0x11 6295552 8k",
            "read -P 0xed 6303744 8k",
            "read -P 0x11 7M 100",
            "read -P 0x5a 7340132 1000",
            "read -P 0x11 7341132 1000",
            "read -P 0 8M 4M",
            "read -P 0x77 12M 4M",
        ],
    );
    for line in [
        "wrote 8388608/8388608 bytes at offset 0",
        "wrote 1048576/1048576 bytes at offset 1048576",
        "wrote 1048576/1048576 bytes at offset 2097152",
        "discard 1048576/1048576 bytes at offset 3145728",
        "wrote 65536/65536 bytes at offset 4194304",
        "wrote 131072/131072 bytes at offset 5242880",
        "wrote 1000/1000 bytes at offset 7340132",
        "read 3145728/3145728 bytes at offset 1048576",
        "read 4194304/4194304 bytes at offset 12582912",
    ] {
        assert!(out.contains(line), "qemu-io did not say {line:?}:\n{out}");
    }
    model
}

fn qemu_io_requests_land_in_the_data_file(node: &Node) {
    for (volume, opts, target) in [
        ("plain", &[][..], node.uri("plain")),
        ("nocache", &["-t", "none"][..], node.unix_uri("nocache")),
    ] {
        node.create_volume(volume, 16 * MIB);
        let model = qemu_io_request_mix(opts, &target);
        let file = node.data_file(volume);
        assert_file_holds(
            &file,
            0,
            &model,
            &format!("data file of {volume} (qemu-io {opts:?})"),
        );
        // And a fresh connection reads the same through the server.
        qemu_io_with(
            opts,
            &target,
            &[
                "read -P 0xab 0 1M",
                "read -P 0 1M 3M",
                "read -P 0xcd 4M 64k",
            ],
        );
    }
}

#[test]
fn qemu_io_requests_land_in_the_data_file_with_direct_io() {
    let node = Node::start("qio-direct");
    qemu_io_requests_land_in_the_data_file(&node);
}

#[test]
fn qemu_io_requests_land_in_the_data_file_with_writeback_cache() {
    let node = Node::start_with("qio-wb", &["--cache", "writeback"]);
    qemu_io_requests_land_in_the_data_file(&node);
}

// ---------------------------------------------------------------------------------------
// 3. qemu-img: whole images in and out, and the allocation map
// ---------------------------------------------------------------------------------------

/// One extent from `qemu-img map --output=json` or `nbdinfo --map --json`, normalised.
#[derive(Debug, PartialEq)]
struct MapEntry {
    start: u64,
    len: u64,
    zero: bool,
    data: bool,
}

fn qemu_img_map(uri: &str) -> Vec<MapEntry> {
    let map = json(&run(Command::new("qemu-img")
        .args(["map", "--output=json", "-f", "raw"])
        .arg(uri)));
    map.as_array()
        .expect("map array")
        .iter()
        .map(|e| MapEntry {
            start: e["start"].as_u64().unwrap(),
            len: e["length"].as_u64().unwrap(),
            zero: e["zero"].as_bool().unwrap(),
            data: e["data"].as_bool().unwrap(),
        })
        .collect()
}

fn nbdinfo_map(uri: &str) -> Vec<MapEntry> {
    let map = json(&run(Command::new("nbdinfo")
        .args(["--map", "--json"])
        .arg(uri)));
    map.as_array()
        .expect("map array")
        .iter()
        .map(|e| {
            let kind = e["type"].as_u64().unwrap();
            MapEntry {
                start: e["offset"].as_u64().unwrap(),
                len: e["length"].as_u64().unwrap(),
                // base:allocation: bit 0 hole, bit 1 zero.
                zero: kind & 2 != 0,
                data: kind & 1 == 0,
            }
        })
        .collect()
}

/// Asserts the map covers `[0, size)` without gaps and says what it says about a range.
fn assert_map(map: &[MapEntry], size: u64, start: u64, len: u64, zero: bool, tool: &str) {
    let mut at = 0;
    for e in map {
        assert_eq!(e.start, at, "{tool}: gap or overlap in {map:#?}");
        at += e.len;
    }
    assert_eq!(at, size, "{tool}: map does not cover the volume: {map:#?}");
    for e in map {
        if e.start < start + len && start < e.start + e.len {
            assert_eq!(
                (e.zero, e.data),
                (zero, !zero),
                "{tool}: [{start}, +{len}) should be {} but {e:?} says otherwise:\n{map:#?}",
                if zero { "a hole" } else { "data" }
            );
        }
    }
}

#[test]
fn qemu_img_convert_round_trips_an_image_and_map_shows_discarded_holes() {
    let size = 32 * MIB;
    let holes = [(4 * MIB, 2 * MIB), (20 * MIB, 64 * KIB), (31 * MIB, MIB)];
    let (node, dir, image, content) = node_and_image("convert", size, &holes, 3);
    let uri = node.uri("vm1");
    let file = node.data_file("vm1");

    // Junk first, so the image's zero runs must really be written as zeros.
    qemu_io(&uri, &["write -P 0xff 0 32M"]);
    run(Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&image)
        .arg(&uri));
    assert_file_holds(&file, 0, &content, "data file after qemu-img convert in");

    let back = dir.join("out.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(&uri)
        .arg(&back));
    let compare = run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&image)
        .arg(&back));
    assert!(compare.contains("Images are identical"), "{compare}");
    assert_eq!(sha256(&back), sha256(&image), "image converted back out");
    assert_eq!(sha256(&file), sha256(&image), "data file");

    // The source's first hole went over as zeroes; the data around it is data.
    for (tool, map) in [
        ("qemu-img map", qemu_img_map(&uri)),
        ("nbdinfo --map", nbdinfo_map(&uri)),
    ] {
        assert_map(&map, size, 0, 4 * MIB, false, tool);
        assert_map(&map, size, 4 * MIB, 2 * MIB, true, tool);
        assert_map(&map, size, 6 * MIB, 2 * MIB, false, tool);
    }

    // A discarded range becomes a hole in both tools' view, and zeros in the file.
    qemu_io(&uri, &["discard 8M 2M", "read -P 0 8M 2M"]);
    for (tool, map) in [
        ("qemu-img map", qemu_img_map(&uri)),
        ("nbdinfo --map", nbdinfo_map(&uri)),
    ] {
        assert_map(&map, size, 8 * MIB, 2 * MIB, true, tool);
        assert_map(&map, size, 6 * MIB, 2 * MIB, false, tool);
        assert_map(&map, size, 10 * MIB, 10 * MIB, false, tool);
        assert!(
            map.contains(&MapEntry {
                start: 8 * MIB,
                len: 2 * MIB,
                zero: true,
                data: false
            }),
            "{tool}: no extent exactly [8M, +2M): {map:#?}"
        );
    }
    assert_file_filled(&file, 8 * MIB, 2 * MIB, 0);
    assert_file_holds(
        &file,
        10 * MIB,
        &content[(10 * MIB) as usize..],
        "data after the discarded range",
    );
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------
// 4. nbdcopy over two connections (multi-conn)
// ---------------------------------------------------------------------------------------

#[test]
fn nbdcopy_with_two_connections_copies_in_and_out_exactly() {
    let size = 24 * MIB;
    let holes = [(MIB, 3 * MIB), (16 * MIB, 256 * KIB)];
    let (node, dir, image, content) = node_and_image("nbdcopy", size, &holes, 4);
    let uri = node.uri("vm1");
    let file = node.data_file("vm1");

    // Junk first: the image's holes must come out as zeros, not as what was there.
    qemu_io(&uri, &["write -P 0xee 0 24M"]);
    run(Command::new("nbdcopy")
        .args(["--connections=2", "--requests=16", "--flush"])
        .arg(&image)
        .arg(&uri));
    assert_file_holds(&file, 0, &content, "data file after nbdcopy in");

    let back = dir.join("out.raw");
    std::fs::File::create(&back).unwrap();
    run(Command::new("nbdcopy")
        .args(["--connections=2", "--requests=16"])
        .arg(node.unix_uri("vm1"))
        .arg(&back));
    assert_eq!(std::fs::metadata(&back).unwrap().len(), size);
    assert_eq!(sha256(&back), sha256(&image), "nbdcopy out vs the image");
    assert_same_bytes(&std::fs::read(&back).unwrap(), &content, "nbdcopy out");
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------
// 5. fio's nbd engine: deep queues, two jobs, verified
// ---------------------------------------------------------------------------------------

/// Two verifying fio jobs on `uri`, reporting to `out`; returns the jobs' reports.
fn fio_verified(uri: &str, out: &Path, extra: &[&str]) -> Vec<Value> {
    let mut cmd = Command::new("fio");
    // Anything fio leaves behind goes to the scratch directory, not the crate.
    cmd.current_dir(out.parent().unwrap())
        .args([
            "--name=v",
            "--ioengine=nbd",
            "--rw=randwrite",
            "--bsrange=4k-1m",
            "--iodepth=32",
            "--numjobs=2",
            "--size=16m",
            "--offset_increment=16m",
            "--verify=crc32c",
            "--verify_state_save=0",
            "--randseed=1234",
        ])
        .arg(format!("--uri={uri}"))
        .args(extra);
    fio_jobs(&mut cmd, out)
}

#[test]
fn fio_nbd_engine_random_writes_verify_with_two_jobs_deep_queues() {
    let node = Node::start("fio");
    node.create_volume("vm1", 64 * MIB);
    let dir = scratch("fio-files");

    let jobs = fio_verified(
        &node.unix_uri("vm1"),
        &dir.join("write.json"),
        &["--do_verify=1"],
    );
    assert_eq!(jobs.len(), 2, "one report per job");
    for job in &jobs {
        assert_eq!(job["error"], 0, "{job:#}");
        assert_eq!(job["write"]["io_bytes"], 16 * MIB, "written: {job:#}");
        assert!(job["write"]["total_ios"].as_u64().unwrap() > 16, "{job:#}");
        // The verify phase read back everything the job wrote.
        assert_eq!(job["read"]["io_bytes"], 16 * MIB, "verified: {job:#}");
    }

    // Again, verify only, on a new connection over TCP: the data is in the volume.
    let jobs = fio_verified(
        &node.uri("vm1"),
        &dir.join("verify.json"),
        &["--verify_only=1"],
    );
    for job in &jobs {
        assert_eq!(job["error"], 0, "{job:#}");
        assert_eq!(job["read"]["io_bytes"], 16 * MIB, "verified: {job:#}");
    }

    // The jobs kept to [0, 32M): the rest of the volume was never written.
    let file = node.data_file("vm1");
    assert!(
        read_range(&file, 0, 32 * MIB).iter().any(|&b| b != 0),
        "fio data is missing from the data file"
    );
    assert_file_filled(&file, 32 * MIB, 32 * MIB, 0);
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------
// 6. Restarts and crashes
// ---------------------------------------------------------------------------------------

#[test]
fn unflushed_writes_survive_a_clean_stop_with_a_client_attached() {
    let mut node = Node::start("restart");
    node.create_volume("vm1", 16 * MIB);
    qemu_io(&node.uri("vm1"), &["write -P 0x21 0 16M"]);

    // A client writes without flushing and stays connected while the node stops.
    let client = HeldClient::start(
        &node.unix_uri("vm1"),
        "h.pwrite(b'\\x5c' * (4 << 20), 1 << 20)",
    );
    let started = Instant::now();
    let status = node.stop();
    assert!(status.success(), "tandemd exit status {status}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "stopping with an idle client attached took {:?}",
        started.elapsed()
    );
    drop(client);
    assert!(
        !node.socket().exists(),
        "NBD socket left behind after a clean stop"
    );
    let file = node.data_file("vm1");
    assert_file_filled(&file, MIB, 4 * MIB, 0x5c);

    node.restart();
    qemu_io(
        &node.uri("vm1"),
        &[
            "read -P 0x21 0 1M",
            "read -P 0x5c 1M 4M",
            "read -P 0x21 5M 11M",
        ],
    );
    assert_file_filled(&file, 0, MIB, 0x21);
    assert_file_filled(&file, 5 * MIB, 11 * MIB, 0x21);
}

#[test]
fn flushed_writes_survive_sigkill_of_the_node() {
    let mut node = Node::start("crash");
    node.create_volume("vm1", 16 * MIB);
    // One client's flushed writes via qemu-io (it has exited), another's still connected.
    qemu_io(&node.uri("vm1"), &["write -P 0x3c 0 2M", "flush"]);
    let client = HeldClient::start(
        &node.uri("vm1"),
        "h.pwrite(b'\\xc3' * (3 << 20), 2 << 20)\nh.flush()",
    );
    node.kill();
    drop(client);

    node.restart();
    qemu_io(
        &node.uri("vm1"),
        &[
            "read -P 0x3c 0 2M",
            "read -P 0xc3 2M 3M",
            "read -P 0 5M 11M",
        ],
    );
    let file = node.data_file("vm1");
    assert_file_filled(&file, 0, 2 * MIB, 0x3c);
    assert_file_filled(&file, 2 * MIB, 3 * MIB, 0xc3);
    assert!(
        node.log().contains("not closed cleanly"),
        "the restart did not notice the crash:\n{}",
        node.log()
    );
    // And the volume is writable again after the crash.
    qemu_io(
        &node.unix_uri("vm1"),
        &["write -P 0x99 8M 1M", "read -P 0x99 8M 1M"],
    );
    assert_file_filled(&file, 8 * MIB, MIB, 0x99);
}

// ---------------------------------------------------------------------------------------
// 7. The Unix socket
// ---------------------------------------------------------------------------------------

#[test]
fn unix_socket_is_not_accessible_to_other_users() {
    let mut node = Node::start("sockmode");
    node.create_volume("vm1", 4 * MIB);
    for round in ["first start", "restart after SIGKILL (stale socket)"] {
        let meta = std::fs::symlink_metadata(node.socket()).expect("socket exists");
        assert!(meta.file_type().is_socket(), "{round}: not a socket");
        let mode = meta.permissions().mode() & 0o777;
        assert_eq!(
            mode & 0o007,
            0,
            "{round}: socket mode {mode:o} lets others in"
        );
        assert_eq!(
            mode & 0o600,
            0o600,
            "{round}: owner cannot use socket ({mode:o})"
        );
        // And it serves.
        qemu_io(
            &node.unix_uri("vm1"),
            &["write -P 0x42 0 4k", "read -P 0x42 0 4k"],
        );
        node.kill();
        node.restart();
    }
    assert_file_filled(&node.data_file("vm1"), 0, 4 * KIB, 0x42);
}

// ---------------------------------------------------------------------------------------
// More of what real clients do
// ---------------------------------------------------------------------------------------

/// Merges neighbouring map entries that say the same, so maps from different tools (and
/// different request sizes) compare equal.
fn merged(map: Vec<MapEntry>) -> Vec<(u64, u64, bool)> {
    let mut out: Vec<(u64, u64, bool)> = Vec::new();
    for e in map {
        assert_eq!(e.zero, !e.data, "neither data nor zero: {e:?}");
        match out.last_mut() {
            Some(last) if last.2 == e.zero => last.1 += e.len,
            _ => out.push((e.start, e.len, e.zero)),
        }
    }
    out
}

#[test]
fn volumes_beyond_4_gib_address_and_map_correctly() {
    const GIB: u64 = 1 << 30;
    let node = Node::start("big");
    let size = 16 * GIB;
    node.create_volume("big", size);
    let uri = node.uri("big");
    // Extents 64 KiB-aligned, so file system block size does not blur the map.
    qemu_io(
        &uri,
        &[
            "write -P 0x41 4294934528 64k", // [4G - 32k, 4G + 32k): across 2^32
            "write -P 0x42 5G 1M",
            "write -P 0x43 17179803648 64k", // the last 64 KiB
            "read -P 0x41 4294934528 64k",
            "read -P 0x42 5G 1M",
            "read -P 0x43 17179803648 64k",
            "read -P 0 4294901760 32k",
            "read -P 0 4294967296 0",
            "read -P 0 4295000064 1M",
        ],
    );
    let file = node.data_file("big");
    assert_eq!(std::fs::metadata(&file).unwrap().len(), size);
    assert_file_filled(&file, 4 * GIB - 32 * KIB, 64 * KIB, 0x41);
    assert_file_filled(&file, 5 * GIB, MIB, 0x42);
    assert_file_filled(&file, size - 64 * KIB, 64 * KIB, 0x43);
    assert_file_filled(&file, 4 * GIB + 32 * KIB, MIB, 0);

    let expected = vec![
        (0, 4 * GIB - 32 * KIB, true),
        (4 * GIB - 32 * KIB, 64 * KIB, false),
        (4 * GIB + 32 * KIB, GIB - 32 * KIB, true),
        (5 * GIB, MIB, false),
        (5 * GIB + MIB, 11 * GIB - MIB - 64 * KIB, true),
        (size - 64 * KIB, 64 * KIB, false),
    ];
    // QEMU negotiates extended headers (64-bit lengths); libnbd 1.14 does not (32-bit).
    assert_eq!(merged(qemu_img_map(&uri)), expected, "qemu-img map");
    assert_eq!(merged(nbdinfo_map(&uri)), expected, "nbdinfo --map");
    let info = json(&run(Command::new("nbdinfo").arg("--json").arg(&uri)));
    assert_eq!(info["exports"][0]["export-size"], size);
}

#[test]
fn unaligned_requests_from_libnbd_are_byte_exact() {
    let node = Node::start("unaligned");
    let size = 4 * MIB;
    node.create_volume("vm1", size);
    qemu_io(&node.uri("vm1"), &["write -P 0x11 0 4M"]);
    let dir = scratch("unaligned-files");
    let readback = dir.join("readback.bin");

    // libnbd, told not to round anything, sends these exactly as written: offsets and
    // lengths below the 512-byte minimum go to the server's buffered path, aligned ones
    // to its direct path, and the two must agree.
    let script = format!(
        r#"
h.set_strict_mode(0)
h.pwrite(b'A' * 1000, 100)
h.pwrite(b'B' * 5000, 4000)
h.pwrite(b'C' * 777, 65536 + 511)
h.zero(3000, 20000)
h.zero(1234, 30001, nbd.CMD_FLAG_NO_HOLE)
h.pwrite(b'D' * 4096, 1 << 20, nbd.CMD_FLAG_FUA)
h.pwrite(b'E' * 513, (1 << 20) + 4097, nbd.CMD_FLAG_FUA)
h.trim(10000, 200100)
h.pwrite(b'F' * 3, size - 3)
h.flush()
with open({readback:?}, 'wb') as f:
    for off in range(0, size, 1 << 20):
        f.write(h.pread(1 << 20, off))
"#,
        readback = readback.display().to_string()
    );
    run(nbdsh()
        .args(["-u", &node.unix_uri("vm1")])
        .arg("-c")
        .arg(format!("size = {size}\n{script}")));

    let mut model = vec![0x11u8; size as usize];
    let mut fill = |off: u64, len: u64, byte: u8| {
        model[off as usize..(off + len) as usize].fill(byte);
    };
    fill(100, 1000, b'A');
    fill(4000, 5000, b'B');
    fill(65536 + 511, 777, b'C');
    fill(20000, 3000, 0);
    fill(30001, 1234, 0);
    fill(MIB, 4096, b'D');
    fill(MIB + 4097, 513, b'E');
    fill(size - 3, 3, b'F');
    // What a trimmed range reads as is up to the server; bytes around it are not.
    let trimmed = 200100..210100;
    let mask = |bytes: &mut Vec<u8>| bytes[trimmed.clone()].fill(0xAA);
    mask(&mut model);
    for (what, mut bytes) in [
        ("data file", read_range(&node.data_file("vm1"), 0, size)),
        ("read back by libnbd", std::fs::read(&readback).unwrap()),
    ] {
        mask(&mut bytes);
        assert_same_bytes(&bytes, &model, what);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn read_only_volume_is_advertised_and_refuses_writes() {
    let node = Node::start("readonly");
    node.create_volume("vm1", 4 * MIB);
    let uri = node.uri("vm1");
    qemu_io(&uri, &["write -P 0x42 0 4M"]);
    // qemu-io has exited, but the server notices the disconnect on its own time; until
    // it has, the volume counts as open and may not be made read-only.
    node.wait_open("vm1", 0);
    node.patch_volume("vm1", r#"{"read_only":true}"#);

    let info = json(&run(Command::new("nbdinfo").arg("--json").arg(&uri)));
    let e = &info["exports"][0];
    assert_eq!(e["is_read_only"], true, "{e:#}");
    for flag in ["can_trim", "can_zero", "can_fast_zero"] {
        assert_eq!(e[flag], false, "{flag} on a read-only export: {e:#}");
    }

    // QEMU will not open it for writing; read-only it reads fine.
    let out = output(&mut qemu_io_command(
        &["-f", "raw"],
        &["write -P 0x99 0 4k"],
        &[&uri],
    ));
    assert!(
        !out.status.success(),
        "qemu-io opened a read-only export rw"
    );
    qemu_io_with(&["-r"], &uri, &["read -P 0x42 0 4M"]);

    // libnbd, with its own checks off, sends the writes anyway: the server refuses each.
    let said = run(nbdsh().args(["-u", &node.unix_uri("vm1")]).arg("-c").arg(
        r#"
import errno
h.set_strict_mode(0)
for name, op in [("write", lambda: h.pwrite(b"x" * 4096, 0)),
                 ("zero", lambda: h.zero(4096, 4096)),
                 ("trim", lambda: h.trim(4096, 8192))]:
    try:
        op()
        print(name, "accepted")
    except nbd.Error as e:
        print(name, errno.errorcode.get(e.errnum))
"#,
    ));
    assert_eq!(said, "write EPERM\nzero EPERM\ntrim EPERM\n");
    assert_file_filled(&node.data_file("vm1"), 0, 4 * MIB, 0x42);

    // Writable again: writes land.
    node.patch_volume("vm1", r#"{"read_only":false}"#);
    qemu_io(&uri, &["write -P 0x24 0 4k"]);
    assert_file_filled(&node.data_file("vm1"), 0, 4 * KIB, 0x24);
}

#[test]
fn thick_volume_keeps_its_blocks_through_discard_and_zeroing() {
    let node = Node::start("thick");
    let size = 16 * MIB;
    let r = node.api(
        "POST",
        "/v1/node/volumes",
        Some(&format!(r#"{{"name":"vm1","size":{size},"thick":true}}"#)),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let uri = node.uri("vm1");
    qemu_io(
        &uri,
        &[
            "write -P 0x42 0 16M",
            "discard 1M 2M",
            "write -z -u 4M 1M",
            "write -z 6M 1M",
            "read -P 0x42 0 1M",
            "read -P 0 1M 2M",
            "read -P 0x42 3M 1M",
            "read -P 0 4M 1M",
            "read -P 0x42 5M 1M",
            "read -P 0 6M 1M",
            "read -P 0x42 7M 9M",
        ],
    );
    let file = node.data_file("vm1");
    assert_file_filled(&file, MIB, 2 * MIB, 0);
    assert_file_filled(&file, 4 * MIB, MIB, 0);
    assert_file_filled(&file, 7 * MIB, 9 * MIB, 0x42);
    use std::os::unix::fs::MetadataExt;
    let on_disk = std::fs::metadata(&file).unwrap().blocks() * 512;
    assert!(
        on_disk >= size,
        "thick volume lost blocks: {on_disk} bytes allocated"
    );
    let info = node.api("GET", "/v1/node/volumes/vm1", None).json();
    assert_eq!(info["thick"], true);
    assert!(
        info["allocated"].as_u64().unwrap() >= size,
        "API says {info}"
    );
}

#[test]
fn clean_stop_under_load_exits_promptly_and_leaves_the_volume_clean() {
    let mut node = Node::start("busystop");
    node.create_volume("vm1", 64 * MIB);
    let mut fio = Command::new("fio")
        .current_dir(&node.dir)
        .args([
            "--name=load",
            "--ioengine=nbd",
            "--rw=randrw",
            "--bsrange=4k-1m",
            "--iodepth=32",
            "--numjobs=2",
            "--size=32m",
            "--offset_increment=32m",
            "--time_based",
            "--runtime=30",
        ])
        .arg(format!("--uri={}", node.unix_uri("vm1")))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start fio");
    wait_for_connections(&node, 2);
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    let status = node.stop();
    let took = started.elapsed();
    let _ = fio.kill();
    let _ = fio.wait();
    assert!(status.success(), "tandemd exit status {status}");
    assert!(
        took < Duration::from_secs(10),
        "stop under load took {took:?}"
    );
    let log = node.log();
    assert!(
        log.contains("finishing in-flight NBD requests connections=2"),
        "the stop did not happen under load:\n{log}"
    );
    assert!(log.contains("stopped cleanly"), "no clean stop:\n{log}");

    node.restart();
    let log = node.log();
    assert!(
        !log.contains("not closed cleanly"),
        "after a clean stop the volume was found unclean:\n{log}"
    );
    qemu_io(
        &node.uri("vm1"),
        &["write -P 0x5e 0 1M", "read -P 0x5e 0 1M"],
    );
}

#[test]
fn qemu_negotiates_extended_headers_and_libnbd_structured_replies() {
    let version = run(Command::new("qemu-io").arg("--version"));
    let major: u32 = version
        .split_whitespace()
        .nth(2)
        .and_then(|v| v.split('.').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if major < 9 {
        eprintln!("QEMU {major} predates NBD extended headers: skipping");
        return;
    }
    let node = Node::start("modes");
    node.create_volume("vm1", 4 * MIB);
    qemu_io(
        &node.uri("vm1"),
        &["write -P 0x12 0 64k", "read -P 0x12 0 64k"],
    );
    wait_for_connections(&node, 1);
    // Only the server can tell which reply mode was negotiated; it logs it.
    assert!(
        node.log().contains("export=vm1 mode=Extended"),
        "QEMU did not get extended headers:\n{}",
        node.log()
    );
    run(Command::new("nbdinfo").arg(node.uri("vm1")));
    wait_for_connections(&node, 2);
    let log = node.log();
    // libnbd 1.14 knows no extended headers; newer ones negotiate them too.
    assert!(
        log.matches("export=vm1 mode=Structured").count()
            + log.matches("export=vm1 mode=Extended").count()
            == 2,
        "nbdinfo got simple replies:\n{log}"
    );
}
