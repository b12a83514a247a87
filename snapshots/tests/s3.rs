//! The S3 store against a real S3-compatible server on loopback: moto's server
//! (`python3 -m moto.server`, installed by scripts/setup.sh), started and stopped here.
//!
//! One test runs every case against one server, in order, because starting the server is
//! the slow part and the cases change the environment (credentials).

use picocenter_snapshots::chain::ChainHint;
use picocenter_snapshots::feed::{self, ChunkId};
use picocenter_snapshots::format::{
    AppRecord, BackingRecord, PageRun, PageSource, ProcessRecord, UserContext, VmaRecord,
};
use picocenter_snapshots::pagefile::{self, PageFileWriter};
use picocenter_snapshots::s3::{S3Config, S3Connection, S3Store};
use picocenter_snapshots::store::copy_chain;
use picocenter_snapshots::{LocalStore, Manifest, ManifestError, SnapshotKey, Store, StoreError};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The wide-area link of the workspace's end-to-end tests (issue #14).
#[allow(dead_code)]
#[path = "../../tests/common/wan.rs"]
mod wan;

const BUCKET: &str = "picocenter-test";

/// The cluster key these snapshots are authenticated with.
fn key() -> SnapshotKey {
    SnapshotKey::from_bytes([5; 32])
}
const MIB: f64 = (1 << 20) as f64;

/// The moto server, killed on drop.
struct Moto {
    child: Child,
    endpoint: String,
    log: PathBuf,
}

impl Moto {
    /// Starts moto on a free loopback port and waits (at most 30 s) until it answers.
    fn start(dir: &Path) -> Moto {
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|listener| listener.local_addr())
            .expect("a free loopback port")
            .port();
        let log = dir.join("moto.log");
        let output = std::fs::File::create(&log).expect("moto log file");
        let child = Command::new("python3")
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(output.try_clone().expect("moto log file"))
            .stderr(output)
            .spawn()
            .expect("starting python3 -m moto.server (scripts/setup.sh installs moto[server])");
        let mut moto = Moto {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
            log,
        };
        moto.wait_until_ready(SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
        moto
    }

    fn wait_until_ready(&mut self, address: SocketAddr) {
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(30) {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("moto server exited ({status}): {}", self.log_text());
            }
            if TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_ok() {
                eprintln!(
                    "moto server up at {} in {:?}",
                    self.endpoint,
                    started.elapsed()
                );
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "moto server did not answer within 30 s: {}",
            self.log_text()
        );
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The store's configuration with deduplication off, as the cases before
/// `page_files_of_one_image_are_stored_once` expect (their objects are counted and removed).
fn config(endpoint: &str) -> S3Config {
    S3Config {
        endpoint: Some(endpoint.to_string()),
        bucket: BUCKET.into(),
        prefix: "apps".into(),
        path_style: true,
        access_key: Some("testing".into()),
        secret_key: Some("testing".into()),
        dedup: false,
        ..Default::default()
    }
}

/// Writes `count` pages of a pseudo-random pattern (seeded by `seed`) to `path` with the
/// real page file writer, and returns a manifest describing it.
fn page_file(path: &Path, id: &str, parent: Option<&str>, count: u64, seed: u64) -> Manifest {
    write_pages(path, id, parent, &random_pages(count, seed))
}

/// `count` pages of a pseudo-random pattern seeded by `seed`.
fn random_pages(count: u64, seed: u64) -> Vec<Vec<u8>> {
    let mut state = seed | 1;
    (0..count)
        .map(|_| {
            (0..512)
                .flat_map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state.to_le_bytes()
                })
                .collect()
        })
        .collect()
}

/// Writes `pages` to `path` with the real page file writer, and returns a manifest
/// describing it.
fn write_pages(path: &Path, id: &str, parent: Option<&str>, pages: &[Vec<u8>]) -> Manifest {
    let count = pages.len() as u64;
    let mut writer = PageFileWriter::create(path).unwrap();
    for page in pages {
        writer.push(page).unwrap();
    }
    let (page_count, chunk_digests) = writer.finish().unwrap();
    Manifest {
        id: id.into(),
        parent: parent.map(str::to_string),
        ancestors: parent.map(str::to_string).into_iter().collect(),
        app: AppRecord {
            name: "app".into(),
            memory_mib: 64,
            ..Default::default()
        },
        vmas: vec![VmaRecord {
            start: 0x100_0000,
            end: 0x100_0000 + count * 4096,
            prot: 3,
            role: 0,
            backing: BackingRecord::Anonymous,
        }],
        process: ProcessRecord {
            cwd: "/".into(),
            ..Default::default()
        },
        page_count,
        chunk_pages: pagefile::CHUNK_PAGES,
        chunk_digests,
        activeset_prefix: count / 3,
        pages: vec![PageRun {
            vpn: 0x1000,
            count,
            source: PageSource::Stored { index: 0 },
        }],
        context: UserContext {
            xsave: vec![0; 4096],
            ..Default::default()
        },
        ..Default::default()
    }
}

fn same_file(a: &Path, b: &Path) {
    let (a_bytes, b_bytes) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    assert!(
        a_bytes == b_bytes,
        "{} and {} differ",
        a.display(),
        b.display()
    );
}

/// A raw client, to read and damage objects behind the store's back.
fn raw_client(endpoint: &str) -> aws_sdk_s3::Client {
    let config = aws_sdk_s3::Config::builder()
        .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
        .region(aws_sdk_s3::config::Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .force_path_style(true)
        .credentials_provider(aws_sdk_s3::config::Credentials::new(
            "testing", "testing", None, None, "test",
        ))
        .build();
    aws_sdk_s3::Client::from_conf(config)
}

fn put_raw(endpoint: &str, key: &str, bytes: Vec<u8>) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let put = raw_client(endpoint).put_object().bucket(BUCKET).key(key);
        put.body(bytes.into()).send().await.unwrap();
    });
}

/// Object `key`, or `None` if there is none.
fn get_raw(endpoint: &str, key: &str) -> Option<Vec<u8>> {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let get = raw_client(endpoint).get_object().bucket(BUCKET).key(key);
        let out = get.send().await.ok()?;
        Some(out.body.collect().await.unwrap().to_vec())
    })
}

