//! Benchmarks against a running server.
//!
//! `sandcast bench start`: time from `POST /api/sessions` to `ready`, and
//! memory per idle session.
//!
//! `sandcast bench view`: what a person watching a session gets, through the
//! real backend and the real viewer page in headless Chromium, over WebRTC,
//! the WebSocket stream and noVNC: glass-to-glass latency, frame rate,
//! decode time, time from `POST /api/sessions` to the page shown, CPU of the
//! session and the server (idle and in motion) and the viewer's bandwidth.
//! The browser side is `bench/latency/view-driver.mjs`, driven over its
//! stdin/stdout.
//!
//! `sandcast bench density` ([`density`]): how many idle sessions this host
//! runs while a watched one keeps its latency.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::Subcommand;
use serde_json::{Value, json};

use crate::client::{Client, ConnArgs};

mod density;
mod impair;

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
    /// Glass-to-glass latency, frame rate, decode time, POST to first frame,
    /// CPU and bandwidth through the viewer page, over WebRTC, the WebSocket
    /// stream and noVNC.
    View(ViewArgs),
    /// Idle sessions started in steps while one watched session measures
    /// latency: how many run before its p95 passes the limit or memory runs
    /// out, and what each costs.
    Density(density::DensityArgs),
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[idx]
}

/// Memory charged to a session's cgroup, in MiB (v1 or v2 layouts; the
/// session's cgroup is `sandcast/<server instance>/<id>`).
fn cgroup_memory_mib(id: &str) -> Option<f64> {
    let layouts = [
        ("/sys/fs/cgroup/memory/sandcast", "memory.usage_in_bytes"),
        ("/sys/fs/cgroup/sandcast", "memory.current"),
    ];
    layouts.iter().find_map(|(root, file)| {
        std::fs::read_dir(root)
            .ok()?
            .flatten()
            .find_map(|instance| {
                std::fs::read_to_string(instance.path().join(id).join(file))
                    .ok()?
                    .trim()
                    .parse::<f64>()
                    .ok()
                    .map(|b| b / (1024.0 * 1024.0))
            })
    })
}

/// Runs a benchmark.
pub fn run(cmd: BenchCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        BenchCommand::View(args) => run_view(&args),
        BenchCommand::Density(args) => density::run(&args),
        BenchCommand::Start {
            conn,
            sessions,
            settle_seconds,
        } => {
            let c = Client::new(&conn)?;
            let mut times = Vec::new();
            let mut answers = Vec::new();
            let mut mems = Vec::new();
            for i in 0..sessions {
                let t0 = Instant::now();
                let created = c.json(
                    "POST",
                    "/api/sessions",
                    Some(json!({"start_url": "about:blank"})),
                )?;
                // The answer: validation, the row, and in a cluster the
                // placement and the chosen node's start.
                answers.push(t0.elapsed().as_secs_f64());
                let id = created["id"].as_str().unwrap_or_default().to_string();
                let s = c.wait(&id)?;
                let dt = t0.elapsed().as_secs_f64();
                if s["state"] != "ready" {
                    let _ = c.json("DELETE", &format!("/api/sessions/{id}"), None);
                    anyhow::bail!("session {id} did not become ready: {}", s["reason"]);
                }
                std::thread::sleep(Duration::from_secs(settle_seconds));
                let mem = cgroup_memory_mib(&id);
                let node = s["node"]
                    .as_str()
                    .map(|n| format!(" on node {n}"))
                    .unwrap_or_default();
                println!(
                    "session {i}{node}: ready in {:.0} ms, memory {}",
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
            answers.sort_by(|a, b| a.total_cmp(b));
            mems.sort_by(|a, b| a.total_cmp(b));
            println!(
                "POST answered: median {:.1} ms, p95 {:.1} ms",
                percentile(&answers, 0.5) * 1000.0,
                percentile(&answers, 0.95) * 1000.0
            );
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

/// How the viewer streams in `bench view`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ViewMode {
    /// WebRTC video (the default path).
    Webrtc,
    /// The same video over a WebSocket on the server's port, decoded with
    /// WebCodecs (the first fallback).
    Ws,
    /// noVNC over the server's WebSocket tunnel (the last fallback).
    Vnc,
}

impl ViewMode {
    fn as_str(self) -> &'static str {
        match self {
            ViewMode::Webrtc => "webrtc",
            ViewMode::Ws => "ws",
            ViewMode::Vnc => "vnc",
        }
    }
}

/// Arguments of `sandcast bench view`.
#[derive(Debug, clap::Args)]
pub struct ViewArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// Measuring windows per mode; the median of their percentiles is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Seconds per measuring window.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Modes to measure, in this order.
    #[arg(long, value_delimiter = ',', default_value = "webrtc,ws,vnc")]
    modes: Vec<ViewMode>,
    /// Seconds of the idle measurement (a still page with a WebRTC viewer
    /// watching); 0 skips it.
    #[arg(long, default_value_t = 10)]
    idle_seconds: u64,
    /// Display width of the sessions (and the viewer's viewport).
    #[arg(long, default_value_t = 1280)]
    width: u32,
    /// Display height of the sessions (and the viewer's viewport).
    #[arg(long, default_value_t = 720)]
    height: u32,
    /// The browser side (`bench/latency/view-driver.mjs` of the source tree).
    #[arg(long, default_value = DEFAULT_DRIVER)]
    driver: PathBuf,
    /// The server's pid, for its CPU (default: the one `sandcast serve` process).
    #[arg(long)]
    server_pid: Option<i32>,
    /// Also print every figure as one JSON object on the last line.
    #[arg(long)]
    json: bool,
    /// Puts the viewer behind an impaired link that stays on this machine:
    /// `delay=20ms,loss=1%,rate=8mbit` (any of them, each way). After each
    /// mode's runs, one more window has a 1 s burst of 10 % loss. Needs
    /// root, iproute2 and iptables, and a server on plain HTTP.
    #[arg(long)]
    impair: Option<impair::Impairment>,
    /// What the clock is drawn over: `still` (only the clock changes) or
    /// `scroll` (text scrolling under it, megabits a second).
    #[arg(long, value_enum, default_value = "still")]
    backdrop: Backdrop,
}

/// Where the driver lives in the source tree this binary was built from.
const DEFAULT_DRIVER: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../bench/latency/view-driver.mjs"
);

