//! Packed page files: a page file stored as the pages no other snapshot holds, plus
//! references into a *base* page file that does (README §5.7).
//!
//! Apps of one image hold mostly the same pages: a hundred nginx apps differ in a few
//! dozen pages each (their heaps, and the pages ASLR fills with pointers). Cold storage
//! keeps one plain page file per image as its base, and stores every other page file of
//! that image *packed*: a header that says, for each run of pages, whether it is the
//! base's pages `j..` or the next of the packed object's own pages, followed by those own
//! pages in order. Pages are matched by content (a BLAKE3 digest per page), so the
//! pages need not sit at the same addresses or in the same order as in the base.
//!
//! Nothing here is trusted more than the page file it stands for: a packed object is
//! turned back into the page file ([`assemble`]) and that file is checked against the
//! manifest's authenticated chunk digests before anything maps it. A wrong header, a
//! wrong base or a base that changed make a restore fail its checksum, never map the
//! wrong bytes. The header is bounded ([`PackedHeader::check`]) before it sizes anything.

use crate::format::PAGE_SIZE;
use crate::names::is_plain;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

/// The first bytes of a packed object.
pub const MAGIC: [u8; 8] = *b"PCPACK\0\x01";
/// The most pages a packed page file, or its base, may have (64 MiB): larger page files
/// are stored whole, so that they stream.
pub const MAX_PAGES: u64 = 16_384;
/// The largest header a packed object may have: a run for each of the 16,384 pages of
/// the largest packed page file (64 MiB) takes at most 21 bytes, so this bounds what a
/// hostile header makes a decoder allocate (a few MiB).
pub const MAX_HEADER: u64 = 1 << 20;
/// A page file is packed only if this fraction (1/N) of its pages or more are in the
/// base: below that the header and the second object cost more than they save.
pub const MIN_SHARED_FRACTION: u64 = 4;

/// Where a run of a packed page file's pages come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackedRun {
    /// Pages in the run (at least 1).
    pub pages: u64,
    /// `Some(j)`: the base's pages `j..j + pages`; `None`: the packed object's next own
    /// pages.
    pub base_start: Option<u64>,
}

/// What a packed object says of itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackedHeader {
    /// The base page file: `APP/ID`, the plain page file of snapshot ID of app APP in
    /// the same bucket and prefix.
    pub base: String,
    /// BLAKE3 of the whole base page file, so that a cached copy is known to be it.
    pub base_digest: [u8; 32],
    /// Pages in the base page file.
    pub base_pages: u64,
    /// Pages in the page file this stands for (the manifest's `page_count`).
    pub logical_pages: u64,
    /// Own pages, which follow the header LZ4-compressed (one block).
    pub own_pages: u64,
    /// Bytes of that block.
    pub own_bytes: u64,
    /// Runs covering the page file in order.
    pub runs: Vec<PackedRun>,
}

/// Why a packed object is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PackedError {
    /// Not a packed object, or a truncated one.
    #[error("not a packed page file ({0})")]
    NotPacked(&'static str),
    /// A header field out of its bounds or contradicting another.
    #[error("the packed page file's header is inconsistent: {0}")]
    Inconsistent(String),
}

