//! `tandemd`'s settings: command-line flags, and the same keys (kebab-case) in an
//! optional TOML file. A flag wins over the file; the file wins over the default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Parser;
use serde::Deserialize;
use tandem_api::{NodeName, PoolName};
use tandem_pool::CacheMode;

#[derive(Debug, Default, Parser, Deserialize)]
#[command(
    name = "tandemd",
    version,
    about = "Tandem node daemon: serves volumes from storage pools over NBD"
)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Options {
    /// TOML file with any of the settings below (flags override it).
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// This node's name [default: the host name].
    #[arg(long)]
    pub name: Option<NodeName>,
    /// Where the daemon keeps its state [default: /var/lib/tandem].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// A storage pool, NAME=DIR (repeatable) [default: default=<data-dir>/pools/default].
    #[arg(long = "pool", value_name = "NAME=DIR")]
    #[serde(default, rename = "pool")]
    pub pools: Vec<String>,
    /// NBD on TCP [default: 127.0.0.1:10809].
    #[arg(long, value_name = "ADDR")]
    pub nbd_listen: Option<SocketAddr>,
    /// Most NBD client connections served at once; more are closed as soon as
    /// accepted [default: 1024].
    #[arg(long, value_name = "N")]
    pub nbd_max_connections: Option<usize>,
    /// NBD on a Unix socket [default: <data-dir>/nbd.sock].
    #[arg(long, value_name = "PATH")]
    pub nbd_socket: Option<PathBuf>,
    /// Peer protocol between nodes [default: 127.0.0.1:7700].
    #[arg(long, value_name = "ADDR")]
    pub peer_listen: Option<SocketAddr>,
    /// HTTP API [default: 127.0.0.1:3370].
    #[arg(long, value_name = "ADDR")]
    pub api_listen: Option<SocketAddr>,
    /// Log filter, e.g. info, debug, tandem_nbd=trace [default: info].
    #[arg(long, value_name = "FILTER")]
    pub log_level: Option<String>,
    /// Log lines as text or as JSON objects, one per line, for log shippers
    /// [default: text].
    #[arg(long, value_name = "FORMAT")]
    pub log_format: Option<String>,
    /// Host page cache for data files: none (direct I/O) or writeback [default: none].
    #[arg(long, value_name = "MODE")]
    pub cache: Option<String>,
    /// PEM certificate chain for NBD STARTTLS.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for NBD STARTTLS.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificates; when set, NBD clients must present a certificate it signed.
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// PEM certificate chain of this node for mutual TLS between peers (with
    /// --peer-tls-key and --peer-tls-ca: every peer connection then runs under TLS).
    #[arg(long, value_name = "FILE")]
    pub peer_tls_cert: Option<PathBuf>,
    /// PEM private key for --peer-tls-cert.
    #[arg(long, value_name = "FILE")]
    pub peer_tls_key: Option<PathBuf>,
    /// PEM CA certificates: peers must present a certificate one of them signed.
    #[arg(long, value_name = "FILE")]
    pub peer_tls_ca: Option<PathBuf>,
    /// Refuse NBD over TCP without TLS.
    #[arg(long)]
    #[serde(default)]
    pub tls_required: bool,
    /// Make this node a controller candidate: it keeps a replica of the cluster's
    /// database (the system volume, in the pool tandem-system of the data dir) and runs
    /// the controller, serving the cluster API on the API address, while it is that
    /// volume's Primary.
    #[arg(long)]
    #[serde(default)]
    pub controller: bool,
    /// File holding the access token the cluster API requires (as `Authorization:
    /// Bearer TOKEN`); the API is open to anyone reaching it when absent.
    #[arg(long, value_name = "FILE")]
    pub api_token_file: Option<PathBuf>,
    /// File holding a token that scrapes of `/metrics` must carry (as `Authorization:
    /// Bearer TOKEN`); metrics carry no secrets and are open when absent.
    #[arg(long, value_name = "FILE")]
    pub metrics_token_file: Option<PathBuf>,
    /// Restore this backup of the controller's database (`tandem cluster backup`, or one
    /// in `<data-dir>/backups/`): loaded into the system volume when this candidate next
    /// runs the controller (a candidate holding no system volume founds one for it);
    /// volumes the nodes hold that the backup does not know are reported as orphans.
    /// Done once per backup, however often the node starts with the flag. Command line
    /// only.
    #[arg(long, value_name = "FILE", requires = "controller")]
    #[serde(skip)]
    pub restore_db: Option<PathBuf>,
}

