//! Counters declared once: every declaration in Rust matches its C struct in the program's
//! BTF, field by field; a declaration that misses a field is caught.

use std::mem::MaybeUninit;

use ebpf_net::control::counters::{check_declaration, Counter, Counters, Kind};
use ebpf_net::kernel::skel;
use libbpf_rs::skel::{OpenSkel, Skel, SkelBuilder};
use libbpf_rs::AsRawLibbpf;

/// The BTF of a program's object as opened, not loaded: the structs are there already, and
/// a kernel that cannot load the program (lb below 6.1) can still have it checked.
macro_rules! object_btf {
    ($builder:ty, |$btf:ident| $body:block) => {{
        let mut object = MaybeUninit::uninit();
        let open = <$builder>::default().open(&mut object).unwrap();
        let raw = open.open_object().as_libbpf_object();
        // SAFETY: the object lives as long as `open`, which outlives the BTF view
        let $btf = libbpf_rs::btf::Btf::from_bpf_object(unsafe { raw.as_ref() })
            .unwrap()
            .expect("the object has BTF");
        $body
    }};
}

#[test]
fn every_counter_declaration_matches_its_c_struct() {
    object_btf!(skel::lb::LbSkelBuilder, |btf| {
        check_declaration::<skel::lb::types::lb_counters>(&btf).unwrap();
        check_declaration::<skel::lb::types::lb_stats>(&btf).unwrap();
    });
    object_btf!(skel::xdp_lb::XdpLbSkelBuilder, |btf| {
        check_declaration::<skel::xdp_lb::types::xdp_lb_counters>(&btf).unwrap();
        check_declaration::<skel::xdp_lb::types::xdp_lb_stats>(&btf).unwrap();
    });
    object_btf!(skel::sock_xlate::SockXlateSkelBuilder, |btf| {
        check_declaration::<skel::sock_xlate::types::clusterip_stats>(&btf).unwrap();
    });
    object_btf!(skel::proxy::ProxySkelBuilder, |btf| {
        check_declaration::<skel::proxy::types::proxy_stats>(&btf).unwrap();
    });
    let mut object = MaybeUninit::uninit();
    let addrs = ebpf_net::datapath::ipv6_hp::ProbeAddresses {
        link_local: "fe80::1".parse().unwrap(),
        global: "2001:db8::1".parse().unwrap(),
    };
    let ingress = ebpf_net::datapath::ipv6_hp::load_ingress(&mut object, &addrs, 0, None).unwrap();
    let btf = ingress.object().btf().unwrap().unwrap();
    check_declaration::<skel::ingress::types::ipv6_hp_stats>(&btf).unwrap();
}

/// lb_counters declared with its last field forgotten (a stand-in type of the same size, so
/// that only the names differ).
#[derive(Default, Clone, Copy)]
#[repr(C)]
struct Forgotten([u64; 6]);
// SAFETY: plain u64 words.
unsafe impl plain::Plain for Forgotten {}
impl Counters for Forgotten {
    const C_STRUCT: &'static str = "lb_counters";
    const FIELDS: &'static [Counter] = &[
        Counter {
            name: "new_flows",
            kind: Kind::Event,
            help: "",
        },
        Counter {
            name: "known_flows",
            kind: Kind::Event,
            help: "",
        },
        Counter {
            name: "reopened",
            kind: Kind::Event,
            help: "",
        },
        Counter {
            name: "alloc_failed",
            kind: Kind::Error,
            help: "",
        },
        Counter {
            name: "nat_failed",
            kind: Kind::Error,
            help: "",
        },
        Counter {
            name: "inserted_failed",
            kind: Kind::Error,
            help: "",
        },
    ];
}

#[test]
fn a_declaration_that_differs_from_c_is_caught() {
    object_btf!(skel::lb::LbSkelBuilder, |btf| {
        let err = check_declaration::<Forgotten>(&btf).unwrap_err().to_string();
        assert!(
            err.contains("insert_failed") && err.contains("inserted_failed"),
            "{err}"
        );
    });
}
