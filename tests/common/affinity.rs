//! Session affinity that expires: whether clients move once their timeout has passed.

use std::net::SocketAddr;
use std::time::Duration;

/// How many clients reach another backend than in `before` (each client's backend, in order)
/// once `timeout` has passed without a connection of theirs: waits the timeout and half a
/// second, asks `backends` again, and tries up to 3 times until one moved (a client past its
/// timeout makes a new choice, which may be its old backend again).
pub fn moved_after_timeout(
    timeout: Duration,
    mut before: Vec<SocketAddr>,
    mut backends: impl FnMut() -> Vec<SocketAddr>,
) -> usize {
    for _ in 0..3 {
        std::thread::sleep(timeout + Duration::from_millis(500));
        let after = backends();
        let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
        if moved > 0 {
            return moved;
        }
        before = after;
    }
    0
}