impl PackedHeader {
    /// Checks every field against the others and against `page_count`, the manifest's
    /// (authenticated) page count, before anything is sized from them.
    pub fn check(&self, page_count: u64) -> Result<(), PackedError> {
        let bad = |what: String| Err(PackedError::Inconsistent(what));
        if !is_base_ref(&self.base) {
            return bad(format!("base {:?} is not APP/ID", self.base));
        }
        if self.logical_pages > MAX_PAGES || self.base_pages > MAX_PAGES {
            return bad(format!(
                "{} pages against a base of {} (at most {MAX_PAGES})",
                self.logical_pages, self.base_pages
            ));
        }
        if self.logical_pages != page_count {
            return bad(format!(
                "{} pages, but the manifest has {page_count}",
                self.logical_pages
            ));
        }
        if self.runs.len() as u64 > self.logical_pages {
            return bad(format!("{} runs for {} pages", self.runs.len(), page_count));
        }
        let (mut total, mut own) = (0u64, 0u64);
        for run in &self.runs {
            if run.pages == 0 {
                return bad("an empty run".into());
            }
            total = total
                .checked_add(run.pages)
                .ok_or(PackedError::Inconsistent("runs overflow".into()))?;
            match run.base_start {
                None => own += run.pages,
                Some(start) => match start.checked_add(run.pages) {
                    Some(end) if end <= self.base_pages => {}
                    _ => return bad(format!("a run past the base's {} pages", self.base_pages)),
                },
            }
        }
        if total != self.logical_pages {
            return bad(format!(
                "runs cover {total} of {} pages",
                self.logical_pages
            ));
        }
        if own != self.own_pages {
            return bad(format!(
                "runs take {own} own pages, the header says {}",
                self.own_pages
            ));
        }
        let most = lz4_flex::block::get_maximum_output_size(
            usize::try_from(own.saturating_mul(PAGE_SIZE)).unwrap_or(usize::MAX),
        );
        if self.own_bytes > most as u64 {
            return bad(format!("{} bytes of {own} own pages", self.own_bytes));
        }
        Ok(())
    }

    /// Bytes of the page file this stands for.
    pub fn logical_bytes(&self) -> u64 {
        self.logical_pages.saturating_mul(PAGE_SIZE)
    }

    /// Pages taken from the base.
    pub fn shared_pages(&self) -> u64 {
        self.logical_pages.saturating_sub(self.own_pages)
    }
}

/// Whether `base` is `APP/ID` with both parts plain names (no `/`, no leading `.`).
pub fn is_base_ref(base: &str) -> bool {
    match base.split_once('/') {
        Some((app, id)) => crate::names::validate_app_name(app).is_ok() && is_plain(id, 128),
        None => false,
    }
}

