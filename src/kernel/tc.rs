//! Legacy tc attach, for kernels without tcx (before 6.6): a clsact qdisc (created only when
//! the interface has none, removed only when we created it and nothing else is left on it)
//! and cls_bpf direct-action filters through libbpf's tc hook (libbpf-rs `TcHook`). Our
//! ingress filter runs first (priority 1), our egress filter last (priority 65535); programs
//! return "next" (TC_ACT_UNSPEC) so foreign filters still see every packet, and foreign
//! qdiscs and filters are never touched.
//!
//! Unlike a tcx link a filter outlives its process: a foreground run records each filter it
//! adds under [`RUN_DIR`] (interface, side, handle, priority, pid), so `status` shows the
//! filters of a SIGKILLed run as orphaned and `down` removes them; a persisted one records
//! them in its pin directory (`tc_ingress`, `tc_egress`) next to its pinned programs.
//!
//! [`attach_tc`] and [`attach_or_update_pinned_tc`] are what datapaths call: they choose tcx
//! or legacy by `--tc` (auto: tcx where the kernel has it).

use std::fs;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};
use libbpf_rs::{Program, TcHook, TcHookBuilder, TC_EGRESS, TC_INGRESS};

use crate::kernel::addr::Interface;
use crate::kernel::attach::{self, AttachedProgram, TcDirection, TcxAttachment};

/// How tc programs attach (`--tc`).
#[derive(clap::ValueEnum, serde::Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum TcMode {
    /// tcx where the kernel has it (6.6), else legacy
    #[default]
    Auto,
    /// tcx links (Linux 6.6 or later)
    Tcx,
    /// a clsact qdisc and cls_bpf filters (any kernel)
    Legacy,
}

impl TcMode {
    pub fn name(self) -> &'static str {
        match self {
            TcMode::Auto => "auto",
            TcMode::Tcx => "tcx",
            TcMode::Legacy => "legacy tc",
        }
    }
}

static CHOSEN: OnceLock<TcMode> = OnceLock::new();
static USED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Records the `--tc` choice of this process; auto is resolved here, once.
pub fn set_mode(mode: TcMode) {
    let _ = CHOSEN.set(match mode {
        TcMode::Auto if tcx_supported() => TcMode::Tcx,
        TcMode::Auto => TcMode::Legacy,
        mode => mode,
    });
}

/// tcx or legacy, as chosen (auto when nothing was set).
pub fn mode() -> TcMode {
    if CHOSEN.get().is_none() {
        set_mode(TcMode::Auto);
    }
    *CHOSEN.get().expect("set above")
}

