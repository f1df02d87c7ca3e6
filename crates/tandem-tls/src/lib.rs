//! TLS for Tandem's connections (NBD's STARTTLS, the peer protocol between nodes):
//! X.509 credentials from PEM files, and a pump that lets several threads share one
//! TLS session.

mod credentials;
mod pump;

pub use credentials::{TlsError, client_config, server_config};
pub use pump::spawn_pump;
pub use rustls;