/// Settings after merging and defaults.
#[derive(Debug)]
pub struct Settings {
    pub name: NodeName,
    pub data_dir: PathBuf,
    pub pools: Vec<(PoolName, PathBuf)>,
    pub nbd_listen: SocketAddr,
    pub nbd_max_connections: usize,
    pub nbd_socket: PathBuf,
    pub api_listen: SocketAddr,
    pub peer_listen: SocketAddr,
    pub log_level: String,
    pub log_format: LogFormat,
    pub cache: CacheMode,
    pub tls: Option<Tls>,
    /// Certificate, key and CA for mutual TLS between peers.
    pub peer_tls: Option<[PathBuf; 3]>,
    pub controller: bool,
    /// The cluster API's access token.
    pub api_token: Option<String>,
    /// The token scrapes of `/metrics` need.
    pub metrics_token: Option<String>,
    /// A backup to start the controller from.
    pub restore_db: Option<PathBuf>,
}

/// Shortest access token accepted: guessing must be hopeless.
const MIN_TOKEN_LEN: usize = 16;

/// Longest token file read: a token is a line; a path naming something endless
/// (`/dev/zero`) or huge is refused, not read to the end.
const MAX_TOKEN_FILE: u64 = 4096;

fn read_token(path: &Path) -> anyhow::Result<String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_TOKEN_FILE + 1).read_to_string(&mut text))
        .with_context(|| format!("cannot read the API token file {}", path.display()))?;
    if text.len() as u64 > MAX_TOKEN_FILE {
        bail!(
            "the API token file {} is longer than {MAX_TOKEN_FILE} bytes",
            path.display()
        );
    }
    check_token(path, &text)
}

fn check_token(path: &Path, text: &str) -> anyhow::Result<String> {
    let token = text.trim();
    if token.len() < MIN_TOKEN_LEN || !token.bytes().all(|b| b.is_ascii_graphic()) {
        bail!(
            "the API token in {} must be at least {MIN_TOKEN_LEN} printable characters without spaces",
            path.display()
        );
    }
    Ok(token.to_owned())
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines (coloured only on a terminal).
    Text,
    /// One JSON object per line: time, level, target, message and fields.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<LogFormat, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(format!("log format {s:?} is not text or json")),
        }
    }
}

#[derive(Debug)]
pub struct Tls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
    pub required: bool,
}

fn parse_pool(spec: &str) -> anyhow::Result<(PoolName, PathBuf)> {
    let (name, dir) = spec
        .split_once('=')
        .with_context(|| format!("pool {spec:?} is not NAME=DIR (e.g. --pool fast=/srv/nvme)"))?;
    let name = name.parse::<PoolName>()?;
    if dir.is_empty() {
        bail!("pool {name} has an empty directory");
    }
    Ok((name, PathBuf::from(dir)))
}

fn hostname() -> anyhow::Result<NodeName> {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into our buffer.
    if unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } != 0 {
        bail!("cannot read the host name; pass --name");
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let host = String::from_utf8_lossy(&buf[..end]);
    let short = host.split('.').next().unwrap_or_default();
    short
        .parse()
        .with_context(|| format!("host name {host:?} is not a valid node name; pass --name"))
}

