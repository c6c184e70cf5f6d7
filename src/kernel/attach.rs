//! Attach lifecycles: tcx links on an interface and cgroup links, as owned values that detach
//! on drop, and what the kernel reports as attached.

use std::ffi::CStr;
use std::fs;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::Path;
use std::ptr::NonNull;

use anyhow::{Context, Result};
use libbpf_rs::{AsRawLibbpf, Link, MapCore, OpenProgramMut, Program, ProgramAttachType};

use crate::kernel::addr::Interface;

/// Which side of an interface a tc program sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcDirection {
    Ingress,
    Egress,
}

impl TcDirection {
    pub const BOTH: [TcDirection; 2] = [TcDirection::Ingress, TcDirection::Egress];

    pub fn name(self) -> &'static str {
        match self {
            TcDirection::Ingress => "ingress",
            TcDirection::Egress => "egress",
        }
    }

    fn attach_type(self) -> ProgramAttachType {
        match self {
            TcDirection::Ingress => ProgramAttachType::TcxIngress,
            TcDirection::Egress => ProgramAttachType::TcxEgress,
        }
    }

    /// Ingress programs go first and egress programs last, so the rest of the chain (a
    /// CNI's datapath, say) sees translated addresses in both directions.
    fn placement(self) -> u32 {
        match self {
            TcDirection::Ingress => libbpf_sys::BPF_F_BEFORE,
            TcDirection::Egress => libbpf_sys::BPF_F_AFTER,
        }
    }
}

/// Which sides of an interface a datapath watches (monitor's `--direction`).
#[derive(clap::ValueEnum, serde::Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Directions {
    Ingress,
    Egress,
    Both,
}

impl Directions {
    pub fn tc(self) -> Vec<TcDirection> {
        match self {
            Directions::Ingress => vec![TcDirection::Ingress],
            Directions::Egress => vec![TcDirection::Egress],
            Directions::Both => TcDirection::BOTH.to_vec(),
        }
    }
}

/// Marks an opened program for tcx before load: libbpf takes the link's attach type from it.
pub fn prepare_tcx(prog: &mut OpenProgramMut<'_>, direction: TcDirection) {
    prog.set_attach_type(direction.attach_type());
}

/// One of our programs on one side of an interface, through a tcx link (Linux 6.6). The
/// link is the attachment: dropping it detaches, unless it was pinned. tcx leaves a clsact
/// qdisc and its filters alone; they run after the tcx chain.
pub struct TcxAttachment {
    link: Link,
}

impl TcxAttachment {
    pub fn attach(prog: &Program<'_>, iface: &Interface, direction: TcDirection) -> Result<Self> {
        let opts = libbpf_sys::bpf_tcx_opts {
            sz: size_of::<libbpf_sys::bpf_tcx_opts>() as _,
            flags: direction.placement(),
            ..Default::default()
        };
        // SAFETY: a loaded program and options of the right size.
        let raw = unsafe {
            libbpf_sys::bpf_program__attach_tcx(prog.as_libbpf_object().as_ptr(), iface.index as i32, &opts)
        };
        let raw = NonNull::new(raw)
            .ok_or_else(std::io::Error::last_os_error)
            .with_context(|| {
                format!(
                    "attaching {} to {} {} (tcx needs Linux 6.6 or later)",
                    prog.name().to_string_lossy(),
                    iface.name,
                    direction.name()
                )
            })?;
        // SAFETY: libbpf returned a valid link that we now own.
        let link = unsafe { Link::from_ptr(raw) };
        Ok(Self { link })
    }

    /// Pins the link so the attachment outlives this process.
    pub fn pin(mut self, path: &Path) -> Result<()> {
        self.link
            .pin(path)
            .with_context(|| format!("pinning link at {}", path.display()))
    }
}

/// How an XDP program runs on an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// native where the driver supports XDP and its XDP_TX arrives (on veth: the peer runs XDP in its driver), generic otherwise
    Auto,
    /// in the driver, before an skb exists (fails where the driver has no XDP support)
    Native,
    /// on the skb, for any interface (slower)
    Generic,
}

impl XdpMode {
    pub fn name(self) -> &'static str {
        match self {
            XdpMode::Auto => "auto",
            XdpMode::Native => "native",
            XdpMode::Generic => "generic",
        }
    }
}

