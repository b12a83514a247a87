//! [`S3Store`]: a [`Store`] in an S3 bucket (AWS or any S3-compatible endpoint).
//!
//! One store holds one app's snapshots under a key prefix, as the same objects a
//! [`LocalStore`](crate::LocalStore) keeps as files: `{prefix}/{id}.pages`,
//! `{prefix}/{id}.data`, `{prefix}/{id}.manifest` and `{prefix}/HEAD`. A commit uploads the
//! page file and data first (multipart, several parts at once, for large files), then the
//! manifest, then HEAD, so a failure at any point leaves HEAD naming the previous good
//! snapshot.
//!
//! Reads fetch objects into a local cache directory with parallel ranged GETs. The first
//! range of a page file is its ActiveSet prefix, so that a streaming restore can start on it.
//!
//! The [`Store`] trait is synchronous, and its callers may be inside a tokio runtime (the
//! worker calls stores from `spawn_blocking`). The store therefore owns its own runtime, and
//! runs each operation on a short-lived thread of its own that blocks on that runtime: it
//! never blocks on a runtime from a thread that is already inside one.
//!
//! The SDK's own request checksums are turned off (`WhenRequired`): every object here
//! carries its own (the manifest's HMAC under the cluster key, and in it the BLAKE3 digest of
//! each page-file chunk and of the data archive, all checked at restore), and
//! S3-compatible servers differ in which SDK checksums they accept.

use crate::chain::ChainHint;
use crate::format::{Manifest, PAGE_SIZE};
use crate::key::SnapshotKey;
use crate::private;
use crate::store::{check_id, decode_manifest, LocalStore, Store, StoreError, MAX_MANIFEST_FILE};
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
    SharedCredentialsProvider,
};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::{ByteStream, Length};
use aws_sdk_s3::types::{
    BucketLocationConstraint, CompletedMultipartUpload, CompletedPart, CreateBucketConfiguration,
};
use aws_sdk_s3::Client;
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

mod packed;
mod stream;

pub use packed::{GarbageReport, PagesStored, MAX_BASE_BYTES};
pub use stream::{ChainStream, StreamReport};

/// Bytes of one part of a multipart upload, and of one ranged GET.
pub const PART_SIZE: u64 = 8 << 20;
/// Parts uploaded at once.
pub const PARALLEL_PARTS: usize = 6;
/// Ranges of one object fetched at once (a wide-area link is per connection slow, and S3
/// serves many connections).
pub const PARALLEL_GETS: usize = 16;
/// Bytes of one ranged GET within the ActiveSet prefix: small, so that the pages a restore
/// needs first arrive over many connections at once.
pub const ACTIVE_PART_SIZE: u64 = 1 << 20;
/// Bytes of an object asked for together with its manifest, before its size is known: a
/// small app's whole snapshot comes in that one round trip (nginx's base page file is
/// just over 1 MiB), and 2 MiB take ~40 ms on one connection at 50 MB/s.
pub const FIRST_PART_SIZE: u64 = 2 << 20;
/// The most a first part grows to when a [`ChainHint`] says the pages a restore needs
/// first end past [`FIRST_PART_SIZE`].
const MAX_FIRST_PART: u64 = 16 << 20;
/// The least bytes a GET of such a larger first part asks for.
const FIRST_PART_PIECE: u64 = 1 << 20;
/// The most GETs a larger first part comes in: with the other levels' requests, the first
/// round trip stays within the 16 connections of a link that admits no more.
const MAX_FIRST_PART_PIECES: u64 = 8;
/// The ranged GETs a page file's first part is asked for in, at once: 512 KiB each, ~10
/// ms at 50 MB/s on one connection where the whole 2 MiB would take ~40.
pub const FIRST_PART_PIECES: u64 = 4;
/// How long a connection to S3 may take to open.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// How long a request may wait for the first byte of its response (an 8 MiB part
/// uploaded at 1 MB/s takes 8 s before it).
const FIRST_BYTE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
/// The most parts S3 accepts in one multipart upload.
const MAX_PARTS: u64 = 10_000;
/// The largest HEAD object accepted.
const MAX_HEAD_SIZE: u64 = 1024;

/// Where an [`S3Store`] keeps snapshots and how it signs in. Serializable, so that it can
/// travel in the worker's JSON configuration; missing fields take their defaults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct S3Config {
    /// An S3-compatible endpoint (`http://127.0.0.1:9000`); AWS when unset.
    pub endpoint: Option<String>,
    /// The bucket.
    pub bucket: String,
    /// A key prefix under which each app gets its own prefix (may be empty).
    pub prefix: String,
    /// Path-style addressing (`endpoint/bucket/key`), which most S3-compatible servers
    /// need, instead of virtual-hosted style (`bucket.endpoint/key`).
    pub path_style: bool,
    /// The region (`us-east-1` by default).
    pub region: String,
    /// The access key id; from the environment (`AWS_ACCESS_KEY_ID`) when unset.
    pub access_key: Option<String>,
    /// The secret key; from the environment (`AWS_SECRET_ACCESS_KEY`) when unset.
    pub secret_key: Option<String>,
    /// Store page files of one image once (README §5.7): the first page file of an image
    /// becomes its base, later ones are stored as what they do not share with it. On by
    /// default.
    pub dedup: bool,
}

impl Default for S3Config {
    fn default() -> Self {
        Self {
            endpoint: None,
            bucket: String::new(),
            prefix: String::new(),
            path_style: false,
            region: "us-east-1".into(),
            access_key: None,
            secret_key: None,
            dedup: true,
        }
    }
}

/// Why the S3 store failed. Store operations report these as [`StoreError::Remote`], with
/// the whole chain of causes in the text.
#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    /// The store's tokio runtime could not be built.
    #[error("starting the S3 I/O runtime")]
    Runtime(#[source] std::io::Error),
    /// A thread to run an operation on could not be started.
    #[error("starting an S3 I/O thread")]
    Thread(#[source] std::io::Error),
    /// The thread or a task running an operation panicked.
    #[error("an S3 I/O task panicked")]
    Panicked,
    /// A custom endpoint is set and no credentials were found.
    #[error(
        "no S3 credentials for {endpoint}: pass an access key and a secret key, or set \
         AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY ({detail})"
    )]
    NoCredentials {
        /// The endpoint.
        endpoint: String,
        /// What the credential providers said.
        detail: String,
    },
    /// A request failed.
    #[error("S3 {op} {url}: {detail}")]
    Request {
        /// The operation (`PutObject`, ...).
        op: &'static str,
        /// The object, as `s3://bucket/key`.
        url: String,
        /// The service's error code and message, or the transport error.
        detail: String,
    },
    /// An object's body was not the length asked for.
    #[error("S3 GetObject {url}: bytes {start}..{end} came back as {got} bytes")]
    Length {
        /// The object.
        url: String,
        /// First byte asked for.
        start: u64,
        /// One past the last byte asked for.
        end: u64,
        /// Bytes received.
        got: u64,
    },
    /// A prefix with an empty, `.` or `..` part, or nothing at all.
    #[error("bad S3 key prefix {0:?}")]
    BadPrefix(String),
}

impl From<S3Error> for StoreError {
    fn from(error: S3Error) -> Self {
        let mut text = error.to_string();
        let mut source = std::error::Error::source(&error);
        while let Some(cause) = source {
            text.push_str(": ");
            text.push_str(&cause.to_string());
            source = cause.source();
        }
        StoreError::Remote(text)
    }
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        what,
        path: path.display().to_string(),
        source,
    }
}

/// The text of an SDK error: the service's code and message when it answered, else the
/// whole chain of the transport error.
fn sdk_detail<E>(error: &SdkError<E, HttpResponse>) -> String
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    match (error.code(), error.message()) {
        (Some(code), Some(message)) => format!("{code}: {message}"),
        (Some(code), None) => code.to_string(),
        _ => match error {
            SdkError::ServiceError(service) => {
                let status = service.raw().status().as_u16();
                format!("HTTP {status}: {}", DisplayErrorContext(error))
            }
            _ => DisplayErrorContext(error).to_string(),
        },
    }
}

/// Whether the service answered 404 (for HEAD requests, which carry no error code).
fn is_404<E>(error: &SdkError<E, HttpResponse>) -> bool {
    matches!(error, SdkError::ServiceError(e) if e.raw().status().as_u16() == 404)
}

/// Joins the non-empty parts of `parts` with `/`, refusing `.` and `..`.
fn join_prefix(parts: &[&str]) -> Result<String, S3Error> {
    let segments: Vec<&str> = parts
        .iter()
        .flat_map(|part| part.split('/'))
        .filter(|segment| !segment.is_empty())
        .collect();
    let joined = segments.join("/");
    if segments.is_empty() || segments.iter().any(|s| *s == "." || *s == "..") {
        return Err(S3Error::BadPrefix(joined));
    }
    Ok(joined)
}

