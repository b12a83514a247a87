//! Sockets: host sockets the VMM owns, behind a per-app address.
//!
//! * **The NAT.** Each app has its own address (127.x.y.z on one machine). A bind to
//!   INADDR_ANY or in6addr_any is rewritten to it; a bind to any other address fails with
//!   EADDRNOTAVAIL. So two apps can both listen on port 80, and neither can take the
//!   other's address.
//! * **Outbound policy.** Without `allow_outbound`, an app may only connect or send to its
//!   own address (ENETUNREACH otherwise). Its outgoing sockets are bound to its address,
//!   so peers see the right source.
//! * **Localhost is the app's own, and private.** 127.0.0.1 and ::1 mean the app itself:
//!   a bind there uses its own address, a connect or send there goes to its own address
//!   (never to the host's loopback services), and such a socket takes connections and
//!   datagrams only from the app itself (others are dropped unseen), so what an app keeps
//!   on localhost stays its own. getsockname says 127.0.0.1 (or ::1) as the app asked.
//! * **AF_UNIX** paths are resolved inside the app's sandbox like any path; abstract names
//!   are prefixed with the app's name so apps cannot meet there.

use super::wait::retry;
use super::{netlink, Args, SysError, SysResult};
use crate::fdtable::{FileKind, OpenFile};
use crate::hostcall;
use crate::kernel::process::Process;
use crate::memory::UserAddr;
use crate::sandbox::Follow;
use rustix::event::PollFlags;
use rustix::io::Errno;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

const AF_UNIX: u16 = libc::AF_UNIX as u16;
const AF_INET: u16 = libc::AF_INET as u16;
const AF_INET6: u16 = libc::AF_INET6 as u16;
const SOCK_TYPE_MASK: i32 = 0xf;
const MSG_DONTWAIT: i32 = libc::MSG_DONTWAIT;
const MSG_NOSIGNAL: i32 = libc::MSG_NOSIGNAL;

/// A socket address the app gave, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Address {
    Ip(SocketAddr),
    UnixPath(String),
    UnixAbstract(Vec<u8>),
    UnixUnnamed,
}

fn read_address(p: &mut Process, addr: UserAddr, len: u32) -> Result<Address, Errno> {
    if !(2..=hostcall::SOCKADDR_MAX as u32).contains(&len) {
        return Err(Errno::INVAL);
    }
    let mut bytes = vec![0u8; len as usize];
    p.mem.read(addr, &mut bytes)?;
    decode_address(&bytes)
}

fn decode_address(bytes: &[u8]) -> Result<Address, Errno> {
    let [a, b, ..] = *bytes else {
        return Err(Errno::INVAL);
    };
    let family = u16::from_ne_bytes([a, b]);
    let port = |b: &[u8]| u16::from_be_bytes([b[2], b[3]]);
    match family {
        AF_INET if bytes.len() >= 16 => {
            let ip = Ipv4Addr::new(bytes[4], bytes[5], bytes[6], bytes[7]);
            Ok(Address::Ip(SocketAddr::V4(SocketAddrV4::new(
                ip,
                port(bytes),
            ))))
        }
        AF_INET6 if bytes.len() >= 24 => {
            let octets: [u8; 16] = bytes[8..24].try_into().map_err(|_| Errno::INVAL)?;
            let scope = bytes
                .get(24..28)
                .map_or(0, |s| u32::from_ne_bytes(s.try_into().unwrap_or_default()));
            let flow = u32::from_be_bytes(bytes[4..8].try_into().map_err(|_| Errno::INVAL)?);
            Ok(Address::Ip(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(octets),
                port(bytes),
                flow,
                scope,
            ))))
        }
        AF_UNIX => {
            let path = &bytes[2..];
            if path.is_empty() {
                Ok(Address::UnixUnnamed)
            } else if path[0] == 0 {
                Ok(Address::UnixAbstract(path[1..].to_vec()))
            } else {
                let end = path.iter().position(|&b| b == 0).unwrap_or(path.len());
                Ok(Address::UnixPath(crate::sandbox::pathbytes::from_guest(
                    path[..end].to_vec(),
                )))
            }
        }
        AF_INET | AF_INET6 => Err(Errno::INVAL),
        _ => Err(Errno::AFNOSUPPORT),
    }
}

/// The raw `sockaddr_in` or `sockaddr_in6` of `addr`, as the app's calls carry it.
pub fn encode_ip(addr: SocketAddr) -> Vec<u8> {
    match addr {
        SocketAddr::V4(a) => {
            let mut out = vec![0u8; 16];
            out[0..2].copy_from_slice(&AF_INET.to_ne_bytes());
            out[2..4].copy_from_slice(&a.port().to_be_bytes());
            out[4..8].copy_from_slice(&a.ip().octets());
            out
        }
        SocketAddr::V6(a) => {
            let mut out = vec![0u8; 28];
            out[0..2].copy_from_slice(&AF_INET6.to_ne_bytes());
            out[2..4].copy_from_slice(&a.port().to_be_bytes());
            out[4..8].copy_from_slice(&a.flowinfo().to_be_bytes());
            out[8..24].copy_from_slice(&a.ip().octets());
            out[24..28].copy_from_slice(&a.scope_id().to_ne_bytes());
            out
        }
    }
}

fn encode_unix(path: &[u8], abstract_name: bool) -> Vec<u8> {
    let mut out = AF_UNIX.to_ne_bytes().to_vec();
    if abstract_name {
        out.push(0);
    }
    out.extend_from_slice(path);
    if !abstract_name {
        out.push(0);
    }
    out
}

/// Writes a socket address back to the app: `*len_ptr` says how much room there is; the
/// true length is written back, and the address truncated to fit.
fn write_address(
    p: &mut Process,
    addr: UserAddr,
    len_ptr: UserAddr,
    bytes: &[u8],
) -> Result<(), Errno> {
    if addr.is_null() || len_ptr.is_null() {
        return Ok(());
    }
    let room: u32 = p.mem.read_pod(len_ptr)?;
    let n = bytes.len().min(room as usize);
    p.mem.write(addr, &bytes[..n])?;
    p.mem.write_pod(len_ptr, &(bytes.len() as u32))?;
    Ok(())
}

