//! ebpf-net: eBPF service networking for a Linux node.
//!
//! Three layers, each using only the ones below it:
//! - `kernel`: what talks to the kernel (attach, pins, probes, namespaces, cgroups, netlink,
//!   nft, the generated skeletons);
//! - `control`: what every datapath shares (configuration, typed services, the lifecycle,
//!   instances, status, metrics, counters);
//! - `datapath`: one module per datapath, each implementing the lifecycle once, and the
//!   registry that `status`, `down` and the CLI loop over;
//! - `kube`: the node agent, which drives datapaths from a Kubernetes API server.

pub mod control;
pub mod datapath;
pub mod kernel;
pub mod kube;
