//! What an app's VMM jail shows (see `picocenter_vmm::sandbox::jail` and `supervise`).

use picocenter_vmm::control::NameLease;
use picocenter_vmm::sandbox::jail::{self, Access, JailSpec};
use picocenter_vmm::sandbox::supervise::{self, Lockdown};
use picocenter_vmm::Config;
use std::path::{Path, PathBuf};

/// What the jail of one VMM shows and what its user must own.
#[derive(Debug)]
pub struct Plan {
    spec: JailSpec,
    /// Directories the app's uid must own (recursively): where it writes.
    owned: Vec<PathBuf>,
    /// Temporary directories to remove when the VMM is done (the jailed VMM may not).
    cleanup: Vec<PathBuf>,
    /// Leases the supervisor holds until it has removed `cleanup`.
    held: Vec<NameLease>,
    run_dir: PathBuf,
    address: std::net::IpAddr,
}

impl Plan {
    /// The jail of a VMM that runs `config`.
    pub fn for_config(state_dir: &Path, config: &Config) -> Self {
        let mut plan = Plan {
            spec: JailSpec::default(),
            owned: Vec::new(),
            cleanup: Vec::new(),
            held: Vec::new(),
            run_dir: state_dir.join("run"),
            address: config.address,
        };
        jail::base_paths(&mut plan.spec);
        plan.spec.show(&config.root, Access::ReadOnly);
        for (_, host) in &config.readonly {
            plan.spec.show(host, Access::ReadOnly);
        }
        for (_, host) in &config.writable {
            plan.writable(host);
        }
        plan.spec.show(&plan.run_dir, Access::ReadWrite);
        plan
    }

    /// Removes `dir` (a temporary root or data directory) when the VMM is done.
    pub fn remove_after(&mut self, dir: &Path) {
        self.cleanup.push(dir.to_path_buf());
    }

    /// Keeps the app's name taken until what the VMM left is removed.
    pub fn hold(&mut self, lease: &NameLease) {
        self.held.push(lease.clone());
    }

    /// Shows `dir` read-write and gives it to the app's uid.
    pub fn writable(&mut self, dir: &Path) {
        self.spec.show(dir, Access::ReadWrite);
        self.owned.push(dir.to_path_buf());
    }
}

/// Runs `vmm` in the jail `plan` describes (see `supervise::supervise`); the child
/// reports its own errors.
pub fn run_jailed(
    plan: Plan,
    vmm: impl FnOnce(&Lockdown) -> anyhow::Result<i32>,
) -> anyhow::Result<i32> {
    let report = |lockdown: &Lockdown| match vmm(lockdown) {
        Ok(status) => status,
        Err(err) => {
            eprintln!(
                "picocenter: error: {}",
                picocenter_vmm::report::error_chain(err.as_ref())
            );
            1
        }
    };
    let held: Vec<_> = plan.held.iter().map(NameLease::lock).collect();
    Ok(supervise::supervise(
        plan.spec,
        &plan.owned,
        &plan.cleanup,
        &held,
        &plan.run_dir,
        plan.address,
        report,
    )?)
}