#[test]
fn s3_store_against_a_real_server() {
    let dir = tempfile::tempdir().unwrap();
    let moto = Moto::start(dir.path());
    let endpoint = moto.endpoint.clone();
    let started = Instant::now();
    let store = S3Store::open(&config(&endpoint), "alpha", &dir.path().join("cache-a")).unwrap();
    store.ensure_bucket().unwrap();
    store.ensure_bucket().unwrap();
    empty_store_and_missing_snapshots(&store);
    commit_and_read_back(&store, &endpoint, dir.path());
    large_page_file(&store, &endpoint, dir.path());
    a_chain_streams_into_a_feed(&endpoint, dir.path());
    remove_list_and_size(&store);
    corrupt_manifest_is_refused(&store, &endpoint);
    copy_chain_local_to_s3_to_local(&endpoint, dir.path());
    page_files_of_one_image_are_stored_once(&endpoint, dir.path());
    a_chain_comes_over_a_wide_area_link_in_two_round_trips(&moto, dir.path());
    inside_a_tokio_runtime(store, &endpoint, dir.path());
    credentials_come_from_flags_or_the_environment(&endpoint, dir.path());
    eprintln!("all S3 cases in {:?}", started.elapsed());
}

fn empty_store_and_missing_snapshots(store: &S3Store) {
    assert_eq!(store.head().unwrap(), None);
    assert_eq!(store.list().unwrap(), Vec::<String>::new());
    assert_eq!(store.size("nope").unwrap(), 0);
    assert!(store.describe().contains("s3://picocenter-test/apps/alpha"));
    for error in [
        store.manifest("nope", &key()).unwrap_err(),
        store.page_file("nope").unwrap_err(),
    ] {
        assert!(
            matches!(&error, StoreError::Missing { id, .. } if id == "nope"),
            "{error}"
        );
    }
    assert!(store.data_archive("nope").unwrap().is_none());
    assert!(matches!(
        store.manifest("../x", &key()).unwrap_err(),
        StoreError::BadId(_)
    ));
}

fn commit_and_read_back(store: &S3Store, endpoint: &str, dir: &Path) {
    let pages = store.scratch("s1", "pages").unwrap();
    let manifest = page_file(&pages, "s1", None, 300, 1);
    let original = dir.join("s1.pages.original");
    std::fs::copy(&pages, &original).unwrap();
    let data = store.scratch("s1", "data").unwrap();
    std::fs::write(&data, b"the data archive").unwrap();
    store
        .commit(&manifest, &key(), &pages, Some(&data))
        .unwrap();
    assert!(
        !pages.exists() && !data.exists(),
        "scratch inputs are removed"
    );
    assert_eq!(store.head().unwrap().as_deref(), Some("s1"));
    assert_eq!(store.manifest("s1", &key()).unwrap(), manifest);
    let fetched = store.page_file("s1").unwrap();
    same_file(&fetched, &original);
    pagefile::verify(&fetched, &manifest, 0, manifest.page_count).unwrap();
    let archive = store.data_archive("s1").unwrap().unwrap();
    assert_eq!(std::fs::read(archive).unwrap(), b"the data archive");
    let manifest_bytes = manifest.encode(&key()).len() as u64;
    assert_eq!(store.size("s1").unwrap(), 300 * 4096 + 16 + manifest_bytes);

    // A second commit from files outside the store's scratch directory: they stay.
    let outside = dir.join("s2.pages");
    let second = page_file(&outside, "s2", Some("s1"), 70, 2);
    store.commit(&second, &key(), &outside, None).unwrap();
    assert!(
        outside.exists(),
        "inputs outside the scratch directory are kept"
    );
    assert_eq!(store.head().unwrap().as_deref(), Some("s2"));
    assert!(store.data_archive("s2").unwrap().is_none());
    // The first stays readable, also through a store with an empty cache.
    let fresh = S3Store::open(&config(endpoint), "alpha", &dir.join("cache-fresh")).unwrap();
    assert_eq!(fresh.manifest("s1", &key()).unwrap(), manifest);
    same_file(&fresh.page_file("s1").unwrap(), &original);
    same_file(&fresh.page_file("s2").unwrap(), &outside);
}

fn large_page_file(store: &S3Store, endpoint: &str, dir: &Path) {
    let pages = store.scratch("big", "pages").unwrap();
    let count = 40 * 256; // 40 MiB
    let mut manifest = page_file(&pages, "big", None, count, 3);
    manifest.activeset_prefix = 1001; // not on a part boundary
    let original = dir.join("big.pages.original");
    std::fs::copy(&pages, &original).unwrap();
    let bytes = (count * 4096) as f64;

    let started = Instant::now();
    store.commit(&manifest, &key(), &pages, None).unwrap();
    let upload = started.elapsed();

    let fresh = S3Store::open(&config(endpoint), "alpha", &dir.join("cache-big")).unwrap();
    let started = Instant::now();
    let fetched = fresh.page_file("big").unwrap();
    let download = started.elapsed();
    same_file(&fetched, &original);
    pagefile::verify(&fetched, &manifest, 0, count).unwrap();

    let started = Instant::now();
    assert_eq!(fresh.page_file("big").unwrap(), fetched);
    let cached = started.elapsed();
    eprintln!(
        "40 MiB page file on loopback moto: upload {:.0} MB/s ({upload:?}), download {:.0} MB/s \
         ({download:?}), cached {cached:?}",
        bytes / MIB / upload.as_secs_f64(),
        bytes / MIB / download.as_secs_f64(),
    );
}

/// What a fake VMM received: the page files it assembled, and the order chunks came in.
type Received = (Vec<Vec<u8>>, Vec<ChunkId>);