/// Our program on an interface's XDP hook through a link, in the mode it got. Dropping it
/// detaches, unless it was pinned.
pub struct XdpAttachment {
    fd: std::os::fd::OwnedFd,
    pub mode: XdpMode,
}

impl XdpAttachment {
    /// Attaches in `mode`; auto tries native first and falls back to generic only when the
    /// driver has no XDP support.
    pub fn attach(prog: &Program<'_>, iface: &Interface, mode: XdpMode) -> Result<Self> {
        let name = prog.name().to_string_lossy().into_owned();
        let try_mode = |mode: XdpMode| -> std::io::Result<Self> {
            let flags = match mode {
                XdpMode::Native => libbpf_sys::XDP_FLAGS_DRV_MODE,
                _ => libbpf_sys::XDP_FLAGS_SKB_MODE,
            };
            let opts = libbpf_sys::bpf_link_create_opts {
                sz: size_of::<libbpf_sys::bpf_link_create_opts>() as _,
                flags,
                ..Default::default()
            };
            // SAFETY: a loaded program's fd and options of the right size.
            let fd = unsafe {
                libbpf_sys::bpf_link_create(
                    prog.as_fd().as_raw_fd(),
                    iface.index as i32,
                    libbpf_sys::BPF_XDP,
                    &opts,
                )
            };
            if fd < 0 {
                return Err(std::io::Error::from_raw_os_error(-fd));
            }
            // SAFETY: the kernel gave us this link fd.
            let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
            Ok(Self { fd, mode })
        };
        // veth has native XDP, but its XDP_TX frames only arrive when the peer runs an XDP
        // program in its driver, which a bridge port usually does not: frames count as sent
        // and vanish (see veth_xdp_tx_blocker). Generic XDP works on any veth.
        let result = match mode {
            XdpMode::Auto if veth_xdp_tx_blocker(iface).is_some() => try_mode(XdpMode::Generic),
            XdpMode::Auto => match try_mode(XdpMode::Native) {
                Err(err) if err.raw_os_error() == Some(libc::EOPNOTSUPP) => try_mode(XdpMode::Generic),
                other => other,
            },
            mode => try_mode(mode),
        };
        result.map_err(|err| {
            let why = match err.raw_os_error() {
                Some(libc::EBUSY) | Some(libc::EEXIST) => match xdp_program(iface.index) {
                    Some(other) => format!(
                        "another XDP program is attached to {} ({} id {})",
                        iface.name, other.name, other.id
                    ),
                    None => "another XDP program is attached".into(),
                },
                Some(libc::EOPNOTSUPP) => format!(
                    "{} has no native XDP support; use --mode generic or auto",
                    iface.name
                ),
                _ => err.to_string(),
            };
            anyhow::anyhow!("attaching {name} to {} XDP ({}): {why}", iface.name, mode.name())
        })
    }

    /// Pins the link so the attachment outlives this process.
    pub fn pin(self, path: &Path) -> Result<()> {
        let cpath = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
        // SAFETY: a link fd we own and a NUL-terminated path.
        let ret = unsafe { libbpf_sys::bpf_obj_pin(self.fd.as_raw_fd(), cpath.as_ptr()) };
        if ret != 0 {
            return Err(std::io::Error::from_raw_os_error(-ret))
                .with_context(|| format!("pinning link at {}", path.display()));
        }
        Ok(())
    }
}

/// Why frames a native XDP program sends back out of this veth (`XDP_TX`) would be lost, or
/// None when they arrive (or the interface is no veth). drivers/net/veth.c hands such a frame
/// to the peer's ring only when the peer has NAPI on (`veth_xdp_xmit`: `if
/// (!rcu_access_pointer(rq->napi)) goto out;`, counted as `xdp_tx_errors`), and wakes the
/// peer's NAPI only when the peer runs an XDP program (`veth_xdp_flush`: `if
/// (unlikely(!rcu_access_pointer(rcv_rq->xdp_prog))) goto out;`). So GRO on the peer gives
/// it NAPI and a ring, but nothing polls it: measured on 6.18, the frames are counted as
/// sent (`xdp_tx`) and never arrive. Only an XDP program in the peer's driver (XDP_PASS is
/// enough) makes native XDP_TX work; a generic one does not give the peer NAPI.
pub fn veth_xdp_tx_blocker(iface: &Interface) -> Option<String> {
    if iface.driver().as_deref() != Some("veth") {
        return None;
    }
    match veth_peer(iface) {
        Ok(peer) if peer.native_xdp => None,
        Ok(peer) => Some(format!(
            "the veth peer of {} ({}{}) runs no XDP program in its driver, so native XDP_TX frames would be lost",
            iface.name,
            peer.name,
            if peer.same_netns { "" } else { " in another namespace" }
        )),
        Err(err) => Some(format!(
            "the veth peer of {} could not be inspected ({err}), and native XDP_TX only arrives at a peer that runs XDP in its driver",
            iface.name
        )),
    }
}