/// A re-run kept the programs running on an interface: its ready line still says how tc
/// programs are attached, when this directory has tcx links.
pub fn note_kept(pins: &crate::kernel::pin::PinDir) {
    let tcx = TcDirection::BOTH
        .iter()
        .any(|direction| pins.link_file(*direction).exists());
    if tcx {
        USED.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// For the ready line: " (legacy tc)" once a tc program was attached that way, else "".
pub fn ready_note() -> String {
    if USED.load(std::sync::atomic::Ordering::Relaxed) {
        format!(" ({})", mode().name())
    } else {
        String::new()
    }
}

/// Whether the kernel has tcx (6.6): a tcx query on the loopback device answers.
pub fn tcx_supported() -> bool {
    attach::tcx_programs(1, TcDirection::Ingress).is_ok()
}

/// Attaches for a foreground run, as `--tc` says; dropping the value detaches.
pub fn attach_tc(
    prog: &Program<'_>,
    iface: &Interface,
    direction: TcDirection,
) -> Result<Box<dyn std::any::Any>> {
    USED.store(true, std::sync::atomic::Ordering::Relaxed);
    Ok(match mode() {
        TcMode::Legacy => Box::new(TcAttachment::attach(prog, iface, direction)?),
        _ => Box::new(TcxAttachment::attach(prog, iface, direction)?),
    })
}

/// [`attach_or_update_pinned_tc`] for each of a datapath's programs, each at its direction's
/// link pin in `pins`; true when every one was there already and replaced in place.
pub fn attach_or_update_pinned_all(
    progs: &[(&Program<'_>, TcDirection)],
    iface: &Interface,
    pins: &crate::kernel::pin::PinDir,
) -> Result<bool> {
    let mut updated = false;
    for (prog, direction) in progs {
        updated |= attach_or_update_pinned_tc(prog, iface, *direction, &pins.link_file(*direction))?;
    }
    Ok(updated)
}

/// Persists `prog` on one side of an interface, as `--tc` says (or as it was persisted
/// before): replaces the program in place when it is there already (true), else attaches
/// and records it (false). `link_path` is the tcx link's pin; a legacy filter is recorded
/// next to it.
pub fn attach_or_update_pinned_tc(
    prog: &Program<'_>,
    iface: &Interface,
    direction: TcDirection,
    link_path: &Path,
) -> Result<bool> {
    USED.store(true, std::sync::atomic::Ordering::Relaxed);
    let dir = link_path.parent().context("a pin path has a directory")?;
    let pinned = record_file(dir, direction);
    if let Some(record) = Record::read(&pinned) {
        // a re-run replaces the program atomically and keeps the filter (and its place)
        if record.ifindex == iface.index && record.prog_id().is_some() {
            TcAttachment::replace(prog, &record)?;
            pin_program(prog, &pinned)?;
            return Ok(true);
        }
        // the filter went with its interface (deleted, maybe re-created under another index),
        // or someone removed it: a new one, and the maps kept
        let why = if record.ifindex == iface.index {
            "it is gone".to_string()
        } else {
            format!("it was on ifindex {}, an interface since deleted", record.ifindex)
        };
        fs::remove_file(&pinned).with_context(|| format!("removing {}", pinned.display()))?;
        eprintln!(
            "re-attaching to {} (ifindex {}): the persisted {} tc filter was lost ({why})",
            iface.name,
            iface.index,
            direction.name()
        );
    }
    if link_path.exists() || mode() == TcMode::Tcx {
        return attach::attach_or_update_pinned(prog, iface, direction, link_path);
    }
    let attachment = TcAttachment::attach(prog, iface, direction)?;
    attachment.persist(prog, dir)?;
    Ok(false)
}

const INGRESS_PRIORITY: u32 = 1;
const EGRESS_PRIORITY: u32 = 0xffff;
/// Our filters' handles: HANDLE_BASE and up (several monitors may share one side).
const HANDLE_BASE: u32 = 0xeb9f_0000;
const HANDLE_TRIES: u32 = 64;
/// The interfaces whose clsact qdisc this process created.
static CREATED_QDISCS: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());
/// Where foreground runs record their filters.
pub const RUN_DIR: &str = "/run/ebpf-net/tc";

fn priority(direction: TcDirection) -> u32 {
    match direction {
        TcDirection::Ingress => INGRESS_PRIORITY,
        TcDirection::Egress => EGRESS_PRIORITY,
    }
}

fn attach_point(direction: TcDirection) -> libbpf_sys::bpf_tc_attach_point {
    match direction {
        TcDirection::Ingress => TC_INGRESS,
        TcDirection::Egress => TC_EGRESS,
    }
}

/// A persisted filter's record: its program pinned as `tc_SIDE@ifindex=..,handle=..,...` (a
/// BPF filesystem holds no plain files, so the name is the record).
fn record_file(dir: &Path, direction: TcDirection) -> PathBuf {
    let prefix = format!("tc_{}@", direction.name());
    fs::read_dir(dir)
        .ok()
        .and_then(|entries| {
            entries.filter_map(|entry| entry.ok()).find(|entry| {
                entry
                    .file_name()
                    .to_str()
                    .is_some_and(|name| name.starts_with(&prefix))
            })
        })
        .map_or_else(
            || dir.join(format!("tc_{}@none", direction.name())),
            |entry| entry.path(),
        )
}

fn pin_program(prog: &Program<'_>, path: &Path) -> Result<()> {
    let _ = fs::remove_file(path);
    let cpath = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    // SAFETY: a loaded program's fd and a NUL-terminated path.
    let ret =
        unsafe { libbpf_sys::bpf_obj_pin(std::os::fd::AsRawFd::as_raw_fd(&prog.as_fd()), cpath.as_ptr()) };
    if ret != 0 {
        return Err(std::io::Error::from_raw_os_error(-ret))
            .with_context(|| format!("pinning program at {}", path.display()));
    }
    Ok(())
}

/// Where one of our filters is: enough to find, replace or remove it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub ifindex: u32,
    pub direction: TcDirection,
    pub handle: u32,
    pub priority: u32,
    /// whether we created the clsact qdisc
    pub created_qdisc: bool,
    /// the foreground run that added it (0: persisted)
    pub pid: u32,
}

impl Record {
    fn line(&self) -> String {
        format!(
            "ifindex={} direction={} handle={:#x} priority={} created_qdisc={} pid={}\n",
            self.ifindex,
            self.direction.name(),
            self.handle,
            self.priority,
            self.created_qdisc as u8,
            self.pid
        )
    }

    fn parse(text: &str) -> Option<Self> {
        let field = |name: &str| {
            text.split_whitespace()
                .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
        };
        let number = |name: &str| -> Option<u32> {
            let value = field(name)?;
            match value.strip_prefix("0x") {
                Some(hex) => u32::from_str_radix(hex, 16).ok(),
                None => value.parse().ok(),
            }
        };
        Some(Self {
            ifindex: number("ifindex")?,
            direction: match field("direction")? {
                "ingress" => TcDirection::Ingress,
                "egress" => TcDirection::Egress,
                _ => return None,
            },
            handle: number("handle")?,
            priority: number("priority")?,
            created_qdisc: number("created_qdisc")? != 0,
            pid: number("pid")?,
        })
    }

    /// Whether both name the same filter (interface, side, handle, priority).
    pub fn same_place(&self, other: &Record) -> bool {
        self.ifindex == other.ifindex
            && self.direction == other.direction
            && self.handle == other.handle
            && self.priority == other.priority
    }

    /// From a run record's text, or from a persisted record's name (`tc_SIDE@k=v,k=v`).
    pub fn read(path: &Path) -> Option<Self> {
        if let Some((_, fields)) = path.file_name()?.to_str()?.split_once('@') {
            return Self::parse(&fields.replace(',', " "));
        }
        Self::parse(&fs::read_to_string(path).ok()?)
    }

    fn hook(&self, fd: std::os::fd::BorrowedFd<'_>) -> TcHook {
        let mut builder = TcHookBuilder::new(fd);
        builder
            .ifindex(self.ifindex as i32)
            .handle(self.handle)
            .priority(self.priority);
        builder.hook(attach_point(self.direction))
    }

    /// The id of the program in the filter, if the filter is there.
    pub fn prog_id(&self) -> Option<u32> {
        // SAFETY: query never uses the fd; it only needs the hook's place.
        let null = unsafe { std::os::fd::BorrowedFd::borrow_raw(0) };
        // an interface without a clsact qdisc is the common case: libbpf would print the
        // kernel's "Parent Qdisc doesn't exists" for every handle asked about
        let printer = libbpf_rs::set_print(None);
        let id = self.hook(null).query().ok().filter(|&id| id != 0);
        libbpf_rs::set_print(printer);
        id
    }

    /// Removes the filter, then the clsact qdisc when we created it and no filter is left
    /// on either side. A filter already gone (the interface went) is not an error.
    pub fn remove(&self) -> Result<()> {
        // SAFETY: fd 0 is never used by detach or destroy; they only need the hook's place.
        let null = unsafe { std::os::fd::BorrowedFd::borrow_raw(0) };
        match self.hook(null).detach() {
            Ok(()) => {}
            Err(err) if matches!(err.kind(), libbpf_rs::ErrorKind::NotFound) => {}
            Err(err) if err.to_string().contains("No such device") => return Ok(()),
            Err(err) => {
                return Err(err).with_context(|| {
                    format!(
                        "removing our {} tc filter (handle {:#x}) from ifindex {}",
                        self.direction.name(),
                        self.handle,
                        self.ifindex
                    )
                })
            }
        }
        if self.created_qdisc
            && filter_count(self.ifindex, TcDirection::Ingress).unwrap_or(1) == 0
            && filter_count(self.ifindex, TcDirection::Egress).unwrap_or(1) == 0
        {
            let mut hook = libbpf_sys::bpf_tc_hook {
                sz: size_of::<libbpf_sys::bpf_tc_hook>() as _,
                ifindex: self.ifindex as i32,
                attach_point: TC_INGRESS | TC_EGRESS,
                ..Default::default()
            };
            // SAFETY: a hook of the right size naming the clsact qdisc.
            unsafe { libbpf_sys::bpf_tc_hook_destroy(&mut hook) };
        }
        Ok(())
    }
}

/// Our program on one side of an interface through a cls_bpf filter. Dropping it removes the
/// filter (and the clsact qdisc when we created it and nothing else is on it).
pub struct TcAttachment {
    record: Record,
    run_file: Option<PathBuf>,
    keep: bool,
}

impl TcAttachment {
    pub fn attach(prog: &Program<'_>, iface: &Interface, direction: TcDirection) -> Result<Self> {
        let what = || {
            format!(
                "attaching {} to {} {} (legacy tc)",
                prog.name().to_string_lossy(),
                iface.name,
                direction.name()
            )
        };
        let mut qdisc = libbpf_sys::bpf_tc_hook {
            sz: size_of::<libbpf_sys::bpf_tc_hook>() as _,
            ifindex: iface.index as i32,
            attach_point: attach_point(direction),
            ..Default::default()
        };
        // SAFETY: a hook of the right size; EEXIST means the interface has a clsact already.
        // libbpf would print the kernel's "Exclusivity flag on, cannot modify" for that, the
        // common case (the other side's filter made it, or someone else did): any other
        // failure is reported below with its errno
        let printer = libbpf_rs::set_print(None);
        let ret = unsafe { libbpf_sys::bpf_tc_hook_create(&mut qdisc) };
        libbpf_rs::set_print(printer);
        let created_qdisc = match ret {
            0 => {
                CREATED_QDISCS
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(iface.index);
                true
            }
            // ours all the same when this process created it for the other side: whichever
            // of our filters goes last takes the qdisc with it
            ret if -ret == libc::EEXIST => CREATED_QDISCS
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(&iface.index),
            ret => {
                return Err(std::io::Error::from_raw_os_error(-ret))
                    .with_context(|| format!("{}: creating a clsact qdisc", what()))
            }
        };
        let mut record = Record {
            ifindex: iface.index,
            direction,
            handle: HANDLE_BASE,
            priority: priority(direction),
            created_qdisc,
            pid: std::process::id(),
        };
        let mut last = None;
        for offset in 0..HANDLE_TRIES {
            record.handle = HANDLE_BASE + offset;
            // no replace: EEXIST when another of ours holds this handle; try the next
            match record.hook(prog.as_fd()).attach() {
                Ok(_) => {
                    last = None;
                    break;
                }
                Err(err) if err.to_string().contains("exists") => last = Some(err),
                Err(err) => {
                    // takes the qdisc away again if we created it for this filter
                    let _ = record.remove();
                    return Err(err).with_context(what);
                }
            }
        }
        if let Some(err) = last {
            let _ = record.remove();
            return Err(err).with_context(what);
        }
        let run_file = Path::new(RUN_DIR).join(format!(
            "{}-{}-{}-{:x}",
            netns_inode(),
            iface.index,
            direction.name(),
            record.handle
        ));
        let run_file = fs::create_dir_all(RUN_DIR)
            .and_then(|()| fs::write(&run_file, record.line()))
            .ok()
            .map(|()| run_file);
        Ok(Self {
            record,
            run_file,
            keep: false,
        })
    }

    /// Keeps the filter past this process, its program pinned in `dir` under a name that
    /// records the filter (a persisted run).
    fn persist(mut self, prog: &Program<'_>, dir: &Path) -> Result<()> {
        let record = Record {
            pid: 0,
            ..self.record.clone()
        };
        let name = format!(
            "tc_{}@{}",
            record.direction.name(),
            record.line().trim().replace(' ', ",")
        );
        pin_program(prog, &dir.join(name))?;
        self.keep = true;
        Ok(())
    }

    /// Swaps `prog` into the recorded filter in one step (BPF_TC_F_REPLACE): the hook never
    /// runs without a program.
    fn replace(prog: &Program<'_>, record: &Record) -> Result<()> {
        let mut hook = record.hook(prog.as_fd());
        hook.replace(true);
        hook.attach().with_context(|| {
            format!(
                "replacing the program of our {} tc filter (handle {:#x}) on ifindex {}",
                record.direction.name(),
                record.handle,
                record.ifindex
            )
        })?;
        Ok(())
    }
}

impl Drop for TcAttachment {
    fn drop(&mut self) {
        if let Some(path) = &self.run_file {
            let _ = fs::remove_file(path);
        }
        if !self.keep {
            let _ = self.record.remove();
        }
    }
}

/// The legacy filters a persisted directory recorded, with the program in each. The filters
/// are asked for in the namespace the directory is kept for (`.../<netns>/<interface>`),
/// which need not be this thread's: `status` looks at every namespace's.
pub fn recorded(dir: &Path) -> Vec<(Record, Option<u32>)> {
    let records: Vec<Record> = TcDirection::BOTH
        .iter()
        .filter_map(|&direction| Record::read(&record_file(dir, direction)))
        .collect();
    if records.is_empty() {
        return Vec::new();
    }
    let ask = || records.iter().map(Record::prog_id).collect::<Vec<_>>();
    let key = dir
        .parent()
        .and_then(Path::file_name)
        .and_then(|name| name.to_str())
        .unwrap_or_default();
    // an unnamed namespace we are not in cannot be entered: asked here, as before
    let ids = crate::kernel::netns::in_key(key, ask).unwrap_or_else(ask);
    records.into_iter().zip(ids).collect()
}

/// Removes the legacy filters a persisted directory recorded (before its pins go).
pub fn remove_recorded(dir: &Path) -> Result<()> {
    for (record, _) in recorded(dir) {
        record.remove()?;
    }
    Ok(())
}

/// A filter a foreground run added and left behind (its process is gone), or still holds.
pub struct RunFilter {
    pub path: PathBuf,
    pub record: Record,
    pub alive: bool,
}

/// The inode of this thread's network namespace: run records are kept per namespace.
fn netns_inode() -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::metadata("/proc/thread-self/ns/net").map_or(0, |meta| meta.ino())
}

/// Every filter foreground runs recorded in this network namespace.
pub fn run_filters() -> Vec<RunFilter> {
    let Ok(entries) = fs::read_dir(RUN_DIR) else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| {
            let path = entry.ok()?.path();
            let name = path.file_name()?.to_str()?;
            if name.split('-').next()? != netns_inode().to_string() {
                return None;
            }
            let record = Record::read(&path)?;
            let alive = Path::new(&format!("/proc/{}", record.pid)).exists();
            Some(RunFilter { path, record, alive })
        })
        .collect()
}