/// The VMM's end of a feed, for [`a_chain_streams_into_a_feed`]: asks for `wants` (then
/// says its first wants are done), reads every chunk of the `levels`, checks each against
/// its digest, and returns the page files assembled and the order the chunks came in.
fn fake_vmm(
    mut feed: std::os::unix::net::UnixStream,
    levels: Vec<Manifest>,
    wants: Vec<ChunkId>,
) -> std::thread::JoinHandle<Result<Received, String>> {
    std::thread::spawn(move || {
        use std::io::Write;
        for id in wants.into_iter().chain([feed::FIRST_WANTS_DONE]) {
            feed.write_all(&feed::want(id)).unwrap();
        }
        let mut files: Vec<Vec<u8>> = levels
            .iter()
            .map(|m| vec![0; m.page_file_bytes() as usize])
            .collect();
        let mut order = Vec::new();
        let mut buffer = Vec::new();
        while let Some(id) = feed::read_chunk(&mut feed, &mut buffer).map_err(|e| e.to_string())? {
            let m = levels
                .get(id.level as usize)
                .ok_or("a level out of range")?;
            pagefile::check_chunk(m, id.chunk, &buffer).map_err(|e| e.to_string())?;
            let pages = pagefile::chunk_pages_of(m, id.chunk).ok_or("a chunk out of range")?;
            let at = (pages.start * 4096) as usize;
            files[id.level as usize][at..at + buffer.len()].copy_from_slice(&buffer);
            order.push(id);
        }
        Ok((files, order))
    })
}

/// Issue #14's streamed swap-in, the worker's side: a chain whose newest page file is too
/// big to come with its manifest is committed pending, its page file streams into the
/// feed (a chunk asked for jumping the queue), and then completes the local copy; a page
/// file damaged in the bucket reaches the VMM only as a chunk that fails its digest, and
/// leaves the local copy pending.
fn a_chain_streams_into_a_feed(endpoint: &str, dir: &Path) {
    let source = LocalStore::open(&dir.join("stream-source")).unwrap();
    let base_pages = source.scratch("sbase", "pages").unwrap();
    let base = page_file(&base_pages, "sbase", None, 2 * 256, 11);
    source.commit(&base, &key(), &base_pages, None).unwrap();
    let pages = source.scratch("snew", "pages").unwrap();
    let count = 12 * 256; // 12 MiB: past the 2 MiB that come with the manifest
    let newest = page_file(&pages, "snew", Some("sbase"), count, 12);
    source.commit(&newest, &key(), &pages, None).unwrap();
    let remote = S3Store::open(&config(endpoint), "streamed", &dir.join("stream-up")).unwrap();
    copy_chain(&source, &remote, &key(), "snew").unwrap();

    let local = LocalStore::open(&dir.join("stream-local")).unwrap();
    let remote = S3Store::open(&config(endpoint), "streamed", &dir.join("stream-cache")).unwrap();
    let stream = remote
        .open_stream(&local, &key(), "snew", &ChainHint::default(), None)
        .unwrap()
        .expect("a stream");
    // The 2 MiB base came whole with its manifest; the newest is pending until streamed.
    assert_eq!(
        local.head().unwrap(),
        None,
        "HEAD waits for the whole chain"
    );
    assert_eq!(stream.ids(), ["snew"]);
    assert!(local.is_complete("sbase", &key()));
    assert!(!local.is_complete("snew", &key()));
    assert!(local.manifest("snew", &key()).is_ok());
    let last = ChunkId {
        level: 0,
        chunk: newest.chunk_digests.len() as u64 - 1,
    };
    let (worker_end, vmm_end) = std::os::unix::net::UnixStream::pair().unwrap();
    let vmm = fake_vmm(vmm_end, vec![newest.clone()], vec![last]);
    let report = stream.run(worker_end).unwrap();
    let (files, order) = vmm.join().unwrap().unwrap();
    assert_eq!(
        files[0],
        std::fs::read(source.page_file("snew").unwrap()).unwrap()
    );
    assert_eq!(order.len(), newest.chunk_digests.len(), "each chunk once");
    // The wanted chunk came right after the 2 MiB (8 chunks) that came with the manifest.
    assert_eq!(
        order.iter().position(|&id| id == last),
        Some(8),
        "{order:?}"
    );
    assert_eq!(report.wanted, 1);
    assert!(local.is_complete("snew", &key()));
    assert_eq!(local.head().unwrap().as_deref(), Some("snew"));
    same_file(
        &local.page_file("snew").unwrap(),
        &source.page_file("snew").unwrap(),
    );
    // Complete now: nothing to stream.
    let again = S3Store::open(&config(endpoint), "streamed", &dir.join("stream-cache")).unwrap();
    assert!(again
        .open_stream(&local, &key(), "snew", &ChainHint::default(), None)
        .unwrap()
        .is_none());

    // One byte flipped in the bucket, past the first part: the fake VMM's digest check
    // refuses that chunk, the stream fails its own check, and the copy stays pending.
    let mut flipped = std::fs::read(source.page_file("snew").unwrap()).unwrap();
    flipped[9 << 20] ^= 1;
    put_raw(endpoint, "apps/streamed/snew.pages", flipped);
    let local = LocalStore::open(&dir.join("stream-local-tampered")).unwrap();
    let remote = S3Store::open(&config(endpoint), "streamed", &dir.join("stream-cache-2")).unwrap();
    let stream = remote
        .open_stream(&local, &key(), "snew", &ChainHint::default(), None)
        .unwrap()
        .expect("a stream");
    let (worker_end, vmm_end) = std::os::unix::net::UnixStream::pair().unwrap();
    let vmm = fake_vmm(vmm_end, vec![newest.clone()], Vec::new());
    let error = stream.run(worker_end).unwrap_err().to_string();
    let refused = vmm.join().unwrap().unwrap_err();
    assert!(refused.contains("checksum"), "{refused}");
    assert!(
        error.contains("page feed") || error.contains("checksum"),
        "{error}"
    );
    assert!(!local.is_complete("snew", &key()));
    assert!(local.is_complete("sbase", &key()));
    // HEAD moves only when the chain is whole; "snew" is not restorable from here.
    assert_eq!(local.head().unwrap(), None);
    assert!(!local.is_chain_complete("snew", &key()));
    put_raw(
        endpoint,
        "apps/streamed/snew.pages",
        std::fs::read(source.page_file("snew").unwrap()).unwrap(),
    );
    // What a worker does when a stream failed: the plain fetch completes the copy.
    let remote = S3Store::open(&config(endpoint), "streamed", &dir.join("stream-cache-3")).unwrap();
    assert_eq!(
        remote
            .fetch_chain(&local, &key(), "snew", &ChainHint::default())
            .unwrap(),
        ["snew"]
    );
    assert!(local.is_chain_complete("snew", &key()));
    assert_eq!(local.head().unwrap().as_deref(), Some("snew"));
}

