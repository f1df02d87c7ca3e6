//! The subcommands, one module per kind of object. Each prints a table for people, or
//! with `--output json` the API's JSON for scripts.

pub mod cluster;
pub mod group;
pub mod health;
pub mod kv;
pub mod node;
pub mod pool;
pub mod snapshot;
pub mod sr;
pub mod volume;
pub mod xapi;

use std::fmt::Display;

use clap::ValueEnum;
use clap::builder::{PossibleValuesParser, RangedI64ValueParser, TypedValueParser};
use serde::Serialize;
use serde::de::DeserializeOwned;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

/// Prints `value` as JSON for scripts, or in its human form (a table, a status text).
pub fn emit<T: Serialize, H: Display>(output: Output, value: &T, human: impl FnOnce(&T) -> H) {
    match output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(value).expect("serialisable")
        ),
        Output::Table => print!("{}", human(value)),
    }
}

/// Confirms a deletion: a sentence for people, `{"deleted": {...}}` for scripts.
pub fn deleted(output: Output, what: impl Display, object: serde_json::Value) {
    match output {
        Output::Json => println!("{}", serde_json::json!({ "deleted": object })),
        Output::Table => println!("{what} deleted"),
    }
}

/// `?force=true` when forced.
pub fn force_query(force: bool) -> &'static str {
    if force { "?force=true" } else { "" }
}

/// The word a serde enum has in the API's JSON (`diskful`, `io-error`), for tables.
pub fn word<T: Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => "?".into(),
    }
}

/// A table cell for a value that may not be known yet.
pub fn or_dash<T: Display>(value: Option<T>) -> String {
    value.map_or_else(|| "-".into(), |v| v.to_string())
}

pub fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

/// `--replicas`: diskful replicas per volume, as many as a volume has node ids less one
/// for a tiebreaker.
pub fn replica_count() -> RangedI64ValueParser<u8> {
    clap::value_parser!(u8).range(1..=31)
}

/// An argument taking one of an API enum's words, e.g. `--quorum majority|off`.
pub fn api_words<T>(words: &'static [&'static str]) -> impl TypedValueParser<Value = T>
where
    T: DeserializeOwned + Clone + Send + Sync + 'static,
{
    PossibleValuesParser::new(words).map(|w| {
        serde_json::from_value(serde_json::Value::String(w))
            .expect("the listed words are the API's")
    })
}
