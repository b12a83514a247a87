//! The route that makes apps' IPv6 addresses reachable on this host: [`APP_V6_PREFIX`]
//! as a `local` route on loopback, as 127.0.0.0/8 is (`ip -6 route replace local
//! fd00:7069:636f::/96 dev lo table local`), set with one rtnetlink request. Needs
//! CAP_NET_ADMIN; idempotent.

use super::rtnetlink::{attribute, finish, header, send, NetlinkError};

/// The prefix of the IPv6 address an app with an IPv4 address also has: a unique local
/// prefix (fd00::/8) whose global ID spells "pico", then the IPv4 address in the last 32
/// bits, so the two addresses come and go together. A worker routes the prefix to
/// loopback (`local fd00:7069:636f::/96 dev lo`), as 127.0.0.0/8 is.
pub const APP_V6_PREFIX: [u16; 6] = [0xfd00, 0x7069, 0x636f, 0, 0, 0];

/// The prefix length of [`APP_V6_PREFIX`].
pub const APP_V6_PREFIX_LEN: u8 = 96;

/// The RTM_NEWROUTE request (create or replace, acknowledged).
fn request(loopback_index: u32) -> Vec<u8> {
    let mut prefix = [0u8; 16];
    for (i, word) in APP_V6_PREFIX.iter().enumerate() {
        prefix[2 * i..2 * i + 2].copy_from_slice(&word.to_be_bytes());
    }
    // struct nlmsghdr, then struct rtmsg.
    let mut message = header(libc::RTM_NEWROUTE, libc::NLM_F_CREATE | libc::NLM_F_REPLACE);
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
    finish(&mut message);
    message
}

/// Routes the apps' IPv6 prefix to loopback.
pub fn route_app_prefix() -> Result<(), NetlinkError> {
    let loopback = super::rtnetlink::interface_index("lo")?;
    send(
        "routing the apps' IPv6 prefix to loopback",
        &request(loopback),
    )
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
