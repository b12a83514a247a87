//! The data archive: a tar of an app's writable directories, written and read as a stream
//! (never whole in memory), with its BLAKE3 digest in the authenticated manifest.
//!
//! Each writable directory is stored under its guest path without the leading `/` (its
//! entries directly at the top for `/`). Only directories, regular files and symlinks that
//! stay inside their directory are stored; the modes keep no set-id bits. An AF_UNIX socket
//! file is left out: the socket is in the fd records and is bound again at restore, which
//! makes the file again. FIFOs, device nodes and symlinks that leave their directory are
//! left out too, with a warning.
//!
//! Reading trusts no entry: a restore refuses an archive holding an absolute name, a `..`,
//! a hard link, a symlink leaving its directory, anything but a directory, file or symlink,
//! set-id bits, or a name outside the writable directories; and it never writes through a
//! symlink.

use crate::format::Digest;
use crate::private;
use std::io::{BufReader, BufWriter, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

/// Why an archive could not be written, or was refused.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// A host I/O error.
    #[error("{what} {path}")]
    Io {
        /// The step.
        what: &'static str,
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The size or the digest is not the manifest's.
    #[error("the snapshot's data archive is corrupt: {0}")]
    Corrupt(String),
    /// An entry that must not be unpacked.
    #[error("the snapshot's data archive is refused: {entry:?} is {why}")]
    Refused {
        /// The entry's name.
        entry: String,
        /// What is wrong with it.
        why: &'static str,
    },
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> ArchiveError + 'a {
    move |source| ArchiveError::Io {
        what,
        path: path.display().to_string(),
        source,
    }
}

/// What [`create`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// Bytes of the archive.
    pub bytes: u64,
    /// Its BLAKE3 digest.
    pub digest: Digest,
    /// Host paths left out (sockets, FIFOs, devices, symlinks leaving their directory).
    pub skipped: Vec<PathBuf>,
}

/// A writer that hashes and counts what goes through it.
struct Digesting<W> {
    inner: W,
    hasher: blake3::Hasher,
    bytes: u64,
}

impl<W: Write> Write for Digesting<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// A reader that hashes and counts what comes through it.
struct Hashing<R> {
    inner: R,
    hasher: blake3::Hasher,
    bytes: u64,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

/// Writes the archive of `dirs` (guest path, host directory) to `path` (0600, synced),
/// streaming each file through; returns its size and digest.
pub fn create(path: &Path, dirs: &[(String, PathBuf)]) -> Result<Written, ArchiveError> {
    let file = private::create_file(path).map_err(io("creating", path))?;
    // Hashed after the buffer, in 1 MiB writes: BLAKE3 is much faster on large updates.
    let sink = BufWriter::with_capacity(
        1 << 20,
        Digesting {
            inner: file,
            hasher: blake3::Hasher::new(),
            bytes: 0,
        },
    );
    let mut builder = tar::Builder::new(sink);
    let mut skipped = Vec::new();
    for (guest, host) in dirs {
        let name = PathBuf::from(guest.trim_start_matches('/'));
        append_tree(&mut builder, &name, host, 0, &mut skipped)?;
    }
    let sink = builder
        .into_inner()
        .map_err(io("writing", path))?
        .into_inner()
        .map_err(|e| io("writing", path)(e.into_error()))?;
    sink.inner.sync_all().map_err(io("syncing", path))?;
    for skip in &skipped {
        tracing::warn!("the data archive leaves out {}", skip.display());
    }
    Ok(Written {
        bytes: sink.bytes,
        digest: sink.hasher.finalize().into(),
        skipped,
    })
}

/// A header for `meta` with no owner and no set-id bits.
fn header(meta: &std::fs::Metadata, kind: tar::EntryType) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_metadata_in_mode(meta, tar::HeaderMode::Deterministic);
    header.set_mtime(meta.mtime().max(0) as u64);
    header.set_mode(meta.mode() & 0o1777);
    header.set_entry_type(kind);
    header.set_size(0);
    header
}

