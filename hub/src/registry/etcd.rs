//! The registry in etcd, shared by any number of hubs. Under `{prefix}/`:
//!
//! | key | value | lives |
//! |---|---|---|
//! | `apps/{name}` | the app's record (JSON) | until removed |
//! | `workers/{id}` | a live worker ([`WorkerRecord`], JSON) | under a lease the hub that takes the worker's reports renews: it ends [`worker TTL`](RegistryStore::worker_alive) after the last report |
//! | `hubs/{id}` | a hub serving the registry ([`HubRecord`], JSON) | under that hub's lease of [`HUB_LEASE_TTL`] s |
//!
//! Every write is a transaction that first checks that this hub's key is still under
//! its lease (a hub cut off from etcd for longer than the TTL writes nothing more), and
//! that each record it writes is at the revision the hub read (etcd's `mod_revision`):
//! two hubs never overwrite each other's changes, and of two hubs ordering one app's
//! restore exactly one succeeds. Each hub follows the others' writes with one watch on
//! the prefix, which also keeps its view of the live workers and hubs.
//!
//! A worker never talks to etcd: it reports to a hub (any of them), and the hub renews
//! the worker's lease. The worker, which runs tenants' code, holds no credentials of the
//! registry, and a worker that stops reporting is dead for every hub at once when its
//! lease ends, whichever hub it reported to.
//!
//! The client is async (gRPC); the registry's interface is not, so the client runs on a
//! runtime of its own and each call waits for its answer, bounded by [`CALL_TIMEOUT`].

use super::{AppChange, HubRecord, RegistryError, RegistryStore, Versioned, WorkerRecord};
use crate::model::AppRecord;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, LeaseKeepAliveStream,
    LeaseKeeper, PutOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long one call to etcd may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Seconds a hub's key outlives the hub's last keep-alive.
pub const HUB_LEASE_TTL: i64 = 5;
/// How long a hub waits for the key of an earlier hub with its id to end.
pub const HOLD_WAIT: Duration = Duration::from_secs(2 * HUB_LEASE_TTL as u64);
/// The key prefix when `--registry` names none.
pub const DEFAULT_PREFIX: &str = "picocenter";
/// How long the watch waits before following again after it broke.
const REWATCH_DELAY: Duration = Duration::from_millis(200);

/// Where the registry is in etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// The cluster's client URLs (`http://HOST:PORT`).
    pub endpoints: Vec<String>,
    /// The keys' prefix, without a trailing slash.
    pub prefix: String,
}

impl EtcdConfig {
    /// Parses `etcd://HOST:PORT[,HOST:PORT...][/PREFIX]`.
    pub fn parse(text: &str) -> Result<Self, RegistryError> {
        let bad = || RegistryError::Config(text.to_string());
        let rest = text.strip_prefix("etcd://").ok_or_else(bad)?;
        let (hosts, prefix) = match rest.split_once('/') {
            Some((hosts, prefix)) => (hosts, prefix.trim_end_matches('/')),
            None => (rest, DEFAULT_PREFIX),
        };
        let endpoints: Vec<String> = hosts
            .split(',')
            .map(|host| {
                let (name, port) = host.rsplit_once(':').ok_or_else(bad)?;
                let port: u16 = port.parse().map_err(|_| bad())?;
                if name.is_empty() || port == 0 {
                    return Err(bad());
                }
                Ok(format!("http://{name}:{port}"))
            })
            .collect::<Result<_, _>>()?;
        let prefix_ok = !prefix.is_empty()
            && prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b));
        if !prefix_ok {
            return Err(bad());
        }
        Ok(Self {
            endpoints,
            prefix: prefix.to_string(),
        })
    }

    /// The prefix every key of this registry starts with.
    fn all(&self) -> String {
        format!("{}/", self.prefix)
    }

    fn apps(&self) -> String {
        format!("{}/apps/", self.prefix)
    }

    fn app(&self, name: &str) -> String {
        format!("{}{name}", self.apps())
    }

    fn worker(&self, id: &str) -> String {
        format!("{}/workers/{id}", self.prefix)
    }

    fn hub(&self, id: &str) -> String {
        format!("{}/hubs/{id}", self.prefix)
    }
}

