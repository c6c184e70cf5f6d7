//! systemd's readiness protocol (sd_notify(3)): one datagram to `$NOTIFY_SOCKET` per change of
//! state, so a `Type=notify` unit is started when `ready` prints, not when the process forks.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Every program attached and every map filled (again, after a reload): `READY=1`, with the
/// line the log got as the unit's status.
pub fn ready(status: &str) {
    send(&format!("READY=1\nSTATUS={}", one_line(status)));
}

/// A SIGHUP arrived: the configuration is being read again until the next [`ready`]. systemd
/// wants the time, to tell this reload from an older one (sd_notify(3), `RELOADING=1`).
pub fn reloading() {
    let usec = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map_or(0, |t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1_000);
    send(&format!("RELOADING=1\nMONOTONIC_USEC={usec}"));
}

/// SIGINT or SIGTERM: detaching.
pub fn stopping() {
    send("STOPPING=1");
}

/// Sends `state` when systemd (or a test) set `NOTIFY_SOCKET`; a path, or `@name` for an
/// abstract socket. Without the variable, nothing happens: a run from a shell is unchanged.
fn send(state: &str) {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = (|| {
        let bytes = socket.as_encoded_bytes();
        let addr = match bytes.first() {
            Some(b'@') => SocketAddr::from_abstract_name(&bytes[1..])?,
            Some(b'/') => SocketAddr::from_pathname(&socket)?,
            _ => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "neither a path nor @abstract",
                ))
            }
        };
        UnixDatagram::unbound()?.send_to_addr(state.as_bytes(), &addr)
    })();
    if let Err(err) = sent {
        // systemd would time the start out without it: say why
        eprintln!(
            "ebpf-net: warning: could not notify NOTIFY_SOCKET={}: {err}",
            socket.to_string_lossy()
        );
    }
}

/// `STATUS=` is one line of the protocol's newline-separated assignments.
fn one_line(text: &str) -> String {
    text.replace('\n', " ")
}
