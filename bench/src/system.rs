//! What the relay process costs, read from `/proc`: resident memory and CPU time; and how busy
//! the whole machine is.

use std::time::Duration;

/// Microseconds since the epoch on this machine's clock, which the writers, the client processes
/// and Postgres share.
pub fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// Resident memory of process `pid`, in bytes (`VmRSS`).
pub fn resident_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// CPU time (user plus system) process `pid` has used so far.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; the fields after its closing parenthesis are fixed.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // Linux reports in USER_HZ, 100 per second on every architecture it supports.
    Some(Duration::from_millis(ticks * 10))
}

/// CPU time of the whole machine so far, in USER_HZ ticks over all cores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MachineTicks {
    /// Everything but idle and waiting for I/O; the stolen ticks included.
    pub busy: u64,
    /// Taken by the hypervisor for other guests while this machine had work to run.
    pub stolen: u64,
    pub total: u64,
}

pub fn machine_ticks() -> Option<MachineTicks> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|t| t.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal (guest time is already in user and nice).
    let total: u64 = ticks.iter().take(8).sum();
    let idle = ticks.get(3)? + ticks.get(4)?;
    Some(MachineTicks {
        busy: total - idle,
        stolen: ticks.get(7).copied().unwrap_or(0),
        total,
    })
}

/// The shares of all cores that were busy, and stolen, between two readings of
/// [`machine_ticks`].
pub fn busy_share(before: MachineTicks, after: MachineTicks) -> (f64, f64) {
    let total = after.total.saturating_sub(before.total);
    if total == 0 {
        return (0.0, 0.0);
    }
    let share = |a: u64, b: u64| a.saturating_sub(b) as f64 / total as f64;
    (
        share(after.busy, before.busy),
        share(after.stolen, before.stolen),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let pid = std::process::id();
        assert!(resident_bytes(pid).is_some_and(|b| b > 0));
        let spin = std::time::Instant::now();
        while spin.elapsed() < Duration::from_millis(30) {
            std::hint::black_box(0u64);
        }
        assert!(cpu_time(pid).is_some());
        assert!(resident_bytes(u32::MAX).is_none());
        let now = machine_ticks().unwrap();
        assert!(now.stolen <= now.busy && now.busy <= now.total && now.total > 0);
        let ticks = |busy, stolen, total| MachineTicks {
            busy,
            stolen,
            total,
        };
        assert_eq!(
            busy_share(ticks(10, 2, 100), ticks(60, 12, 200)),
            (0.5, 0.1)
        );
        assert_eq!(busy_share(ticks(10, 2, 100), ticks(10, 2, 100)), (0.0, 0.0));
    }
}