fn remove_list_and_size(store: &S3Store) {
    assert_eq!(store.list().unwrap(), ["big", "s1", "s2"]);
    assert!(store.size("big").unwrap() > 40 << 20);
    store.remove("big").unwrap();
    assert_eq!(store.list().unwrap(), ["s1", "s2"]);
    assert_eq!(store.size("big").unwrap(), 0);
    assert!(matches!(
        store.manifest("big", &key()).unwrap_err(),
        StoreError::Missing { .. }
    ));
    assert!(matches!(
        store.page_file("big").unwrap_err(),
        StoreError::Missing { .. }
    ));
    assert_eq!(
        store.head().unwrap().as_deref(),
        Some("big"),
        "HEAD is not moved"
    );
}

fn corrupt_manifest_is_refused(store: &S3Store, endpoint: &str) {
    let mut bytes = store.manifest("s1", &key()).unwrap().encode(&key());
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    put_raw(endpoint, "apps/alpha/bad.manifest", bytes);
    let error = store.manifest("bad", &key()).unwrap_err();
    assert!(
        matches!(
            error,
            StoreError::Manifest {
                source: ManifestError::Forged,
                ..
            }
        ),
        "{error}"
    );
    // A genuine manifest under another id, and a genuine one read with another key.
    let genuine = store.manifest("s1", &key()).unwrap().encode(&key());
    put_raw(endpoint, "apps/alpha/moved.manifest", genuine);
    let error = store.manifest("moved", &key()).unwrap_err().to_string();
    assert!(error.contains("manifest of snapshot s1"), "{error}");
    let other = SnapshotKey::from_bytes([6; 32]);
    assert!(matches!(
        store.manifest("s1", &other).unwrap_err(),
        StoreError::Manifest {
            source: ManifestError::Forged,
            ..
        }
    ));
    store.remove("moved").unwrap();
    put_raw(
        endpoint,
        "apps/alpha/junk.manifest",
        b"not a manifest".to_vec(),
    );
    assert!(matches!(
        store.manifest("junk", &key()).unwrap_err(),
        StoreError::Manifest { .. }
    ));
    store.remove("bad").unwrap();
    store.remove("junk").unwrap();
    assert_eq!(store.list().unwrap(), ["s1", "s2"]);
}

fn copy_chain_local_to_s3_to_local(endpoint: &str, dir: &Path) {
    let first = LocalStore::open(&dir.join("local-1")).unwrap();
    let mut parent = None;
    for (i, id) in ["c1", "c2", "c3"].into_iter().enumerate() {
        let pages = first.scratch(id, "pages").unwrap();
        let manifest = page_file(&pages, id, parent, 20 + i as u64, 10 + i as u64);
        let data = first.scratch(id, "data").unwrap();
        std::fs::write(&data, id.as_bytes()).unwrap();
        first
            .commit(&manifest, &key(), &pages, Some(&data))
            .unwrap();
        parent = Some(id);
    }
    let remote = S3Store::open(&config(endpoint), "beta", &dir.join("cache-beta")).unwrap();
    assert_eq!(
        copy_chain(&first, &remote, &key(), "c2").unwrap(),
        ["c1", "c2"]
    );
    assert_eq!(remote.head().unwrap().as_deref(), Some("c2"));
    assert_eq!(copy_chain(&first, &remote, &key(), "c3").unwrap(), ["c3"]);
    assert_eq!(
        copy_chain(&first, &remote, &key(), "c3").unwrap(),
        Vec::<String>::new()
    );
    let second = LocalStore::open(&dir.join("local-2")).unwrap();
    assert_eq!(
        copy_chain(&remote, &second, &key(), "c3").unwrap(),
        ["c1", "c2", "c3"]
    );
    assert_eq!(second.head().unwrap().as_deref(), Some("c3"));
    for id in ["c1", "c2", "c3"] {
        same_file(
            &first.page_file(id).unwrap(),
            &second.page_file(id).unwrap(),
        );
        let (a, b) = (
            first.data_archive(id).unwrap(),
            second.data_archive(id).unwrap(),
        );
        same_file(&a.unwrap(), &b.unwrap());
        assert_eq!(
            first.manifest(id, &key()).unwrap(),
            second.manifest(id, &key()).unwrap()
        );
    }
    assert_eq!(
        first.list().unwrap(),
        ["c1", "c2", "c3"],
        "the source is intact"
    );
}

