//! The app's one network interface, `lo`, as the socket ioctls (SIOCGIF*) and read-only
//! rtnetlink (`socket(AF_NETLINK, SOCK_RAW, NETLINK_ROUTE)`) show it, answered by the
//! VMM from the app's own view of the network: one interface, `lo`, holding the app's
//! IPv4 address (/8, as 127.0.0.0/8 is) and its IPv6 address (/128), and the routes to
//! them. `getifaddrs`, `if_nameindex`, `ip addr` and dnsmasq read this. No host netlink
//! socket is ever made (the seccomp filter refuses them anyway): the app's end is one end
//! of a host datagram socketpair whose other end the VMM writes its answers to, so the app
//! polls, reads and epolls it like any socket. Requests that would change something get
//! EPERM, as an unprivileged process gets.

use super::{Args, SysResult};
use crate::fdtable::{FileKind, OpenFile};
use crate::kernel::process::Process;
use crate::memory::UserAddr;
use rustix::io::Errno;
use std::net::IpAddr;
use std::os::fd::OwnedFd;
use std::sync::Arc;

const NLMSG_HDR: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_MULTI: u16 = 0x2;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const RTM_NEWADDR: u16 = 20;
const RTM_GETADDR: u16 = 22;
const RTM_NEWROUTE: u16 = 24;
const RTM_GETROUTE: u16 = 26;
/// The one interface's index.
const LOOPBACK_INDEX: i32 = 1;
/// Largest request the VMM reads from one send.
const MAX_REQUEST: usize = 64 << 10;