impl Options {
    fn read_file(path: &Path) -> anyhow::Result<Options> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("config file {} is invalid", path.display()))
    }

    /// Applies the config file (if any) under the flags, then the defaults.
    pub fn settle(self) -> anyhow::Result<Settings> {
        let file = match &self.config {
            Some(path) => Options::read_file(path)?,
            None => Options::default(),
        };
        self.merge(file, read_token)
    }

    /// Applies `file`'s settings under these, then the defaults; token files are read
    /// with `token`.
    fn merge(
        self,
        file: Options,
        token: impl Fn(&Path) -> anyhow::Result<String>,
    ) -> anyhow::Result<Settings> {
        let name = match self.name.or(file.name) {
            Some(n) => n,
            None => hostname()?,
        };
        let data_dir = self
            .data_dir
            .or(file.data_dir)
            .unwrap_or_else(|| "/var/lib/tandem".into());
        let specs = if self.pools.is_empty() {
            file.pools
        } else {
            self.pools
        };
        let mut pools = specs
            .iter()
            .map(|s| parse_pool(s))
            .collect::<anyhow::Result<Vec<_>>>()?;
        if pools.is_empty() {
            pools.push(("default".parse()?, data_dir.join("pools/default")));
        }
        for (i, (name, _)) in pools.iter().enumerate() {
            if pools[..i].iter().any(|(n, _)| n == name) {
                bail!("pool {name} is given twice");
            }
        }
        let cache = match self.cache.or(file.cache) {
            Some(c) => c.parse::<CacheMode>().map_err(anyhow::Error::msg)?,
            None => CacheMode::None,
        };
        let log_format = match self.log_format.or(file.log_format) {
            Some(f) => f.parse::<LogFormat>().map_err(anyhow::Error::msg)?,
            None => LogFormat::Text,
        };
        let client_ca = self.tls_ca.or(file.tls_ca);
        let tls = match (
            self.tls_cert.or(file.tls_cert),
            self.tls_key.or(file.tls_key),
        ) {
            (Some(cert), Some(key)) => Some(Tls {
                cert,
                key,
                client_ca,
                required: self.tls_required || file.tls_required,
            }),
            (None, None) if self.tls_required || file.tls_required || client_ca.is_some() => {
                bail!("tls-required and tls-ca need tls-cert and tls-key")
            }
            (None, None) => None,
            _ => bail!("tls-cert and tls-key go together"),
        };
        Ok(Settings {
            name,
            nbd_socket: self
                .nbd_socket
                .or(file.nbd_socket)
                .unwrap_or_else(|| data_dir.join("nbd.sock")),
            data_dir,
            pools,
            nbd_listen: self
                .nbd_listen
                .or(file.nbd_listen)
                .unwrap_or(([127, 0, 0, 1], 10809).into()),
            nbd_max_connections: match self.nbd_max_connections.or(file.nbd_max_connections) {
                Some(0) => bail!("nbd-max-connections must be at least 1"),
                Some(n) => n,
                None => 1024,
            },
            api_listen: self
                .api_listen
                .or(file.api_listen)
                .unwrap_or(([127, 0, 0, 1], 3370).into()),
            peer_listen: self
                .peer_listen
                .or(file.peer_listen)
                .unwrap_or(([127, 0, 0, 1], 7700).into()),
            log_level: self
                .log_level
                .or(file.log_level)
                .unwrap_or_else(|| "info".into()),
            log_format,
            cache,
            tls,
            peer_tls: match (
                self.peer_tls_cert.or(file.peer_tls_cert),
                self.peer_tls_key.or(file.peer_tls_key),
                self.peer_tls_ca.or(file.peer_tls_ca),
            ) {
                (Some(cert), Some(key), Some(ca)) => Some([cert, key, ca]),
                (None, None, None) => None,
                _ => bail!("peer-tls-cert, peer-tls-key and peer-tls-ca go together"),
            },
            controller: self.controller || file.controller,
            api_token: match self.api_token_file.or(file.api_token_file) {
                Some(path) if self.controller || file.controller => Some(token(&path)?),
                Some(_) => bail!("api-token-file protects the cluster API: it needs controller"),
                None => None,
            },
            metrics_token: self
                .metrics_token_file
                .or(file.metrics_token_file)
                .map(|path| token(&path))
                .transpose()?,
            restore_db: self.restore_db,
        })
    }
}

