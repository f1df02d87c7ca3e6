//! The peer protocol: fixed 40-byte headers, then the payload the header announces.
//! Bulk data travels as payload and is never copied into a header buffer.
//!
//! ```text
//! 0  magic u32 "TNDP"   4  kind u16   6  flags u16   8  id u64
//! 16 offset u64         24 length u64               32 payload u32   36 status u32
//! ```
//! All integers are big-endian. A connection starts with `Hello` both ways; the
//! version spoken is the highest both support.

use std::io::{self, IoSlice, Read, Write};

use tandem_api::{ClusterId, DiskState, NodeId, Role, VolumeId};
pub use tandem_pool::Buffer;
use tandem_pool::HISTORY;

pub const MAGIC: u32 = 0x544e_4450;
pub const HEADER_LEN: usize = 40;
/// Protocol versions this build speaks.
/// Version 2: the Hello carries the sender's earlier data generations.
/// Version 3: and as many as a replica remembers (`HISTORY`), not 3.
pub const VERSION_MIN: u16 = 3;
pub const VERSION_MAX: u16 = 3;
/// Largest payload accepted: one NBD request's worth.
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// At most this many ranges travel in a handshake (64 KiB).
pub const MAX_RANGES: usize = 4096;

/// Message kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Kind {
    Hello = 1,
    /// Sent on an idle link; any message proves the sender alive, so it has no answer
    /// (a receiver that never writes cannot deadlock against a busy writer).
    Ping = 2,
    /// Replicate a write: payload is the data.
    Write = 10,
    /// Replicate a zeroing (`flags` say whether holes may be punched).
    Zero = 11,
    /// Replicate a trim.
    Trim = 12,
    Flush = 13,
    /// Completion of Write/Zero/Trim/Flush; `status` is 0 or an errno.
    Ack = 14,
    /// Read from the peer's replica.
    Read = 20,
    /// Data for a Read; payload is the data when `status` is 0.
    ReadReply = 21,
    /// The sender's role or disk state changed: payload is a `State`.
    State = 30,
    /// Resync is complete; `offset` carries the source's data generation, which the
    /// target adopts.
    ResyncDone = 31,
    /// Right after Hello: the ranges the sender knows to differ from the receiver's
    /// replica, as big-endian (offset, length) pairs.
    OutOfSync = 32,
    /// The sender wants to become Primary; answered by an Ack (0, or EBUSY to refuse).
    Promote = 33,
    /// Begin a snapshot named by the payload; sent by the Primary once every earlier
    /// write is acknowledged and before any later one. Answered by an Ack: 0 once begun
    /// (the replica completes it in the background), or why not (ESTALE: not UpToDate,
    /// EEXIST, EOPNOTSUPP: no reflink, ENOSPC, EBUSY: another one is being taken).
    Snapshot = 34,
    /// Answered by an Ack once the snapshot begun under the payload's name is complete
    /// and durable (0), or given up (an errno; ENOENT: none was begun).
    SnapshotFill = 35,
    /// The size of the snapshot the payload names, for a node that lacks it: answered
    /// by a ReadReply whose payload is the size (u64), or ENOENT.
    SnapshotStat = 36,
    /// Asks for checksums of a range, one CRC32C per 4 KiB block.
    Verify = 40,
    /// The checksums for a Verify, as payload (big-endian u32s).
    VerifyReply = 41,
}

impl Kind {
    const ALL: [Kind; 18] = [
        Kind::Hello,
        Kind::Ping,
        Kind::Write,
        Kind::Zero,
        Kind::Trim,
        Kind::Flush,
        Kind::Ack,
        Kind::Read,
        Kind::ReadReply,
        Kind::State,
        Kind::ResyncDone,
        Kind::OutOfSync,
        Kind::Promote,
        Kind::Snapshot,
        Kind::SnapshotFill,
        Kind::SnapshotStat,
        Kind::Verify,
        Kind::VerifyReply,
    ];

    fn from_u16(v: u16) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| *k as u16 == v)
    }
}

pub const FLAG_FUA: u16 = 1 << 0;
pub const FLAG_MAY_PUNCH: u16 = 1 << 1;
/// A Write carrying resync data rather than an application write.
pub const FLAG_RESYNC: u16 = 1 << 2;
/// On ResyncDone: the source follows a Primary the target does not reach (it takes
/// a resync from a Secondary only then), so the Primary's later writes pass it by.
pub const FLAG_PRIMARY_ELSEWHERE: u16 = 1 << 3;
/// On Read: from the snapshot the payload names, not from the volume.
pub const FLAG_SNAPSHOT: u16 = 1 << 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    pub flags: u16,
    pub id: u64,
    pub offset: u64,
    pub length: u64,
    pub payload: u32,
    pub status: u32,
}

