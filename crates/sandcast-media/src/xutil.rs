//! Connection, event wait and clock functions shared by the X clients of this crate.

use std::os::fd::AsRawFd;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use x11rb::connection::Connection;
use x11rb::protocol::Event;
use x11rb::rust_connection::RustConnection;

use crate::error::{Error, Result};

/// Opens a connection to `display` (such as `:99`).
pub(crate) fn connect(display: &str) -> Result<(RustConnection, usize)> {
    RustConnection::connect(Some(display)).map_err(|source| Error::Connect {
        display: display.to_owned(),
        source,
    })
}

/// Waits for the next event, until `deadline` if one is given.
///
/// Blocks in `poll(2)` on the connection's socket, so an idle display costs
/// no CPU. Events x11rb already read (while waiting for a reply) are
/// returned first. Only the thread that owns `conn` may call this.
pub(crate) fn wait_event(
    conn: &RustConnection,
    deadline: Option<Instant>,
) -> Result<Option<Event>> {
    loop {
        if let Some(ev) = conn.poll_for_event()? {
            return Ok(Some(ev));
        }
        let timeout_ms: i32 = match deadline {
            None => -1,
            Some(d) => {
                let now = Instant::now();
                if now >= d {
                    return Ok(None);
                }
                // Round up so a wait never ends a hair before the deadline.
                (d - now).as_micros().div_ceil(1000).min(i32::MAX as u128) as i32
            }
        };
        let mut pfd = libc::pollfd {
            fd: conn.stream().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let rc = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if rc < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                return Err(Error::Os {
                    what: "poll on the X connection",
                    source: err,
                });
            }
        }
        if rc > 0 && pfd.revents & (libc::POLLHUP | libc::POLLERR) != 0 {
            // Whatever was still readable came first; then the end.
            if let Some(ev) = conn.poll_for_event()? {
                return Ok(Some(ev));
            }
            return Err(Error::Connection(
                x11rb::errors::ConnectionError::UnknownError,
            ));
        }
    }
}

/// Microseconds since the Unix epoch.
pub(crate) fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}