/// The host fd of a guest socket fd, or ENOTSOCK.
fn socket(p: &Process, fd: i32) -> Result<Arc<OpenFile>, Errno> {
    let file = p.files.file(fd)?;
    match file.kind {
        FileKind::Socket { .. } | FileKind::Netlink => Ok(file),
        _ => Err(Errno::NOTSOCK),
    }
}

/// What an AF_UNIX address means on the host, with the fd that keeps it meaningful: a
/// bind names a new entry through its directory's fd; a connect or send names the socket
/// file itself through its own fd (never a path the host would resolve again, so a
/// symlink cannot lead outside the sandbox); an abstract name is scoped to the app.
struct UnixTarget {
    /// The socket file (connect) or its directory (bind), held while the call uses `raw`.
    holder: Option<OwnedFd>,
    raw: Vec<u8>,
}

fn unix_target(p: &Process, address: &Address, creating: bool) -> Result<UnixTarget, Errno> {
    match address {
        Address::UnixPath(path) => {
            let absolute = p.absolute(path);
            let (host, holder) = if creating {
                let entry = p.sandbox.entry(&absolute)?;
                let host = entry.unix_bind_address()?;
                (host, entry.into_dir())
            } else {
                let node = p.sandbox.lookup(&absolute, Follow::Yes)?;
                (node.unix_address()?, node.into_fd())
            };
            Ok(UnixTarget {
                raw: encode_unix(&host, false),
                holder: Some(holder),
            })
        }
        Address::UnixAbstract(name) => {
            let mut scoped = format!("picocenter/{}/", p.net.name).into_bytes();
            scoped.extend_from_slice(name);
            if scoped.len() >= 107 {
                return Err(Errno::NAMETOOLONG);
            }
            Ok(UnixTarget {
                raw: encode_unix(&scoped, true),
                holder: None,
            })
        }
        _ => Err(Errno::INVAL),
    }
}

/// socket(2): AF_INET, AF_INET6 and AF_UNIX stream and datagram sockets.
pub fn socket_call(p: &mut Process, a: &Args) -> SysResult {
    let (domain, raw_type, protocol) = (a.i32(0), a.i32(1), a.i32(2));
    if domain == libc::AF_NETLINK {
        return netlink::socket(p, raw_type, protocol);
    }
    if ![libc::AF_INET, libc::AF_INET6, libc::AF_UNIX].contains(&domain) {
        return Err(Errno::AFNOSUPPORT.into());
    }
    let kind = raw_type & SOCK_TYPE_MASK;
    if kind != libc::SOCK_STREAM && kind != libc::SOCK_DGRAM && kind != libc::SOCK_SEQPACKET {
        return Err(Errno::PROTONOSUPPORT.into());
    }
    let fd = rustix::net::socket_with(
        rustix::net::AddressFamily::from_raw(domain as u16),
        rustix::net::SocketType::from_raw(kind as u32),
        rustix::net::SocketFlags::NONBLOCK | rustix::net::SocketFlags::CLOEXEC,
        (protocol != 0).then(|| {
            rustix::net::Protocol::from_raw(
                std::num::NonZeroU32::new(protocol as u32).expect("checked non-zero"),
            )
        }),
    )?;
    let file = OpenFile::with_mode(
        fd,
        FileKind::Socket { domain, kind },
        raw_type & libc::SOCK_NONBLOCK != 0,
    );
    Ok(p.files.insert(file, raw_type & libc::SOCK_CLOEXEC != 0)? as u64)
}

/// socketpair(2) (AF_UNIX only).
pub fn socketpair(p: &mut Process, a: &Args) -> SysResult {
    if a.i32(0) != libc::AF_UNIX {
        return Err(Errno::AFNOSUPPORT.into());
    }
    let raw_type = a.i32(1);
    let kind = raw_type & SOCK_TYPE_MASK;
    let (x, y) = rustix::net::socketpair(
        rustix::net::AddressFamily::UNIX,
        rustix::net::SocketType::from_raw(kind as u32),
        rustix::net::SocketFlags::NONBLOCK | rustix::net::SocketFlags::CLOEXEC,
        None,
    )?;
    let nonblock = raw_type & libc::SOCK_NONBLOCK != 0;
    let cloexec = raw_type & libc::SOCK_CLOEXEC != 0;
    let inode = |fd: &OwnedFd| rustix::fs::fstat(fd).ok().map(|s| s.st_ino);
    let (x_inode, y_inode) = (inode(&x), inode(&y));
    let end = |fd, peer| {
        let kind = FileKind::Socket {
            domain: libc::AF_UNIX,
            kind,
        };
        let file = OpenFile::with_mode(fd, kind, nonblock);
        file.state().pair_peer = peer;
        file
    };
    let first = p.files.insert(end(x, y_inode), cloexec)?;
    let second = match p.files.insert(end(y, x_inode), cloexec) {
        Ok(fd) => fd,
        Err(e) => {
            p.files.remove(first)?;
            return Err(e.into());
        }
    };
    p.mem.write_pod(a.ptr(3), &[first, second])?;
    Ok(0)
}

