//! The node's replication engine: the peer listener, the dialers, keepalives, and the
//! replicated volumes this node takes part in.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tandem_api::{NodeName, VolumeName, VolumeSpec};
use tandem_io::{Deadline, Timeouts};
use tandem_pool::Volume;

use crate::change::NotInPlace;
use crate::control::{Event, Link};
use crate::locks::Shared;
use crate::notify::OnChange;
use crate::peer::{DEAD_AFTER, Peer};
use crate::stream::{PeerStream, PeerTls};
use crate::volume::ReplicatedVolume;
use crate::wire::{self, Header, Hello, Kind, WireError};

/// How long a new connection may take to say Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Incoming peer connections in their handshake at once, at most (each a thread for
/// up to [`HELLO_TIMEOUT`]); more are closed at once, and their peers dial again.
const MAX_HELLOS: usize = 64;
const DIAL_TIMEOUT: Duration = Duration::from_secs(2);
const TICK: Duration = Duration::from_millis(100);
/// Idle links are pinged this often, so a dead peer is noticed within `DEAD_AFTER`.
const PING_AFTER: Duration = Duration::from_secs(1);

/// Why a spec was not applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApplyError {
    /// The spec is wrong in itself or for this node's replica.
    Invalid(String),
    /// The change needs a new volume object, and the volume is open on this node.
    InUse(NotInPlace),
}

impl std::fmt::Display for ApplyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ApplyError::Invalid(s) => f.write_str(s),
            ApplyError::InUse(why) => write!(f, "{why}; the volume is open on this node"),
        }
    }
}

pub struct Replicator {
    node: NodeName,
    /// Told of every change of a volume's state.
    on_change: OnChange,
    volumes: RwLock<HashMap<VolumeName, Arc<ReplicatedVolume>>>,
    /// Mutual TLS on every peer connection, both ways, when configured.
    tls: Option<PeerTls>,
}

