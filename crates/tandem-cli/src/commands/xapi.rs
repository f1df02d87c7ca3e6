//! `tandem xapi`: the XCP-ng storage plugins. `install` lays their entry points out for
//! xapi-storage-script; `call` is what each entry point runs.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use clap::{Args, Subcommand, ValueEnum};
use tandem_xapi::error::{Kind, XapiError};
use tandem_xapi::{Context, Plugin};

use crate::client::Client;

/// The node API a host's `tandemd` serves by default.
const DEFAULT_API: &str = "http://127.0.0.1:3370";
/// Where XCP-ng keeps the host's identity (`INSTALLATION_UUID=...`).
const INVENTORY: &str = "/etc/xensource-inventory";

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum PluginArg {
    Volume,
    Datapath,
}

/// How a plugin call reaches Tandem from this host.
#[derive(Debug, Args)]
pub struct HostArgs {
    /// This host's tandemd API.
    #[arg(long, default_value = DEFAULT_API)]
    api: String,
    /// File holding the cluster API's access token, if it requires one.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// xapi's uuid of this host [install's default: INSTALLATION_UUID of
    /// /etc/xensource-inventory; else the node's name].
    #[arg(long)]
    host_uuid: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum XapiCommand {
    /// Lay out the volume plugin (org.xen.xapi.storage.tandem) and the datapath plugin
    /// (tandem) under xapi-storage-script's root, bound to this host's tandemd.
    Install {
        /// xapi-storage-script's plugin root.
        #[arg(long, default_value = "/usr/libexec/xapi-storage-script")]
        root: PathBuf,
        #[command(flatten)]
        host: HostArgs,
    },
    /// Run one plugin call as xapi-storage-script makes it: parameters as JSON on stdin,
    /// the result (or an error object, exit 1) as JSON on stdout.
    Call {
        #[arg(long, value_enum)]
        plugin: PluginArg,
        #[command(flatten)]
        host: HostArgs,
        /// The method, e.g. Volume.create.
        method: String,
        /// xapi-storage-script's flag: input and output are JSON (always so here).
        #[arg(long)]
        json: bool,
    },
}

/// The controller's client with the token of `token_file` (else `TANDEM_TOKEN`).
fn controller(base: &str, token_file: Option<&PathBuf>) -> anyhow::Result<Client> {
    let client = Client::new(base);
    Ok(match token_file {
        None => client,
        Some(path) => {
            let token = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("reading the token file {}: {e}", path.display()))?;
            client.with_token(Some(token.trim().to_owned()))
        }
    })
}

fn host_uuid_of_inventory() -> Option<String> {
    let text = std::fs::read_to_string(INVENTORY).ok()?;
    text.lines().find_map(|l| {
        l.strip_prefix("INSTALLATION_UUID=")
            .map(|v| v.trim().trim_matches('\'').to_owned())
    })
}

pub fn run(controller_url: &str, cmd: &XapiCommand) -> ExitCode {
    match cmd {
        XapiCommand::Install { root, host } => match install(controller_url, root, host) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
        XapiCommand::Call {
            plugin,
            host,
            method,
            json: _,
        } => call(controller_url, *plugin, host, method),
    }
}

fn install(controller_url: &str, root: &std::path::Path, host: &HostArgs) -> anyhow::Result<()> {
    // Checked now rather than at the first VM start.
    controller(controller_url, host.token_file.as_ref())?;
    let program = std::env::current_exe()?;
    let mut options = vec![
        "--controller".to_owned(),
        controller_url.to_owned(),
        "--api".to_owned(),
        host.api.clone(),
    ];
    if let Some(f) = &host.token_file {
        options.extend(["--token-file".to_owned(), f.display().to_string()]);
    }
    if let Some(h) = host.host_uuid.clone().or_else(host_uuid_of_inventory) {
        options.extend(["--host-uuid".to_owned(), h]);
    }
    let dirs =
        tandem_xapi::install::install(root, &tandem_xapi::install::Command { program, options })
            .map_err(|e| anyhow::anyhow!("writing the plugins under {}: {e}", root.display()))?;
    for d in dirs {
        println!("installed {}", d.display());
    }
    Ok(())
}

/// Prints the answer once, the call's or the deadline's, whichever comes first; the
/// exit code when this one was printed.
fn answer(printed: &Mutex<bool>, result: Result<serde_json::Value, XapiError>) -> Option<ExitCode> {
    let mut done = printed.lock().unwrap_or_else(|e| e.into_inner());
    if *done {
        return None;
    }
    *done = true;
    Some(match result {
        Ok(value) => {
            println!("{value}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tandem xapi: {e}");
            println!("{}", e.to_json());
            ExitCode::FAILURE
        }
    })
}

fn call(controller_url: &str, plugin: PluginArg, host: &HostArgs, method: &str) -> ExitCode {
    let printed = Arc::new(Mutex::new(false));
    let fatal = printed.clone();
    tandem_xapi::on_fatal(Box::new(move |e| {
        answer(&fatal, Err(e));
    }));
    let watchdog = printed.clone();
    let name = method.to_owned();
    std::thread::spawn(move || {
        std::thread::sleep(tandem_xapi::CALL_DEADLINE);
        let late = XapiError::new(
            Kind::BackendFailure,
            [format!(
                "{name} did not finish within {} s: see `tandem health` and the tandemd logs",
                tandem_xapi::CALL_DEADLINE.as_secs()
            )],
        );
        if answer(&watchdog, Err(late)).is_some() {
            std::process::exit(1);
        }
    });
    // The node API needs no token for what the plugins ask it (who it is).
    let node = Client::new(&host.api).with_token(None);
    // Nothing the call touched is used after a panic but to report it.
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut input = String::new();
        std::io::stdin()
            .read_to_string(&mut input)
            .map_err(|e| XapiError::invalid(format!("reading the call's input: {e}")))?;
        let controller = controller(controller_url, host.token_file.as_ref())
            .map_err(|e| XapiError::backend(format!("{e:#}")))?;
        let tandem = tandem_xapi::tandem::Tandem::new(Arc::new(controller), Some(Arc::new(node)));
        let ctx = Context::new(tandem, host.host_uuid.clone());
        let plugin = match plugin {
            PluginArg::Volume => Plugin::Volume,
            PluginArg::Datapath => Plugin::Datapath,
        };
        tandem_xapi::call(&ctx, plugin, method, &input)
    }))
    // xapi shows what is on stdout: a panic is an error object like any other.
    .unwrap_or_else(|panic| {
        let why = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("unknown");
        Err(XapiError::backend(format!(
            "internal error in tandem xapi call: {why}"
        )))
    });
    answer(&printed, result).unwrap_or(ExitCode::FAILURE)
}
