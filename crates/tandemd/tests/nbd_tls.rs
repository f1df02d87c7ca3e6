//! System tests: NBD over TLS (STARTTLS) between a real `tandemd` and real clients
//! (libnbd's nbdinfo, QEMU's qemu-io and qemu-img), with certificates made by openssl.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use tandem_lab::{
    HeldClient, Node, assert_file_filled, assert_file_holds, assert_same_bytes, fio_jobs, have,
    json, make_ca, make_cert, output, qemu_io_command, qemu_io_result, random_bytes, read_range,
    run, scratch,
};

const MIB: u64 = 1 << 20;

// ---------------------------------------------------------------------------------------
// Certificates
// ---------------------------------------------------------------------------------------

/// A throw-away PKI: a CA, a server certificate for localhost/127.0.0.1, and client
/// credential directories laid out the way libnbd and QEMU want them (`ca-cert.pem`,
/// `client-cert.pem`, `client-key.pem`).
struct Pki {
    dir: PathBuf,
    ca_cert: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    /// Trusts the CA, has no client certificate.
    anonymous: PathBuf,
    /// Trusts the CA, with a client certificate the CA signed.
    client: PathBuf,
    /// Trusts the CA, with a client certificate signed by another CA.
    rogue: PathBuf,
}

/// QEMU insists on keyEncipherment in a client certificate's key usage.
const CLIENT_EXT: &str = "basicConstraints=CA:FALSE\n\
    keyUsage=critical,digitalSignature,keyEncipherment\n\
    extendedKeyUsage=clientAuth\n";

fn client_dir(pki: &Path, name: &str, cert: Option<&str>) -> PathBuf {
    let dir = pki.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(pki.join("ca-cert.pem"), dir.join("ca-cert.pem")).unwrap();
    if let Some(cert) = cert {
        std::fs::copy(
            pki.join(format!("{cert}-cert.pem")),
            dir.join("client-cert.pem"),
        )
        .unwrap();
        std::fs::copy(
            pki.join(format!("{cert}-key.pem")),
            dir.join("client-key.pem"),
        )
        .unwrap();
    }
    dir
}

