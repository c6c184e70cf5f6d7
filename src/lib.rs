//! ebpf-net: eBPF service networking for a Linux node, one module per concern.

pub mod addr;
pub mod attach;
pub mod cgroup;
pub mod clusterip;
pub mod config;
pub mod instance;
pub mod ipv6_hp;
pub mod lb;
pub mod maglev;
pub mod maps;
pub mod metrics;
pub mod monitor;
pub mod neigh;
pub mod netns;
pub mod nft;
pub mod pin;
pub mod probe;
pub mod proxy;
pub mod run;
pub mod service;
pub mod skel;
pub mod status;
pub mod xdp_lb;