/// A chain of three: the newest manifest lists its ancestors, so their manifests are asked
/// for at once after it, each with the first part of its objects (small here: the whole
/// of them), over connections kept open. A manifest whose ancestors skip a link is refused.
fn a_chain_comes_over_a_wide_area_link_in_two_round_trips(moto: &Moto, dir: &Path) {
    let first = LocalStore::open(&dir.join("local-wan")).unwrap();
    let mut ancestors: Vec<String> = Vec::new();
    for (i, id) in ["d1", "d2", "d3", "d4"].into_iter().enumerate() {
        let pages = first.scratch(id, "pages").unwrap();
        let mut manifest = page_file(
            &pages,
            id,
            ancestors.first().map(String::as_str),
            20 + i as u64,
            30 + i as u64,
        );
        manifest.ancestors = ancestors.clone();
        if id == "d4" {
            // Signed, and well formed, but d2 is left out of its chain.
            manifest.ancestors = vec!["d3".into(), "d1".into()];
        }
        let data = first.scratch(id, "data").unwrap();
        std::fs::write(&data, id.as_bytes()).unwrap();
        manifest.data_bytes = id.len() as u64;
        manifest.data_digest = *blake3::hash(id.as_bytes()).as_bytes();
        first
            .commit(&manifest, &key(), &pages, Some(&data))
            .unwrap();
        ancestors.insert(0, id.to_string());
    }
    let direct = S3Store::open(&config(&moto.endpoint), "wan", &dir.join("cache-wan")).unwrap();
    copy_chain(&first, &direct, &key(), "d4").unwrap();

    let server: SocketAddr = moto.endpoint.trim_start_matches("http://").parse().unwrap();
    // Long enough that moto's own time stays well inside one round trip of slack: it
    // serves parallel requests one at a time, and a round trip here asks for up to ten
    // (~100 ms for six in a debug build under load; 300 ms of round trip was not enough
    // for nine beside a CPU burner and a build).
    let rtt = Duration::from_millis(500);
    let link = wan::WanLink::start_http(
        server,
        wan::LinkShape {
            rtt,
            // Two clients' warm connections (9 and 16, below) at once, with room for the
            // connections each opens again once its idle ones close.
            max_connections: 64,
            ..wan::LinkShape::default()
        },
    );
    let conn = S3Connection::open(&config(&link.url())).unwrap();
    // The second round trip asks for two manifests, their data and their page files'
    // first parts: the oldest's in four pieces, the other's in one.
    conn.keep_warm(9, Duration::from_secs(10));
    let deadline = Instant::now() + Duration::from_secs(20);
    while link.connections.load(std::sync::atomic::Ordering::SeqCst) < 9 {
        assert!(Instant::now() < deadline, "the connections were not opened");
        std::thread::sleep(Duration::from_millis(10));
    }
    // Their first requests done: a handshake and a round trip each, and some slack.
    std::thread::sleep(3 * rtt);
    let remote = S3Store::on(conn.clone(), "wan", &dir.join("cache-wan-2")).unwrap();
    let second = LocalStore::open(&dir.join("local-wan-2")).unwrap();
    let started = Instant::now();
    assert_eq!(
        remote
            .fetch_chain(&second, &key(), "d3", &ChainHint::default())
            .unwrap(),
        ["d3", "d2", "d1"]
    );
    let took = started.elapsed();
    assert!(took >= 2 * rtt, "{took:?}");
    assert!(
        took < 3 * rtt,
        "a chain of three took {took:?}: more than two round trips"
    );
    assert_eq!(
        link.connections.load(std::sync::atomic::Ordering::SeqCst),
        9
    );
    for id in ["d1", "d2", "d3"] {
        same_file(
            &first.page_file(id).unwrap(),
            &second.page_file(id).unwrap(),
        );
        same_file(
            &first.data_archive(id).unwrap().unwrap(),
            &second.data_archive(id).unwrap().unwrap(),
        );
    }
    // With the ancestors expected (as the hub keeps them), all three come in the first
    // round trip; a wrong guess costs its GETs and nothing else.
    let hinted = S3Connection::open(&config(&link.url())).unwrap();
    // Each level's manifest, data and page file's first part, the oldest's in four
    // pieces: 12. Asked for with room to spare: of requests sent at once, the client may
    // serve some on a connection another has just freed rather than open their own.
    hinted.keep_warm(16, Duration::from_secs(10));
    let warm = link.connections.load(std::sync::atomic::Ordering::SeqCst) + 12;
    let deadline = Instant::now() + Duration::from_secs(20);
    while link.connections.load(std::sync::atomic::Ordering::SeqCst) < warm {
        assert!(Instant::now() < deadline, "the connections were not opened");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(3 * rtt);
    let expected = ["d2".to_string(), "d1".to_string()];
    let guesses: [(&str, &[String]); 4] = [
        ("right", &expected),
        ("unknown", &["nothing-here".to_string(), "d1".to_string()]),
        ("outside the chain", &["d4".to_string()]),
        ("not a snapshot id", &["../d1".to_string()]),
    ];
    for (what, guess) in guesses {
        let remote =
            S3Store::on(hinted.clone(), "wan", &dir.join(format!("cache-{what}"))).unwrap();
        let local = LocalStore::open(&dir.join(format!("local-{what}"))).unwrap();
        let started = Instant::now();
        let hint = ChainHint {
            ancestors: guess.to_vec(),
            first_parts: Vec::new(),
            ..Default::default()
        };
        assert_eq!(
            remote.fetch_chain(&local, &key(), "d3", &hint).unwrap(),
            ["d3", "d2", "d1"],
            "{what}"
        );
        let took = started.elapsed();
        if what == "right" {
            assert!(
                took < 2 * rtt,
                "a chain of three whose ancestors were expected took {took:?}: more than one round trip"
            );
        }
        for id in ["d1", "d2", "d3"] {
            same_file(&first.page_file(id).unwrap(), &local.page_file(id).unwrap());
        }
    }
    // A page file whose ActiveSet (all of it here: 6 MiB) is larger than the 2 MiB a
    // first part holds: with the hint's size it all comes in the first round trip; without
    // it, the rest takes another.
    let big_local = LocalStore::open(&dir.join("local-wan-big")).unwrap();
    let pages = big_local.scratch("big", "pages").unwrap();
    let mut manifest = page_file(&pages, "big", None, 1536, 77);
    manifest.activeset_prefix = 1536;
    manifest.activeset = vec![picocenter_snapshots::format::VpnRange {
        vpn: 0x100_0000 / 4096,
        count: 1536,
    }];
    big_local.commit(&manifest, &key(), &pages, None).unwrap();
    let direct = S3Store::open(&config(&moto.endpoint), "wan-big", &dir.join("cache-big")).unwrap();
    copy_chain(&big_local, &direct, &key(), "big").unwrap();
    let sized = ChainHint::of(std::slice::from_ref(&manifest));
    assert_eq!(sized.first_parts, [6 << 20]);
    for (what, hint) in [("sized", sized), ("unsized", ChainHint::default())] {
        let remote = S3Store::on(
            hinted.clone(),
            "wan-big",
            &dir.join(format!("cache-big-{what}")),
        )
        .unwrap();
        let local = LocalStore::open(&dir.join(format!("local-big-{what}"))).unwrap();
        let started = Instant::now();
        assert_eq!(
            remote.fetch_chain(&local, &key(), "big", &hint).unwrap(),
            ["big"]
        );
        let took = started.elapsed();
        same_file(
            &big_local.page_file("big").unwrap(),
            &local.page_file("big").unwrap(),
        );
        if what == "sized" {
            assert!(
                took < 2 * rtt,
                "6 MiB of ActiveSet, its size known, took {took:?}"
            );
        } else {
            assert!(took >= 2 * rtt, "6 MiB, 2 MiB of it first, took {took:?}");
        }
    }

    let third = LocalStore::open(&dir.join("local-wan-3")).unwrap();
    let refused = remote
        .fetch_chain(&third, &key(), "d4", &ChainHint::default())
        .unwrap_err();
    assert!(refused.to_string().contains("chain is broken"), "{refused}");
    assert!(third.list().unwrap().is_empty(), "{:?}", third.list());

    // A page file changed in the bucket: longer, shorter, empty, or the same length with
    // one byte flipped. Each restore fails, and commits nothing.
    let genuine = std::fs::read(first.page_file("d1").unwrap()).unwrap();
    let mut longer = genuine.clone();
    longer.extend_from_slice(&[0; 4096]);
    let mut flipped = genuine.clone();
    flipped[5000] ^= 1;
    let cases = [
        ("longer", longer, "bytes"),
        ("shorter", genuine[..genuine.len() - 4096].to_vec(), "bytes"),
        ("empty", Vec::new(), "bytes"),
        ("flipped", flipped, "checksum"),
    ];
    for (i, (what, bytes, expect)) in cases.into_iter().enumerate() {
        put_raw(&moto.endpoint, "apps/wan/d1.pages", bytes);
        let fresh_cache = dir.join(format!("cache-wan-tampered-{i}"));
        let tampered = S3Store::on(conn.clone(), "wan", &fresh_cache).unwrap();
        let fresh = LocalStore::open(&dir.join(format!("local-wan-tampered-{i}"))).unwrap();
        let error = tampered
            .fetch_chain(&fresh, &key(), "d3", &ChainHint::default())
            .unwrap_err()
            .to_string();
        assert!(error.contains(expect), "{what}: {error}");
        assert!(
            fresh.list().unwrap().is_empty(),
            "{what}: {:?}",
            fresh.list()
        );
    }
    put_raw(&moto.endpoint, "apps/wan/d1.pages", genuine);
    // The damaged download did not stay in the cache: with the object mended, the same
    // cache fetches it again, whole.
    let mended_cache = dir.join("cache-wan-tampered-3");
    let mended = S3Store::on(conn.clone(), "wan", &mended_cache).unwrap();
    let fresh = LocalStore::open(&dir.join("local-wan-mended")).unwrap();
    assert_eq!(
        mended
            .fetch_chain(&fresh, &key(), "d3", &ChainHint::default())
            .unwrap(),
        ["d3", "d2", "d1"]
    );

    // Removing the app takes everything under its prefix, also a page file whose
    // manifest an interrupted deletion already removed (which list() no longer names).
    put_raw(&moto.endpoint, "apps/wan/orphan.pages", vec![1; 4096]);
    assert_eq!(remote.list().unwrap(), ["d1", "d2", "d3", "d4"]);
    // Four snapshots of three objects each, HEAD, and the orphan.
    assert_eq!(remote.remove_everything().unwrap(), 14);
    assert!(remote.list().unwrap().is_empty());
    assert_eq!(remote.remove_everything().unwrap(), 0);
}

fn inside_a_tokio_runtime(store: S3Store, endpoint: &str, dir: &Path) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let store = Arc::new(store);
    let endpoint = endpoint.to_string();
    let cache = dir.join("cache-async");
    runtime.block_on(async move {
        let shared = store.clone();
        let (head, path) = tokio::task::spawn_blocking(move || {
            (shared.head().unwrap(), shared.page_file("s1").unwrap())
        })
        .await
        .unwrap();
        assert_eq!(head.as_deref(), Some("big"));
        assert!(path.exists());
        // Even straight from an async task (which blocks that worker thread), it does not
        // panic: the store never blocks on a runtime from inside one.
        assert_eq!(store.list().unwrap(), ["s1", "s2"]);
        let opened =
            tokio::task::spawn_blocking(move || S3Store::open(&config(&endpoint), "gamma", &cache))
                .await
                .unwrap()
                .unwrap();
        // Dropping stores inside the runtime does not panic either.
        drop(opened);
        drop(store);
    });
}

