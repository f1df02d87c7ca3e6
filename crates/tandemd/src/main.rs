//! `tandemd`: the Tandem node daemon.

mod api;
mod candidate;
mod cluster;
mod durable;
mod events;
mod exports;
mod metrics;
mod node;
mod pools;

use std::io::IsTerminal;
use std::net::TcpListener;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use tandem_nbd::TlsPolicy;

use crate::exports::NodeExports;
use crate::node::Node;
use tandemd::config::{LogFormat, Options, Settings};

/// How long shutdown waits for NBD clients to finish their in-flight requests.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

fn main() -> anyhow::Result<()> {
    let settings = Options::parse().settle()?;
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&settings.log_level)
                .with_context(|| format!("invalid log level {:?}", settings.log_level))?,
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, never in files or journald.
        .with_ansi(std::io::stderr().is_terminal());
    match settings.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().flatten_event(true).init(),
    }
    if let Err(e) = run(settings) {
        tracing::error!(error = format!("{e:#}"), "tandemd stopped");
        return Err(e);
    }
    Ok(())
}

/// One daemon per data directory: held (flock) until the process exits.
fn lock_data_dir(dir: &Path) -> anyhow::Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    let path = dir.join("tandemd.lock");
    let file =
        std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    // SAFETY: plain syscall on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        bail!(
            "data directory {} is in use by another tandemd",
            dir.display()
        );
    }
    Ok(file)
}

fn bind_unix(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::symlink_metadata(path) {
        // A socket left by a previous run: nobody listens on it any more (the data-dir
        // lock would have stopped a second daemon before this point).
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)?,
        Ok(_) => bail!(
            "{} exists and is not a socket; remove it or pass --nbd-socket",
            path.display()
        ),
        Err(_) => {}
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("binding NBD socket {}", path.display()))?;
    // Owner and group only: an NBD socket gives full access to every volume.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    Ok(listener)
}

fn run(settings: Settings) -> anyhow::Result<()> {
    tracing::info!(node = %settings.name, data_dir = %settings.data_dir.display(), "tandemd starting");
    std::fs::create_dir_all(&settings.data_dir)
        .with_context(|| format!("creating data dir {}", settings.data_dir.display()))?;
    let _lock = lock_data_dir(&settings.data_dir)?;
    // Before anything binds or opens: a backup that cannot be restored stops it here.
    if let Some(backup) = &settings.restore_db {
        let restored =
            tandem_controller::restore(&settings.data_dir, backup).with_context(|| {
                format!(
                    "restoring the controller database from {}",
                    backup.display()
                )
            })?;
        if restored {
            tracing::warn!(backup = %backup.display(),
                "controller database restored from a backup; the one replaced is kept beside it");
        } else {
            tracing::info!(backup = %backup.display(), "backup already restored; not again");
        }
    }
    let peers = TcpListener::bind(settings.peer_listen)
        .with_context(|| format!("binding peer address {}", settings.peer_listen))?;
    let peer_tls = match &settings.peer_tls {
        Some([cert, key, ca]) => Some(
            tandem_replication::PeerTls::load(cert, key, ca)
                .context("loading the peer TLS credentials")?,
        ),
        None => None,
    };
    let tls_on = peer_tls.is_some();
    let events = events::Events::new();
    let replicator = tandem_replication::Replicator::start(
        settings.name.clone(),
        peers,
        peer_tls,
        events.on_change(),
    )?;
    tracing::info!(addr = %settings.peer_listen, tls = tls_on, "serving peers");
    let node = Arc::new(Node::open(
        settings.name.clone(),
        &settings.pools,
        settings.cache,
        replicator,
        events,
        node::Addresses {
            peer: settings.peer_listen.to_string(),
            nbd_socket: settings.nbd_socket.clone(),
        },
        &settings.data_dir,
    )?);

    let tls = match &settings.tls {
        None => TlsPolicy::Off,
        Some(t) => {
            let config = tandem_tls::server_config(&t.cert, &t.key, t.client_ca.as_deref())?;
            if t.required {
                TlsPolicy::Required(config)
            } else {
                TlsPolicy::Optional(config)
            }
        }
    };
    let io = Arc::new(metrics::IoBook::default());
    let nbd = Arc::new(tandem_nbd::Server::new(
        Arc::new(NodeExports::new(node.clone(), io.clone())),
        settings.nbd_max_connections,
    )?);
    let tcp = TcpListener::bind(settings.nbd_listen)
        .with_context(|| format!("binding NBD address {}", settings.nbd_listen))?;
    nbd.serve_tcp(tcp, tls)?;
    nbd.serve_unix(bind_unix(&settings.nbd_socket)?)?;
    tracing::info!(tcp = %settings.nbd_listen, socket = %settings.nbd_socket.display(), "serving NBD");

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let api = tokio::net::TcpListener::bind(settings.api_listen)
            .await
            .with_context(|| format!("binding API address {}", settings.api_listen))?;
        tracing::info!(addr = %settings.api_listen, "serving the node API");
        let candidate = if settings.controller {
            // The listener is bound, so the controller's first visit of its own node
            // waits in the backlog instead of failing.
            let mut own_api = settings.api_listen;
            if own_api.ip().is_unspecified() {
                own_api.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            let candidate = candidate::Candidate::start(
                node.clone(),
                &settings.data_dir,
                own_api.to_string(),
                settings.api_token.clone(),
            )
            .context("making this node a controller candidate")?;
            tracing::info!(addr = %settings.api_listen, "controller candidate: serves the cluster API while it runs the controller");
            Some(candidate)
        } else {
            None
        };
        let mut routes = api::router(node.clone(), candidate.clone());
        routes = routes.merge(metrics::router(Arc::new(metrics::Sources {
            node: node.clone(),
            io,
            nbd: nbd.clone(),
            candidate: candidate.clone(),
            token: settings.metrics_token.clone(),
        })));
        let events = node.events().clone();
        axum::serve(api, routes)
            .with_graceful_shutdown(async move {
                shutdown_signal().await;
                events.close();
            })
            .await
            .context("API server failed")
    })?;

    tracing::info!(
        connections = nbd.connections(),
        "shutting down: finishing in-flight NBD requests"
    );
    let drained = nbd.shutdown(SHUTDOWN_GRACE);
    let _ = std::fs::remove_file(&settings.nbd_socket);
    if drained {
        tracing::info!("tandemd stopped cleanly");
    }
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}
