//! The states users see, in DRBD's words, each with `Display` and `FromStr`.

macro_rules! words {
    ($(#[$doc:meta])* $ty:ident { $($variant:ident),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
        pub enum $ty {
            $($variant),+
        }

        impl $ty {
            pub const ALL: &'static [$ty] = &[$($ty::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($ty::$variant => stringify!($variant)),+
                }
            }
        }

        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $ty {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                Self::ALL
                    .iter()
                    .copied()
                    .find(|v| v.as_str() == s)
                    .ok_or_else(|| format!(concat!("unknown ", stringify!($ty), " {:?}"), s))
            }
        }
    };
}
pub(crate) use words;

words!(
    /// State of a replica's disk.
    DiskState { UpToDate, Inconsistent, Outdated, Diskless, Failed, DUnknown }
);
words!(
    /// Replication state towards one peer.
    ReplicationState { Established, SyncSource, SyncTarget, VerifyS, VerifyT, Off }
);
words!(
    /// Connection state towards one peer.
    ConnectionState { Connected, Connecting, StandAlone }
);
words!(
    /// Role of a node for a volume.
    Role { Primary, Secondary }
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_through_their_names() {
        for d in DiskState::ALL {
            assert_eq!(d.as_str().parse::<DiskState>().unwrap(), *d);
        }
        assert_eq!(
            "SyncTarget".parse::<ReplicationState>().unwrap(),
            ReplicationState::SyncTarget
        );
        assert!("Syncing".parse::<ReplicationState>().is_err());
        assert_eq!(
            serde_json::to_string(&ConnectionState::StandAlone).unwrap(),
            "\"StandAlone\""
        );
    }
}
