//! What every datapath shares: configuration, typed services, the lifecycle, instances,
//! status, metrics and counters.

pub mod config;
pub mod instance;
pub mod metrics;
pub mod run;
pub mod service;
pub mod status;