/// What native XDP on a veth needs to know of the other end.
struct VethPeer {
    name: String,
    same_netns: bool,
    /// an XDP program in the peer's driver (not generic): the peer then polls with NAPI
    native_xdp: bool,
}

/// The other end of a veth, through rtnetlink: IFLA_LINK and IFLA_LINK_NETNSID of the veth,
/// then the peer itself by that index in that namespace (IFLA_IF_NETNSID).
fn veth_peer(iface: &Interface) -> std::io::Result<VethPeer> {
    use netlink_packet_route::link::{LinkAttribute, LinkMessage, LinkXdp, XdpAttached};
    use netlink_packet_route::RouteNetlinkMessage;
    let mut rtnl = crate::kernel::netlink::Rtnetlink::open()?;
    let mut get = |index: u32, netns: Option<i32>| -> std::io::Result<Vec<LinkAttribute>> {
        let mut request = LinkMessage::default();
        request.header.index = index;
        request.attributes.extend(netns.map(LinkAttribute::IfNetnsId));
        match rtnl.get(RouteNetlinkMessage::GetLink(request))? {
            RouteNetlinkMessage::NewLink(link) => Ok(link.attributes),
            _ => Err(std::io::Error::other("an answer that is not a link")),
        }
    };
    let ours = get(iface.index, None)?;
    let peer_index = ours
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Link(index) => Some(*index),
            _ => None,
        })
        .ok_or_else(|| std::io::Error::other("no peer index (IFLA_LINK)"))?;
    let netns = ours.iter().find_map(|a| match a {
        LinkAttribute::LinkNetNsId(id) => Some(*id),
        _ => None,
    });
    let peer = get(peer_index, netns)?;
    let name = peer
        .iter()
        .find_map(|a| match a {
            LinkAttribute::IfName(name) => Some(name.clone()),
            _ => None,
        })
        .unwrap_or_else(|| format!("ifindex {peer_index}"));
    let xdp: Vec<&LinkXdp> = peer
        .iter()
        .filter_map(|a| match a {
            LinkAttribute::Xdp(xdp) => Some(xdp.iter()),
            _ => None,
        })
        .flatten()
        .collect();
    let native_xdp = xdp.iter().any(|x| match x {
        LinkXdp::Attached(XdpAttached::Driver) => true,
        LinkXdp::DrvProgId(id) => *id != 0,
        _ => false,
    });
    Ok(VethPeer {
        name,
        same_netns: netns.is_none(),
        native_xdp,
    })
}

/// The mode the kernel reports for the XDP program on an interface.
pub fn xdp_mode(ifindex: u32) -> Option<XdpMode> {
    let mut opts = libbpf_sys::bpf_xdp_query_opts {
        sz: size_of::<libbpf_sys::bpf_xdp_query_opts>() as _,
        ..Default::default()
    };
    // SAFETY: opts of the right size for the kernel to fill.
    if unsafe { libbpf_sys::bpf_xdp_query(ifindex as i32, 0, &mut opts) } != 0 {
        return None;
    }
    match opts.attach_mode as u32 {
        libbpf_sys::XDP_ATTACHED_DRV => Some(XdpMode::Native),
        libbpf_sys::XDP_ATTACHED_SKB => Some(XdpMode::Generic),
        _ => None,
    }
}

/// The program on an interface's XDP hook, if any.
pub fn xdp_program(ifindex: u32) -> Option<AttachedProgram> {
    let mut id = 0u32;
    // SAFETY: the kernel writes one id.
    if unsafe { libbpf_sys::bpf_xdp_query_id(ifindex as i32, 0, &mut id) } != 0 || id == 0 {
        return None;
    }
    Some(AttachedProgram {
        id,
        name: program_info(id).ok()?.0,
    })
}

/// A program the kernel reports on a hook.
#[derive(Debug, Clone)]
pub struct AttachedProgram {
    pub id: u32,
    pub name: String,
}