/// Splits `[start, end)` into ranges of at most `part` bytes.
fn split(range: Range<u64>, part: u64) -> impl Iterator<Item = Range<u64>> {
    let part = part.max(1);
    (range.start..range.end)
        .step_by(usize::try_from(part).unwrap_or(usize::MAX))
        .map(move |start| start..(start + part).min(range.end))
}

/// The byte ranges to fetch the rest of an object of `size` bytes in, when its first
/// `have` bytes are in: `[0, first)` first (the ActiveSet prefix) in parts of at most
/// `first_part` bytes, then the rest in parts of at most `part`.
fn ranges(size: u64, have: u64, first: u64, first_part: u64, part: u64) -> Vec<Range<u64>> {
    let have = have.min(size);
    let first = first.clamp(have, size);
    split(have..first, first_part)
        .chain(split(first..size, part))
        .collect()
}

/// The longest chain a restore follows (a longer one is refused as broken).
const MAX_FETCHED_CHAIN: usize = 128;

/// The leading ids of `ancestors` (newest first) whose snapshots `local` lacks: the
/// rest of the chain behind the first one it holds is complete there.
fn missing_ancestors(local: &LocalStore, key: &SnapshotKey, ancestors: &[String]) -> Vec<String> {
    ancestors
        .iter()
        .take_while(|ancestor| !local.is_complete(ancestor, key))
        .cloned()
        .collect()
}

/// Ranged GETs for the first part of the page file of ancestor `index` (newest first)
/// of `levels` fetched at once: the oldest's in pieces, as the newest's (a chain is a
/// full snapshot and increments on it, so the oldest holds most: its 2 MiB took ~40 ms on
/// one connection of the wide-area rig), the others' in one each, so that the requests
/// still fit the connections kept open.
fn first_part_pieces(index: usize, levels: usize) -> u64 {
    if index + 1 == levels {
        FIRST_PART_PIECES
    } else {
        1
    }
}

/// How much of a page file to ask for before its manifest is in, and in how many ranged
/// GETs: [`FIRST_PART_SIZE`] in `pieces`, or, where the hint says the pages a restore
/// needs first end further in (but within what is left of the round trip's `budget`,
/// which starts at [`MAX_FIRST_PART`]), all of them in pieces of at least
/// [`FIRST_PART_PIECE`]: then they come with the manifests, not in another round trip
/// after the VMM has started. (Past that, the stream asks for just their chunks.)
fn first_part_shape(hinted: Option<u64>, pieces: u64, budget: &mut u64) -> FirstPartShape {
    match hinted {
        Some(bytes) if bytes > FIRST_PART_SIZE && bytes <= *budget => {
            *budget -= bytes;
            FirstPartShape {
                bytes,
                pieces: bytes
                    .div_ceil(FIRST_PART_PIECE)
                    .clamp(1, MAX_FIRST_PART_PIECES),
            }
        }
        _ => FirstPartShape::plain(pieces),
    }
}

/// The most packed levels a hint makes a first round trip ask for (a chain in S3 is kept
/// to a few snapshots, and only small ones are packed).
const MAX_HINTED_PACKED: usize = 4;
/// The most ancestors a hint makes a first round trip ask for.
const MAX_HINTED_ANCESTORS: usize = 8;

/// What a restore's first round trip asks for, from a [`ChainHint`] that nothing checked
/// (a registry's record): the newest snapshot's first part, and the hinted ancestors the
/// local store lacks with theirs. The hint's ancestors are taken up to the first that is
/// not a plain id, repeats one, or is the snapshot itself, and at most
/// [`MAX_HINTED_ANCESTORS`]; their larger first parts share one [`MAX_FIRST_PART`]
/// budget. Of the levels it says are packed, at most [`MAX_HINTED_PACKED`] packed objects
/// (each at most a header and [`MAX_BASE_BYTES`]) are asked for, and one base (at most
/// [`MAX_BASE_BYTES`]). So a hostile hint costs at most a few GETs and 16 MiB more than
/// none, or, if it names packed levels, a few hundred MiB at worst.
#[derive(Debug)]
struct FirstRound {
    newest: FirstPartShape,
    ancestors: Vec<(String, FirstPartShape)>,
    /// The levels the hint says are packed, with their bases (ids and bases checked).
    packed: Vec<(String, String)>,
}

impl FirstRound {
    fn plan(local: &LocalStore, key: &SnapshotKey, id: &str, hint: &ChainHint) -> Self {
        let mut seen = std::collections::HashSet::from([id]);
        let named: Vec<String> = hint
            .ancestors
            .iter()
            .take(MAX_HINTED_ANCESTORS)
            .take_while(|a| check_id(a).is_ok() && seen.insert(a.as_str()))
            .cloned()
            .collect();
        let wanted = missing_ancestors(local, key, &named);
        let mut budget = MAX_FIRST_PART;
        // An increment is small: one GET brings it, and the oldest ancestor's part gets
        // the pieces.
        let newest_pieces = if wanted.is_empty() {
            FIRST_PART_PIECES
        } else {
            1
        };
        let newest = first_part_shape(
            hint.first_parts.first().copied(),
            newest_pieces,
            &mut budget,
        );
        let ancestors = (0..wanted.len())
            .zip(wanted.iter().cloned())
            .map(|(i, ancestor)| {
                // The hint's sizes are the newest's first, then the ancestors'.
                let hinted = hint.first_parts.get(i + 1).copied();
                let pieces = first_part_pieces(i, wanted.len());
                (ancestor, first_part_shape(hinted, pieces, &mut budget))
            })
            .collect();
        let packed = hint
            .packed
            .iter()
            .filter(|level| check_id(&level.id).is_ok() && crate::packed::is_base_ref(&level.base))
            .take(MAX_HINTED_PACKED)
            .map(|level| (level.id.clone(), level.base.clone()))
            .collect();
        FirstRound {
            newest,
            ancestors,
            packed,
        }
    }

    /// The base of level `id`, if the hint says it is packed, and whether to fetch the
    /// base in the first round trip if this worker lacks it: for the first packed level
    /// the hint names only, so that a hostile hint costs one base (at most
    /// [`MAX_BASE_BYTES`]) beside its objects.
    fn packed_base(&self, id: &str) -> Option<(&str, bool)> {
        self.packed
            .iter()
            .position(|(level, _)| level == id)
            .map(|at| (self.packed[at].1.as_str(), at == 0))
    }
}

/// The first part of a page file to ask for: bytes, and the ranged GETs they come in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FirstPartShape {
    bytes: u64,
    pieces: u64,
}

impl FirstPartShape {
    /// [`FIRST_PART_SIZE`] in `pieces`: what is asked for without a hint's size.
    fn plain(pieces: u64) -> Self {
        FirstPartShape {
            bytes: FIRST_PART_SIZE,
            pieces,
        }
    }
}

/// What a GET for a range of an object of unknown size brought.
enum FirstRange {
    /// No such object.
    Missing,
    /// The range starts past its end.
    PastEnd,
    /// The bytes (at most the range's), and the object's whole size.
    Bytes(Vec<u8>, u64),
}

/// The first part of an object, fetched before its size was known.
#[derive(Debug, Default)]
struct FirstPart {
    /// Its bytes (all of them, for an object no larger than the part asked for).
    bytes: Vec<u8>,
    /// The object's whole size.
    size: u64,
}

/// What one snapshot's round trip brings: its manifest and the first part of its page
/// file and data archive (`None`: already in the cache, or no such object).
struct Level {
    manifest: Manifest,
    pages: Option<FirstPart>,
    data: Option<FirstPart>,
    /// Its packed page file object, asked for instead of the page file's first part when
    /// the hint says it is packed (README §5.7).
    packed: Option<Vec<u8>>,
}

/// Checks a downloaded page file against `manifest`'s chunk digests and a data archive
/// against its digest.
fn verify_download(
    manifest: &Manifest,
    pages: &Path,
    data: Option<&Path>,
) -> Result<(), StoreError> {
    crate::pagefile::verify(pages, manifest, 0, manifest.page_count).map_err(|e| {
        StoreError::Remote(format!(
            "snapshot {}: downloaded page file: {e}",
            manifest.id
        ))
    })?;
    verify_data(manifest, data)
}

/// Removes downloaded files that failed their check, so that the next attempt fetches
/// them again instead of finding them in the cache.
fn discard<'a>(files: impl IntoIterator<Item = Option<&'a PathBuf>>) {
    for file in files.into_iter().flatten() {
        let _ = std::fs::remove_file(file);
    }
}

