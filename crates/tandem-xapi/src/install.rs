//! Lays the plugins out under xapi-storage-script's root: `volume/<VOLUME_PLUGIN>/` and
//! `datapath/<SCHEME>/`, one small Python file per method (xapi runs them through
//! Python when it traces calls), each handing the call to the `tandem` command.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::{DATAPATH_METHODS, Plugin, SCHEME, VOLUME_METHODS, VOLUME_PLUGIN};

/// What every entry point runs: the command and its options, the method appended.
pub struct Command {
    pub program: PathBuf,
    /// Options of `tandem xapi call` (API addresses, token file, host uuid).
    pub options: Vec<String>,
}

fn entry_point(command: &Command, plugin: Plugin) -> String {
    let mut argv = vec![
        command.program.display().to_string(),
        "xapi".to_owned(),
        "call".to_owned(),
        "--plugin".to_owned(),
        match plugin {
            Plugin::Volume => "volume",
            Plugin::Datapath => "datapath",
        }
        .to_owned(),
    ];
    argv.extend(command.options.iter().cloned());
    // A JSON list of strings is a Python list literal too.
    let argv = serde_json::to_string(&argv).expect("serialisable");
    format!(
        r#"#!/usr/bin/python3
"""Tandem storage plugin entry point, written by `tandem xapi install`: runs the
method this file is named after with the tandem command."""
import json
import os
import sys

ARGV = {argv}
try:
    os.execv(ARGV[0], ARGV + [os.path.basename(sys.argv[0])] + sys.argv[1:])
except OSError as e:
    # xapi shows only what is on stdout: an error object, as the command would print.
    error = "cannot run %s: %s (run `tandem xapi install` again)" % (ARGV[0], e)
    print(json.dumps({{"code": "SR_BACKEND_FAILURE", "params": [error],
                      "backtrace": {{"error": error, "files": [], "lines": []}}}}))
    sys.exit(1)
"#
    )
}

/// Writes both plugins (replacing earlier ones); the directories written.
pub fn install(root: &Path, command: &Command) -> io::Result<Vec<PathBuf>> {
    let mut dirs = Vec::new();
    for (plugin, dir, methods) in [
        (
            Plugin::Volume,
            root.join("volume").join(VOLUME_PLUGIN),
            VOLUME_METHODS,
        ),
        (
            Plugin::Datapath,
            root.join("datapath").join(SCHEME),
            DATAPATH_METHODS,
        ),
    ] {
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        std::fs::create_dir_all(&dir)?;
        let text = entry_point(command, plugin);
        for method in methods {
            let path = dir.join(method);
            std::fs::write(&path, &text)?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
        }
        dirs.push(dir);
    }
    Ok(dirs)
}
