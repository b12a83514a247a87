//! The default address of an app run by hand: one of its own from a pool of loopback
//! addresses, never 127.0.0.1 (the host's own services live there).

use anyhow::Context;
use std::net::Ipv4Addr;
use std::path::Path;

/// The pool: 127.100.0.1 to 127.100.255.254, apart from what a worker's `--addresses`
/// usually takes (127.1.0.0/16 in the examples).
const POOL_BASE: u32 = u32::from_be_bytes([127, 100, 0, 0]);
const POOL_SIZE: u32 = 1 << 16;

/// An address held for one app while this value lives: an exclusive flock on
/// `<state>/run/addresses/<address>.lock`, which the kernel releases however the process
/// ends.
#[derive(Debug)]
pub struct Lease {
    /// The address.
    pub address: Ipv4Addr,
    _lock: std::fs::File,
}

/// Takes a free address from the pool.
pub fn lease(state_dir: &Path) -> anyhow::Result<Lease> {
    let dir = state_dir.join("run").join("addresses");
    picocenter_vmm::control::private_dir(&dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    // Start somewhere different for each process, so concurrent starts rarely collide.
    let start = std::process::id() % POOL_SIZE;
    for step in 0..POOL_SIZE {
        let host = (start + step) % POOL_SIZE;
        if host & 0xff == 0 || host & 0xff == 0xff {
            continue;
        }
        let address = Ipv4Addr::from(POOL_BASE + host);
        let path = dir.join(format!("{address}.lock"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {
                return Ok(Lease {
                    address,
                    _lock: file,
                })
            }
            Err(rustix::io::Errno::WOULDBLOCK) => continue,
            Err(e) => return Err(e).with_context(|| format!("locking {}", path.display())),
        }
    }
    anyhow::bail!("every address of 127.100.0.0/16 is taken by a running app; give --address")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_leases_never_share_an_address_and_none_is_the_hosts() {
        let state = tempfile::tempdir().unwrap();
        let first = lease(state.path()).unwrap();
        let second = lease(state.path()).unwrap();
        assert_ne!(first.address, second.address);
        for lease in [&first, &second] {
            assert_eq!(lease.address.octets()[..2], [127, 100]);
            assert_ne!(lease.address, Ipv4Addr::LOCALHOST);
        }
        // A released address can be taken again.
        let taken = first.address;
        drop(first);
        assert_eq!(lease(state.path()).unwrap().address, taken);
    }
}