/// Makes the PKI, or returns None (after saying so) when openssl is missing.
fn pki(label: &str) -> Option<Pki> {
    if !have("openssl") {
        eprintln!("openssl is not installed: skipping this TLS test");
        return None;
    }
    let dir = scratch(label);
    make_ca(&dir, "ca");
    make_ca(&dir, "rogue-ca");
    make_cert(
        &dir,
        "ca",
        "server",
        "localhost",
        "basicConstraints=CA:FALSE\n\
         keyUsage=critical,digitalSignature,keyEncipherment\n\
         extendedKeyUsage=serverAuth\n\
         subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    );
    make_cert(&dir, "ca", "client", "tandem-client", CLIENT_EXT);
    make_cert(&dir, "rogue-ca", "rogue", "tandem-rogue", CLIENT_EXT);
    let rogue = client_dir(&dir, "rogue", Some("rogue"));
    // It trusts both CAs, so QEMU's check of its own certificate passes and only the
    // server can refuse it.
    let bundle = [
        std::fs::read(dir.join("ca-cert.pem")).unwrap(),
        std::fs::read(dir.join("rogue-ca-cert.pem")).unwrap(),
    ]
    .concat();
    std::fs::write(rogue.join("ca-cert.pem"), bundle).unwrap();
    Some(Pki {
        ca_cert: dir.join("ca-cert.pem"),
        server_cert: dir.join("server-cert.pem"),
        server_key: dir.join("server-key.pem"),
        anonymous: client_dir(&dir, "anonymous", None),
        client: client_dir(&dir, "client", Some("client")),
        rogue,
        dir,
    })
}

impl Drop for Pki {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn start_tls_node(name: &str, pki: &Pki, extra: &[&str]) -> Node {
    let cert = pki.server_cert.to_str().unwrap();
    let key = pki.server_key.to_str().unwrap();
    let mut args = vec!["--tls-cert", cert, "--tls-key", key];
    args.extend_from_slice(extra);
    Node::start_with(name, &args)
}

// ---------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------

fn nbds_uri(node: &Node, volume: &str, creds: &Path) -> String {
    format!(
        "nbds://{}/{volume}?tls-certificates={}",
        node.nbd,
        creds.display()
    )
}

/// nbdinfo --json; the parsed report, or the error output when it fails.
fn nbdinfo(uri: &str) -> Result<Value, String> {
    let out = output(Command::new("nbdinfo").arg("--json").arg(uri));
    if out.status.success() {
        Ok(json(&String::from_utf8_lossy(&out.stdout)))
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// `--object` and image options for QEMU tools talking TLS to `node`.
fn qemu_tls(node: &Node, volume: &str, creds: &Path) -> (String, String) {
    (
        format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=client",
            creds.display()
        ),
        format!(
            "driver=nbd,host=127.0.0.1,port={},export={volume},tls-creds=tls0",
            node.nbd.port()
        ),
    )
}

/// qemu-io over TLS; Ok(stdout) when it succeeded and no command failed.
fn qemu_io_tls(node: &Node, volume: &str, creds: &Path, cmds: &[&str]) -> Result<String, String> {
    let (object, image) = qemu_tls(node, volume, creds);
    qemu_io_result(&mut qemu_io_command(
        &["--object", &object],
        cmds,
        &["--image-opts", &image],
    ))
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[test]
fn tls_clients_negotiate_tls_and_move_data_intact() {
    let Some(pki) = pki("tls-pki") else { return };
    let node = start_tls_node("tls", &pki, &[]);
    let size = 32 * MIB;
    node.create_volume("vm1", size);

    let info = nbdinfo(&nbds_uri(&node, "vm1", &pki.anonymous)).expect("nbdinfo over TLS");
    assert_eq!(info["TLS"], true, "{info:#}");
    assert_eq!(info["structured"], true, "{info:#}");
    let e = &info["exports"][0];
    assert_eq!(e["export-size"], size, "{info:#}");
    assert_eq!(e["can_multi_conn"], true, "{info:#}");
    assert!(
        e["contexts"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c == "base:allocation")),
        "{info:#}"
    );
    // TLS is optional here: plain clients are still served, and told so.
    let plain = nbdinfo(&node.uri("vm1")).expect("plain nbdinfo with optional TLS");
    assert_eq!(plain["TLS"], false, "{plain:#}");

    // qemu-io: patterns, a FUA write, zeroes, over TLS.
    qemu_io_tls(
        &node,
        "vm1",
        &pki.anonymous,
        &[
            "write -P 0xa5 0 4M",
            "write -f -P 0x5a 4M 1M",
            "write -z 1M 1M",
            "aio_write -P 0x3c 6M 64k",
            "aio_write -P 0xc3 7M 64k",
            "aio_flush",
            "read -P 0xa5 0 1M",
            "read -P 0 1M 1M",
            "read -P 0xa5 2M 2M",
            "read -P 0x5a 4M 1M",
            "read -P 0x3c 6M 64k",
            "read -P 0xc3 7M 64k",
        ],
    )
    .unwrap_or_else(|e| panic!("qemu-io over TLS: {e}"));
    let file = node.data_file("vm1");
    assert_file_filled(&file, 0, MIB, 0xa5);
    assert_file_filled(&file, MIB, MIB, 0);
    assert_file_filled(&file, 2 * MIB, 2 * MIB, 0xa5);
    assert_file_filled(&file, 4 * MIB, MIB, 0x5a);
    assert_file_filled(&file, 6 * MIB, 64 << 10, 0x3c);
    assert_file_filled(&file, 7 * MIB, 64 << 10, 0xc3);

    // qemu-img: a whole random image in and back out over TLS, many requests in flight
    // (and requests of the 32 MiB maximum) through the TLS session.
    let dir = scratch("tls-files");
    let image = dir.join("in.raw");
    let content = random_bytes(size as usize, 7);
    std::fs::write(&image, &content).unwrap();
    let (object, opts) = qemu_tls(&node, "vm1", &pki.anonymous);
    run(Command::new("qemu-img")
        .args(["convert", "-n", "-W", "-m", "16", "--object", &object])
        .args(["-f", "raw"])
        .arg(&image)
        .args(["--target-image-opts", &opts]));
    assert_file_holds(
        &file,
        0,
        &content,
        "data file after qemu-img convert over TLS",
    );
    let back = dir.join("out.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-m", "16", "--object", &object])
        .args(["--image-opts", &opts])
        .args(["-O", "raw"])
        .arg(&back));
    assert_same_bytes(
        &std::fs::read(&back).unwrap(),
        &content,
        "image read back over TLS",
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn tls_required_refuses_plain_tcp_clients_and_serves_tls_ones() {
    let Some(pki) = pki("tlsreq-pki") else { return };
    let node = start_tls_node("tlsreq", &pki, &["--tls-required"]);
    node.create_volume("vm1", 8 * MIB);
    let file = node.data_file("vm1");

    let err = nbdinfo(&node.uri("vm1")).expect_err("plain nbdinfo must be refused");
    assert!(!err.is_empty(), "refused without a word");
    // A plain qemu-io cannot open the export, so its write never lands.
    let out = output(&mut qemu_io_command(
        &["-f", "raw"],
        &["write -P 0x99 0 1M"],
        &[&node.uri("vm1")],
    ));
    assert!(
        !out.status.success(),
        "plain qemu-io was served: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_file_filled(&file, 0, MIB, 0);

    // The server is still up, and TLS clients are served.
    assert_eq!(node.api("GET", "/v1/node", None).status, 200);
    let info = nbdinfo(&nbds_uri(&node, "vm1", &pki.anonymous)).expect("nbdinfo over TLS");
    assert_eq!(info["TLS"], true, "{info:#}");
    assert_eq!(info["exports"][0]["export-size"], 8 * MIB);
    qemu_io_tls(
        &node,
        "vm1",
        &pki.anonymous,
        &["write -P 0x66 0 1M", "read -P 0x66 0 1M"],
    )
    .unwrap_or_else(|e| panic!("qemu-io over TLS: {e}"));
    assert_file_filled(&file, 0, MIB, 0x66);

    // The Unix socket is guarded by its permissions, not TLS: plain clients work there.
    let local = nbdinfo(&node.unix_uri("vm1")).expect("nbdinfo over the Unix socket");
    assert_eq!(local["TLS"], false);
    assert_eq!(local["exports"][0]["export-size"], 8 * MIB);
}

#[test]
fn mutual_tls_serves_only_clients_with_a_certificate_from_the_ca() {
    let Some(pki) = pki("mtls-pki") else { return };
    let ca = pki.ca_cert.to_str().unwrap().to_owned();
    let node = start_tls_node("mtls", &pki, &["--tls-required", "--tls-ca", &ca]);
    node.create_volume("vm1", 8 * MIB);
    let file = node.data_file("vm1");

    for (who, creds) in [
        ("no client certificate", &pki.anonymous),
        ("a certificate from another CA", &pki.rogue),
    ] {
        // Both fail while connecting: the server ends the TLS handshake. (With TLS 1.3 a
        // client may see the alert or just a closed connection; the server log below
        // says why.)
        let err = nbdinfo(&nbds_uri(&node, "vm1", creds))
            .expect_err(&format!("nbdinfo with {who} must be refused"));
        assert!(err.contains("nbd_connect_uri"), "nbdinfo with {who}: {err}");
        let err = qemu_io_tls(&node, "vm1", creds, &["write -P 0x99 0 1M"])
            .expect_err(&format!("qemu-io with {who} must be refused"));
        assert!(err.contains("can't open"), "qemu-io with {who}: {err}");
    }
    assert_file_filled(&file, 0, MIB, 0);
    let log = node.log();
    assert!(
        log.matches("TLS handshake failed").count() >= 4,
        "the server did not refuse the four handshakes:\n{log}"
    );

    assert_eq!(node.api("GET", "/v1/node", None).status, 200);
    let info = nbdinfo(&nbds_uri(&node, "vm1", &pki.client)).expect("nbdinfo with a client cert");
    assert_eq!(info["TLS"], true, "{info:#}");
    qemu_io_tls(
        &node,
        "vm1",
        &pki.client,
        &[
            "write -P 0x77 0 2M",
            "write -z 512k 512k",
            "read -P 0x77 0 512k",
            "read -P 0 512k 512k",
            "read -P 0x77 1M 1M",
        ],
    )
    .unwrap_or_else(|e| panic!("qemu-io with a client cert: {e}"));
    assert_file_filled(&file, 0, 512 << 10, 0x77);
    assert_file_filled(&file, 512 << 10, 512 << 10, 0);
    assert_file_filled(&file, MIB, MIB, 0x77);
}

#[test]
fn fio_over_tls_with_deep_queues_verifies() {
    let Some(pki) = pki("tlsfio-pki") else { return };
    let node = start_tls_node("tlsfio", &pki, &["--tls-required"]);
    node.create_volume("vm1", 64 * MIB);
    // fio cannot pass tls-certificates (libnbd refuses local files in its URIs), so
    // libnbd finds the CA in its default place under $HOME.
    let home = pki.dir.join("home");
    std::fs::create_dir_all(home.join(".pki/libnbd")).unwrap();
    std::fs::copy(&pki.ca_cert, home.join(".pki/libnbd/ca-cert.pem")).unwrap();
    let jobs = fio_jobs(
        Command::new("fio")
            .current_dir(&pki.dir)
            .env("HOME", &home)
            .args([
                "--name=tls",
                "--ioengine=nbd",
                "--rw=randwrite",
                "--bsrange=4k-4m",
                "--iodepth=32",
                "--numjobs=2",
                "--size=24m",
                "--offset_increment=24m",
                "--verify=crc32c",
                "--verify_state_save=0",
                "--do_verify=1",
            ])
            .arg(format!("--uri=nbds://{}/vm1", node.nbd)),
        &pki.dir.join("fio.json"),
    );
    assert_eq!(jobs.len(), 2);
    for job in &jobs {
        assert_eq!(job["error"], 0, "{job:#}");
        assert_eq!(job["write"]["io_bytes"], 24 * MIB, "{job:#}");
        assert_eq!(job["read"]["io_bytes"], 24 * MIB, "verify phase: {job:#}");
    }
    assert!(
        read_range(&node.data_file("vm1"), 0, 48 * MIB)
            .iter()
            .any(|&b| b != 0),
        "fio's data is not in the data file"
    );
    assert_file_filled(&node.data_file("vm1"), 48 * MIB, 16 * MIB, 0);
}

#[test]
fn clean_stop_with_a_tls_client_attached_is_prompt_and_keeps_its_writes() {
    let Some(pki) = pki("tlsstop-pki") else {
        return;
    };
    let mut node = start_tls_node("tlsstop", &pki, &["--tls-required"]);
    node.create_volume("vm1", 8 * MIB);
    // A TLS client writes (no flush) and stays connected.
    let client = HeldClient::start_unconnected(&format!(
        "h.set_uri_allow_local_file(True)\n\
         h.connect_uri({uri:?})\n\
         h.pwrite(b'\\x7e' * (2 << 20), 1 << 20)",
        uri = nbds_uri(&node, "vm1", &pki.anonymous)
    ));

    let started = Instant::now();
    let status = node.stop();
    let took = started.elapsed();
    drop(client);
    assert!(status.success(), "tandemd exit status {status}");
    assert!(
        took < Duration::from_secs(10),
        "stop with a TLS client attached took {took:?}"
    );
    let file = node.data_file("vm1");
    assert_file_filled(&file, MIB, 2 * MIB, 0x7e);

    node.restart();
    qemu_io_tls(
        &node,
        "vm1",
        &pki.anonymous,
        &["read -P 0 0 1M", "read -P 0x7e 1M 2M", "read -P 0 3M 5M"],
    )
    .unwrap_or_else(|e| panic!("qemu-io over TLS after restart: {e}"));
}
