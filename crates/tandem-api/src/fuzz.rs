//! The fuzz target `api_body` (and the replay of its corpus): API request bodies as
//! the node and the cluster API decode them.

use serde::de::DeserializeOwned;

use crate::{
    ChangeReplicas, CloneSnapshot, CreateClusterVolume, CreateNode, CreatePool, CreateSnapshot,
    CreateVolume, Group, JoinCluster, KvValue, NodeName, OnNode, ResizeVolume, RollBack,
    UpdateVolume, VolumeSpec,
};

fn decode<T: DeserializeOwned + std::fmt::Debug>(json: &[u8]) -> Result<String, String> {
    serde_json::from_slice::<T>(json)
        .map(|v| format!("{v:?}"))
        .map_err(|e| e.to_string())
}

/// The first byte picks a body type, the rest is its JSON: decoded (a volume spec also
/// checked, as a node checks one given to it). What was decoded, or why it is refused;
/// never panics.
#[doc(hidden)]
pub fn fuzz_body(data: &[u8]) -> Result<String, String> {
    let Some((&pick, json)) = data.split_first() else {
        return Err("empty".into());
    };
    match pick % 15 {
        0 => {
            let spec: VolumeSpec = serde_json::from_slice(json).map_err(|e| e.to_string())?;
            let me: NodeName = "n1".parse().expect("a valid name");
            spec.validate(&me)?;
            Ok(format!("{spec:?}"))
        }
        1 => decode::<CreateClusterVolume>(json),
        2 => decode::<KvValue>(json),
        3 => decode::<Group>(json),
        4 => decode::<ChangeReplicas>(json),
        5 => decode::<CreateVolume>(json),
        6 => decode::<UpdateVolume>(json),
        7 => decode::<JoinCluster>(json),
        8 => decode::<CreateNode>(json),
        9 => decode::<CreatePool>(json),
        10 => decode::<CreateSnapshot>(json),
        11 => decode::<CloneSnapshot>(json),
        12 => decode::<ResizeVolume>(json),
        13 => decode::<OnNode>(json),
        _ => decode::<RollBack>(json),
    }
}