impl Replicator {
    /// Starts serving peers on `listener`, with a background thread for keepalives and
    /// reconnection; with `tls`, every peer connection runs under mutual TLS.
    pub fn start(
        node: NodeName,
        listener: TcpListener,
        tls: Option<PeerTls>,
        on_change: OnChange,
    ) -> io::Result<Arc<Replicator>> {
        let replicator = Arc::new(Replicator {
            node,
            on_change,
            volumes: RwLock::default(),
            tls,
        });
        let r = replicator.clone();
        std::thread::Builder::new()
            .name("peer-accept".into())
            .spawn(move || {
                let pending = Arc::new(AtomicUsize::new(0));
                let refusal_logged = tandem_io::OncePerSecond::default();
                for stream in listener.incoming() {
                    match stream {
                        Ok(stream) => {
                            if pending.fetch_add(1, Ordering::AcqRel) >= MAX_HELLOS {
                                pending.fetch_sub(1, Ordering::AcqRel);
                                if refusal_logged.due() {
                                    tracing::warn!(limit = MAX_HELLOS,
                                        "peer connection closed: as many are in their handshake as this node takes");
                                }
                                continue;
                            }
                            let (r, done) = (r.clone(), pending.clone());
                            let spawned = std::thread::Builder::new()
                                .name("peer-hello".into())
                                .spawn(move || {
                                    r.accept(stream);
                                    done.fetch_sub(1, Ordering::AcqRel);
                                });
                            if spawned.is_err() {
                                pending.fetch_sub(1, Ordering::AcqRel);
                            }
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "peer accept failed");
                            std::thread::sleep(Duration::from_millis(100));
                        }
                    }
                }
            })?;
        let r = Arc::downgrade(&replicator);
        std::thread::Builder::new()
            .name("peer-ticker".into())
            .spawn(move || {
                while let Some(r) = r.upgrade() {
                    r.tick();
                    drop(r);
                    std::thread::sleep(TICK);
                }
            })?;
        Ok(replicator)
    }

    pub fn node(&self) -> &NodeName {
        &self.node
    }

    /// Takes a volume spec (new or changed) with this node's replica, if diskful. A
    /// volume this node has already is changed in place when the change allows (see
    /// [`ReplicatedVolume::in_place`]); otherwise it is replaced, unless it is open.
    pub fn apply(
        &self,
        spec: VolumeSpec,
        local: Option<Arc<Volume>>,
    ) -> Result<Arc<ReplicatedVolume>, ApplyError> {
        spec.validate(&self.node).map_err(ApplyError::Invalid)?;
        let me = spec.me(&self.node).expect("validated").clone();
        if let Some(current) = self.get(&spec.name) {
            match current.in_place(&spec, &me, Some(local.as_ref())) {
                Ok(()) => {
                    current.update(spec, me).map_err(ApplyError::Invalid)?;
                    return Ok(current);
                }
                Err(why) if current.is_open() => return Err(ApplyError::InUse(why)),
                Err(_) => {}
            }
        }
        let volume = ReplicatedVolume::new(spec, me, local, self.on_change.clone())
            .map_err(|e| ApplyError::Invalid(e.to_string()))?;
        let old = self
            .volumes
            .writing()
            .insert(volume.name().clone(), volume.clone());
        if let Some(old) = old {
            old.shut_down();
        }
        (self.on_change)(volume.name());
        tracing::info!(volume = %volume.name(), participants = volume.config().spec.participants.len(),
            "replicated volume configured");
        Ok(volume)
    }

    pub fn remove(&self, name: &VolumeName) -> Option<Arc<ReplicatedVolume>> {
        let old = self.volumes.writing().remove(name);
        if let Some(v) = &old {
            v.shut_down();
            (self.on_change)(name);
        }
        old
    }

    pub fn get(&self, name: &VolumeName) -> Option<Arc<ReplicatedVolume>> {
        self.volumes.reading().get(name).cloned()
    }

    pub fn volumes(&self) -> Vec<Arc<ReplicatedVolume>> {
        self.volumes.reading().values().cloned().collect()
    }

    fn find(&self, hello: &Hello) -> Option<Arc<ReplicatedVolume>> {
        self.volumes
            .reading()
            .values()
            .find(|v| v.volume_id() == hello.volume)
            .cloned()
    }

    /// Serves an incoming connection: its Hello names the volume and the peer.
    fn accept(&self, sock: TcpStream) {
        let from = sock
            .peer_addr()
            .map_or_else(|_| "?".into(), |a| a.to_string());
        let started = Instant::now();
        let result = (|| -> Result<(), WireError> {
            let mut sock = sock;
            // The TLS handshake gets what is left of the handshake's time.
            handshake_bound(&mut sock, started).arm()?;
            tandem_io::bound_tcp_liveness(&sock, DEAD_AFTER)?;
            let mut stream = PeerStream::accept(sock, self.tls.as_ref())
                .map_err(|e| WireError::Refused(format!("TLS handshake failed: {e}")))?;
            let hello = read_hello(&mut handshake_bound(&mut stream, started))?;
            let volume = self.find(&hello).ok_or_else(|| {
                WireError::Refused(format!(
                    "volume {} is not configured on this node",
                    hello.volume
                ))
            })?;
            let peer = volume.check_hello(&hello).map_err(WireError::Refused)?;
            send_hello(
                &mut handshake_bound(&mut stream, started),
                &volume.hello(hello.from),
            )?;
            volume.establish(peer, stream, &hello)?;
            Ok(())
        })();
        if let Err(e) = result {
            tracing::warn!(from, error = %e, "incoming peer connection refused");
        }
    }

    fn tick(&self) {
        for volume in self.volumes() {
            volume.watch_quorum();
            volume.watch_resync();
            let view = volume.view();
            for peer in &volume.config().peers {
                let Some(link) = view.peer(peer.id).map(|c| &c.link) else {
                    continue;
                };
                let silent = peer.silent_for();
                if matches!(link, Link::Up { .. }) {
                    // Nothing here waits on the peer's socket (see `Outbox`): one
                    // stuck peer never keeps the others from being pinged.
                    if silent > DEAD_AFTER {
                        tracing::warn!(volume = %volume.name(), peer = %peer.node,
                            silent_ms = silent.as_millis() as u64, "peer is silent; closing the connection");
                        peer.disconnect();
                    } else if let Some(waited) = peer.unanswered_for().filter(|w| *w > DEAD_AFTER) {
                        tracing::warn!(volume = %volume.name(), peer = %peer.node,
                            waited_ms = waited.as_millis() as u64, queued = peer.queued(),
                            "peer answers none of the requests waiting on it; closing the connection");
                        peer.disconnect();
                    } else if peer.quiet_for() > PING_AFTER {
                        // Each side speaks at least every second, so each hears the other.
                        let _ = peer.send(&Header::new(Kind::Ping, 0), &[]);
                    }
                } else if matches!(link, Link::Down) && volume.my_id() < peer.id && peer.dial_due()
                {
                    // The lower node id dials, so each pair has one connection.
                    let (volume, peer) = (volume.clone(), peer.clone());
                    let tls = self.tls.clone();
                    let spawned = std::thread::Builder::new().name("peer-dial".into()).spawn({
                        let peer = peer.clone();
                        move || {
                            dial(&volume, &peer, tls.as_ref());
                            peer.dialed();
                        }
                    });
                    if spawned.is_err() {
                        peer.dialed();
                    }
                }
            }
            for (peer, epoch) in volume.resync_retries() {
                let _ = volume.apply(Event::ResyncRetry {
                    peer: peer.id,
                    epoch,
                });
            }
        }
    }
}

