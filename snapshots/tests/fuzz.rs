//! Fuzzing the readers of untrusted snapshot objects with proptest, bounded to a few
//! seconds: the manifest decoder (arbitrary bytes, damaged manifests, and payloads signed
//! with the key, as a key holder's bug could write them) and the data archive reader. None
//! may panic; what the decoder accepts must be safe for the code that uses it.

use picocenter_snapshots::archive;
use picocenter_snapshots::chain::{covered, resolve_all};
use picocenter_snapshots::format::{
    AppRecord, BackingRecord, ClockRecord, FdRecord, FileRecord, Manifest, PageRun, PageSource,
    PortSet, ProcessPart, ProcessRecord, SharedMemoryRecord, SignalRecord, ThreadRecord,
    TreeRecord, UserContext, VmaRecord, VpnRange, FORMAT_VERSION, HEADER_SIZE, MAGIC,
};
use picocenter_snapshots::pagefile::chunk_pages_of;
use picocenter_snapshots::SnapshotKey;
use proptest::prelude::*;
use std::path::PathBuf;

fn key() -> SnapshotKey {
    SnapshotKey::from_bytes([9; 32])
}

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        // Failures are reported as found: shrinking long inputs could take minutes.
        max_shrink_iters: 256,
        ..ProptestConfig::default()
    }
}

/// A valid manifest using every kind of record.
fn sample() -> Manifest {
    let socket = |fd, domain| FdRecord {
        fd,
        cloexec: true,
        nonblocking: false,
        shared: fd as u64,
        object: 0,
        file: FileRecord::Socket {
            domain,
            kind: libc::SOCK_STREAM,
            bound: Some("0.0.0.0:80".into()),
            unix_name: None,
            connected_to: None,
            listening: Some(16),
            options: vec![(1, 2, vec![1, 0, 0, 0])],
            closed: false,
            peer: 0,
            queued: Vec::new(),
        },
    };
    let area = |start: u64, pages: u64, backing| VmaRecord {
        start,
        end: start + pages * 4096,
        prot: 3,
        role: 0,
        backing,
    };
    Manifest {
        id: "s2".into(),
        parent: Some("s1".into()),
        ancestors: vec!["s1".into(), "s0".into()],
        created_unix_ms: 1_700_000_000_000,
        app: AppRecord {
            name: "app".into(),
            image: Some("img".into()),
            root: "/roots/app".into(),
            writable: vec!["/tmp".into(), "/var/log".into()],
            memory_mib: 64,
            address: Some("127.0.0.9".into()),
            program: "/bin/app".into(),
            root_from: None,
        },
        cpu: Default::default(),
        context: UserContext {
            xsave: vec![0; 4096],
            ..Default::default()
        },
        vmas: vec![
            area(
                0x40_0000,
                16,
                BackingRecord::File {
                    path: "/bin/app".into(),
                    offset: 0,
                    immutable: true,
                },
            ),
            area(0x100_0000, 64, BackingRecord::Anonymous),
        ],
        pages: vec![
            PageRun {
                vpn: 0x400,
                count: 4,
                source: PageSource::File,
            },
            PageRun {
                vpn: 0x1000,
                count: 8,
                source: PageSource::Stored { index: 0 },
            },
            PageRun {
                vpn: 0x1008,
                count: 8,
                source: PageSource::Parent,
            },
            PageRun {
                vpn: 0x1010,
                count: 4,
                source: PageSource::Zero,
            },
        ],
        page_count: 8,
        chunk_pages: 4,
        chunk_digests: vec![[1; 32], [2; 32]],
        activeset_prefix: 2,
        activeset: vec![VpnRange {
            vpn: 0x1000,
            count: 2,
        }],
        port_sets: vec![PortSet {
            port: 80,
            pages: vec![VpnRange {
                vpn: 0x1000,
                count: 1,
            }],
        }],
        files: vec![
            FdRecord {
                fd: 0,
                cloexec: false,
                nonblocking: false,
                shared: 100,
                object: 0,
                file: FileRecord::Stdio(0),
            },
            FdRecord {
                fd: 1,
                cloexec: false,
                nonblocking: false,
                shared: 101,
                object: 0,
                file: FileRecord::Pipe {
                    pipe: 7,
                    write_end: false,
                    data: b"buffered".to_vec(),
                },
            },
            socket(3, libc::AF_INET),
            FdRecord {
                fd: 4,
                cloexec: true,
                nonblocking: true,
                shared: 104,
                object: 0,
                file: FileRecord::Epoll {
                    registrations: vec![(3, 1, 3)],
                },
            },
            FdRecord {
                fd: 5,
                cloexec: true,
                nonblocking: true,
                shared: 105,
                object: 0,
                file: FileRecord::TimerFd {
                    clock: 1,
                    remaining_ns: 5_000_000,
                    interval_ns: 0,
                },
            },
        ],
        signals: SignalRecord {
            actions: vec![[0; 4]; 64],
            alarm: (1_000_000, 0),
            ..Default::default()
        },
        process: ProcessRecord {
            cwd: "/".into(),
            umask: 0o022,
            brk_start: 0x50_0000,
            brk: 0x50_1000,
            tid: 2,
            robust_list: 0,
            clear_child_tid: 0,
            restart: Some((35, 0x40_1000, 2_000_000_000)),
            credentials: picocenter_snapshots::format::CredentialsRecord {
                uids: [0, 105, 0, 105],
                gids: [0, 109, 0, 109],
                groups: vec![8, 109],
            },
        },
        threads: vec![ThreadRecord {
            tid: 3,
            context: UserContext {
                rip: 0x40_1000,
                xsave: vec![0; 4096],
                ..Default::default()
            },
            in_call: true,
            restart: Some((202, 0x40_1000, 3_000_000_000)),
            ..Default::default()
        }],
        clock: ClockRecord {
            monotonic_ns: 1_000_000_000,
            realtime_ns: 1_700_000_000_000_000_000,
        },
        data_bytes: 0,
        data_digest: [0; 32],
        stats: Default::default(),
        prefetched: Some(picocenter_snapshots::format::PrefetchRecord {
            from: "s1".into(),
            port: Some(80),
            accessed_preset: false,
        }),
        // A second process: a worker sharing the listening socket and a shared page.
        tree: Some(TreeRecord {
            pid: 2,
            pgid: 2,
            sid: 2,
            next_pid: 9,
            others: vec![ProcessPart {
                pid: 5,
                ppid: 2,
                pgid: 2,
                sid: 2,
                exe: "/bin/app".into(),
                run_as: "/bin/app".into(),
                cmdline: vec!["app".into(), "worker".into()],
                context: UserContext {
                    xsave: vec![0; 4096],
                    ..Default::default()
                },
                vmas: vec![
                    area(0x100_0000, 64, BackingRecord::Anonymous),
                    area(
                        0x200_0000,
                        1,
                        BackingRecord::Shared {
                            path: "/dev/zero (deleted)".into(),
                            offset: 0,
                            memory: 77,
                        },
                    ),
                ],
                pages: vec![
                    PageRun {
                        vpn: 0x1000,
                        count: 2,
                        source: PageSource::Stored { index: 0 },
                    },
                    PageRun {
                        vpn: 0x1002,
                        count: 4,
                        source: PageSource::Parent,
                    },
                ],
                activeset: vec![VpnRange {
                    vpn: 0x1000,
                    count: 1,
                }],
                files: vec![socket(3, libc::AF_INET)],
                signals: SignalRecord {
                    actions: vec![[0; 4]; 64],
                    ..Default::default()
                },
                process: ProcessRecord {
                    cwd: "/".into(),
                    tid: 5,
                    ..Default::default()
                },
                threads: Vec::new(),
                shared_memory: Vec::new(),
            }],
        }),
        shared_memory: vec![SharedMemoryRecord {
            key: 77,
            data: vec![7; 4096],
        }],
    }
}

