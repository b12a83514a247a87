//! Guest path names as Rust strings, losslessly.
//!
//! Linux names are bytes: anything but `/` and NUL. The VMM keeps guest paths as `String`s
//! (they are normalised, matched against mounts, recorded in snapshots), so the bytes that
//! are not UTF-8 travel as characters of their own, the way Python's `surrogateescape`
//! does it: byte `b` becomes U+10FF00 + `b`, the last 256 code points of plane 16 (private
//! use). A real name holding one of those characters has its UTF-8 bytes escaped the same
//! way, so that the mapping is a bijection and the host always gets back exactly the bytes
//! the app gave. `/` is ASCII and never escaped, so paths split and join as before.

use std::borrow::Cow;

/// The first code point that stands for a raw byte.
const ESCAPE_BASE: u32 = 0x10_FF00;

/// UTF-8 of every character at or above U+100000 starts with 0xF4: without it, valid
/// UTF-8 has nothing to escape.
const PLANE_16_LEAD: u8 = 0xF4;

fn escaped(byte: u8) -> char {
    char::from_u32(ESCAPE_BASE + u32::from(byte)).expect("plane 16 code points are chars")
}

/// The string for a name the app gave as bytes (without its NUL).
pub fn from_guest(bytes: Vec<u8>) -> String {
    if !bytes.contains(&PLANE_16_LEAD) {
        if let Ok(plain) = String::from_utf8(bytes.clone()) {
            return plain;
        }
    }
    let mut out = String::with_capacity(bytes.len() * 2);
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            if u32::from(c) >= ESCAPE_BASE {
                let mut buf = [0u8; 4];
                for &b in c.encode_utf8(&mut buf).as_bytes() {
                    out.push(escaped(b));
                }
            } else {
                out.push(c);
            }
        }
        for &b in chunk.invalid() {
            out.push(escaped(b));
        }
    }
    out
}

/// The bytes a string made by [`from_guest`] stands for: what the host is given.
pub fn to_host(name: &str) -> Cow<'_, [u8]> {
    if !name.as_bytes().contains(&PLANE_16_LEAD) {
        return Cow::Borrowed(name.as_bytes());
    }
    let mut out = Vec::with_capacity(name.len());
    for c in name.chars() {
        match u32::from(c).checked_sub(ESCAPE_BASE) {
            // Only U+10FF00..=U+10FFFF pass, and they are below 256 above the base.
            Some(byte) => out.push(byte as u8),
            None => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(bytes: &[u8]) {
        let name = from_guest(bytes.to_vec());
        assert_eq!(to_host(&name).as_ref(), bytes, "{name:?}");
    }

    #[test]
    fn every_byte_string_comes_back_exactly() {
        round_trip(b"/plain/ascii");
        round_trip("/caf\u{e9}/\u{1f600}".as_bytes());
        round_trip(b"/latin1-\xe9t\xe9");
        round_trip(b"\xff\xfe/\x80");
        round_trip(b"/truncated-\xf0\x9f\x98");
        // A real name holding a character of the escape range.
        round_trip("/\u{10ff41}/\u{10ffff}".as_bytes());
        round_trip(b"\xf4\x8f\xbf\xbf\xf4");
        for b in 0u8..=255 {
            round_trip(&[b'/', b, b'x']);
        }
    }

    #[test]
    fn distinct_names_stay_distinct_and_slashes_stay_slashes() {
        let raw = from_guest(b"/a\xe9".to_vec());
        let real = from_guest("/a\u{10ffe9}".as_bytes().to_vec());
        assert_ne!(raw, real);
        assert_eq!(from_guest(b"/d\xff/f".to_vec()).split('/').count(), 3);
        assert_eq!(from_guest(b"/ok/utf8".to_vec()), "/ok/utf8");
    }
}