/// What a key under the prefix names.
enum Key<'a> {
    App(&'a str),
    Worker(&'a str),
    Hub(&'a str),
}

impl<'a> Key<'a> {
    fn parse(config: &EtcdConfig, key: &'a [u8]) -> Option<Self> {
        let key = std::str::from_utf8(key).ok()?;
        let rest = key.strip_prefix(&config.all())?;
        if let Some(name) = rest.strip_prefix("apps/") {
            Some(Self::App(name))
        } else if let Some(id) = rest.strip_prefix("workers/") {
            Some(Self::Worker(id))
        } else {
            rest.strip_prefix("hubs/").map(Self::Hub)
        }
    }
}

/// Where the changes to app records go: kept until the hub follows them.
enum AppSink {
    Kept(Vec<AppChange>),
    Sent(tokio::sync::mpsc::UnboundedSender<AppChange>),
}

/// What the watch keeps up to date.
struct Followed {
    workers: Mutex<HashMap<String, WorkerRecord>>,
    hubs: Mutex<HashMap<String, HubRecord>>,
    apps: Mutex<AppSink>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Followed {
    fn app_changed(&self, change: AppChange) {
        let mut sink = lock(&self.apps);
        match &mut *sink {
            AppSink::Kept(kept) => kept.push(change),
            AppSink::Sent(send) => {
                let _ = send.send(change);
            }
        }
    }

    /// Applies one key's new value (`None`: deleted) at `revision`.
    fn apply(&self, config: &EtcdConfig, key: &[u8], value: Option<&[u8]>, revision: i64) {
        match (Key::parse(config, key), value) {
            (Some(Key::App(name)), Some(value)) => match serde_json::from_slice(value) {
                Ok(record) => {
                    self.app_changed(AppChange::Written(Box::new(Versioned { record, revision })))
                }
                Err(e) => tracing::error!(app = %name, "an undecodable record in etcd: {e}"),
            },
            (Some(Key::App(name)), None) => self.app_changed(AppChange::Removed {
                name: name.to_string(),
                revision,
            }),
            (Some(Key::Worker(id)), Some(value)) => match serde_json::from_slice(value) {
                Ok(worker) => {
                    lock(&self.workers).insert(id.to_string(), worker);
                }
                Err(e) => tracing::error!(worker = %id, "an undecodable worker in etcd: {e}"),
            },
            (Some(Key::Worker(id)), None) => {
                lock(&self.workers).remove(id);
            }
            (Some(Key::Hub(id)), Some(value)) => {
                lock(&self.hubs).insert(id.to_string(), hub_record(id, value));
            }
            (Some(Key::Hub(id)), None) => {
                lock(&self.hubs).remove(id);
            }
            (None, _) => {}
        }
    }
}

/// A worker's lease as this hub renews it.
struct WorkerLease {
    id: i64,
    keeper: LeaseKeeper,
    answers: LeaseKeepAliveStream,
}

/// The leases this hub renews, by worker: a renewal takes its worker's lease out and
/// puts it back, holding the map's lock only for that.
type WorkerLeases = Arc<Mutex<HashMap<String, WorkerLease>>>;

/// The registry in etcd.
pub struct EtcdRegistry {
    config: EtcdConfig,
    /// This hub's id: its key is `hubs/{hub_id}`.
    hub_id: String,
    client: Client,
    /// The lease under which this hub's key lives.
    lease: i64,
    /// Set when the lease expired: this hub may write nothing more.
    lost: Arc<AtomicBool>,
    followed: Arc<Followed>,
    /// The leases of the workers that report to this hub (a slot each).
    worker_leases: WorkerLeases,
    /// `Some` until dropped (then shut down without blocking: a hub may drop its registry
    /// on an async thread).
    runtime: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for EtcdRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdRegistry")
            .field("config", &self.config)
            .field("hub_id", &self.hub_id)
            .finish_non_exhaustive()
    }
}

impl EtcdRegistry {
    /// Connects to the cluster `config` names (failing at once if none of it answers),
    /// puts this hub's key under a new lease, and follows the registry.
    pub fn open(config: &EtcdConfig, hub_id: &str) -> Result<Self, RegistryError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("registry-etcd")
            .enable_all()
            .build()
            .map_err(RegistryError::Runtime)?;
        let endpoints = config.endpoints.clone();
        let options = ConnectOptions::new()
            .with_connect_timeout(CALL_TIMEOUT)
            .with_timeout(CALL_TIMEOUT);
        let connect = async move {
            let mut client = Client::connect(endpoints, Some(options)).await?;
            // A round trip now: an unreachable cluster fails the hub's start, not its
            // first write.
            client.status().await?;
            Ok(client)
        };
        // A runtime dropped on an async thread (the hub opens its registry on one) panics:
        // every way out before the registry owns it shuts it down without waiting.
        let fail = |runtime: tokio::runtime::Runtime, error: RegistryError| {
            runtime.shutdown_background();
            Err(error)
        };
        let client = match wait(&runtime, connect) {
            Ok(client) => client,
            Err(source) => return fail(runtime, etcd_error(config, source)),
        };
        let lease = match wait(&runtime, join(client.clone(), config.hub(hub_id))) {
            Ok(Ok(lease)) => lease,
            Ok(Err(())) => return fail(runtime, RegistryError::SameId(hub_id.to_string())),
            Err(source) => return fail(runtime, etcd_error(config, source)),
        };
        let lost = Arc::new(AtomicBool::new(false));
        runtime.spawn(keep_alive(client.clone(), lease, lost.clone()));
        let followed = Arc::new(Followed {
            workers: Mutex::new(HashMap::new()),
            hubs: Mutex::new(HashMap::new()),
            apps: Mutex::new(AppSink::Kept(Vec::new())),
        });
        let from = wait(
            &runtime,
            catch_up(client.clone(), config.clone(), followed.clone()),
        )
        .map_err(|source| etcd_error(config, source))?;
        runtime.spawn(follow(
            client.clone(),
            config.clone(),
            followed.clone(),
            from,
        ));
        tracing::info!(endpoints = %config.endpoints.join(","), prefix = %config.prefix, hub = %hub_id, lease, "serving the registry in etcd");
        Ok(Self {
            config: config.clone(),
            hub_id: hub_id.to_string(),
            client,
            lease,
            lost,
            followed,
            worker_leases: Default::default(),
            runtime: Some(runtime),
        })
    }

    fn call<T: Send + 'static>(
        &self,
        call: impl FnOnce(Client) -> futures::future::BoxFuture<'static, Result<T, etcd_client::Error>>,
    ) -> Result<T, RegistryError> {
        let Some(runtime) = &self.runtime else {
            return Err(RegistryError::Lost);
        };
        wait(runtime, call(self.client.clone())).map_err(|e| etcd_error(&self.config, e))
    }

    /// Runs `operations` in one transaction if this hub's key is still under its lease
    /// and every `checks` holds: the transaction's revision, or why not.
    fn fenced(&self, checks: Vec<Compare>, operations: Vec<TxnOp>) -> Result<i64, RegistryError> {
        let (hub, lease) = (self.config.hub(&self.hub_id), self.lease);
        let (done, revision, still_ours) = self.call(move |mut client| {
            Box::pin(async move {
                let mut when = vec![Compare::lease(hub.clone(), CompareOp::Equal, lease)];
                when.extend(checks);
                let txn = Txn::new()
                    .when(when)
                    .and_then(operations)
                    .or_else([TxnOp::get(hub, None)]);
                let answer = client.txn(txn).await?;
                let revision = answer.header().map_or(0, |h| h.revision());
                let still_ours = answer.op_responses().into_iter().any(|response| {
                    matches!(response, TxnOpResponse::Get(got)
                        if got.kvs().first().is_some_and(|kv| kv.lease() == lease))
                });
                Ok((answer.succeeded(), revision, still_ours))
            })
        })?;
        if done {
            Ok(revision)
        } else if still_ours {
            Err(RegistryError::Conflict)
        } else {
            self.lost.store(true, Ordering::SeqCst);
            Err(RegistryError::Lost)
        }
    }
}

