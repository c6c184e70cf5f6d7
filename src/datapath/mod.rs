//! The datapaths, one module each.

pub mod clusterip;
pub mod ipv6_hp;
pub mod lb;
pub mod maglev;
pub mod monitor;
pub mod proxy;
pub mod xdp_lb;