/// bind(2), through the NAT.
pub fn bind(p: &mut Process, a: &Args) -> SysResult {
    let file = socket(p, a.fd(0))?;
    if matches!(file.kind, FileKind::Netlink) {
        return netlink::address_call(p, a);
    }
    let address = read_address(p, a.ptr(1), a.u32(2))?;
    match &address {
        Address::Ip(requested) => {
            let v6only = requested.is_ipv6() && rustix::net::sockopt::ipv6_v6only(file.host())?;
            bind_ip(p, file.host(), *requested, v6only)?;
            file.state().bound = Some(*requested);
            let datagram =
                matches!(file.kind, FileKind::Socket { kind, .. } if kind == libc::SOCK_DGRAM);
            if datagram && !local_only(&file) {
                p.handoff.offer(a.fd(0), &file);
            }
        }
        Address::UnixPath(_) | Address::UnixAbstract(_) => {
            let target = unix_target(p, &address, true)?;
            crate::sandbox::binder::bind(file.host(), &target.raw)?;
        }
        Address::UnixUnnamed => return Err(Errno::INVAL.into()),
    }
    file.state().unix_name = kept_unix_name(p, &address);
    Ok(0)
}

/// An AF_UNIX name as a socket's state keeps it (to bind or connect a restored socket
/// there again): a path made absolute, or an abstract name; `None` for anything else.
fn kept_unix_name(p: &Process, address: &Address) -> Option<Vec<u8>> {
    match address {
        Address::UnixPath(path) => Some(encode_unix(
            &crate::sandbox::pathbytes::to_host(&p.absolute(path)),
            false,
        )),
        Address::UnixAbstract(name) => Some(encode_unix(name, true)),
        _ => None,
    }
}

/// Binds host socket `fd` where a bind to `requested` goes for this app (see
/// [`crate::kernel::netpolicy::NetPolicy::bind_address`]), and returns that address. The
/// app's own IPv6 address is on no interface (its prefix is routed to loopback), so its
/// sockets bind it with IP_FREEBIND.
fn bind_ip(
    p: &Process,
    fd: BorrowedFd<'_>,
    requested: SocketAddr,
    v6only: bool,
) -> Result<SocketAddr, Errno> {
    let actual = p.net.bind_address(requested, v6only)?;
    if p.net.is_own_v6(actual.ip()) {
        rustix::net::sockopt::set_ip_freebind(fd, true)?;
    }
    crate::sandbox::binder::bind(fd, &encode_ip(actual))?;
    Ok(actual)
}

/// Whether the options a snapshot recorded make an IPv6 socket IPv6-only.
fn v6only_among(options: &[(i32, i32, Vec<u8>)]) -> bool {
    options.iter().any(|(level, name, value)| {
        *level == libc::IPPROTO_IPV6 && *name == libc::IPV6_V6ONLY && value.iter().any(|&b| b != 0)
    })
}

/// listen(2).
pub fn listen(p: &mut Process, a: &Args) -> SysResult {
    let file = socket(p, a.fd(0))?;
    let backlog = a.i32(1).clamp(0, 4096);
    rustix::net::listen(file.host(), backlog)?;
    file.state().listening = Some(backlog);
    if matches!(file.kind, FileKind::Socket { domain, .. } if domain != libc::AF_UNIX)
        && !local_only(&file)
    {
        p.handoff.offer(a.fd(0), &file);
    }
    Ok(0)
}

/// Whether `file` is bound to 127.0.0.1 or ::1: it takes nothing from outside the app.
pub(crate) fn local_only(file: &OpenFile) -> bool {
    file.state()
        .bound
        .is_some_and(|b| crate::kernel::netpolicy::is_app_loopback(b.ip()))
}

/// Whether a peer (a host socket address) is the app itself: its own address, which its
/// outgoing sockets are bound to (the host's 127.0.0.1 is somebody else).
fn from_the_app(p: &Process, peer: &[u8]) -> bool {
    matches!(decode_address(peer), Ok(Address::Ip(a))
        if !crate::kernel::netpolicy::is_app_loopback(a.ip()) && p.net.is_own(a.ip()))
}

/// accept(2) and accept4(2).
pub fn accept4(p: &mut Process, a: &Args, flags: i32) -> SysResult {
    if flags & !(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC) != 0 {
        return Err(Errno::INVAL.into());
    }
    let file = socket(p, a.fd(0))?;
    let private = local_only(&file);
    let (fd, peer) = retry(p, &file, PollFlags::IN, |p| loop {
        let (fd, peer) = hostcall::accept4(file.host(), libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)?;
        // A localhost socket's connections from anyone but the app are closed unseen.
        if !private || from_the_app(p, &peer) {
            return Ok((fd, peer));
        }
    })?;
    let kind = file.kind.clone();
    let accepted = OpenFile::with_mode(fd, kind, flags & libc::SOCK_NONBLOCK != 0);
    let guest_fd = p.files.insert(accepted, flags & libc::SOCK_CLOEXEC != 0)?;
    if let Err(e) = write_address(p, a.ptr(1), a.ptr(2), &peer) {
        p.files.remove(guest_fd)?;
        return Err(e.into());
    }
    p.accepted += 1;
    if let Some(first) = &mut p.first_request {
        first.accepted(guest_fd);
    }
    if let Some(port) = file.state().bound.map(|a| a.port()) {
        p.activeset.accepted(port, guest_fd);
    }
    Ok(guest_fd as u64)
}

/// Binds an unbound IP socket to the app's address (port 0) before it talks to a local
/// peer, so that the peer sees the app's address as the source. Traffic to other hosts
/// (when allowed) leaves from whatever address the host routes it through.
fn bind_source(p: &Process, file: &OpenFile, dest: SocketAddr) -> Result<(), Errno> {
    if file.state().bound.is_some()
        || (p.net.allow_outbound && !crate::kernel::netpolicy::is_local(dest.ip()))
    {
        return Ok(());
    }
    // To an IPv6 peer (not a mapped IPv4 one), from the app's IPv6 address.
    let (any, v6only) = match dest {
        SocketAddr::V4(_) => (SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0), false),
        SocketAddr::V6(d) => (
            SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
            d.ip().to_ipv4_mapped().is_none(),
        ),
    };
    let source = bind_ip(p, file.host(), any, v6only)?;
    file.state().bound = Some(source);
    Ok(())
}