/// Removes the filters of killed foreground runs; returns what it removed, for `down`.
pub fn remove_orphaned() -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for filter in run_filters().into_iter().filter(|filter| !filter.alive) {
        filter.record.remove()?;
        let _ = fs::remove_file(&filter.path);
        removed.push(format!(
            "removed the {} tc filter (handle {:#x}) on ifindex {} of a killed run (pid {})",
            filter.record.direction.name(),
            filter.record.handle,
            filter.record.ifindex,
            filter.record.pid
        ));
    }
    Ok(removed)
}

/// Removes the filters killed foreground runs left on `ifindex` whose program is one of
/// `programs` (a new run of the same datapath takes over from them); returns what it removed.
pub fn remove_orphaned_on(ifindex: u32, programs: &[&str]) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for filter in run_filters()
        .into_iter()
        .filter(|filter| !filter.alive && filter.record.ifindex == ifindex)
    {
        let name = filter
            .record
            .prog_id()
            .and_then(|id| attach::program_info(id).ok())
            .map(|info| info.0);
        match name {
            Some(name) if programs.contains(&name.as_str()) => {}
            // the filter is gone already: only its record is left
            None => {
                let _ = fs::remove_file(&filter.path);
                continue;
            }
            Some(_) => continue,
        }
        filter.record.remove()?;
        let _ = fs::remove_file(&filter.path);
        removed.push(format!(
            "removed the {} tc filter (handle {:#x}) a killed run (pid {}) left",
            filter.record.direction.name(),
            filter.record.handle,
            filter.record.pid
        ));
    }
    Ok(removed)
}

