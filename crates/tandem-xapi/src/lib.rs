//! XCP-ng storage plugins for Tandem: the SMAPIv3 volume plugin
//! (`org.xen.xapi.storage.tandem`) and datapath plugin (`tandem`) that
//! xapi-storage-script runs, one executable per method.
//!
//! A call is a method name and one JSON object on stdin; the answer is JSON on stdout,
//! or an error object and a non-zero exit ([`error`]). Every call talks to the Tandem
//! controller (cluster state, the SRs' metadata in its key-value stores) and to this
//! host's node (its name, its NBD socket) through [`tandem::Tandem`].
//!
//! - [`sr`]: SR.* (an SR is a resource group plus a key-value store),
//! - [`volume`]: Volume.* (volumes and snapshots, clones, CBT),
//! - [`datapath`]: Datapath.* (attach over NBD, single-writer activation),
//! - [`journal`] and [`lock`]: multi-step operations survive being cut short,
//! - [`install`]: lays the plugins out where xapi-storage-script finds them,
//! - [`tools`]: what operators inspect SRs with.

pub mod cbt;
pub mod datapath;
pub mod error;
pub mod fault;
pub mod idl;
pub mod install;
pub mod journal;
pub mod lock;
pub mod meta;
pub mod sr;
pub mod tandem;
pub mod tools;
pub mod volume;

use std::cell::OnceCell;

use serde_json::{Value, json};
use tandem_api::NodeInfo;

use crate::error::{Kind, XapiError};
use crate::idl::params;
use crate::tandem::Tandem;