/// The clock page: `clock.html` with `decode.js` inlined, as a `data:` URL,
/// so a session needs no network to show it.
fn clock_page() -> String {
    clock_page_over(Backdrop::Still)
}

/// What the clock is drawn over (`bench view --backdrop`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backdrop {
    /// A flat grey page: only the clock changes (about 200 kbit/s).
    Still,
    /// Lines of text scrolling 4 px a frame under the clock: every frame
    /// changes most of the screen, as reading a long page does (megabits a
    /// second), to see what a slow link does.
    Scroll,
}

/// Scrolls lines of text over the whole window, under the clock's row.
const SCROLL_SCRIPT: &str = r#"<canvas id="scroll" style="position:fixed;left:0;top:80px"></canvas>
<script>
  const sc = document.getElementById('scroll');
  sc.width = innerWidth; sc.height = innerHeight - 80;
  const sx = sc.getContext('2d');
  const words = 'sandcast streams a browser to a page over a slow link while the text keeps scrolling'.split(' ');
  let off = 0;
  function scroll() {
    sx.fillStyle = '#fff'; sx.fillRect(0, 0, sc.width, sc.height);
    sx.fillStyle = '#123'; sx.font = '18px serif';
    for (let y = -(off % 24), n = Math.floor(off / 24); y < sc.height; y += 24, n++) {
      let line = '';
      for (let i = 0; line.length < 160; i++) line += words[(n * 7 + i * 3) % words.length] + ' ';
      sx.fillText(n + ' ' + line, 8, y + 18);
    }
    off += 4;
    requestAnimationFrame(scroll);
  }
  requestAnimationFrame(scroll);
</script>
</body>"#;

/// The clock page over `backdrop`: `clock.html` with `decode.js` inlined,
/// as a `data:` URL, so a session needs no network to show it.
fn clock_page_over(backdrop: Backdrop) -> String {
    const CLOCK: &str = include_str!("../../../bench/latency/clock.html");
    const DECODE: &str = include_str!("../../../bench/latency/decode.js");
    let decode = DECODE.replace("\nexport ", "\n");
    let mut page = CLOCK
        .replace("<script type=\"module\">", &format!("<script>\n{decode}\n"))
        .replace("  import { drawClock, BLOCKS } from './decode.js';\n", "");
    if backdrop == Backdrop::Scroll {
        page = page.replace("</body>", SCROLL_SCRIPT);
    }
    data_url(&page)
}

