//! The few rtnetlink requests the host side makes (`NETLINK_ROUTE`), each one message
//! answered by an acknowledgement: a local route for the apps' IPv6 prefix
//! ([`super::loopback6`]), and a worker's app addresses on a network interface. Each
//! needs CAP_NET_ADMIN.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {step}")]
pub struct NetlinkError {
    /// The request.
    what: String,
    /// The step that failed.
    step: &'static str,
    /// Why.
    #[source]
    source: std::io::Error,
}

impl NetlinkError {
    /// The errno the kernel answered, if it answered one.
    pub fn errno(&self) -> Option<i32> {
        self.source.raw_os_error()
    }
}

/// Appends one rtnetlink attribute (type, payload), padded to 4 bytes.
pub(crate) fn attribute(message: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let len = 4 + payload.len();
    message.extend_from_slice(&(len as u16).to_ne_bytes());
    message.extend_from_slice(&kind.to_ne_bytes());
    message.extend_from_slice(payload);
    message.resize(message.len().next_multiple_of(4), 0);
}

/// A `struct nlmsghdr` of type `kind` with `flags` (acknowledged), its length to be set
/// by [`finish`].
pub(crate) fn header(kind: u16, flags: i32) -> Vec<u8> {
    let mut message = Vec::with_capacity(64);
    message.extend_from_slice(&0u32.to_ne_bytes());
    message.extend_from_slice(&kind.to_ne_bytes());
    let flags = libc::NLM_F_REQUEST | libc::NLM_F_ACK | flags;
    message.extend_from_slice(&(flags as u16).to_ne_bytes());
    message.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    message.extend_from_slice(&0u32.to_ne_bytes()); // port: the kernel's
    message
}

/// Sets the message's length in its header.
pub(crate) fn finish(message: &mut [u8]) {
    let len = message.len() as u32;
    message[..4].copy_from_slice(&len.to_ne_bytes());
}

/// Sends `message` and waits for its acknowledgement.
pub(crate) fn send(what: &str, message: &[u8]) -> Result<(), NetlinkError> {
    let fail = |step| {
        move |source| NetlinkError {
            what: what.to_string(),
            step,
            source,
        }
    };
    // SAFETY: plain socket creation; the fd is owned at once.
    let raw = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if raw < 0 {
        return Err(fail("opening a netlink socket")(
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: `raw` is a new fd that nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: the buffer is valid for its length; a NULL address sends to the kernel.
    let sent = unsafe {
        libc::send(
            socket.as_raw_fd(),
            message.as_ptr().cast(),
            message.len(),
            0,
        )
    };
    if sent < 0 {
        return Err(fail("sending the request")(std::io::Error::last_os_error()));
    }
    let mut answer = [0u8; 1024];
    // SAFETY: the buffer is valid and writable for its length.
    let got = unsafe {
        libc::recv(
            socket.as_raw_fd(),
            answer.as_mut_ptr().cast(),
            answer.len(),
            0,
        )
    };
    if got < 0 {
        return Err(fail("reading the answer")(std::io::Error::last_os_error()));
    }
    // An acknowledgement is NLMSG_ERROR (after the 16-byte header) with error 0.
    let answer = &answer[..got as usize];
    let kind = answer.get(4..6).map(|b| u16::from_ne_bytes([b[0], b[1]]));
    let error = answer
        .get(16..20)
        .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
    match (kind, error) {
        (Some(k), Some(0)) if k == libc::NLMSG_ERROR as u16 => Ok(()),
        (Some(k), Some(e)) if k == libc::NLMSG_ERROR as u16 => Err(fail("the kernel refused it")(
            std::io::Error::from_raw_os_error(e.saturating_neg()),
        )),
        _ => Err(fail("reading the answer")(std::io::Error::other(
            "not an acknowledgement",
        ))),
    }
}

/// The RTM_NEWADDR or RTM_DELADDR request for `address`/32 on interface `index`.
fn address_request(kind: u16, index: u32, address: Ipv4Addr) -> Vec<u8> {
    let flags = if kind == libc::RTM_NEWADDR {
        libc::NLM_F_CREATE | libc::NLM_F_EXCL
    } else {
        0
    };
    let mut message = header(kind, flags);
    // struct ifaddrmsg: family, prefix length, flags, scope, interface index.
    message.extend_from_slice(&[libc::AF_INET as u8, 32, 0, libc::RT_SCOPE_UNIVERSE]);
    message.extend_from_slice(&index.to_ne_bytes());
    attribute(&mut message, libc::IFA_LOCAL, &address.octets());
    attribute(&mut message, libc::IFA_ADDRESS, &address.octets());
    finish(&mut message);
    message
}

/// The index of interface `name`.
pub fn interface_index(name: &str) -> Result<u32, NetlinkError> {
    let fail = |source| NetlinkError {
        what: format!("interface {name}"),
        step: "finding it",
        source,
    };
    let name_c = std::ffi::CString::new(name)
        .map_err(|_| fail(std::io::Error::from(std::io::ErrorKind::InvalidInput)))?;
    // SAFETY: a valid C string; if_nametoindex only reads it.
    let index = unsafe { libc::if_nametoindex(name_c.as_ptr()) };
    if index == 0 {
        return Err(fail(std::io::Error::last_os_error()));
    }
    Ok(index)
}

/// Adds `address`/32 to interface `index` (`ip addr add ADDRESS/32 dev ...`): the host
/// then answers for it (ARP included). Whether it added it: an address already there is
/// no error, and is someone else's to remove.
pub fn add_address(index: u32, address: Ipv4Addr) -> Result<bool, NetlinkError> {
    let message = address_request(libc::RTM_NEWADDR, index, address);
    match send(&format!("adding {address} to interface {index}"), &message) {
        Ok(()) => Ok(true),
        Err(e) if e.errno() == Some(libc::EEXIST) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Removes `address`/32 from interface `index`. An address not there is no error.
pub fn remove_address(index: u32, address: Ipv4Addr) -> Result<(), NetlinkError> {
    let message = address_request(libc::RTM_DELADDR, index, address);
    match send(
        &format!("removing {address} from interface {index}"),
        &message,
    ) {
        Err(e) if e.errno() == Some(libc::EADDRNOTAVAIL) => Ok(()),
        done => done,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_request_is_a_well_formed_netlink_message() {
        let message = address_request(libc::RTM_NEWADDR, 7, Ipv4Addr::new(10, 77, 1, 5));
        assert_eq!(
            u32::from_ne_bytes(message[..4].try_into().unwrap()) as usize,
            message.len()
        );
        // nlmsghdr (16) + ifaddrmsg (8) + IFA_LOCAL (8) + IFA_ADDRESS (8).
        assert_eq!(message.len(), 16 + 8 + 8 + 8);
        assert_eq!(message[16], libc::AF_INET as u8);
        assert_eq!(message[17], 32);
        assert_eq!(u32::from_ne_bytes(message[20..24].try_into().unwrap()), 7);
        assert_eq!(&message[28..32], &[10, 77, 1, 5]);
    }
}
