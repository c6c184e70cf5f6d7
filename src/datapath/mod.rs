//! The datapaths, one module each, and the registry `status`, `down` and the CLI loop over.
//! A new datapath is its module, a `Datapath` impl, and one line in [`REGISTRY`].

use crate::control::lifecycle::{Entry, Registered};

pub mod clusterip;
pub mod ipv6_hp;
pub mod lb;
pub mod maglev;
pub mod monitor;
pub mod proxy;
pub mod shared_vips;
pub mod xdp_lb;

/// Every datapath.
pub static REGISTRY: [&dyn Registered; 6] = [
    &Entry::<ipv6_hp::Ipv6Hp>::NEW,
    &Entry::<monitor::Monitor>::NEW,
    &Entry::<proxy::Proxy>::NEW,
    &Entry::<clusterip::Clusterip>::NEW,
    &Entry::<lb::Lb>::NEW,
    &Entry::<xdp_lb::XdpLb>::NEW,
];
