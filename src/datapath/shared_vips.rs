//! One load balancer per VIP:PORT and interface: lb (tc ingress) and xdp-lb (XDP) both
//! matching a service on one interface would split nothing: XDP runs first and takes every
//! packet. The other's services are read from the program attached there now (a foreground
//! run's or a persisted one's), so what is refused is what really runs.

use std::collections::BTreeSet;
use std::net::SocketAddr;

use anyhow::{bail, Result};
use libbpf_rs::{MapCore, MapHandle};

use crate::control::service::Service;
use crate::kernel::addr::Interface;
use crate::kernel::attach::{self, AttachedProgram, TcDirection};
use crate::kernel::maps;
use crate::kernel::skel::sock_xlate::types::service_endpoint;
use crate::kernel::tc;

/// A load balancer and how to find it on an interface.
struct Balancer {
    name: &'static str,
    programs: &'static [&'static str],
    /// its service table's name as the kernel reports it
    services_map: &'static str,
}

const BALANCERS: [Balancer; 2] = [
    Balancer {
        name: super::lb::SUBCOMMAND,
        programs: super::lb::PROGRAMS,
        services_map: "lb_services",
    },
    Balancer {
        name: super::xdp_lb::SUBCOMMAND,
        programs: super::xdp_lb::PROGRAMS,
        services_map: "xdp_lb_services",
    },
];

impl Balancer {
    fn attached(&self, iface: &Interface) -> Vec<AttachedProgram> {
        // tcx or legacy tc: lb attached either way (a 6.1 node has only the legacy filters)
        let mut found = tc::tc_programs(iface.index, TcDirection::Ingress).unwrap_or_default();
        found.extend(attach::xdp_program(iface.index));
        found.retain(|prog| self.programs.contains(&prog.name.as_str()));
        found
    }

    /// The VIP:PORTs in the service table of one of its programs.
    fn vips(&self, prog: &AttachedProgram) -> Result<BTreeSet<SocketAddr>> {
        let mut vips = BTreeSet::new();
        for id in attach::program_info(prog.id)?.1 {
            let Ok(map) = MapHandle::from_map_id(id) else {
                continue;
            };
            if map.name().to_string_lossy() != self.services_map {
                continue;
            }
            for key in map.keys() {
                let vip: service_endpoint = maps::from_bytes("service key", &key)?;
                vips.insert(SocketAddr::from(&vip));
            }
        }
        Ok(vips)
    }
}

/// Refuses the services `me` is about to serve on `iface` that another ebpf-net load
/// balancer serves there already, naming it.
pub fn refuse_served_elsewhere(me: &str, iface: &Interface, services: &[Service]) -> Result<()> {
    for other in BALANCERS.iter().filter(|balancer| balancer.name != me) {
        for prog in other.attached(iface) {
            // a table we cannot read is not a reason to refuse
            let Ok(vips) = other.vips(&prog) else { continue };
            if let Some(service) = services.iter().find(|service| vips.contains(&service.vip)) {
                bail!(
                    "{}: {} is already served by ebpf-net {} on {} (program {}); one load balancer per \
                     VIP:PORT and interface: remove it there first (`ebpf-net down {} -i {}`, or stop that run)",
                    service.origin,
                    service.vip,
                    other.name,
                    iface.name,
                    prog.id,
                    other.name,
                    iface.name
                );
            }
        }
    }
    Ok(())
}