impl Header {
    pub fn new(kind: Kind, id: u64) -> Header {
        Header {
            kind,
            flags: 0,
            id,
            offset: 0,
            length: 0,
            payload: 0,
            status: 0,
        }
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&(self.kind as u16).to_be_bytes());
        b[6..8].copy_from_slice(&self.flags.to_be_bytes());
        b[8..16].copy_from_slice(&self.id.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..32].copy_from_slice(&self.length.to_be_bytes());
        b[32..36].copy_from_slice(&self.payload.to_be_bytes());
        b[36..40].copy_from_slice(&self.status.to_be_bytes());
        b
    }

    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Header, WireError> {
        let u16_at = |i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
        let u32_at = |i: usize| u32::from_be_bytes(b[i..i + 4].try_into().unwrap());
        let u64_at = |i: usize| u64::from_be_bytes(b[i..i + 8].try_into().unwrap());
        if u32_at(0) != MAGIC {
            return Err(WireError::Malformed(format!(
                "bad magic {:#010x}",
                u32_at(0)
            )));
        }
        let kind = Kind::from_u16(u16_at(4))
            .ok_or_else(|| WireError::Malformed(format!("unknown message kind {}", u16_at(4))))?;
        let payload = u32_at(32);
        if payload > MAX_PAYLOAD {
            return Err(WireError::Malformed(format!(
                "payload of {payload} bytes is over the limit"
            )));
        }
        Ok(Header {
            kind,
            flags: u16_at(6),
            id: u64_at(8),
            offset: u64_at(16),
            length: u64_at(24),
            payload,
            status: u32_at(36),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("refused: {0}")]
    Refused(String),
}

/// Sends a header and its payload with one vectored write.
pub fn send(w: &mut impl Write, header: &Header, payload: &[u8]) -> io::Result<()> {
    debug_assert_eq!(header.payload as usize, payload.len());
    let head = header.encode();
    tandem_io::write_all_vectored(w, &mut [IoSlice::new(&head), IoSlice::new(payload)])
}

/// Checks a message received on an established connection against what its kind
/// allows; the state it carries, decoded, when it is a `State`.
pub fn check(h: &Header, payload: &[u8]) -> Result<Option<State>, WireError> {
    let malformed = |why: String| Err(WireError::Malformed(why));
    match h.kind {
        Kind::Hello => malformed("Hello on an established connection".into()),
        Kind::OutOfSync => malformed("range list outside the handshake".into()),
        Kind::State => State::decode(payload).map(Some),
        Kind::Read
            if h.flags & FLAG_SNAPSHOT != 0 && (payload.is_empty() || payload.len() > 64) =>
        {
            malformed(format!("snapshot name of {} bytes", payload.len()))
        }
        Kind::Read | Kind::Verify if h.length > MAX_PAYLOAD as u64 => {
            malformed(format!("read of {} bytes is over the limit", h.length))
        }
        Kind::Write if h.length != payload.len() as u64 => {
            malformed("write length differs from its payload".into())
        }
        Kind::Snapshot | Kind::SnapshotFill | Kind::SnapshotStat
            if payload.is_empty() || payload.len() > 64 =>
        {
            malformed(format!("snapshot name of {} bytes", payload.len()))
        }
        _ => Ok(None),
    }
}

/// The ranges of the `OutOfSync` message each side sends right after `Hello`.
pub fn decode_ranges(h: &Header, payload: &[u8]) -> Result<Vec<(u64, u64)>, WireError> {
    if h.kind != Kind::OutOfSync || payload.len() > MAX_RANGES * 16 || payload.len() % 16 != 0 {
        return Err(WireError::Malformed(format!(
            "expected a range list, got {:?} with {} bytes",
            h.kind,
            payload.len()
        )));
    }
    Ok(payload
        .chunks_exact(16)
        .map(|c| {
            let at = |i: usize| u64::from_be_bytes(c[i..i + 8].try_into().expect("8 bytes"));
            (at(0), at(8))
        })
        .collect())
}

/// What [`parse`] found.
#[derive(Debug)]
pub enum Parsed {
    Hello(Hello),
    Ranges(Vec<(u64, u64)>),
    /// A message of an established connection, with its state if it carries one.
    Message(Option<State>),
}

/// One message from bytes, as a receiver takes it: the header, then exactly the payload
/// it announces, checked and decoded by kind. The engine reads the same pieces from its
/// stream with [`read_header`] and [`read_payload`]; this is the whole of it as one
/// pure function, for fuzzing.
pub fn parse(data: &[u8]) -> Result<(Header, Parsed), WireError> {
    let head: &[u8; HEADER_LEN] = data
        .get(..HEADER_LEN)
        .and_then(|h| h.try_into().ok())
        .ok_or_else(|| WireError::Malformed(format!("{} bytes, no header", data.len())))?;
    let h = Header::decode(head)?;
    let payload = &data[HEADER_LEN..];
    if payload.len() != h.payload as usize {
        return Err(WireError::Malformed(format!(
            "header announces {} payload bytes, {} follow",
            h.payload,
            payload.len()
        )));
    }
    let parsed = match h.kind {
        Kind::Hello => Parsed::Hello(Hello::decode(payload)?),
        Kind::OutOfSync => Parsed::Ranges(decode_ranges(&h, payload)?),
        _ => Parsed::Message(check(&h, payload)?),
    };
    Ok((h, parsed))
}

pub fn read_header(r: &mut impl Read) -> Result<Header, WireError> {
    let mut b = [0u8; HEADER_LEN];
    r.read_exact(&mut b)?;
    Header::decode(&b)
}

/// What each side says about itself when a connection opens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub version_min: u16,
    pub version_max: u16,
    pub cluster: ClusterId,
    pub volume: VolumeId,
    pub from: NodeId,
    pub to: NodeId,
    pub state: State,
    /// The sender's data generation when it started tracking changes for the receiver
    /// (0: it tracks none).
    pub bitmap_generation: u64,
    /// The sender's earlier data generations, newest first (0: none), so that a
    /// replica the other moved on from is recognised as its ancestor.
    pub history: History,
    /// The newest of the sender's generations known to hold every acknowledged write
    /// of its line: its current one, unless it started one that no majority
    /// confirmed (see `Control::confirmed`).
    pub confirmed: u64,
}

