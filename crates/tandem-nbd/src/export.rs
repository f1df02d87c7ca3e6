//! What the NBD server serves: a catalog of named exports, each a block device.

use std::io;

/// Block size constraints advertised with `NBD_INFO_BLOCK_SIZE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    pub minimum: u32,
    pub preferred: u32,
    pub maximum: u32,
}

/// An export as a client sees it during negotiation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    pub size: u64,
    pub read_only: bool,
    pub block_sizes: BlockSizes,
    pub description: String,
}

/// A run of the export that is allocated data, or a hole that reads as zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub len: u64,
    pub hole: bool,
}

/// How a zeroing request may be carried out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZeroMode {
    /// The range may be deallocated (no `NO_HOLE` flag).
    pub may_punch: bool,
    /// Fail with `EOPNOTSUPP` rather than zero slowly (`FAST_ZERO`).
    pub fast_only: bool,
}

/// Receives the result of a write, which may come later (see [`Export::write`]).
pub type WriteDone = Box<dyn FnOnce(io::Result<()>) + Send>;

/// An open export. Every method may be called from several threads at once; a method
/// returns only when the operation is complete (and durable when `fua` is set), except
/// [`Export::write`].
pub trait Export: Send + Sync {
    fn info(&self) -> ExportInfo;
    /// Current size; requests are checked against it.
    fn size(&self) -> u64;
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Writes `data` at `offset`. Its result may come later: `done` is called exactly
    /// once with it (the write complete, and durable when `fua` is set), on this thread
    /// before this returns or on another one afterwards; `data` is used only until this
    /// returns. The server's threads move on meanwhile, and `done` replies to the client
    /// without ever waiting for it, so any thread of the export may call it.
    fn write(&self, offset: u64, data: &[u8], fua: bool, done: WriteDone);
    /// Makes every completed write durable, whichever connection made it.
    fn flush(&self) -> io::Result<()>;
    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()>;
    fn write_zeroes(&self, offset: u64, len: u64, mode: ZeroMode, fua: bool) -> io::Result<()>;
    fn cache(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Allocation of `[offset, offset + len)`: at least one extent, starting at `offset`,
    /// none reaching past `offset + len`; it may stop early.
    fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>>;
    /// The state of `[offset, offset + len)` in `context`, one of the meta contexts the
    /// catalog offers for this export besides `base:allocation` (see
    /// [`Catalog::contexts`]): `(length, flags)` runs, laid out as for
    /// [`Export::extents`].
    fn context_extents(&self, context: &str, offset: u64, len: u64) -> io::Result<Vec<(u64, u32)>> {
        let _ = (context, offset, len);
        Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP))
    }
}

/// Why an export cannot be described or opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenError {
    /// No export of that name (`NBD_REP_ERR_UNKNOWN`).
    Unknown(String),
    /// It exists but may not be opened now, e.g. it is held elsewhere (`NBD_REP_ERR_POLICY`).
    Refused(String),
    /// It exists but cannot serve I/O (`NBD_REP_ERR_PLATFORM`).
    Unavailable(String),
}

impl OpenError {
    pub fn message(&self) -> &str {
        match self {
            OpenError::Unknown(m) | OpenError::Refused(m) | OpenError::Unavailable(m) => m,
        }
    }
}

/// The set of exports a server offers.
pub trait Catalog: Send + Sync {
    /// Names and descriptions, for `NBD_OPT_LIST`.
    fn list(&self) -> Vec<(String, String)>;
    /// Describes an export without opening it (`NBD_OPT_INFO`).
    fn describe(&self, name: &str) -> Result<ExportInfo, OpenError>;
    /// Opens an export for a connection; dropping the result closes it.
    fn open(&self, name: &str) -> Result<Box<dyn Export>, OpenError>;
    /// The meta contexts an export offers besides `base:allocation` (such as
    /// `qemu:dirty-bitmap:NAME`), served by [`Export::context_extents`].
    fn contexts(&self, name: &str) -> Vec<String> {
        let _ = name;
        Vec::new()
    }
}