/// Checks a downloaded data archive, if the snapshot has one, against its digest.
fn verify_data(manifest: &Manifest, data: Option<&Path>) -> Result<(), StoreError> {
    if let Some(data) = data {
        let mut file = std::fs::File::open(data).map_err(io("opening", data))?;
        let mut hasher = blake3::Hasher::new();
        let bytes = std::io::copy(&mut file, &mut hasher).map_err(io("reading", data))?;
        if bytes != manifest.data_bytes || *hasher.finalize().as_bytes() != manifest.data_digest {
            return Err(StoreError::Remote(format!(
                "snapshot {}: the downloaded data archive fails its digest",
                manifest.id
            )));
        }
    }
    Ok(())
}

/// The whole size from a Content-Range value (`bytes 0-99/12345`).
fn content_range_size(value: &str) -> Option<u64> {
    value.rsplit_once('/')?.1.trim().parse().ok()
}

/// A store of one app's snapshots in an S3 bucket.
#[derive(Debug)]
pub struct S3Store {
    conn: std::sync::Arc<S3Connection>,
    /// The app prefix it was opened on.
    app: String,
    prefix: String,
    cache_dir: PathBuf,
    /// Where copies of image bases are kept (shared by a worker's apps).
    bases_dir: PathBuf,
    scratch_dir: PathBuf,
}

/// What every [`S3Store`] of one bucket can share: the client, with its pool of open
/// connections, and the runtime that drives it. Sharing it keeps connections alive from
/// one swap-in to the next (over a wide-area link each new one costs a round trip for its
/// handshake), and keeps a worker of thousands of apps at one runtime.
pub struct S3Connection {
    client: Client,
    bucket: String,
    base_prefix: String,
    region: String,
    endpoint: Option<String>,
    /// Bytes sent and received in object bodies, for metrics.
    traffic: std::sync::Arc<Traffic>,
    /// Whether page files are deduplicated ([`S3Config::dedup`]).
    dedup: bool,
    /// The page indexes of the bases used last.
    bases: packed::BaseIndexes,
    /// Always `Some` until drop, which shuts it down without blocking.
    runtime: Option<tokio::runtime::Runtime>,
}

/// Bytes of object bodies a connection sent and received (headers and requests that
/// failed before their body are not counted; a body cut short counts what came).
#[derive(Debug, Default)]
pub struct Traffic {
    up: AtomicU64,
    down: AtomicU64,
}

impl Traffic {
    fn sent(&self, bytes: u64) {
        self.up.fetch_add(bytes, Ordering::Relaxed);
    }

