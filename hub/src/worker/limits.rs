//! The host limits that decide how many apps a worker can hold, checked (and raised where
//! the worker may) when it starts, so that an operator learns which one stops it before
//! the apps do.
//!
//! What one resident app takes: a VMM process with [`THREADS_PER_APP`] tasks (its vCPU
//! thread and KVM's own per-VM kernel thread while it idles; a mailbox poller and a
//! thread per control connection while it works); and in the worker [`FILES_PER_APP`]
//! open files (the VMM's supervision channel and pidfd, the name and uid lease locks it
//! handed over; its stats page is opened only to be read), and up to three held sockets
//! while it is swapped out instead.

use std::sync::atomic::{AtomicU64, Ordering};

/// Host tasks (pids) one resident app uses, with room for the threads of a busy one.
pub const THREADS_PER_APP: u64 = 4;
/// Files the worker keeps open per resident app.
pub const FILES_PER_APP: u64 = 4;
/// Files the worker keeps open whatever it holds (its runtime, listeners, clients).
const FILES_OF_ITS_OWN: u64 = 256;

/// The hard open-file limit the worker was started with, which the VMMs it starts get as
/// both their limits (see [`restore_open_files_for_vmm`]): what they had when the worker
/// could only raise its soft limit to it; an app needs no more host files for being on a
/// worker that holds thousands. Zero until [`check_and_raise`] runs.
static STARTED_HARD: AtomicU64 = AtomicU64::new(0);

/// What a check found: how many apps the host's limits allow, and what the worker did or
/// an operator should do.
#[derive(Debug, Default)]
pub struct LimitReport {
    /// The apps the tightest limit allows.
    pub apps: u64,
    /// The limit that sets `apps`.
    pub tightest: String,
    /// One line per limit raised or too low.
    pub notes: Vec<String>,
}

/// Raises the worker's open-file limit to what `pool` apps need (beyond its hard limit
/// where it may: as root, up to `fs.nr_open`), and reports how many apps the open files,
/// pids and threads allow, for a pool of `pool` addresses.
pub fn check_and_raise(pool: u32) -> LimitReport {
    let mut report = LimitReport {
        apps: u64::from(pool),
        tightest: format!("the address pool ({pool} addresses)"),
        notes: Vec::new(),
    };
    let mut consider = |apps: u64, what: String, fix: &str| {
        if apps < u64::from(pool) {
            report
                .notes
                .push(format!("{what} allows about {apps} apps; {fix}"));
        }
        if apps < report.apps {
            report.apps = apps;
            report.tightest = what;
        }
    };
    let mut failed = None;
    let wanted = u64::from(pool)
        .saturating_mul(FILES_PER_APP)
        .saturating_add(FILES_OF_ITS_OWN);
    match raise_open_files(wanted) {
        Ok((soft, hard)) => consider(
            soft.saturating_sub(FILES_OF_ITS_OWN) / FILES_PER_APP,
            format!("the open-file limit ({soft}, hard limit {hard})"),
            "raise the hard limit (ulimit -Hn, or LimitNOFILE= in a systemd unit)",
        ),
        Err(e) => failed = Some(format!("reading RLIMIT_NOFILE: {e}")),
    }
    if let Some(pid_max) = read_number("/proc/sys/kernel/pid_max") {
        consider(
            pid_max / THREADS_PER_APP,
            format!("kernel.pid_max ({pid_max})"),
            "raise it with `sysctl kernel.pid_max=4194304`",
        );
    }
    if let Some(threads_max) = read_number("/proc/sys/kernel/threads-max") {
        consider(
            threads_max / THREADS_PER_APP,
            format!("kernel.threads-max ({threads_max})"),
            "raise it with `sysctl kernel.threads-max=...`",
        );
    }
    report.notes.extend(failed);
    report
}