/// Appends directory `host` as `name` (`depth` directories below its writable directory),
/// and everything in it, in name order.
fn append_tree<W: Write>(
    builder: &mut tar::Builder<W>,
    name: &Path,
    host: &Path,
    depth: usize,
    skipped: &mut Vec<PathBuf>,
) -> Result<(), ArchiveError> {
    let meta = std::fs::symlink_metadata(host).map_err(io("reading", host))?;
    if !name.as_os_str().is_empty() {
        let mut dir = header(&meta, tar::EntryType::Directory);
        builder
            .append_data(&mut dir, name, std::io::empty())
            .map_err(io("archiving", host))?;
    }
    let mut children: Vec<_> = std::fs::read_dir(host)
        .map_err(io("listing", host))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()
        .map_err(io("listing", host))?;
    children.sort();
    for child in children {
        let (name, host) = (name.join(&child), host.join(&child));
        let meta = std::fs::symlink_metadata(&host).map_err(io("reading", &host))?;
        let kind = meta.file_type();
        if kind.is_dir() {
            append_tree(builder, &name, &host, depth + 1, skipped)?;
        } else if kind.is_file() {
            append_file(builder, &name, &host)?;
        } else if kind.is_symlink() {
            let target = std::fs::read_link(&host).map_err(io("reading", &host))?;
            if !link_stays_inside(&target, depth) {
                skipped.push(host);
                continue;
            }
            let mut link = header(&meta, tar::EntryType::Symlink);
            builder
                .append_link(&mut link, &name, &target)
                .map_err(io("archiving", &host))?;
        } else {
            // A socket is bound again at restore; FIFOs and devices are not kept.
            if !kind.is_socket() {
                skipped.push(host);
            }
        }
    }
    Ok(())
}

/// Appends the regular file `host` as `name`, read through a descriptor that cannot be a
/// symlink, at the size it has. A file with holes is stored as a GNU sparse entry: only its
/// data, and the map of where it goes (a 512 MiB file of one written page costs a page).
fn append_file<W: Write>(
    builder: &mut tar::Builder<W>,
    name: &Path,
    host: &Path,
) -> Result<(), ArchiveError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(host)
        .map_err(io("opening", host))?;
    let meta = file.metadata().map_err(io("reading", host))?;
    let extents = data_extents(&file, meta.len()).map_err(io("reading", host))?;
    let stored: u64 = extents.iter().map(|e| e.len).sum();
    if stored == meta.len() {
        let mut head = header(&meta, tar::EntryType::Regular);
        head.set_size(meta.len());
        return builder
            .append_data(
                &mut head,
                name,
                Extents::new(
                    &file,
                    vec![Extent {
                        at: 0,
                        len: meta.len(),
                    }],
                ),
            )
            .map_err(io("archiving", host));
    }
    let mut head = header(&meta, tar::EntryType::GNUSparse);
    head.set_size(stored);
    let map = sparse_map(&mut head, &extents, meta.len());
    // The extended map blocks come between the header and the data; the data's padding
    // is the same with them (they are whole blocks).
    let data = std::io::Cursor::new(map).chain(Extents::new(&file, extents));
    builder
        .append_data(&mut head, name, data)
        .map_err(io("archiving", host))
}

/// A run of a file's bytes that holds data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Extent {
    at: u64,
    len: u64,
}

/// The runs of `file` (of `size` bytes) that hold data, by SEEK_DATA and SEEK_HOLE; the
/// whole file where the filesystem cannot tell.
fn data_extents(file: &std::fs::File, size: u64) -> std::io::Result<Vec<Extent>> {
    use std::os::fd::AsRawFd;
    let whole = vec![Extent { at: 0, len: size }];
    let Ok(end) = i64::try_from(size) else {
        return Ok(whole);
    };
    let seek = |at: i64, whence| {
        // SAFETY: lseek on a descriptor this function borrows; it moves only the offset
        // (every read here is positioned).
        match unsafe { libc::lseek(file.as_raw_fd(), at, whence) } {
            -1 => Err(std::io::Error::last_os_error()),
            at => Ok(at),
        }
    };
    let mut extents = Vec::new();
    let mut at = 0;
    while at < end {
        let data = match seek(at, libc::SEEK_DATA) {
            Ok(data) => data,
            // No data after `at`: the rest is a hole.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => break,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(whole),
            Err(e) => return Err(e),
        };
        let hole = seek(data, libc::SEEK_HOLE)?.min(end);
        if data >= end {
            break;
        }
        if hole <= data || data < at {
            // The filesystem contradicts itself (the file changed meanwhile?): store
            // every byte rather than lose any.
            return Ok(whole);
        }
        extents.push(Extent {
            at: data as u64,
            len: (hole - data) as u64,
        });
        at = hole;
    }
    Ok(extents)
}

