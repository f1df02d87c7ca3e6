//! Identities that cross hosts: volumes, clusters and participants' node ids.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

macro_rules! id128 {
    ($(#[$doc:meta])* $ty:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $ty(pub [u8; 16]);

        impl $ty {
            pub fn random() -> Self {
                let mut id = [0u8; 16];
                getrandom::fill(&mut id).expect("the OS random source is available");
                $ty(id)
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
            }
        }

        impl FromStr for $ty {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                let bad = || format!(concat!($what, " id {:?} is not 32 hex digits"), s);
                if s.len() != 32 || !s.is_ascii() {
                    return Err(bad());
                }
                let mut id = [0u8; 16];
                for (i, b) in id.iter_mut().enumerate() {
                    *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
                }
                Ok($ty(id))
            }
        }

        impl TryFrom<String> for $ty {
            type Error = String;
            fn try_from(s: String) -> Result<Self, String> {
                s.parse()
            }
        }

        impl From<$ty> for String {
            fn from(id: $ty) -> String {
                id.to_string()
            }
        }
    };
}

id128!(
    /// A volume's identity, the same on every replica of it.
    VolumeId,
    "volume"
);
id128!(
    /// A cluster's identity: peers of different clusters never talk.
    ClusterId,
    "cluster"
);

/// A participant's node id in a volume, 0..=31.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(try_from = "u8", into = "u8")]
pub struct NodeId(u8);

impl NodeId {
    pub const MAX: u8 = 31;

    pub fn new(id: u8) -> Option<Self> {
        (id <= Self::MAX).then_some(NodeId(id))
    }

    pub fn get(self) -> u8 {
        self.0
    }
}

impl TryFrom<u8> for NodeId {
    type Error = String;
    fn try_from(id: u8) -> Result<Self, String> {
        NodeId::new(id).ok_or_else(|| format!("node id {id} is above {}", NodeId::MAX))
    }
}

impl From<NodeId> for u8 {
    fn from(id: NodeId) -> u8 {
        id.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_as_hex() {
        let id = VolumeId::random();
        assert_eq!(id.to_string().parse::<VolumeId>().unwrap(), id);
        assert!("xyz".parse::<VolumeId>().is_err());
        assert!(
            "0123456789abcdef0123456789abcdeg"
                .parse::<ClusterId>()
                .is_err()
        );
        assert!(serde_json::from_str::<NodeId>("32").is_err());
        assert_eq!(serde_json::from_str::<NodeId>("31").unwrap().get(), 31);
    }
}
