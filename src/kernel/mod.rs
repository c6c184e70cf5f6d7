//! The kernel-facing parts: attach (tcx, XDP, cgroup), pins, probes, network namespaces,
//! cgroups, routes and neighbours, nft, and the generated BPF skeletons.

pub mod addr;
pub mod attach;
pub mod cgroup;
pub mod maps;
pub mod neigh;
pub mod netns;
pub mod nft;
pub mod pin;
pub mod probe;
pub mod skel;
