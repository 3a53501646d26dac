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
mod media;
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
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(session::run(args.connect)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sandcast-agent: {e:#}");
            std::process::ExitCode::from(1)
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
