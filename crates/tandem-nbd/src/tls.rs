//! TLS for NBD's STARTTLS: loading X.509 credentials, and a pump that lets the
//! multi-threaded transmission phase run over one TLS session.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex};

use rustls::pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: io::Error },
    #[error("{path} holds no {what}")]
    Missing { path: String, what: &'static str },
    #[error("TLS configuration rejected: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client CA certificates rejected: {0}")]
    Verifier(String),
}

fn read_pem(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_pem(path)?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Read {
            path: path.display().to_string(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::Missing {
            path: path.display().to_string(),
            what: "PEM certificate",
        });
    }
    Ok(certs)
}

/// Builds a server configuration from a PEM certificate chain and key. With `client_ca`,
/// clients must present a certificate signed by one of its CAs (mutual TLS).
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = certs(cert)?;
    let key_pem = read_pem(key)?;
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|source| TlsError::Read {
            path: key.display().to_string(),
            source,
        })?
        .ok_or_else(|| TlsError::Missing {
            path: key.display().to_string(),
            what: "PEM private key",
        })?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in certs(ca)? {
                roots.add(c)?;
            }
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .map_err(|e| TlsError::Verifier(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    Ok(Arc::new(builder.with_single_cert(chain, key)?))
}

/// Moves bytes between a TLS session on `sock` and a plain socket pair, returning the
/// plain end. Two threads share the session: one decrypts what arrives, one encrypts
/// what the server writes; each holds the session lock only while it works on it.
pub(crate) fn spawn_pump(tls: rustls::ServerConnection, sock: TcpStream) -> io::Result<UnixStream> {
    let (ours, theirs) = UnixStream::pair()?;
    let mut tls = tls;
    // Each write is drained to the socket at once, so the session buffers at most one
    // chunk of plaintext; without a limit, a chunk is never accepted partially.
    tls.set_buffer_limit(None);
    let tls = Arc::new(Mutex::new(tls));
    let inbound = Pump {
        tls: tls.clone(),
        sock: sock.try_clone()?,
        plain: theirs.try_clone()?,
    };
    let outbound = Pump {
        tls,
        sock,
        plain: theirs,
    };
    std::thread::Builder::new()
        .name("nbd-tls-in".into())
        .spawn(move || inbound.decrypt())?;
    std::thread::Builder::new()
        .name("nbd-tls-out".into())
        .spawn(move || outbound.encrypt())?;
    Ok(ours)
}

struct Pump {
    tls: Arc<Mutex<rustls::ServerConnection>>,
    sock: TcpStream,
    plain: UnixStream,
}

impl Pump {
    fn decrypt(mut self) {
        if let Err(e) = self.decrypt_loop() {
            tracing::debug!(error = %e, "TLS inbound stream ended");
        }
        let _ = self.plain.shutdown(Shutdown::Write);
    }

    fn decrypt_loop(&mut self) -> io::Result<()> {
        let mut raw = vec![0u8; 64 << 10];
        let mut clear = vec![0u8; 64 << 10];
        loop {
            let n = self.sock.read(&mut raw)?;
            if n == 0 {
                return Ok(());
            }
            let mut input = &raw[..n];
            while !input.is_empty() {
                let mut tls = self.tls.lock().unwrap();
                tls.read_tls(&mut input)?;
                let state = tls.process_new_packets().map_err(io::Error::other)?;
                // The session may owe the peer a record (an alert, a key update).
                while tls.wants_write() {
                    tls.write_tls(&mut self.sock)?;
                }
                let mut pending = state.plaintext_bytes_to_read();
                while pending > 0 {
                    let got = tls.reader().read(&mut clear[..pending.min(64 << 10)])?;
                    drop(tls);
                    self.plain.write_all(&clear[..got])?;
                    pending -= got;
                    tls = self.tls.lock().unwrap();
                }
                if state.peer_has_closed() {
                    return Ok(());
                }
            }
        }
    }

    fn encrypt(mut self) {
        if let Err(e) = self.encrypt_loop() {
            tracing::debug!(error = %e, "TLS outbound stream ended");
        }
        let _ = self.sock.shutdown(Shutdown::Both);
    }

    fn encrypt_loop(&mut self) -> io::Result<()> {
        let mut clear = vec![0u8; 256 << 10];
        loop {
            let n = self.plain.read(&mut clear)?;
            let mut tls = self.tls.lock().unwrap();
            if n == 0 {
                tls.send_close_notify();
            } else {
                tls.writer().write_all(&clear[..n])?;
            }
            while tls.wants_write() {
                tls.write_tls(&mut self.sock)?;
            }
            if n == 0 {
                return Ok(());
            }
        }
    }
}
