//! A private Xvfb for tests and benchmarks.
//!
//! The agent supervises its own Xvfb; this one exists so tests and benchmarks
//! run against a real X server without picking a display number by hand:
//! `-displayfd` makes Xvfb choose a free display and write its number once
//! it accepts connections, so readiness is an event, not a guess.

use std::io::{BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};

use crate::error::{Error, Result};

/// A running Xvfb, killed and reaped on drop.
#[derive(Debug)]
pub struct Xvfb {
    child: Child,
    display: String,
}

impl Xvfb {
    /// Starts `Xvfb` with one `width`x`height` 24-bit screen and waits until
    /// it accepts connections.
    pub fn start(width: u32, height: u32) -> Result<Xvfb> {
        Self::start_with_args(width, height, &[])
    }

    /// Like [`Xvfb::start`] with extra arguments for Xvfb.
    pub fn start_with_args(width: u32, height: u32, extra: &[&str]) -> Result<Xvfb> {
        let (reader, writer) = std::io::pipe().map_err(|source| Error::Os {
            what: "pipe for -displayfd",
            source,
        })?;
        let wfd = writer.as_raw_fd();
        let mut cmd = Command::new("Xvfb");
        cmd.args(["-displayfd", &wfd.to_string()])
            .args(["-screen", "0", &format!("{width}x{height}x24")])
            .args(["-nolisten", "tcp", "-noreset"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: only async-signal-safe fcntl and prctl between fork and
        // exec; the child inherits the pipe's write end (std opens it
        // close-on-exec).
        unsafe {
            cmd.pre_exec(move || {
                if libc::fcntl(wfd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // Xvfb dies with the thread that started it, even if that is
                // killed before Drop runs: no server outlives its test.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|source| Error::Os {
            what: "spawn Xvfb",
            source,
        })?;
        // Our copy of the write end must close, or EOF never comes if Xvfb dies.
        drop(writer);
        let mut line = String::new();
        let read = BufReader::new(reader).read_line(&mut line);
        let number = line.trim();
        if read.is_err() || number.is_empty() || number.parse::<u32>().is_err() {
            let _ = child.kill();
            let status = child.wait().ok();
            return Err(Error::Unsupported(format!(
                "Xvfb did not report a display (read {line:?}, exit {status:?})"
            )));
        }
        Ok(Xvfb {
            display: format!(":{number}"),
            child,
        })
    }

    /// The display name, such as `:7`.
    pub fn display(&self) -> &str {
        &self.display
    }

    /// Xvfb's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Xvfb {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_on_a_free_display_and_accepts_connections() {
        let a = Xvfb::start(640, 480).unwrap();
        let b = Xvfb::start(320, 200).unwrap();
        assert_ne!(a.display(), b.display());
        let (conn, screen) = crate::xutil::connect(b.display()).unwrap();
        let root = &x11rb::connection::Connection::setup(&conn).roots[screen];
        assert_eq!((root.width_in_pixels, root.height_in_pixels), (320, 200));
    }

    #[test]
    fn a_bad_display_name_is_named_in_the_error() {
        let err = crate::xutil::connect(":nonsense").unwrap_err();
        assert!(err.to_string().contains(":nonsense"), "{err}");
    }
}