/// The destination an IP address names, with 0.0.0.0 meaning the app itself (as Linux
/// treats a connect to INADDR_ANY as one to the local host).
fn destination(p: &Process, dest: SocketAddr) -> Result<SocketAddr, Errno> {
    if !p.net.may_reach(dest.ip()) {
        tracing::debug!(%dest, "outbound connection refused by policy");
        return Err(Errno::NETUNREACH);
    }
    if dest.ip().is_unspecified() {
        return p.net.bind_address(dest, false);
    }
    if crate::kernel::netpolicy::is_app_loopback(dest.ip()) {
        return Ok(p.net.local_address(dest));
    }
    Ok(dest)
}

/// connect(2), within the outbound policy.
pub fn connect(p: &mut Process, a: &Args) -> SysResult {
    let file = socket(p, a.fd(0))?;
    if matches!(file.kind, FileKind::Netlink) {
        return netlink::address_call(p, a);
    }
    let address = read_address(p, a.ptr(1), a.u32(2))?;
    let (raw, _keep) = match &address {
        Address::Ip(dest) => {
            let dest = destination(p, *dest)?;
            bind_source(p, &file, dest)?;
            (encode_ip(dest), None)
        }
        Address::UnixUnnamed => return Err(Errno::INVAL.into()),
        _ => {
            let target = unix_target(p, &address, false)?;
            (target.raw.clone(), Some(target))
        }
    };
    let datagram = matches!(file.kind, FileKind::Socket { kind, .. } if kind == libc::SOCK_DGRAM);
    let result = hostcall::connect(file.host(), &raw);
    if result.is_ok() && datagram {
        file.state().connected_to = kept_unix_name(p, &address);
    }
    match result {
        Err(Errno::INPROGRESS) if !file.nonblocking() => {
            super::wait::wait_fd(p, file.host(), PollFlags::OUT, None)?;
            let error = hostcall::getsockopt(file.host(), libc::SOL_SOCKET, libc::SO_ERROR, 4)?;
            let code = i32::from_ne_bytes(error.try_into().unwrap_or_default());
            if code != 0 {
                return Err(Errno::from_raw_os_error(code).into());
            }
            Ok(0)
        }
        other => Ok(other.map(|()| 0)?),
    }
}

fn name_call(p: &mut Process, a: &Args, peer: bool) -> SysResult {
    let file = socket(p, a.fd(0))?;
    if matches!(file.kind, FileKind::Netlink) {
        let port = if peer { 0 } else { netlink::port() };
        write_address(p, a.ptr(1), a.ptr(2), &netlink::sockaddr(port))?;
        return Ok(0);
    }
    let saved = if peer {
        None
    } else {
        file.state().unix_name.clone()
    };
    let loopback = if peer {
        None
    } else {
        file.state()
            .bound
            .filter(|b| crate::kernel::netpolicy::is_app_loopback(b.ip()))
    };
    let bytes = match saved {
        Some(name) => name,
        None if loopback.is_some() => {
            // As the app asked: 127.0.0.1 (or ::1), at the port it got.
            let host = hostcall::getsockname(file.host())?;
            let port = match decode_address(&host) {
                Ok(Address::Ip(a)) => a.port(),
                _ => 0,
            };
            let mut shown = loopback.expect("checked");
            shown.set_port(port);
            encode_ip(shown)
        }
        None => {
            let host = if peer {
                hostcall::getpeername(file.host())?
            } else {
                hostcall::getsockname(file.host())?
            };
            // A host AF_UNIX name is a VMM path the app never used: report it unnamed.
            let is_unix = host.len() >= 2 && u16::from_ne_bytes([host[0], host[1]]) == AF_UNIX;
            if is_unix {
                AF_UNIX.to_ne_bytes().to_vec()
            } else {
                host
            }
        }
    };
    write_address(p, a.ptr(1), a.ptr(2), &bytes)?;
    Ok(0)
}

/// getsockname(2).
pub fn getsockname(p: &mut Process, a: &Args) -> SysResult {
    name_call(p, a, false)
}

/// getpeername(2).
pub fn getpeername(p: &mut Process, a: &Args) -> SysResult {
    name_call(p, a, true)
}

/// Option levels passed through to the host.
fn allowed_level(level: i32) -> bool {
    matches!(
        level,
        libc::SOL_SOCKET
            | libc::IPPROTO_TCP
            | libc::IPPROTO_IP
            | libc::IPPROTO_IPV6
            | libc::IPPROTO_UDP
    )
}

/// Options that would reach outside the app's sandbox, or that Linux keeps for
/// privileged callers (the VMM may run with privileges the app must not borrow): binding
/// to a device, marks and priorities that steer host routing, socket filters, buffers
/// beyond the host's limits (the FORCE variants), transparent proxying and debugging.
fn forbidden_option(level: i32, name: i32, value: &[u8]) -> bool {
    match level {
        libc::SOL_SOCKET => match name {
            libc::SO_BINDTODEVICE
            | libc::SO_BINDTOIFINDEX
            | libc::SO_MARK
            | libc::SO_ATTACH_FILTER
            | libc::SO_ATTACH_BPF
            | libc::SO_ATTACH_REUSEPORT_CBPF
            | libc::SO_ATTACH_REUSEPORT_EBPF
            | libc::SO_SNDBUFFORCE
            | libc::SO_RCVBUFFORCE
            | libc::SO_DEBUG => true,
            // Unprivileged callers may use priorities 0 to 6.
            libc::SO_PRIORITY => value
                .get(..4)
                .and_then(|v| v.try_into().ok())
                .is_none_or(|v| !(0..=6).contains(&i32::from_ne_bytes(v))),
            _ => false,
        },
        libc::IPPROTO_IP => matches!(name, libc::IP_TRANSPARENT),
        libc::IPPROTO_IPV6 => matches!(name, libc::IPV6_TRANSPARENT),
        _ => false,
    }
}