/// Raises RLIMIT_NOFILE to `wanted` (capped at `fs.nr_open`) where the worker may raise
/// the hard limit (CAP_SYS_RESOURCE), else the soft limit to the hard one: (soft, hard)
/// after.
fn raise_open_files(wanted: u64) -> std::io::Result<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit, which `limit` is.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if STARTED_HARD.load(Ordering::SeqCst) == 0 {
        STARTED_HARD.store(limit.rlim_max, Ordering::SeqCst);
    }
    let ceiling = read_number("/proc/sys/fs/nr_open").unwrap_or(limit.rlim_max);
    let target = wanted.min(ceiling);
    if target > limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: target,
            rlim_max: target,
        };
        // SAFETY: setrlimit reads one rlimit we own. Without CAP_SYS_RESOURCE it fails
        // (EPERM) and changes nothing.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            tracing::info!(
                from = limit.rlim_cur,
                hard_from = limit.rlim_max,
                to = target,
                "raised the open-file limit beyond its hard limit"
            );
            return Ok((target, target));
        }
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit reads one rlimit we own.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            tracing::info!(
                from = limit.rlim_cur,
                to = limit.rlim_max,
                "raised the open-file limit"
            );
            limit = raised;
        }
    }
    Ok((limit.rlim_cur, limit.rlim_max))
}

/// Gives the calling process the hard open-file limit the worker was started with, as
/// its soft and hard limits. Only a system call: safe between fork and exec.
pub fn restore_open_files_for_vmm() -> std::io::Result<()> {
    let hard = STARTED_HARD.load(Ordering::SeqCst);
    let limit = libc::rlimit {
        rlim_cur: hard,
        rlim_max: hard,
    };
    if limit.rlim_max == 0 {
        return Ok(());
    }
    // SAFETY: setrlimit reads one rlimit we own; lowering a limit needs no privilege.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn read_number(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_open_file_limit_is_raised_and_the_tightest_limit_named() {
        let report = check_and_raise(u32::MAX);
        let (soft, hard) = raise_open_files(0).unwrap();
        assert_eq!(soft, hard);
        // Some host limit is tighter than four billion apps, and it is named.
        assert!(report.apps < u64::from(u32::MAX), "{report:?}");
        assert!(!report.notes.is_empty() && !report.tightest.is_empty());
        // A small pool is the tightest.
        let small = check_and_raise(10);
        assert_eq!(small.apps, 10);
        assert!(small.tightest.contains("address pool"), "{small:?}");
    }

    /// Whether this process has CAP_SYS_RESOURCE (bit 24 of its effective capabilities).
    fn may_raise_hard_limits() -> bool {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let effective = status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
            .unwrap();
        effective & (1 << 24) != 0
    }

    #[test]
    fn a_worker_raises_its_hard_limit_for_its_pool_and_its_vmms_get_the_old_one_back() {
        use std::os::unix::process::CommandExt;
        let report = check_and_raise(5000);
        let (soft, hard) = raise_open_files(0).unwrap();
        let nr_open = read_number("/proc/sys/fs/nr_open").unwrap();
        let started = STARTED_HARD.load(Ordering::SeqCst);
        assert!(started > 0, "the starting hard limit was not kept");
        // With CAP_SYS_RESOURCE the worker raises its hard limit until 5,000 apps fit
        // (unless nr_open is smaller, when that is the ceiling); without it (root in a
        // container, here) the limit that stops it is named.
        let wanted = (5000 * FILES_PER_APP + FILES_OF_ITS_OWN).min(nr_open);
        if may_raise_hard_limits() {
            assert!(soft >= wanted && hard >= wanted, "{soft}/{hard} < {wanted}");
            assert!(
                !report.tightest.contains("open-file") || nr_open < wanted,
                "{report:?}"
            );
        } else if hard < wanted {
            assert!(report.apps < 5000, "{report:?}");
            assert!(
                report.notes.iter().any(|n| n.contains("open-file")),
                "{report:?}"
            );
        }
        let mut child = std::process::Command::new("sh");
        child.args(["-c", "ulimit -Sn; ulimit -Hn"]);
        // SAFETY: the closure only calls setrlimit, which is async-signal-safe.
        unsafe { child.pre_exec(restore_open_files_for_vmm) };
        let out = child.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let shown: Vec<&str> = text.lines().collect();
        let expect = |n: u64| {
            if n == libc::RLIM_INFINITY {
                "unlimited".to_string()
            } else {
                n.to_string()
            }
        };
        assert_eq!(shown, [expect(started), expect(started)], "{text}");
    }
}
