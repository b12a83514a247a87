//! The app's network identity and outbound policy: the address its binds to any address
//! are rewritten to, and which peers it may reach. The socket calls are in `syscalls::net`.

use rustix::io::Errno;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV6};

/// The app's network identity.
#[derive(Debug, Clone)]
pub struct NetPolicy {
    /// Its address.
    pub address: IpAddr,
    /// Whether it may reach other hosts.
    pub allow_outbound: bool,
    /// Its name, which scopes its abstract AF_UNIX names.
    pub name: String,
}

impl NetPolicy {
    /// Its IPv4 address, if it has one (also as an IPv4-mapped IPv6 address).
    pub fn v4(&self) -> Option<Ipv4Addr> {
        match self.address {
            IpAddr::V4(a) => Some(a),
            IpAddr::V6(a) => a.to_ipv4_mapped(),
        }
    }

    /// Whether `ip` is this app's own address (in any spelling).
    pub fn is_own(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(a) => Some(a) == self.v4(),
            IpAddr::V6(a) => IpAddr::V6(a) == self.address || a.to_ipv4_mapped() == self.v4(),
        }
    }

    /// The address a bind to `requested` really uses, or EADDRNOTAVAIL.
    pub fn bind_address(&self, requested: SocketAddr) -> Result<SocketAddr, Errno> {
        let ip = requested.ip();
        if ip.is_unspecified() {
            return Ok(match (requested, self.address) {
                (SocketAddr::V4(r), _) => {
                    SocketAddr::new(IpAddr::V4(self.v4().ok_or(Errno::ADDRNOTAVAIL)?), r.port())
                }
                (SocketAddr::V6(r), IpAddr::V6(own)) => {
                    SocketAddr::V6(SocketAddrV6::new(own, r.port(), 0, 0))
                }
                (SocketAddr::V6(r), IpAddr::V4(own)) => {
                    SocketAddr::V6(SocketAddrV6::new(own.to_ipv6_mapped(), r.port(), 0, 0))
                }
            });
        }
        if self.is_own(ip) {
            Ok(requested)
        } else {
            Err(Errno::ADDRNOTAVAIL)
        }
    }

    /// Whether the app may send to `dest`.
    pub fn may_reach(&self, dest: IpAddr) -> bool {
        self.allow_outbound || dest.is_unspecified() || self.is_own(dest)
    }
}