/// Writes the sparse map of `extents` (a file of `size` bytes) into `head`: its first four
/// runs, and the size; returns the extended map blocks that hold the rest. A file that ends
/// in a hole ends its map with an empty run at its end, as GNU tar writes it.
fn sparse_map(head: &mut tar::Header, extents: &[Extent], size: u64) -> Vec<u8> {
    let mut runs = extents.to_vec();
    if runs.last().is_none_or(|last| last.at + last.len < size) {
        runs.push(Extent { at: size, len: 0 });
    }
    let gnu = head.as_gnu_mut().expect("header() makes GNU headers");
    gnu.set_real_size(size);
    let (first, rest) = runs.split_at(runs.len().min(gnu.sparse.len()));
    for (run, slot) in first.iter().zip(gnu.sparse.iter_mut()) {
        slot.set_offset(run.at);
        slot.set_length(run.len);
    }
    gnu.set_is_extended(!rest.is_empty());
    let mut blocks = Vec::new();
    let mut chunks = rest.chunks(21).peekable();
    while let Some(chunk) = chunks.next() {
        let mut block = tar::GnuExtSparseHeader::new();
        for (run, slot) in chunk.iter().zip(block.sparse.iter_mut()) {
            slot.set_offset(run.at);
            slot.set_length(run.len);
        }
        block.set_is_extended(chunks.peek().is_some());
        blocks.extend_from_slice(block.as_bytes());
    }
    blocks
}

/// Reads the bytes of a file's data runs, one after another; a file that shrank since its
/// runs were found is an error, not a short entry that would misalign the archive.
struct Extents<'a> {
    file: &'a std::fs::File,
    runs: std::collections::VecDeque<Extent>,
}

impl<'a> Extents<'a> {
    fn new(file: &'a std::fs::File, runs: Vec<Extent>) -> Self {
        Extents {
            file,
            runs: runs.into(),
        }
    }
}

impl Read for Extents<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::os::unix::fs::FileExt;
        while let Some(run) = self.runs.front_mut() {
            if run.len == 0 {
                self.runs.pop_front();
                continue;
            }
            let want = buf
                .len()
                .min(usize::try_from(run.len).unwrap_or(usize::MAX));
            let n = self.file.read_at(&mut buf[..want], run.at)?;
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the file shrank while it was archived",
                ));
            }
            run.at += n as u64;
            run.len -= n as u64;
            return Ok(n);
        }
        Ok(0)
    }
}

/// Whether a symlink `depth` directories below its writable directory, pointing at
/// `target`, stays inside that directory (judged by its text: relative, and never above
/// the top).
pub fn link_stays_inside(target: &Path, depth: usize) -> bool {
    let mut level = depth as i64;
    if target.as_os_str().is_empty() {
        return false;
    }
    for part in target.components() {
        match part {
            Component::Normal(_) => level += 1,
            Component::CurDir => {}
            Component::ParentDir => {
                level -= 1;
                if level < 0 {
                    return false;
                }
            }
            Component::RootDir | Component::Prefix(_) => return false,
        }
    }
    true
}

/// Where an entry goes: the host directory of its writable directory, and its path there.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Placement {
    host: PathBuf,
    rel: PathBuf,
}