/// A page that never changes, for the idle figures.
fn still_page() -> String {
    data_url(
        "<!doctype html><html><body style=\"margin:0;background:#fff\">\
         <p style=\"font:24px sans-serif\">sandcast idle</p></body></html>",
    )
}

/// `data:text/html` with everything but unreserved characters percent-encoded.
fn data_url(html: &str) -> String {
    let mut s = String::from("data:text/html;charset=utf-8,");
    for b in html.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            s.push(b as char);
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s
}

/// `url` with `query` added before its fragment (the viewer token).
fn with_query(url: &str, query: &str) -> String {
    let (base, frag) = match url.split_once('#') {
        Some((b, f)) => (b, Some(f)),
        None => (url, None),
    };
    let sep = if base.contains('?') { '&' } else { '?' };
    match frag {
        Some(f) => format!("{base}{sep}{query}#{f}"),
        None => format!("{base}{sep}{query}"),
    }
}

fn now_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

/// `view-driver.mjs` in a child `node`, one JSON line per command.
struct Driver {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl Driver {
    /// Starts the driver, inside the impaired link's namespace when given.
    fn start(path: &Path, link: Option<&impair::Link>) -> anyhow::Result<Driver> {
        if !path.is_file() {
            bail!(
                "the viewer driver {} does not exist (pass --driver)",
                path.display()
            );
        }
        let mut command = match link {
            Some(l) => {
                let mut c = l.command("node");
                c.env("SANDCAST_BENCH_SECURE_ORIGIN", l.viewer_base());
                c
            }
            None => Command::new("node"),
        };
        let mut child = command
            .arg(path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting node for the viewer driver (is Node.js installed?)")?;
        let stdin = child.stdin.take().context("driver stdin")?;
        let stdout = child.stdout.take().context("driver stdout")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut d = Driver {
            child,
            stdin,
            lines,
        };
        let hello = d.next(Duration::from_secs(60))?;
        if hello["ready"] != true {
            bail!("the viewer driver said {hello} instead of being ready");
        }
        Ok(d)
    }

    fn next(&mut self, timeout: Duration) -> anyhow::Result<Value> {
        let line = self.lines.recv_timeout(timeout).map_err(|e| match e {
            mpsc::RecvTimeoutError::Timeout => {
                anyhow::anyhow!("the viewer driver did not answer within {timeout:?}")
            }
            mpsc::RecvTimeoutError::Disconnected => anyhow::anyhow!(
                "the viewer driver ended (see its output above; `npm ci` in tests/browser?)"
            ),
        })?;
        serde_json::from_str(&line).with_context(|| format!("the viewer driver printed {line:?}"))
    }

    /// Loads `server`'s health page once, so the browser is warm before
    /// anything is measured.
    fn warm(&mut self, server: &str) -> anyhow::Result<()> {
        let url = format!("{}/health", server.trim_end_matches('/'));
        self.call(json!({"cmd": "warm", "url": url}), Duration::from_secs(60))?;
        Ok(())
    }

    /// Sends one command and returns its answer, or its error.
    fn call(&mut self, cmd: Value, timeout: Duration) -> anyhow::Result<Value> {
        writeln!(self.stdin, "{cmd}")?;
        self.stdin.flush()?;
        let v = self.next(timeout)?;
        if v["ok"] != true {
            bail!("{}: {}", cmd["cmd"], v["error"]);
        }
        Ok(v)
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "{}", json!({"cmd": "quit"}));
        let _ = self.stdin.flush();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The benchmark's own CPU cgroup, beside the sessions' one, for itself and
/// the viewer browser it starts. On one host the viewer competes with the
/// session for the CPU; in its own cgroup it gets one share, as the session
/// does, instead of one share per viewer process (as if the viewer ran on
/// its own machine, as it does in use). Left (and removed) when dropped.
struct ViewerCgroup {
    dir: PathBuf,
    parent: PathBuf,
}

impl ViewerCgroup {
    const NAME: &'static str = "sandcast-bench-viewer";

    /// Joins the cgroup, v1 `cpu` or v2; `None` where neither can be made.
    fn join() -> Option<ViewerCgroup> {
        let candidates = [
            PathBuf::from("/sys/fs/cgroup/cpu"),
            PathBuf::from("/sys/fs/cgroup"),
        ];
        for parent in candidates {
            let usable = parent.join("cpu.shares").exists()
                || parent.join("cgroup.subtree_control").exists();
            if !usable {
                continue;
            }
            let dir = parent.join(Self::NAME);
            if std::fs::create_dir_all(&dir).is_err() {
                continue;
            }
            if std::fs::write(dir.join("cgroup.procs"), std::process::id().to_string()).is_ok() {
                return Some(ViewerCgroup { dir, parent });
            }
            let _ = std::fs::remove_dir(&dir);
        }
        None
    }
}

impl Drop for ViewerCgroup {
    fn drop(&mut self) {
        let _ = std::fs::write(
            self.parent.join("cgroup.procs"),
            std::process::id().to_string(),
        );
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Deletes its session when dropped, so a failed run leaves none behind.
struct SessionGuard<'a> {
    client: &'a Client,
    id: String,
}

impl Drop for SessionGuard<'_> {
    fn drop(&mut self) {
        if let Err(e) = self
            .client
            .json("DELETE", &format!("/api/sessions/{}", self.id), None)
        {
            eprintln!("deleting session {}: {e:#}", self.id);
        }
    }
}

/// Linux's USER_HZ, the unit of utime and stime in `/proc/<pid>/stat`; it
/// is 100 on every architecture Linux runs on.
const TICKS_PER_SECOND: f64 = 100.0;

/// utime + stime of a process (all its threads), in clock ticks.
fn cpu_ticks(pid: i32) -> Option<u64> {
    parse_stat_ticks(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// utime + stime from the text of `/proc/<pid>/stat` (fields 14 and 15; the
/// command name in parentheses may hold spaces).
fn parse_stat_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// CPU ticks of a session's processes: all of them, and its agent's.
#[derive(Debug, Default, Clone, Copy)]
struct SessionTicks {
    all: u64,
    agent: u64,
}

/// The pids of every process on this host (none where /proc is unreadable).
fn proc_pids() -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .collect()
}

/// Sums the ticks of every process whose cgroup path names the session.
fn session_ticks(id: &str) -> SessionTicks {
    let mut t = SessionTicks::default();
    for pid in proc_pids() {
        let Ok(cg) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
            continue;
        };
        if !cg.lines().any(|l| {
            l.rsplit(':')
                .next()
                .is_some_and(|p| p.split('/').any(|c| c == id))
        }) {
            continue;
        }
        let ticks = cpu_ticks(pid).unwrap_or(0);
        t.all += ticks;
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() == "sandcast-agent" {
            t.agent += ticks;
        }
    }
    t
}

/// The one `sandcast serve` process on this host, if there is exactly one.
fn find_server_pid() -> Option<i32> {
    let mut found = Vec::new();
    for pid in proc_pids() {
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
        let is_sandcast = args
            .first()
            .is_some_and(|a| a.rsplit(|b| *b == b'/').next() == Some(b"sandcast"));
        if is_sandcast && args.get(1) == Some(&&b"serve"[..]) {
            found.push(pid);
        }
    }
    (found.len() == 1).then(|| found[0])
}

/// CPU use over one window, in percent of one core.
#[derive(Debug, Clone, Copy, serde::Serialize)]
struct CpuUse {
    session: f64,
    agent: f64,
    server: Option<f64>,
}

/// Measures CPU while `during` runs.
fn with_cpu<T>(
    id: &str,
    server: Option<i32>,
    during: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<(T, CpuUse)> {
    let s0 = session_ticks(id);
    let v0 = server.and_then(cpu_ticks);
    let t0 = Instant::now();
    let out = during()?;
    let secs = t0.elapsed().as_secs_f64();
    let s1 = session_ticks(id);
    let v1 = server.and_then(cpu_ticks);
    let pct = |a: u64, b: u64| b.saturating_sub(a) as f64 / TICKS_PER_SECOND / secs * 100.0;
    Ok((
        out,
        CpuUse {
            session: pct(s0.all, s1.all),
            agent: pct(s0.agent, s1.agent),
            server: v0.zip(v1).map(|(a, b)| pct(a, b)),
        },
    ))
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Some(percentile(&v, 0.5))
}

fn fmt(v: Option<f64>, unit: &str) -> String {
    v.map(|x| format!("{x:.1} {unit}"))
        .unwrap_or_else(|| "n/a".into())
}

/// Starts a session showing `page`, opens a viewer on it, and returns the
/// guard, the session id and the driver's `open` answer.
fn open_session<'a>(
    c: &'a Client,
    driver: &mut Driver,
    (width, height): (u32, u32),
    page: String,
    clock: bool,
    mode: ViewMode,
    base: Option<&str>,
) -> anyhow::Result<(SessionGuard<'a>, f64, Value)> {
    // A person's browser runs before the session is made: its new tab is
    // ready, and what follows the POST is the viewer page's own load.
    driver.call(
        json!({"cmd": "prepare", "width": width, "height": height}),
        Duration::from_secs(30),
    )?;
    let posted = now_ms();
    let created = c.json(
        "POST",
        "/api/sessions",
        Some(json!({"start_url": page, "kiosk": true, "width": width, "height": height})),
    )?;
    let id = created["id"]
        .as_str()
        .context("the server's answer has no session id")?
        .to_owned();
    let guard = SessionGuard { client: c, id };
    let url = created["viewer_url"]
        .as_str()
        .context("the server's answer has no viewer_url")?;
    // Behind an impaired link the viewer reaches the server through its relay.
    let rebased;
    let url = match (base, url.find("/viewer/")) {
        (Some(b), Some(i)) => {
            rebased = format!("{b}{}", &url[i..]);
            rebased.as_str()
        }
        _ => url,
    };
    // Opened at once: the page waits for `ready` as a user's would.
    let opened = driver.call(
        json!({
            "cmd": "open", "url": with_query(url, &format!("mode={}", mode.as_str())),
            "mode": mode.as_str(), "width": width, "height": height,
            "timeoutMs": 60_000, "clock": clock,
        }),
        Duration::from_secs(90),
    )?;
    Ok((guard, posted, opened))
}

/// What every viewer benchmark checks and sets up first: the server is
/// ready (a server that is not answers 503, an error here), its pid for its
/// CPU, and the benchmark's own CPU cgroup for itself and its viewer; each
/// said when it cannot be had.
fn server_and_cgroup(
    c: &Client,
    server_pid: Option<i32>,
) -> anyhow::Result<(Option<i32>, Option<ViewerCgroup>)> {
    c.json("GET", "/health", None)?;
    let server = server_pid.or_else(find_server_pid);
    if server.is_none() {
        eprintln!(
            "no single `sandcast serve` process found; the server's cost is not measured (--server-pid)"
        );
    }
    let cgroup = ViewerCgroup::join();
    if cgroup.is_none() {
        eprintln!(
            "no CPU cgroup for the viewer (not root?); it competes with the session per process"
        );
    }
    Ok((server, cgroup))
}

fn run_view(args: &ViewArgs) -> anyhow::Result<ExitCode> {
    if args.runs == 0 || args.seconds == 0 {
        bail!("--runs and --seconds must be at least 1");
    }
    let c = Client::new(&args.conn)?;
    let (server, cgroup) = server_and_cgroup(&c, args.server_pid)?;
    let link = match &args.impair {
        Some(imp) => {
            let link = impaired_link(&c, &args.conn.server, imp)?;
            println!("the viewer is behind: {imp}");
            Some(link)
        }
        None => None,
    };
    let base = link.as_ref().map(|l| l.viewer_base());
    let mut driver = Driver::start(&args.driver, link.as_ref())?;
    driver.warm(base.as_deref().unwrap_or(&args.conn.server))?;
    let mut report = BTreeMap::new();
    let window = Duration::from_secs(args.seconds + 60);

    for &mode in &args.modes {
        let (guard, posted, opened) = open_session(
            &c,
            &mut driver,
            (args.width, args.height),
            clock_page_over(args.backdrop),
            true,
            mode,
            base.as_deref(),
        )?;
        let t = &opened["t"];
        let first_frame = t["firstFrame"].as_f64().map(|f| f - posted);
        let first_clock = t["firstClock"].as_f64().map(|f| f - posted);
        let at = |k: &str| fmt(t[k].as_f64().map(|v| v - posted), "ms");
        println!(
            "{}: POST /api/sessions to the page shown {} (first readable clock; first decoded frame {}, which over WebRTC can be the display before the browser draws; page loaded {}, session ready seen {}, stream connected {})",
            mode.as_str(),
            fmt(first_clock, "ms"),
            fmt(first_frame, "ms"),
            at("loaded"),
            at("ready"),
            at("connected"),
        );
        let mut runs = Vec::new();
        for i in 0..args.runs {
            let (m, cpu) = with_cpu(&guard.id, server, || {
                driver.call(json!({"cmd": "measure", "seconds": args.seconds}), window)
            })?;
            let l = &m["latency"];
            let r = &m["rates"];
            let to_receive = &m["toReceive"];
            let to_capture = &m["toCapture"];
            let presented = &m["presented"];
            let split = match (
                to_capture["p50"].as_f64(),
                to_receive["p50"].as_f64(),
                presented["p50"].as_f64(),
            ) {
                (Some(c), Some(r), Some(p)) => format!(
                    " (p50 drawn to captured {c:.0} ms, to received {r:.0} ms, to the frame callback {p:.0} ms)"
                ),
                _ => String::new(),
            };
            let fr = &m["freezes"];
            println!(
                "  run {}: p50 {} p95 {} ({} samples){split}, {} freezes over 250 ms (longest gap {}), {} shown, {} decoded, decode {}, {}, CPU session {:.1} % (agent {:.1} %), server {}",
                i + 1,
                fmt(l["p50"].as_f64(), "ms"),
                fmt(l["p95"].as_f64(), "ms"),
                l["samples"],
                fr["count"],
                fmt(fr["longestMs"].as_f64(), "ms"),
                fmt(r["shownFps"].as_f64(), "fps"),
                fmt(r["fps"].as_f64(), "fps"),
                fmt(r["decodeMs"].as_f64(), "ms"),
                fmt(r["kbps"].as_f64(), "kbit/s"),
                cpu.session,
                cpu.agent,
                fmt(cpu.server, "%"),
            );
            if l["samples"].as_u64().unwrap_or(0) == 0 {
                bail!(
                    "{} run {}: no readable clock in {} s of video",
                    mode.as_str(),
                    i + 1,
                    args.seconds
                );
            }
            runs.push(json!({
                "latency": l, "freezes": fr, "to_capture": to_capture, "to_receive": to_receive,
                "presented": presented,
                "rates": r, "cpu": cpu,
            }));
        }
        let burst = match (&link, &args.impair) {
            (Some(l), Some(imp)) => Some(loss_burst(&mut driver, l, imp, args.seconds)?),
            _ => None,
        };
        driver.call(json!({"cmd": "close"}), Duration::from_secs(30))?;
        drop(guard);
        let med = |f: &dyn Fn(&Value) -> Option<f64>| median(runs.iter().filter_map(f).collect());
        let summary = json!({
            "post_to_first_frame_ms": first_frame,
            "post_to_first_clock_ms": first_clock,
            "p50_ms": med(&|r| r["latency"]["p50"].as_f64()),
            "p95_ms": med(&|r| r["latency"]["p95"].as_f64()),
            "freezes": runs.iter().filter_map(|r| r["freezes"]["count"].as_u64()).sum::<u64>(),
            "longest_gap_ms": runs.iter().filter_map(|r| r["freezes"]["longestMs"].as_f64()).fold(None, |a: Option<f64>, b| Some(a.map_or(b, |a| a.max(b)))),
            "p50_drawn_to_captured_ms": med(&|r| r["to_capture"]["p50"].as_f64()),
            "p50_drawn_to_received_ms": med(&|r| r["to_receive"]["p50"].as_f64()),
            "p50_drawn_to_frame_callback_ms": med(&|r| r["presented"]["p50"].as_f64()),
            "shown_fps": med(&|r| r["rates"]["shownFps"].as_f64()),
            "decoded_fps": med(&|r| r["rates"]["fps"].as_f64()),
            "decode_ms": med(&|r| r["rates"]["decodeMs"].as_f64()),
            "kbps": med(&|r| r["rates"]["kbps"].as_f64()),
            "cpu_session_pct": med(&|r| r["cpu"]["session"].as_f64()),
            "cpu_agent_pct": med(&|r| r["cpu"]["agent"].as_f64()),
            "cpu_server_pct": med(&|r| r["cpu"]["server"].as_f64()),
            "codec": runs.last().map(|r| r["rates"]["codec"].clone()),
            "impairment": args.impair.map(|i| i.to_string()),
            "loss_burst": burst,
            "runs": runs,
        });
        println!(
            "{} median of {} runs: p50 {}, p95 {}, {} freezes over 250 ms in all (longest gap {}), {} shown, {}, CPU in motion: session {}, agent {}, server {}",
            mode.as_str(),
            args.runs,
            fmt(summary["p50_ms"].as_f64(), "ms"),
            fmt(summary["p95_ms"].as_f64(), "ms"),
            summary["freezes"],
            fmt(summary["longest_gap_ms"].as_f64(), "ms"),
            fmt(summary["shown_fps"].as_f64(), "fps"),
            fmt(summary["kbps"].as_f64(), "kbit/s"),
            fmt(summary["cpu_session_pct"].as_f64(), "%"),
            fmt(summary["cpu_agent_pct"].as_f64(), "%"),
            fmt(summary["cpu_server_pct"].as_f64(), "%"),
        );
        report.insert(mode.as_str().to_owned(), summary);
    }

    if args.idle_seconds > 0 {
        let (guard, _, _) = open_session(
            &c,
            &mut driver,
            (args.width, args.height),
            still_page(),
            false,
            ViewMode::Webrtc,
            base.as_deref(),
        )?;
        // Let the first frames, the page's load and the viewer's resize settle.
        std::thread::sleep(Duration::from_secs(3));
        let (m, cpu) = with_cpu(&guard.id, server, || {
            driver.call(
                json!({"cmd": "measure", "seconds": args.idle_seconds}),
                Duration::from_secs(args.idle_seconds + 60),
            )
        })?;
        driver.call(json!({"cmd": "close"}), Duration::from_secs(30))?;
        drop(guard);
        let r = &m["rates"];
        println!(
            "idle (still page, WebRTC viewer watching, {} s): CPU session {:.2} % (agent {:.2} %), server {}, {} decoded, {}",
            args.idle_seconds,
            cpu.session,
            cpu.agent,
            cpu.server
                .map(|s| format!("{s:.2} %"))
                .unwrap_or_else(|| "n/a".into()),
            fmt(r["fps"].as_f64(), "fps"),
            fmt(r["kbps"].as_f64(), "kbit/s"),
        );
        report.insert(
            "idle".to_owned(),
            json!({"cpu": cpu, "decoded_fps": r["fps"], "kbps": r["kbps"]}),
        );
    }
    drop(driver);
    drop(link);
    drop(cgroup);
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(ExitCode::SUCCESS)
}

/// The impaired link for the viewer: routes to the addresses the server's
/// WebRTC answers with (this machine's own), a relay to `server`.
fn impaired_link(
    c: &Client,
    server: &str,
    imp: &impair::Impairment,
) -> anyhow::Result<impair::Link> {
    use std::net::ToSocketAddrs;
    let Some(authority) = server.strip_prefix("http://") else {
        bail!("--impair needs the server on plain HTTP (http://host:port), not {server}");
    };
    let authority = authority.trim_end_matches('/');
    let server_addr = authority
        .to_socket_addrs()
        .with_context(|| format!("resolving {authority}"))?
        .next()
        .with_context(|| format!("{authority} has no address"))?;
    let health = c.json("GET", "/api/health", None)?;
    let own: Vec<std::net::Ipv4Addr> = health["webrtc"]["udp"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a.as_str()?.parse::<std::net::SocketAddr>().ok())
        .filter_map(|a| match a.ip() {
            std::net::IpAddr::V4(v4) if !v4.is_loopback() => Some(v4),
            _ => None,
        })
        .collect();
    if own.is_empty() {
        bail!(
            "the server's WebRTC has no address but loopback ({}); the viewer in its own namespace could not reach it (set webrtc.public_ips)",
            health["webrtc"]["udp"]
        );
    }
    impair::Link::up(imp, server_addr, &own)
}

/// One measuring window with 1 s of 10 % loss a third of the way in: the
/// freezes and the longest gap say how the stream recovers.
fn loss_burst(
    driver: &mut Driver,
    link: &impair::Link,
    imp: &impair::Impairment,
    seconds: u64,
) -> anyhow::Result<Value> {
    let m = std::thread::scope(|s| {
        let burst = s.spawn(|| -> anyhow::Result<()> {
            std::thread::sleep(Duration::from_secs(seconds) / 3);
            link.set_loss(100)?;
            std::thread::sleep(Duration::from_secs(1));
            link.set_loss(imp.loss_permille)
        });
        let m = driver.call(
            json!({"cmd": "measure", "seconds": seconds}),
            Duration::from_secs(seconds + 60),
        );
        burst
            .join()
            .map_err(|_| anyhow::anyhow!("the loss burst's thread panicked"))??;
        m
    })?;
    let (l, fr, r) = (&m["latency"], &m["freezes"], &m["rates"]);
    println!(
        "  with a 1 s burst of 10 % loss: p50 {} p95 {}, {} freezes over 250 ms (longest gap {}, {} frozen), {} shown, {}",
        fmt(l["p50"].as_f64(), "ms"),
        fmt(l["p95"].as_f64(), "ms"),
        fr["count"],
        fmt(fr["longestMs"].as_f64(), "ms"),
        fmt(fr["totalMs"].as_f64(), "ms"),
        fmt(r["shownFps"].as_f64(), "fps"),
        fmt(r["kbps"].as_f64(), "kbit/s"),
    );
    Ok(json!({"latency": l, "freezes": fr, "rates": r}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_goes_before_the_token_fragment() {
        assert_eq!(
            with_query("http://h/viewer/a#token=x", "mode=vnc"),
            "http://h/viewer/a?mode=vnc#token=x"
        );
        assert_eq!(
            with_query("http://h/viewer/a?x=1", "mode=vnc"),
            "http://h/viewer/a?x=1&mode=vnc"
        );
    }

    #[test]
    fn the_scrolling_backdrop_is_under_the_clock_and_within_the_url_limit() {
        let url = clock_page_over(Backdrop::Scroll);
        assert!(url.len() < 32 * 1024, "{} bytes", url.len());
        let html = percent_decode(&url["data:text/html;charset=utf-8,".len()..]);
        assert!(html.contains("requestAnimationFrame(scroll)"));
        assert!(html.contains("top:80px"), "the clock's row stays readable");
        assert!(html.trim_end().ends_with("</html>"));
    }

    #[test]
    fn clock_page_is_self_contained_and_within_the_url_limit() {
        let url = clock_page();
        assert!(url.starts_with("data:text/html;charset=utf-8,"));
        // The server refuses start URLs over 32 KiB.
        assert!(url.len() < 32 * 1024, "{} bytes", url.len());
        let html = percent_decode(&url["data:text/html;charset=utf-8,".len()..]);
        assert!(!html.contains("import "), "a data: page cannot import");
        assert!(!html.contains("export "), "a classic script cannot export");
        assert!(html.contains("function drawClock"));
        assert!(html.contains("requestAnimationFrame(frame)"));
    }

    fn percent_decode(s: &str) -> String {
        let b = s.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%' {
                out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
                i += 3;
            } else {
                out.push(b[i]);
                i += 1;
            }
        }
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn stat_ticks_survive_spaces_and_parentheses_in_the_name() {
        let stat = "42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0 7 5 0 0 20 0 1 0 100 0 0";
        assert_eq!(parse_stat_ticks(stat), Some(12));
        assert_eq!(parse_stat_ticks("42 (x) S 1"), None);
        assert_eq!(parse_stat_ticks("garbage"), None);
    }

    #[test]
    fn own_process_has_cpu_ticks() {
        assert!(cpu_ticks(std::process::id() as i32).is_some());
        assert_eq!(cpu_ticks(-1), None);
    }

    #[test]
    fn median_ignores_missing_values() {
        assert_eq!(median(vec![3.0, f64::NAN, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![]), None);
    }
}
