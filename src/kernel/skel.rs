//! The libbpf-rs skeletons build.rs generates, one module per bpf/*.c.
#![allow(clippy::all, missing_docs, non_camel_case_types, non_snake_case, dead_code)]

pub mod ingress {
    include!(concat!(env!("OUT_DIR"), "/ingress.skel.rs"));
}
pub mod egress {
    include!(concat!(env!("OUT_DIR"), "/egress.skel.rs"));
}
pub mod noop {
    include!(concat!(env!("OUT_DIR"), "/noop.skel.rs"));
}
pub mod probe {
    include!(concat!(env!("OUT_DIR"), "/probe.skel.rs"));
}
pub mod monitor {
    include!(concat!(env!("OUT_DIR"), "/monitor.skel.rs"));
}
pub mod proxy {
    include!(concat!(env!("OUT_DIR"), "/proxy.skel.rs"));
}
pub mod sock_destroy {
    include!(concat!(env!("OUT_DIR"), "/sock_destroy.skel.rs"));
}
pub mod sock_xlate {
    include!(concat!(env!("OUT_DIR"), "/sock_xlate.skel.rs"));
}
pub mod lb {
    include!(concat!(env!("OUT_DIR"), "/lb.skel.rs"));
}
pub mod xdp_lb {
    include!(concat!(env!("OUT_DIR"), "/xdp_lb.skel.rs"));
}