/// Our legacy filters on one side of an interface: the program in each (by the handles we
/// use), as `status` and the "already attached?" check see them.
pub fn legacy_programs(ifindex: u32, direction: TcDirection) -> Vec<(AttachedProgram, Record)> {
    (0..HANDLE_TRIES)
        .map(|offset| Record {
            ifindex,
            direction,
            handle: HANDLE_BASE + offset,
            priority: priority(direction),
            created_qdisc: false,
            pid: 0,
        })
        .map_while(|record| {
            let id = record.prog_id()?;
            let name = attach::program_info(id).ok()?.0;
            Some((AttachedProgram { id, name }, record))
        })
        .collect()
}

/// The programs on one side of an interface, tcx and legacy.
pub fn tc_programs(ifindex: u32, direction: TcDirection) -> Result<Vec<AttachedProgram>> {
    let mut programs = if tcx_supported() {
        attach::tcx_programs(ifindex, direction)?
    } else {
        Vec::new()
    };
    programs.extend(
        legacy_programs(ifindex, direction)
            .into_iter()
            .map(|(prog, _)| prog),
    );
    Ok(programs)
}

/// How many filters (anyone's) are on one side of the interface's clsact qdisc.
fn filter_count(ifindex: u32, direction: TcDirection) -> std::io::Result<usize> {
    use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST};
    use netlink_packet_route::tc::{TcHandle, TcMessage};
    use netlink_packet_route::RouteNetlinkMessage;
    use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut request = TcMessage::default();
    request.header.index = ifindex as i32;
    request.header.parent = TcHandle {
        major: 0xffff,
        minor: match direction {
            TcDirection::Ingress => 0xfff2,
            TcDirection::Egress => 0xfff3,
        },
    };
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    header.sequence_number = 1;
    let mut message = NetlinkMessage::new(
        header,
        NetlinkPayload::from(RouteNetlinkMessage::GetTrafficFilter(request)),
    );
    message.finalize();
    let mut buffer = vec![0; message.buffer_len()];
    message.serialize(&mut buffer);
    socket.send(&buffer, 0)?;
    let mut count = 0;
    loop {
        let mut buffer = Vec::with_capacity(64 * 1024);
        socket.recv(&mut buffer, 0)?;
        let mut offset = 0;
        while offset < buffer.len() {
            let answer = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buffer[offset..])
                .map_err(|err| std::io::Error::new(std::io::ErrorKind::InvalidData, err))?;
            let length = answer.header.length as usize;
            if length == 0 {
                return Ok(count);
            }
            offset += length.next_multiple_of(4);
            match answer.payload {
                NetlinkPayload::Done(_) => return Ok(count),
                NetlinkPayload::Error(error) if error.code.is_some() => return Err(error.to_io()),
                // a filter's chain has one message for its tcf_proto (handle 0) and one per
                // filter in it; count filters
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewTrafficFilter(msg))
                    if msg.header.handle != TcHandle::default() =>
                {
                    count += 1
                }
                _ => {}
            }
        }
    }
}

/// Fails unless `--tc tcx` can work here.
pub fn check_mode(mode: TcMode) -> Result<()> {
    if mode == TcMode::Tcx && !tcx_supported() {
        bail!(
            "--tc tcx: this kernel ({}) has no tcx (Linux 6.6 or later); use --tc legacy or auto",
            crate::kernel::probe::kernel_release()
        );
    }
    Ok(())
}