/// Puts this hub's key (empty until it serves DNS) under a new lease, waiting up to
/// [`HOLD_WAIT`] for the lease of an earlier hub with the same id to end: the lease, or
/// `Err` if that hub is still there.
async fn join(mut client: Client, key: String) -> Result<Result<i64, ()>, etcd_client::Error> {
    let deadline = tokio::time::Instant::now() + HOLD_WAIT;
    loop {
        let lease = client.lease_grant(HUB_LEASE_TTL, None).await?.id();
        let take = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.clone(),
                "",
                Some(PutOptions::new().with_lease(lease)),
            )]);
        if client.txn(take).await?.succeeded() {
            return Ok(Ok(lease));
        }
        client.lease_revoke(lease).await?;
        if tokio::time::Instant::now() >= deadline {
            return Ok(Err(()));
        }
        tracing::info!(%key, "a hub with this id serves the registry: waiting for its lease to end");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Reads the live workers and hubs into `followed`, each map replaced at once (a reader
/// never sees one half-read), and tells of every app record: the revision to watch from.
async fn catch_up(
    mut client: Client,
    config: EtcdConfig,
    followed: Arc<Followed>,
) -> Result<i64, etcd_client::Error> {
    let got = client
        .get(config.all(), Some(GetOptions::new().with_prefix()))
        .await?;
    let mut workers = HashMap::new();
    let mut hubs = HashMap::new();
    let mut apps = Vec::new();
    for kv in got.kvs() {
        match Key::parse(&config, kv.key()) {
            Some(Key::App(name)) => match serde_json::from_slice(kv.value()) {
                Ok(record) => apps.push(Versioned {
                    record,
                    revision: kv.mod_revision(),
                }),
                Err(e) => tracing::error!(app = %name, "an undecodable record in etcd: {e}"),
            },
            Some(Key::Worker(id)) => match serde_json::from_slice(kv.value()) {
                Ok(worker) => {
                    workers.insert(id.to_string(), worker);
                }
                Err(e) => tracing::error!(worker = %id, "an undecodable worker in etcd: {e}"),
            },
            Some(Key::Hub(id)) => {
                hubs.insert(id.to_string(), hub_record(id, kv.value()));
            }
            None => {}
        }
    }
    *lock(&followed.workers) = workers;
    *lock(&followed.hubs) = hubs;
    let revision = got.header().map_or(0, |h| h.revision());
    followed.app_changed(AppChange::All { apps, revision });
    Ok(revision + 1)
}

/// Hub `id`'s record from its key's value. A hub's key is empty until it serves DNS:
/// it is a hub all the same (its start orders are pending, not abandoned), with no DNS
/// address yet.
fn hub_record(id: &str, value: &[u8]) -> HubRecord {
    serde_json::from_slice(value).unwrap_or_else(|_| HubRecord {
        id: id.to_string(),
        dns: std::net::SocketAddr::from(([0, 0, 0, 0], 0)),
    })
}

/// Follows every change under the prefix from revision `from`, for as long as the
/// registry lives (its runtime ends this task); when the watch breaks (etcd restarted,
/// or the revision was compacted away), reads everything again and follows on.
async fn follow(client: Client, config: EtcdConfig, followed: Arc<Followed>, mut from: i64) {
    loop {
        let mut watching = client.clone();
        let options = WatchOptions::new().with_prefix().with_start_revision(from);
        match watching.watch(config.all(), Some(options)).await {
            Ok(mut stream) => loop {
                match stream.message().await {
                    Ok(Some(answer)) => {
                        if answer.canceled() || answer.compact_revision() > 0 {
                            tracing::warn!(
                                reason = answer.cancel_reason(),
                                "the registry's watch was cancelled"
                            );
                            break;
                        }
                        for event in answer.events() {
                            let Some(kv) = event.kv() else { continue };
                            let value = match event.event_type() {
                                EventType::Put => Some(kv.value()),
                                EventType::Delete => None,
                            };
                            followed.apply(&config, kv.key(), value, kv.mod_revision());
                            from = from.max(kv.mod_revision() + 1);
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!("following the registry: {e}");
                        break;
                    }
                }
            },
            Err(e) => tracing::warn!("watching the registry: {e}"),
        }
        tokio::time::sleep(REWATCH_DELAY).await;
        match catch_up(client.clone(), config.clone(), followed.clone()).await {
            Ok(next) => from = next,
            Err(e) => tracing::warn!("reading the registry again: {e}"),
        }
    }
}

/// Keeps `lease` alive, three times per TTL, for as long as the registry lives (its
/// runtime ends this task). Sets `lost` if the lease expired, or if etcd has not
/// answered for a whole TTL: by then the lease may have ended without this hub hearing
/// it, and another hub may act on what this one still holds.
async fn keep_alive(mut client: Client, lease: i64, lost: Arc<AtomicBool>) {
    let ttl = Duration::from_secs(HUB_LEASE_TTL as u64);
    let period = ttl / 3;
    let mut keeping = None;
    let mut answered = tokio::time::Instant::now();
    loop {
        if keeping.is_none() {
            keeping = tokio::time::timeout(period, client.lease_keep_alive(lease))
                .await
                .ok()
                .and_then(Result::ok);
        }
        if let Some((keeper, stream)) = keeping.as_mut() {
            let kept = async {
                keeper.keep_alive().await?;
                stream.message().await
            };
            match tokio::time::timeout(period, kept).await {
                Ok(Ok(Some(answer))) if answer.ttl() > 0 => answered = tokio::time::Instant::now(),
                Ok(Ok(_)) => {
                    tracing::error!(lease, "the hub's lease in the registry expired");
                    lost.store(true, Ordering::SeqCst);
                    return;
                }
                Ok(Err(e)) => {
                    tracing::warn!(lease, "keeping the hub's lease: {e}");
                    keeping = None;
                }
                Err(_) => {
                    tracing::warn!(lease, "keeping the hub's lease: no answer");
                    keeping = None;
                }
            }
        }
        if answered.elapsed() >= ttl {
            tracing::error!(lease, "etcd has not answered for the hub lease's whole TTL");
            lost.store(true, Ordering::SeqCst);
            return;
        }
        tokio::time::sleep(period).await;
    }
}

fn etcd_error(config: &EtcdConfig, source: etcd_client::Error) -> RegistryError {
    RegistryError::Etcd {
        endpoints: config.endpoints.join(","),
        source,
    }
}

/// Runs `future` on `runtime` and waits for it from this (maybe async) thread.
fn wait<T: Send + 'static>(
    runtime: &tokio::runtime::Runtime,
    future: impl std::future::Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
) -> Result<T, etcd_client::Error> {
    let (send, receive) = std::sync::mpsc::sync_channel(1);
    runtime.spawn(async move {
        let _ = send.send(future.await);
    });
    receive.recv().unwrap_or_else(|_| {
        Err(etcd_client::Error::InvalidArgs(
            "the registry's runtime stopped".into(),
        ))
    })
}

impl Drop for EtcdRegistry {
    /// Takes this hub's key away at once. The workers' leases are left to run out:
    /// their workers report to another hub meanwhile, which renews them.
    fn drop(&mut self) {
        let lease = self.lease;
        let _ = self.call(move |mut client| {
            Box::pin(async move {
                client.lease_revoke(lease).await?;
                Ok(())
            })
        });
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

fn encode<T: serde::Serialize>(name: &str, value: &T) -> Result<Vec<u8>, RegistryError> {
    serde_json::to_vec(value).map_err(|source| RegistryError::Record {
        name: name.to_string(),
        source,
    })
}

impl RegistryStore for EtcdRegistry {
    fn load(&self) -> Result<Vec<Versioned>, RegistryError> {
        let prefix = self.config.apps();
        let kvs = self.call(move |mut client| {
            Box::pin(async move {
                let got = client
                    .get(prefix, Some(GetOptions::new().with_prefix()))
                    .await?;
                Ok(got
                    .kvs()
                    .iter()
                    .map(|kv| (kv.key().to_vec(), kv.value().to_vec(), kv.mod_revision()))
                    .collect::<Vec<_>>())
            })
        })?;
        // A record that does not decode is left out (and said so), as the watch leaves it
        // out: one bad record must not keep every hub from starting.
        Ok(kvs
            .into_iter()
            .filter_map(|(key, value, revision)| {
                match serde_json::from_slice::<AppRecord>(&value) {
                    Ok(record) => Some(Versioned { record, revision }),
                    Err(e) => {
                        let key = String::from_utf8_lossy(&key);
                        tracing::error!(%key, "an undecodable record in etcd: {e}");
                        None
                    }
                }
            })
            .collect())
    }

    fn get(&self, name: &str) -> Result<Option<Versioned>, RegistryError> {
        let key = self.config.app(name);
        let kv = self.call(move |mut client| {
            Box::pin(async move {
                let got = client.get(key, None).await?;
                Ok(got
                    .kvs()
                    .first()
                    .map(|kv| (kv.value().to_vec(), kv.mod_revision())))
            })
        })?;
        kv.map(|(value, revision)| {
            let record =
                serde_json::from_slice(&value).map_err(|source| RegistryError::Record {
                    name: name.to_string(),
                    source,
                })?;
            Ok(Versioned { record, revision })
        })
        .transpose()
    }

    /// One transaction: every record's revision checked, then every record put. etcd
    /// syncs its raft log before it answers.
    fn save_all(
        &self,
        records: &[(&AppRecord, i64)],
        _sync: bool,
    ) -> Result<Vec<i64>, RegistryError> {
        let mut checks = Vec::with_capacity(records.len());
        let mut puts = Vec::with_capacity(records.len());
        for (record, expected) in records {
            let key = self.config.app(&record.spec.name);
            checks.push(if *expected == 0 {
                Compare::create_revision(key.clone(), CompareOp::Equal, 0)
            } else {
                Compare::mod_revision(key.clone(), CompareOp::Equal, *expected)
            });
            puts.push(TxnOp::put(key, encode(&record.spec.name, record)?, None));
        }
        let revision = self.fenced(checks, puts)?;
        Ok(vec![revision; records.len()])
    }

    /// Every write is durable when etcd answers it.
    fn flush(&self) -> Result<(), RegistryError> {
        Ok(())
    }

    fn remove(&self, name: &str) -> Result<(), RegistryError> {
        self.fenced(vec![], vec![TxnOp::delete(self.config.app(name), None)])
            .map(drop)
    }

    fn follow(&self, changes: tokio::sync::mpsc::UnboundedSender<AppChange>) {
        let mut sink = lock(&self.followed.apps);
        if let AppSink::Kept(kept) = &mut *sink {
            for change in kept.drain(..) {
                let _ = changes.send(change);
            }
        }
        *sink = AppSink::Sent(changes);
    }

    /// Renews the worker's lease (granting one the first time this hub hears from it, or
    /// when it ran out), then puts its record under it. The lease is taken out of the
    /// map while it is renewed, so one slow renewal holds up no other worker's.
    fn worker_alive(&self, worker: &WorkerRecord, ttl: Duration) -> Result<(), RegistryError> {
        let id = worker.hello.id.clone();
        let ttl = i64::try_from(ttl.as_secs().max(2)).unwrap_or(i64::MAX);
        let leases = self.worker_leases.clone();
        let lease = self.call(move |mut client| {
            Box::pin(async move {
                let held = lock(&leases).remove(&id);
                if let Some(mut lease) = held {
                    // A stream's answer has no deadline of its own: one that does not
                    // come in time counts as the lease's end (a new one is granted).
                    let kept = async {
                        lease.keeper.keep_alive().await?;
                        lease.answers.message().await
                    };
                    let answer = tokio::time::timeout(CALL_TIMEOUT / 2, kept).await;
                    if let Ok(Ok(Some(answer))) = answer {
                        if answer.ttl() > 0 {
                            let kept = lease.id;
                            lock(&leases).insert(id, lease);
                            return Ok(kept);
                        }
                    }
                }
                let granted = client.lease_grant(ttl, None).await?.id();
                let (keeper, answers) = client.lease_keep_alive(granted).await?;
                let lease = WorkerLease {
                    id: granted,
                    keeper,
                    answers,
                };
                lock(&leases).insert(id, lease);
                Ok(granted)
            })
        })?;
        let key = self.config.worker(&worker.hello.id);
        let value = encode(&worker.hello.id, worker)?;
        let put = TxnOp::put(key, value, Some(PutOptions::new().with_lease(lease)));
        self.fenced(vec![], vec![put])?;
        lock(&self.followed.workers).insert(worker.hello.id.clone(), worker.clone());
        Ok(())
    }

    fn worker_left(&self, id: &str) -> Result<(), RegistryError> {
        lock(&self.followed.workers).remove(id);
        let leases = self.worker_leases.clone();
        let left = id.to_string();
        self.call(move |mut client| {
            Box::pin(async move {
                let lease = lock(&leases).remove(&left);
                if let Some(lease) = lease {
                    client.lease_revoke(lease.id).await?;
                }
                Ok(())
            })
        })?;
        self.fenced(vec![], vec![TxnOp::delete(self.config.worker(id), None)])
            .map(drop)
    }

    fn live_workers(&self) -> Vec<WorkerRecord> {
        lock(&self.followed.workers).values().cloned().collect()
    }

    fn announce(&self, me: &HubRecord) -> Result<(), RegistryError> {
        let key = self.config.hub(&self.hub_id);
        let value = encode(&me.id, me)?;
        let put = TxnOp::put(key, value, Some(PutOptions::new().with_lease(self.lease)));
        self.fenced(vec![], vec![put])?;
        lock(&self.followed.hubs).insert(self.hub_id.clone(), me.clone());
        Ok(())
    }

    fn hubs(&self) -> Vec<HubRecord> {
        let mut hubs: Vec<HubRecord> = lock(&self.followed.hubs).values().cloned().collect();
        hubs.sort_by(|a, b| a.id.cmp(&b.id));
        hubs
    }

    fn lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }
}

/// An etcd server for tests (the hub's and the end-to-end ones): one member on free
/// loopback ports, its data in a directory the caller gives, killed when dropped.
#[doc(hidden)]
pub mod testing {
    use std::path::Path;
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    /// A running etcd.
    pub struct EtcdServer {
        child: Child,
        /// `etcd://127.0.0.1:PORT`, for `--registry`.
        pub url: String,
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free loopback port")
    }

    impl EtcdServer {
        /// Starts one with its data under `dir`, and waits until it accepts clients.
        pub fn start(dir: &Path) -> Self {
            let (client, peer) = (free_port(), free_port());
            let client_url = format!("http://127.0.0.1:{client}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let child = Command::new("etcd")
                .args(["--name", "test", "--data-dir"])
                .arg(dir.join("etcd-data"))
                .args(["--listen-client-urls", &client_url])
                .args(["--advertise-client-urls", &client_url])
                .args(["--listen-peer-urls", &peer_url])
                .args(["--initial-advertise-peer-urls", &peer_url])
                .args(["--initial-cluster", &format!("test={peer_url}")])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("etcd (scripts/setup.sh installs etcd-server)");
            let mut server = Self {
                child,
                url: format!("etcd://127.0.0.1:{client}"),
            };
            let started = Instant::now();
            while std::net::TcpStream::connect(("127.0.0.1", client)).is_err() {
                if let Ok(Some(status)) = server.child.try_wait() {
                    panic!("etcd ended at start: {status}");
                }
                assert!(
                    started.elapsed() < Duration::from_secs(20),
                    "etcd did not start"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            server
        }
    }

    impl Drop for EtcdServer {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{suite, Registry, RegistryConfig, RegistryError};
    use super::*;

    #[test]
    fn the_registry_suite_passes_on_etcd() {
        let dir = tempfile::tempdir().unwrap();
        let server = testing::EtcdServer::start(dir.path());
        let config = |prefix: &str| {
            RegistryConfig::parse(&format!("{}/{prefix}", server.url), "x".into()).unwrap()
        };
        suite::records_survive_a_reopen(&config("suite"));
        suite::a_stale_write_is_refused(&config("stale"));
        suite::workers_live_while_they_report(&config("workers"));
        suite::a_hub_announces_itself(&config("hubs"));
        // Another prefix is another registry.
        let other = Registry::open(&config("other"), "hub-1").unwrap();
        assert!(other.load().unwrap().is_empty());
    }

    fn changes(registry: &Registry) -> tokio::sync::mpsc::UnboundedReceiver<AppChange> {
        let (send, receive) = tokio::sync::mpsc::unbounded_channel();
        registry.follow(send);
        receive
    }

    /// The next change that is not `All` (the first change a follower gets).
    fn next_change(changes: &mut tokio::sync::mpsc::UnboundedReceiver<AppChange>) -> AppChange {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match changes.try_recv() {
                Ok(AppChange::All { .. }) => {}
                Ok(change) => return change,
                Err(_) => {
                    assert!(std::time::Instant::now() < deadline, "no change came");
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    }

    #[test]
    fn hubs_share_a_registry_and_see_each_others_writes() {
        let dir = tempfile::tempdir().unwrap();
        let server = testing::EtcdServer::start(dir.path());
        let config = RegistryConfig::parse(&format!("{}/shared", server.url), "x".into()).unwrap();
        let first = Registry::open(&config, "hub-a").unwrap();
        let second = Registry::open(&config, "hub-b").unwrap();
        let mut seen_by_first = changes(&first);
        let mut seen_by_second = changes(&second);
        let record = suite::record("a");
        let revision = first.save(&record, 0, true).unwrap();
        assert_eq!(
            next_change(&mut seen_by_second),
            AppChange::Written(Box::new(Versioned {
                record: record.clone(),
                revision
            }))
        );
        // Each sees the other's workers and hubs.
        let worker = WorkerRecord {
            hello: crate::model::WorkerHello {
                id: "w".into(),
                url: "http://127.0.0.1:1".into(),
                memory_limit_bytes: 1,
                instance: 0,
            },
            memory_bytes: 0,
            resident: 0,
            held: vec![],
            reported_at_unix_ms: 0,
        };
        first.worker_alive(&worker, Duration::from_secs(3)).unwrap();
        for (id, dns) in [("hub-a", "127.0.0.1:53"), ("hub-b", "127.0.0.2:53")] {
            let hub = if id == "hub-a" { &first } else { &second };
            hub.announce(&HubRecord {
                id: id.into(),
                dns: dns.parse().unwrap(),
            })
            .unwrap();
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while second.live_workers() != [worker.clone()]
            || first.hubs().len() != 2
            || second.hubs().len() != 2
        {
            assert!(std::time::Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(5));
        }
        second.remove("a").unwrap();
        // The first hub hears of its own write, then of the removal.
        assert!(matches!(
            next_change(&mut seen_by_first),
            AppChange::Written(_)
        ));
        assert!(matches!(
            next_change(&mut seen_by_first),
            AppChange::Removed { name, revision: removed } if name == "a" && removed > revision
        ));
        // A hub that ends is gone from the others' list at once.
        drop(first);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while second.hubs().len() != 1 {
            assert!(std::time::Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_hub_whose_key_is_gone_writes_nothing_and_ids_are_unique() {
        let dir = tempfile::tempdir().unwrap();
        let server = testing::EtcdServer::start(dir.path());
        let config = RegistryConfig::parse(&format!("{}/held", server.url), "x".into()).unwrap();
        let first = Registry::open(&config, "hub-a").unwrap();
        // A second hub with the same id waits for the first's lease, then says why not.
        let started = std::time::Instant::now();
        let error = Registry::open(&config, "hub-a").unwrap_err().to_string();
        assert!(started.elapsed() >= HOLD_WAIT, "{error}");
        assert!(error.contains("--hub-id"), "{error}");
        let record = suite::record("a");
        first.save(&record, 0, true).unwrap();
        // Its key gone (as when its lease expired, cut off from etcd), it writes nothing
        // more, and knows it.
        let etcd = EtcdConfig::parse(&format!("{}/held", server.url)).unwrap();
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let mut client = Client::connect(etcd.endpoints.clone(), None).await.unwrap();
            client.delete(etcd.hub("hub-a"), None).await.unwrap();
        });
        let error = first.save(&suite::record("b"), 0, true).unwrap_err();
        assert!(matches!(error, RegistryError::Lost), "{error}");
        assert!(matches!(first.remove("a"), Err(RegistryError::Lost)));
        assert!(first.lost());
    }

    #[test]
    fn an_unreachable_cluster_fails_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let port = testing::EtcdServer::start(dir.path()).url.clone();
        // The server is gone now: nothing answers there.
        let config = RegistryConfig::parse(&port, "x".into()).unwrap();
        let started = std::time::Instant::now();
        let error = Registry::open(&config, "hub-1").unwrap_err().to_string();
        assert!(error.contains("127.0.0.1"), "{error}");
        assert!(started.elapsed() < CALL_TIMEOUT * 3);
        // The same from an async thread, as `picocenter hub` opens it: an error, not a
        // panic (a runtime dropped there panics).
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let error = runtime.block_on(async { Registry::open(&config, "hub-1").unwrap_err() });
        assert!(error.to_string().contains("127.0.0.1"), "{error}");
    }

    #[test]
    fn registry_urls_parse_or_say_what_they_expect() {
        let parsed = EtcdConfig::parse("etcd://10.0.0.1:2379,etcd-2:2379/prod/zone").unwrap();
        assert_eq!(
            parsed.endpoints,
            ["http://10.0.0.1:2379", "http://etcd-2:2379"]
        );
        assert_eq!(parsed.prefix, "prod/zone");
        assert_eq!(
            EtcdConfig::parse("etcd://h:1").unwrap().prefix,
            DEFAULT_PREFIX
        );
        for bad in [
            "etcd://",
            "etcd://h",
            "etcd://h:0",
            "etcd://h:x",
            "etcd://:1",
            "http://h:1",
            "etcd://h:1/",
            "etcd://h:1/a b",
            "mysql",
        ] {
            let error = RegistryConfig::parse(bad, "x".into()).unwrap_err();
            assert!(
                error.to_string().contains("expected `redb`"),
                "{bad}: {error}"
            );
        }
        assert_eq!(
            RegistryConfig::parse("redb", "/r".into()).unwrap(),
            RegistryConfig::Redb("/r".into())
        );
    }
}