/// A manifest file around `payload`, with a correct length and MAC.
fn signed(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_SIZE + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    let mac = key().sign(&[&out, payload]);
    out.extend_from_slice(&mac);
    out.extend_from_slice(payload);
    out
}

/// Uses an accepted manifest the way restore, compaction and the worker do; none of it may
/// panic or overflow.
fn use_accepted(m: &Manifest) {
    m.validate().unwrap();
    let _ = m.page_file_bytes();
    let _ = m.wake_at_unix_ms();
    let mut chunk = 0;
    while let Some(pages) = chunk_pages_of(m, chunk) {
        assert!(pages.end <= m.page_count);
        chunk += 1;
    }
    assert_eq!(chunk as usize, m.chunk_digests.len());
    // A chain of one: a manifest with `Parent` runs names a parent, which is absent here.
    if m.parent.is_none() {
        let pieces = resolve_all(std::slice::from_ref(m)).unwrap();
        let total: u64 = pieces.iter().map(|p| p.count).sum();
        assert!(total <= picocenter_snapshots::bounds::MAX_PAGES);
    }
    for run in &m.pages {
        let _ = covered(&m.activeset, run.vpn);
    }
    for part in m.tree.iter().flat_map(|t| &t.others) {
        let view = m.part_view(part);
        view.validate().unwrap();
        let _ = Manifest::part_chain(std::slice::from_ref(m), part.pid);
        if view.parent.is_none() {
            let _ = resolve_all(std::slice::from_ref(&view)).unwrap();
        }
    }
}

