//! What every datapath shares: configuration, typed services, the lifecycle, instances,
//! status, metrics and counters.

pub mod config;
pub mod counters;
pub mod desired;
pub mod health;
pub mod instance;
pub mod lifecycle;
pub mod manual;
pub mod metrics;
pub mod notify;
pub mod run;
pub mod service;
pub mod status;