/// The URI scheme of Tandem volumes, and the datapath plugin's name.
pub const SCHEME: &str = "tandem";
/// The volume plugin's directory: xapi takes the SR type from its last word.
pub const VOLUME_PLUGIN: &str = "org.xen.xapi.storage.tandem";
/// The xapi-storage API version the plugins speak.
pub const API_VERSION: &str = "5.0";
/// How long a call may run: xapi waits for ever, so the plugin bounds itself.
pub const CALL_DEADLINE: std::time::Duration = std::time::Duration::from_secs(15 * 60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plugin {
    Volume,
    Datapath,
}

/// Methods of each plugin: the files [`install`] lays out. xapi-storage-script looks a
/// method's file up ignoring case, so `Plugin.Query` answers its `Plugin.query`.
pub const VOLUME_METHODS: &[&str] = &[
    "Plugin.Query",
    "Plugin.diagnostics",
    "Plugin.ls",
    "SR.create",
    "SR.attach",
    "SR.detach",
    "SR.destroy",
    "SR.stat",
    "SR.ls",
    "SR.probe",
    "SR.set_name",
    "SR.set_description",
    "Volume.create",
    "Volume.destroy",
    "Volume.stat",
    "Volume.set",
    "Volume.unset",
    "Volume.set_name",
    "Volume.set_description",
    "Volume.resize",
    "Volume.snapshot",
    "Volume.clone",
    "Volume.revert",
    "Volume.enable_cbt",
    "Volume.disable_cbt",
    "Volume.list_changed_blocks",
    "Volume.data_destroy",
];
pub const DATAPATH_METHODS: &[&str] = &[
    "Plugin.Query",
    "Plugin.diagnostics",
    "Datapath.attach",
    "Datapath.activate",
    "Datapath.deactivate",
    "Datapath.detach",
];

/// What stops a call that must not go on (its SR lock lost): set by the command that
/// runs the call, to answer xapi before it exits.
static FATAL: std::sync::OnceLock<Box<dyn Fn(XapiError) + Send + Sync>> =
    std::sync::OnceLock::new();

/// Sets what [`fatal`] does (once per process; later calls are ignored).
pub fn on_fatal(handler: Box<dyn Fn(XapiError) + Send + Sync>) {
    let _ = FATAL.set(handler);
}

/// Stops the call at once with `error`, from any thread: the handler set with
/// [`on_fatal`], else the error object on stdout and exit status 1.
pub fn fatal(error: XapiError) -> ! {
    match FATAL.get() {
        Some(handler) => handler(error),
        None => println!("{}", error.to_json()),
    }
    std::process::exit(1)
}

/// What a call works with: the cluster, and this host as xapi names it.
pub struct Context {
    pub tandem: Tandem,
    /// xapi's uuid of this host (what `Activated_on_another_host` names); the node's
    /// name when unknown.
    host_uuid: Option<String>,
    node: OnceCell<NodeInfo>,
}

impl Context {
    pub fn new(tandem: Tandem, host_uuid: Option<String>) -> Context {
        Context {
            tandem,
            host_uuid,
            node: OnceCell::new(),
        }
    }

    /// This host's node (asked once per call).
    pub fn node(&self) -> Result<&NodeInfo, XapiError> {
        if let Some(n) = self.node.get() {
            return Ok(n);
        }
        let n = self.tandem.node()?;
        Ok(self.node.get_or_init(|| n))
    }

    pub fn host(&self) -> Result<String, XapiError> {
        match &self.host_uuid {
            Some(h) => Ok(h.clone()),
            None => Ok(self.node()?.name.to_string()),
        }
    }
}

/// Runs one call: `method` as xapi names it (any case), `input` the JSON on stdin.
pub fn call(ctx: &Context, plugin: Plugin, method: &str, input: &str) -> Result<Value, XapiError> {
    let methods = match plugin {
        Plugin::Volume => VOLUME_METHODS,
        Plugin::Datapath => DATAPATH_METHODS,
    };
    let Some(&method) = methods.iter().find(|m| m.eq_ignore_ascii_case(method)) else {
        return Err(XapiError::new(Kind::Unimplemented, [method.to_owned()]));
    };
    let (_dbg, input) = idl::split_dbg(input)?;
    let m = method;
    match method {
        "Plugin.Query" => {
            params::<idl::Nothing>(m, &input)?;
            Ok(query(plugin))
        }
        "Plugin.diagnostics" => {
            params::<idl::Nothing>(m, &input)?;
            diagnostics(ctx)
        }
        "Plugin.ls" => {
            params::<idl::Nothing>(m, &input)?;
            sr::attached_here(ctx)
        }
        "SR.create" => sr::create(ctx, params(m, &input)?),
        "SR.attach" => sr::attach(ctx, params(m, &input)?),
        "SR.detach" => sr::detach(ctx, params(m, &input)?),
        "SR.destroy" => sr::destroy(ctx, params(m, &input)?),
        "SR.stat" => sr::stat(ctx, params(m, &input)?),
        "SR.ls" => sr::ls(ctx, params(m, &input)?),
        "SR.probe" => sr::probe(ctx, params(m, &input)?),
        "SR.set_name" => sr::set_name(ctx, params(m, &input)?),
        "SR.set_description" => sr::set_description(ctx, params(m, &input)?),
        "Volume.create" => volume::create(ctx, params(m, &input)?),
        "Volume.destroy" => volume::destroy(ctx, params(m, &input)?),
        "Volume.stat" => volume::stat(ctx, params(m, &input)?),
        "Volume.set" => volume::set(ctx, params(m, &input)?),
        "Volume.unset" => volume::unset(ctx, params(m, &input)?),
        "Volume.set_name" => volume::set_name(ctx, params(m, &input)?),
        "Volume.set_description" => volume::set_description(ctx, params(m, &input)?),
        "Volume.resize" => volume::resize(ctx, params(m, &input)?),
        "Volume.snapshot" => volume::snapshot(ctx, params(m, &input)?),
        "Volume.clone" => volume::clone(ctx, params(m, &input)?),
        "Volume.revert" => volume::revert(ctx, params(m, &input)?),
        "Volume.enable_cbt" => volume::enable_cbt(ctx, params(m, &input)?),
        "Volume.disable_cbt" => volume::disable_cbt(ctx, params(m, &input)?),
        "Volume.list_changed_blocks" => volume::list_changed_blocks(ctx, params(m, &input)?),
        "Volume.data_destroy" => volume::data_destroy(ctx, params(m, &input)?),
        "Datapath.attach" => datapath::attach(ctx, params(m, &input)?),
        "Datapath.activate" => datapath::activate(ctx, params(m, &input)?),
        "Datapath.deactivate" => datapath::deactivate(ctx, params(m, &input)?),
        "Datapath.detach" => datapath::detach(ctx, params(m, &input)?),
        other => unreachable!("{other} is listed among the methods but not dispatched"),
    }
}

/// `Plugin.Query`: what the plugin is and does. Features xapi-storage-script cannot
/// tell from the files present are declared here.
pub fn query(plugin: Plugin) -> Value {
    let (name, description, features, configuration) = match plugin {
        Plugin::Volume => (
            "tandem",
            "Tandem: volumes replicated synchronously across the hosts' disks",
            vec![
                "SR_ATTACH",
                "SR_DETACH",
                "SR_CREATE",
                "SR_DELETE",
                "SR_SCAN",
                "SR_UPDATE",
                "SR_PROBE",
                "VDI_CREATE",
                "VDI_DELETE",
                "VDI_ATTACH",
                "VDI_DETACH",
                "VDI_ACTIVATE",
                "VDI_DEACTIVATE",
                "VDI_UPDATE",
                "VDI_CLONE",
                "VDI_SNAPSHOT",
                "VDI_RESIZE",
                "VDI_REVERT",
                "VDI_CONFIG_CBT",
                "THIN_PROVISIONING",
            ],
            sr::CONFIGURATION
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        ),
        Plugin::Datapath => (
            SCHEME,
            "Tandem volumes over NBD from this host's tandemd",
            Vec::new(),
            idl::Dict::new(),
        ),
    };
    json!({
        "plugin": name,
        "name": name,
        "description": description,
        "vendor": "Tandem",
        "copyright": "Apache-2.0",
        "version": env!("CARGO_PKG_VERSION"),
        "required_api_version": API_VERSION,
        "features": features,
        "configuration": configuration,
        "required_cluster_stack": [],
    })
}

/// `Plugin.diagnostics`: the node and the controller as this host reaches them.
fn diagnostics(ctx: &Context) -> Result<Value, XapiError> {
    let node = ctx.node()?;
    let srs = sr::all(ctx)?;
    let mut text = format!(
        "node {} (tandemd {}), NBD socket {}\n",
        node.name,
        node.version,
        node.nbd_socket.as_deref().unwrap_or("?")
    );
    for r in srs {
        text.push_str(&format!("SR {} {:?}: group {}\n", r.uuid, r.name, r.group));
    }
    Ok(json!(text))
}