/// `struct sockaddr_nl` for port `pid`: the kernel's is 0.
pub fn sockaddr(pid: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(12);
    out.extend_from_slice(&(libc::AF_NETLINK as u16).to_ne_bytes());
    out.extend_from_slice(&0u16.to_ne_bytes());
    out.extend_from_slice(&pid.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    out
}

/// The app's port id on its netlink sockets (Linux gives a process's first socket its pid).
pub fn port() -> u32 {
    crate::kernel::GUEST_PID as u32
}

/// socket(AF_NETLINK, SOCK_RAW or SOCK_DGRAM, NETLINK_ROUTE).
pub fn socket(p: &mut Process, raw_type: i32, protocol: i32) -> SysResult {
    let kind = raw_type & 0xf;
    if kind != libc::SOCK_RAW && kind != libc::SOCK_DGRAM {
        return Err(Errno::SOCKTNOSUPPORT.into());
    }
    if protocol != libc::NETLINK_ROUTE {
        return Err(Errno::PROTONOSUPPORT.into());
    }
    let (app, vmm) = pair()?;
    let file = OpenFile::with_mode(app, FileKind::Netlink, raw_type & libc::SOCK_NONBLOCK != 0);
    file.state().netlink_answers = Some(vmm);
    Ok(p.files.insert(file, raw_type & libc::SOCK_CLOEXEC != 0)? as u64)
}

/// A host datagram socketpair: the app's end and the VMM's, both non-blocking.
pub fn pair() -> Result<(OwnedFd, Arc<OwnedFd>), Errno> {
    let (app, vmm) = rustix::net::socketpair(
        rustix::net::AddressFamily::UNIX,
        rustix::net::SocketType::DGRAM,
        rustix::net::SocketFlags::NONBLOCK | rustix::net::SocketFlags::CLOEXEC,
        None,
    )?;
    Ok((app, Arc::new(vmm)))
}

/// A send on a netlink socket: the request is answered at once, into the socket.
pub fn request(p: &mut Process, file: &OpenFile, bufs: &[(UserAddr, usize)]) -> SysResult {
    let answers = file.state().netlink_answers.clone().ok_or(Errno::NOTSOCK)?;
    let total = bufs
        .iter()
        .try_fold(0usize, |sum, (_, len)| sum.checked_add(*len))
        .filter(|&n| n <= MAX_REQUEST)
        .ok_or(Errno::MSGSIZE)?;
    let mut bytes = Vec::with_capacity(total);
    for &(addr, len) in bufs {
        let start = bytes.len();
        bytes.resize(start + len, 0);
        p.mem.read(addr, &mut bytes[start..])?;
    }
    let own = [
        IpAddr::V4(p.net.v4().unwrap_or(std::net::Ipv4Addr::LOCALHOST)),
        IpAddr::V6(p.net.v6()),
    ];
    for answer in answer_all(&bytes, &own) {
        rustix::net::send(&*answers, &answer, rustix::net::SendFlags::empty())?;
    }
    Ok(total as u64)
}

/// bind(2) and connect(2) on a netlink socket: to the kernel (port 0) or its own port;
/// multicast groups are accepted and never deliver (nothing changes).
pub fn address_call(p: &mut Process, a: &Args) -> SysResult {
    let len = a.u32(2) as usize;
    if len < 12 {
        return Err(Errno::INVAL.into());
    }
    let mut raw = [0u8; 12];
    p.mem.read(a.ptr(1), &mut raw)?;
    if u16::from_ne_bytes([raw[0], raw[1]]) != libc::AF_NETLINK as u16 {
        return Err(Errno::INVAL.into());
    }
    Ok(0)
}

/// One netlink message: header, then `payload`, padded to 4 bytes.
fn message(kind: u16, flags: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(NLMSG_HDR + payload.len() + 3);
    out.extend_from_slice(&((NLMSG_HDR + payload.len()) as u32).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&port().to_ne_bytes());
    out.extend_from_slice(payload);
    out.resize(out.len().next_multiple_of(4), 0);
    out
}

/// Appends an attribute (rtattr), padded to 4 bytes.
fn attr(out: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    out.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(payload);
    out.resize(out.len().next_multiple_of(4), 0);
}

/// An NLMSG_ERROR answer (`errno` 0 is an acknowledgement) to the request `header`.
fn error(errno: i32, header: &[u8], seq: u32) -> Vec<u8> {
    let mut payload = (-errno).to_ne_bytes().to_vec();
    payload.extend_from_slice(&header[..NLMSG_HDR]);
    message(NLMSG_ERROR, 0, seq, &payload)
}

/// The one link, lo.
fn link() -> Vec<u8> {
    let flags = (libc::IFF_UP | libc::IFF_LOOPBACK | libc::IFF_RUNNING | libc::IFF_LOWER_UP) as u32;
    let mut payload = vec![libc::AF_UNSPEC as u8, 0];
    payload.extend_from_slice(&libc::ARPHRD_LOOPBACK.to_ne_bytes());
    payload.extend_from_slice(&LOOPBACK_INDEX.to_ne_bytes());
    payload.extend_from_slice(&flags.to_ne_bytes());
    payload.extend_from_slice(&0u32.to_ne_bytes()); // change
    attr(&mut payload, libc::IFLA_IFNAME, b"lo\0");
    attr(&mut payload, libc::IFLA_MTU, &65536u32.to_ne_bytes());
    attr(&mut payload, libc::IFLA_TXQLEN, &1000u32.to_ne_bytes());
    attr(&mut payload, libc::IFLA_OPERSTATE, &[0]); // IF_OPER_UNKNOWN, as lo says
    attr(&mut payload, libc::IFLA_ADDRESS, &[0; 6]);
    attr(&mut payload, libc::IFLA_BROADCAST, &[0; 6]);
    payload
}

/// The address `ip` on lo.
fn address(ip: IpAddr) -> Vec<u8> {
    let (family, prefix, bytes) = match ip {
        IpAddr::V4(a) => (libc::AF_INET, 8, a.octets().to_vec()),
        IpAddr::V6(a) => (libc::AF_INET6, 128, a.octets().to_vec()),
    };
    let mut payload = vec![
        family as u8,
        prefix,
        libc::IFA_F_PERMANENT as u8,
        libc::RT_SCOPE_HOST,
    ];
    payload.extend_from_slice(&(LOOPBACK_INDEX as u32).to_ne_bytes());
    attr(&mut payload, libc::IFA_ADDRESS, &bytes);
    if family == libc::AF_INET {
        attr(&mut payload, libc::IFA_LOCAL, &bytes);
        attr(&mut payload, libc::IFA_LABEL, b"lo\0");
    }
    payload
}

/// The local route to `ip` (its prefix) through lo.
fn route(ip: IpAddr) -> Vec<u8> {
    let (family, prefix, bytes) = match ip {
        IpAddr::V4(a) => (libc::AF_INET, 8, a.octets().to_vec()),
        IpAddr::V6(a) => (libc::AF_INET6, 128, a.octets().to_vec()),
    };
    let mut dst = bytes.clone();
    if family == libc::AF_INET {
        dst[1..].fill(0);
    }
    let mut payload = vec![
        family as u8,
        prefix,
        0,
        0,
        libc::RT_TABLE_LOCAL,
        libc::RTPROT_KERNEL,
        libc::RT_SCOPE_HOST,
        libc::RTN_LOCAL,
    ];
    payload.extend_from_slice(&0u32.to_ne_bytes());
    attr(
        &mut payload,
        libc::RTA_TABLE,
        &u32::from(libc::RT_TABLE_LOCAL).to_ne_bytes(),
    );
    attr(&mut payload, libc::RTA_DST, &dst);
    attr(&mut payload, libc::RTA_PREFSRC, &bytes);
    attr(
        &mut payload,
        libc::RTA_OIF,
        &(LOOPBACK_INDEX as u32).to_ne_bytes(),
    );
    payload
}

fn family_of(ip: IpAddr) -> u8 {
    match ip {
        IpAddr::V4(_) => libc::AF_INET as u8,
        IpAddr::V6(_) => libc::AF_INET6 as u8,
    }
}

/// The answers (one datagram each) to every request in `bytes`.
fn answer_all(bytes: &[u8], own: &[IpAddr]) -> Vec<Vec<u8>> {
    let mut answers = Vec::new();
    let mut rest = bytes;
    while rest.len() >= NLMSG_HDR {
        let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if len < NLMSG_HDR || len > rest.len() {
            break;
        }
        let (one, next) = rest.split_at(len.next_multiple_of(4).min(rest.len()));
        rest = next;
        let kind = u16::from_ne_bytes([one[4], one[5]]);
        let flags = u16::from_ne_bytes([one[6], one[7]]);
        let seq = u32::from_ne_bytes([one[8], one[9], one[10], one[11]]);
        if flags & NLM_F_REQUEST == 0 {
            continue;
        }
        // The family a dump asks for (rtgenmsg's first byte; AF_UNSPEC: all).
        let family = one.get(NLMSG_HDR).copied().unwrap_or(0);
        let wanted = |ip: &&IpAddr| family == 0 || family == family_of(**ip);
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let parts: Vec<(u16, Vec<u8>)> = match kind {
            RTM_GETLINK if dump => vec![(RTM_NEWLINK, link())],
            RTM_GETLINK => {
                // ifinfomsg's index, after family, pad and type.
                let index = one
                    .get(NLMSG_HDR + 4..NLMSG_HDR + 8)
                    .map_or(0, |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
                if index == LOOPBACK_INDEX {
                    vec![(RTM_NEWLINK, link())]
                } else {
                    answers.push(error(libc::ENODEV, one, seq));
                    continue;
                }
            }
            RTM_GETADDR if dump => own
                .iter()
                .filter(wanted)
                .map(|ip| (RTM_NEWADDR, address(*ip)))
                .collect(),
            RTM_GETROUTE if dump => own
                .iter()
                .filter(wanted)
                .map(|ip| (RTM_NEWROUTE, route(*ip)))
                .collect(),
            RTM_GETADDR | RTM_GETROUTE => {
                answers.push(error(libc::EOPNOTSUPP, one, seq));
                continue;
            }
            // Every other request would change something, or is not rtnetlink's.
            _ => {
                answers.push(error(libc::EPERM, one, seq));
                continue;
            }
        };
        let multi = if dump { NLM_F_MULTI } else { 0 };
        let mut datagram = Vec::new();
        for (kind, payload) in parts {
            datagram.extend(message(kind, multi, seq, &payload));
        }
        if dump {
            datagram.extend(message(NLMSG_DONE, NLM_F_MULTI, seq, &0i32.to_ne_bytes()));
        } else if flags & NLM_F_ACK != 0 {
            datagram.extend(error(0, one, seq));
        }
        answers.push(datagram);
    }
    answers
}

const SIOCGIFNAME: u32 = 0x8910;
const SIOCGIFFLAGS: u32 = 0x8913;
const SIOCGIFADDR: u32 = 0x8915;
const SIOCGIFNETMASK: u32 = 0x891b;
const SIOCGIFMTU: u32 = 0x8921;
const SIOCGIFINDEX: u32 = 0x8933;
/// `struct ifreq`: a 16-byte name, then a 24-byte union.
const IFREQ_SIZE: usize = 40;

/// The interface ioctls on a socket (SIOCGIFINDEX, SIOCGIFNAME, SIOCGIFFLAGS,
/// SIOCGIFADDR, SIOCGIFNETMASK, SIOCGIFMTU), for `lo`, the one interface; `None` for any
/// other request. Any other interface is ENODEV.
pub fn interface_ioctl(p: &mut Process, request: u32, arg: UserAddr) -> Option<SysResult> {
    if ![
        SIOCGIFNAME,
        SIOCGIFFLAGS,
        SIOCGIFADDR,
        SIOCGIFNETMASK,
        SIOCGIFMTU,
        SIOCGIFINDEX,
    ]
    .contains(&request)
    {
        return None;
    }
    Some((|| {
        let mut ifreq = [0u8; IFREQ_SIZE];
        p.mem.read(arg, &mut ifreq)?;
        if request == SIOCGIFNAME {
            let index = i32::from_ne_bytes([ifreq[16], ifreq[17], ifreq[18], ifreq[19]]);
            if index != LOOPBACK_INDEX {
                return Err(Errno::NODEV.into());
            }
            ifreq[..16].fill(0);
            ifreq[..2].copy_from_slice(b"lo");
            p.mem.write(arg, &ifreq)?;
            return Ok(0);
        }
        let name_end = ifreq[..16].iter().position(|&b| b == 0).unwrap_or(16);
        if &ifreq[..name_end] != b"lo" {
            return Err(Errno::NODEV.into());
        }
        let union = &mut ifreq[16..];
        union.fill(0);
        let inet = |union: &mut [u8], ip: [u8; 4]| {
            union[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
            union[4..8].copy_from_slice(&ip);
        };
        match request {
            SIOCGIFINDEX => union[..4].copy_from_slice(&LOOPBACK_INDEX.to_ne_bytes()),
            SIOCGIFFLAGS => {
                let flags = (libc::IFF_UP | libc::IFF_LOOPBACK | libc::IFF_RUNNING) as u16;
                union[..2].copy_from_slice(&flags.to_ne_bytes());
            }
            SIOCGIFMTU => union[..4].copy_from_slice(&65536i32.to_ne_bytes()),
            SIOCGIFADDR => inet(
                union,
                p.net.v4().unwrap_or(std::net::Ipv4Addr::LOCALHOST).octets(),
            ),
            _ => inet(union, [255, 0, 0, 0]),
        }
        p.mem.write(arg, &ifreq)?;
        Ok(0)
    })())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(kind: u16, flags: u16, seq: u32, family: u8) -> Vec<u8> {
        let mut payload = vec![family, 0, 0, 0];
        payload.resize(16, 0);
        message(kind, flags, seq, &payload)
    }

    /// (type, seq) of each message in one datagram.
    fn kinds(datagram: &[u8]) -> Vec<(u16, u32)> {
        let mut out = Vec::new();
        let mut rest = datagram;
        while rest.len() >= NLMSG_HDR {
            let len = u32::from_ne_bytes(rest[..4].try_into().unwrap()) as usize;
            out.push((
                u16::from_ne_bytes([rest[4], rest[5]]),
                u32::from_ne_bytes(rest[8..12].try_into().unwrap()),
            ));
            rest = &rest[len.next_multiple_of(4).min(rest.len())..];
        }
        out
    }

    #[test]
    fn dumps_list_lo_and_the_apps_addresses_then_done() {
        let own = [
            "127.1.2.3".parse().unwrap(),
            "fd00:7069:636f::7f01:203".parse().unwrap(),
        ];
        let mut asked = request(RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP, 7, 0);
        asked.extend(request(
            RTM_GETADDR,
            NLM_F_REQUEST | NLM_F_DUMP,
            8,
            libc::AF_INET as u8,
        ));
        asked.extend(request(RTM_GETROUTE, NLM_F_REQUEST | NLM_F_DUMP, 9, 0));
        asked.extend(request(RTM_NEWROUTE, NLM_F_REQUEST | NLM_F_ACK, 10, 0));
        let answers = answer_all(&asked, &own);
        assert_eq!(answers.len(), 4);
        assert_eq!(kinds(&answers[0]), [(RTM_NEWLINK, 7), (NLMSG_DONE, 7)]);
        assert_eq!(kinds(&answers[1]), [(RTM_NEWADDR, 8), (NLMSG_DONE, 8)]);
        assert_eq!(
            kinds(&answers[2]),
            [(RTM_NEWROUTE, 9), (RTM_NEWROUTE, 9), (NLMSG_DONE, 9)]
        );
        assert_eq!(kinds(&answers[3]), [(NLMSG_ERROR, 10)]);
        let errno = i32::from_ne_bytes(answers[3][16..20].try_into().unwrap());
        assert_eq!(errno, -libc::EPERM);
        // The IPv4 address is there, as address and local.
        assert!(answers[1].windows(4).any(|w| w == [127, 1, 2, 3]));
    }

    #[test]
    fn truncated_and_hostile_requests_get_nothing_or_errors() {
        let own = ["127.0.0.9".parse().unwrap()];
        assert!(answer_all(&[0xff; 7], &own).is_empty());
        let mut lying = request(RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP, 1, 0);
        lying[..4].copy_from_slice(&10_000u32.to_ne_bytes());
        assert!(answer_all(&lying, &own).is_empty());
        let mut tiny = request(RTM_GETLINK, NLM_F_REQUEST, 1, 0);
        tiny[..4].copy_from_slice(&16u32.to_ne_bytes());
        let answers = answer_all(&tiny, &own);
        assert_eq!(kinds(&answers[0]), [(NLMSG_ERROR, 1)]);
    }
}