/// setsockopt(2): the common socket, TCP and IP options go through to the host socket.
pub fn setsockopt(p: &mut Process, a: &Args) -> SysResult {
    let file = socket(p, a.fd(0))?;
    let (level, name, len) = (a.i32(1), a.i32(2), a.usize(4));
    if len > 256 {
        return Err(Errno::INVAL.into());
    }
    if level == libc::SOL_NETLINK && matches!(file.kind, FileKind::Netlink) {
        // Groups, strict checking, extended acks: accepted; nothing ever changes.
        return Ok(0);
    }
    if !allowed_level(level) {
        return Err(Errno::NOPROTOOPT.into());
    }
    let mut value = vec![0u8; len];
    p.mem.read(a.ptr(3), &mut value)?;
    if forbidden_option(level, name, &value) {
        return Err(Errno::PERM.into());
    }
    hostcall::setsockopt(file.host(), level, name, &value)?;
    let mut state = file.state();
    state.options.retain(|(l, n, _)| (*l, *n) != (level, name));
    state.options.push((level, name, value));
    Ok(0)
}

/// getsockopt(2).
pub fn getsockopt(p: &mut Process, a: &Args) -> SysResult {
    let file = socket(p, a.fd(0))?;
    let (level, name) = (a.i32(1), a.i32(2));
    if !allowed_level(level) {
        return Err(Errno::NOPROTOOPT.into());
    }
    let room: u32 = p.mem.read_pod(a.ptr(4))?;
    let value = hostcall::getsockopt(file.host(), level, name, (room as usize).min(256))?;
    p.mem.write(a.ptr(3), &value)?;
    p.mem.write_pod(a.ptr(4), &(value.len() as u32))?;
    Ok(0)
}

/// shutdown(2).
pub fn shutdown(p: &mut Process, a: &Args) -> SysResult {
    let file = socket(p, a.fd(0))?;
    let how = match a.i32(1) {
        libc::SHUT_RD => rustix::net::Shutdown::Read,
        libc::SHUT_WR => rustix::net::Shutdown::Write,
        libc::SHUT_RDWR => rustix::net::Shutdown::Both,
        _ => return Err(Errno::INVAL.into()),
    };
    rustix::net::shutdown(file.host(), how)?;
    Ok(0)
}

/// Sends the app buffers `bufs` on `fd`, to `dest` if given. EPIPE also raises SIGPIPE
/// unless the app passed MSG_NOSIGNAL.
fn send_common(
    p: &mut Process,
    fd: i32,
    bufs: &[(UserAddr, usize)],
    dest: Option<Address>,
    control: &[u8],
    flags: i32,
) -> SysResult {
    let file = p.files.file(fd)?;
    let name = match &dest {
        None => Vec::new(),
        Some(Address::Ip(addr)) => {
            // An answer to a peer the socket heard from is always allowed.
            let answering = file.state().heard_from.contains(addr);
            let addr = if answering {
                *addr
            } else {
                destination(p, *addr)?
            };
            bind_source(p, &file, addr)?;
            encode_ip(addr)
        }
        Some(address) => unix_target(p, address, false)?.raw,
    };
    let host_flags = (flags & !MSG_DONTWAIT) | MSG_NOSIGNAL | MSG_DONTWAIT;
    let dont_wait = flags & MSG_DONTWAIT != 0;
    let sent = if dont_wait {
        p.mem
            .sendmsg_to_host(file.host(), bufs, &name, control, host_flags)
            .map_err(SysError::from)
    } else {
        retry(p, &file, PollFlags::OUT, |p| {
            p.mem
                .sendmsg_to_host(file.host(), bufs, &name, control, host_flags)
        })
    };
    match sent {
        Err(SysError::Errno(Errno::PIPE)) if flags & MSG_NOSIGNAL == 0 => {
            p.signals.raise(libc::SIGPIPE);
            Err(Errno::PIPE.into())
        }
        other => Ok(other? as u64),
    }
}

/// What one receive got: the count, the sender, the message flags and the fds passed.
type Received = (usize, Vec<u8>, i32, Vec<OwnedFd>);

/// Receives into the app buffers `bufs` from `fd` (and, with `rights`, the fds an
/// SCM_RIGHTS message passes).
fn recv_common(
    p: &mut Process,
    fd: i32,
    bufs: &[(UserAddr, usize)],
    rights: bool,
    flags: i32,
) -> Result<Received, SysError> {
    let file = p.files.file(fd)?;
    let rights =
        rights && matches!(file.kind, FileKind::Socket { domain, .. } if domain == libc::AF_UNIX);
    let host_flags = (flags & (libc::MSG_PEEK | libc::MSG_TRUNC | libc::MSG_WAITALL))
        | MSG_DONTWAIT
        | if rights { libc::MSG_CMSG_CLOEXEC } else { 0 };
    let private = local_only(&file)
        && matches!(file.kind, FileKind::Socket { kind, .. } if kind == libc::SOCK_DGRAM);
    let receive = |p: &mut Process| loop {
        let mut control = vec![
            0u8;
            if rights {
                super::rights::CONTROL_SPACE
            } else {
                0
            }
        ];
        let (count, name, got_flags, control_len) =
            p.mem
                .recvmsg_from_host(file.host(), bufs, &mut control, host_flags)?;
        let got = (
            count,
            name,
            got_flags,
            super::rights::take(&control[..control_len]),
        );
        // A localhost datagram socket hears only the app; others' datagrams are dropped
        // (a peek must take them off first, so it looks again without peeking).
        if !private || from_the_app(p, &got.1) {
            return Ok(got);
        }
        if host_flags & libc::MSG_PEEK != 0 {
            let mut scratch = [0u8; 1];
            let _ = rustix::net::recv(file.host(), &mut scratch, rustix::net::RecvFlags::DONTWAIT);
        }
    };
    let received = if flags & MSG_DONTWAIT != 0 {
        receive(p)?
    } else {
        retry(p, &file, PollFlags::IN, receive)?
    };
    if matches!(file.kind, FileKind::Netlink) {
        // From the kernel, as the app believes.
        return Ok((received.0, netlink::sockaddr(0), received.2, received.3));
    }
    if let Ok(Address::Ip(peer)) = decode_address(&received.1) {
        remember_peer(&mut file.state().heard_from, peer);
    }
    Ok(received)
}

