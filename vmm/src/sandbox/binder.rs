//! Binding privileged ports for a jailed VMM, which has no capabilities: its supervisor
//! (outside the jail, as root) binds the socket for it, but only to the app's own address.
//!
//! The channel is one end of a Unix socketpair each. A request is the socket (as
//! SCM_RIGHTS) and the raw `sockaddr` to bind it to; the answer is an errno as an `i32`
//! (0 for success). The supervisor decodes the address itself and refuses any address but
//! the app's, so a compromised VMM gains nothing it could not bind anyway.

use rustix::io::Errno;
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use std::io::{IoSlice, IoSliceMut};
use std::net::IpAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Mutex;

/// Largest sockaddr a request carries (sockaddr_in6 is 28 bytes).
const ADDRESS_MAX: usize = 32;

/// The VMM's end, while installed.
static CHANNEL: Mutex<Option<OwnedFd>> = Mutex::new(None);

fn channel() -> std::sync::MutexGuard<'static, Option<OwnedFd>> {
    CHANNEL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Makes `channel` the way this (jailed) process binds what it may not bind itself.
pub fn install(channel_end: OwnedFd) {
    *channel() = Some(channel_end);
}

/// Whether a binder is installed.
pub fn installed() -> bool {
    channel().is_some()
}

/// Closes this process's end: the supervisor sees the VMM is done.
pub fn close() {
    channel().take();
}

/// bind(2) with a raw address, for the app. A jailed VMM has no capabilities: a
/// privileged port it may not bind itself is bound by its supervisor.
pub fn bind(fd: BorrowedFd<'_>, address: &[u8]) -> Result<(), Errno> {
    match crate::hostcall::bind(fd, address) {
        Err(Errno::ACCESS) if installed() => ask_supervisor(fd, address),
        other => other,
    }
}

/// Asks the supervisor to bind `socket` to the raw sockaddr `address`.
fn ask_supervisor(socket: BorrowedFd<'_>, address: &[u8]) -> Result<(), Errno> {
    if address.len() > ADDRESS_MAX {
        return Err(Errno::INVAL);
    }
    let guard = channel();
    let Some(channel) = guard.as_ref() else {
        return Err(Errno::ACCESS);
    };
    let fds = [socket];
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    control.push(SendAncillaryMessage::ScmRights(&fds));
    rustix::net::sendmsg(
        channel,
        &[IoSlice::new(address)],
        &mut control,
        SendFlags::empty(),
    )?;
    let mut answer = [0u8; 4];
    let got = rustix::io::read(channel, &mut answer)?;
    if got != answer.len() {
        return Err(Errno::IO);
    }
    match i32::from_ne_bytes(answer) {
        0 => Ok(()),
        errno => Err(Errno::from_raw_os_error(errno)),
    }
}

/// The IP address a raw IPv4 or IPv6 sockaddr names (a v4-mapped v6 address as v4).
fn ip_of(address: &[u8]) -> Option<IpAddr> {
    let family = u16::from_ne_bytes(address.get(..2)?.try_into().ok()?);
    match i32::from(family) {
        libc::AF_INET if address.len() >= 8 => {
            let octets: [u8; 4] = address[4..8].try_into().ok()?;
            Some(IpAddr::from(octets))
        }
        libc::AF_INET6 if address.len() >= 24 => {
            let octets: [u8; 16] = address[8..24].try_into().ok()?;
            let v6 = std::net::Ipv6Addr::from(octets);
            Some(v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4))
        }
        _ => None,
    }
}

/// Whether `address` may be bound for an app whose address is `own`.
fn allowed(address: &[u8], own: IpAddr) -> bool {
    let own = match own {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(own, IpAddr::V4),
        v4 => v4,
    };
    ip_of(address) == Some(own)
}

/// Serves one request on `channel` (the supervisor's end) for an app whose address is
/// `own`. Returns false when the VMM has closed its end.
pub fn serve_one(channel: BorrowedFd<'_>, own: IpAddr) -> bool {
    let mut address = [0u8; ADDRESS_MAX];
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let received = rustix::net::recvmsg(
        channel,
        &mut [IoSliceMut::new(&mut address)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    );
    let Ok(received) = received else {
        return false;
    };
    if received.bytes == 0 {
        return false;
    }
    let mut socket: Option<OwnedFd> = None;
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(fds) = message {
            for fd in fds {
                socket.get_or_insert(fd);
            }
        }
    }
    let address = &address[..received.bytes];
    let result = match socket {
        None => Errno::BADF.raw_os_error(),
        Some(_) if !allowed(address, own) => {
            tracing::warn!("binder: refused a bind outside the app's address {own}");
            Errno::ADDRNOTAVAIL.raw_os_error()
        }
        Some(socket) => match crate::hostcall::bind(socket.as_fd(), address) {
            Ok(()) => 0,
            Err(e) => e.raw_os_error(),
        },
    };
    rustix::io::write(channel, &result.to_ne_bytes()).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(ip: [u8; 4], port: u16) -> Vec<u8> {
        let mut raw = (libc::AF_INET as u16).to_ne_bytes().to_vec();
        raw.extend_from_slice(&port.to_be_bytes());
        raw.extend_from_slice(&ip);
        raw.extend_from_slice(&[0; 8]);
        raw
    }

    #[test]
    fn only_the_apps_own_address_is_allowed() {
        let own: IpAddr = "127.100.0.9".parse().unwrap();
        assert!(allowed(&v4([127, 100, 0, 9], 80), own));
        assert!(!allowed(&v4([127, 0, 0, 1], 80), own));
        assert!(!allowed(&v4([0, 0, 0, 0], 80), own));
        assert!(!allowed(&[0xff, 0xff, 0, 80], own));
        assert!(!allowed(&[], own));
    }

    #[test]
    fn the_supervisor_binds_for_the_vmm() {
        let (vmm, supervisor) = rustix::net::socketpair(
            rustix::net::AddressFamily::UNIX,
            rustix::net::SocketType::STREAM,
            rustix::net::SocketFlags::CLOEXEC,
            None,
        )
        .unwrap();
        let own: IpAddr = "127.100.7.7".parse().unwrap();
        let server = std::thread::spawn(move || while serve_one(supervisor.as_fd(), own) {});
        install(vmm);
        let socket = rustix::net::socket(
            rustix::net::AddressFamily::INET,
            rustix::net::SocketType::STREAM,
            None,
        )
        .unwrap();
        assert_eq!(
            ask_supervisor(socket.as_fd(), &v4([127, 0, 0, 1], 0)),
            Err(Errno::ADDRNOTAVAIL)
        );
        ask_supervisor(socket.as_fd(), &v4([127, 100, 7, 7], 0)).unwrap();
        let bound = rustix::net::getsockname(&socket).unwrap();
        assert!(format!("{bound:?}").contains("127.100.7.7"), "{bound:?}");
        drop(server);
    }
}
