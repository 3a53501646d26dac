//! `sandcast`: the server (`serve`), a thin client of its HTTP API
//! (`session`), host checks (`doctor`), image builds (`image`) and
//! benchmarks (`bench`).

mod bench;
mod client;
mod doctor;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use figment::Figment;
use figment::providers::Serialized;

/// Command line.
#[derive(Debug, Parser)]
#[command(
    version,
    about = "Isolated, disposable browsers streamed into your page"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server.
    Serve(ServeArgs),
    /// Manage sessions through a running server's API.
    Session {
        #[command(flatten)]
        conn: client::ConnArgs,
        #[command(subcommand)]
        command: client::SessionCommand,
    },
    /// The nodes of a cluster, through a running node's API.
    Node {
        #[command(flatten)]
        conn: client::ConnArgs,
        #[command(subcommand)]
        command: client::NodeCommand,
    },
    /// Check this host and say exactly what is missing.
    Doctor(ServeArgs),
    /// Build a root file system image.
    Image {
        #[command(subcommand)]
        command: ImageCommand,
    },
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        command: bench::BenchCommand,
    },
}

/// Flags shared by `serve` and `doctor`; they override the file and environment.
#[derive(Debug, Clone, clap::Args)]
struct ServeArgs {
    /// TOML configuration file (default /etc/sandcast/sandcast.toml when present).
    #[arg(long)]
    config: Option<PathBuf>,
    /// HTTP address, e.g. 0.0.0.0:8080.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Data directory (database, sessions, logs, API key).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Backend: sandbox or firecracker.
    #[arg(long)]
    backend: Option<String>,
    /// Create one session once listening and print its viewer URL.
    #[arg(long)]
    open_session: bool,
}

impl ServeArgs {
    fn load(&self) -> Result<sandcast_server::Config, String> {
        let mut flags = Figment::new();
        if let Some(l) = self.listen {
            flags = flags.merge(Serialized::default("listen", l.to_string()));
        }
        if let Some(d) = &self.data_dir {
            flags = flags.merge(Serialized::default("data_dir", d));
        }
        if let Some(b) = &self.backend {
            flags = flags.merge(Serialized::default("backend", b));
        }
        // Other parts of sandcast share the prefix (`SANDCAST_LOG`, the
        // client's `SANDCAST_SERVER`); configuration reads only settings.
        for name in sandcast_server::config::ignored_env() {
            eprintln!("sandcast: ignoring {name}: it names no setting (see docs/configuration.md)");
        }
        sandcast_server::Config::load(self.config.as_deref(), flags)
    }
}

#[derive(Debug, Subcommand)]
enum ImageCommand {
    /// Build an image directory (root file system, ext4, manifest).
    Build {
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// The tiny test image (no browser).
        #[arg(long)]
        tiny: bool,
        /// Ubuntu instead of Debian.
        #[arg(long)]
        ubuntu: bool,
        /// Suite (default bookworm, or noble for Ubuntu).
        #[arg(long)]
        suite: Option<String>,
        /// Mirror URL.
        #[arg(long)]
        mirror: Option<String>,
        /// Agent binary to install (default: beside this executable).
        #[arg(long)]
        agent: Option<PathBuf>,
    },
    /// Check an image directory's manifest for a browser session.
    Check {
        /// Image directory.
        dir: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("sandcast: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve(args) => {
            let config = args.load().map_err(anyhow::Error::msg)?;
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_env("SANDCAST_LOG")
                        .unwrap_or_else(|_| "info".into()),
                )
                .with_writer(std::io::stderr)
                .init();
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(sandcast_server::run(
                config,
                sandcast_server::RunOptions {
                    open_session: args.open_session,
                },
            ))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Session { conn, command } => client::run(&conn, command),
        Command::Node { conn, command } => client::run_node(&conn, command),
        Command::Doctor(args) => doctor::run(&args),
        Command::Image { command } => image(command),
        Command::Bench { command } => bench::run(command),
    }
}

fn image(cmd: ImageCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        ImageCommand::Build {
            out,
            tiny,
            ubuntu,
            suite,
            mirror,
            agent,
        } => {
            let agent = match agent {
                Some(a) => a,
                None => sandcast_server::agent_binary(&Default::default()),
            };
            if !agent.exists() {
                anyhow::bail!(
                    "agent binary {} does not exist: build it with `cargo build --release -p sandcast-agent` or pass --agent",
                    agent.display()
                );
            }
            let mut opts =
                sandcast_image::BuildOptions::new(&out, &agent, env!("CARGO_PKG_VERSION"));
            if tiny {
                opts.variant = sandcast_image::Variant::Tiny;
            }
            if ubuntu {
                opts.distro = sandcast_image::Distro::Ubuntu;
            }
            opts.suite = suite;
            opts.mirror = mirror;
            let manifest = sandcast_image::build(&opts)?;
            println!("{}", serde_json::to_string_pretty(&manifest)?);
            Ok(ExitCode::SUCCESS)
        }
        ImageCommand::Check { dir } => {
            let manifest = sandcast_image::check(&dir, &sandcast_image::Requirements::browser())?;
            println!(
                "{}: usable ({} packages)",
                dir.display(),
                manifest.packages.len()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}
