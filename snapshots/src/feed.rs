//! The page feed: how a worker streams page files from cold storage into a VMM that is
//! already restoring from them.
//!
//! The worker downloads the chain's page files that its cache lacks (the *streamed
//! levels*) while the VMM restores; the two are joined by a stream socket:
//!
//! ```text
//! worker -> VMM   chunk:  level u32 | chunk u64 | length u32 | length bytes   (LE)
//! VMM -> worker   want:   level u32 | chunk u64                               (LE)
//! ```
//!
//! `level` indexes the streamed levels in the order both were given them (newest first);
//! `chunk` is a chunk of that level's page file ([`crate::pagefile::chunk_pages_of`]). The
//! worker sends every chunk of every streamed level exactly once, in an order of its
//! choosing, and a `want` moves a chunk to the front. The VMM first wants the chunks that
//! hold the pages it will need first, then sends [`FIRST_WANTS_DONE`]; until then (or
//! until the VMM goes), the worker asks cold storage for nothing else, so that those
//! chunks are not queued behind the rest. The VMM checks each chunk against
//! its digest in the (authenticated) manifest before the app can see it, so the worker is
//! trusted with nothing but liveness: a chunk that fails its check ends the restore.

use std::io::{Read, Write};

/// The largest chunk a feed carries: [`crate::bounds::MAX_CHUNK_PAGES`] pages.
pub const MAX_CHUNK_BYTES: u32 = (crate::bounds::MAX_CHUNK_PAGES * crate::format::PAGE_SIZE) as u32;

/// Bytes of a chunk message's header.
const CHUNK_HEADER: usize = 16;
/// Bytes of a want message.
pub const WANT_BYTES: usize = 12;

/// The want that ends the VMM's first wants (no chunk).
pub const FIRST_WANTS_DONE: ChunkId = ChunkId {
    level: u32::MAX,
    chunk: u64::MAX,
};

/// Where a chunk belongs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId {
    /// The streamed level (0 = the newest streamed page file).
    pub level: u32,
    /// The chunk within that level's page file.
    pub chunk: u64,
}

/// Writes one chunk message.
pub fn write_chunk(out: &mut impl Write, id: ChunkId, bytes: &[u8]) -> std::io::Result<()> {
    let len = u32::try_from(bytes.len())
        .ok()
        .filter(|&len| len <= MAX_CHUNK_BYTES)
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "chunk too big"))?;
    let mut header = [0u8; CHUNK_HEADER];
    header[..4].copy_from_slice(&id.level.to_le_bytes());
    header[4..12].copy_from_slice(&id.chunk.to_le_bytes());
    header[12..].copy_from_slice(&len.to_le_bytes());
    out.write_all(&header)?;
    out.write_all(bytes)
}

/// Reads one chunk message into `buffer` (resized to fit). `None` at a clean end of the
/// feed; an error for a torn message or one over [`MAX_CHUNK_BYTES`].
pub fn read_chunk(input: &mut impl Read, buffer: &mut Vec<u8>) -> std::io::Result<Option<ChunkId>> {
    let mut header = [0u8; CHUNK_HEADER];
    let mut got = 0;
    while got < CHUNK_HEADER {
        match input.read(&mut header[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let word = |range: std::ops::Range<usize>| {
        let mut bytes = [0u8; 8];
        bytes[..range.len()].copy_from_slice(&header[range]);
        u64::from_le_bytes(bytes)
    };
    let id = ChunkId {
        level: word(0..4) as u32,
        chunk: word(4..12),
    };
    let len = word(12..16) as u32;
    if len > MAX_CHUNK_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a feed chunk of {len} bytes (at most {MAX_CHUNK_BYTES})"),
        ));
    }
    buffer.resize(len as usize, 0);
    input.read_exact(buffer)?;
    Ok(Some(id))
}

/// Encodes a want message.
pub fn want(id: ChunkId) -> [u8; WANT_BYTES] {
    let mut message = [0u8; WANT_BYTES];
    message[..4].copy_from_slice(&id.level.to_le_bytes());
    message[4..].copy_from_slice(&id.chunk.to_le_bytes());
    message
}

/// Decodes a want message.
pub fn parse_want(message: &[u8; WANT_BYTES]) -> ChunkId {
    let mut level = [0u8; 4];
    let mut chunk = [0u8; 8];
    level.copy_from_slice(&message[..4]);
    chunk.copy_from_slice(&message[4..]);
    ChunkId {
        level: u32::from_le_bytes(level),
        chunk: u64::from_le_bytes(chunk),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_and_wants_round_trip() {
        let mut wire = Vec::new();
        let first = ChunkId { level: 1, chunk: 7 };
        let second = ChunkId {
            level: 0,
            chunk: u64::MAX,
        };
        write_chunk(&mut wire, first, &[1, 2, 3]).unwrap();
        write_chunk(&mut wire, second, &[]).unwrap();
        let mut input = &wire[..];
        let mut buffer = Vec::new();
        assert_eq!(read_chunk(&mut input, &mut buffer).unwrap(), Some(first));
        assert_eq!(buffer, [1, 2, 3]);
        assert_eq!(read_chunk(&mut input, &mut buffer).unwrap(), Some(second));
        assert!(buffer.is_empty());
        assert_eq!(read_chunk(&mut input, &mut buffer).unwrap(), None);
        assert_eq!(parse_want(&want(first)), first);
    }

    #[test]
    fn torn_and_oversized_chunks_are_errors() {
        let mut wire = Vec::new();
        write_chunk(&mut wire, ChunkId { level: 0, chunk: 0 }, &[9; 100]).unwrap();
        let mut buffer = Vec::new();
        for cut in [5, 16, 50] {
            assert!(
                read_chunk(&mut &wire[..cut], &mut buffer).is_err(),
                "cut at {cut}"
            );
        }
        let mut huge = wire[..12].to_vec();
        huge.extend_from_slice(&(MAX_CHUNK_BYTES + 1).to_le_bytes());
        let error = read_chunk(&mut &huge[..], &mut buffer).unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::InvalidData);
        assert!(write_chunk(
            &mut Vec::new(),
            ChunkId { level: 0, chunk: 0 },
            &vec![0; MAX_CHUNK_BYTES as usize + 1]
        )
        .is_err());
    }
}
