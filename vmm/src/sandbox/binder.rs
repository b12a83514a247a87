//! Binding privileged ports for a jailed VMM, which has no capabilities: its supervisor
//! (outside the jail, as root) binds the socket for it, but only to the app's own address.
//!
//! The channel is one end of a Unix socketpair each. A request is the socket (as
//! SCM_RIGHTS) and the raw `sockaddr` to bind it to; the answer is an errno as an `i32`
//! (0 for success). The supervisor decodes the address itself and refuses any address but
//! the app's, so a compromised VMM gains nothing it could not bind anyway.
//!
//! The supervisor is a forked child of the VMM when the VMM runs on its own, and the
//! worker when a worker started it (one process fewer per app). To a worker, the VMM first
//! hands over what to remove once it is done ([`hand_over`]: paths, and the locks of its
//! leases, which the worker holds until it has removed them, as a forked supervisor holds
//! its copies); the worker takes that only as the first message, sent before any of the
//! app's code has run. The VMM ends by shutting its end for writing and waiting for the
//! worker to close the other ([`finish`]), so whoever waits for the VMM finds its files
//! gone.

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

fn installed_channel() -> std::sync::MutexGuard<'static, Option<OwnedFd>> {
    CHANNEL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A new channel between a VMM and its supervisor: a pair of connected Unix stream
/// sockets, close-on-exec.
pub fn channel() -> Result<(OwnedFd, OwnedFd), Errno> {
    rustix::net::socketpair(
        rustix::net::AddressFamily::UNIX,
        rustix::net::SocketType::STREAM,
        rustix::net::SocketFlags::CLOEXEC,
        None,
    )
}

/// Makes `channel` the way this (jailed) process binds what it may not bind itself.
pub fn install(channel_end: OwnedFd) {
    *installed_channel() = Some(channel_end);
}

/// Whether a binder is installed.
pub fn installed() -> bool {
    installed_channel().is_some()
}

