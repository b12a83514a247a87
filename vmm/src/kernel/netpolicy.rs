//! The app's network identity and outbound policy: the address its binds to any address
//! are rewritten to, and which peers it may reach. The socket calls are in `syscalls::net`.

use crate::sandbox::loopback6::APP_V6_PREFIX;
use rustix::io::Errno;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};

/// Whether `ip` is on this host's loopback: 127.0.0.0/8, ::1, or an app's IPv6 address.
pub fn is_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => a.is_loopback(),
        IpAddr::V6(a) => {
            a.is_loopback()
                || a.to_ipv4_mapped().is_some_and(|m| m.is_loopback())
                || a.segments()[..6] == APP_V6_PREFIX
        }
    }
}

/// Whether `ip` is the loopback address an app means itself by (127.0.0.1, ::1, or
/// 127.0.0.1 mapped): sockets bound to it use the app's own address and take nothing
/// from anyone else (see `syscalls::net`).
pub fn is_app_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => a == Ipv4Addr::LOCALHOST,
        IpAddr::V6(a) => {
            a == Ipv6Addr::LOCALHOST || a.to_ipv4_mapped() == Some(Ipv4Addr::LOCALHOST)
        }
    }
}

/// The IPv6 address of the app whose IPv4 address is `v4`.
pub fn app_v6(v4: Ipv4Addr) -> Ipv6Addr {
    let [a, b, c, d] = v4.octets();
    let p = APP_V6_PREFIX;
    Ipv6Addr::new(
        p[0],
        p[1],
        p[2],
        p[3],
        p[4],
        p[5],
        u16::from_be_bytes([a, b]),
        u16::from_be_bytes([c, d]),
    )
}

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

    /// Its IPv6 address: the one it was given, or the one that goes with its IPv4
    /// address ([`app_v6`]).
    pub fn v6(&self) -> Ipv6Addr {
        match self.address {
            IpAddr::V4(a) => app_v6(a),
            IpAddr::V6(a) => a,
        }
    }

    /// Whether `ip` is this app's own address (in any spelling, 127.0.0.1 and ::1 too).
    pub fn is_own(&self, ip: IpAddr) -> bool {
        if is_app_loopback(ip) {
            return true;
        }
        match ip {
            IpAddr::V4(a) => Some(a) == self.v4(),
            IpAddr::V6(a) => {
                a == self.v6() || a.to_ipv4_mapped().is_some_and(|m| Some(m) == self.v4())
            }
        }
    }

    /// Whether `ip` is the app's own IPv6 address, which no interface holds: a socket
    /// binds it with IP_FREEBIND.
    pub fn is_own_v6(&self, ip: IpAddr) -> bool {
        matches!(ip, IpAddr::V6(a) if a == self.v6() && a.to_ipv4_mapped().is_none())
    }

    /// The address a bind to `requested` really uses, or EADDRNOTAVAIL. The IPv6 any
    /// address means the app's IPv4 address (mapped) on a dual-stack socket, which takes
    /// both families there, and its IPv6 address on an IPv6-only one.
    pub fn bind_address(&self, requested: SocketAddr, v6only: bool) -> Result<SocketAddr, Errno> {
        let ip = requested.ip();
        if ip.is_unspecified() {
            return Ok(match (requested, self.v4()) {
                (SocketAddr::V4(r), own) => {
                    SocketAddr::new(IpAddr::V4(own.ok_or(Errno::ADDRNOTAVAIL)?), r.port())
                }
                (SocketAddr::V6(r), Some(own)) if !v6only => {
                    SocketAddr::V6(SocketAddrV6::new(own.to_ipv6_mapped(), r.port(), 0, 0))
                }
                (SocketAddr::V6(r), _) => {
                    SocketAddr::V6(SocketAddrV6::new(self.v6(), r.port(), 0, 0))
                }
            });
        }
        if is_app_loopback(ip) {
            return Ok(self.local_address(requested));
        }
        if self.is_own(ip) {
            Ok(requested)
        } else {
            Err(Errno::ADDRNOTAVAIL)
        }
    }

    /// The app's own address that stands for loopback address `loopback` (same family
    /// and port): its IPv4 address (mapped, for ::ffff:127.0.0.1) or its IPv6 address.
    pub fn local_address(&self, loopback: SocketAddr) -> SocketAddr {
        match (loopback, self.v4()) {
            (SocketAddr::V4(l), Some(own)) => SocketAddr::new(IpAddr::V4(own), l.port()),
            (SocketAddr::V6(l), Some(own)) if l.ip().to_ipv4_mapped().is_some() => {
                SocketAddr::V6(SocketAddrV6::new(own.to_ipv6_mapped(), l.port(), 0, 0))
            }
            (l, _) => SocketAddr::V6(SocketAddrV6::new(self.v6(), l.port(), 0, 0)),
        }
    }

    /// Whether the app may send to `dest`.
    pub fn may_reach(&self, dest: IpAddr) -> bool {
        self.allow_outbound || dest.is_unspecified() || self.is_own(dest)
    }
}
