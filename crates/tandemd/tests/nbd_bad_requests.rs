//! System tests: `tandemd` against NBD clients that send bad requests, break the
//! protocol, or vanish, and a daemon stopped or killed under load.
//!
//! Every test ends by checking that the daemon still serves a well-behaved client and
//! still answers its API: a misbehaving client may lose its own connection, never the
//! daemon or anybody else's data.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tandem_lab::{Node, nbdsh, not_filled, qemu_io, read_range, run, wait_exit, wait_for};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

// ---------------------------------------------------------------------------------------
// Real clients: nbdsh, qemu-io, nbdinfo, fio.

/// Python run inside nbdsh before a test's own lines: connects `h` with the client-side
/// checks off, so bad requests reach the server, and defines
/// - `attempt(name, f)`: runs `f`, prints `name=OK` or `name=<errno name>`;
/// - `check(name, offset, data)`: reads back `data` on the same handle, prints
///   `name.after=intact` or `name.after=WRONG`.
const NBDSH_PRELUDE: &str = r#"
import errno, nbd

def errname(e):
    n = getattr(e, "errnum", None)
    if n is None:
        n = e.errno
    if isinstance(n, str):
        return n
    return errno.errorcode.get(n, str(n))

h.set_strict_mode(0)
h.connect_uri(URI)

def attempt(name, f):
    try:
        f()
        result = "OK"
    except nbd.Error as e:
        result = errname(e)
    print(f"{name}={result}", flush=True)

def check(name, offset, data):
    good = h.pread(len(data), offset) == data
    print(f"{name}.after={'intact' if good else 'WRONG'}", flush=True)
"#;