fn dial(volume: &Arc<ReplicatedVolume>, peer: &Arc<Peer>, tls: Option<&PeerTls>) {
    let target = peer;
    let result = (|| -> Result<(), WireError> {
        let addr: SocketAddr = target
            .address
            .parse()
            .map_err(|_| WireError::Refused("bad address".into()))?;
        let mut sock = TcpStream::connect_timeout(&addr, DIAL_TIMEOUT)?;
        let started = Instant::now();
        handshake_bound(&mut sock, started).arm()?;
        tandem_io::bound_tcp_liveness(&sock, DEAD_AFTER)?;
        let mut stream = PeerStream::dial(sock, addr.ip(), tls)
            .map_err(|e| WireError::Refused(format!("TLS handshake failed: {e}")))?;
        send_hello(
            &mut handshake_bound(&mut stream, started),
            &volume.hello(target.id),
        )?;
        let hello = read_hello(&mut handshake_bound(&mut stream, started))?;
        let checked = volume.check_hello(&hello).map_err(WireError::Refused)?;
        if !Arc::ptr_eq(&checked, peer) {
            return Err(WireError::Refused(format!(
                "expected node id {} at {}, got {}",
                target.id, target.address, hello.from
            )));
        }
        volume.establish(peer.clone(), stream, &hello)?;
        Ok(())
    })();
    match result {
        Ok(()) => {}
        Err(WireError::Refused(why)) => {
            tracing::warn!(volume = %volume.name(), peer = %target.node, %why, "peer refused");
        }
        Err(e) => {
            tracing::debug!(volume = %volume.name(), peer = %target.node, error = %e, "cannot reach peer")
        }
    }
}

/// `stream`, each read and write bounded by what is left of the handshake's time
/// (from `started`): a peer trickling its Hello cannot hold a thread longer.
fn handshake_bound<S: Timeouts>(stream: &mut S, started: Instant) -> Deadline<'_, S> {
    Deadline::new(stream, started, HELLO_TIMEOUT, "the peer handshake")
}

fn send_hello(stream: &mut impl Write, hello: &Hello) -> io::Result<()> {
    let body = hello.encode();
    let mut h = Header::new(Kind::Hello, 0);
    h.payload = body.len() as u32;
    wire::send(stream, &h, &body)
}

fn read_hello(stream: &mut impl Read) -> Result<Hello, WireError> {
    let h = wire::read_header(stream)?;
    if h.kind != Kind::Hello {
        return Err(WireError::Malformed(format!(
            "expected Hello, got {:?}",
            h.kind
        )));
    }
    // Checked before its buffer is made: anyone reaching the port can announce one of
    // the largest payloads. One of another length, within reason, is read: it names
    // the versions a node of another release speaks.
    if h.payload as usize > wire::MAX_HELLO_LEN {
        return Err(WireError::Malformed(format!(
            "hello of {} bytes (at most {})",
            h.payload,
            wire::MAX_HELLO_LEN
        )));
    }
    Hello::decode(&wire::read_payload(stream, h.payload)?)
}