/// Applies `edits` (position, new byte; or a cut) to `bytes`.
fn mutate(bytes: &mut Vec<u8>, edits: &[(usize, u8)], cut: Option<usize>) {
    for &(at, value) in edits {
        if !bytes.is_empty() {
            let at = at % bytes.len();
            bytes[at] = value;
        }
    }
    if let Some(cut) = cut {
        bytes.truncate(cut % (bytes.len() + 1));
    }
}

#[test]
fn the_sample_is_valid() {
    let m = sample();
    let decoded = Manifest::decode(&m.encode(&key()), &key()).unwrap();
    assert_eq!(decoded, m);
    use_accepted(&decoded);
}

proptest! {
    #![proptest_config(config(3000))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        prop_assert!(Manifest::decode(&bytes, &key()).is_err());
    }

    #[test]
    fn damaged_manifests_are_refused(
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        cut in proptest::option::of(any::<usize>()),
    ) {
        let original = sample().encode(&key());
        let mut bytes = original.clone();
        mutate(&mut bytes, &edits, cut);
        let result = Manifest::decode(&bytes, &key());
        prop_assert!(result.is_err() || bytes == original);
    }

    #[test]
    fn signed_payloads_never_panic_and_what_is_accepted_is_safe(
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
        cut in proptest::option::of(any::<usize>()),
    ) {
        let original = sample().encode(&key());
        let mut payload = original[HEADER_SIZE..].to_vec();
        // Edits away from the 4 KiB of FPU state, where any bytes are fine.
        let fields: Vec<(usize, u8)> = edits
            .iter()
            .map(|&(at, value)| {
                let at = at % payload.len();
                (if (300..4400).contains(&at) { at % 300 } else { at }, value)
            })
            .collect();
        mutate(&mut payload, &fields, cut);
        if let Ok(m) = Manifest::decode(&signed(&payload), &key()) {
            use_accepted(&m);
        }
    }

    #[test]
    fn signed_manifests_with_extreme_numbers_never_panic(
        vpn in any::<u64>(),
        count in any::<u64>(),
        index in any::<u64>(),
        page_count in any::<u64>(),
        chunk_pages in any::<u64>(),
        start in any::<u64>(),
        end in any::<u64>(),
        fd in any::<i32>(),
        domain in any::<i32>(),
        memory in any::<u64>(),
        clock in any::<u64>(),
    ) {
        let mut m = sample();
        m.parent = None;
        m.ancestors.clear();
        m.pages = vec![PageRun { vpn, count, source: PageSource::Stored { index } }];
        m.page_count = page_count;
        m.chunk_pages = chunk_pages;
        m.chunk_digests = vec![[0; 32]; 3];
        m.vmas[1].start = start;
        m.vmas[1].end = end;
        m.files[2].fd = fd;
        if let FileRecord::Socket { domain: d, .. } = &mut m.files[2].file {
            *d = domain;
        }
        m.app.memory_mib = memory;
        m.clock.monotonic_ns = clock;
        if let Ok(m) = Manifest::decode(&m.encode(&key()), &key()) {
            use_accepted(&m);
        }
    }
}

/// A small valid data archive of a writable /tmp.
fn sample_archive(dir: &std::path::Path) -> Vec<u8> {
    let tmp = dir.join("source");
    std::fs::create_dir_all(tmp.join("sub")).unwrap();
    std::fs::write(tmp.join("sub/file"), b"contents").unwrap();
    std::os::unix::fs::symlink("sub/file", tmp.join("link")).unwrap();
    let path = dir.join("data");
    archive::create(&path, &[("/tmp".into(), tmp)]).unwrap();
    std::fs::read(path).unwrap()
}

proptest! {
    #![proptest_config(config(400))]

    #[test]
    fn damaged_data_archives_never_panic_or_escape(
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        cut in proptest::option::of(any::<usize>()),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = sample_archive(dir.path());
        mutate(&mut bytes, &edits, cut);
        let path = dir.path().join("damaged");
        std::fs::write(&path, &bytes).unwrap();
        let into = dir.path().join("restored/tmp");
        std::fs::create_dir_all(&into).unwrap();
        let dirs: Vec<(String, PathBuf)> = vec![("/tmp".into(), into.clone())];
        let digest: [u8; 32] = blake3::hash(&bytes).into();
        let _ = archive::check(&path, bytes.len() as u64, &digest, &dirs);
        let _ = archive::unpack(&path, &dirs);
        // Nothing lands beside the writable directory.
        let beside: Vec<_> = std::fs::read_dir(dir.path().join("restored"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        prop_assert_eq!(beside, vec![std::ffi::OsString::from("tmp")]);
    }
}
