//! The host limits that decide how many apps a worker can hold, checked (and raised where
//! the worker may) when it starts, so that an operator learns which one stops it before
//! the apps do.
//!
//! What one resident app takes: a VMM process with [`THREADS_PER_APP`] tasks (its vCPU
//! thread and KVM's own per-VM kernel thread while it idles; a mailbox poller and a
//! thread per control connection while it works); and in the worker its open files (the
//! VMM's stats page, its supervision channel and a pidfd, the lease locks it handed
//! over), and its held sockets while it is swapped out.

/// Host tasks (pids) one resident app uses, with room for the threads of a busy one.
pub const THREADS_PER_APP: u64 = 4;
/// Files the worker keeps open per app, with room for held sockets.
const FILES_PER_APP: u64 = 8;

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

/// Raises the worker's open-file limit to its hard limit, and reports how many apps the
/// open files, pids and threads allow, for a pool of `pool` addresses.
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
    match raise_open_files() {
        Ok((soft, hard)) => consider(
            soft / FILES_PER_APP,
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

/// Sets the soft RLIMIT_NOFILE to the hard one: (soft, hard) after.
fn raise_open_files() -> std::io::Result<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit, which `limit` is.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
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

fn read_number(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_open_file_limit_is_raised_and_the_tightest_limit_named() {
        let report = check_and_raise(u32::MAX);
        let (soft, hard) = raise_open_files().unwrap();
        assert_eq!(soft, hard);
        // Some host limit is tighter than four billion apps, and it is named.
        assert!(report.apps < u64::from(u32::MAX), "{report:?}");
        assert!(!report.notes.is_empty() && !report.tightest.is_empty());
        // A small pool is the tightest.
        let small = check_and_raise(10);
        assert_eq!(small.apps, 10);
        assert!(small.tightest.contains("address pool"), "{small:?}");
    }
}
