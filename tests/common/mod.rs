//! Shared test helpers: packet building and checking, netns topologies, driving the binary.
#![allow(dead_code)]

pub mod affinity;
pub mod apiserver;
pub mod bench;
pub mod cgroup;
pub mod flood;
pub mod kernel;
pub mod lab;
pub mod packets;
pub mod servers;
pub mod topology;

/// Keeps this thread on one CPU: what a per-CPU table counts (a flood window, a benchmark's
/// NAPI work) stays in one CPU's entry.
pub fn pin_this_thread(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET and sched_setaffinity on this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set), 0);
    }
}