/// Runs `script` in nbdsh connected to `uri`; returns the `key=value` lines it printed.
fn nbdsh_results(uri: &str, script: &str) -> BTreeMap<String, String> {
    let code = format!("URI = {uri:?}\n{NBDSH_PRELUDE}\n{script}");
    let out = run(nbdsh().args(["-c", &code]));
    out.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

fn expect(results: &BTreeMap<String, String>, key: &str, want: &str) {
    assert_eq!(
        results.get(key).map(String::as_str),
        Some(want),
        "{key}: all results: {results:#?}"
    );
}

/// The daemon is alive, answers its API, and serves a normal client on the volume
/// (writing and reading its last 4 KiB); the earlier, broken connections have released
/// the volume.
fn assert_still_serving(node: &Node, vol: &str) {
    let r = node.api("GET", "/v1/node", None);
    assert_eq!(r.status, 200, "node API after abuse: {}", r.body);
    node.wait_open(vol, 0);
    let size = node.volume(vol)["size"].as_u64().unwrap();
    let out = run(Command::new("nbdinfo").args(["--size", &node.uri(vol)]));
    assert_eq!(out.trim(), size.to_string(), "nbdinfo --size");
    let last = size - 4096;
    qemu_io(
        &node.uri(vol),
        &[
            &format!("write -P 0x3c {last} 4k"),
            "flush",
            &format!("read -P 0x3c {last} 4k"),
        ],
    );
    qemu_io(&node.unix_uri(vol), &[&format!("read -P 0x3c {last} 4k")]);
    node.wait_open(vol, 0);
}

/// Asserts that the data file holds `len` bytes of `byte` at `offset`, naming the first
/// byte that differs instead of printing the whole range.
fn assert_file_bytes(node: &Node, vol: &str, offset: u64, len: u64, byte: u8, what: &str) {
    if let Some(at) = not_filled(&node.data_file(vol), offset, len, byte) {
        panic!(
            "{what}: byte {at} of the data file is {:#04x}, want {byte:#04x} in [{offset}, +{len})",
            read_range(&node.data_file(vol), at, 1)[0]
        );
    }
}

/// Waits (a little) for the daemon to log `text`: a connection's reason for closing may
/// be logged just after the client saw the close.
fn assert_logged(node: &Node, text: &str) {
    wait_for(
        &format!("the daemon logs {text:?}"),
        Duration::from_secs(5),
        &[node],
        || node.log().contains(text),
    );
}

/// Waits for a client process, killing it (and failing) if it outlives `limit`.
fn wait_child(child: &mut Child, what: &str, limit: Duration) -> std::process::ExitStatus {
    wait_exit(child, limit).unwrap_or_else(|| {
        let _ = child.kill();
        let _ = child.wait();
        panic!("{what} still running after {limit:?}");
    })
}

// ---------------------------------------------------------------------------------------
// A hand-written NBD client on a raw TCP socket.

const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

const OPT_LIST: u32 = 3;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;

const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = 0x8000_0001;
const REP_ERR_INVALID: u32 = 0x8000_0003;
const REP_ERR_UNKNOWN: u32 = 0x8000_0006;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_BLOCK_STATUS: u16 = 7;

const CF_PAYLOAD_LEN: u16 = 1 << 5;

const EPERM: u32 = 1;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;

struct Raw {
    s: TcpStream,
}

/// Data of NBD_OPT_GO / NBD_OPT_INFO: name and requested info types.
fn go_data(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

fn option_bytes(opt: u32, len: u32, data: &[u8]) -> Vec<u8> {
    let mut m = b"IHAVEOPT".to_vec();
    m.extend_from_slice(&opt.to_be_bytes());
    m.extend_from_slice(&len.to_be_bytes());
    m.extend_from_slice(data);
    m
}

fn request_bytes(flags: u16, kind: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut m = REQUEST_MAGIC.to_be_bytes().to_vec();
    m.extend_from_slice(&flags.to_be_bytes());
    m.extend_from_slice(&kind.to_be_bytes());
    m.extend_from_slice(&cookie.to_be_bytes());
    m.extend_from_slice(&offset.to_be_bytes());
    m.extend_from_slice(&len.to_be_bytes());
    m
}

impl Raw {
    /// Connects and checks the server's greeting; sends nothing.
    fn greeted(addr: SocketAddr) -> Raw {
        let s = TcpStream::connect(addr).expect("connect to NBD");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut raw = Raw { s };
        let mut greeting = [0u8; 18];
        raw.s.read_exact(&mut greeting).expect("greeting");
        assert_eq!(&greeting[..8], b"NBDMAGIC");
        assert_eq!(&greeting[8..16], b"IHAVEOPT");
        assert_eq!(u16::from_be_bytes([greeting[16], greeting[17]]), 3);
        raw
    }

    /// Greeting and fixed-newstyle client flags: ready for options.
    fn negotiating(addr: SocketAddr) -> Raw {
        let mut raw = Raw::greeted(addr);
        raw.send(&1u32.to_be_bytes());
        raw
    }

    /// A session in transmission on `name`, with simple replies.
    fn session(addr: SocketAddr, name: &str) -> Raw {
        let mut raw = Raw::negotiating(addr);
        raw.go(name).expect("GO");
        raw
    }

    fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).expect("send to server");
    }

    fn option(&mut self, opt: u32, data: &[u8]) {
        self.send(&option_bytes(opt, data.len() as u32, data));
    }

    /// One option reply: option, reply type, data.
    fn reply(&mut self) -> (u32, u32, Vec<u8>) {
        let mut head = [0u8; 20];
        self.s.read_exact(&mut head).expect("option reply");
        let be32 = |at: usize| u32::from_be_bytes(head[at..at + 4].try_into().unwrap());
        assert_eq!(
            u64::from_be_bytes(head[..8].try_into().unwrap()),
            REPLY_MAGIC,
            "option reply magic"
        );
        let mut data = vec![0u8; be32(16) as usize];
        self.s.read_exact(&mut data).expect("option reply data");
        (be32(8), be32(12), data)
    }

    /// Sends `opt` with `data` and reads replies up to the final one; returns its type
    /// and data (the message, for errors) and the REP_INFO payloads before it.
    fn option_final(&mut self, opt: u32, data: &[u8]) -> (u32, Vec<u8>, Vec<Vec<u8>>) {
        self.option(opt, data);
        let mut infos = Vec::new();
        loop {
            let (o, kind, data) = self.reply();
            assert_eq!(o, opt, "reply to the option sent");
            if kind == REP_INFO {
                infos.push(data);
                continue;
            }
            return (kind, data, infos);
        }
    }

    /// NBD_OPT_GO: the export's size and transmission flags, or the error reply.
    fn go(&mut self, name: &str) -> Result<(u64, u16), (u32, String)> {
        let (kind, data, infos) = self.option_final(OPT_GO, &go_data(name, &[]));
        if kind != REP_ACK {
            return Err((kind, String::from_utf8_lossy(&data).into_owned()));
        }
        let export = infos
            .iter()
            .find(|i| i[..2] == [0, 0])
            .expect("INFO_EXPORT before ACK");
        assert_eq!(export.len(), 12, "INFO_EXPORT length");
        Ok((
            u64::from_be_bytes(export[2..10].try_into().unwrap()),
            u16::from_be_bytes(export[10..12].try_into().unwrap()),
        ))
    }

    fn request(&mut self, flags: u16, kind: u16, cookie: u64, offset: u64, len: u32) {
        self.send(&request_bytes(flags, kind, cookie, offset, len));
    }

    /// A simple reply's error, after checking its magic and cookie.
    fn simple_reply(&mut self, cookie: u64) -> u32 {
        let mut head = [0u8; 16];
        self.s.read_exact(&mut head).expect("simple reply");
        assert_eq!(
            u32::from_be_bytes(head[..4].try_into().unwrap()),
            SIMPLE_REPLY_MAGIC,
            "simple reply magic"
        );
        assert_eq!(
            u64::from_be_bytes(head[8..16].try_into().unwrap()),
            cookie,
            "cookie echoed"
        );
        u32::from_be_bytes(head[4..8].try_into().unwrap())
    }

    fn write(&mut self, cookie: u64, offset: u64, data: &[u8]) -> u32 {
        self.request(0, CMD_WRITE, cookie, offset, data.len() as u32);
        self.send(data);
        self.simple_reply(cookie)
    }

    fn flush(&mut self, cookie: u64) -> u32 {
        self.request(0, CMD_FLUSH, cookie, 0, 0);
        self.simple_reply(cookie)
    }

    fn read(&mut self, cookie: u64, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        self.request(0, CMD_READ, cookie, offset, len);
        match self.simple_reply(cookie) {
            0 => {
                let mut data = vec![0u8; len as usize];
                self.s.read_exact(&mut data).expect("read data");
                Ok(data)
            }
            e => Err(e),
        }
    }

    fn disconnect(mut self) {
        self.request(0, CMD_DISC, 0, 0, 0);
        let _ = self.s.shutdown(Shutdown::Write);
        assert!(self.closed_by_server(), "server closes after DISC");
    }

    /// True when the server closes the connection (EOF or reset) within the read
    /// timeout; whatever it sends before is discarded.
    fn closed_by_server(&mut self) -> bool {
        let mut buf = [0u8; 4096];
        loop {
            match self.s.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) => {
                    return matches!(
                        e.kind(),
                        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
                    );
                }
            }
        }
    }
}

