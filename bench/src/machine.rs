//! What a result file records about where and when it was measured, and
//! the CPU pinning that keeps a benchmark on one core.

use std::{
    process::Command,
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail};
use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct Machine {
    /// `uname -r`.
    pub kernel: String,
    /// CPUs this process may run on.
    pub nproc: usize,
    pub cpu_model: Option<String>,
    /// The CPU the benchmark thread was pinned to.
    pub pinned_cpu: Option<usize>,
    /// The commit of the workspace, when run from a git checkout.
    pub git_commit: Option<String>,
    /// UTC, RFC 3339.
    pub date: String,
    pub unix_time: u64,
}

impl Machine {
    /// One line for a report's header: kernel, CPUs, pinning, date.
    pub fn summary(&self) -> String {
        format!(
            "kernel {}, {} CPUs ({}), pinned to CPU {}, {}",
            self.kernel,
            self.nproc,
            self.cpu_model.as_deref().unwrap_or("unknown CPU"),
            self.pinned_cpu
                .map_or("none".to_owned(), |cpu| cpu.to_string()),
            self.date
        )
    }

    pub fn describe() -> Self {
        let unix_time = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|elapsed| elapsed.as_secs())
            .unwrap_or(0);
        Self {
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|release| release.trim().to_owned())
                .unwrap_or_else(|_| "unknown".to_owned()),
            nproc: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model: cpu_model(),
            pinned_cpu: None,
            git_commit: git_commit(),
            date: rfc3339(unix_time),
            unix_time,
        }
    }
}

fn cpu_model() -> Option<String> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    cpuinfo
        .lines()
        .find(|line| line.starts_with("model name"))
        .and_then(|line| line.split_once(':'))
        .map(|(_, model)| model.trim().to_owned())
}

fn git_commit() -> Option<String> {
    let output = Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// Seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ`.
fn rfc3339(unix_time: u64) -> String {
    i64::try_from(unix_time)
        .ok()
        .and_then(|secs| jiff::Timestamp::from_second(secs).ok())
        .map_or_else(|| format!("{unix_time} s after 1970"), |at| at.to_string())
}

/// Pins the calling thread to `cpu`, or, when `None`, to the highest CPU it
/// may run on (CPU 0 usually takes the most interrupts). Returns the CPU.
/// A test run executes on the caller's CPU, so this keeps every call on one
/// core: same caches, same per-CPU LRU list of the connection table.
pub fn pin(cpu: Option<usize>) -> Result<usize> {
    // SAFETY: `cpu_set_t` is a plain bit array; all zeroes is the empty set.
    let mut allowed: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: the pointer and size describe `allowed`, a live local.
    let rc = unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut allowed) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("sched_getaffinity");
    }
    let max = 8 * size_of::<libc::cpu_set_t>();
    // SAFETY: `CPU_ISSET` reads a bit of a live set; `n` is within its size.
    let is_allowed = |n: usize| unsafe { libc::CPU_ISSET(n, &allowed) };
    let cpu = match cpu {
        Some(cpu) if cpu < max && is_allowed(cpu) => cpu,
        Some(cpu) => bail!("CPU {cpu} is not one this process may run on"),
        None => (0..max)
            .rev()
            .find(|&n| is_allowed(n))
            .context("no CPU in the affinity mask")?,
    };
    // SAFETY: as above.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu < max`, within the set.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: the pointer and size describe `set`, a live local.
    let rc = unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("pinning to CPU {cpu}"));
    }
    Ok(cpu)
}

#[cfg(test)]
mod tests {
    use super::rfc3339;

    #[test]
    fn dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_767_225_599), "2025-12-31T23:59:59Z");
    }
}
