//! `sandcast-agent`: the first process inside every session.
//!
//! It connects out to the server over the agent channel (a Unix socket bound
//! into the sandbox, or vsock from a microVM), receives the session's whole
//! configuration there, and supervises the display, the browser, the VNC
//! server and the operator's launch command until the server says stop or
//! goes away. Nothing inside a session listens for the host.

mod channel;
mod children;
mod restart;
mod session;
mod supervisor;

use clap::Parser;

/// Command line of the agent.
#[derive(Debug, Parser)]
#[command(version, about = "The sandcast session agent")]
struct Args {
    /// Where the server is: `unix:<path>` or `vsock:<cid>:<port>`.
    #[arg(long, value_parser = parse_target)]
    connect: channel::Target,
}

fn parse_target(s: &str) -> Result<channel::Target, String> {
    s.parse()
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
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