fn started_with_volume(name: &str, vol: &str, size: u64) -> Node {
    let node = Node::start(name);
    node.create_volume(vol, size);
    node
}

// ---------------------------------------------------------------------------------------
// 1. Bad requests through libnbd with its own checks off.

#[test]
fn bad_requests_fail_with_the_right_errno_and_the_connection_survives() {
    let node = started_with_volume("badreq", "vol", 64 * MIB);
    let script = r#"
size = h.get_size()
print(f"size={size}")
print(f"structured={h.get_structured_replies_negotiated()}")
print(f"meta={h.can_meta_context('base:allocation')}")
good = b"\xa5" * 4096
h.pwrite(good, 8192)
h.flush()
last = h.pread(4096, size - 4096)

attempt("read_past_end", lambda: h.pread(4096, size))
check("read_past_end", 8192, good)
attempt("read_straddling_end", lambda: h.pread(8192, size - 4096))
check("read_straddling_end", 8192, good)
attempt("read_offset_overflow", lambda: h.pread(4096, 2**64 - 2048))
check("read_offset_overflow", 8192, good)
attempt("write_past_end", lambda: h.pwrite(b"\x01" * 4096, size))
check("write_past_end", 8192, good)
attempt("write_straddling_end", lambda: h.pwrite(b"\x02" * 8192, size - 4096))
check("write_straddling_end", size - 4096, last)
attempt("read_zero_length", lambda: h.pread(0, 4096))
check("read_zero_length", 8192, good)
attempt("write_zero_length", lambda: h.pwrite(b"", 8192))
check("write_zero_length", 8192, good)
attempt("trim_zero_length", lambda: h.trim(0, 8192))
check("trim_zero_length", 8192, good)
attempt("zero_zero_length", lambda: h.zero(0, 8192))
check("zero_zero_length", 8192, good)
attempt("read_unknown_flag", lambda: h.pread(4096, 8192, flags=1 << 7))
check("read_unknown_flag", 8192, good)
attempt("write_unknown_flag", lambda: h.pwrite(b"\x03" * 4096, 8192, flags=1 << 7))
check("write_unknown_flag", 8192, good)
attempt("flush_unknown_flag", lambda: h.flush(flags=1 << 9))
check("flush_unknown_flag", 8192, good)
attempt("trim_past_end", lambda: h.trim(4096, size))
check("trim_past_end", 8192, good)
attempt("zero_past_end", lambda: h.zero(4096, size))
check("zero_past_end", 8192, good)
attempt("cache_past_end", lambda: h.cache(4096, size))
check("cache_past_end", 8192, good)
attempt("read_over_32m", lambda: h.pread((32 << 20) + 4096, 0))
check("read_over_32m", 8192, good)
attempt("block_status_without_context", lambda: h.block_status(65536, 0, lambda *a: 0))
check("block_status_without_context", 8192, good)

h.pwrite(b"\x5a" * 4096, 12288)
h.flush()
check("final_write", 12288, b"\x5a" * 4096)
h.shutdown()
print("done=yes")
"#;
    let r = nbdsh_results(&node.uri("vol"), script);
    expect(&r, "size", &(64 * MIB).to_string());
    expect(&r, "structured", "True");
    expect(&r, "meta", "False");
    for (key, errno) in [
        ("read_past_end", "EINVAL"),
        ("read_straddling_end", "EINVAL"),
        ("read_offset_overflow", "EINVAL"),
        ("write_past_end", "ENOSPC"),
        ("write_straddling_end", "ENOSPC"),
        ("read_zero_length", "OK"),
        ("write_zero_length", "OK"),
        ("trim_zero_length", "OK"),
        ("zero_zero_length", "OK"),
        ("read_unknown_flag", "EINVAL"),
        ("write_unknown_flag", "EINVAL"),
        ("flush_unknown_flag", "EINVAL"),
        ("trim_past_end", "EINVAL"),
        ("zero_past_end", "ENOSPC"),
        ("cache_past_end", "EINVAL"),
        ("read_over_32m", "EOVERFLOW"),
        ("block_status_without_context", "EINVAL"),
    ] {
        expect(&r, key, errno);
        expect(&r, &format!("{key}.after"), "intact");
    }
    expect(&r, "final_write.after", "intact");
    expect(&r, "done", "yes");

    // What the refused requests would have written is not in the file.
    assert_file_bytes(
        &node,
        "vol",
        8192,
        4096,
        0xa5,
        "written, then refused writes",
    );
    assert_file_bytes(&node, "vol", 12288, 4096, 0x5a, "final write");
    assert_file_bytes(&node, "vol", 64 * MIB - 4096, 4096, 0, "straddling write");
    assert_eq!(
        std::fs::metadata(node.data_file("vol")).unwrap().len(),
        64 * MIB,
        "refused writes past the end do not grow the file"
    );
    assert_still_serving(&node, "vol");
}