/// The fuzz target `config_file` (and the replay of its corpus): `data` as the TOML
/// config file of a node started with no flag but its name, token files read as a
/// valid token: the settings, or why they are refused; never panics, and touches no
/// file.
#[doc(hidden)]
pub fn fuzz_config(data: &[u8]) -> Result<String, String> {
    let text = std::str::from_utf8(data).map_err(|e| e.to_string())?;
    let file: Options = toml::from_str(text).map_err(|e| e.to_string())?;
    let flags = Options {
        name: Some("n1".parse().expect("a valid name")),
        ..Options::default()
    };
    let token = |path: &Path| check_token(path, "a-token-of-sixteen-chars");
    let settings = flags.merge(file, token).map_err(|e| format!("{e:#}"))?;
    Ok(format!("{settings:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_file_and_defaults_fill_the_rest() {
        let dir = std::env::temp_dir().join(format!("tandemd-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("t.toml");
        std::fs::write(&file, "name = \"from-file\"\ndata-dir = \"/d\"\npool = [\"a=/x\", \"b=/y\"]\ncache = \"writeback\"\n").unwrap();
        let o = Options::parse_from([
            "tandemd",
            "--config",
            file.to_str().unwrap(),
            "--name",
            "n1",
        ]);
        let s = o.settle().unwrap();
        assert_eq!(s.name.as_str(), "n1");
        assert_eq!(s.data_dir, PathBuf::from("/d"));
        assert_eq!(s.pools.len(), 2);
        assert_eq!(s.cache, CacheMode::Writeback);
        assert_eq!(s.nbd_socket, PathBuf::from("/d/nbd.sock"));
        assert_eq!(s.api_listen.port(), 3370);
        assert_eq!(s.log_format, LogFormat::Text);
        std::fs::write(&file, "log-format = \"json\"\n").unwrap();
        let s = Options::parse_from(["tandemd", "--config", file.to_str().unwrap()])
            .settle()
            .unwrap();
        assert_eq!(s.log_format, LogFormat::Json);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_settings_are_refused_with_a_reason() {
        for args in [
            &["tandemd", "--name", "x", "--pool", "nodir"][..],
            &["tandemd", "--name", "x", "--pool", "a=/1", "--pool", "a=/2"],
            &["tandemd", "--name", "x", "--cache", "sometimes"],
            &["tandemd", "--name", "x", "--log-format", "xml"],
            &["tandemd", "--name", "x", "--tls-required"],
            &["tandemd", "--name", "x", "--tls-ca", "/ca.pem"],
            &["tandemd", "--name", "x", "--peer-tls-cert", "/c.pem"],
        ] {
            assert!(Options::parse_from(args).settle().is_err(), "{args:?}");
        }
        let dir = std::env::temp_dir().join(format!("tandemd-badconfig-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("t.toml");
        std::fs::write(&file, "nmae = \"typo\"\n").unwrap();
        let err = Options::parse_from(["tandemd", "--config", file.to_str().unwrap()])
            .settle()
            .unwrap_err();
        assert!(format!("{err:#}").contains("nmae"), "{err:#}");
        // A token file that never ends is refused, not read forever.
        std::fs::write(&file, "controller = true\napi-token-file = \"/dev/zero\"\n").unwrap();
        let err =
            Options::parse_from(["tandemd", "--name", "x", "--config", file.to_str().unwrap()])
                .settle()
                .unwrap_err();
        assert!(
            format!("{err:#}").contains("longer than 4096 bytes"),
            "{err:#}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
