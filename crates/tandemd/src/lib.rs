//! The node daemon's settings, as a library: the fuzz target of the config file and
//! its corpus replay call the same parser the daemon runs.

pub mod config;
