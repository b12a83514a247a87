//! A tampered cold store: every object in it is the attacker's. Modified manifests (with
//! and without the cluster key), a wrong key, a manifest swapped in from another app,
//! flipped page-file bytes and hostile data archives are each refused before anything is
//! built (the restore's "verified" step is never reached, nothing is unpacked, no control
//! socket appears) with a message that says why.

mod common;

use common::*;
use picocenter_snapshots::format::{BackingRecord, FdRecord, FileRecord, Manifest, VmaRecord};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A snapshot of counter-http with a writable /tmp holding one file, in a fresh directory.
fn sample(name: &str, ip: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(data.path().join("tmp")).unwrap();
    std::fs::write(data.path().join("tmp/note"), b"kept").unwrap();
    let data_dir = data.path().to_str().unwrap();
    let extra = ["--writable", "/tmp", "--data-dir", data_dir];
    let server = Server::start("counter-http", name, ip, 80, &extra);
    // Made again by the snapshot, as a store makes its directory.
    std::fs::remove_dir(dir.path()).unwrap();
    let mut cmd = picocenter();
    cmd.args(["snapshot", "create", name, "-o"])
        .arg(dir.path())
        .arg("--stop");
    let out = run_with_limit(&mut cmd, Duration::from_secs(60));
    assert!(out.status.success(), "{}", describe(&out));
    server.stop_waiting();
    assert_private(dir.path());
    dir
}

/// A copy of the snapshot directory `from`, to damage.
fn copy(from: &Path) -> tempfile::TempDir {
    let to = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.path().join(entry.file_name())).unwrap();
    }
    to
}

fn head(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("HEAD"))
        .unwrap()
        .trim()
        .to_string()
}

fn object(dir: &Path, kind: &str) -> PathBuf {
    dir.join(format!("{}.{kind}", head(dir)))
}

/// The newest manifest of `dir`, decoded with the cluster key.
fn manifest(dir: &Path) -> Manifest {
    Manifest::decode(
        &std::fs::read(object(dir, "manifest")).unwrap(),
        &snapshot_key(),
    )
    .unwrap()
}

/// Writes `m` as the newest manifest of `dir`, signed with the cluster key: what a key
/// holder's bug, or a leaked key, could write.
fn sign(dir: &Path, m: &Manifest) {
    std::fs::write(object(dir, "manifest"), m.encode(&snapshot_key())).unwrap();
}

/// `snapshot restore` of `dir` as app `name` the way a worker does it (every setting
/// explicit), its writable directories in `data`, for at most `seconds`.
fn restore(dir: &Path, name: &str, data: &Path, seconds: &str) -> std::process::Command {
    let mut cmd = picocenter();
    cmd.args(["snapshot", "restore"]).arg(dir);
    let image = ["--image", "counter-http", "--writable", "/tmp"];
    cmd.args(image).args(["--name", name]);
    cmd.arg("--data-dir").arg(data);
    cmd.args(["--timeout", seconds]);
    cmd
}

/// Restores `dir` as app `name` plus `extra`, and checks that it is refused before
/// anything was built, saying `why`.
fn refused(dir: &Path, name: &str, extra: &[&str], why: &str) {
    let data = tempfile::tempdir().unwrap();
    let mut cmd = restore(dir, name, data.path(), "5");
    cmd.args(extra);
    cmd.env("RUST_LOG", "picocenter_vmm=debug");
    let out = run_with_limit(&mut cmd, Duration::from_secs(30));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{why}: {}", describe(&out));
    assert!(stderr.contains(why), "expected {why:?}: {}", describe(&out));
    assert!(
        !stderr.contains("restore: verified"),
        "{why}: the restore got past its checks: {stderr}"
    );
    let unpacked = std::fs::read_dir(data.path().join("tmp")).map_or(0, |d| d.count());
    assert_eq!(unpacked, 0, "{why}: the data archive was unpacked");
    assert!(
        !control_socket_live(name),
        "{why}: the app's control socket appeared"
    );
}

/// The first socket record of a snapshot, with `domain` as its family.
fn socket(fd: i32, domain: i32) -> FdRecord {
    FdRecord {
        fd,
        cloexec: false,
        nonblocking: false,
        shared: 1000,
        object: 0,
        file: FileRecord::Socket {
            domain,
            kind: libc::SOCK_RAW,
            bound: None,
            unix_name: None,
            connected_to: None,
            listening: None,
            options: vec![],
            closed: false,
            peer: 0,
            queued: Vec::new(),
        },
    }
}

