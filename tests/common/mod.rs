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
