//! `tandem sr`: the XCP-ng SRs of the cluster, from any node: their metadata, the
//! volumes behind their VDIs, and repairs of metadata left behind.

use clap::Subcommand;
use tandem_xapi::Context;
use tandem_xapi::tools::{self, SrSummary, SrVolume};

use super::{Output, emit};
use crate::client::{CliError, Client};
use crate::table::Table;

#[derive(Debug, Subcommand)]
pub enum SrCommand {
    /// The SRs: uuid, name, resource group, volumes, hosts attached.
    List,
    /// Everything an SR keeps (JSON): its record, volume metadata, journal, marks.
    Dump { sr: String },
    /// Each volume of an SR with its Tandem volume, replicas, where it is attached and open.
    Volumes { sr: String },
    /// Drop a key of an SR's metadata (e.g. volume/KEY of a volume that no longer exists).
    Forget { sr: String, key: String },
}

/// The plugins' view of the cluster, through a client of the same controller (and the
/// same `TANDEM_TOKEN`); no node API: these tools need none.
fn context(api: &Client) -> Context {
    let client = Client::new(api.base());
    Context::new(
        tandem_xapi::tandem::Tandem::new(std::sync::Arc::new(client), None),
        None,
    )
}

/// A plugin error as the CLI prints errors, its code first.
fn failed(e: tandem_xapi::error::XapiError) -> CliError {
    CliError::Api {
        status: 400,
        error: tandem_api::ApiError {
            message: e.to_string(),
            cause: None,
            correction: None,
        },
    }
}

pub fn run(api: &Client, out: Output, cmd: &SrCommand) -> Result<(), CliError> {
    let ctx = context(api);
    match cmd {
        SrCommand::List => {
            let srs = tools::list(&ctx).map_err(failed)?;
            emit(out, &srs, |s| list_table(s));
        }
        SrCommand::Dump { sr } => {
            let dump = tools::dump(&ctx, sr).map_err(failed)?;
            println!(
                "{}",
                serde_json::to_string_pretty(&dump).expect("serialisable")
            );
        }
        SrCommand::Volumes { sr } => {
            let volumes = tools::volumes(&ctx, sr).map_err(failed)?;
            emit(out, &volumes, |v| volumes_table(v));
        }
        SrCommand::Forget { sr, key } => {
            tools::forget(&ctx, sr, key).map_err(failed)?;
            super::deleted(
                out,
                format!("key {key} of SR {sr}"),
                serde_json::json!({ "sr": sr, "key": key }),
            );
        }
    }
    Ok(())
}

/// What `tandem health` reports about SRs: inconsistencies between their metadata and
/// Tandem, operations cut short; the failure to look, if looking failed.
pub fn findings(api: &Client) -> Vec<tandem_api::Finding> {
    tools::findings(&context(api)).unwrap_or_else(|e| {
        vec![tandem_api::Finding {
            severity: tandem_api::Severity::Warning,
            object: "SRs".into(),
            message: format!("cannot check the XCP-ng SRs' metadata: {e}"),
            correction: "see `tandem sr list`".into(),
        }]
    })
}

fn list_table(srs: &[SrSummary]) -> Table {
    let mut t = Table::new(["UUID", "NAME", "GROUP", "VOLUMES", "HOSTS"]);
    for s in srs {
        t.row([
            s.uuid.clone(),
            s.name.clone(),
            s.group.clone(),
            s.volumes.to_string(),
            s.hosts.join(","),
        ]);
    }
    t
}

fn names(nodes: &[tandem_api::NodeName]) -> String {
    if nodes.is_empty() {
        "-".into()
    } else {
        nodes
            .iter()
            .map(|n| n.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }
}

fn volumes_table(volumes: &[SrVolume]) -> Table {
    let mut t = Table::new([
        "KEY", "NAME", "REPLICAS", "ATTACHED", "OPEN", "ACTIVE", "PROBLEM",
    ]);
    for v in volumes {
        t.row([
            if v.hidden {
                format!("{} (hidden)", v.key)
            } else {
                v.key.clone()
            },
            v.name.clone(),
            names(&v.replicas),
            names(&v.attached),
            names(&v.open),
            v.active.clone().unwrap_or_else(|| "-".into()),
            v.problem.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    t
}
