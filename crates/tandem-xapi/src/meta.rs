//! What an SR keeps in its key-value store on the controller, reachable from every host:
//!
//! | key | value |
//! |---|---|
//! | `sr` | the SR: name, description, resource group ([`SrRecord`]) |
//! | `volume/KEY` | a volume's or snapshot's metadata ([`VolumeMeta`]) |
//! | `journal/ID` | an operation under way ([`crate::journal::Intent`]) |
//! | `lock` | who holds the SR for a multi-step operation ([`crate::lock`]) |
//! | `host/NODE` | the SR is attached on that host |
//! | `attached/NODE/KEY` | the volume is attached on that node by a datapath call |
//! | `active/KEY` | the host (and domain) that has the volume activated for writing |

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use tandem_api::{GroupName, NodeName, SnapshotName, VolumeName};

use crate::error::XapiError;
use crate::idl::Dict;

pub const SR_KEY: &str = "sr";
pub const LOCK_KEY: &str = "lock";
pub const VOLUME_PREFIX: &str = "volume/";
pub const JOURNAL_PREFIX: &str = "journal/";

pub fn volume_key(key: &Key) -> String {
    format!("{VOLUME_PREFIX}{key}")
}

const HOST_PREFIX: &str = "host/";
const ATTACHED_PREFIX: &str = "attached/";
/// Stores of SRs are named `sr-UUID`.
pub const STORE_PREFIX: &str = "sr-";

pub fn host_key(node: &NodeName) -> String {
    format!("{HOST_PREFIX}{node}")
}

/// The node of a `host/NODE` key.
pub fn host_of(store_key: &str) -> Option<&str> {
    store_key.strip_prefix(HOST_PREFIX)
}

pub fn attached_key(node: &NodeName, key: &Key) -> String {
    format!("{ATTACHED_PREFIX}{node}/{key}")
}

/// The node and the volume key of an `attached/NODE/KEY` key.
pub fn attachment_of(store_key: &str) -> Option<(&str, &str)> {
    store_key.strip_prefix(ATTACHED_PREFIX)?.split_once('/')
}

pub fn active_key(key: &Key) -> String {
    format!("active/{key}")
}

/// Who has a volume activated for writing: the value of `active/KEY`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Activation {
    /// xapi's uuid of the host (what `Activated_on_another_host` names).
    pub host: String,
    /// The Tandem node on that host.
    pub node: String,
    /// The domain xapi activated it for.
    pub domain: String,
}

impl Activation {
    pub fn parse(value: &str) -> Option<Activation> {
        let mut words = value.splitn(3, ' ');
        Some(Activation {
            host: words.next()?.to_owned(),
            node: words.next()?.to_owned(),
            domain: words.next()?.to_owned(),
        })
    }
}

impl fmt::Display for Activation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {}", self.host, self.node, self.domain)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct SrRecord {
    pub uuid: String,
    pub name: String,
    pub description: String,
    /// The resource group its volumes are created in.
    pub group: GroupName,
    /// The group was made for this SR (and goes with it).
    pub own_group: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct VolumeMeta {
    pub name: String,
    pub description: String,
    /// What xapi sets with `Volume.set` (`vdi-type`, `is_a_snapshot`, `snapshot_of`...).
    #[serde(default)]
    pub keys: Dict,
    #[serde(default)]
    pub cbt_enabled: bool,
    /// Destroyed by xapi while snapshots of it remain: out of `SR.ls`, its Tandem volume
    /// kept until the last of them goes.
    #[serde(default)]
    pub hidden: bool,
    /// A destruction has begun: no new attachment, and the journal completes it (or
    /// gives it up if the volume turns out to be in use).
    #[serde(default)]
    pub destroying: bool,
    /// `Volume.data_destroy`d: a snapshot kept only for changed-block tracking. Its
    /// bytes can no longer be read, cloned or reverted to; they are what Tandem finds
    /// the changes from, so they stay until the volume is destroyed.
    #[serde(default)]
    pub data_destroyed: bool,
}

impl VolumeMeta {
    /// Refuses what needs the volume's bytes once they are destroyed.
    pub fn has_data(&self, key: &Key) -> Result<(), XapiError> {
        if self.data_destroyed {
            return Err(XapiError::invalid(format!(
                "the data of {key} was destroyed (Volume.data_destroy): only its changed blocks remain"
            )));
        }
        Ok(())
    }
}