    fn received(&self, bytes: u64) {
        self.down.fetch_add(bytes, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for S3Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Connection")
            .field("bucket", &self.bucket)
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl S3Connection {
    /// A client of the bucket `config` names. Nothing is sent to S3 yet; with a custom
    /// endpoint and no credentials in `config` or the environment, this fails at once.
    pub fn open(config: &S3Config) -> Result<std::sync::Arc<Self>, StoreError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("s3-io")
            .enable_all()
            .build()
            .map_err(S3Error::Runtime)?;
        let client = run_on_thread(&runtime, client(config))??;
        Ok(std::sync::Arc::new(Self {
            client,
            bucket: config.bucket.clone(),
            base_prefix: config.prefix.clone(),
            region: config.region.clone(),
            endpoint: config.endpoint.clone(),
            traffic: Default::default(),
            dedup: config.dedup,
            bases: Default::default(),
            runtime: Some(runtime),
        }))
    }
}

impl S3Connection {
    /// Bytes of object bodies sent to and received from S3 so far: (up, down).
    pub fn traffic(&self) -> (u64, u64) {
        (
            self.traffic.up.load(Ordering::Relaxed),
            self.traffic.down.load(Ordering::Relaxed),
        )
    }

    /// Keeps `connections` connections to the bucket's endpoint open from now on, with a
    /// HeadBucket on each every `period` (S3 closes a connection idle for about 20 s), so
    /// that a restore's parallel requests find them open: over a wide-area link each new
    /// connection costs a round trip for its handshake before its request. Stops when the
    /// connection is dropped.
    pub fn keep_warm(&self, connections: usize, period: std::time::Duration) {
        let (client, bucket) = (self.client.clone(), self.bucket.clone());
        let Some(runtime) = &self.runtime else {
            return;
        };
        runtime.spawn(async move {
            loop {
                let heads = (0..connections).map(|_| client.head_bucket().bucket(&bucket).send());
                for result in futures::future::join_all(heads).await {
                    if let Err(e) = result {
                        tracing::debug!(error = %DisplayErrorContext(&e), "keeping S3 connections open");
                    }
                }
                tokio::time::sleep(period).await;
            }
        });
    }
}

impl Drop for S3Connection {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which panics inside an async context; this does not.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl S3Store {
    /// A store for the app whose snapshots live under `{config.prefix}/{app_prefix}/`,
    /// caching fetched objects (and keeping scratch files) in `cache_dir`, created if
    /// missing, with a client of its own (see [`S3Store::on`] to share one). Nothing is
    /// sent to S3 yet; with a custom endpoint and no credentials in `config` or the
    /// environment, this fails at once.
    pub fn open(config: &S3Config, app_prefix: &str, cache_dir: &Path) -> Result<Self, StoreError> {
        Self::on(S3Connection::open(config)?, app_prefix, cache_dir)
    }

    /// [`S3Store::open`] over a shared connection.
    pub fn on(
        conn: std::sync::Arc<S3Connection>,
        app_prefix: &str,
        cache_dir: &Path,
    ) -> Result<Self, StoreError> {
        let prefix = join_prefix(&[&conn.base_prefix, app_prefix])?;
        let scratch_dir = cache_dir.join("scratch");
        private::create_dir_all(&scratch_dir).map_err(io("creating", &scratch_dir))?;
        let scratch_dir = scratch_dir
            .canonicalize()
            .map_err(io("resolving", &scratch_dir))?;
        Ok(Self {
            conn,
            app: app_prefix.to_string(),
            prefix,
            cache_dir: cache_dir.to_path_buf(),
            bases_dir: cache_dir.join("bases"),
            scratch_dir,
        })
    }

    /// Keeps copies of image bases in `dir` rather than in this store's cache, so that
    /// the stores of a worker's apps share them.
    pub fn with_bases_dir(mut self, dir: &Path) -> Self {
        self.bases_dir = dir.to_path_buf();
        self
    }

    /// Creates the bucket if it does not exist (for tests and demos).
    pub fn ensure_bucket(&self) -> Result<(), StoreError> {
        self.run(async {
            let url = format!("s3://{}", self.conn.bucket);
            match self
                .conn
                .client
                .head_bucket()
                .bucket(&self.conn.bucket)
                .send()
                .await
            {
                Ok(_) => return Ok(()),
                Err(e) if is_404(&e) => {}
                Err(e) => return Err(request("HeadBucket", url, &e)),
            }
            let mut create = self.conn.client.create_bucket().bucket(&self.conn.bucket);
            if self.conn.region != "us-east-1" {
                let constraint = BucketLocationConstraint::from(self.conn.region.as_str());
                create = create.create_bucket_configuration(
                    CreateBucketConfiguration::builder()
                        .location_constraint(constraint)
                        .build(),
                );
            }
            match create.send().await {
                Ok(_) => Ok(()),
                Err(e)
                    if e.as_service_error()
                        .is_some_and(|e| e.is_bucket_already_owned_by_you()) =>
                {
                    Ok(())
                }
                Err(e) => Err(request("CreateBucket", url, &e)),
            }
        })
    }

    fn key(&self, name: &str) -> String {
        format!("{}/{name}", self.prefix)
    }

    fn object_key(&self, id: &str, kind: &str) -> Result<String, StoreError> {
        check_id(id)?;
        Ok(self.key(&format!("{id}.{kind}")))
    }

    fn url(&self, key: &str) -> String {
        format!("s3://{}/{key}", self.conn.bucket)
    }

    fn missing(&self, id: &str) -> StoreError {
        StoreError::Missing {
            id: id.to_string(),
            store: self.describe(),
        }
    }

    /// Runs `work` to completion on the store's runtime, from a thread of its own.
    fn run<T: Send>(
        &self,
        work: impl Future<Output = Result<T, StoreError>> + Send,
    ) -> Result<T, StoreError> {
        let runtime = self.conn.runtime.as_ref().ok_or(S3Error::Panicked)?;
        run_on_thread(runtime, work)?
    }

    /// Makes the chain ending at snapshot `id` complete in `local`, with `id` its newest,
    /// in as few round trips as the chain allows (snapshots/README.md §5.1): the newest
    /// manifest with the first part of its objects; then, at once, the rest of those and
    /// every ancestor it lists that `local` lacks, each with the first part of its
    /// objects; then the rest of theirs. Returns the ids fetched. Every manifest is
    /// checked under `key` before anything it names is used.
    ///
    /// `hint` is what the caller expects of the chain (the hub keeps it with the app): the
    /// ancestors `local` lacks are asked for in the newest manifest's round trip, not
    /// after it, and each page file's first part is as large as its ActiveSet. It is only
    /// a guess: the manifests decide, and a wrong one costs only its GETs.
    pub fn fetch_chain(
        &self,
        local: &LocalStore,
        key: &SnapshotKey,
        id: &str,
        hint: &ChainHint,
    ) -> Result<Vec<String>, StoreError> {
        if local.is_chain_complete(id, key) {
            return Ok(Vec::new());
        }
        let fetched = self.run(async {
            let (newest, guessed) = self.first_round(local, key, id, hint).await?;
            let newest_manifest = newest.manifest.clone();
            let (newest, older) = futures::future::try_join(
                self.finish_level(newest),
                self.older_levels(local, key, &newest_manifest, guessed),
            )
            .await?;
            let older =
                futures::future::try_join_all(older.into_iter().map(|l| self.finish_level(l)))
                    .await?;
            Ok(std::iter::once(newest).chain(older).collect::<Vec<_>>())
        })?;
        // Oldest first, so that every commit's parent is already there.
        for (manifest, pages, data) in fetched.iter().rev() {
            local.commit(manifest, key, pages, data.as_deref())?;
        }
        if local.head()?.as_deref() != Some(id) {
            local.set_head(id, key)?;
        }
        Ok(fetched.into_iter().map(|(m, _, _)| m.id).collect())
    }

    /// The first round trip of a fetch of the chain ending at `id`, shaped by `hint`
    /// ([`FirstRound::plan`]): the newest level, and the hinted ancestors that came.
    async fn first_round(
        &self,
        local: &LocalStore,
        key: &SnapshotKey,
        id: &str,
        hint: &ChainHint,
    ) -> Result<(Level, Vec<Level>), StoreError> {
        let plan = FirstRound::plan(local, key, id, hint);
        let (newest, guessed) = futures::future::join(
            self.fetch_level(id, key, plan.newest, plan.packed_base(id)),
            self.expected_levels(&plan, key),
        )
        .await;
        Ok((newest?, guessed))
    }

    /// The levels `expected` (ancestors a caller expects a manifest to list, that the
    /// local store lacks: [`FirstRound::ancestors`]), fetched at once, before that manifest
    /// is in. A level that does not come (a wrong guess: no such snapshot) is left out;
    /// the manifest's own list decides what is used (see [`S3Store::older_levels`]).
    async fn expected_levels(&self, plan: &FirstRound, key: &SnapshotKey) -> Vec<Level> {
        let expected = &plan.ancestors;
        let levels = futures::future::join_all(expected.iter().map(|(ancestor, shape)| {
            self.fetch_level(ancestor, key, *shape, plan.packed_base(ancestor))
        }))
        .await;
        levels
            .into_iter()
            .zip(expected.iter().map(|(id, _)| id))
            .filter_map(|(level, id)| {
                level
                    .inspect_err(|e| tracing::debug!(id, "an expected ancestor: {e}"))
                    .ok()
            })
            .collect()
    }

    /// The ancestors of `newest` that `local` lacks, newest first, each with the first
    /// part of its objects: those `newest` lists, at once (taken from `guessed` where
    /// they came already), then one link at a time past the end of its list. Every link
    /// is checked: each is the parent its child names.
    async fn older_levels(
        &self,
        local: &LocalStore,
        key: &SnapshotKey,
        newest: &Manifest,
        mut guessed: Vec<Level>,
    ) -> Result<Vec<Level>, StoreError> {
        let wanted = missing_ancestors(local, key, &newest.ancestors);
        let mut older =
            futures::future::try_join_all(wanted.iter().enumerate().map(|(i, ancestor)| {
                match guessed
                    .iter()
                    .position(|level| &level.manifest.id == ancestor)
                {
                    Some(at) => futures::future::Either::Left(futures::future::ready(Ok(
                        guessed.swap_remove(at)
                    ))),
                    None => futures::future::Either::Right(self.fetch_level(
                        ancestor,
                        key,
                        FirstPartShape::plain(first_part_pieces(i, wanted.len())),
                        None,
                    )),
                }
            }))
            .await?;
        if !guessed.is_empty() {
            tracing::debug!(
                unused = guessed.len(),
                "ancestors expected by the caller are not in the manifest's list"
            );
        }
        // A chain longer than a manifest lists: one link at a time past its end.
        loop {
            let last = older.last().map_or(newest, |level| &level.manifest);
            let Some(parent) = last.parent.clone() else {
                break;
            };
            if local.is_complete(&parent, key) {
                break;
            }
            if older.len() >= MAX_FETCHED_CHAIN {
                return Err(self.broken_chain(last));
            }
            older.push(
                self.fetch_level(&parent, key, FirstPartShape::plain(1), None)
                    .await?,
            );
        }
        let mut child = newest;
        for level in &older {
            if child.parent.as_deref() != Some(level.manifest.id.as_str()) {
                return Err(self.broken_chain(child));
            }
            child = &level.manifest;
        }
        Ok(older)
    }

    /// Fetches what `level`'s first round trip left out of its page file (ActiveSet
    /// prefix first) and data archive. Returns its manifest and their local paths.
    async fn finish_level(
        &self,
        level: Level,
    ) -> Result<(Manifest, PathBuf, Option<PathBuf>), StoreError> {
        let m = &level.manifest;
        let pages = self.finish_pages(m, level.pages, level.packed);
        let data = async {
            if m.data_bytes > 0 {
                self.finish_object(&m.id, "data", m.data_bytes, 0, level.data)
                    .await
                    .map(Some)
            } else {
                Ok(None)
            }
        };
        let (pages, data) = futures::future::try_join(pages, data).await?;
        // Checked before the local store takes them: a restore maps the page file, and a
        // lazily touched page is checked against nothing but this.
        let (manifest, checked_pages, checked_data) = (m.clone(), pages.clone(), data.clone());
        tokio::task::spawn_blocking(move || {
            verify_download(&manifest, &checked_pages, checked_data.as_deref())
        })
        .await
        .map_err(|_| S3Error::Panicked)?
        .inspect_err(|_| discard([Some(&pages), data.as_ref()]))?;
        Ok((level.manifest, pages, data))
    }

    /// Fetches what `head` (the first part that came, if any) left out of `m`'s page file,
    /// ActiveSet prefix first; or, if no plain page file came, makes it from its packed
    /// object if S3 has one (README §5.7). Returns its local path, not yet checked.
    async fn finish_pages(
        &self,
        m: &Manifest,
        head: Option<FirstPart>,
        packed: Option<Vec<u8>>,
    ) -> Result<PathBuf, StoreError> {
        if let Some(path) = self.packed_pages(m, head.as_ref(), packed).await? {
            return Ok(path);
        }
        let size = m.page_file_bytes();
        let first = m.activeset_prefix.saturating_mul(PAGE_SIZE);
        self.finish_object(&m.id, "pages", size, first, head).await
    }

    /// Snapshot `id`'s manifest and the first part of its objects, in one round trip.
    /// The page file's first part is `pages` (see [`first_part_shape`]); or, if the hint
    /// says the level is packed against `packed_base`, its packed object and (unless this
    /// worker has it) that base.
    async fn fetch_level(
        &self,
        id: &str,
        key: &SnapshotKey,
        pages: FirstPartShape,
        packed_base: Option<(&str, bool)>,
    ) -> Result<Level, StoreError> {
        let pages_or_packed = async {
            match packed_base {
                Some((base, prefetch)) => {
                    let prefetched = async {
                        if prefetch {
                            self.prefetch_base(base).await
                        }
                    };
                    // In as many GETs as the page file's first part would take, so that
                    // the round trip asks for no more at once.
                    let pieces = pages.pieces.min(FIRST_PART_PIECES);
                    let (packed, ()) = futures::future::join(
                        Box::pin(self.packed_object(id, None, pieces)),
                        prefetched,
                    )
                    .await;
                    (Ok(None), packed)
                }
                None => (self.first_part(id, "pages", pages).await, Ok(None)),
            }
        };
        let (manifest, (pages, packed), data) = futures::future::join3(
            self.fetch_manifest(id, key),
            pages_or_packed,
            self.first_part(id, "data", FirstPartShape::plain(1)),
        )
        .await;
        // A first part that did not come (S3 answers 403 for a missing object without
        // list permission, for one) is fetched again once the manifest says what to ask.
        let speculative = |part: Result<Option<FirstPart>, StoreError>, kind: &str| {
            part.unwrap_or_else(|e| {
                tracing::debug!(id, kind, "first part: {e}");
                None
            })
        };
        Ok(Level {
            manifest: manifest?,
            pages: speculative(pages, "pages"),
            data: speculative(data, "data"),
            packed: packed.unwrap_or_else(|e: StoreError| {
                tracing::debug!(id, "packed page file: {e}");
                None
            }),
        })
    }

    /// The first `shape.bytes` of `{id}.{kind}` and its size, asked for in `shape.pieces`
    /// ranged GETs at once (over a wide-area link one connection is slow, and several are
    /// as fast each); `None` if the cache has a file of that name already (its
    /// size is checked once the manifest is in) or the object does not exist.
    async fn first_part(
        &self,
        id: &str,
        kind: &str,
        shape: FirstPartShape,
    ) -> Result<Option<FirstPart>, StoreError> {
        // The id checked before it names a file (a hint's ids come here unchecked).
        let key = self.object_key(id, kind)?;
        if self.cache_dir.join(format!("{id}.{kind}")).exists() {
            return Ok(None);
        }
        self.first_part_of(&key, shape).await
    }

    /// The first `shape.bytes` of object `key` and its size, in `shape.pieces` ranged GETs
    /// at once; `None` if the object does not exist.
    async fn first_part_of(
        &self,
        key: &str,
        shape: FirstPartShape,
    ) -> Result<Option<FirstPart>, StoreError> {
        let key = key.to_string();
        let total = shape.bytes.max(1);
        let piece = total.div_ceil(shape.pieces.clamp(1, total));
        // Counted again from the piece's size, so that no range is empty.
        let pieces = total.div_ceil(piece);
        let range = |k: u64| k * piece..((k + 1) * piece).min(total);
        let asked = std::time::Instant::now();
        let answers =
            futures::future::join_all((0..pieces).map(|k| self.first_range(&key, range(k)))).await;
        tracing::debug!(
            key,
            bytes = total,
            pieces,
            ms = asked.elapsed().as_secs_f64() * 1e3,
            "first part"
        );
        let mut bytes = Vec::new();
        let mut size = None;
        // A piece shorter than asked for must be the last with bytes: later ones would
        // land at the wrong offsets.
        let mut short = false;
        for (k, answer) in (0..).zip(answers) {
            match (answer?, k) {
                (FirstRange::Missing, 0) => return Ok(None),
                // An empty object has no byte 0 to ask for.
                (FirstRange::PastEnd, 0) => return Ok(Some(FirstPart::default())),
                (FirstRange::Missing | FirstRange::PastEnd, _) => break,
                (FirstRange::Bytes(part, whole), _) => {
                    if *size.get_or_insert(whole) != whole || (short && !part.is_empty()) {
                        return Err(S3Error::Length {
                            url: self.url(&key),
                            start: 0,
                            end: total,
                            got: whole,
                        }
                        .into());
                    }
                    let asked = range(k);
                    short |= (part.len() as u64) < asked.end - asked.start;
                    bytes.extend_from_slice(&part);
                }
            }
        }
        let size = size.unwrap_or(0);
        if bytes.len() as u64 != size.min(total) {
            return Err(S3Error::Length {
                url: self.url(&key),
                start: 0,
                end: size.min(total),
                got: bytes.len() as u64,
            }
            .into());
        }
        Ok(Some(FirstPart { bytes, size }))
    }

    /// Bytes `range` of object `key`, asked for before its size is known.
    async fn first_range(&self, key: &str, range: Range<u64>) -> Result<FirstRange, StoreError> {
        let get = self
            .conn
            .client
            .get_object()
            .bucket(&self.conn.bucket)
            .key(key)
            .range(format!("bytes={}-{}", range.start, range.end - 1));
        let out = match get.send().await {
            Ok(out) => out,
            Err(e) if is_404(&e) => return Ok(FirstRange::Missing),
            Err(SdkError::ServiceError(e)) if e.raw().status().as_u16() == 416 => {
                return Ok(FirstRange::PastEnd)
            }
            Err(e) => return Err(request("GetObject", self.url(key), &e)),
        };
        let size = out
            .content_range()
            .and_then(content_range_size)
            .or_else(|| out.content_length().and_then(|n| u64::try_from(n).ok()))
            .unwrap_or(0);
        let mut bytes = Vec::new();
        let mut body = out.body;
        let most = range.end - range.start;
        while let Some(chunk) = body.try_next().await.map_err(|e| S3Error::Request {
            op: "GetObject",
            url: self.url(key),
            detail: DisplayErrorContext(&e).to_string(),
        })? {
            self.conn.traffic.received(chunk.len() as u64);
            if (bytes.len() + chunk.len()) as u64 > most {
                return Err(S3Error::Length {
                    url: self.url(key),
                    start: range.start,
                    end: range.end,
                    got: (bytes.len() + chunk.len()) as u64,
                }
                .into());
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(FirstRange::Bytes(bytes, size))
    }

    /// The error for a manifest whose parent is not the snapshot its ancestors named.
    fn broken_chain(&self, manifest: &Manifest) -> StoreError {
        StoreError::Remote(format!(
            "snapshot {} in {}: its chain is broken (a parent that is not the one named, \
             or longer than {MAX_FETCHED_CHAIN})",
            manifest.id,
            self.url(&self.prefix)
        ))
    }

    /// The keys of every object directly under this store's prefix.
    async fn object_keys(&self) -> Result<Vec<String>, StoreError> {
        let objects = self.list_objects(&self.key(""), false).await?;
        Ok(objects.into_iter().map(|(key, _)| key).collect())
    }

    /// Every object under `prefix` (directly under it, or at any depth if `nested`), with
    /// when it was last written.
    async fn list_objects(
        &self,
        prefix: &str,
        nested: bool,
    ) -> Result<Vec<(String, Option<std::time::SystemTime>)>, StoreError> {
        let mut objects = Vec::new();
        let mut token = None;
        loop {
            let list = self.conn.client.list_objects_v2().bucket(&self.conn.bucket);
            let out = list
                .prefix(prefix)
                .set_delimiter((!nested).then(|| "/".to_string()))
                .set_continuation_token(token)
                .send()
                .await
                .map_err(|e| request("ListObjectsV2", self.url(prefix), &e))?;
            objects.extend(out.contents().iter().filter_map(|object| {
                let modified = object
                    .last_modified()
                    .and_then(|t| std::time::SystemTime::try_from(*t).ok());
                Some((object.key()?.to_string(), modified))
            }));
            token = out.next_continuation_token().map(str::to_string);
            if token.is_none() || out.is_truncated() != Some(true) {
                break;
            }
        }
        Ok(objects)
    }

    /// Deletes every object under this store's prefix: its snapshots, HEAD, and what an
    /// interrupted deletion left (a page file whose manifest went first, which
    /// [`Store::list`] no longer names). For an app that is removed. Page files that are
    /// their image's base stay (with their markers), for [`S3Store::collect_garbage`].
    pub fn remove_everything(&self) -> Result<usize, StoreError> {
        self.run(async {
            let mut keys = self.object_keys().await?;
            let bases: Vec<String> = keys
                .iter()
                .filter_map(|key| key.strip_suffix(".base"))
                .map(str::to_string)
                .collect();
            keys.retain(|key| {
                let stem = key
                    .strip_suffix(".base")
                    .or_else(|| key.strip_suffix(".pages"));
                stem.is_none_or(|stem| !bases.iter().any(|base| base == stem))
            });
            for batch in keys.chunks(PARALLEL_GETS) {
                futures::future::try_join_all(batch.iter().map(|key| self.delete(key))).await?;
            }
            Ok(keys.len())
        })
    }

    /// Deletes object `key` (S3 answers success for a missing one too).
    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let delete = self
            .conn
            .client
            .delete_object()
            .bucket(&self.conn.bucket)
            .key(key);
        delete
            .send()
            .await
            .map(drop)
            .map_err(|e| request("DeleteObject", self.url(key), &e))
    }

    /// The size of an object, or `None` if it does not exist.
    async fn object_size(&self, key: &str) -> Result<Option<u64>, StoreError> {
        Ok(self
            .head_object(key)
            .await?
            .map(|out| out.content_length().unwrap_or(0).max(0) as u64))
    }

    /// When object `key` was last written (`None` if it is gone).
    async fn object_modified(
        &self,
        key: &str,
    ) -> Result<Option<std::time::SystemTime>, StoreError> {
        Ok(self.head_object(key).await?.and_then(|out| {
            out.last_modified()
                .and_then(|t| std::time::SystemTime::try_from(*t).ok())
        }))
    }

    /// What a HEAD of object `key` says, or `None` if it does not exist.
    async fn head_object(
        &self,
        key: &str,
    ) -> Result<Option<aws_sdk_s3::operation::head_object::HeadObjectOutput>, StoreError> {
        let head = self
            .conn
            .client
            .head_object()
            .bucket(&self.conn.bucket)
            .key(key);
        match head.send().await {
            Ok(out) => Ok(Some(out)),
            Err(e) if is_404(&e) => Ok(None),
            Err(e) => Err(request("HeadObject", self.url(key), &e)),
        }
    }

    /// A whole small object, or `None` if it does not exist; refused past `cap` bytes.
    async fn get_small(&self, key: &str, cap: u64) -> Result<Option<Vec<u8>>, StoreError> {
        let get = self
            .conn
            .client
            .get_object()
            .bucket(&self.conn.bucket)
            .key(key);
        let out = match get.send().await {
            Ok(out) => out,
            Err(e)
                if e.as_service_error().is_some_and(|e| e.is_no_such_key())
                    || (is_404(&e) && e.code() != Some("NoSuchBucket")) =>
            {
                return Ok(None)
            }
            Err(e) => return Err(request("GetObject", self.url(key), &e)),
        };
        let length = out.content_length().unwrap_or(0).max(0) as u64;
        if length > cap {
            return Err(S3Error::Request {
                op: "GetObject",
                url: self.url(key),
                detail: format!("{length} bytes, over the {cap}-byte limit"),
            }
            .into());
        }
        let bytes = out.body.collect().await.map_err(|e| S3Error::Request {
            op: "GetObject",
            url: self.url(key),
            detail: DisplayErrorContext(&e).to_string(),
        })?;
        let bytes = bytes.to_vec();
        self.conn.traffic.received(bytes.len() as u64);
        Ok(Some(bytes))
    }

    async fn put_bytes(&self, key: &str, bytes: Vec<u8>) -> Result<(), StoreError> {
        let length = bytes.len() as u64;
        let put = self
            .conn
            .client
            .put_object()
            .bucket(&self.conn.bucket)
            .key(key);
        put.body(ByteStream::from(bytes))
            .send()
            .await
            .map_err(|e| request("PutObject", self.url(key), &e))?;
        self.conn.traffic.sent(length);
        Ok(())
    }

    async fn fetch_manifest(&self, id: &str, key: &SnapshotKey) -> Result<Manifest, StoreError> {
        let object = self.object_key(id, "manifest")?;
        let asked = std::time::Instant::now();
        let bytes = match self.get_small(&object, MAX_MANIFEST_FILE).await {
            Ok(Some(bytes)) => bytes,
            Ok(None) => return Err(self.missing(id)),
            Err(e) => return Err(e),
        };
        tracing::debug!(
            object,
            ms = asked.elapsed().as_secs_f64() * 1e3,
            "manifest fetched"
        );
        decode_manifest(id, &bytes, key)
    }

    /// Uploads the local file `path` as `key`: in one PUT if it is small, else as a
    /// multipart upload of [`PART_SIZE`] parts, [`PARALLEL_PARTS`] at a time.
    async fn upload(&self, path: &Path, key: &str) -> Result<(), StoreError> {
        let size = std::fs::metadata(path).map_err(io("reading", path))?.len();
        let started = Instant::now();
        if size <= PART_SIZE {
            let body = ByteStream::from_path(path)
                .await
                .map_err(|e| io("reading", path)(std::io::Error::other(e)))?;
            let put = self
                .conn
                .client
                .put_object()
                .bucket(&self.conn.bucket)
                .key(key);
            put.body(body)
                .send()
                .await
                .map_err(|e| request("PutObject", self.url(key), &e))?;
        } else {
            self.upload_multipart(path, key, size).await?;
        }
        self.conn.traffic.sent(size);
        tracing::debug!(
            key,
            bytes = size,
            ms = started.elapsed().as_millis() as u64,
            "S3 upload"
        );
        Ok(())
    }

    async fn upload_multipart(&self, path: &Path, key: &str, size: u64) -> Result<(), StoreError> {
        let create = self
            .conn
            .client
            .create_multipart_upload()
            .bucket(&self.conn.bucket)
            .key(key);
        let created = create
            .send()
            .await
            .map_err(|e| request("CreateMultipartUpload", self.url(key), &e))?;
        let upload_id = created.upload_id().ok_or_else(|| S3Error::Request {
            op: "CreateMultipartUpload",
            url: self.url(key),
            detail: "no upload id in the answer".into(),
        })?;
        let mut result = self.upload_parts(path, key, upload_id, size).await;
        if let Ok(parts) = result {
            let complete = self
                .conn
                .client
                .complete_multipart_upload()
                .bucket(&self.conn.bucket);
            result = complete
                .key(key)
                .upload_id(upload_id)
                .multipart_upload(
                    CompletedMultipartUpload::builder()
                        .set_parts(Some(parts))
                        .build(),
                )
                .send()
                .await
                .map(|_| Vec::new())
                .map_err(|e| request("CompleteMultipartUpload", self.url(key), &e));
        }
        if result.is_err() {
            let abort = self
                .conn
                .client
                .abort_multipart_upload()
                .bucket(&self.conn.bucket);
            let _ = abort.key(key).upload_id(upload_id).send().await;
        }
        result.map(|_| ())
    }

    async fn upload_parts(
        &self,
        path: &Path,
        key: &str,
        upload_id: &str,
        size: u64,
    ) -> Result<Vec<CompletedPart>, StoreError> {
        let part_size = PART_SIZE.max(size.div_ceil(MAX_PARTS));
        let jobs = split(0..size, part_size).enumerate().map(|(index, range)| {
            let number = i32::try_from(index + 1).unwrap_or(i32::MAX);
            let (client, bucket, url) = (
                self.conn.client.clone(),
                self.conn.bucket.clone(),
                self.url(key),
            );
            let (key, upload_id, path) = (key.to_string(), upload_id.to_string(), path.to_owned());
            async move {
                let body = ByteStream::read_from()
                    .path(&path)
                    .offset(range.start)
                    .length(Length::Exact(range.end - range.start))
                    .build()
                    .await
                    .map_err(|e| io("reading", &path)(std::io::Error::other(e)))?;
                let part = client.upload_part().bucket(bucket).key(key);
                let out = part
                    .upload_id(upload_id)
                    .part_number(number)
                    .body(body)
                    .send()
                    .await
                    .map_err(|e| request("UploadPart", url, &e))?;
                Ok(CompletedPart::builder()
                    .set_e_tag(out.e_tag().map(str::to_string))
                    .part_number(number)
                    .build())
            }
        });
        parallel(jobs, PARALLEL_PARTS).await
    }

    /// Fetches the object `key` of `size` bytes into `dest` (through a temporary file, then
    /// renamed) with parallel ranged GETs, the range `[0, first)` first.
    async fn download(
        &self,
        key: &str,
        size: u64,
        first: u64,
        have: &[u8],
        dest: &Path,
    ) -> Result<(), StoreError> {
        self.download_in(key, size, (first, ACTIVE_PART_SIZE), have, dest)
            .await
    }

    /// [`S3Store::download`], its first `first.0` bytes in GETs of `first.1` bytes.
    async fn download_in(
        &self,
        key: &str,
        size: u64,
        first: (u64, u64),
        have: &[u8],
        dest: &Path,
    ) -> Result<(), StoreError> {
        let started = Instant::now();
        let serial = next_serial();
        let name = dest.file_name().unwrap_or_default().to_string_lossy();
        let tmp = dest.with_file_name(format!(".{name}.{}-{serial}.download", std::process::id()));
        let result = self.download_to(key, size, first, have, &tmp).await;
        let result =
            result.and_then(|()| std::fs::rename(&tmp, dest).map_err(io("renaming", dest)));
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        let ms = started.elapsed().as_millis() as u64;
        tracing::debug!(key, bytes = size, ms, "S3 download");
        result
    }

    /// Fetches the object `key` of `size` bytes into `tmp`, of which `have` (its first
    /// bytes) is already here.
    async fn download_to(
        &self,
        key: &str,
        size: u64,
        (first, first_part): (u64, u64),
        have: &[u8],
        tmp: &Path,
    ) -> Result<(), StoreError> {
        let file = private::create_file(tmp).map_err(io("creating", tmp))?;
        file.set_len(size).map_err(io("sizing", tmp))?;
        file.write_all_at(have, 0).map_err(io("writing", tmp))?;
        let file = Arc::new(file);
        let parts = ranges(size, have.len() as u64, first, first_part, PART_SIZE);
        let jobs = parts.into_iter().map(|range| {
            let (client, bucket, key) = (
                self.conn.client.clone(),
                self.conn.bucket.clone(),
                key.to_string(),
            );
            let (file, tmp, url) = (file.clone(), tmp.to_owned(), self.url(&key));
            let traffic = self.conn.traffic.clone();
            async move {
                let got = fetch_range(&client, &bucket, &key, &url, range, &file, &tmp).await;
                if let Ok(bytes) = &got {
                    traffic.received(*bytes);
                }
                got.map(drop)
            }
        });
        parallel(jobs, PARALLEL_GETS).await.map(|_| ())
    }

    /// Fetches `{id}.{kind}`, an object of `size` bytes, into the cache unless it is there
    /// with that size, and returns its local path. `head` is its first part if that came
    /// already; it must have been cut from an object of `size` bytes.
    async fn finish_object(
        &self,
        id: &str,
        kind: &str,
        size: u64,
        first: u64,
        head: Option<FirstPart>,
    ) -> Result<PathBuf, StoreError> {
        let dest = self.cache_dir.join(format!("{id}.{kind}"));
        if head.is_none() && std::fs::metadata(&dest).is_ok_and(|meta| meta.len() == size) {
            return Ok(dest);
        }
        let key = self.object_key(id, kind)?;
        let have = match head {
            Some(head) if head.size != size || head.bytes.len() as u64 > size => {
                return Err(S3Error::Length {
                    url: self.url(&key),
                    start: 0,
                    end: size,
                    got: head.size,
                }
                .into())
            }
            Some(head) => head.bytes,
            None => Vec::new(),
        };
        self.download(&key, size, first, &have, &dest).await?;
        Ok(dest)
    }

    /// Whether `path` is one of this store's scratch files (which a commit removes).
    fn is_scratch(&self, path: &Path) -> bool {
        path.parent()
            .and_then(|dir| dir.canonicalize().ok())
            .is_some_and(|dir| dir == self.scratch_dir)
    }

    async fn commit_async(
        &self,
        manifest: &Manifest,
        key: &SnapshotKey,
        pages: &Path,
        data: Option<&Path>,
    ) -> Result<(), StoreError> {
        let id = &manifest.id;
        let data_key = self.object_key(id, "data")?;
        let upload_data = async {
            match data {
                Some(data) => self.upload(data, &data_key).await,
                None => Ok(()),
            }
        };
        let (pages_done, data_done) = tokio::join!(self.upload_pages(manifest, pages), upload_data);
        let stored = pages_done?;
        data_done?;
        self.put_bytes(&self.object_key(id, "manifest")?, manifest.encode(key))
            .await?;
        self.put_bytes(&self.key("HEAD"), format!("{id}\n").into_bytes())
            .await?;
        // Only a committed snapshot's page file becomes its image's base: garbage
        // collection takes a base whose manifest is missing for one whose snapshot went.
        if let PagesStored::Base(promotion) = stored {
            self.promote(promotion, pages).await;
        }
        Ok(())
    }
}

/// A number no other temporary file of this process has: stores of one app, or of one
/// image's base, may write into the same directory at once.
fn next_serial() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Runs `jobs` as tasks, started in order and at most `at_once` at a time, and returns
/// their results in order, or the first error (dropping the rest aborts them).
async fn parallel<T, F>(
    jobs: impl IntoIterator<Item = F>,
    at_once: usize,
) -> Result<Vec<T>, StoreError>
where
    T: Send + 'static,
    F: Future<Output = Result<T, StoreError>> + Send + 'static,
{
    let limit = Arc::new(Semaphore::new(at_once.max(1)));
    let mut tasks = JoinSet::new();
    for (index, job) in jobs.into_iter().enumerate() {
        let permit = limit.clone().acquire_owned().await;
        tasks.spawn(async move {
            let _permit = permit;
            (index, job.await)
        });
    }
    let mut results = Vec::new();
    while let Some(done) = tasks.join_next().await {
        let (index, result) = done.map_err(|_| S3Error::Panicked)?;
        results.push((index, result?));
    }
    results.sort_by_key(|(index, _)| *index);
    Ok(results.into_iter().map(|(_, result)| result).collect())
}

/// Runs `work` on `runtime` from a new thread, so the caller may be anywhere, even inside
/// another runtime.
fn run_on_thread<T: Send>(
    runtime: &tokio::runtime::Runtime,
    work: impl Future<Output = T> + Send,
) -> Result<T, S3Error> {
    std::thread::scope(|scope| {
        // Deep async state machines (a chain's levels, each with its GETs) on the stack
        // of a debug build: more than the default 2 MiB.
        std::thread::Builder::new()
            .name("s3-call".into())
            .stack_size(16 << 20)
            .spawn_scoped(scope, || runtime.block_on(work))
            .map_err(S3Error::Thread)?
            .join()
            .map_err(|_| S3Error::Panicked)
    })
}

fn request<E>(op: &'static str, url: String, error: &SdkError<E, HttpResponse>) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    S3Error::Request {
        op,
        url,
        detail: sdk_detail(error),
    }
    .into()
}

/// GETs `range` of `key` and writes it at the same offset of `file`; returns its length.
async fn fetch_range(
    client: &Client,
    bucket: &str,
    key: &str,
    url: &str,
    range: Range<u64>,
    file: &std::fs::File,
    path: &Path,
) -> Result<u64, StoreError> {
    let get = client.get_object().bucket(bucket).key(key);
    let out = get
        .range(format!("bytes={}-{}", range.start, range.end - 1))
        .send()
        .await
        .map_err(|e| request("GetObject", url.to_string(), &e))?;
    let mut body = out.body;
    let mut at = range.start;
    let short = |got: u64| S3Error::Length {
        url: url.to_string(),
        start: range.start,
        end: range.end,
        got,
    };
    while let Some(bytes) = body.try_next().await.map_err(|e| S3Error::Request {
        op: "GetObject",
        url: url.to_string(),
        detail: DisplayErrorContext(&e).to_string(),
    })? {
        if at + bytes.len() as u64 > range.end {
            return Err(short(at + bytes.len() as u64 - range.start).into());
        }
        // A write of one body chunk into the page cache: microseconds, fine on a runtime
        // thread.
        file.write_all_at(&bytes, at).map_err(io("writing", path))?;
        at += bytes.len() as u64;
    }
    if at != range.end {
        return Err(short(at - range.start).into());
    }
    Ok(range.end - range.start)
}

/// Builds the S3 client for `config`.
async fn client(config: &S3Config) -> Result<Client, StoreError> {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(Region::new(config.region.clone()));
    if let (Some(access), Some(secret)) = (&config.access_key, &config.secret_key) {
        let credentials = Credentials::new(access, secret, None, None, "picocenter-config");
        loader = loader.credentials_provider(credentials);
    } else if let Some(endpoint) = &config.endpoint {
        loader = loader.credentials_provider(local_credentials(endpoint).await?);
    }
    let shared = loader.load().await;
    let mut builder = aws_sdk_s3::config::Builder::from(&shared)
        .force_path_style(config.path_style)
        // A connection that answers nothing fails its request (which the SDK retries),
        // instead of holding up a restore or a swap-out for ever.
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(CONNECT_TIMEOUT)
                .read_timeout(FIRST_BYTE_TIMEOUT)
                .build(),
        )
        .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
        .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
    if let Some(endpoint) = &config.endpoint {
        builder = builder.endpoint_url(endpoint);
    }
    Ok(Client::from_conf(builder.build()))
}

/// Credentials for a custom endpoint, from the environment or the profile files only (no
/// instance-metadata probing, which would hang off AWS), checked now.
async fn local_credentials(endpoint: &str) -> Result<SharedCredentialsProvider, StoreError> {
    use aws_config::environment::EnvironmentVariableCredentialsProvider;
    use aws_config::meta::credentials::CredentialsProviderChain;
    use aws_config::profile::ProfileFileCredentialsProvider;
    use aws_sdk_s3::config::ProvideCredentials;
    let chain = CredentialsProviderChain::first_try(
        "environment",
        EnvironmentVariableCredentialsProvider::new(),
    )
    .or_else("profile", ProfileFileCredentialsProvider::builder().build());
    match chain.provide_credentials().await {
        Ok(_) => Ok(SharedCredentialsProvider::new(chain)),
        Err(e) => Err(S3Error::NoCredentials {
            endpoint: endpoint.to_string(),
            detail: DisplayErrorContext(&e).to_string(),
        }
        .into()),
    }
}

impl Store for S3Store {
    fn describe(&self) -> String {
        match &self.conn.endpoint {
            Some(endpoint) => format!("s3://{}/{} at {endpoint}", self.conn.bucket, self.prefix),
            None => format!("s3://{}/{}", self.conn.bucket, self.prefix),
        }
    }

    fn head(&self) -> Result<Option<String>, StoreError> {
        let key = self.key("HEAD");
        let Some(bytes) = self.run(self.get_small(&key, MAX_HEAD_SIZE))? else {
            return Ok(None);
        };
        let id = String::from_utf8_lossy(&bytes).trim().to_string();
        check_id(&id)?;
        Ok(Some(id))
    }

    fn manifest(&self, id: &str, key: &SnapshotKey) -> Result<Manifest, StoreError> {
        self.run(self.fetch_manifest(id, key))
    }

    /// Uploads the snapshot, then makes it the newest. Unlike [`crate::LocalStore`], the
    /// input files are left in place unless they are this store's own scratch files
    /// ([`Store::scratch`]), which are removed once uploaded.
    fn commit(
        &self,
        manifest: &Manifest,
        key: &SnapshotKey,
        pages: &Path,
        data: Option<&Path>,
    ) -> Result<(), StoreError> {
        self.run(self.commit_async(manifest, key, pages, data))?;
        for path in std::iter::once(pages).chain(data) {
            if self.is_scratch(path) {
                let _ = std::fs::remove_file(path);
            }
        }
        Ok(())
    }

    /// Fetches the page file into `{cache_dir}/{id}.pages` (unless it is there with the
    /// object's size). It returns once the whole file is in, so the order of its ranges
    /// gives the caller nothing ([`S3Store::fetch_chain`], which has the manifests, puts
    /// the ActiveSet prefix first).
    fn page_file(&self, id: &str) -> Result<PathBuf, StoreError> {
        let key = self.object_key(id, "pages")?;
        self.run(async {
            match self.object_size(&key).await? {
                Some(size) => self.finish_object(id, "pages", size, 0, None).await,
                None => self
                    .packed_page_file(id)
                    .await?
                    .ok_or_else(|| self.missing(id)),
            }
        })
    }

    fn data_archive(&self, id: &str) -> Result<Option<PathBuf>, StoreError> {
        let key = self.object_key(id, "data")?;
        self.run(async {
            match self.object_size(&key).await? {
                Some(size) => self
                    .finish_object(id, "data", size, 0, None)
                    .await
                    .map(Some),
                None => Ok(None),
            }
        })
    }

    fn list(&self) -> Result<Vec<String>, StoreError> {
        let prefix = self.key("");
        let mut ids: Vec<String> = self
            .run(self.object_keys())?
            .iter()
            .filter_map(|key| key.strip_prefix(&prefix))
            .filter_map(|name| name.strip_suffix(".manifest"))
            .filter(|id| check_id(id).is_ok())
            .map(str::to_string)
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// Removes the snapshot's objects (the manifest first) and its cached copies. A page
    /// file that is its image's base stays, for [`S3Store::collect_garbage`].
    fn remove(&self, id: &str) -> Result<(), StoreError> {
        // The manifest first, alone: a snapshot without it is not listed nor restorable,
        // whatever becomes of the rest. Then its objects at once.
        let kinds = ["manifest", "pages", "data", "packed"];
        let keys = kinds.map(|kind| self.object_key(id, kind));
        let [manifest, pages, data, packed] = keys;
        let (manifest, pages, data, packed) = (manifest?, pages?, data?, packed?);
        self.run(async {
            self.delete(&manifest).await?;
            let pages = async {
                match self.is_base(id).await? {
                    true => Ok(()),
                    false => self.delete(&pages).await,
                }
            };
            futures::future::try_join3(pages, self.delete(&data), self.delete(&packed)).await?;
            Ok(())
        })?;
        for kind in kinds {
            let cached = self.cache_dir.join(format!("{id}.{kind}"));
            match std::fs::remove_file(&cached) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(io("removing", &cached)(e))
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Bytes the snapshot's own objects take: a packed page file counts what it stores,
    /// not the base it shares.
    fn size(&self, id: &str) -> Result<u64, StoreError> {
        let keys = ["manifest", "pages", "data", "packed"].map(|kind| self.object_key(id, kind));
        let [manifest, pages, data, packed] = keys;
        let (manifest, pages, data, packed) = (manifest?, pages?, data?, packed?);
        self.run(async {
            let (manifest, pages, data, packed) = tokio::join!(
                self.object_size(&manifest),
                self.object_size(&pages),
                self.object_size(&data),
                self.object_size(&packed)
            );
            Ok([manifest?, pages?, data?, packed?]
                .into_iter()
                .map(|size| size.unwrap_or(0))
                .sum())
        })
    }

    /// `{cache_dir}/scratch/{id}.{kind}`: files there are removed by [`Store::commit`].
    fn scratch(&self, id: &str, kind: &str) -> Result<PathBuf, StoreError> {
        check_id(id)?;
        check_id(kind)?;
        Ok(self.scratch_dir.join(format!("{id}.{kind}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hostile_chain_hint_costs_a_few_gets_at_most() {
        let dir = tempfile::tempdir().unwrap();
        let local = LocalStore::open(dir.path()).unwrap();
        let key = SnapshotKey::from_bytes([3; 32]);
        let plan = |ancestors: &[&str], first_parts: &[u64]| {
            let hint = ChainHint {
                ancestors: ancestors.iter().map(|a| a.to_string()).collect(),
                first_parts: first_parts.to_vec(),
                packed: Vec::new(),
            };
            FirstRound::plan(&local, &key, "new", &hint)
        };
        let named = |round: &FirstRound| -> Vec<String> {
            round.ancestors.iter().map(|(id, _)| id.clone()).collect()
        };
        // No hint: the newest's 2 MiB in four pieces.
        let none = plan(&[], &[]);
        assert_eq!(
            none.newest,
            FirstPartShape {
                bytes: 2 << 20,
                pieces: 4
            }
        );
        assert!(none.ancestors.is_empty());
        // A chain of two, the full one's hot pages 8 MiB in.
        let two = plan(&["full"], &[4096, 8 << 20]);
        assert_eq!(
            two.newest,
            FirstPartShape {
                bytes: 2 << 20,
                pieces: 1
            }
        );
        assert_eq!(named(&two), ["full"]);
        assert_eq!(
            two.ancestors[0].1,
            FirstPartShape {
                bytes: 8 << 20,
                pieces: 8
            }
        );
        // Repeats, the snapshot itself, a name that is not an id, and a long list stop
        // the list; sizes past the budget (or absurd) fall back to 2 MiB.
        assert_eq!(named(&plan(&["a", "b", "a", "c"], &[])), ["a", "b"]);
        assert_eq!(named(&plan(&["a", "new", "b"], &[])), ["a"]);
        assert_eq!(named(&plan(&["a", "../b", "c"], &[])), ["a"]);
        let many: Vec<String> = (0..64).map(|i| format!("s{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert_eq!(plan(&many, &[]).ancestors.len(), MAX_HINTED_ANCESTORS);
        let absurd = plan(&["a", "b"], &[u64::MAX, 12 << 20, 12 << 20]);
        assert_eq!(absurd.newest.bytes, 2 << 20);
        let bytes: Vec<u64> = absurd.ancestors.iter().map(|(_, s)| s.bytes).collect();
        // The budget (16 MiB) takes one 12 MiB part, not two.
        assert_eq!(bytes, [12 << 20, 2 << 20]);
    }

    #[test]
    fn ranges_put_the_activeset_prefix_first_and_cover_the_object() {
        assert_eq!(ranges(0, 0, 0, 10, 10), Vec::<Range<u64>>::new());
        assert_eq!(ranges(25, 0, 0, 10, 10), [0..10, 10..20, 20..25]);
        assert_eq!(ranges(25, 0, 3, 10, 10), [0..3, 3..13, 13..23, 23..25]);
        assert_eq!(ranges(25, 0, 14, 10, 10), [0..10, 10..14, 14..24, 24..25]);
        assert_eq!(ranges(25, 0, 99, 10, 10), [0..10, 10..20, 20..25]);
        // Smaller parts in the ActiveSet prefix.
        assert_eq!(
            ranges(25, 0, 14, 5, 10),
            [0..5, 5..10, 10..14, 14..24, 24..25]
        );
        // What came with the manifest is not asked for again.
        assert_eq!(ranges(25, 7, 14, 5, 10), [7..12, 12..14, 14..24, 24..25]);
        assert_eq!(
            ranges(25, 20, 14, 5, 10),
            vec![Range { start: 20, end: 25 }]
        );
        assert_eq!(ranges(25, 25, 14, 5, 10), Vec::<Range<u64>>::new());
        assert_eq!(ranges(25, 99, 14, 5, 10), Vec::<Range<u64>>::new());
        assert_eq!(content_range_size("bytes 0-99/12345"), Some(12345));
        assert_eq!(content_range_size("bytes */0"), Some(0));
        assert_eq!(content_range_size("bytes 0-9"), None);
    }

    #[test]
    fn prefixes_join_and_refuse_escapes() {
        assert_eq!(join_prefix(&["", "app"]).unwrap(), "app");
        assert_eq!(join_prefix(&["/snaps/", "app/"]).unwrap(), "snaps/app");
        for bad in [&["", ""][..], &["snaps", ".."], &["./x"]] {
            assert!(join_prefix(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn config_fields_default_in_json() {
        let config: S3Config = serde_json::from_str(r#"{"bucket":"b"}"#).unwrap();
        assert_eq!(config.region, "us-east-1");
        assert_eq!(config.bucket, "b");
        assert!(!config.path_style && config.endpoint.is_none());
        let text = serde_json::to_string(&config).unwrap();
        assert_eq!(serde_json::from_str::<S3Config>(&text).unwrap(), config);
    }
}
