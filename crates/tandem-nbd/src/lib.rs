//! A complete NBD server (fixed newstyle, structured replies, extended headers,
//! `base:allocation`, STARTTLS) serving any [`Catalog`] of [`Export`]s over TCP and Unix
//! sockets.
//!
//! ```text
//! accept ─► handshake (options, TLS) ─► transmission (worker threads, out-of-order replies)
//! ```

mod buf;
mod conn;
mod export;
mod handshake;
pub mod proto;
mod replies;
mod reply;
mod server;
mod transmission;

pub use export::{BlockSizes, Catalog, Export, ExportInfo, Extent, OpenError, WriteDone, ZeroMode};
pub use handshake::{TlsPolicy, fuzz_option};
pub use server::Server;
pub use transmission::fuzz_request;