fn credentials_come_from_flags_or_the_environment(endpoint: &str, dir: &Path) {
    let mut no_flags = config(endpoint);
    no_flags.access_key = None;
    no_flags.secret_key = None;
    // The only test in this binary: nothing else reads the environment meanwhile.
    for name in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
    ] {
        std::env::remove_var(name);
    }
    std::env::set_var("AWS_SHARED_CREDENTIALS_FILE", dir.join("no-credentials"));
    std::env::set_var("AWS_CONFIG_FILE", dir.join("no-config"));
    let started = Instant::now();
    let error = S3Store::open(&no_flags, "alpha", &dir.join("cache-env")).unwrap_err();
    assert!(error.to_string().contains("AWS_ACCESS_KEY_ID"), "{error}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "no slow probing"
    );
    std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
    let store = S3Store::open(&no_flags, "alpha", &dir.join("cache-env")).unwrap();
    assert_eq!(store.list().unwrap(), ["s1", "s2"]);
}

/// Page files of one image are stored once (README §5.7): the first is the image's base,
/// the others are stored packed against it and come back whole, by every path; whatever
/// is tampered with is refused; a base outlives its snapshot while a packed page file
/// names it, and garbage collection removes it after.
fn page_files_of_one_image_are_stored_once(endpoint: &str, dir: &Path) {
    let config = S3Config {
        prefix: "dedup".into(),
        dedup: true,
        ..config(endpoint)
    };
    let conn = S3Connection::open(&config).unwrap();
    let bases = dir.join("dedup-bases");
    let store = |app: &str, cache: &str| {
        S3Store::on(conn.clone(), app, &dir.join(cache))
            .unwrap()
            .with_bases_dir(&bases)
    };
    let image = |mut m: Manifest| {
        m.app.image = Some("nginx".into());
        m
    };
    // The image's pages; each app has them in its own order, with 12 of its own.
    let common = random_pages(240, 500);
    let app_pages = |seed: u64| {
        let mut pages = common.clone();
        pages.rotate_left(seed as usize * 7);
        for (k, own) in random_pages(12, seed).into_iter().enumerate() {
            pages[k * 19 + seed as usize] = own;
        }
        pages
    };
    let mut originals = Vec::new();
    for (n, app) in ["app-a", "app-b", "app-c"].iter().enumerate() {
        let path = dir.join(format!("dedup-{app}.pages"));
        let manifest = image(write_pages(
            &path,
            &format!("{app}-1"),
            None,
            &app_pages(n as u64 + 1),
        ));
        store(app, &format!("dedup-up-{app}"))
            .commit(&manifest, &key(), &path, None)
            .unwrap();
        originals.push((app.to_string(), manifest, path));
    }
    let logical = 240 * 4096;
    let (a_bytes, a_base) = store("app-a", "dedup-q").stored_as("app-a-1").unwrap();
    assert_eq!(
        a_base, None,
        "the first page file of an image is stored plain"
    );
    assert!(a_bytes >= logical);
    let mut total = a_bytes;
    for app in ["app-b", "app-c"] {
        let (bytes, base) = store(app, "dedup-q")
            .stored_as(&format!("{app}-1"))
            .unwrap();
        assert_eq!(base.as_deref(), Some("app-a/app-a-1"));
        // 12 own pages of 240, and the header.
        assert!(bytes < logical / 6, "{app}: {bytes} bytes stored");
        total += bytes;
    }
    assert!(
        total < a_bytes * 3 / 2,
        "three apps take {total} bytes, one {a_bytes}"
    );

    // Each comes back whole: fetched (base fetched too), streamed, and with the hub's
    // hint that it is packed (the base asked for in the first round trip).
    let fresh_bases = dir.join("dedup-fresh-bases");
    for (case, (app, manifest, path)) in originals.iter().enumerate() {
        let id = &manifest.id;
        let fetched = S3Store::on(conn.clone(), app, &dir.join(format!("dedup-f{case}")))
            .unwrap()
            .with_bases_dir(&fresh_bases.join(format!("f{case}")));
        let local = LocalStore::open(&dir.join(format!("dedup-local-f{case}"))).unwrap();
        assert_eq!(
            fetched
                .fetch_chain(&local, &key(), id, &ChainHint::default())
                .unwrap(),
            std::slice::from_ref(id)
        );
        same_file(&local.page_file(id).unwrap(), path);
        let streamed = S3Store::on(conn.clone(), app, &dir.join(format!("dedup-s{case}")))
            .unwrap()
            .with_bases_dir(&fresh_bases.join(format!("s{case}")));
        let local = LocalStore::open(&dir.join(format!("dedup-local-s{case}"))).unwrap();
        let hint = ChainHint {
            packed: match case {
                0 => Vec::new(),
                _ => vec![picocenter_snapshots::chain::PackedLevel {
                    id: id.clone(),
                    base: "app-a/app-a-1".into(),
                }],
            },
            ..Default::default()
        };
        assert!(
            streamed
                .open_stream(&local, &key(), id, &hint, None)
                .unwrap()
                .is_none(),
            "a packed page file is made whole before the VMM starts"
        );
        assert!(local.is_complete(id, &key()));
        same_file(&local.page_file(id).unwrap(), path);
        // A hint that is wrong (this level is plain, or the base is another) costs GETs.
        let wrong = ChainHint {
            packed: vec![picocenter_snapshots::chain::PackedLevel {
                id: id.clone(),
                base: "app-c/app-c-1".into(),
            }],
            ..Default::default()
        };
        let local = LocalStore::open(&dir.join(format!("dedup-local-w{case}"))).unwrap();
        let hinted = store(app, &format!("dedup-w{case}"));
        hinted.fetch_chain(&local, &key(), id, &wrong).unwrap();
        same_file(&local.page_file(id).unwrap(), path);
        // Store::page_file, which has no manifest.
        let plain = store(app, &format!("dedup-p{case}"));
        same_file(&plain.page_file(id).unwrap(), path);
    }

    // A packed object past its first part (2 MiB): 600 own pages that do not compress.
    let mut big = common.clone();
    big.extend(random_pages(600, 77));
    let path = dir.join("dedup-app-e.pages");
    let manifest = image(write_pages(&path, "app-e-1", None, &big));
    store("app-e", "dedup-up-e")
        .commit(&manifest, &key(), &path, None)
        .unwrap();
    let (bytes, base) = store("app-e", "dedup-q").stored_as("app-e-1").unwrap();
    assert_eq!(base.as_deref(), Some("app-a/app-a-1"));
    assert!(bytes > 2 << 20, "{bytes}");
    let local = LocalStore::open(&dir.join("dedup-local-e")).unwrap();
    store("app-e", "dedup-e")
        .fetch_chain(&local, &key(), "app-e-1", &ChainHint::default())
        .unwrap();
    same_file(&local.page_file("app-e-1").unwrap(), &path);
    store("app-e", "dedup-e-gone").remove_everything().unwrap();

    // Tampering, each put back after: every case is refused, and nothing is committed.
    let packed_key = "dedup/app-b/app-b-1.packed";
    let packed = get_raw(endpoint, packed_key).unwrap();
    let base_key = "dedup/app-a/app-a-1.pages";
    let base = get_raw(endpoint, base_key).unwrap();
    let header_len = picocenter_snapshots::packed::header_len(&packed).unwrap() as usize;
    let header = picocenter_snapshots::packed::decode_header(&packed, 240).unwrap();
    let with_header = |edit: &dyn Fn(&mut picocenter_snapshots::packed::PackedHeader)| {
        let mut h = header.clone();
        edit(&mut h);
        let mut bytes = picocenter_snapshots::packed::encode_header(&h);
        bytes.extend_from_slice(&packed[header_len..]);
        bytes
    };
    let c_pages = get_raw(endpoint, "dedup/app-c/app-c-1.packed").unwrap();
    // A page file of the base's size that is not the base.
    put_raw(
        endpoint,
        "dedup/zeta/z1.pages",
        random_pages(240, 9).concat(),
    );
    let cases: Vec<(&str, &str, Vec<u8>)> = vec![
        ("an own page changed", packed_key, {
            let mut bytes = packed.clone();
            let last = bytes.len() - 100;
            bytes[last] ^= 1;
            bytes
        }),
        (
            "a base run moved",
            packed_key,
            with_header(&|h| {
                let run = h
                    .runs
                    .iter_mut()
                    .find(|r| r.base_start.is_some_and(|s| s > 0))
                    .unwrap();
                run.base_start = run.base_start.map(|s| s - 1);
            }),
        ),
        (
            "the base named is above the prefix",
            packed_key,
            with_header(&|h| h.base = "../apps/s1".into()),
        ),
        (
            "the base named is another page file",
            packed_key,
            with_header(&|h| {
                h.base = "zeta/z1".into();
            }),
        ),
        (
            "another app's packed object in its place",
            packed_key,
            c_pages,
        ),
        ("the base changed", base_key, {
            let mut bytes = base.clone();
            bytes[5] ^= 1;
            bytes
        }),
        (
            "the base cut short",
            base_key,
            base[..base.len() - 4096].to_vec(),
        ),
    ];
    for (n, (what, object, bytes)) in cases.into_iter().enumerate() {
        put_raw(endpoint, object, bytes);
        let fetched = S3Store::on(conn.clone(), "app-b", &dir.join(format!("dedup-t{n}")))
            .unwrap()
            .with_bases_dir(&dir.join(format!("dedup-t{n}-bases")));
        let local = LocalStore::open(&dir.join(format!("dedup-local-t{n}"))).unwrap();
        let error = fetched
            .fetch_chain(&local, &key(), "app-b-1", &ChainHint::default())
            .unwrap_err()
            .to_string();
        eprintln!("{what}: {error}");
        assert!(!local.is_complete("app-b-1", &key()), "{what}");
        put_raw(endpoint, packed_key, packed.clone());
        put_raw(endpoint, base_key, base.clone());
    }

    // A pointer that names an ordinary page file (no base marker), or that is not a
    // pointer at all: the next upload of the image is plain (and its page file becomes
    // the base), never a failure; garbage collection goes on.
    let pointer = format!(
        "dedup/.images/{}",
        &blake3::hash(b"image:nginx").to_hex()[..32]
    );
    let genuine_pointer = get_raw(endpoint, &pointer).unwrap();
    let zeta = random_pages(240, 9).concat();
    let lying = format!("zeta/z1 {} {}\n", zeta.len(), blake3::hash(&zeta).to_hex());
    for (what, bytes) in [
        ("an unmarked page file", lying.into_bytes()),
        ("not a pointer", vec![b'x'; 4000]),
    ] {
        put_raw(endpoint, &pointer, bytes);
        let (_, manifest, path) = &originals[2];
        let other = store("app-d", &format!("dedup-lie-{}", what.len()));
        let mut m = manifest.clone();
        m.id = format!("app-d-{}", what.len());
        other.commit(&m, &key(), path, None).unwrap();
        assert_eq!(other.stored_as(&m.id).unwrap().1, None, "{what}");
        let report = other.collect_garbage(Duration::from_secs(3600)).unwrap();
        assert_eq!(report.bases_removed, 0, "{what}: {report:?}");
        other.remove_everything().unwrap();
    }
    put_raw(endpoint, &pointer, genuine_pointer);
    // Their page files became bases, and nothing names them now.
    let report = store("app-d", "dedup-lie-gc")
        .collect_garbage(Duration::ZERO)
        .unwrap();
    assert_eq!(report.bases_removed, 2, "{report:?}");

    // The base outlives its snapshot while packed page files name it.
    let a = store("app-a", "dedup-gc");
    a.remove("app-a-1").unwrap();
    assert!(a.list().unwrap().is_empty());
    assert!(
        get_raw(endpoint, base_key).is_some(),
        "a base stays when its snapshot goes"
    );
    let zero = Duration::ZERO;
    let report = a.collect_garbage(zero).unwrap();
    assert_eq!(
        (report.bases_retired, report.bases_removed),
        (0, 0),
        "{report:?}"
    );
    let b = store("app-b", "dedup-gc-b");
    assert_eq!(
        b.remove_everything().unwrap(),
        3,
        "manifest, packed object and HEAD"
    );
    assert!(get_raw(endpoint, base_key).is_some());
    let report = a.collect_garbage(zero).unwrap();
    assert_eq!(
        (report.bases_retired, report.bases_removed),
        (0, 0),
        "app-c still names it: {report:?}"
    );
    store("app-c", "dedup-gc-c").remove("app-c-1").unwrap();
    // Now nothing names it: retired (the image's pointer goes), then removed.
    let report = a.collect_garbage(zero).unwrap();
    assert_eq!(
        (report.bases_retired, report.bases_removed),
        (1, 0),
        "{report:?}"
    );
    assert!(get_raw(endpoint, base_key).is_some());
    let report = a.collect_garbage(Duration::from_secs(3600)).unwrap();
    assert_eq!(report.bases_removed, 0, "within the grace: {report:?}");
    let report = a.collect_garbage(zero).unwrap();
    assert_eq!(report.bases_removed, 1, "{report:?}");
    assert!(get_raw(endpoint, base_key).is_none());
    assert!(get_raw(endpoint, "dedup/app-a/app-a-1.base").is_none());
    // The next page file of the image becomes its base again.
    let (_, manifest, path) = &originals[1];
    let again = store("app-b", "dedup-again");
    again.commit(manifest, &key(), path, None).unwrap();
    assert_eq!(again.stored_as("app-b-1").unwrap().1, None);
    assert!(get_raw(endpoint, "dedup/app-b/app-b-1.base").is_some());
}