/// A packed object's header, encoded: [`MAGIC`], its length (u64, little-endian), then
/// postcard. Own pages follow it directly.
pub fn encode_header(header: &PackedHeader) -> Vec<u8> {
    let body = postcard::to_allocvec(header).expect("a PackedHeader always encodes");
    let mut out = Vec::with_capacity(16 + body.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// The length of the header that `prefix` (the first 16 bytes of an object or more)
/// starts, magic and length field included.
pub fn header_len(prefix: &[u8]) -> Result<u64, PackedError> {
    if prefix.len() < 16 || prefix[..8] != MAGIC {
        return Err(PackedError::NotPacked("no packed header"));
    }
    let len = u64::from_le_bytes(prefix[8..16].try_into().expect("8 bytes"));
    if len > MAX_HEADER {
        return Err(PackedError::Inconsistent(format!("a {len}-byte header")));
    }
    Ok(16 + len)
}

/// The header at the start of `bytes`, decoded but not checked.
fn decode_unchecked(bytes: &[u8]) -> Result<PackedHeader, PackedError> {
    let len = header_len(bytes)?;
    let body = bytes
        .get(16..len as usize)
        .ok_or(PackedError::NotPacked("truncated header"))?;
    postcard::from_bytes(body).map_err(|_| PackedError::NotPacked("undecodable header"))
}

impl PackedHeader {
    /// The page count the header at the start of `bytes` claims, for a caller with no
    /// manifest to check it against (it must bound it itself before [`decode_header`]).
    pub fn logical_pages_of(bytes: &[u8]) -> Result<u64, PackedError> {
        decode_unchecked(bytes).map(|header| header.logical_pages)
    }
}

/// Decodes the header at the start of `bytes` (at least [`header_len`] of them) and
/// checks it against `page_count`.
pub fn decode_header(bytes: &[u8], page_count: u64) -> Result<PackedHeader, PackedError> {
    let header = decode_unchecked(bytes)?;
    header.check(page_count)?;
    Ok(header)
}

/// The digest pages are matched by (128 bits of BLAKE3: a collision would make a restore
/// fail its checksum, not map wrong bytes).
type PageDigest = [u8; 16];

fn page_digest(page: &[u8]) -> PageDigest {
    let full = blake3::hash(page);
    full.as_bytes()[..16].try_into().expect("16 bytes")
}

/// The pages of a base page file, by content.
#[derive(Debug, Clone)]
pub struct BaseIndex {
    /// `APP/ID` of the base.
    pub base: String,
    /// BLAKE3 of the whole file.
    pub digest: [u8; 32],
    /// Its pages.
    pub pages: u64,
    by_digest: HashMap<PageDigest, u64>,
}

impl BaseIndex {
    /// Indexes `bytes`, the whole base page file `base`.
    pub fn of(base: &str, bytes: &[u8]) -> Self {
        let mut by_digest = HashMap::new();
        for (j, page) in (0u64..).zip(bytes.chunks_exact(PAGE_SIZE as usize)) {
            by_digest.entry(page_digest(page)).or_insert(j);
        }
        Self {
            base: base.to_string(),
            digest: blake3::hash(bytes).into(),
            pages: bytes.len() as u64 / PAGE_SIZE,
            by_digest,
        }
    }
}

/// How `page_file` (whole pages) would be packed against `base`: the header, and the
/// indices of its own pages in order. `None` if fewer than 1/[`MIN_SHARED_FRACTION`] of
/// its pages are in the base (it is better stored plain).
pub fn plan(page_file: &[u8], base: &BaseIndex) -> Option<(PackedHeader, Vec<u64>)> {
    let logical_pages = page_file.len() as u64 / PAGE_SIZE;
    let mut runs: Vec<PackedRun> = Vec::new();
    let mut own = Vec::new();
    for (i, page) in (0u64..).zip(page_file.chunks_exact(PAGE_SIZE as usize)) {
        let from = base.by_digest.get(&page_digest(page)).copied();
        if from.is_none() {
            own.push(i);
        }
        match (runs.last_mut(), from) {
            (Some(last), None) if last.base_start.is_none() => last.pages += 1,
            (Some(last), Some(j)) if last.base_start.is_some_and(|s| s + last.pages == j) => {
                last.pages += 1
            }
            _ => runs.push(PackedRun {
                pages: 1,
                base_start: from,
            }),
        }
    }
    let shared = logical_pages - own.len() as u64;
    if logical_pages == 0 || shared.saturating_mul(MIN_SHARED_FRACTION) < logical_pages {
        return None;
    }
    let header = PackedHeader {
        base: base.base.clone(),
        base_digest: base.digest,
        base_pages: base.pages,
        logical_pages,
        own_pages: own.len() as u64,
        own_bytes: 0,
        runs,
    };
    Some((header, own))
}

/// Writes the packed object for `page_file` (the header, then its own pages `own`,
/// compressed) to `out`, and returns the header as written (`own_bytes` set).
pub fn write_packed(
    header: &PackedHeader,
    own: &[u64],
    page_file: &[u8],
    out: &mut impl Write,
) -> std::io::Result<PackedHeader> {
    let mut pages = Vec::with_capacity(own.len() * PAGE_SIZE as usize);
    for &i in own {
        let at = (i * PAGE_SIZE) as usize;
        pages.extend_from_slice(&page_file[at..at + PAGE_SIZE as usize]);
    }
    let body = match pages.is_empty() {
        true => Vec::new(),
        false => lz4_flex::block::compress(&pages),
    };
    let header = PackedHeader {
        own_bytes: body.len() as u64,
        ..header.clone()
    };
    out.write_all(&encode_header(&header))?;
    out.write_all(&body)?;
    out.flush()?;
    Ok(header)
}

/// Rebuilds the page file that `header` (checked) stands for into `out`: own pages from
/// `own` (the packed object's bytes after the header, compressed), the rest from `base` (the whole
/// base page file, whose size and digest must be the header's).
pub fn assemble(
    header: &PackedHeader,
    own: &[u8],
    base: &[u8],
    out: &Path,
) -> Result<(), AssembleError> {
    if base.len() as u64 != header.base_pages.saturating_mul(PAGE_SIZE)
        || <[u8; 32]>::from(blake3::hash(base)) != header.base_digest
    {
        return Err(AssembleError::WrongBase(header.base.clone()));
    }
    if own.len() as u64 != header.own_bytes {
        return Err(AssembleError::Truncated {
            own: own.len() as u64,
            expected: header.own_bytes,
        });
    }
    // `check` bounded `own_pages` by the manifest's page count.
    let own_size = (header.own_pages * PAGE_SIZE) as usize;
    let own = match own_size {
        0 => Vec::new(),
        _ => {
            let mut pages = vec![0u8; own_size];
            match lz4_flex::block::decompress_into(own, &mut pages) {
                Ok(n) if n == own_size => pages,
                _ => return Err(AssembleError::Undecodable),
            }
        }
    };
    let mut file = std::io::BufWriter::with_capacity(
        1 << 20,
        crate::private::create_file(out).map_err(AssembleError::Io)?,
    );
    let mut own_pages = own.chunks_exact(PAGE_SIZE as usize);
    for run in &header.runs {
        // `check` bounded every base run by the base's pages, and the own pages by
        // `own_pages`, which the length above matches.
        let bytes = match run.base_start {
            Some(start) => {
                &base[(start * PAGE_SIZE) as usize..((start + run.pages) * PAGE_SIZE) as usize]
            }
            None => {
                for _ in 0..run.pages {
                    let page = own_pages.next().ok_or(AssembleError::Undecodable)?;
                    file.write_all(page).map_err(AssembleError::Io)?;
                }
                continue;
            }
        };
        file.write_all(bytes).map_err(AssembleError::Io)?;
    }
    file.into_inner()
        .map_err(|e| AssembleError::Io(e.into_error()))?
        .sync_all()
        .map_err(AssembleError::Io)
}

/// Why a packed object could not be turned back into its page file.
#[derive(Debug, thiserror::Error)]
pub enum AssembleError {
    /// The base is not the one the header names (a changed or tampered object).
    #[error("the base page file {0} is not the one this packed page file was made against")]
    WrongBase(String),
    /// The packed object's own pages do not decompress to what its header says.
    #[error("the packed page file's own pages do not decompress to the pages its header says")]
    Undecodable,
    /// The packed object holds another number of bytes of own pages than its header says.
    #[error("the packed page file holds {own} bytes of its own pages, not {expected}")]
    Truncated {
        /// Bytes it holds.
        own: u64,
        /// Bytes its header says.
        expected: u64,
    },
    /// Writing the page file.
    #[error("assembling a packed page file: {0}")]
    Io(#[source] std::io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pages(seeds: &[u8]) -> Vec<u8> {
        seeds
            .iter()
            .flat_map(|&s| std::iter::repeat_n(s, PAGE_SIZE as usize))
            .collect()
    }

    fn roundtrip(file: &[u8], base: &[u8]) -> Option<(PackedHeader, Vec<u8>)> {
        let index = BaseIndex::of("nginx-1/s1", base);
        let (header, own) = plan(file, &index)?;
        header.check(file.len() as u64 / PAGE_SIZE).unwrap();
        let mut packed = Vec::new();
        let header = write_packed(&header, &own, file, &mut packed).unwrap();
        let decoded = decode_header(&packed, header.logical_pages).unwrap();
        assert_eq!(decoded, header);
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("pages");
        let own = &packed[header_len(&packed).unwrap() as usize..];
        assemble(&header, own, base, &out).unwrap();
        Some((header, std::fs::read(out).unwrap()))
    }

    #[test]
    fn a_page_file_comes_back_whole_from_its_own_pages_and_the_base() {
        let base = pages(&[1, 2, 3, 4, 5, 6, 7, 8]);
        // Shared pages moved and reordered, two of its own between them.
        let file = pages(&[3, 4, 9, 1, 2, 10, 8, 8]);
        let (header, back) = roundtrip(&file, &base).unwrap();
        assert_eq!(back, file);
        assert_eq!(header.own_pages, 2);
        assert_eq!(header.shared_pages(), 6);
        assert_eq!(
            header.runs,
            [
                PackedRun {
                    pages: 2,
                    base_start: Some(2)
                },
                PackedRun {
                    pages: 1,
                    base_start: None
                },
                PackedRun {
                    pages: 2,
                    base_start: Some(0)
                },
                PackedRun {
                    pages: 1,
                    base_start: None
                },
                PackedRun {
                    pages: 1,
                    base_start: Some(7)
                },
                PackedRun {
                    pages: 1,
                    base_start: Some(7)
                },
            ]
        );
    }

    #[test]
    fn a_page_file_that_shares_little_is_left_plain() {
        let base = pages(&[1, 2, 3, 4]);
        assert!(roundtrip(&pages(&[1, 9, 10, 11, 12]), &base).is_none());
        assert!(roundtrip(&pages(&[1, 2, 10, 11, 12]), &base).is_some());
        assert!(roundtrip(&[], &base).is_none());
    }

    #[test]
    fn a_hostile_header_is_refused_before_it_sizes_anything() {
        let good = PackedHeader {
            base: "nginx-1/s1".into(),
            base_digest: [0; 32],
            base_pages: 4,
            logical_pages: 3,
            own_pages: 1,
            own_bytes: 100,
            runs: vec![
                PackedRun {
                    pages: 2,
                    base_start: Some(2),
                },
                PackedRun {
                    pages: 1,
                    base_start: None,
                },
            ],
        };
        good.check(3).unwrap();
        let refused = |edit: &dyn Fn(&mut PackedHeader), page_count: u64| {
            let mut h = good.clone();
            edit(&mut h);
            assert!(h.check(page_count).is_err(), "{h:?}");
        };
        refused(&|_| {}, 4);
        refused(&|h| h.base = "../etc/s1".into(), 3);
        refused(&|h| h.base = "nginx-1/.s1".into(), 3);
        refused(&|h| h.base = "nginx-1".into(), 3);
        refused(&|h| h.base = "a/b/c".into(), 3);
        refused(&|h| h.runs[0].base_start = Some(3), 3);
        refused(&|h| h.runs[0].base_start = Some(u64::MAX), 3);
        refused(&|h| h.runs[0].pages = 0, 3);
        refused(&|h| h.runs[1].pages = u64::MAX, 3);
        // Page counts past the bound, even ones that agree (a caller without a manifest
        // takes the header's own count).
        let huge = 1u64 << 53;
        refused(
            &|h| {
                h.logical_pages = huge;
                h.own_pages = huge - 2;
                h.runs[1].pages = huge - 2;
            },
            huge,
        );
        refused(&|h| h.base_pages = MAX_PAGES + 1, 3);
        refused(&|h| h.own_pages = 2, 3);
        refused(&|h| h.own_bytes = 5000, 3);
        refused(
            &|h| {
                h.runs.push(PackedRun {
                    pages: 1,
                    base_start: None,
                })
            },
            3,
        );
        // A header length past the bound, and bytes that are not a header.
        let mut bytes = encode_header(&good);
        assert!(decode_header(&bytes, 3).is_ok());
        bytes[8..16].copy_from_slice(&(MAX_HEADER + 1).to_le_bytes());
        assert!(decode_header(&bytes, 3).is_err());
        assert!(decode_header(&pages(&[1]), 1).is_err());
        assert!(decode_header(&MAGIC, 1).is_err());
        let mut truncated = encode_header(&good);
        truncated.truncate(truncated.len() - 1);
        assert!(decode_header(&truncated, 3).is_err());
    }

    #[test]
    fn a_changed_base_is_refused_not_used() {
        let base = pages(&[1, 2, 3, 4]);
        let file = pages(&[1, 2, 3, 9]);
        let index = BaseIndex::of("nginx-1/s1", &base);
        let (header, own) = plan(&file, &index).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut packed = Vec::new();
        let header = write_packed(&header, &own, &file, &mut packed).unwrap();
        let own = &packed[header_len(&packed).unwrap() as usize..];
        let changed = pages(&[1, 2, 3, 5]);
        let out = dir.path().join("pages");
        assert!(matches!(
            assemble(&header, own, &changed, &out),
            Err(AssembleError::WrongBase(_))
        ));
        let short_base = &base[..PAGE_SIZE as usize * 3];
        assert!(assemble(&header, own, short_base, &out).is_err());
        assert!(matches!(
            assemble(&header, &own[1..], &base, &out),
            Err(AssembleError::Truncated { .. })
        ));
        assemble(&header, own, &base, &out).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), file);
        // Damaged compressed pages: an error or other bytes (which the manifest's digests
        // refuse), never a panic.
        for at in 0..own.len() {
            let mut damaged = own.to_vec();
            damaged[at] ^= 0x5a;
            let _ = assemble(&header, &damaged, &base, &out);
        }
    }
}
