//! `sandcast bench density`: how many idle sessions one host runs while a
//! watched session keeps its latency, and what each idle session costs.
//!
//! One session shows the clock page to a real viewer (as `bench view` does);
//! idle sessions (a still page, nobody watching) are added in steps, each
//! step left to settle past the server's unwatched pause, then the watched
//! session's latency, the host's free memory, the idle sessions' memory and
//! CPU and the server's own cost are measured. It stops at the first step
//! whose p95 passes the limit, when free memory falls below the floor, when
//! the server refuses a session (its `max_sessions`), or at `--max-idle`.

use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::{Value, json};

use super::{
    Client, ConnArgs, DEFAULT_DRIVER, Driver, SessionGuard, TICKS_PER_SECOND, ViewMode,
    cgroup_memory_mib, clock_page, cpu_ticks, fmt, median, open_session, server_and_cgroup,
    session_ticks, still_page,
};

/// Arguments of `sandcast bench density`.
#[derive(Debug, clap::Args)]
pub struct DensityArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// Most idle sessions to start.
    #[arg(long, default_value_t = 40)]
    max_idle: usize,
    /// Idle sessions added per step.
    #[arg(long, default_value_t = 4)]
    step: usize,
    /// Seconds each step settles before it is measured: past the server's
    /// `pause_unwatched_seconds` (10 by default), so idle sessions are
    /// measured as they run for hours, not while they start.
    #[arg(long, default_value_t = 12)]
    settle_seconds: u64,
    /// Seconds of the watched session's latency measured per step.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// The watched session's p95 (ms) past which the host counts as full.
    #[arg(long, default_value_t = 40.0)]
    p95_limit_ms: f64,
    /// Free memory (MemAvailable, MiB) below which no more sessions start.
    #[arg(long, default_value_t = 1024)]
    min_free_mib: u64,
    /// How the watched session is viewed.
    #[arg(long, value_enum, default_value = "webrtc")]
    mode: ViewMode,
    /// The browser side (`bench/latency/view-driver.mjs` of the source tree).
    #[arg(long, default_value = DEFAULT_DRIVER)]
    driver: std::path::PathBuf,
    /// The server's pid, for its CPU and memory (default: the one
    /// `sandcast serve` process).
    #[arg(long)]
    server_pid: Option<i32>,
    /// Also print every figure as one JSON object on the last line.
    #[arg(long)]
    json: bool,
}

/// A line of `/proc/meminfo` in MiB.
fn meminfo_mib(key: &str) -> Option<f64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_meminfo(&text, key)
}

/// The value of `key` (`MemAvailable`) in `/proc/meminfo`'s text, in MiB.
fn parse_meminfo(text: &str, key: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(key)?.strip_prefix(':')?;
        let kib: f64 = rest.split_whitespace().next()?.parse().ok()?;
        Some(kib / 1024.0)
    })
}

/// A process's resident memory (`VmRSS`), in MiB.
fn rss_mib(pid: i32) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines().find_map(|l| {
        let kib: f64 = l
            .strip_prefix("VmRSS:")?
            .split_whitespace()
            .next()?
            .parse()
            .ok()?;
        Some(kib / 1024.0)
    })
}

/// Why the benchmark stopped adding sessions.
fn stop_reason(
    p95: Option<f64>,
    limit: f64,
    free: Option<f64>,
    floor: u64,
    idle: usize,
    max: usize,
) -> Option<String> {
    match p95 {
        Some(p) if p > limit => return Some(format!("p95 {p:.0} ms passed {limit:.0} ms")),
        None => return Some("no readable clock in the window".into()),
        _ => {}
    }
    if free.is_some_and(|f| f < floor as f64) {
        return Some(format!("free memory below {floor} MiB"));
    }
    (idle >= max).then(|| format!("--max-idle {max} reached"))
}