/// A volume's key: a Tandem volume, or one of its snapshots (`VOLUME@SNAPSHOT`, which
/// is also the snapshot's NBD export name).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Key {
    Volume(VolumeName),
    Snapshot(VolumeName, SnapshotName),
}

impl Key {
    pub fn volume(&self) -> &VolumeName {
        match self {
            Key::Volume(v) | Key::Snapshot(v, _) => v,
        }
    }
}

impl FromStr for Key {
    type Err = XapiError;
    fn from_str(s: &str) -> Result<Key, XapiError> {
        let bad = |e: tandem_api::NameError| {
            XapiError::invalid(format!("{s:?} is not a volume key of this SR: {e}"))
        };
        match s.split_once('@') {
            None => Ok(Key::Volume(s.parse().map_err(bad)?)),
            Some((v, snap)) => Ok(Key::Snapshot(
                v.parse().map_err(bad)?,
                snap.parse().map_err(bad)?,
            )),
        }
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Key::Volume(v) => write!(f, "{v}"),
            Key::Snapshot(v, s) => write!(f, "{v}@{s}"),
        }
    }
}

/// 12 random hex digits.
pub fn random_hex() -> String {
    let mut bytes = [0u8; 6];
    getrandom::fill(&mut bytes).expect("the OS random source is available");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A fresh name with a random suffix: `PREFIX-` and 12 hex digits.
pub fn fresh<T: FromStr>(prefix: &str) -> T
where
    T::Err: fmt::Debug,
{
    format!("{prefix}-{}", random_hex())
        .parse()
        .expect("a valid name")
}

/// The URI a volume's datapath is reached by: `tandem://SR/KEY`.
pub fn uri(sr: &str, key: &Key) -> String {
    format!("{}://{sr}/{key}", crate::SCHEME)
}

/// The SR and key of a `tandem://SR/KEY` URI.
pub fn parse_uri(uri: &str) -> Result<(String, Key), XapiError> {
    let bad = || {
        XapiError::invalid(format!(
            "{uri:?} is not a Tandem volume URI ({}://SR/KEY)",
            crate::SCHEME
        ))
    };
    let rest = uri
        .strip_prefix(crate::SCHEME)
        .and_then(|r| r.strip_prefix("://"))
        .ok_or_else(bad)?;
    let (sr, key) = rest.split_once('/').ok_or_else(bad)?;
    if sr.is_empty() {
        return Err(bad());
    }
    Ok((sr.to_owned(), key.parse()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_uris_round_trip() {
        let k: Key = "vdi-1@snap-2".parse().unwrap();
        assert_eq!(
            k,
            Key::Snapshot("vdi-1".parse().unwrap(), "snap-2".parse().unwrap())
        );
        assert_eq!(parse_uri(&uri("u-1", &k)).unwrap(), ("u-1".to_owned(), k));
        let v: Key = "vdi-1".parse().unwrap();
        assert_eq!(v.to_string(), "vdi-1");
        for bad in ["", "a@", "@b", "a b", "a/b"] {
            assert!(bad.parse::<Key>().is_err(), "{bad:?}");
        }
        for bad in ["nbd://x/y", "tandem://", "tandem:///k", "tandem://sr"] {
            assert!(parse_uri(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn marks_parse_back() {
        let a = Activation {
            host: "h-1".into(),
            node: "n2".into(),
            domain: "u0_x y".into(),
        };
        assert_eq!(Activation::parse(&a.to_string()), Some(a));
        assert_eq!(Activation::parse("h-1 n2"), None);
        assert_eq!(
            attachment_of("attached/n1/vdi-1@s-2"),
            Some(("n1", "vdi-1@s-2"))
        );
        assert_eq!(host_of(&host_key(&"n3".parse().unwrap())), Some("n3"));
    }

    #[test]
    fn fresh_names_differ() {
        let a: VolumeName = fresh("vdi");
        let b: VolumeName = fresh("vdi");
        assert_ne!(a, b);
        assert!(a.as_str().starts_with("vdi-") && a.as_str().len() == 16);
    }
}
