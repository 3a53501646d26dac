//! The real Firecracker's own costs, with the tiny PVH guest of the tests
//! (`tests/guest/tiny-pvh.S`), so they can be measured on any host where
//! Firecracker runs, a paravirtual KVM included:
//!
//! ```text
//! SANDCAST_BENCH_RUNS=20 cargo bench -p sandcast-firecracker --bench real_vmm
//! ```
//!
//! Per run: process spawn to API socket answering; the configuration calls
//! (machine, boot source, vsock); InstanceStart to the guest's first console
//! byte; pause and a full snapshot (32 MiB); a fresh process, snapshot load
//! and resume; the VMM's resident memory while the guest runs. Medians over
//! `SANDCAST_BENCH_RUNS` (default 10). The binary is `SANDCAST_FC_BIN`, else
//! `../shared/firecracker/bin/firecracker`.

use std::path::Path;
use std::time::{Duration, Instant};

use sandcast_firecracker::api::ActionType;

#[path = "../tests/real/mod.rs"]
mod real;

async fn console_byte(console: &Path) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::metadata(console).map_or(0, |m| m.len()) == 0 {
        assert!(Instant::now() < deadline, "the guest printed nothing");
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[derive(Default)]
struct Run {
    api_ready: Duration,
    configure: Duration,
    first_byte: Duration,
    snapshot: Duration,
    restore: Duration,
    rss_kib: u64,
}

async fn one(bin: &Path, kernel: &Path, dir: &Path) -> Run {
    for f in [
        "a.sock", "b.sock", "v1.sock", "v2.sock", "vm.state", "vm.mem",
    ] {
        let _ = std::fs::remove_file(dir.join(f));
    }
    let mut run = Run::default();
    let t = Instant::now();
    let mut first = real::spawn(bin, None, &dir.join("a.sock"), &dir.join("a.console"));
    let a = real::api_up(&dir.join("a.sock")).await;
    run.api_ready = t.elapsed();
    let t = Instant::now();
    real::configure(&a, kernel, &dir.join("v1.sock"), None).await;
    run.configure = t.elapsed();
    let t = Instant::now();
    a.action(ActionType::InstanceStart).await.unwrap();
    console_byte(&dir.join("a.console")).await;
    run.first_byte = t.elapsed();
    run.rss_kib = rss_kib(first.id().unwrap());
    let t = Instant::now();
    real::snapshot(&a, &dir.join("vm.state"), &dir.join("vm.mem")).await;
    run.snapshot = t.elapsed();
    first.kill().await.unwrap();
    let t = Instant::now();
    let mut second = real::spawn(bin, None, &dir.join("b.sock"), &dir.join("b.console"));
    let b = real::api_up(&dir.join("b.sock")).await;
    real::restore(
        &b,
        &dir.join("vm.state"),
        &dir.join("vm.mem"),
        &dir.join("v2.sock"),
        None,
    )
    .await;
    run.restore = t.elapsed();
    second.kill().await.unwrap();
    run
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let runs: usize = std::env::var("SANDCAST_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let dir = std::env::temp_dir().join(format!("sc-fc-bench-real-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let found = real::firecracker().and_then(|b| Ok((b, real::tiny_guest(&dir, true)?)));
    let (bin, kernel) = match found {
        Ok(f) => f,
        Err(why) => {
            println!("SKIPPED real_vmm: {why}");
            let _ = std::fs::remove_dir_all(&dir);
            return;
        }
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let all: Vec<Run> = (0..runs)
        .map(|_| rt.block_on(one(&bin, &kernel, &dir)))
        .collect();
    let _ = std::fs::remove_dir_all(&dir);
    let m = |f: fn(&Run) -> Duration| median(all.iter().map(f).collect());
    let mut rss: Vec<u64> = all.iter().map(|r| r.rss_kib).collect();
    rss.sort();
    println!(
        "real Firecracker ({}), tiny PVH guest, {runs} runs, medians:",
        bin.display()
    );
    println!("  spawn to API answering      {:?}", m(|r| r.api_ready));
    println!("  machine, boot, vsock calls  {:?}", m(|r| r.configure));
    println!("  InstanceStart to console    {:?}", m(|r| r.first_byte));
    println!(
        "  pause + full snapshot       {:?} ({} MiB guest)",
        m(|r| r.snapshot),
        real::GUEST_MIB
    );
    println!("  spawn + load + resume       {:?}", m(|r| r.restore));
    println!("  VMM resident memory         {} KiB", rss[rss.len() / 2]);
}
