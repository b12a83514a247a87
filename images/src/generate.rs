//! Files of deterministic content generated at build time, so that large test files need
//! not live in git. Every 64-byte line carries its own number, so a response served from
//! the wrong offset cannot pass for the right one.

use std::io::Write;

/// The length of one generated line, newline included.
pub const LINE_LEN: usize = 64;

/// What follows each line's number (7 digits and a space) up to the newline.
const FILLER: &[u8; 55] = b"picocenter generated test data: abcdefghijklmnopqrstuvw";

/// Writes `size` bytes of numbered lines to `out`: line `n` (from 0) is `n` as 7 digits, a
/// space, a fixed 55-byte text and a newline; the last line is cut to make `size`.
pub fn numbered_lines(size: u64, out: &mut impl Write) -> std::io::Result<()> {
    let mut line = [0u8; LINE_LEN];
    line[8..LINE_LEN - 1].copy_from_slice(FILLER);
    line[7] = b' ';
    line[LINE_LEN - 1] = b'\n';
    let mut left = size;
    let mut number = 0u64;
    while left > 0 {
        let digits = format!("{:07}", number % 10_000_000);
        line[..7].copy_from_slice(digits.as_bytes());
        let take = left.min(LINE_LEN as u64) as usize;
        out.write_all(&line[..take])?;
        left -= take as u64;
        number += 1;
    }
    Ok(())
}

/// The whole content of a generated file of `size` bytes, for tests that check a download.
pub fn numbered_lines_vec(size: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    // Writing to a Vec cannot fail.
    let _ = numbered_lines(size, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_numbered_and_the_size_is_exact() {
        let data = numbered_lines_vec(1000);
        assert_eq!(data.len(), 1000);
        assert!(data.starts_with(b"0000000 picocenter generated test data: "));
        assert_eq!(&data[64..72], b"0000001 ");
        assert_eq!(data[63], b'\n');
        assert_eq!(numbered_lines_vec(1 << 20).len(), 1 << 20);
        assert!(numbered_lines_vec(0).is_empty());
    }
}