/// Checks one entry against the rules of this module; `None` for the entry of a writable
/// directory itself (nothing to unpack).
fn place(
    entry: &tar::Entry<'_, impl Read>,
    dirs: &[(String, PathBuf)],
) -> Result<Option<Placement>, ArchiveError> {
    let raw = entry
        .path()
        .map_err(|e| ArchiveError::Corrupt(e.to_string()))?;
    let name = raw.display().to_string();
    let refuse = |why| {
        Err(ArchiveError::Refused {
            entry: name.clone(),
            why,
        })
    };
    let mut guest = PathBuf::from("/");
    for part in raw.components() {
        match part {
            Component::Normal(part) => guest.push(part),
            Component::CurDir => {}
            _ => return refuse("an absolute name or holds '..'"),
        }
    }
    let kind = entry.header().entry_type();
    let directory = kind == tar::EntryType::Directory;
    if kind.is_hard_link() {
        return refuse("a hard link");
    }
    let file = kind == tar::EntryType::Regular || kind == tar::EntryType::GNUSparse;
    if !(directory || file || kind == tar::EntryType::Symlink) {
        return refuse("not a directory, regular file or symlink (a device node?)");
    }
    let mode = entry.header().mode().unwrap_or(0);
    if mode & 0o6000 != 0 {
        return refuse("set-user-ID or set-group-ID");
    }
    // The deepest writable directory holding it.
    let Some((host, rel)) = dirs
        .iter()
        .filter_map(|(g, host)| Some((host, guest.strip_prefix(g).ok()?.to_path_buf())))
        .min_by_key(|(_, rel)| rel.components().count())
    else {
        return refuse("outside the writable directories");
    };
    if rel.as_os_str().is_empty() {
        return if directory {
            Ok(None)
        } else {
            refuse("not a directory, at a writable directory's place")
        };
    }
    if kind == tar::EntryType::Symlink {
        let depth = rel.components().count().saturating_sub(1);
        let inside = entry
            .link_name()
            .ok()
            .flatten()
            .is_some_and(|target| link_stays_inside(&target, depth));
        if !inside {
            return refuse("a symlink that leaves its directory");
        }
    }
    Ok(Some(Placement {
        host: host.clone(),
        rel,
    }))
}

/// Checks the archive at `path` without writing anything: its size and digest against
/// the manifest's, and every entry against the rules (for `dirs`, the writable
/// directories as guest path and host directory). One streamed read.
pub fn check(
    path: &Path,
    bytes: u64,
    digest: &Digest,
    dirs: &[(String, PathBuf)],
) -> Result<(), ArchiveError> {
    let file = std::fs::File::open(path).map_err(io("opening", path))?;
    let have = file.metadata().map_err(io("reading", path))?.len();
    if have != bytes {
        return Err(ArchiveError::Corrupt(format!(
            "{have} bytes, the manifest says {bytes}"
        )));
    }
    // Hashed as the buffer fills, in 1 MiB reads.
    let reader = BufReader::with_capacity(
        1 << 20,
        Hashing {
            inner: file,
            hasher: blake3::Hasher::new(),
            bytes: 0,
        },
    );
    let mut archive = tar::Archive::new(reader);
    // The first refusal wins, but the rest is still read so that the digest covers it.
    let mut refused = None;
    // Where earlier entries put symlinks: unpacking refuses anything under one.
    let mut links: std::collections::HashSet<PathBuf> = std::collections::HashSet::new();
    for entry in archive.entries().map_err(io("reading", path))? {
        let entry = entry.map_err(|e| ArchiveError::Corrupt(e.to_string()))?;
        let placed = place(&entry, dirs).and_then(|placement| {
            let Some(Placement { host, rel }) = placement else {
                return Ok(());
            };
            let at = host.join(rel);
            if at.ancestors().skip(1).any(|up| links.contains(up)) {
                return Err(ArchiveError::Refused {
                    entry: at.display().to_string(),
                    why: "under a symlink",
                });
            }
            if entry.header().entry_type() == tar::EntryType::Symlink {
                links.insert(at);
            }
            Ok(())
        });
        if let Err(e) = placed {
            refused.get_or_insert(e);
        }
    }
    let mut reader = archive.into_inner();
    std::io::copy(&mut reader, &mut std::io::sink()).map_err(io("reading", path))?;
    let reader = reader.into_inner();
    let found: Digest = reader.hasher.finalize().into();
    if reader.bytes != bytes || found != *digest {
        return Err(ArchiveError::Corrupt(
            "its BLAKE3 digest is not the manifest's".into(),
        ));
    }
    refused.map_or(Ok(()), Err)
}

