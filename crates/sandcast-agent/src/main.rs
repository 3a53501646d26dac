//! `sandcast-agent`: the first process inside every session.
//!
//! It connects out to the server over the agent channel (a Unix socket bound
//! into the sandbox, or vsock from a microVM), receives the session's whole
//! configuration there, and supervises the display, the browser, the VNC
//! server and the operator's launch command until the server says stop or
//! goes away. It also streams the display as encoded video and applies the
//! viewers' input, clipboard and resizes. Nothing inside a session listens
//! for the host.

mod channel;
mod children;
mod devtools;
mod files;
mod logging;
mod media;
mod mmds;
mod opener;
mod policy;
mod restart;
mod session;
mod supervisor;
mod vm_init;

use clap::Parser;

/// Command line of the agent.
#[derive(Debug, Parser)]
#[command(version, about = "The sandcast session agent")]
struct Args {
    /// Where the server is: `unix:<path>` or `vsock:<cid>:<port>`.
    #[arg(long, value_parser = parse_target)]
    connect: channel::Target,
    /// Run as the init of a microVM: make the read-only image root a
    /// writable system first. Implied when the agent is PID 1.
    #[arg(long)]
    vm: bool,
    /// Words the kernel passes to init from its own command line; accepted
    /// (and ignored) only in a microVM.
    #[arg(hide = true)]
    kernel_words: Vec<String>,
}

fn parse_target(s: &str) -> Result<channel::Target, String> {
    s.parse()
}

/// Parses the agent's argv. The kernel hands init what follows `--` on its
/// command line; a `--` that still reaches us is dropped so the flags after
/// it count as flags.
fn parse_args(argv: impl IntoIterator<Item = String>, pid1: bool) -> Result<Args, clap::Error> {
    let argv: Vec<String> = argv.into_iter().filter(|a| a != "--").collect();
    let args = Args::try_parse_from(argv)?;
    if !(args.kernel_words.is_empty() || args.vm || pid1) {
        return Err(clap::Error::raw(
            clap::error::ErrorKind::UnknownArgument,
            format!("unexpected arguments {:?}\n", args.kernel_words),
        ));
    }
    Ok(args)
}

fn main() -> std::process::ExitCode {
    let pid1 = std::process::id() == 1;
    // `sandcast-agent open URL…`: what the session's `xdg-open` runs.
    let argv: Vec<String> = std::env::args().collect();
    if !pid1 && argv.get(1).map(String::as_str) == Some("open") {
        return std::process::ExitCode::from(opener::client_main(&argv[2..]));
    }
    let args = match parse_args(std::env::args(), pid1) {
        Ok(a) => a,
        Err(e) => e.exit(),
    };
    if (args.vm || pid1)
        && let Err(e) = vm_init::prepare_vm_root()
    {
        // Without a writable root nothing of the session can run.
        eprintln!("sandcast-agent: preparing the microVM root: {e}");
        return std::process::ExitCode::from(1);
    }
    if pid1 && let Some(code) = split_init() {
        return code;
    }
    // Standard error until the control connection is up, then the session's log.
    logging::install();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    // In a microVM with a network interface, the backend published the
    // session's id and agent token hash in MMDS; without an interface there
    // is no MMDS to check against.
    let mmds = ((args.vm || pid1) && vm_init::has_mmds_interface()).then_some(mmds::MMDS_ADDR);
    match rt.block_on(session::run(args.connect, mmds)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sandcast-agent: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}

/// In a microVM the agent is init, so every orphan of the session is
/// re-parented to it and must be reaped; but the supervisor waits for its
/// own children by pid, and a `waitpid(-1)` beside it would steal their exit
/// statuses. So init forks before any thread exists: the child goes on as
/// the agent (`None`), the parent only reaps and, once the agent has ended,
/// restarts the VM, which ends it (`reboot=k`).
fn split_init() -> Option<std::process::ExitCode> {
    // SAFETY: called before the runtime or any other thread exists.
    let agent = unsafe { libc::fork() };
    match agent {
        0 => None,
        -1 => {
            // Still run the session; orphans then stay zombies.
            eprintln!(
                "sandcast-agent: fork for the init reaper: {}",
                std::io::Error::last_os_error()
            );
            None
        }
        agent => {
            reap_until(agent);
            // SAFETY: plain system calls; reboot returns only on failure.
            unsafe {
                libc::sync();
                libc::reboot(libc::RB_AUTOBOOT);
            }
            // Init exiting panics the kernel, which reboots as well (panic=1).
            Some(std::process::ExitCode::from(1))
        }
    }
}

/// Reaps every child until `agent` has ended; returns how many others it
/// reaped.
fn reap_until(agent: libc::pid_t) -> usize {
    let mut others = 0;
    loop {
        let mut status = 0;
        // SAFETY: waits for any child; `status` is a valid out pointer.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid == agent {
            return others;
        }
        if pid > 0 {
            others += 1;
        } else if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            // No children left at all: the agent is gone too.
            return others;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn kernel_command_line_is_accepted() {
        let a = parse_args(argv("sandcast-agent -- --vm --connect vsock:2:1024"), true).unwrap();
        assert!(a.vm);
        assert_eq!(a.connect, channel::Target::Vsock { cid: 2, port: 1024 });
        let a = parse_args(argv("sandcast-agent --vm --connect vsock:2:1024"), true).unwrap();
        assert!(a.vm);
        // Stray kernel words are tolerated in a microVM only.
        let a = parse_args(
            argv("sandcast-agent --vm --connect vsock:2:1024 splash"),
            true,
        );
        assert_eq!(a.unwrap().kernel_words, ["splash"]);
    }

    #[test]
    #[allow(clippy::zombie_processes, reason = "reap_until waits for it")]
    fn init_reaps_orphans_until_the_agent_ends() {
        // As a subreaper, this process gets the orphans init would get.
        // SAFETY: prctl with plain integer arguments.
        assert_eq!(unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) }, 0);
        // The inner shell leaves `sleep` behind as an orphan that ends
        // before the outer shell (standing in for the agent) does.
        let agent = std::process::Command::new("sh")
            .args(["-c", "sh -c 'sleep 0.1 &'; sleep 0.6"])
            .spawn()
            .unwrap();
        let others = reap_until(agent.id() as libc::pid_t);
        // SAFETY: as above.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 0) };
        assert!(others >= 1, "reaped {others} besides the agent");
    }

    #[test]
    fn sandbox_command_line_is_unchanged() {
        let a = parse_args(
            argv("sandcast-agent --connect unix:/run/sandcast/agent.sock"),
            false,
        )
        .unwrap();
        assert!(!a.vm);
        assert_eq!(
            a.connect,
            channel::Target::Unix("/run/sandcast/agent.sock".into())
        );
        let e = parse_args(argv("sandcast-agent --connect unix:/a stray"), false).unwrap_err();
        assert!(e.to_string().contains("stray"), "{e}");
        let e = parse_args(argv("sandcast-agent --connect tcp:1:2"), false).unwrap_err();
        assert!(e.to_string().contains("tcp:1:2"), "{e}");
    }
}