/// Runs the benchmark.
pub fn run(args: &DensityArgs) -> anyhow::Result<std::process::ExitCode> {
    if args.step == 0 || args.seconds == 0 || args.max_idle == 0 {
        bail!("--step, --seconds and --max-idle must be at least 1");
    }
    let c = Client::new(&args.conn)?;
    let (server, cgroup) = server_and_cgroup(&c, args.server_pid)?;
    let mut driver = Driver::start(&args.driver, None)?;
    driver.warm(&args.conn.server)?;
    let (watched, _, _) = open_session(
        &c,
        &mut driver,
        (1280, 720),
        clock_page(),
        true,
        args.mode,
        None,
    )?;
    let free_before = meminfo_mib("MemAvailable");
    let mut idle: Vec<SessionGuard> = Vec::new();
    let mut steps = Vec::new();
    let stopped = loop {
        // The window: the watched session's latency, the idle sessions' CPU.
        let ids: Vec<String> = idle.iter().map(|g| g.id.clone()).collect();
        let ticks0: u64 = ids.iter().map(|id| session_ticks(id).all).sum();
        let server0 = server.and_then(cpu_ticks);
        let t0 = Instant::now();
        let m = driver.call(
            json!({"cmd": "measure", "seconds": args.seconds}),
            Duration::from_secs(args.seconds + 60),
        )?;
        let secs = t0.elapsed().as_secs_f64();
        let ticks1: u64 = ids.iter().map(|id| session_ticks(id).all).sum();
        let server1 = server.and_then(cpu_ticks);
        let pct = |a: u64, b: u64| b.saturating_sub(a) as f64 / TICKS_PER_SECOND / secs * 100.0;
        let idle_cpu = pct(ticks0, ticks1);
        let free = meminfo_mib("MemAvailable");
        let mems: Vec<f64> = ids.iter().filter_map(|id| cgroup_memory_mib(id)).collect();
        let step = json!({
            "idle_sessions": ids.len(),
            "p50_ms": m["latency"]["p50"],
            "p95_ms": m["latency"]["p95"],
            "shown_fps": m["rates"]["shownFps"],
            "mem_available_mib": free,
            "idle_session_mib_median": median(mems),
            "idle_cpu_pct_total": idle_cpu,
            "idle_cpu_pct_per_session": (!ids.is_empty()).then(|| idle_cpu / ids.len() as f64),
            "server_cpu_pct": server0.zip(server1).map(|(a, b)| pct(a, b)),
            "server_rss_mib": server.and_then(rss_mib),
        });
        println!(
            "{:>3} idle: p50 {} p95 {}, {} shown; free memory {}, idle session memory {} (median), idle CPU {} total, server CPU {}, RSS {}",
            ids.len(),
            fmt(step["p50_ms"].as_f64(), "ms"),
            fmt(step["p95_ms"].as_f64(), "ms"),
            fmt(step["shown_fps"].as_f64(), "fps"),
            fmt(free, "MiB"),
            fmt(step["idle_session_mib_median"].as_f64(), "MiB"),
            fmt(Some(idle_cpu), "%"),
            fmt(step["server_cpu_pct"].as_f64(), "%"),
            fmt(step["server_rss_mib"].as_f64(), "MiB"),
        );
        steps.push(step);
        if let Some(why) = stop_reason(
            m["latency"]["p95"].as_f64(),
            args.p95_limit_ms,
            free,
            args.min_free_mib,
            ids.len(),
            args.max_idle,
        ) {
            break why;
        }
        // The next step's idle sessions, one after another as users come.
        let mut refused = None;
        for _ in 0..args.step.min(args.max_idle - idle.len()) {
            let created = c.json(
                "POST",
                "/api/sessions",
                Some(
                    json!({"start_url": still_page(), "kiosk": true, "width": 1280, "height": 720}),
                ),
            );
            let id = match created {
                Ok(v) => v["id"].as_str().unwrap_or_default().to_owned(),
                Err(e) => {
                    refused = Some(format!("the server refused a session: {e:#}"));
                    break;
                }
            };
            idle.push(SessionGuard {
                client: &c,
                id: id.clone(),
            });
            let s = c.wait(&id)?;
            if s["state"] != "ready" {
                refused = Some(format!(
                    "session {id} did not become ready: {}",
                    s["reason"]
                ));
                break;
            }
        }
        if let Some(why) = refused {
            break why;
        }
        std::thread::sleep(Duration::from_secs(args.settle_seconds));
    };
    driver.call(json!({"cmd": "close"}), Duration::from_secs(30))?;
    drop(driver);
    drop(cgroup);
    // Within the limit: the last step that kept the watched p95 under it.
    let within = steps
        .iter()
        .filter(|s| s["p95_ms"].as_f64().is_some_and(|p| p <= args.p95_limit_ms))
        .map(|s| s["idle_sessions"].as_u64().unwrap_or(0))
        .max();
    let last = steps.last().cloned().unwrap_or(Value::Null);
    let n = last["idle_sessions"].as_f64().unwrap_or(0.0);
    let host_per_session = match (free_before, last["mem_available_mib"].as_f64()) {
        (Some(a), Some(b)) if n > 0.0 => Some((a - b) / n),
        _ => None,
    };
    println!(
        "density: {} idle sessions with the watched p95 at most {:.0} ms (stopped: {}); per idle session: {} charged to its cgroup, {} of the host's free memory, {} CPU; server: {} CPU, {} RSS",
        within
            .map(|w| w.to_string())
            .unwrap_or_else(|| "no step had".into()),
        args.p95_limit_ms,
        stopped,
        fmt(last["idle_session_mib_median"].as_f64(), "MiB"),
        fmt(host_per_session, "MiB"),
        last["idle_cpu_pct_per_session"]
            .as_f64()
            .map(|p| format!("{p:.3} %"))
            .unwrap_or_else(|| "n/a".into()),
        fmt(last["server_cpu_pct"].as_f64(), "%"),
        fmt(last["server_rss_mib"].as_f64(), "MiB"),
    );
    drop(idle);
    drop(watched);
    if args.json {
        println!(
            "{}",
            json!({
                "within_limit": within, "stopped": stopped,
                "host_mib_per_idle_session": host_per_session, "steps": steps,
            })
        );
    }
    Ok(std::process::ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_values_are_read_in_mib() {
        let text =
            "MemTotal:       24576000 kB\nMemFree:         1000 kB\nMemAvailable:   2097152 kB\n";
        assert_eq!(parse_meminfo(text, "MemAvailable"), Some(2048.0));
        assert_eq!(parse_meminfo(text, "MemFree"), Some(1000.0 / 1024.0));
        assert_eq!(parse_meminfo(text, "Mem"), None, "a prefix is not a key");
        assert_eq!(parse_meminfo(text, "SwapTotal"), None);
    }

    #[test]
    fn it_stops_at_the_first_limit_reached() {
        assert_eq!(
            stop_reason(Some(30.0), 40.0, Some(5000.0), 1024, 4, 40),
            None
        );
        assert!(
            stop_reason(Some(41.0), 40.0, Some(5000.0), 1024, 4, 40)
                .unwrap()
                .contains("p95 41 ms")
        );
        assert!(
            stop_reason(None, 40.0, Some(5000.0), 1024, 4, 40)
                .unwrap()
                .contains("no readable clock")
        );
        assert!(
            stop_reason(Some(30.0), 40.0, Some(900.0), 1024, 4, 40)
                .unwrap()
                .contains("free memory")
        );
        assert!(
            stop_reason(Some(30.0), 40.0, Some(5000.0), 1024, 40, 40)
                .unwrap()
                .contains("--max-idle 40")
        );
    }
}
