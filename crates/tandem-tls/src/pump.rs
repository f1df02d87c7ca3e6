//! A pump that lets several threads use one TLS session: it moves bytes between the
//! session on its TCP socket and a plain socket pair, whose other end is returned.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

/// Moves bytes between a TLS session (handshake done) on `sock` and a plain socket pair,
/// returning the plain end. Two threads, named after `name`, share the session: one
/// decrypts what arrives, one encrypts what is written to the plain end; each holds the
/// session lock only while it works on it.
pub fn spawn_pump(
    tls: impl Into<rustls::Connection>,
    sock: TcpStream,
    name: &str,
) -> io::Result<UnixStream> {
    let (ours, theirs) = UnixStream::pair()?;
    let mut tls: rustls::Connection = tls.into();
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
        .name(format!("{name}-tls-in"))
        .spawn(move || inbound.decrypt())?;
    std::thread::Builder::new()
        .name(format!("{name}-tls-out"))
        .spawn(move || outbound.encrypt())?;
    Ok(ours)
}

struct Pump {
    tls: Arc<Mutex<rustls::Connection>>,
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
