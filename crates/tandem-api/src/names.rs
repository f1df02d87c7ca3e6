//! Names that users type and that end up in file names and NBD export names.
//!
//! One rule for all of them keeps them safe as path components and as URL segments:
//! 1..=64 characters from `[A-Za-z0-9_.-]`, not starting with `.` or `-`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

const MAX_LEN: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("{kind} name is empty")]
    Empty { kind: &'static str },
    #[error("{kind} name {name:?} is longer than {MAX_LEN} characters")]
    TooLong { kind: &'static str, name: String },
    #[error(
        "{kind} name {name:?} may only contain letters, digits, '_', '.', '-' and must not start with '.' or '-'"
    )]
    BadCharacter { kind: &'static str, name: String },
}

fn validate(kind: &'static str, name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty { kind });
    }
    if name.len() > MAX_LEN {
        return Err(NameError::TooLong {
            kind,
            name: name.to_owned(),
        });
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-');
    if !name.chars().all(allowed) || name.starts_with(['.', '-']) {
        return Err(NameError::BadCharacter {
            kind,
            name: name.to_owned(),
        });
    }
    Ok(())
}

macro_rules! name_type {
    ($(#[$doc:meta])* $ty:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $ty(String);

        impl $ty {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $ty {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, NameError> {
                validate($kind, s)?;
                Ok(Self(s.to_owned()))
            }
        }

        impl TryFrom<String> for $ty {
            type Error = NameError;
            fn try_from(s: String) -> Result<Self, NameError> {
                validate($kind, &s)?;
                Ok(Self(s))
            }
        }

        impl From<$ty> for String {
            fn from(n: $ty) -> String {
                n.0
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

name_type!(
    /// A volume's name: also its NBD export name and the stem of its files in a pool.
    VolumeName,
    "volume"
);
name_type!(
    /// A snapshot's name, unique among its volume's snapshots. Its NBD export is
    /// `VOLUME@SNAPSHOT`: `@` is in neither name, so the split is unambiguous.
    SnapshotName,
    "snapshot"
);
name_type!(
    /// A storage pool's name, unique on its node.
    PoolName,
    "pool"
);
name_type!(
    /// A node's name, unique in the cluster.
    NodeName,
    "node"
);
name_type!(
    /// A resource group's name: the placement rules volumes are created with.
    GroupName,
    "group"
);
name_type!(
    /// A key-value store's name.
    StoreName,
    "store"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_usual_names() {
        for n in ["vm1", "disk_0.raw", "a-b", "A", &"x".repeat(64)] {
            assert!(n.parse::<VolumeName>().is_ok(), "{n}");
        }
    }

    #[test]
    fn rejects_names_unsafe_as_paths_or_urls() {
        for n in [
            "",
            ".hidden",
            "-x",
            "a/b",
            "..",
            "a b",
            "é",
            &"x".repeat(65),
        ] {
            assert!(n.parse::<VolumeName>().is_err(), "{n:?}");
        }
    }

    #[test]
    fn json_rejects_invalid_names() {
        assert!(serde_json::from_str::<PoolName>("\"../etc\"").is_err());
        let n: PoolName = serde_json::from_str("\"fast\"").unwrap();
        assert_eq!(n.as_str(), "fast");
    }
}
