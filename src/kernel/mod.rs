//! The kernel-facing parts: attach (tcx, XDP, cgroup), pins, probes, network namespaces,
//! cgroups, routes and neighbours, nft, and the generated BPF skeletons.

pub mod addr;
pub mod attach;
pub mod cgroup;
pub mod maps;
pub mod neigh;
pub mod netlink;
pub mod netns;
pub mod nft;
pub mod pin;
pub mod probe;
pub mod skel;
pub mod tc;

/// A seed for the BPF programs' flow hash, fresh per load so that flows are not predictable
/// across nodes or restarts.
pub fn random_seed() -> anyhow::Result<u32> {
    getrandom::u32().map_err(|err| {
        // as the libc call reported it: "Operation not permitted (os error 1)"
        let reason = err.raw_os_error().map_or_else(
            || err.to_string(),
            |errno| std::io::Error::from_raw_os_error(errno).to_string(),
        );
        anyhow::anyhow!("getrandom failed: {reason}")
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn seeds_differ() {
        let seeds: Vec<u32> = (0..4).map(|_| super::random_seed().unwrap()).collect();
        assert!(seeds.windows(2).any(|pair| pair[0] != pair[1]), "{seeds:?}");
    }
}
