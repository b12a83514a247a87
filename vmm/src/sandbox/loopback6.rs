//! The route that makes apps' IPv6 addresses reachable on this host: [`APP_V6_PREFIX`]
//! as a `local` route on loopback, as 127.0.0.0/8 is (`ip -6 route replace local
//! fd00:7069:636f::/96 dev lo table local`), set with one rtnetlink request. Needs
//! CAP_NET_ADMIN; idempotent.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// The prefix of the IPv6 address an app with an IPv4 address also has: a unique local
/// prefix (fd00::/8) whose global ID spells "pico", then the IPv4 address in the last 32
/// bits, so the two addresses come and go together. A worker routes the prefix to
/// loopback (`local fd00:7069:636f::/96 dev lo`), as 127.0.0.0/8 is.
pub const APP_V6_PREFIX: [u16; 6] = [0xfd00, 0x7069, 0x636f, 0, 0, 0];

/// The prefix length of [`APP_V6_PREFIX`].
pub const APP_V6_PREFIX_LEN: u8 = 96;

/// Why the route could not be set.
#[derive(Debug, thiserror::Error)]
#[error("routing the apps' IPv6 prefix to loopback: {step}")]
pub struct RouteError {
    /// The step that failed.
    step: &'static str,
    /// Why.
    #[source]
    source: std::io::Error,
}

fn fail(step: &'static str) -> impl FnOnce(std::io::Error) -> RouteError {
    move |source| RouteError { step, source }
}

/// Appends one rtnetlink attribute (type, payload), padded to 4 bytes.
fn attribute(message: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let len = 4 + payload.len();
    message.extend_from_slice(&(len as u16).to_ne_bytes());
    message.extend_from_slice(&kind.to_ne_bytes());
    message.extend_from_slice(payload);
    message.resize(message.len().next_multiple_of(4), 0);
}

/// The RTM_NEWROUTE request (create or replace, acknowledged).
fn request(loopback_index: u32) -> Vec<u8> {
    let mut prefix = [0u8; 16];
    for (i, word) in APP_V6_PREFIX.iter().enumerate() {
        prefix[2 * i..2 * i + 2].copy_from_slice(&word.to_be_bytes());
    }
    // struct nlmsghdr (length filled in below), then struct rtmsg.
    let mut message = Vec::with_capacity(64);
    message.extend_from_slice(&0u32.to_ne_bytes());
    message.extend_from_slice(&libc::RTM_NEWROUTE.to_ne_bytes());
    let flags = libc::NLM_F_REQUEST | libc::NLM_F_ACK | libc::NLM_F_CREATE | libc::NLM_F_REPLACE;
    message.extend_from_slice(&(flags as u16).to_ne_bytes());
    message.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    message.extend_from_slice(&0u32.to_ne_bytes()); // port: the kernel's
    message.extend_from_slice(&[
        libc::AF_INET6 as u8,
        APP_V6_PREFIX_LEN,
        0, // source length
        0, // tos
        libc::RT_TABLE_LOCAL,
        libc::RTPROT_BOOT,
        libc::RT_SCOPE_HOST,
        libc::RTN_LOCAL,
    ]);
    message.extend_from_slice(&0u32.to_ne_bytes()); // rtm_flags
    attribute(&mut message, libc::RTA_DST, &prefix);
    attribute(&mut message, libc::RTA_OIF, &loopback_index.to_ne_bytes());
    let len = message.len() as u32;
    message[..4].copy_from_slice(&len.to_ne_bytes());
    message
}

/// Routes the apps' IPv6 prefix to loopback.
pub fn route_app_prefix() -> Result<(), RouteError> {
    // SAFETY: a C string literal; if_nametoindex only reads it.
    let loopback = unsafe { libc::if_nametoindex(c"lo".as_ptr()) };
    if loopback == 0 {
        return Err(fail("finding lo")(std::io::Error::last_os_error()));
    }
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
    let message = request(loopback);
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
        return Err(fail("sending the route")(std::io::Error::last_os_error()));
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
        (Some(k), Some(e)) if k == libc::NLMSG_ERROR as u16 => Err(fail("adding the route")(
            std::io::Error::from_raw_os_error(-e),
        )),
        _ => Err(fail("reading the answer")(std::io::Error::other(
            "not an acknowledgement",
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_is_a_well_formed_netlink_message() {
        let message = request(1);
        assert_eq!(
            u32::from_ne_bytes(message[..4].try_into().unwrap()) as usize,
            message.len()
        );
        assert_eq!(message.len() % 4, 0);
        // nlmsghdr (16) + rtmsg (12) + RTA_DST (4 + 16) + RTA_OIF (4 + 4).
        assert_eq!(message.len(), 16 + 12 + 20 + 8);
        assert_eq!(message[16], libc::AF_INET6 as u8);
        assert_eq!(message[17], 96);
        assert_eq!(&message[32..34], &[0xfd, 0x00]);
    }
}
