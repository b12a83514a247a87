//! `--trace-syscalls`: per-syscall counts, errors and time, printed like `strace -c`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

/// Totals for one syscall.
#[derive(Debug, Default, Clone, Copy)]
pub struct SyscallTotals {
    /// Calls.
    pub calls: u64,
    /// Calls that returned an error.
    pub errors: u64,
    /// Time spent in the VMM handling them.
    pub time: Duration,
}

/// Totals per syscall number.
#[derive(Debug, Default, Clone)]
pub struct SyscallTrace {
    by_nr: BTreeMap<u64, SyscallTotals>,
}

impl SyscallTrace {
    /// Records one call.
    pub fn record(&mut self, nr: u64, failed: bool, time: Duration) {
        let totals = self.by_nr.entry(nr).or_default();
        totals.calls += 1;
        totals.errors += failed as u64;
        totals.time += time;
    }

    /// The totals, by syscall number.
    pub fn totals(&self) -> impl Iterator<Item = (u64, SyscallTotals)> + '_ {
        self.by_nr.iter().map(|(&nr, &t)| (nr, t))
    }

    /// A table like `strace -c`'s, most time first. Handler time excludes the VM exit.
    pub fn summary(&self) -> String {
        let mut rows: Vec<(u64, SyscallTotals)> = self.totals().collect();
        rows.sort_by(|a, b| b.1.time.cmp(&a.1.time).then(b.1.calls.cmp(&a.1.calls)));
        let total_time: Duration = rows.iter().map(|(_, t)| t.time).sum();
        let mut out = String::new();
        let _ = writeln!(
            out,
            "% time     seconds  usecs/call     calls    errors syscall"
        );
        let _ = writeln!(
            out,
            "------ ----------- ----------- --------- --------- ----------------"
        );
        for (nr, t) in &rows {
            let share = if total_time.is_zero() {
                0.0
            } else {
                100.0 * t.time.as_secs_f64() / total_time.as_secs_f64()
            };
            let per_call = t.time.as_micros() as u64 / t.calls.max(1);
            let name = syscalls::Sysno::new(*nr as usize)
                .map(|s| s.name().to_string())
                .unwrap_or_else(|| format!("syscall_{nr}"));
            let errors = if t.errors > 0 {
                t.errors.to_string()
            } else {
                String::new()
            };
            let _ = writeln!(
                out,
                "{share:6.2} {:11.6} {per_call:11} {:9} {errors:>9} {name}",
                t.time.as_secs_f64(),
                t.calls
            );
        }
        let calls: u64 = rows.iter().map(|(_, t)| t.calls).sum();
        let errors: u64 = rows.iter().map(|(_, t)| t.errors).sum();
        let _ = writeln!(
            out,
            "------ ----------- ----------- --------- --------- ----------------"
        );
        let _ = writeln!(
            out,
            "100.00 {:11.6} {:11} {calls:9} {errors:9} total",
            total_time.as_secs_f64(),
            ""
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_names_calls_and_counts_errors() {
        let mut trace = SyscallTrace::default();
        trace.record(1, false, Duration::from_micros(5));
        trace.record(1, true, Duration::from_micros(5));
        trace.record(39, false, Duration::from_micros(1));
        let text = trace.summary();
        assert!(text.contains("write"), "{text}");
        assert!(text.contains("getpid"), "{text}");
        assert!(text
            .lines()
            .any(|l| l.ends_with("write") && l.contains(" 2 ")));
    }
}
