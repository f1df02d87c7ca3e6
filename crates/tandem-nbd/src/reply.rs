//! Encoding of transmission replies: simple, structured, or extended-header chunks.
//! A reply is assembled first and written with one vectored write, so chunks of
//! concurrent replies never interleave and data is never copied.

use std::io::{self, IoSlice, Write};
use std::ops::Range;

use crate::proto::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReplyMode {
    Simple,
    Structured,
    Extended,
}

enum Part<'a> {
    Head(Range<usize>),
    Data(&'a [u8]),
}

pub(crate) struct Reply<'a> {
    mode: ReplyMode,
    cookie: u64,
    /// The request's offset, echoed in every extended chunk header.
    offset: u64,
    heads: Vec<u8>,
    parts: Vec<Part<'a>>,
}

impl<'a> Reply<'a> {
    pub fn new(mode: ReplyMode, cookie: u64, offset: u64) -> Self {
        Reply {
            mode,
            cookie,
            offset,
            heads: Vec::with_capacity(64),
            parts: Vec::with_capacity(4),
        }
    }

    fn head(&mut self, bytes: impl FnOnce(&mut Vec<u8>)) {
        let start = self.heads.len();
        bytes(&mut self.heads);
        self.parts.push(Part::Head(start..self.heads.len()));
    }

    fn simple(&mut self, error: u32) {
        let cookie = self.cookie;
        self.head(|h| {
            h.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
            h.extend_from_slice(&error.to_be_bytes());
            h.extend_from_slice(&cookie.to_be_bytes());
        });
    }

    /// A chunk header followed by the fixed part of its payload; `extra` more payload
    /// bytes follow as data.
    fn chunk(&mut self, done: bool, kind: u16, fixed: &[u8], extra: usize) {
        let (cookie, offset, extended) =
            (self.cookie, self.offset, self.mode == ReplyMode::Extended);
        let flags = if done { REPLY_FLAG_DONE } else { 0 };
        let len = fixed.len() + extra;
        self.head(|h| {
            let magic = if extended {
                EXTENDED_REPLY_MAGIC
            } else {
                STRUCTURED_REPLY_MAGIC
            };
            h.extend_from_slice(&magic.to_be_bytes());
            h.extend_from_slice(&flags.to_be_bytes());
            h.extend_from_slice(&kind.to_be_bytes());
            h.extend_from_slice(&cookie.to_be_bytes());
            if extended {
                h.extend_from_slice(&offset.to_be_bytes());
                h.extend_from_slice(&(len as u64).to_be_bytes());
            } else {
                h.extend_from_slice(&(len as u32).to_be_bytes());
            }
            h.extend_from_slice(fixed);
        });
    }

    /// Success without data. `read` says whether it answers a READ, which must be
    /// structured once structured replies are on.
    pub fn ok(mut self, read: bool) -> Self {
        match self.mode {
            ReplyMode::Extended => self.chunk(true, REPLY_NONE, &[], 0),
            ReplyMode::Structured if read => self.chunk(true, REPLY_NONE, &[], 0),
            _ => self.simple(0),
        }
        self
    }

    pub fn error(mut self, errno: Errno, message: &str) -> Self {
        match self.mode {
            ReplyMode::Simple => self.simple(errno as u32),
            _ => {
                let mut msg = message.as_bytes();
                msg = &msg[..msg.len().min(MAX_STRING)];
                let mut fixed = (errno as u32).to_be_bytes().to_vec();
                fixed.extend_from_slice(&(msg.len() as u16).to_be_bytes());
                fixed.extend_from_slice(msg);
                self.chunk(true, REPLY_ERROR, &fixed, 0);
            }
        }
        self
    }

    /// READ data at `offset`. In simple mode this must be the whole, only reply.
    pub fn data(&mut self, offset: u64, data: &'a [u8], done: bool) {
        match self.mode {
            ReplyMode::Simple => self.simple(0),
            _ => self.chunk(done, REPLY_OFFSET_DATA, &offset.to_be_bytes(), data.len()),
        }
        if !data.is_empty() {
            self.parts.push(Part::Data(data));
        }
    }

