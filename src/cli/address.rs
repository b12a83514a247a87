//! The default address of an app run by hand: one of its own from a pool of loopback
//! addresses, never 127.0.0.1 (the host's own services live there).

use anyhow::Context;
use std::net::Ipv4Addr;
use std::path::Path;

/// The pool: 127.100.0.1 to 127.100.255.254, apart from what a worker's `--addresses`
/// usually takes (127.1.0.0/16 in the examples).
const POOL_BASE: u32 = u32::from_be_bytes([127, 100, 0, 0]);
const POOL_SIZE: u32 = 1 << 16;

/// An address held for one app while this value lives.
pub type Lease = picocenter_vmm::sandbox::lease::Lease<Ipv4Addr>;

/// Takes a free address from the pool (its lock in `<state>/run/addresses`).
pub fn lease(state_dir: &Path) -> anyhow::Result<Lease> {
    use picocenter_vmm::sandbox::lease::{spread, take_first_free};
    let dir = state_dir.join("run").join("addresses");
    let hosts = spread(0, POOL_SIZE)
        .filter(|host| host & 0xff != 0 && host & 0xff != 0xff)
        .map(|host| Ipv4Addr::from(POOL_BASE + host));
    take_first_free(&dir, hosts)
        .with_context(|| format!("leasing an address in {}", dir.display()))?
        .context("every address of 127.100.0.0/16 is taken by a running app; give --address")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_leases_never_share_an_address_and_none_is_the_hosts() {
        let state = tempfile::tempdir().unwrap();
        let first = lease(state.path()).unwrap();
        let second = lease(state.path()).unwrap();
        assert_ne!(first.value, second.value);
        for lease in [&first, &second] {
            assert_eq!(lease.value.octets()[..2], [127, 100]);
            assert_ne!(lease.value, Ipv4Addr::LOCALHOST);
        }
        // A released address can be taken again.
        let taken = first.value;
        drop(first);
        assert_eq!(lease(state.path()).unwrap().value, taken);
    }
}
