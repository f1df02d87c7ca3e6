//! The records and parameters of xapi-storage 5.0 as they travel in JSON: optional
//! fields are absent rather than null, variants are `["Tag", argument]`, unit is `null`.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::error::XapiError;

/// Decodes a call's parameters (`dbg` taken out: every call has it); anything unknown,
/// missing or of the wrong type is an `Invalid_argument` naming it.
pub fn params<T: DeserializeOwned>(method: &str, input: &Value) -> Result<T, XapiError> {
    T::deserialize(input).map_err(|e| XapiError::invalid(format!("{method}: {e}")))
}

/// Splits a call's input into its `dbg` (the caller's tag for its logs) and the rest.
pub fn split_dbg(input: &str) -> Result<(String, Value), XapiError> {
    let mut value: Value = serde_json::from_str(input)
        .map_err(|e| XapiError::invalid(format!("the call's input is not JSON: {e}")))?;
    let Some(object) = value.as_object_mut() else {
        return Err(XapiError::invalid("the call's input is not a JSON object"));
    };
    match object.remove("dbg") {
        Some(Value::String(dbg)) => Ok((dbg, value)),
        Some(_) => Err(XapiError::invalid("dbg: expected a string")),
        None => Err(XapiError::invalid("missing field `dbg`")),
    }
}

pub type Dict = BTreeMap<String, String>;

/// Methods that take nothing but `dbg`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Nothing {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SrCreate {
    pub uuid: String,
    pub configuration: Dict,
    pub name: String,
    pub description: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SrConfiguration {
    pub configuration: Dict,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SrOnly {
    pub sr: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SrSetName {
    pub sr: String,
    pub new_name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SrSetDescription {
    pub sr: String,
    pub new_description: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeCreate {
    pub sr: String,
    pub name: String,
    pub description: String,
    pub size: i64,
    pub sharable: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeKey {
    pub sr: String,
    pub key: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeSetName {
    pub sr: String,
    pub key: String,
    pub new_name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeSetDescription {
    pub sr: String,
    pub key: String,
    pub new_description: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeSet {
    pub sr: String,
    pub key: String,
    pub k: String,
    pub v: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeUnset {
    pub sr: String,
    pub key: String,
    pub k: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeResize {
    pub sr: String,
    pub key: String,
    pub new_size: i64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeRevert {
    pub sr: String,
    pub snapshot: String,
    pub key: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChangedBlocks {
    pub sr: String,
    pub key: String,
    pub key2: String,
    pub offset: i64,
    /// Negative: to the end of the volume.
    pub length: i64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatapathCall {
    pub uri: String,
    pub domain: String,
}

/// The `volume` record.
pub struct VolumeRecord {
    pub key: String,
    pub name: String,
    pub description: String,
    pub read_write: bool,
    pub virtual_size: u64,
    pub physical_utilisation: u64,
    pub uri: String,
    pub keys: Dict,
    pub cbt_enabled: bool,
    /// `Data`, or `CBT_Metadata` once its data is destroyed.
    pub volume_type: &'static str,
}

impl VolumeRecord {
    pub fn to_json(&self) -> Value {
        json!({
            "key": self.key,
            "name": self.name,
            "description": self.description,
            "read_write": self.read_write,
            // A Tandem volume has one writer at a time.
            "sharable": false,
            "virtual_size": self.virtual_size,
            "physical_utilisation": self.physical_utilisation,
            "uri": [self.uri],
            "keys": self.keys,
            "cbt_enabled": self.cbt_enabled,
            "volume_type": self.volume_type,
        })
    }
}