/// The programs in the tcx chain of one side of an interface, in order.
pub fn tcx_programs(ifindex: u32, direction: TcDirection) -> Result<Vec<AttachedProgram>> {
    let attach_type = match direction {
        TcDirection::Ingress => libbpf_sys::BPF_TCX_INGRESS,
        TcDirection::Egress => libbpf_sys::BPF_TCX_EGRESS,
    };
    query_programs(ifindex as i32, attach_type)
        .with_context(|| format!("querying tcx {} of ifindex {ifindex}", direction.name()))
}

/// The programs attached directly to a cgroup (not inherited) at one hook.
pub fn cgroup_programs(
    cgroup: BorrowedFd<'_>,
    attach_type: ProgramAttachType,
) -> Result<Vec<AttachedProgram>> {
    query_programs(cgroup.as_raw_fd(), attach_type as u32).context("querying cgroup attachments")
}

fn query_programs(target: i32, attach_type: u32) -> Result<Vec<AttachedProgram>> {
    let mut ids = [0u32; 64];
    let mut opts = libbpf_sys::bpf_prog_query_opts {
        sz: size_of::<libbpf_sys::bpf_prog_query_opts>() as _,
        prog_ids: ids.as_mut_ptr(),
        ..Default::default()
    };
    opts.__bindgen_anon_1.count = ids.len() as u32;
    // SAFETY: opts points at a buffer of `count` ids.
    let ret = unsafe { libbpf_sys::bpf_prog_query_opts(target, attach_type, &mut opts) };
    if ret != 0 {
        return Err(std::io::Error::from_raw_os_error(-ret).into());
    }
    // SAFETY: the kernel set count to the number of ids it wrote.
    let count = unsafe { opts.__bindgen_anon_1.count } as usize;
    ids[..count.min(ids.len())]
        .iter()
        .map(|&id| {
            Ok(AttachedProgram {
                id,
                name: program_info(id)?.0,
            })
        })
        .collect()
}

/// Name and map ids of a loaded program.
pub fn program_info(id: u32) -> Result<(String, Vec<u32>)> {
    let fd = Program::fd_from_id(id).with_context(|| format!("opening program {id}"))?;
    program_info_by_fd(fd.as_fd())
}

fn program_info_by_fd(fd: BorrowedFd<'_>) -> Result<(String, Vec<u32>)> {
    let mut map_ids = [0u32; 32];
    let mut info = libbpf_sys::bpf_prog_info {
        nr_map_ids: map_ids.len() as u32,
        map_ids: map_ids.as_mut_ptr() as u64,
        ..Default::default()
    };
    let mut len = size_of_val(&info) as u32;
    // SAFETY: info and its map_ids buffer are valid for the kernel to fill.
    let ret = unsafe { libbpf_sys::bpf_prog_get_info_by_fd(fd.as_raw_fd(), &mut info, &mut len) };
    if ret != 0 {
        return Err(std::io::Error::from_raw_os_error(-ret)).context("reading program info");
    }
    // SAFETY: the kernel NUL-terminates names.
    let name = unsafe { CStr::from_ptr(info.name.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    let count = (info.nr_map_ids as usize).min(map_ids.len());
    Ok((name, map_ids[..count].to_vec()))
}

/// Name of a map by id.
pub fn map_name(id: u32) -> Result<String> {
    let map = libbpf_rs::MapHandle::from_map_id(id).with_context(|| format!("opening map {id}"))?;
    Ok(map.name().to_string_lossy().into_owned())
}

/// What a pinned link is attached to, as the kernel reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkTarget {
    /// A tcx link on this interface index; 0 once the interface or its namespace is gone.
    Interface(u32),
    /// A cgroup link on the cgroup with this id; 0 once the cgroup is removed.
    Cgroup(u64),
    Other,
}

impl LinkTarget {
    /// Why a link no longer does anything, if it does not.
    pub fn lost(self) -> Option<&'static str> {
        match self {
            LinkTarget::Interface(0) => Some("lost its interface"),
            LinkTarget::Cgroup(0) => Some("lost its cgroup"),
            _ => None,
        }
    }
}

/// What a pinned link reports: the program in it and what it is attached to.
pub struct PinnedLink {
    pub link: Link,
    pub prog_id: u32,
    pub target: LinkTarget,
}

