//! `sandcast bench start`: time from `POST /api/sessions` to `ready`, and
//! memory per idle session, against a running server.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Subcommand;
use serde_json::json;

use crate::client::{Client, ConnArgs};

/// Benchmarks.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Start-to-ready time and idle memory per session.
    Start {
        #[command(flatten)]
        conn: ConnArgs,
        /// Sessions to start, one after another.
        #[arg(long, default_value_t = 5)]
        sessions: usize,
        /// Seconds to let each session idle before measuring its memory.
        #[arg(long, default_value_t = 3)]
        settle_seconds: u64,
    },
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[idx]
}

/// Memory charged to a session's cgroup, in MiB (v1 or v2 layouts).
fn cgroup_memory_mib(id: &str) -> Option<f64> {
    let candidates = [
        format!("/sys/fs/cgroup/memory/sandcast/{id}/memory.usage_in_bytes"),
        format!("/sys/fs/cgroup/sandcast/{id}/memory.current"),
    ];
    candidates.iter().find_map(|p| {
        std::fs::read_to_string(p)
            .ok()
            .and_then(|s| s.trim().parse::<f64>().ok())
            .map(|b| b / (1024.0 * 1024.0))
    })
}

/// Runs a benchmark.
pub fn run(cmd: BenchCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        BenchCommand::Start {
            conn,
            sessions,
            settle_seconds,
        } => {
            let c = Client::new(&conn)?;
            let mut times = Vec::new();
            let mut mems = Vec::new();
            for i in 0..sessions {
                let t0 = Instant::now();
                let created = c.json(
                    "POST",
                    "/api/sessions",
                    Some(json!({"start_url": "about:blank"})),
                )?;
                let id = created["id"].as_str().unwrap_or_default().to_string();
                let s = c.wait(&id)?;
                let dt = t0.elapsed().as_secs_f64();
                if s["state"] != "ready" {
                    let _ = c.json("DELETE", &format!("/api/sessions/{id}"), None);
                    anyhow::bail!("session {id} did not become ready: {}", s["reason"]);
                }
                std::thread::sleep(Duration::from_secs(settle_seconds));
                let mem = cgroup_memory_mib(&id);
                println!(
                    "session {i}: ready in {:.0} ms, memory {}",
                    dt * 1000.0,
                    mem.map(|m| format!("{m:.0} MiB"))
                        .unwrap_or_else(|| "n/a (not on this host)".into())
                );
                times.push(dt);
                if let Some(m) = mem {
                    mems.push(m);
                }
                c.json("DELETE", &format!("/api/sessions/{id}"), None)?;
            }
            times.sort_by(|a, b| a.total_cmp(b));
            mems.sort_by(|a, b| a.total_cmp(b));
            println!(
                "start to ready over {} sessions: median {:.0} ms, p95 {:.0} ms",
                times.len(),
                percentile(&times, 0.5) * 1000.0,
                percentile(&times, 0.95) * 1000.0
            );
            if !mems.is_empty() {
                println!(
                    "memory per idle session: median {:.0} MiB",
                    percentile(&mems, 0.5)
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