// ---------------------------------------------------------------------------------------
// 2. Read-only exports.

#[test]
fn read_only_volume_refuses_writes_with_eperm_and_still_reads() {
    let node = started_with_volume("readonly", "ro", 4 * MIB);
    qemu_io(&node.uri("ro"), &["write -P 0x77 0 64k", "flush"]);
    node.wait_open("ro", 0);

    let patched = node.patch_volume("ro", r#"{"read_only":true}"#);
    assert_eq!(patched["read_only"], true);
    assert_eq!(node.volume("ro")["read_only"], true);

    let script = r#"
print(f"read_only={h.is_read_only()}")
print(f"can_trim={h.can_trim()}")
good = b"\x77" * 65536
attempt("write", lambda: h.pwrite(b"\x01" * 4096, 0))
check("write", 0, good)
attempt("write_fua", lambda: h.pwrite(b"\x01" * 4096, 0, flags=nbd.CMD_FLAG_FUA))
check("write_fua", 0, good)
attempt("trim", lambda: h.trim(4096, 0))
check("trim", 0, good)
attempt("zero", lambda: h.zero(4096, 0))
check("zero", 0, good)
attempt("flush", lambda: h.flush())
attempt("read", lambda: h.pread(65536, 0))
check("read", 0, good)
"#;
    let r = nbdsh_results(&node.uri("ro"), script);
    expect(&r, "read_only", "True");
    expect(&r, "can_trim", "False");
    for key in ["write", "write_fua", "trim", "zero"] {
        expect(&r, key, "EPERM");
        expect(&r, &format!("{key}.after"), "intact");
    }
    expect(&r, "flush", "OK");
    expect(&r, "read", "OK");
    expect(&r, "read.after", "intact");
    assert_file_bytes(&node, "ro", 0, 64 * KIB, 0x77, "read-only volume");

    // A raw client sees READ_ONLY in the flags and EPERM in a simple reply, with the
    // write's payload consumed so the next request is understood.
    let mut raw = Raw::session(node.nbd, "ro");
    raw.request(0, CMD_WRITE, 1, 0, 4096);
    raw.send(&[0x11; 4096]);
    assert_eq!(raw.simple_reply(1), EPERM);
    assert_eq!(raw.read(2, 0, 4096).unwrap(), vec![0x77; 4096]);
    raw.disconnect();
    node.wait_open("ro", 0);

    // Writable again, then a writer connects: marking read-only now would break the
    // promise made to that writer, so it is refused and nothing changes.
    node.patch_volume("ro", r#"{"read_only":false}"#);
    let writer = Raw::session(node.nbd, "ro");
    node.wait_open("ro", 1);
    let r = node.api(
        "PATCH",
        "/v1/node/volumes/ro",
        Some(r#"{"read_only":true}"#),
    );
    assert_eq!(r.status, 409, "{}", r.body);
    let err = r.json();
    assert!(err["message"].as_str().unwrap().contains("open"), "{err}");
    assert!(err["correction"].is_string(), "{err}");
    assert_eq!(node.volume("ro")["read_only"], false);
    writer.disconnect();
    node.wait_open("ro", 0);
    // Once the writer left, it may be.
    node.patch_volume("ro", r#"{"read_only":true}"#);
    let r = nbdsh_results(
        &node.unix_uri("ro"),
        "print(f\"read_only={h.is_read_only()}\")",
    );
    expect(&r, "read_only", "True");
    let r = node.api("GET", "/v1/node", None);
    assert_eq!(r.status, 200);
}

// ---------------------------------------------------------------------------------------
// 3. Protocol violations on a raw socket.

#[test]
fn garbage_instead_of_client_flags_closes_the_connection() {
    let node = started_with_volume("garbage", "vol", 4 * MIB);

    let mut raw = Raw::greeted(node.nbd);
    raw.send(b"GARBAGE! this is not NBD at all\r\n");
    assert!(raw.closed_by_server(), "garbage client flags");

    let mut raw = Raw::greeted(node.nbd);
    raw.send(&0x8000_0001u32.to_be_bytes());
    assert!(raw.closed_by_server(), "unknown client flag bits");

    // Good flags, then an option without the IHAVEOPT magic.
    let mut raw = Raw::negotiating(node.nbd);
    let mut bad = b"IHAVEOPX".to_vec();
    bad.extend_from_slice(&OPT_GO.to_be_bytes());
    bad.extend_from_slice(&0u32.to_be_bytes());
    raw.send(&bad);
    assert!(raw.closed_by_server(), "bad option magic");

    // A client that connects and says nothing, then leaves.
    let raw = Raw::greeted(node.nbd);
    drop(raw);

    assert_logged(&node, "unknown client flags");
    assert_logged(&node, "bad option magic");
    assert_still_serving(&node, "vol");
}

#[test]
fn option_with_inconsistent_lengths_gets_err_invalid_and_negotiation_goes_on() {
    let node = started_with_volume("badlen", "vol", 4 * MIB);
    let mut raw = Raw::negotiating(node.nbd);

    // GO whose name length overruns the option data.
    let mut data = 100u32.to_be_bytes().to_vec();
    data.extend_from_slice(b"vol");
    data.extend_from_slice(&0u16.to_be_bytes());
    let (kind, msg, infos) = raw.option_final(OPT_GO, &data);
    assert_eq!(kind, REP_ERR_INVALID, "{}", String::from_utf8_lossy(&msg));
    assert!(infos.is_empty());

    // GO whose info count promises more than follows.
    let mut data = go_data("vol", &[]);
    let n = data.len();
    data[n - 2..].copy_from_slice(&5u16.to_be_bytes());
    data.extend_from_slice(&1u16.to_be_bytes());
    let (kind, _, _) = raw.option_final(OPT_GO, &data);
    assert_eq!(kind, REP_ERR_INVALID);

    // GO with bytes after its last field.
    let mut data = go_data("vol", &[]);
    data.extend_from_slice(b"trailing");
    let (kind, _, _) = raw.option_final(OPT_GO, &data);
    assert_eq!(kind, REP_ERR_INVALID);

    // GO too short to hold even the name length.
    let (kind, _, _) = raw.option_final(OPT_GO, &[0, 0]);
    assert_eq!(kind, REP_ERR_INVALID);

    // Options that carry no data, sent with data.
    let (kind, _, _) = raw.option_final(OPT_LIST, b"x");
    assert_eq!(kind, REP_ERR_INVALID);
    let (kind, _, _) = raw.option_final(OPT_STRUCTURED_REPLY, b"xyz");
    assert_eq!(kind, REP_ERR_INVALID);

    // An export that does not exist.
    assert_eq!(
        raw.go("no-such-volume").map_err(|e| e.0),
        Err(REP_ERR_UNKNOWN)
    );

    // The same connection still negotiates normally.
    let (size, flags) = raw.go("vol").expect("GO after the errors");
    assert_eq!(size, 4 * MIB);
    assert_eq!(flags & 1, 1, "HAS_FLAGS");
    assert_eq!(flags & 2, 0, "writable");
    assert_eq!(raw.write(1, 0, &[0x42; 4096]), 0);
    assert_eq!(raw.read(2, 0, 4096).unwrap(), vec![0x42; 4096]);
    raw.disconnect();
    assert_still_serving(&node, "vol");
}

#[test]
fn unknown_options_get_err_unsup_and_negotiation_goes_on() {
    let node = started_with_volume("unsup", "vol", 4 * MIB);
    let mut raw = Raw::negotiating(node.nbd);
    for (opt, data) in [
        (99u32, b"some data".to_vec()),
        (4, Vec::new()),
        (0x7fff_ffff, vec![0xff; 1000]),
        // Exactly the 64 KiB the server accepts for an option.
        (1234, vec![0x5a; 64 << 10]),
    ] {
        let (o, kind, msg) = {
            raw.option(opt, &data);
            raw.reply()
        };
        assert_eq!(o, opt);
        assert_eq!(
            kind,
            REP_ERR_UNSUP,
            "option {opt}: {}",
            String::from_utf8_lossy(&msg)
        );
    }
    let (size, _) = raw.go("vol").expect("GO after unknown options");
    assert_eq!(size, 4 * MIB);
    assert_eq!(raw.read(1, 0, 4096).unwrap(), vec![0; 4096]);
    raw.disconnect();
    assert_still_serving(&node, "vol");
}

#[test]
fn huge_option_length_closes_the_connection() {
    let node = started_with_volume("hugeopt", "vol", 4 * MIB);

    let mut raw = Raw::negotiating(node.nbd);
    raw.send(&option_bytes(OPT_GO, (64 << 10) + 1, &[]));
    assert!(raw.closed_by_server(), "64 KiB + 1 of option data");

    let mut raw = Raw::negotiating(node.nbd);
    raw.send(&option_bytes(99, u32::MAX, &[0; 1024]));
    assert!(raw.closed_by_server(), "4 GiB of option data");

    assert_logged(&node, "announces");
    assert_still_serving(&node, "vol");
}

#[test]
fn truncated_request_header_then_close_releases_the_volume() {
    let node = started_with_volume("trunc", "vol", 4 * MIB);

    let mut raw = Raw::session(node.nbd, "vol");
    node.wait_open("vol", 1);
    let header = request_bytes(0, CMD_READ, 7, 0, 4096);
    raw.send(&header[..10]);
    raw.s.shutdown(Shutdown::Write).unwrap();
    assert!(raw.closed_by_server(), "EOF inside a request header");
    drop(raw);

    // Half a header, and the client disappears without a FIN first.
    let mut raw = Raw::session(node.nbd, "vol");
    raw.send(&header[..27]);
    drop(raw);

    assert_still_serving(&node, "vol");
    assert_logged(&node, "connection closed inside a request header");
}

#[test]
fn request_with_bad_magic_closes_the_connection() {
    let node = started_with_volume("badmagic", "vol", 4 * MIB);
    let mut raw = Raw::session(node.nbd, "vol");
    assert_eq!(raw.write(1, 0, &[0x21; 4096]), 0);
    let mut bad = request_bytes(0, CMD_READ, 2, 0, 4096);
    bad[..4].copy_from_slice(&0xdead_beefu32.to_be_bytes());
    raw.send(&bad);
    assert!(raw.closed_by_server(), "bad request magic");

    // The historic magic that some servers log: also refused.
    let mut raw = Raw::session(node.nbd, "vol");
    let mut bad = request_bytes(0, CMD_READ, 3, 0, 4096);
    bad[..4].copy_from_slice(&0x1256_0953u32.to_be_bytes());
    raw.send(&bad);
    assert!(raw.closed_by_server(), "historic request magic");

    assert_logged(&node, "bad request magic");
    assert_still_serving(&node, "vol");
    assert_file_bytes(&node, "vol", 0, 4096, 0x21, "write before the bad magic");
}

#[test]
fn write_announcing_64_mib_closes_the_connection() {
    let node = started_with_volume("bigwrite", "vol", 128 * MIB);
    let mut raw = Raw::session(node.nbd, "vol");
    raw.request(0, CMD_WRITE, 1, 0, 64 << 20);
    // Some of the payload; the server may already have closed, so errors are fine.
    let _ = raw.s.write_all(&[0x99; 64 << 10]);
    let started = Instant::now();
    assert!(raw.closed_by_server(), "WRITE of 64 MiB");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the server closes at once, without waiting for the payload"
    );
    assert_logged(&node, "exceeds 32 MiB");
    assert_still_serving(&node, "vol");
    assert_file_bytes(&node, "vol", 0, 64 * KIB, 0, "oversized write");
}

#[test]
fn refused_requests_on_a_raw_session_keep_the_stream_in_step() {
    let node = started_with_volume("rawrefuse", "vol", 64 * MIB);
    let mut raw = Raw::session(node.nbd, "vol");
    assert_eq!(raw.write(1, 0, &[0x61; 4096]), 0);

    // WRITE past the end: its payload is consumed, then ENOSPC.
    raw.request(0, CMD_WRITE, 2, 64 * MIB, 4096);
    raw.send(&[0x62; 4096]);
    assert_eq!(raw.simple_reply(2), ENOSPC);
    // WRITE with an unknown flag: payload consumed, EINVAL, nothing written.
    raw.request(1 << 9, CMD_WRITE, 3, 0, 4096);
    raw.send(&[0x63; 4096]);
    assert_eq!(raw.simple_reply(3), EINVAL);
    // An unknown command.
    raw.request(0, 42, 4, 0, 4096);
    assert_eq!(raw.simple_reply(4), EINVAL);
    // FLUSH with an offset and length, which must be zero.
    raw.request(0, CMD_FLUSH, 5, 4096, 4096);
    assert_eq!(raw.simple_reply(5), EINVAL);
    // A simple-reply READ over the 32 MiB maximum, inside the export.
    raw.request(0, CMD_READ, 6, 0, 33 << 20);
    assert_eq!(raw.simple_reply(6), EINVAL);
    // BLOCK_STATUS, which needs a meta context (and so structured replies).
    raw.request(0, CMD_BLOCK_STATUS, 7, 0, 4096);
    assert_eq!(raw.simple_reply(7), EINVAL);
    // Zero-length requests: answered, nothing to read or write.
    raw.request(0, CMD_READ, 8, 4096, 0);
    assert_eq!(raw.simple_reply(8), 0);
    raw.request(0, CMD_WRITE, 9, 4096, 0);
    assert_eq!(raw.simple_reply(9), 0);
    raw.request(0, CMD_TRIM, 10, 0, 0);
    assert_eq!(raw.simple_reply(10), 0);

    assert_eq!(raw.read(11, 0, 4096).unwrap(), vec![0x61; 4096]);
    raw.disconnect();
    assert_still_serving(&node, "vol");
    assert_file_bytes(&node, "vol", 0, 4096, 0x61, "after refused requests");
}

/// NBD_CMD_FLAG_PAYLOAD_LEN belongs to extended headers; on a compact request it is not
/// a valid flag, and the notes (§5.2) say such a request gets EINVAL.
#[test]
fn payload_len_flag_without_extended_headers_is_refused() {
    let node = started_with_volume("payloadlen", "vol", 4 * MIB);
    let mut raw = Raw::session(node.nbd, "vol");
    raw.request(CF_PAYLOAD_LEN, CMD_WRITE, 1, 0, 4096);
    raw.send(&[0x71; 4096]);
    let error = raw.simple_reply(1);
    // Whatever the answer, the stream stays in step.
    assert_eq!(
        raw.read(2, 0, 4096).map(|d| d[0]),
        Ok(if error == 0 { 0x71 } else { 0 })
    );
    raw.disconnect();
    assert_eq!(
        error, EINVAL,
        "compact WRITE with PAYLOAD_LEN was accepted (error {error})"
    );
    assert_still_serving(&node, "vol");
}

// ---------------------------------------------------------------------------------------
// 4. A client vanishing in the middle of a request.

#[test]
fn client_vanishing_mid_write_loses_nothing_acknowledged() {
    let node = started_with_volume("vanish", "vol", 4 * MIB);

    // Acknowledged and flushed: over a raw session and through qemu-io.
    let mut acked = Raw::session(node.nbd, "vol");
    assert_eq!(acked.write(1, 0, &[0xc3; 64 << 10]), 0);
    assert_eq!(acked.flush(2), 0);
    qemu_io(&node.uri("vol"), &["write -P 0xd4 3M 64k", "flush"]);

    // A bystander connected through it all.
    let mut bystander = Raw::session(node.nbd, "vol");

    // 1 MiB announced at 1 MiB, half of it sent, then gone.
    let mut vanishing = Raw::session(node.nbd, "vol");
    vanishing.request(0, CMD_WRITE, 9, MIB, MIB as u32);
    vanishing.send(&vec![0xee; (MIB / 2) as usize]);
    drop(vanishing);

    // Same again, but the client shuts down only its sending side and waits.
    let mut half_closed = Raw::session(node.nbd, "vol");
    half_closed.request(0, CMD_WRITE, 10, 2 * MIB, MIB as u32);
    half_closed.send(&vec![0xef; (MIB / 2) as usize]);
    half_closed.s.shutdown(Shutdown::Write).unwrap();
    assert!(
        half_closed.closed_by_server(),
        "server ends a session whose client stopped mid-payload"
    );

    // The other clients do not notice.
    assert_eq!(
        bystander.read(1, 0, 64 << 10).unwrap(),
        vec![0xc3; 64 << 10]
    );
    assert_eq!(bystander.write(2, 3 * MIB + (64 << 10), &[0xb5; 4096]), 0);
    assert_eq!(bystander.flush(3), 0);
    assert_eq!(
        acked.read(3, 3 * MIB, 64 << 10).unwrap(),
        vec![0xd4; 64 << 10]
    );
    acked.disconnect();
    bystander.disconnect();

    assert_still_serving(&node, "vol");
    assert_file_bytes(&node, "vol", 0, 64 * KIB, 0xc3, "acknowledged raw write");
    assert_file_bytes(
        &node,
        "vol",
        3 * MIB,
        64 * KIB,
        0xd4,
        "acknowledged qemu-io write",
    );
    assert_file_bytes(
        &node,
        "vol",
        3 * MIB + 64 * KIB,
        4096,
        0xb5,
        "bystander's write",
    );
    assert_file_bytes(
        &node,
        "vol",
        MIB,
        2 * MIB,
        0,
        "torn WRITEs leave no partial data",
    );
    assert_logged(&node, "connection closed inside a write payload");
}

// ---------------------------------------------------------------------------------------
// 5. Stopping and killing the daemon under load.

const VOL_SIZE: u64 = 64 * MIB;

/// fio writing randomly to [8 MiB, 64 MiB) of the volume over the Unix socket.
fn start_fio(node: &Node, vol: &str) -> Child {
    Command::new("fio")
        .args([
            "--name=inflight",
            "--ioengine=nbd",
            &format!("--uri={}", node.unix_uri(vol)),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--time_based",
            "--runtime=5",
            "--offset=8m",
            "--size=56m",
            "--verify=0",
        ])
        .current_dir(&node.dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start fio")
}

/// Starts fio, waits until it has the volume open and writes for a while, then writes
/// and flushes a pattern in [0, 1 MiB) with qemu-io alongside it.
fn busy_node(name: &str) -> (Node, Child) {
    assert!(tandem_lab::have("fio"), "fio is not installed");
    let node = started_with_volume(name, "busy", VOL_SIZE);
    qemu_io(&node.uri("busy"), &["write -P 0x5a 0 512k", "flush"]);
    let fio = start_fio(&node, "busy");
    node.wait_open("busy", 1);
    std::thread::sleep(Duration::from_millis(700));
    qemu_io(
        &node.unix_uri("busy"),
        &["write -P 0x5b 512k 512k", "flush"],
    );
    std::thread::sleep(Duration::from_millis(300));
    let info = node.volume("busy");
    assert!(
        info["allocated"].as_u64().unwrap() > 2 * MIB,
        "fio is writing: {info}"
    );
    (node, fio)
}

fn assert_flushed_data_intact(node: &Node) {
    assert_file_bytes(
        node,
        "busy",
        0,
        512 * KIB,
        0x5a,
        "flushed before fio started",
    );
    assert_file_bytes(
        node,
        "busy",
        512 * KIB,
        512 * KIB,
        0x5b,
        "flushed while fio ran",
    );
    qemu_io(
        &node.uri("busy"),
        &["read -P 0x5a 0 512k", "read -P 0x5b 512k 512k"],
    );
}

#[test]
fn sigterm_with_io_in_flight_exits_cleanly_and_leaves_clean_metadata() {
    let (mut node, mut fio) = busy_node("sigterm");
    // Clients that will not finish what they started: one silent in negotiation, one
    // half-way through a WRITE's payload. Shutdown must not wait for them.
    let _silent = Raw::greeted(node.nbd);
    let mut stuck = Raw::session(node.nbd, "busy");
    stuck.request(0, CMD_WRITE, 1, 2 * MIB, MIB as u32);
    stuck.send(&vec![0xf0; (MIB / 2) as usize]);
    let stopping = Instant::now();
    let status = node.stop();
    assert!(
        status.success(),
        "tandemd exit status {status}:\n{}",
        node.log()
    );
    assert!(
        stopping.elapsed() < Duration::from_secs(10),
        "shutdown took {:?}",
        stopping.elapsed()
    );
    assert!(stuck.closed_by_server(), "the stuck client is disconnected");
    wait_child(
        &mut fio,
        "fio after tandemd stopped",
        Duration::from_secs(10),
    );
    let log = node.log();
    assert!(log.contains("SIGTERM received"), "{log}");
    assert!(log.contains("tandemd stopped cleanly"), "{log}");
    assert!(!node.socket().exists(), "the NBD socket is removed at exit");

    let before = node.log().len();
    node.restart();
    let restart_log = node.log()[before..].to_owned();
    assert!(
        !restart_log.contains("was not closed cleanly"),
        "after a clean stop:\n{restart_log}"
    );
    let info = node.volume("busy");
    assert_eq!(info["disk"], "UpToDate", "{info}");
    assert_eq!(info["open"], 0, "{info}");
    assert_eq!(info["size"], VOL_SIZE, "{info}");
    assert_flushed_data_intact(&node);
    assert_file_bytes(
        &node,
        "busy",
        2 * MIB,
        MIB,
        0,
        "the stuck client's half WRITE",
    );
    assert_still_serving(&node, "busy");
}

#[test]
fn kill_with_io_in_flight_is_noticed_at_restart_and_flushed_data_survives() {
    let (mut node, mut fio) = busy_node("sigkill");
    node.kill();
    wait_child(
        &mut fio,
        "fio after tandemd was killed",
        Duration::from_secs(10),
    );

    let before = node.log().len();
    node.restart();
    let restart_log = node.log()[before..].to_owned();
    assert!(
        restart_log.contains("was not closed cleanly"),
        "after a kill:\n{restart_log}"
    );
    let info = node.volume("busy");
    assert_eq!(info["disk"], "UpToDate", "{info}");
    assert_eq!(info["size"], VOL_SIZE, "{info}");
    assert_flushed_data_intact(&node);
    assert_still_serving(&node, "busy");

    // Closed by its last writer, the volume is clean again at the next start.
    node.stop();
    let before = node.log().len();
    node.restart();
    assert!(
        !node.log()[before..].contains("was not closed cleanly"),
        "{}",
        node.log()
    );
}
