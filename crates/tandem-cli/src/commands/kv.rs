//! `tandem kv`: key-value stores, for tools that keep their own state in the cluster
//! (a storage driver's volume names, for instance).

use std::fmt;
use std::str::FromStr;

use clap::Subcommand;
use tandem_api::{KvEntry, KvValue, StoreName, check_kv_key, encode_path};

use super::{Output, deleted, emit};
use crate::client::{CliError, Client};
use crate::table::Table;

#[derive(Debug, Subcommand)]
pub enum KvCommand {
    /// List the keys and values of a store.
    List { store: StoreName },
    /// Print the value of a key.
    Get { store: StoreName, key: KvKey },
    /// Set a key to a value.
    Set {
        store: StoreName,
        key: KvKey,
        #[arg(allow_hyphen_values = true)]
        value: String,
    },
    /// Delete a key.
    Delete { store: StoreName, key: KvKey },
}

/// A key, checked before it is sent: a path like `sr/vdi/NAME`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvKey(String);

impl FromStr for KvKey {
    type Err = String;
    fn from_str(key: &str) -> Result<Self, String> {
        check_kv_key(key).map_err(|why| {
            format!("{why} (a key is a path like sr/vdi/NAME: no spaces, no empty segment)")
        })?;
        Ok(KvKey(key.to_owned()))
    }
}

impl fmt::Display for KvKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn key_path(store: &StoreName, key: &KvKey) -> String {
    format!("/v1/kv/{store}/{}", encode_path(&key.0))
}

pub fn run(api: &Client, out: Output, cmd: &KvCommand) -> Result<(), CliError> {
    match cmd {
        KvCommand::List { store } => {
            let entries: Vec<KvEntry> = api.get(&format!("/v1/kv/{store}"))?;
            emit(out, &entries, |e| entry_table(e));
        }
        KvCommand::Get { store, key } => {
            let entry: KvEntry = api.get(&key_path(store, key))?;
            emit(out, &entry, |e| format!("{}\n", e.value));
        }
        KvCommand::Set { store, key, value } => {
            let req = KvValue {
                value: value.clone(),
                only_if: None,
            };
            let entry: KvEntry = api.send("PUT", &key_path(store, key), &req)?;
            emit(out, &entry, |e| entry_table(std::slice::from_ref(e)));
        }
        KvCommand::Delete { store, key } => {
            api.delete(&key_path(store, key))?;
            deleted(
                out,
                format!("key {key} of store {store}"),
                serde_json::json!({ "store": store, "key": key.0 }),
            );
        }
    }
    Ok(())
}

fn entry_table(entries: &[KvEntry]) -> Table {
    let mut t = Table::new(["KEY", "VALUE"]);
    for e in entries {
        t.row([e.key.clone(), one_line(&e.value)]);
    }
    t
}

/// A value on one table line: control characters (newlines) escaped.
fn one_line(value: &str) -> String {
    value
        .chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_become_url_paths_under_their_store() {
        let store: StoreName = "xcp-sr".parse().unwrap();
        let key: KvKey = "sr/vdi/a?b".parse().unwrap();
        assert_eq!(key_path(&store, &key), "/v1/kv/xcp-sr/sr/vdi/a%3Fb");
    }

    #[test]
    fn multi_line_values_stay_on_one_table_line() {
        let entry = KvEntry {
            store: "s".parse().unwrap(),
            key: "k".into(),
            value: "a\nb".into(),
        };
        assert_eq!(
            entry_table(&[entry]).to_string(),
            "KEY  VALUE\nk    a\\nb\n"
        );
    }
}