#[test]
fn changed_manifests_a_wrong_key_and_swapped_snapshots_are_refused() {
    let name = "test-tamper-key";
    let good = sample(name, "127.0.12.1");
    let other = sample("test-tamper-other", "127.0.12.2");

    // A byte of the payload changed by someone without the key.
    let dir = copy(good.path());
    let mut bytes = std::fs::read(object(dir.path(), "manifest")).unwrap();
    let at = bytes.len() - 100;
    bytes[at] ^= 0x20;
    std::fs::write(object(dir.path(), "manifest"), bytes).unwrap();
    refused(dir.path(), name, &[], "corrupt or forged");

    // The right snapshot checked with another key.
    let key = tempfile::tempdir().unwrap();
    let wrong = key.path().join("wrong.key");
    picocenter_snapshots::SnapshotKey::load_or_create(&wrong).unwrap();
    let wrong_key = wrong.to_str().unwrap();
    refused(
        good.path(),
        name,
        &["--key-file", wrong_key],
        "corrupt or forged",
    );

    // Another app's genuine snapshot, made the newest of this app's store.
    let dir = copy(good.path());
    let theirs = head(other.path());
    for kind in ["manifest", "pages", "data"] {
        let file = format!("{theirs}.{kind}");
        std::fs::copy(other.path().join(&file), dir.path().join(&file)).unwrap();
    }
    std::fs::write(dir.path().join("HEAD"), format!("{theirs}\n")).unwrap();
    refused(dir.path(), name, &[], "its name is \"test-tamper-other\"");

    // Another app's genuine manifest under this app's snapshot id.
    let dir = copy(good.path());
    std::fs::copy(
        object(other.path(), "manifest"),
        object(dir.path(), "manifest"),
    )
    .unwrap();
    refused(dir.path(), name, &[], "put in the place of another");

    // The genuine snapshot, restored as another app or with other settings.
    refused(good.path(), "test-tamper-else", &[], "its name is");
    refused(good.path(), name, &["--memory", "32"], "memory");
    refused(
        good.path(),
        name,
        &["--writable", "/var"],
        "writable directories",
    );
}

#[test]
fn every_field_class_is_bounded_even_under_the_key() {
    let name = "test-tamper-fields";
    let good = sample(name, "127.0.12.3");
    type Case = (&'static str, Box<dyn Fn(&mut Manifest)>, &'static str);
    let cases: Vec<Case> = vec![
        (
            "a writable directory that climbs out of the data directory",
            Box::new(|m| m.app.writable = vec!["/tmp/../../etc".into()]),
            "not a plain absolute path",
        ),
        (
            "another writable directory",
            Box::new(|m| m.app.writable = vec!["/etc".into()]),
            "writable directories",
        ),
        (
            "the host's root and no image",
            Box::new(|m| {
                m.app.root = "/".into();
                m.app.image = None;
            }),
            "its image is None",
        ),
        (
            "an app name that climbs out of the run directory",
            Box::new(|m| m.app.name = "../../x".into()),
            "is not a plain name",
        ),
        (
            "an AF_NETLINK socket",
            Box::new(|m| m.files.push(socket(900, libc::AF_NETLINK))),
            "socket family 16",
        ),
        (
            "an AF_PACKET socket",
            Box::new(|m| m.files.push(socket(901, libc::AF_PACKET))),
            "socket family 17",
        ),
        (
            "a fd number past any table",
            Box::new(|m| m.files.push(socket(1 << 20, libc::AF_INET))),
            "fd 1048576",
        ),
        (
            "a page run of 2^36 pages",
            Box::new(|m| m.pages[0].count = 1 << 36),
            "out of order",
        ),
        (
            "chunks of 2^62 pages",
            Box::new(|m| m.chunk_pages = 1 << 62),
            "chunks of 4611686018427387904 pages",
        ),
        (
            "a memory area past user space",
            Box::new(|m| {
                m.vmas.push(VmaRecord {
                    start: 0x7fff_ffff_f000,
                    end: 0xffff_8000_0000_0000,
                    prot: 3,
                    role: 0,
                    backing: BackingRecord::Anonymous,
                })
            }),
            "outside user space",
        ),
        (
            "more resident pages than the app's 16 MiB",
            Box::new(|m| {
                // A free gigabyte between the program and the mmap area.
                let start = 0x1000_0000_0000;
                m.vmas.push(VmaRecord {
                    start,
                    end: start + (1 << 30),
                    prot: 3,
                    role: 0,
                    backing: BackingRecord::Anonymous,
                });
                m.vmas.sort_by_key(|v| v.start);
                m.pages.push(picocenter_snapshots::format::PageRun {
                    vpn: start / 4096,
                    count: 5000,
                    source: picocenter_snapshots::format::PageSource::Zero,
                });
                m.pages.sort_by_key(|r| r.vpn);
            }),
            "over the 4096 pages of the app's memory",
        ),
    ];
    for (what, change, why) in cases {
        let dir = copy(good.path());
        let mut m = manifest(dir.path());
        change(&mut m);
        sign(dir.path(), &m);
        eprintln!("case: {what}");
        refused(dir.path(), name, &[], why);
    }
    // Left to its defaults, a restore never takes the host's root from the snapshot.
    let dir = copy(good.path());
    let mut m = manifest(dir.path());
    m.app.root = "/".into();
    m.app.image = None;
    sign(dir.path(), &m);
    let mut cmd = picocenter();
    cmd.args(["snapshot", "restore"]).arg(dir.path());
    let out = run_with_limit(&mut cmd, Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("give the app's root"),
        "{}",
        describe(&out)
    );
}