    /// A hole in a structured READ; `len` fits 32 bits (callers split larger holes).
    pub fn hole(&mut self, offset: u64, len: u32, done: bool) {
        let mut fixed = offset.to_be_bytes().to_vec();
        fixed.extend_from_slice(&len.to_be_bytes());
        self.chunk(done, REPLY_OFFSET_HOLE, &fixed, 0);
    }

    /// One block-status chunk for `context` with `(length, flags)` descriptors; `done`
    /// on the last context's.
    pub fn block_status(mut self, context: u32, extents: &[(u64, u32)], done: bool) -> Self {
        let mut fixed = context.to_be_bytes().to_vec();
        if self.mode == ReplyMode::Extended {
            fixed.extend_from_slice(&(extents.len() as u32).to_be_bytes());
            for &(len, flags) in extents {
                fixed.extend_from_slice(&len.to_be_bytes());
                fixed.extend_from_slice(&(flags as u64).to_be_bytes());
            }
            self.chunk(done, REPLY_BLOCK_STATUS_EXT, &fixed, 0);
        } else {
            for &(len, flags) in extents {
                fixed.extend_from_slice(&(len as u32).to_be_bytes());
                fixed.extend_from_slice(&flags.to_be_bytes());
            }
            self.chunk(done, REPLY_BLOCK_STATUS, &fixed, 0);
        }
        self
    }

    /// Writes the whole reply.
    pub fn send(&self, w: &mut dyn Write) -> io::Result<()> {
        let mut slices: Vec<IoSlice<'_>> = self
            .parts
            .iter()
            .map(|p| match p {
                Part::Head(r) => IoSlice::new(&self.heads[r.clone()]),
                Part::Data(d) => IoSlice::new(d),
            })
            .collect();
        tandem_io::write_all_vectored(w, &mut slices)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(r: &Reply<'_>) -> Vec<u8> {
        let mut out = Vec::new();
        r.send(&mut out).unwrap();
        out
    }

    #[test]
    fn simple_ok_is_sixteen_bytes() {
        let r = Reply::new(ReplyMode::Simple, 0x1122, 0).ok(false);
        assert_eq!(
            bytes(&r),
            [
                0x67, 0x44, 0x66, 0x98, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x11, 0x22
            ]
        );
    }

    #[test]
    fn structured_read_ok_uses_a_none_chunk() {
        let r = Reply::new(ReplyMode::Structured, 7, 0).ok(true);
        let b = bytes(&r);
        assert_eq!(b.len(), 20);
        assert_eq!(&b[..4], &STRUCTURED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(u16::from_be_bytes([b[4], b[5]]), REPLY_FLAG_DONE);
        assert_eq!(u16::from_be_bytes([b[6], b[7]]), REPLY_NONE);
    }

    #[test]
    fn extended_chunks_echo_the_request_offset() {
        let data = [9u8; 3];
        let mut r = Reply::new(ReplyMode::Extended, 5, 4096);
        r.data(8192, &data, true);
        let b = bytes(&r);
        assert_eq!(&b[..4], &EXTENDED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(u64::from_be_bytes(b[16..24].try_into().unwrap()), 4096);
        assert_eq!(u64::from_be_bytes(b[24..32].try_into().unwrap()), 8 + 3);
        assert_eq!(u64::from_be_bytes(b[32..40].try_into().unwrap()), 8192);
        assert_eq!(&b[40..], &data);
    }

    #[test]
    fn error_chunk_carries_errno_and_message() {
        let r = Reply::new(ReplyMode::Structured, 1, 0).error(Errno::NoSpc, "full");
        let b = bytes(&r);
        assert_eq!(u16::from_be_bytes([b[6], b[7]]), REPLY_ERROR);
        assert_eq!(u32::from_be_bytes(b[16..20].try_into().unwrap()), 4 + 2 + 4);
        assert_eq!(u32::from_be_bytes(b[20..24].try_into().unwrap()), 28);
        assert_eq!(&b[26..], b"full");
    }
}
