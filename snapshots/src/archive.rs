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
/// symlink, at the size it has.
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
    let mut head = header(&meta, tar::EntryType::Regular);
    head.set_size(meta.len());
    builder
        .append_data(&mut head, name, file.take(meta.len()))
        .map_err(io("archiving", host))
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
    if !(directory || kind == tar::EntryType::Regular || kind == tar::EntryType::Symlink) {
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