#[test]
fn flipped_page_bytes_are_refused_where_pages_are_verified() {
    let name = "test-tamper-pages";
    let good = sample(name, "127.0.12.4");
    let m = manifest(good.path());
    assert!(m.activeset_prefix > 0, "the sample has an ActiveSet");
    // One bit in the ActiveSet prefix (read up front by activeset), one at the end.
    for (at, modes) in [
        (100, &["eager", "activeset"][..]),
        (m.page_count * 4096 - 1, &["eager"][..]),
    ] {
        let dir = copy(good.path());
        let pages = object(dir.path(), "pages");
        let mut bytes = std::fs::read(&pages).unwrap();
        bytes[at as usize] ^= 1;
        std::fs::write(&pages, bytes).unwrap();
        for mode in modes {
            refused(dir.path(), name, &["--mode", mode], "fails its checksum");
        }
    }
}

/// A tar archive of one raw entry (no checks on its name or link), for hostile cases.
fn raw_tar(name: &[u8], kind: tar::EntryType, link: &[u8], mode: u32) -> Vec<u8> {
    let mut header = tar::Header::new_old();
    header.as_old_mut().name[..name.len()].copy_from_slice(name);
    header.as_old_mut().linkname[..link.len()].copy_from_slice(link);
    header.set_entry_type(kind);
    header.set_mode(mode);
    let data: &[u8] = if kind == tar::EntryType::Regular {
        b"evil"
    } else {
        b""
    };
    header.set_size(data.len() as u64);
    header.set_cksum();
    let mut builder = tar::Builder::new(Vec::new());
    builder.append(&header, data).unwrap();
    builder.into_inner().unwrap()
}

#[test]
fn hostile_data_archives_are_refused_before_anything_is_unpacked() {
    use tar::EntryType::{Char, Link, Regular, Symlink};
    let name = "test-tamper-data";
    let good = sample(name, "127.0.12.5");
    let outside = tempfile::tempdir().unwrap();
    let target = outside.path().join("host-file");
    std::fs::write(&target, b"host").unwrap();
    let target = target.to_str().unwrap().as_bytes().to_vec();
    type Case<'a> = (&'a [u8], tar::EntryType, &'a [u8], u32, &'a str);
    let cases: [Case; 6] = [
        (b"tmp/link", Link, &target, 0o644, "a hard link"),
        (b"tmp/sym", Symlink, &target, 0o777, "leaves its directory"),
        (b"tmp/../../x", Regular, b"", 0o644, "'..'"),
        (b"/tmp/x", Regular, b"", 0o644, "absolute"),
        (b"tmp/null", Char, b"", 0o666, "device node"),
        (b"tmp/suid", Regular, b"", 0o4755, "set-user-ID"),
    ];
    for (entry, kind, link, mode, why) in cases {
        // Changed behind the key's back: the digest no longer matches.
        let dir = copy(good.path());
        let archive = raw_tar(entry, kind, link, mode);
        std::fs::write(object(dir.path(), "data"), &archive).unwrap();
        refused(dir.path(), name, &[], "data archive is corrupt");
        // With a manifest that vouches for it: the entry itself is refused.
        let mut m = manifest(dir.path());
        m.data_bytes = archive.len() as u64;
        m.data_digest = blake3::hash(&archive).into();
        sign(dir.path(), &m);
        refused(dir.path(), name, &[], why);
    }
    assert_eq!(
        std::fs::read(outside.path().join("host-file")).unwrap(),
        b"host"
    );
    // One byte of the genuine archive changed: same size, another digest.
    let dir = copy(good.path());
    let data = object(dir.path(), "data");
    let mut bytes = std::fs::read(&data).unwrap();
    bytes[1024] ^= 1; // the first byte of tmp/note
    std::fs::write(&data, bytes).unwrap();
    refused(dir.path(), name, &[], "BLAKE3 digest is not the manifest's");
    // A missing archive that the manifest says is there.
    let dir = copy(good.path());
    std::fs::remove_file(object(dir.path(), "data")).unwrap();
    refused(dir.path(), name, &[], "it is missing");
}

#[test]
fn the_untampered_sample_restores_with_its_data() {
    let name = "test-tamper-good";
    let good = sample(name, "127.0.12.6");
    let data = tempfile::tempdir().unwrap();
    let mut cmd = restore(good.path(), name, data.path(), "3");
    let out = run_with_limit(&mut cmd, Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(124), "{}", describe(&out));
    assert_eq!(
        std::fs::read(data.path().join("tmp/note")).unwrap(),
        b"kept"
    );
}
