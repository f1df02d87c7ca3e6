//! The replication engine: keeps a volume's replicas on several nodes identical, the
//! way DRBD does, in user space.
//!
//! ```text
//! NBD export ─► ReplicatedVolume ─┬─► local replica (tandem-pool)
//!                                 └─► Peer ══ peer protocol (wire) ══ Peer ─► its replica
//! ```
//! [`Replicator`] owns the peer listener, dials peers, and pings idle links.

mod al;
mod bitmap;
mod change;
mod completion;
mod control;
mod engine;
mod handshake;
mod interval;
mod locks;
mod notify;
mod outbox;
mod owner;
mod peer;
mod promotion;
mod quorum;
mod resync;
mod stream;
mod volume;
pub mod wire;
mod workers;

pub use al::fuzz_activity_log;
pub use change::NotInPlace;
pub use engine::{ApplyError, Replicator};
pub use notify::OnChange;
pub use peer::LinkStats;
pub use stream::PeerTls;
pub use volume::{OpenRefused, ReplicatedVolume, SnapshotRefused};