/// How many peers a datagram socket remembers it heard from.
const PEERS_REMEMBERED: usize = 64;

/// Notes that a datagram came from `peer` (the newest last; the oldest forgotten).
fn remember_peer(heard_from: &mut std::collections::VecDeque<SocketAddr>, peer: SocketAddr) {
    heard_from.retain(|p| *p != peer);
    if heard_from.len() == PEERS_REMEMBERED {
        heard_from.pop_front();
    }
    heard_from.push_back(peer);
}

/// sendto(2).
pub fn sendto(p: &mut Process, a: &Args) -> SysResult {
    let file = p.files.file(a.fd(0))?;
    if matches!(file.kind, FileKind::Netlink) {
        return netlink::request(p, &file, &[(a.ptr(1), a.usize(2))]);
    }
    let dest = if a.ptr(4).is_null() {
        None
    } else {
        Some(read_address(p, a.ptr(4), a.u32(5))?)
    };
    send_common(p, a.fd(0), &[(a.ptr(1), a.usize(2))], dest, &[], a.i32(3))
}

/// recvfrom(2).
pub fn recvfrom(p: &mut Process, a: &Args) -> SysResult {
    let (count, name, _, _) = recv_common(p, a.fd(0), &[(a.ptr(1), a.usize(2))], false, a.i32(3))?;
    if !name.is_empty() {
        write_address(p, a.ptr(4), a.ptr(5), &name)?;
    } else if !a.ptr(5).is_null() {
        p.mem.write_pod(a.ptr(5), &0u32)?;
    }
    Ok(count as u64)
}

/// A `struct msghdr` as the app laid it out.
struct MsgHdr {
    name: UserAddr,
    name_len: u32,
    bufs: Vec<(UserAddr, usize)>,
    control: UserAddr,
    control_len: u64,
}

fn read_msghdr(p: &mut Process, addr: UserAddr) -> Result<MsgHdr, Errno> {
    let raw: [u64; 7] = p.mem.read_pod(addr)?;
    let iov_count = raw[3] as usize;
    if iov_count > 1024 {
        return Err(Errno::MSGSIZE);
    }
    let iovecs: Vec<[u64; 2]> = p.mem.read_pod_array(UserAddr(raw[2]), iov_count)?;
    Ok(MsgHdr {
        name: UserAddr(raw[0]),
        name_len: raw[1] as u32,
        bufs: iovecs
            .into_iter()
            .map(|[base, len]| (UserAddr(base), len as usize))
            .collect(),
        control: UserAddr(raw[4]),
        control_len: raw[5],
    })
}

/// sendmsg(2). Ancillary data: SCM_RIGHTS of sockets and pipes over AF_UNIX sockets
/// (see [`super::rights`]); anything else gives EINVAL.
pub fn sendmsg(p: &mut Process, a: &Args) -> SysResult {
    let msg = read_msghdr(p, a.ptr(1))?;
    let file = p.files.file(a.fd(0))?;
    let passed = if msg.control_len != 0 {
        if !matches!(file.kind, FileKind::Socket { domain, .. } if domain == libc::AF_UNIX) {
            return Err(Errno::INVAL.into());
        }
        super::rights::passed(p, msg.control, msg.control_len)?
    } else {
        Vec::new()
    };
    let raw: Vec<i32> = passed
        .iter()
        .map(|f| std::os::fd::AsRawFd::as_raw_fd(&f.host()))
        .collect();
    let control = if raw.is_empty() {
        Vec::new()
    } else {
        super::rights::message(&raw)
    };
    if matches!(file.kind, FileKind::Netlink) {
        return netlink::request(p, &file, &msg.bufs);
    }
    let dest = if msg.name.is_null() || msg.name_len == 0 {
        None
    } else {
        Some(read_address(p, msg.name, msg.name_len)?)
    };
    // `passed` keeps the host fds open until the kernel has taken its references.
    let sent = send_common(p, a.fd(0), &msg.bufs, dest, &control, a.i32(2));
    drop(passed);
    sent
}

/// recvmsg(2). The only ancillary data returned is SCM_RIGHTS of sockets and pipes (see
/// [`super::rights`]).
pub fn recvmsg(p: &mut Process, a: &Args) -> SysResult {
    let msg = read_msghdr(p, a.ptr(1))?;
    let want_rights = msg.control_len > 0 && !msg.control.is_null();
    let (count, name, mut flags, fds) = recv_common(p, a.fd(0), &msg.bufs, want_rights, a.i32(2))?;
    let capacity = usize::try_from(msg.control_len).unwrap_or(usize::MAX);
    let cloexec = a.i32(2) & libc::MSG_CMSG_CLOEXEC != 0;
    let (control, dropped) = super::rights::install(p, fds, capacity, cloexec);
    if dropped {
        flags |= libc::MSG_CTRUNC;
    }
    if !control.is_empty() {
        p.mem.write(msg.control, &control)?;
    }
    let base = a.ptr(1);
    if !msg.name.is_null() {
        let n = name.len().min(msg.name_len as usize);
        p.mem.write(msg.name, &name[..n])?;
        p.mem
            .write_pod(base.offset(8).ok_or(Errno::FAULT)?, &(name.len() as u32))?;
    }
    p.mem.write_pod(
        base.offset(40).ok_or(Errno::FAULT)?,
        &(control.len() as u64),
    )?; // msg_controllen
    p.mem
        .write_pod(base.offset(48).ok_or(Errno::FAULT)?, &flags)?;
    Ok(count as u64)
}

/// Bytes of a `struct mmsghdr`: a msghdr, then msg_len (and padding).
const MMSGHDR_SIZE: u64 = 64;
/// Most messages one sendmmsg or recvmmsg handles (Linux's UIO_MAXIOV).
const MMSG_MAX: usize = 1024;