/// `host/rel` if `rel` is plain names and no directory on the way is a symlink.
fn contained(host: &Path, rel: &Path) -> Option<PathBuf> {
    let mut dest = host.to_path_buf();
    let mut parts = rel.components().peekable();
    while let Some(part) = parts.next() {
        let Component::Normal(name) = part else {
            return None;
        };
        dest.push(name);
        let last = parts.peek().is_none();
        if !last && std::fs::symlink_metadata(&dest).is_ok_and(|m| m.file_type().is_symlink()) {
            return None;
        }
    }
    Some(dest)
}

/// Unpacks the archive at `path` into the writable directories `dirs` (guest path, host
/// directory), checking every entry again as it goes ([`check`] ran on what may since
/// have changed): nothing lands outside its directory, or is written through a symlink.
pub fn unpack(path: &Path, dirs: &[(String, PathBuf)]) -> Result<(), ArchiveError> {
    let file = std::fs::File::open(path).map_err(io("opening", path))?;
    let mut archive = tar::Archive::new(BufReader::with_capacity(1 << 20, file));
    archive.set_preserve_permissions(false);
    archive.set_unpack_xattrs(false);
    archive.set_overwrite(true);
    for entry in archive.entries().map_err(io("reading", path))? {
        let mut entry = entry.map_err(|e| ArchiveError::Corrupt(e.to_string()))?;
        let Some(placement) = place(&entry, dirs)? else {
            continue;
        };
        let name = entry
            .path()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let dest = contained(&placement.host, &placement.rel).ok_or(ArchiveError::Refused {
            entry: name,
            why: "under a symlink",
        })?;
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(io("unpacking", parent))?;
        }
        // Never through a symlink: one where this entry goes is replaced.
        if std::fs::symlink_metadata(&dest).is_ok_and(|m| m.file_type().is_symlink()) {
            std::fs::remove_file(&dest).map_err(io("unpacking", &dest))?;
        }
        entry.unpack(&dest).map_err(io("unpacking", &dest))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A writable /tmp for a fresh data directory under `root`.
    fn tmp_dir(root: &Path, name: &str) -> Vec<(String, PathBuf)> {
        let host = root.join(name);
        std::fs::create_dir_all(&host).unwrap();
        vec![("/tmp".to_string(), host)]
    }

    fn digest_of(path: &Path) -> (u64, Digest) {
        let bytes = std::fs::read(path).unwrap();
        (bytes.len() as u64, blake3::hash(&bytes).into())
    }

    #[test]
    fn writable_directories_round_trip_without_what_cannot_come_back() {
        let root = tempfile::tempdir().unwrap();
        let dirs = tmp_dir(root.path(), "a");
        let tmp = &dirs[0].1;
        std::fs::create_dir(tmp.join("sub")).unwrap();
        std::fs::write(tmp.join("sub/file"), b"data").unwrap();
        std::fs::write(tmp.join("suid"), b"x").unwrap();
        std::fs::set_permissions(tmp.join("suid"), PermissionsExt::from_mode(0o4755)).unwrap();
        std::os::unix::fs::symlink("sub/file", tmp.join("inside")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", tmp.join("absolute")).unwrap();
        std::os::unix::fs::symlink("../../x", tmp.join("sub/climbs")).unwrap();
        let _socket = std::os::unix::net::UnixListener::bind(tmp.join("app.sock")).unwrap();
        let archive = root.path().join("data");
        let written = create(&archive, &dirs).unwrap();
        assert_eq!((written.bytes, written.digest), digest_of(&archive));
        let mut skipped = written.skipped.clone();
        skipped.sort();
        assert_eq!(skipped, [tmp.join("absolute"), tmp.join("sub/climbs")]);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&archive), 0o600);

        let back = tmp_dir(root.path(), "b");
        check(&archive, written.bytes, &written.digest, &back).unwrap();
        unpack(&archive, &back).unwrap();
        let out = &back[0].1;
        assert_eq!(std::fs::read(out.join("sub/file")).unwrap(), b"data");
        assert_eq!(std::fs::read(out.join("inside")).unwrap(), b"data");
        assert_eq!(mode(&out.join("suid")), 0o755, "set-id bits are not kept");
        for gone in ["absolute", "sub/climbs", "app.sock"] {
            assert!(std::fs::symlink_metadata(out.join(gone)).is_err(), "{gone}");
        }
    }

    /// Files with holes (one that is all hole, one that ends in a hole, one of more runs
    /// than a header and an extended block of the map hold) are stored as their data only
    /// and come back with the same bytes and the same holes.
    #[test]
    fn sparse_files_cost_their_data_and_come_back_with_their_holes() {
        use std::os::unix::fs::{FileExt, MetadataExt};
        const MIB: u64 = 1 << 20;
        let root = tempfile::tempdir().unwrap();
        let dirs = tmp_dir(root.path(), "a");
        let tmp = &dirs[0].1;
        let sparse = |name: &str, size: u64, writes: &[u64]| {
            let file = std::fs::File::create(tmp.join(name)).unwrap();
            file.set_len(size).unwrap();
            for &at in writes {
                file.write_at(format!("data at {at}").as_bytes(), at)
                    .unwrap();
            }
        };
        sparse("hole", 256 * MIB, &[]);
        sparse("tail-hole", 256 * MIB, &[0, 100 * MIB]);
        let many: Vec<u64> = (0..40).map(|i| i * 2 * MIB + 4096).collect();
        sparse("many-runs", 100 * MIB, &many);
        std::fs::write(tmp.join("dense"), vec![7u8; 100_000]).unwrap();
        let archive = root.path().join("data");
        let written = create(&archive, &dirs).unwrap();
        assert!(
            written.bytes < 2 * MIB,
            "{} bytes of archive for 612 MiB of mostly holes",
            written.bytes
        );

        let back = tmp_dir(root.path(), "b");
        check(&archive, written.bytes, &written.digest, &back).unwrap();
        unpack(&archive, &back).unwrap();
        for name in ["hole", "tail-hole", "many-runs", "dense"] {
            let (a, b) = (tmp.join(name), back[0].1.join(name));
            let (ma, mb) = (
                std::fs::metadata(&a).unwrap(),
                std::fs::metadata(&b).unwrap(),
            );
            assert_eq!(ma.len(), mb.len(), "{name}");
            assert!(mb.blocks() <= ma.blocks() + 64, "{name} lost its holes");
            let mut offsets = many.clone();
            offsets.extend([0, 100 * MIB, ma.len().saturating_sub(4096)]);
            for at in offsets.into_iter().filter(|&at| at < ma.len()) {
                let (mut x, mut y) = ([0u8; 4096], [0u8; 4096]);
                let n = std::fs::File::open(&a)
                    .unwrap()
                    .read_at(&mut x, at)
                    .unwrap();
                std::fs::File::open(&b)
                    .unwrap()
                    .read_exact_at(&mut y[..n], at)
                    .unwrap();
                assert_eq!(x[..n], y[..n], "{name} at {at}");
            }
        }
    }

    /// An archive of one entry with a raw name (no checks), and what it holds.
    fn raw_archive(path: &Path, name: &[u8], kind: tar::EntryType, link: &[u8], mode: u32) {
        let mut header = tar::Header::new_old();
        header.as_old_mut().name[..name.len()].copy_from_slice(name);
        header.as_old_mut().linkname[..link.len()].copy_from_slice(link);
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_size(if kind == tar::EntryType::Regular {
            4
        } else {
            0
        });
        header.set_cksum();
        let mut builder = tar::Builder::new(std::fs::File::create(path).unwrap());
        let data: &[u8] = if kind == tar::EntryType::Regular {
            b"evil"
        } else {
            b""
        };
        builder.append(&header, data).unwrap();
        builder.finish().unwrap();
    }

    #[test]
    fn hostile_entries_are_refused_before_and_during_unpacking() {
        use tar::EntryType::{Block, Char, Link, Regular, Symlink};
        let root = tempfile::tempdir().unwrap();
        let dirs = tmp_dir(root.path(), "data");
        let archive = root.path().join("data.tar");
        type Case<'a> = (&'a [u8], tar::EntryType, &'a [u8], u32, &'a str);
        let cases: [Case; 9] = [
            (b"tmp/../../escape", Regular, b"", 0o644, "'..'"),
            (b"/tmp/abs", Regular, b"", 0o644, "absolute"),
            (b"tmp/hard", Link, b"/etc/shadow", 0o644, "hard link"),
            (b"tmp/link", Symlink, b"/etc", 0o777, "leaves its directory"),
            (
                b"tmp/a/link",
                Symlink,
                b"../../..",
                0o777,
                "leaves its directory",
            ),
            (b"tmp/null", Char, b"", 0o666, "device node"),
            (b"tmp/disk", Block, b"", 0o666, "device node"),
            (b"tmp/suid", Regular, b"", 0o4755, "set-user-ID"),
            (b"etc/passwd", Regular, b"", 0o644, "outside the writable"),
        ];
        // A symlink that stays inside, then an entry through it.
        let mut builder = tar::Builder::new(std::fs::File::create(&archive).unwrap());
        let mut link = tar::Header::new_gnu();
        link.set_entry_type(tar::EntryType::Symlink);
        link.set_size(0);
        link.set_mode(0o777);
        builder.append_link(&mut link, "tmp/dir", "sub").unwrap();
        let mut file = tar::Header::new_gnu();
        file.set_size(4);
        file.set_mode(0o644);
        builder
            .append_data(&mut file, "tmp/dir/x", &b"evil"[..])
            .unwrap();
        builder.finish().unwrap();
        drop(builder);
        let (bytes, digest) = digest_of(&archive);
        let error = check(&archive, bytes, &digest, &dirs)
            .unwrap_err()
            .to_string();
        assert!(error.contains("under a symlink"), "{error}");
        let error = unpack(&archive, &dirs).unwrap_err().to_string();
        assert!(error.contains("under a symlink"), "{error}");
        std::fs::remove_file(dirs[0].1.join("dir")).unwrap();
        for (name, kind, link, mode, why) in cases {
            raw_archive(&archive, name, kind, link, mode);
            let (bytes, digest) = digest_of(&archive);
            let error = check(&archive, bytes, &digest, &dirs)
                .unwrap_err()
                .to_string();
            assert!(error.contains(why), "{name:?}: {error}");
            let error = unpack(&archive, &dirs).unwrap_err().to_string();
            assert!(error.contains(why), "{name:?}: {error}");
            assert_eq!(
                std::fs::read_dir(&dirs[0].1).unwrap().count(),
                0,
                "{name:?}"
            );
        }
        assert!(!root.path().join("escape").exists());
    }

    #[test]
    fn a_changed_archive_is_corrupt_and_nothing_is_written_through_a_symlink() {
        let root = tempfile::tempdir().unwrap();
        let dirs = tmp_dir(root.path(), "a");
        std::fs::write(dirs[0].1.join("f"), b"new").unwrap();
        let archive = root.path().join("data");
        let written = create(&archive, &dirs).unwrap();
        let (bytes, digest) = (written.bytes, written.digest);
        let mut other = digest;
        other[0] ^= 1;
        let error = check(&archive, bytes, &other, &dirs).unwrap_err();
        assert!(error.to_string().contains("digest"), "{error}");
        let error = check(&archive, bytes + 1, &digest, &dirs).unwrap_err();
        assert!(matches!(error, ArchiveError::Corrupt(_)), "{error}");

        let back = tmp_dir(root.path(), "b");
        let outside = root.path().join("outside");
        std::fs::write(&outside, b"host file").unwrap();
        std::os::unix::fs::symlink(&outside, back[0].1.join("f")).unwrap();
        unpack(&archive, &back).unwrap();
        assert_eq!(std::fs::read(&outside).unwrap(), b"host file");
        assert_eq!(std::fs::read(back[0].1.join("f")).unwrap(), b"new");
    }
}
