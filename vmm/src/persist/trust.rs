//! What a restore checks against its caller before anything is built. The manifest has
//! already been authenticated and bounds-checked (`picocenter_snapshots::bounds`); here it
//! must also be a snapshot of the app the caller restores, as the caller configured it:
//!
//! * the same name, set of writable directories and memory; the same image if the caller
//!   runs it from an image, and the same host program if the caller makes a temporary root
//!   from one (a caller who names a root directory has chosen the root itself). The
//!   caller's values are what the VMM uses; the manifest's are only compared;
//! * every snapshot of its chain of that app;
//! * no more pages than the app's memory holds: resident pages per snapshot, and the page
//!   files of the whole chain together (they are all attached as guest RAM).

use crate::Config;
use picocenter_snapshots::format::{Manifest, PAGE_SIZE};
use picocenter_snapshots::names::validate_guest_dir;
use std::collections::BTreeSet;

/// Why a snapshot is not the caller's to restore.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// A setting of the app differs.
    #[error(
        "the snapshot is of another app: its {what} is {found}, the app restored has {expected}"
    )]
    Mismatch {
        /// Which setting.
        what: &'static str,
        /// The snapshot's.
        found: String,
        /// The caller's.
        expected: String,
    },
    /// More pages than the app's memory.
    #[error(
        "the snapshot needs {need} pages for {what}, over the {have} pages of the app's memory"
    )]
    TooLarge {
        /// Which pages.
        what: String,
        /// Pages needed.
        need: u64,
        /// Pages of guest RAM.
        have: u64,
    },
}

fn mismatch(
    what: &'static str,
    found: impl std::fmt::Debug,
    expected: impl std::fmt::Debug,
) -> TrustError {
    TrustError::Mismatch {
        what,
        found: format!("{found:?}"),
        expected: format!("{expected:?}"),
    }
}

/// The caller's writable directories in their plain spelling (one that is not plain
/// cannot match any snapshot).
fn writable_set(config: &Config) -> BTreeSet<String> {
    config
        .writable
        .iter()
        .map(|(guest, _)| validate_guest_dir(guest).unwrap_or_else(|_| guest.clone()))
        .collect()
}

/// Checks the chain (newest first) against the caller's configuration.
pub fn check(chain: &[Manifest], config: &Config) -> Result<(), TrustError> {
    let Some(newest) = chain.first() else {
        return Ok(());
    };
    let app = &newest.app;
    if app.name != config.name {
        return Err(mismatch("name", &app.name, &config.name));
    }
    if config.image.is_some() && app.image != config.image {
        return Err(mismatch("image", &app.image, &config.image));
    }
    let recorded: BTreeSet<String> = app.writable.iter().cloned().collect();
    let given = writable_set(config);
    if recorded != given {
        return Err(mismatch("set of writable directories", recorded, given));
    }
    if app.memory_mib != config.memory_mib {
        return Err(mismatch("memory (MiB)", app.memory_mib, config.memory_mib));
    }
    if config.root_from.is_some() && app.root_from != config.root_from {
        return Err(mismatch(
            "root's host program",
            &app.root_from,
            &config.root_from,
        ));
    }
    if let Some(other) = chain.iter().find(|m| m.app.name != app.name) {
        return Err(mismatch(
            "parent snapshot's app name",
            &other.app.name,
            &app.name,
        ));
    }
    check_pages(chain, config.memory_mib.saturating_mul(1 << 20) / PAGE_SIZE)
}

/// Checks that the chain's pages fit in `have` pages of guest RAM.
fn check_pages(chain: &[Manifest], have: u64) -> Result<(), TrustError> {
    let too_large = |what: String, need: u64| {
        if need > have {
            Err(TrustError::TooLarge { what, need, have })
        } else {
            Ok(())
        }
    };
    let count = |runs: &[picocenter_snapshots::format::PageRun]| {
        runs.iter()
            .fold(0u64, |sum, run| sum.saturating_add(run.count))
    };
    for m in chain {
        too_large(
            format!("the resident pages of snapshot {}", m.id),
            count(&m.pages),
        )?;
        for part in m.tree.iter().flat_map(|t| &t.others) {
            too_large(
                format!(
                    "the resident pages of process {} in snapshot {}",
                    part.pid, m.id
                ),
                count(&part.pages),
            )?;
        }
    }
    if chain.iter().any(|m| m.tree.is_some()) {
        // Each process of a tree maps only the pages it has of the page files, which
        // hold every process's.
        return Ok(());
    }
    let attached = chain
        .iter()
        .fold(0u64, |sum, m| sum.saturating_add(m.page_count));
    too_large("the page files of the chain".into(), attached)
}

#[cfg(test)]
mod tests {
    use super::*;
    use picocenter_snapshots::format::{PageRun, PageSource};

    fn config() -> Config {
        Config {
            program: "/app".into(),
            argv: vec![],
            env: vec![],
            root: "/nonexistent".into(),
            readonly: vec![],
            writable: vec![("/tmp/".into(), "/data/tmp".into())],
            memory_mib: 16,
            cwd: "/".into(),
            name: "app".into(),
            trace_syscalls: false,
            address: std::net::Ipv4Addr::new(127, 100, 0, 1).into(),
            allow_outbound: false,
            control: None,
            inherited_sockets: vec![],
            mailbox: false,
            vcpus: 1,
            doorbell_time: false,
            guest_reads: false,
            image: Some("img".into()),
            root_from: None,
            snapshot_key: None,
        }
    }

    fn manifest(id: &str, runs: &[(u64, u64)], page_count: u64) -> Manifest {
        let mut m = Manifest {
            id: id.into(),
            page_count,
            pages: runs
                .iter()
                .map(|&(vpn, count)| PageRun {
                    vpn,
                    count,
                    source: PageSource::Zero,
                })
                .collect(),
            ..Default::default()
        };
        m.app.name = "app".into();
        m.app.image = Some("img".into());
        m.app.writable = vec!["/tmp".into()];
        m.app.memory_mib = 16;
        m
    }

    #[test]
    fn a_snapshot_must_be_the_callers_app_and_fit_its_memory() {
        let config = config();
        check(&[manifest("a", &[(0x400, 4096)], 10)], &config).unwrap();
        let refused = |chain: &[Manifest], expect: &str| {
            let why = check(chain, &config).unwrap_err().to_string();
            assert!(why.contains(expect), "{why}");
        };
        let mut other = manifest("a", &[], 0);
        other.app.name = "other".into();
        refused(&[other], "its name is \"other\"");
        let mut other = manifest("a", &[], 0);
        other.app.writable.push("/etc".into());
        refused(&[other], "writable directories");
        let mut other = manifest("a", &[], 0);
        other.app.image = Some("nginx".into());
        refused(&[other.clone()], "image");
        let mut own_root = config.clone();
        own_root.image = None;
        check(&[other], &own_root).unwrap();
        let mut other = manifest("a", &[], 0);
        other.app.memory_mib = 32;
        refused(&[other], "memory");
        let mut from_program = config.clone();
        from_program.root_from = Some("/usr/bin/other".into());
        let why = check(&[manifest("a", &[], 0)], &from_program).unwrap_err();
        assert!(why.to_string().contains("host program"), "{why}");
        let mut parent = manifest("p", &[], 0);
        parent.app.name = "other".into();
        refused(&[manifest("a", &[], 0), parent], "parent");
        refused(&[manifest("a", &[(0x400, 4097)], 0)], "resident pages");
        refused(
            &[manifest("a", &[], 3000), manifest("p", &[], 1097)],
            "page files of the chain",
        );
    }
}