/// sendmmsg(2) and recvmmsg(2): sendmsg or recvmsg for each message in turn, each one's
/// length written to its msg_len. They stop at the first error, which is the call's only
/// when no message got through; after the first message a recvmmsg waits no more (as
/// with MSG_WAITFORONE; its timeout is not supported and must be NULL).
pub fn mmsg(p: &mut Process, a: &Args, send: bool) -> SysResult {
    if !send && !a.ptr(4).is_null() {
        return Err(Errno::INVAL.into());
    }
    let count = a.usize(2).min(MMSG_MAX);
    let mut flags = a.i32(3);
    let mut done = 0;
    for i in 0..count {
        let header = a
            .ptr(1)
            .offset(i as u64 * MMSGHDR_SIZE)
            .ok_or(Errno::FAULT)?;
        let one = Args([a.u64(0), header.0, flags as u64, 0, 0, 0]);
        let result = if send {
            sendmsg(p, &one)
        } else {
            recvmsg(p, &one)
        };
        match result {
            Ok(n) => {
                let len = header.offset(56).ok_or(Errno::FAULT)?;
                p.mem.write_pod(len, &(n as u32))?;
                done += 1;
                if !send {
                    flags |= MSG_DONTWAIT;
                }
            }
            Err(e) if done == 0 => return Err(e),
            Err(_) => break,
        }
    }
    Ok(done)
}

/// sendfile(2): host to host, with no copy through the VMM.
pub fn sendfile(p: &mut Process, a: &Args) -> SysResult {
    let out = p.files.file(a.fd(0))?;
    let input = p.files.file(a.fd(1))?;
    let count = a.usize(3).min(0x7fff_f000);
    let offset_ptr = a.ptr(2);
    let mut offset = if offset_ptr.is_null() {
        None
    } else {
        Some(p.mem.read_pod::<u64>(offset_ptr)?)
    };
    let sent = retry(p, &out, PollFlags::OUT, |_| {
        rustix::fs::sendfile(out.host(), input.host(), offset.as_mut(), count)
    });
    if let Some(offset) = offset {
        p.mem.write_pod(offset_ptr, &offset)?;
    }
    match sent {
        Err(SysError::Errno(Errno::PIPE)) => {
            p.signals.raise(libc::SIGPIPE);
            Err(Errno::PIPE.into())
        }
        other => Ok(other? as u64),
    }
}

/// The socket the app's caller handed down for a restore (a worker held it while the
/// app was swapped out), if one is of this family and type, bound to `address` and
/// listening exactly when `listening`: it keeps what queued on it.
fn adopt_inherited(
    p: &mut Process,
    domain: i32,
    kind: i32,
    address: SocketAddr,
    listening: bool,
) -> Option<OwnedFd> {
    use rustix::net::sockopt;
    let position = p.inherited_sockets.iter().position(|fd| {
        let fd = fd.as_fd();
        let bound = rustix::net::getsockname(fd)
            .ok()
            .and_then(|a| SocketAddr::try_from(a).ok());
        sockopt::socket_domain(fd).is_ok_and(|d| i32::from(d.as_raw()) == domain)
            && sockopt::socket_type(fd).is_ok_and(|t| t.as_raw() as i32 == kind)
            && sockopt::socket_acceptconn(fd).is_ok_and(|l| l == listening)
            && bound == Some(address)
    })?;
    let inherited = p.inherited_sockets.remove(position);
    let fd = rustix::io::fcntl_dupfd_cloexec(&*inherited, 0).ok()?;
    rustix::io::ioctl_fionbio(&fd, true).ok()?;
    tracing::debug!(%address, "restored a socket its caller held, with what queued on it");
    Some(fd)
}

/// Connects restored datagram socket `fd` to `name` again (an AF_UNIX name, as
/// `FileState::connected_to` keeps it), resolved in the app's sandbox as its connect was.
/// The restore runs as root, before the lockdown, and a connected socket keeps its peer:
/// a socket file the app's user could not write to (root's, not writable by others: the
/// app's own are its user's by now) is refused, as a snapshot's name is input.
pub fn reconnect_unix(p: &Process, fd: BorrowedFd<'_>, name: &[u8]) -> Result<(), Errno> {
    let target = unix_target(p, &decode_address(name)?, false)?;
    if let Some(socket_file) = &target.holder {
        let stat = rustix::fs::fstat(socket_file)?;
        if stat.st_uid == 0 && stat.st_mode & 0o002 == 0 {
            return Err(Errno::ACCESS);
        }
    }
    hostcall::connect(fd, &target.raw)
}