/// A replica's earlier data generations as its Hello gives them, newest first: its
/// bitmap generation, then its history.
pub type History = [u64; HISTORY + 1];

/// A history of `newest` generations, newest first, and none before them.
#[cfg(test)]
pub(crate) fn history(newest: &[u64]) -> History {
    std::array::from_fn(|i| newest.get(i).copied().unwrap_or_default())
}

/// A participant's role, disk state and data generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct State {
    pub role: Role,
    pub disk: DiskState,
    pub generation: u64,
}

pub(crate) const HELLO_LEN: usize = HISTORY_AT + 8 * (HISTORY + 1) + 8;
/// The longest Hello read: any release's fits.
pub(crate) const MAX_HELLO_LEN: usize = 4096;
const HISTORY_AT: usize = 2 + 2 + 16 + 16 + 1 + 1 + STATE_LEN + 8;
const STATE_LEN: usize = 1 + 1 + 8;

impl State {
    pub fn encode(&self) -> [u8; STATE_LEN] {
        let mut b = [0u8; STATE_LEN];
        b[0] = (self.role == Role::Primary) as u8;
        b[1] = DiskState::ALL.iter().position(|d| *d == self.disk).unwrap() as u8;
        b[2..10].copy_from_slice(&self.generation.to_be_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<State, WireError> {
        if b.len() != STATE_LEN {
            return Err(WireError::Malformed(format!("state of {} bytes", b.len())));
        }
        let role = match b[0] {
            0 => Role::Secondary,
            1 => Role::Primary,
            r => return Err(WireError::Malformed(format!("unknown role {r}"))),
        };
        let disk = *DiskState::ALL
            .get(b[1] as usize)
            .ok_or_else(|| WireError::Malformed("unknown disk state".into()))?;
        Ok(State {
            role,
            disk,
            generation: u64::from_be_bytes(b[2..10].try_into().unwrap()),
        })
    }
}

impl Hello {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(HELLO_LEN);
        b.extend_from_slice(&self.version_min.to_be_bytes());
        b.extend_from_slice(&self.version_max.to_be_bytes());
        b.extend_from_slice(&self.cluster.0);
        b.extend_from_slice(&self.volume.0);
        b.push(self.from.get());
        b.push(self.to.get());
        b.extend_from_slice(&self.state.encode());
        b.extend_from_slice(&self.bitmap_generation.to_be_bytes());
        for g in self.history {
            b.extend_from_slice(&g.to_be_bytes());
        }
        b.extend_from_slice(&self.confirmed.to_be_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Hello, WireError> {
        if b.len() != HELLO_LEN {
            // Versions never move, so an older or newer node is named as such.
            let versions = match b {
                [a, b, c, d, ..] => format!(
                    " (the peer speaks protocol versions {}..={}, this node {VERSION_MIN}..={VERSION_MAX})",
                    u16::from_be_bytes([*a, *b]),
                    u16::from_be_bytes([*c, *d])
                ),
                _ => String::new(),
            };
            return Err(WireError::Malformed(format!(
                "hello of {} bytes{versions}",
                b.len()
            )));
        }
        let node =
            |v: u8| NodeId::new(v).ok_or_else(|| WireError::Malformed(format!("node id {v}")));
        let word = |at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap());
        Ok(Hello {
            version_min: u16::from_be_bytes([b[0], b[1]]),
            version_max: u16::from_be_bytes([b[2], b[3]]),
            cluster: ClusterId(b[4..20].try_into().unwrap()),
            volume: VolumeId(b[20..36].try_into().unwrap()),
            from: node(b[36])?,
            to: node(b[37])?,
            state: State::decode(&b[38..38 + STATE_LEN])?,
            bitmap_generation: word(38 + STATE_LEN),
            history: std::array::from_fn(|i| word(HISTORY_AT + 8 * i)),
            confirmed: word(HISTORY_AT + 8 * (HISTORY + 1)),
        })
    }

    /// The version both sides speak, if any.
    pub fn agree(&self, other: &Hello) -> Option<u16> {
        let v = self.version_max.min(other.version_max);
        (v >= self.version_min.max(other.version_min)).then_some(v)
    }
}

/// Reads a payload of `len` bytes into a fresh aligned buffer.
pub fn read_payload(r: &mut impl Read, len: u32) -> io::Result<Buffer> {
    let mut buf = Buffer::zeroed(len as usize);
    r.read_exact(&mut buf)?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_decodes() {
        for kind in Kind::ALL {
            let h = Header::new(kind, 1);
            assert_eq!(Header::decode(&h.encode()).unwrap().kind, kind);
        }
    }

    #[test]
    fn headers_round_trip_and_garbage_is_refused() {
        let h = Header {
            kind: Kind::Write,
            flags: FLAG_FUA,
            id: 7,
            offset: 4096,
            length: 512,
            payload: 512,
            status: 0,
        };
        assert_eq!(Header::decode(&h.encode()).unwrap(), h);
        let mut bad = h.encode();
        bad[0] = 0;
        assert!(matches!(Header::decode(&bad), Err(WireError::Malformed(_))));
        let mut unknown = h.encode();
        unknown[5] = 99;
        assert!(Header::decode(&unknown).is_err());
        let mut big = h.encode();
        big[32..36].copy_from_slice(&(MAX_PAYLOAD + 1).to_be_bytes());
        assert!(Header::decode(&big).is_err());
    }

    #[test]
    fn hello_round_trips_and_versions_are_negotiated() {
        let hello = Hello {
            version_min: 1,
            version_max: 3,
            cluster: ClusterId([1; 16]),
            volume: VolumeId([2; 16]),
            from: NodeId::new(0).unwrap(),
            to: NodeId::new(31).unwrap(),
            state: State {
                role: Role::Primary,
                disk: DiskState::UpToDate,
                generation: 42,
            },
            bitmap_generation: 41,
            history: std::array::from_fn(|i| 41 - i as u64),
            confirmed: 40,
        };
        assert_eq!(Hello::decode(&hello.encode()).unwrap(), hello);
        let old = Hello {
            version_min: 1,
            version_max: 1,
            ..hello.clone()
        };
        assert_eq!(hello.agree(&old), Some(1));
        let future = Hello {
            version_min: 4,
            version_max: 5,
            ..hello.clone()
        };
        assert_eq!(hello.agree(&future), None);
        // A node of another version sends a Hello of another length: it is named.
        let short = Hello::decode(&hello.encode()[..10])
            .unwrap_err()
            .to_string();
        assert!(
            short.contains("hello of 10 bytes (the peer speaks protocol versions 1..=3"),
            "{short}"
        );
        assert!(Hello::decode(&hello.encode()[..3]).is_err());
    }
}