impl PinnedLink {
    pub fn open(path: &Path) -> Result<Self> {
        let link = Link::open(path).with_context(|| format!("opening pinned link {}", path.display()))?;
        let info = link
            .info()
            .with_context(|| format!("reading link {}", path.display()))?;
        let target = match info.info {
            libbpf_rs::query::LinkTypeInfo::Tcx(tcx) => LinkTarget::Interface(tcx.ifindex),
            libbpf_rs::query::LinkTypeInfo::Xdp(xdp) => LinkTarget::Interface(xdp.ifindex),
            libbpf_rs::query::LinkTypeInfo::Cgroup(cgroup) => LinkTarget::Cgroup(cgroup.cgroup_id),
            _ => LinkTarget::Other,
        };
        Ok(Self {
            link,
            prog_id: info.prog_id,
            target,
        })
    }
}

/// Swaps `prog` into the link pinned at `link_path` (atomically: the hook never runs
/// without a program). False when nothing is pinned there yet.
pub fn update_pinned(prog: &Program<'_>, link_path: &Path) -> Result<bool> {
    if !link_path.exists() {
        return Ok(false);
    }
    let mut link = Link::open(link_path).with_context(|| format!("opening {}", link_path.display()))?;
    link.update_prog(prog)
        .with_context(|| format!("replacing the program in {}", link_path.display()))?;
    Ok(true)
}

/// Attaches `prog` to a cgroup at the hook its section names, through a link (multi-attach:
/// other programs on the same cgroup stay and run too). Dropping the link detaches.
pub fn attach_cgroup(prog: &Program<'_>, cgroup: BorrowedFd<'_>, what: &str) -> Result<Link> {
    // SAFETY: a loaded program and an open cgroup directory.
    let raw = unsafe {
        libbpf_sys::bpf_program__attach_cgroup(prog.as_libbpf_object().as_ptr(), cgroup.as_raw_fd())
    };
    let raw = NonNull::new(raw)
        .ok_or_else(std::io::Error::last_os_error)
        .with_context(|| format!("attaching {} to cgroup {what}", prog.name().to_string_lossy()))?;
    // SAFETY: libbpf returned a valid link that we now own.
    Ok(unsafe { Link::from_ptr(raw) })
}

/// Removes the link pinned at `link_path` when it no longer is on `iface` (the interface was
/// deleted, and perhaps made again with the same name: the link is severed, ifindex 0, and
/// cannot take a program); the caller then attaches afresh, with the same pinned maps.
pub fn drop_severed(link_path: &Path, iface: &Interface) -> Result<()> {
    if !link_path.exists() {
        return Ok(());
    }
    let link = PinnedLink::open(link_path)?;
    let LinkTarget::Interface(index) = link.target else {
        return Ok(());
    };
    if index != iface.index {
        let why = if index == 0 {
            "its interface was deleted".to_string()
        } else {
            format!("it is on ifindex {index}")
        };
        fs::remove_file(link_path).with_context(|| format!("removing {}", link_path.display()))?;
        eprintln!(
            "re-attaching to {} (ifindex {}): the pinned link {} was severed ({why})",
            iface.name,
            iface.index,
            link_path.display()
        );
    }
    Ok(())
}

/// Persists `prog` on one side of an interface: swaps it atomically into the link pinned at
/// `link_path` when there is one (true), else attaches and pins a new link (false).
pub fn attach_or_update_pinned(
    prog: &Program<'_>,
    iface: &Interface,
    direction: TcDirection,
    link_path: &Path,
) -> Result<bool> {
    drop_severed(link_path, iface)?;
    if update_pinned(prog, link_path)? {
        return Ok(true);
    }
    TcxAttachment::attach(prog, iface, direction)?.pin(link_path)?;
    Ok(false)
}

/// Refuses when one of `programs` is already on the interface and not one of the links
/// whose program is in `pinned` (our own persisted links): another ebpf-net would fight us
/// for the same packets.
pub fn refuse_if_attached(
    subcommand: &str,
    programs: &[&str],
    iface: &Interface,
    pinned: &[u32],
) -> Result<()> {
    for direction in TcDirection::BOTH {
        for prog in crate::kernel::tc::tc_programs(iface.index, direction)? {
            if programs.contains(&prog.name.as_str()) && !pinned.contains(&prog.id) {
                anyhow::bail!(
                    "another ebpf-net {subcommand} is already attached to {} {} (program {}); stop it first",
                    iface.name,
                    direction.name(),
                    prog.id
                );
            }
        }
    }
    Ok(())
}