/// Makes a socket again from a snapshot: the same options, bound again (to the app's
/// address now, which may differ from when it was captured), listening again; or the
/// very socket the caller held meanwhile, if it handed that down.
pub fn restore_socket(
    p: &mut Process,
    domain: i32,
    kind: i32,
    bound: Option<&str>,
    unix_name: Option<&[u8]>,
    listening: Option<i32>,
    options: &[(i32, i32, Vec<u8>)],
) -> Result<OwnedFd, Errno> {
    // Only the families an app can make: a snapshot is input, and this socket is the VMM's.
    if ![libc::AF_INET, libc::AF_INET6, libc::AF_UNIX].contains(&domain) {
        return Err(Errno::AFNOSUPPORT);
    }
    let requested = bound.and_then(|b| b.parse::<SocketAddr>().ok());
    let v6only = domain == libc::AF_INET6 && v6only_among(options);
    if let Some(requested) = requested.filter(|r| r.port() != 0) {
        let address = p.net.bind_address(requested, v6only)?;
        if let Some(fd) = adopt_inherited(p, domain, kind, address, listening.is_some()) {
            return Ok(fd);
        }
    }
    let fd = rustix::net::socket_with(
        rustix::net::AddressFamily::from_raw(domain as u16),
        rustix::net::SocketType::from_raw(kind as u32),
        rustix::net::SocketFlags::NONBLOCK | rustix::net::SocketFlags::CLOEXEC,
        None,
    )?;
    for (level, name, value) in options {
        if allowed_level(*level) && !forbidden_option(*level, *name, value) {
            hostcall::setsockopt(fd.as_fd(), *level, *name, value)?;
        }
    }
    if let Some(requested) = requested {
        bind_ip(p, fd.as_fd(), requested, v6only)?;
    } else if let Some(name) = unix_name {
        let address = decode_address(name)?;
        let target = unix_target(p, &address, true)?;
        if let Address::UnixPath(path) = &address {
            // The old socket's file, if the data directory kept it.
            if let Ok(entry) = p.sandbox.entry(&p.absolute(path)) {
                let _ = entry.unlink(rustix::fs::AtFlags::empty());
            }
        }
        crate::sandbox::binder::bind(fd.as_fd(), &target.raw)?;
    }
    if let Some(backlog) = listening {
        rustix::net::listen(&fd, backlog)?;
    }
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::netpolicy::NetPolicy;

    fn policy(ip: &str) -> NetPolicy {
        NetPolicy {
            address: ip.parse().unwrap(),
            allow_outbound: false,
            name: "t".into(),
        }
    }

    #[test]
    fn any_address_becomes_the_apps_own() {
        let net = policy("127.0.0.7");
        let any: SocketAddr = "0.0.0.0:80".parse().unwrap();
        assert_eq!(
            net.bind_address(any, false).unwrap(),
            "127.0.0.7:80".parse().unwrap()
        );
        let any6: SocketAddr = "[::]:80".parse().unwrap();
        assert_eq!(
            net.bind_address(any6, false).unwrap(),
            "[::ffff:127.0.0.7]:80".parse().unwrap()
        );
        // An IPv6-only socket gets the app's IPv6 address, made from its IPv4 one.
        let own6 = net.bind_address(any6, true).unwrap();
        assert_eq!(own6, "[fd00:7069:636f::7f00:7]:80".parse().unwrap());
        assert!(net.is_own(own6.ip()) && net.is_own_v6(own6.ip()));
        assert_eq!(net.bind_address(own6, true), Ok(own6));
    }

    #[test]
    fn other_addresses_are_refused() {
        let net = policy("127.0.0.7");
        for other in [
            "127.0.0.8:80",
            "127.0.0.2:80",
            "[::2]:80",
            "[fd00:7069:636f::7f00:8]:80",
        ] {
            assert_eq!(
                net.bind_address(other.parse().unwrap(), false),
                Err(Errno::ADDRNOTAVAIL),
                "{other}"
            );
        }
        assert!(!net.may_reach("127.0.0.8".parse().unwrap()));
        assert!(net.may_reach("127.0.0.7".parse().unwrap()));
    }

    #[test]
    fn localhost_is_the_apps_own_address() {
        let net = policy("127.0.0.7");
        let cases = [
            ("127.0.0.1:80", "127.0.0.7:80"),
            ("[::ffff:127.0.0.1]:80", "[::ffff:127.0.0.7]:80"),
            ("[::1]:80", "[fd00:7069:636f::7f00:7]:80"),
        ];
        for (loopback, own) in cases {
            let loopback: SocketAddr = loopback.parse().unwrap();
            assert_eq!(net.bind_address(loopback, false), Ok(own.parse().unwrap()));
            assert!(net.may_reach(loopback.ip()));
        }
    }

    #[test]
    fn a_datagram_socket_remembers_a_bounded_set_of_peers() {
        let mut heard = std::collections::VecDeque::new();
        for port in 0..100u16 {
            remember_peer(&mut heard, SocketAddr::from(([127, 0, 0, 1], port)));
        }
        remember_peer(&mut heard, SocketAddr::from(([127, 0, 0, 1], 50)));
        assert_eq!(heard.len(), PEERS_REMEMBERED);
        assert_eq!(heard.back(), Some(&SocketAddr::from(([127, 0, 0, 1], 50))));
        assert!(!heard.contains(&SocketAddr::from(([127, 0, 0, 1], 0))));
    }

    #[test]
    fn privileged_socket_options_are_refused() {
        let int = |v: i32| v.to_ne_bytes().to_vec();
        for name in [libc::SO_SNDBUFFORCE, libc::SO_RCVBUFFORCE, libc::SO_MARK] {
            assert!(forbidden_option(libc::SOL_SOCKET, name, &int(1 << 30)));
        }
        assert!(forbidden_option(
            libc::SOL_SOCKET,
            libc::SO_PRIORITY,
            &int(7)
        ));
        assert!(!forbidden_option(
            libc::SOL_SOCKET,
            libc::SO_PRIORITY,
            &int(6)
        ));
        assert!(!forbidden_option(
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            &int(1 << 30)
        ));
        assert!(forbidden_option(
            libc::IPPROTO_IP,
            libc::IP_TRANSPARENT,
            &int(1)
        ));
        assert!(!forbidden_option(
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            &int(1)
        ));
    }

    #[test]
    fn addresses_round_trip_through_bytes() {
        for text in ["127.0.0.9:8080", "[::1]:443"] {
            let addr: SocketAddr = text.parse().unwrap();
            assert_eq!(decode_address(&encode_ip(addr)).unwrap(), Address::Ip(addr));
        }
        assert_eq!(
            decode_address(&encode_unix(b"/run/x.sock", false)).unwrap(),
            Address::UnixPath("/run/x.sock".into())
        );
        assert_eq!(
            decode_address(&encode_unix(b"name", true)).unwrap(),
            Address::UnixAbstract(b"name".to_vec())
        );
        assert_eq!(decode_address(&[0xff, 0xff, 0, 0]), Err(Errno::AFNOSUPPORT));
        assert_eq!(decode_address(&[]), Err(Errno::INVAL));
        assert_eq!(decode_address(&[2]), Err(Errno::INVAL));
    }
}
