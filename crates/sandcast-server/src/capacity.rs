//! How much a host can give sessions: the defaults of `max_sessions` and
//! the per-session limits follow from its memory and CPUs, and `doctor`
//! warns when the configuration promises more memory than there is.

/// Memory and CPUs of the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostSize {
    /// `MemTotal` of `/proc/meminfo`, in MiB.
    pub memory_mib: u64,
    /// CPUs this process may run on.
    pub cpus: u64,
}

/// Largest per-session memory default, in MiB.
const SESSION_MEMORY_MIB: u64 = 2048;
/// Largest per-session CPU default, in thousandths of a core.
const SESSION_CPU_MILLIS: u64 = 2000;
/// Sessions per CPU at most by default: a browser mostly idles, but a CPU
/// shared by more than this makes every page slow.
const SESSIONS_PER_CPU: u64 = 4;

impl HostSize {
    /// Reads `/proc/meminfo` and the CPUs available to this process; a
    /// small host is assumed when they cannot be read.
    pub fn detect() -> HostSize {
        let memory_mib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| mem_total_mib(&m))
            .unwrap_or(2048);
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get() as u64)
            .unwrap_or(1);
        HostSize { memory_mib, cpus }
    }

    /// Memory kept for the host itself and the server: a tenth, at least
    /// 1 GiB (and never more than half of a small host).
    pub fn reserve_mib(&self) -> u64 {
        (self.memory_mib / 10).max(1024).min(self.memory_mib / 2)
    }

    /// Memory sessions may use together: all but the reserve.
    pub fn sessions_mib(&self) -> u64 {
        self.memory_mib - self.reserve_mib()
    }

    /// Default memory limit of one session.
    pub fn session_memory_mib(&self) -> u64 {
        SESSION_MEMORY_MIB.min(self.sessions_mib()).max(64)
    }

    /// Default CPU limit of one session.
    pub fn session_cpu_millis(&self) -> u32 {
        u32::try_from(SESSION_CPU_MILLIS.min(self.cpus * 1000)).expect("at most 2000")
    }

    /// Default `max_sessions` for sessions of `memory_mib` each: as many as
    /// fit in [`HostSize::sessions_mib`], at most four per CPU, at least one.
    pub fn max_sessions(&self, memory_mib: u64) -> usize {
        let by_memory = self.sessions_mib() / memory_mib.max(1);
        let by_cpu = self.cpus * SESSIONS_PER_CPU;
        usize::try_from(by_memory.min(by_cpu).max(1)).unwrap_or(usize::MAX)
    }

    /// A warning when `max_sessions` sessions of `memory_mib` each could
    /// use more than the host can spare, else `None`.
    pub fn overcommit(&self, max_sessions: usize, memory_mib: u64) -> Option<String> {
        let promised = (max_sessions as u64).saturating_mul(memory_mib);
        (promised > self.sessions_mib()).then(|| {
            format!(
                "max_sessions {max_sessions} x session.memory_mib {memory_mib} = {promised} MiB is more than the {} MiB this host can give sessions ({} MiB minus a {} MiB reserve); at most {} such sessions fit",
                self.sessions_mib(),
                self.memory_mib,
                self.reserve_mib(),
                self.sessions_mib() / memory_mib.max(1)
            )
        })
    }
}

/// `MemTotal` in MiB from the text of `/proc/meminfo`.
fn mem_total_mib(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_is_read() {
        let text = "MemTotal:       24683784 kB\nMemFree:        22578452 kB\n";
        assert_eq!(mem_total_mib(text), Some(24105));
        assert_eq!(mem_total_mib("nothing"), None);
        let here = HostSize::detect();
        assert!(here.memory_mib > 0 && here.cpus > 0);
    }

    #[test]
    fn defaults_fit_the_host() {
        // The host of the issue: 23.5 GiB, 2 CPUs. 16 x 2 GiB did not fit.
        let h = HostSize {
            memory_mib: 24105,
            cpus: 2,
        };
        assert_eq!(h.reserve_mib(), 2410);
        assert_eq!(h.sessions_mib(), 21695);
        assert_eq!(h.session_memory_mib(), 2048);
        assert_eq!(h.session_cpu_millis(), 2000);
        assert_eq!(h.max_sessions(2048), 8); // four per CPU
        assert_eq!(h.overcommit(h.max_sessions(2048), 2048), None);
        let big = HostSize {
            memory_mib: 24105,
            cpus: 32,
        };
        assert_eq!(big.max_sessions(2048), 10); // what fits in memory
        assert_eq!(big.overcommit(10, 2048), None);
        // A small host: one smaller session.
        let small = HostSize {
            memory_mib: 1500,
            cpus: 1,
        };
        assert_eq!(small.reserve_mib(), 750);
        assert_eq!(small.session_memory_mib(), 750);
        assert_eq!(small.session_cpu_millis(), 1000);
        assert_eq!(small.max_sessions(750), 1);
    }

    #[test]
    fn overcommit_is_reported_with_the_figures() {
        let h = HostSize {
            memory_mib: 24105,
            cpus: 2,
        };
        let w = h.overcommit(16, 2048).expect("16 x 2 GiB is too much");
        assert!(
            w.contains("max_sessions 16 x session.memory_mib 2048 = 32768 MiB"),
            "{w}"
        );
        assert!(w.contains("21695 MiB"), "{w}");
        assert!(w.contains("at most 10 such sessions fit"), "{w}");
        // Exactly what fits is fine; one MiB more is not.
        assert_eq!(h.overcommit(1, 21695), None);
        assert!(h.overcommit(1, 21696).is_some());
    }
}