/// Closes this process's end: the supervisor sees the VMM is done.
pub fn close() {
    installed_channel().take();
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
pub fn ask_supervisor(socket: BorrowedFd<'_>, address: &[u8]) -> Result<(), Errno> {
    if address.len() > ADDRESS_MAX {
        return Err(Errno::INVAL);
    }
    let guard = installed_channel();
    let Some(channel) = guard.as_ref() else {
        return Err(Errno::ACCESS);
    };
    let fds = [socket];
    // A kick (a signal for the app, a control connection) interrupts these calls of the
    // vCPU thread; the request is then made, or waited for, again.
    loop {
        let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        control.push(SendAncillaryMessage::ScmRights(&fds));
        match rustix::net::sendmsg(
            channel,
            &[IoSlice::new(address)],
            &mut control,
            SendFlags::empty(),
        ) {
            Err(Errno::INTR) => continue,
            sent => {
                sent?;
                break;
            }
        }
    }
    let mut answer = [0u8; 4];
    let got = loop {
        match rustix::io::read(channel, &mut answer) {
            Err(Errno::INTR) => continue,
            got => break got?,
        }
    };
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

/// The first word of the hand-over message (a bind request is a sockaddr, whose family
/// never spells this).
const HAND_OVER: &[u8] = b"picocenter-leftovers\0";

/// Largest hand-over message: a few paths.
const MESSAGE_MAX: usize = 16 << 10;

/// Most lock fds a hand-over carries.
const HELD_MAX: usize = 4;

/// What a VMM leaves for its supervisor to remove when it is done, and the locks that keep
/// its name and uid taken until then.
#[derive(Debug, Default)]
pub struct Leftovers {
    /// Directories and files to remove.
    pub paths: Vec<std::path::PathBuf>,
    /// Lease locks (flocked files), held until the paths are gone.
    pub held: Vec<OwnedFd>,
}

/// Sends the worker `leftovers` and `held`, before any of the app's code runs.
pub fn hand_over(
    channel: BorrowedFd<'_>,
    leftovers: &[std::path::PathBuf],
    held: &[BorrowedFd<'_>],
) -> Result<(), Errno> {
    use std::os::unix::ffi::OsStrExt;
    let mut message = HAND_OVER.to_vec();
    for path in leftovers {
        message.extend_from_slice(path.as_os_str().as_bytes());
        message.push(0);
    }
    if message.len() > MESSAGE_MAX || held.len() > HELD_MAX {
        return Err(Errno::TOOBIG);
    }
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(HELD_MAX))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !held.is_empty() && !control.push(SendAncillaryMessage::ScmRights(held)) {
        return Err(Errno::NOBUFS);
    }
    let sent = rustix::net::sendmsg(
        channel,
        &[IoSlice::new(&message)],
        &mut control,
        SendFlags::empty(),
    )?;
    if sent != message.len() {
        return Err(Errno::IO);
    }
    Ok(())
}

/// Ends the VMM's side of a worker's channel: shuts it for writing, then waits (at most
/// `limit`) for the worker to close its end once it has removed the leftovers.
pub fn finish(limit: std::time::Duration) {
    let Some(channel) = installed_channel().take() else {
        return;
    };
    let _ = rustix::net::shutdown(&channel, rustix::net::Shutdown::Write);
    let deadline = std::time::Instant::now() + limit;
    let mut byte = [0u8; 64];
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let Ok(left) = rustix::time::Timespec::try_from(left) else {
            return;
        };
        let mut fds = [rustix::event::PollFd::new(
            &channel,
            rustix::event::PollFlags::IN,
        )];
        match rustix::event::poll(&mut fds, Some(&left)) {
            Ok(0) => return,
            Ok(_) | Err(Errno::INTR) => {}
            Err(_) => return,
        }
        match rustix::io::read(&channel, &mut byte) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// What one message on the supervisor's end was.
#[derive(Debug)]
pub enum Served {
    /// A bind request, answered.
    Answered,
    /// The hand-over (answered by nothing); a second one is refused as a misbehaving VMM.
    HandedOver(Leftovers),
    /// The VMM has closed its end, or broke the protocol: the channel is done.
    Closed,
    /// Nothing to read yet (a non-blocking channel).
    NotReady,
}

/// Serves one message on `channel` (the supervisor's end) for an app whose address is
/// `own`; a hand-over is taken only if `hand_over_expected` (the first message). Never
/// blocks on a non-blocking channel: a VMM that does not read its answers is closed.
pub fn serve_message(channel: BorrowedFd<'_>, own: IpAddr, hand_over_expected: bool) -> Served {
    let mut message = vec![0u8; MESSAGE_MAX];
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(HELD_MAX))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let received = match rustix::net::recvmsg(
        channel,
        &mut [IoSliceMut::new(&mut message)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    ) {
        Ok(received) => received,
        Err(Errno::AGAIN | Errno::INTR) => return Served::NotReady,
        Err(_) => return Served::Closed,
    };
    if received.bytes == 0 || received.flags.contains(rustix::net::ReturnFlags::TRUNC) {
        return Served::Closed;
    }
    let mut fds: Vec<OwnedFd> = Vec::new();
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = message {
            fds.extend(received);
        }
    }
    let message = &message[..received.bytes];
    if let Some(paths) = message.strip_prefix(HAND_OVER) {
        if !hand_over_expected {
            tracing::warn!("binder: a second hand-over from the VMM of {own}: closed");
            return Served::Closed;
        }
        return Served::HandedOver(Leftovers {
            paths: leftover_paths(paths),
            held: fds,
        });
    }
    let result = match fds.into_iter().next() {
        None => Errno::BADF.raw_os_error(),
        Some(_) if message.len() > ADDRESS_MAX || !allowed(message, own) => {
            tracing::warn!("binder: refused a bind outside the app's address {own}");
            Errno::ADDRNOTAVAIL.raw_os_error()
        }
        Some(socket) => match crate::hostcall::bind(socket.as_fd(), message) {
            Ok(()) => 0,
            Err(e) => e.raw_os_error(),
        },
    };
    match rustix::net::send(channel, &result.to_ne_bytes(), SendFlags::DONTWAIT) {
        Ok(4) => Served::Answered,
        _ => Served::Closed,
    }
}

/// The paths of a hand-over: absolute, NUL-separated, none with a `..`.
fn leftover_paths(bytes: &[u8]) -> Vec<std::path::PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    bytes
        .split(|&b| b == 0)
        .filter(|p| !p.is_empty())
        .map(|p| std::path::PathBuf::from(std::ffi::OsStr::from_bytes(p)))
        .filter(|p| {
            p.is_absolute()
                && p.components()
                    .all(|c| !matches!(c, std::path::Component::ParentDir))
        })
        .collect()
}

/// Serves one request on `channel` (a forked supervisor's blocking end) for an app whose
/// address is `own`. Returns false when the VMM has closed its end.
pub fn serve_one(channel: BorrowedFd<'_>, own: IpAddr) -> bool {
    matches!(
        serve_message(channel, own, false),
        Served::Answered | Served::NotReady
    )
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
    fn a_hand_over_is_taken_only_first_and_its_paths_only_absolute() {
        let (vmm, supervisor) = channel().unwrap();
        // As the worker serves it.
        rustix::io::ioctl_fionbio(&supervisor, true).unwrap();
        let own: IpAddr = "127.100.7.8".parse().unwrap();
        let lock = tempfile::tempfile().unwrap();
        let paths = [
            std::path::PathBuf::from("/state/run/jail-7"),
            std::path::PathBuf::from("relative"),
            std::path::PathBuf::from("/state/../etc"),
        ];
        hand_over(vmm.as_fd(), &paths, &[lock.as_fd()]).unwrap();
        match serve_message(supervisor.as_fd(), own, true) {
            Served::HandedOver(leftovers) => {
                assert_eq!(
                    leftovers.paths,
                    [std::path::PathBuf::from("/state/run/jail-7")]
                );
                assert_eq!(leftovers.held.len(), 1);
            }
            other => panic!("{other:?}"),
        }
        hand_over(vmm.as_fd(), &paths, &[]).unwrap();
        assert!(matches!(
            serve_message(supervisor.as_fd(), own, false),
            Served::Closed
        ));
        assert!(matches!(
            serve_message(supervisor.as_fd(), own, false),
            Served::NotReady
        ));
    }

    #[test]
    fn the_supervisor_binds_for_the_vmm() {
        let (vmm, supervisor) = channel().unwrap();
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
