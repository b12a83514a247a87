//! The hub: the registry of apps and workers, placement, and bringing apps back.
//!
//! [`Hub::resolve`] is what a DNS query for an app does: a resident app's address at once;
//! otherwise a start order to a worker (a restore when the app has a snapshot), answered
//! once the app's listening sockets are bound. Concurrent queries for one app share one
//! order. A maintenance loop ([`Hub::maintain`]) returns the apps of dead workers to
//! their last snapshot, wakes swapped-out apps whose timers are due, and makes usage
//! updates durable.
//!
//! Any number of hubs may share one registry (etcd). Each keeps a copy of the app
//! records, follows the others' writes ([`Hub::follow_registry`]), and writes a record
//! only at the revision it read (see [`crate::registry`]): a hub that loses such a race
//! reads the record again and decides again. Ordering a start is such a write (the app
//! becomes `starting`, ordered by this hub), so of several hubs asked for one app at
//! once exactly one orders its start, and the others wait for its outcome. The live
//! workers are the registry's: a worker may report to any hub.

use crate::client::Client;
use crate::model::{
    unix_ms, AppRecord, AppSpec, AppState, StartOrder, StartOrderer, Started, SwappedOut,
    WorkerHello, WorkerReport,
};
use crate::registry::{
    AppChange, HubRecord, Registry, RegistryError, Versioned, WorkerRecord, MAX_BATCH,
};
use futures::future::{BoxFuture, FutureExt, Shared};
use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How the hub behaves.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// How long a start or restore may take before its query gets SERVFAIL.
    pub start_limit: Duration,
    /// A worker silent this long is dead.
    pub worker_timeout: Duration,
    /// This hub's id, unique among the hubs sharing a registry.
    pub id: String,
}

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            start_limit: Duration::from_secs(30),
            worker_timeout: Duration::from_secs(3),
            id: default_hub_id(),
        }
    }
}

/// `HOST-PID`: unique among the hubs of a cluster unless two share a host name.
pub fn default_hub_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{}-{}", host.trim(), std::process::id())
}

/// How many times a write is tried again after other hubs changed its record first.
const WRITE_ATTEMPTS: usize = 16;
/// How often a hub waiting for another's start order looks whether that hub is gone.
const WAITING_LOOK: Duration = Duration::from_millis(200);

/// Why an API operation failed.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The app spec is not acceptable.
    #[error("{0}")]
    Invalid(String),
    /// The app exists already.
    #[error("an app named {0} exists already")]
    Exists(String),
    /// No such app.
    #[error("no app named {0}")]
    NoSuchApp(String),
    /// No such worker.
    #[error("no worker {0} (register first)")]
    NoSuchWorker(String),
    /// The registry failed.
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

/// What a name resolves to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// No app has this name.
    Unknown,
    /// The app runs at this address.
    Address(Ipv4Addr),
    /// The app could not be brought up.
    Failed(String),
}

type Bringing = Shared<BoxFuture<'static, Result<Ipv4Addr, String>>>;

/// The hub.
#[derive(Debug)]
pub struct Hub {
    config: HubConfig,
    registry: Registry,
    /// The app records as this hub last read or wrote them, with their revisions.
    apps: Mutex<HashMap<String, Versioned>>,
    /// Counts the changes to `apps`, for whoever waits for one.
    apps_changed: tokio::sync::watch::Sender<u64>,
    /// The registry's news of other hubs' writes, until [`Hub::follow_registry`] takes it.
    news: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<AppChange>>>,
    /// A client per worker URL.
    clients: Mutex<HashMap<String, Client>>,
    /// The workers that were live at the last maintenance round.
    known_workers: Mutex<HashSet<String>>,
    bringing: Mutex<HashMap<String, Bringing>>,
    token: Arc<str>,
    booted: Instant,
    /// What `GET /metrics` serves.
    pub metrics: crate::metrics::HubMetrics,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Keeps `news` in `apps` if it is newer than what is there: whether it was.
fn take_newer(apps: &mut HashMap<String, Versioned>, news: Versioned) -> bool {
    let name = news.record.spec.name.clone();
    if apps
        .get(&name)
        .is_some_and(|known| known.revision >= news.revision)
    {
        return false;
    }
    apps.insert(name, news);
    true
}

impl Hub {
    /// A hub over the registry `registry` names, whose APIs (its own and the workers')
    /// use `token`.
    pub fn open(
        config: HubConfig,
        registry: &crate::registry::RegistryConfig,
        token: &str,
    ) -> Result<Arc<Self>, HubError> {
        let registry = Registry::open(registry, &config.id)?;
        let (send, news) = tokio::sync::mpsc::unbounded_channel();
        registry.follow(send);
        let apps = registry
            .load()?
            .into_iter()
            .map(|v| (v.record.spec.name.clone(), v))
            .collect();
        Ok(Arc::new(Self {
            config,
            registry,
            apps: Mutex::new(apps),
            apps_changed: tokio::sync::watch::Sender::new(0),
            news: Mutex::new(Some(news)),
            clients: Mutex::new(HashMap::new()),
            known_workers: Mutex::new(HashSet::new()),
            bringing: Mutex::new(HashMap::new()),
            token: token.into(),
            booted: Instant::now(),
            metrics: Default::default(),
        }))
    }

    /// The API token.
    pub fn token(&self) -> Arc<str> {
        self.token.clone()
    }

    /// This hub's id.
    pub fn id(&self) -> &str {
        &self.config.id
    }

    /// Applies the other hubs' writes as the registry tells of them, until the registry
    /// ends (a store that only this hub writes tells of none).
    pub async fn follow_registry(self: Arc<Self>) {
        let Some(mut news) = lock(&self.news).take() else {
            return;
        };
        while let Some(change) = news.recv().await {
            let mut apps = lock(&self.apps);
            let changed = match change {
                AppChange::Written(record) => take_newer(&mut apps, *record),
                AppChange::Removed { name, revision } => {
                    let older = apps.get(&name).is_some_and(|k| k.revision < revision);
                    if older {
                        apps.remove(&name);
                    }
                    older
                }
                AppChange::All {
                    apps: all,
                    revision,
                } => {
                    let present: HashSet<String> =
                        all.iter().map(|v| v.record.spec.name.clone()).collect();
                    let before = apps.len();
                    apps.retain(|name, known| present.contains(name) || known.revision > revision);
                    let mut changed = apps.len() != before;
                    for record in all {
                        changed |= take_newer(&mut apps, record);
                    }
                    changed
                }
            };
            drop(apps);
            if changed {
                self.apps_changed.send_modify(|n| *n += 1);
            }
        }
    }

    /// Says, in the registry, where this hub answers DNS (for the zone's NS records).
    pub fn announce(&self, dns: std::net::SocketAddr) -> Result<(), HubError> {
        let me = HubRecord {
            id: self.config.id.clone(),
            dns,
        };
        Ok(self.registry.announce(&me)?)
    }

    /// The hubs serving this registry, by id.
    pub fn hubs(&self) -> Vec<HubRecord> {
        self.registry.hubs()
    }

    /// Reads app `name` from the registry again (another hub wrote it first).
    fn reread(&self, name: &str) -> Result<(), RegistryError> {
        let fresh = self.registry.get(name)?;
        let mut apps = lock(&self.apps);
        match fresh {
            Some(record) => {
                take_newer(&mut apps, record);
            }
            None => {
                apps.remove(name);
            }
        }
        Ok(())
    }

    /// Applies `change` to app `name` and writes it at the revision it was read at;
    /// if another hub wrote it first, reads it again and applies `change` to that. A
    /// `change` that returns false changes nothing. The record written, if one was.
    fn try_update(
        &self,
        name: &str,
        sync: bool,
        mut change: impl FnMut(&mut AppRecord) -> bool,
    ) -> Result<Option<AppRecord>, RegistryError> {
        for _ in 0..WRITE_ATTEMPTS {
            let mut apps = lock(&self.apps);
            let Some(known) = apps.get(name) else {
                return Ok(None);
            };
            let mut record = known.record.clone();
            if !change(&mut record) {
                return Ok(None);
            }
            match self.registry.save(&record, known.revision, sync) {
                Ok(revision) => {
                    apps.insert(
                        name.to_string(),
                        Versioned {
                            record: record.clone(),
                            revision,
                        },
                    );
                    drop(apps);
                    self.apps_changed.send_modify(|n| *n += 1);
                    return Ok(Some(record));
                }
                Err(RegistryError::Conflict) => {
                    drop(apps);
                    self.reread(name)?;
                }
                Err(e) => return Err(e),
            }
        }
        Err(RegistryError::Conflict)
    }

    /// [`Hub::try_update`], logging a failure.
    fn update(
        &self,
        name: &str,
        sync: bool,
        change: impl FnMut(&mut AppRecord) -> bool,
    ) -> Option<AppRecord> {
        self.try_update(name, sync, change).unwrap_or_else(|e| {
            tracing::error!(app = %name, "saving the registry: {e}");
            None
        })
    }

    // ---- apps ------------------------------------------------------------------------

    /// Registers an app.
    pub fn add(&self, spec: AppSpec) -> Result<AppRecord, HubError> {
        spec.validate().map_err(HubError::Invalid)?;
        let mut apps = lock(&self.apps);
        if apps.contains_key(&spec.name) {
            return Err(HubError::Exists(spec.name));
        }
        let record = AppRecord::new(spec);
        let revision = match self.registry.save(&record, 0, true) {
            Ok(revision) => revision,
            // Another hub registered it first.
            Err(RegistryError::Conflict) => return Err(HubError::Exists(record.spec.name)),
            Err(e) => return Err(e.into()),
        };
        tracing::info!(app = %record.spec.name, image = %record.spec.image, "app registered");
        apps.insert(
            record.spec.name.clone(),
            Versioned {
                record: record.clone(),
                revision,
            },
        );
        Ok(record)
    }

    /// Removes an app: a resident one is ended on its worker, and a live worker deletes its
    /// snapshots from cold storage.
    pub async fn remove(&self, name: &str) -> Result<(), HubError> {
        let record = self
            .get(name)
            .ok_or_else(|| HubError::NoSuchApp(name.into()))?;
        if let Some(worker) = &record.worker {
            if let Some(client) = self.live_client(worker) {
                if let Err(e) = client.delete::<()>(&format!("/v1/apps/{name}")).await {
                    tracing::warn!(app = %name, "ending it on worker {worker}: {e}");
                }
            }
        }
        if record.snapshot.is_some() {
            match self.choose_worker(name) {
                Some((worker, client)) => {
                    let path = format!("/v1/apps/{name}/snapshots");
                    if let Err(e) = client.delete::<serde_json::Value>(&path).await {
                        tracing::warn!(app = %name, "deleting its snapshots on worker {worker}: {e}");
                    }
                }
                None => tracing::warn!(app = %name, "no live worker to delete its snapshots"),
            }
        }
        lock(&self.apps).remove(name);
        self.registry.remove(name)?;
        tracing::info!(app = %name, "app removed");
        Ok(())
    }

    /// Whether an app is named `name`.
    pub fn contains(&self, name: &str) -> bool {
        lock(&self.apps).contains_key(name)
    }

    /// One app's record.
    pub fn get(&self, name: &str) -> Option<AppRecord> {
        lock(&self.apps).get(name).map(|v| v.record.clone())
    }

    /// Every app, by name.
    pub fn list(&self) -> Vec<AppRecord> {
        let mut all: Vec<AppRecord> = lock(&self.apps)
            .values()
            .map(|v| v.record.clone())
            .collect();
        all.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
        all
    }

    // ---- resolving ---------------------------------------------------------------------

    /// What app `name` resolves to: its address, after bringing it up if it is not
    /// resident.
    ///
    /// A swapped-out app whose address a live worker holds is answered at once with that
    /// address while it is brought back there: the client's connection waits in the held
    /// socket's backlog, so the DNS answer does not wait for the restore (issue #14).
    pub async fn resolve(self: &Arc<Self>, name: &str) -> Resolution {
        let current = {
            let apps = lock(&self.apps);
            match apps.get(name) {
                None => return Resolution::Unknown,
                Some(v) => (v.record.state, v.record.address),
            }
        };
        if let (AppState::Resident, Some(address)) = current {
            return Resolution::Address(address);
        }
        if matches!(current.0, AppState::SwappedOut | AppState::Starting) {
            if let Some(address) = self.held_address(name) {
                // The attempt runs on its own (bring_up spawns it); its outcome reaches
                // the registry, and the held socket wakes the app again if it fails.
                drop(self.bring_up(name));
                return Resolution::Address(address);
            }
        }
        match self.bring_up(name).await {
            Ok(address) => Resolution::Address(address),
            Err(e) => Resolution::Failed(e),
        }
    }

    /// Brings app `name` up on a worker, sharing one attempt among concurrent callers.
    /// The attempt runs to its end even if every caller goes away.
    pub fn bring_up(self: &Arc<Self>, name: &str) -> Bringing {
        let mut bringing = lock(&self.bringing);
        if let Some(attempt) = bringing.get(name) {
            return attempt.clone();
        }
        let this = self.clone();
        let app = name.to_string();
        let attempt = async move {
            let result = this.start_somewhere(&app).await;
            lock(&this.bringing).remove(&app);
            result
        }
        .boxed()
        .shared();
        bringing.insert(name.to_string(), attempt.clone());
        tokio::spawn(attempt.clone());
        attempt
    }

    /// The address a live worker holds for swapped-out app `name`, if one does.
    fn held_address(&self, name: &str) -> Option<Ipv4Addr> {
        self.registry.live_workers().iter().find_map(|w| {
            w.held
                .iter()
                .find(|(app, _)| app == name)
                .map(|(_, address)| *address)
        })
    }

    /// The client of worker `url`.
    fn client(&self, url: &str) -> Client {
        lock(&self.clients)
            .entry(url.to_string())
            .or_insert_with(|| Client::new(url, &self.token, self.config.start_limit))
            .clone()
    }

    /// The client of worker `id`, if it is live.
    fn live_client(&self, id: &str) -> Option<Client> {
        let live = self.registry.live_workers();
        let worker = live.iter().find(|w| w.hello.id == id)?;
        Some(self.client(&worker.hello.url))
    }

    /// Where app `name` should run: the live worker that holds its address (so that
    /// its clients' cached address keeps working, and what queued there is served), else
    /// the live worker with the least resident memory.
    fn choose_worker(&self, name: &str) -> Option<(String, Client)> {
        let live = self.registry.live_workers();
        live.iter()
            .find(|w| w.held.iter().any(|(app, _)| app == name))
            .or_else(|| {
                live.iter()
                    .min_by_key(|w| (w.memory_bytes, w.resident, w.hello.id.clone()))
            })
            .map(|w| (w.hello.id.clone(), self.client(&w.hello.url)))
    }

    /// Whether `record` is starting under an order whose outcome is still to come: its
    /// hub is serving, and the order is not overdue.
    fn order_pending(&self, record: &AppRecord) -> bool {
        let Some(orderer) = record.ordered_by.as_ref() else {
            return false;
        };
        if record.state != AppState::Starting {
            return false;
        }
        let limit = u64::try_from(self.config.start_limit.as_millis()).unwrap_or(u64::MAX);
        let overdue = unix_ms().saturating_sub(orderer.at_unix_ms) > limit.saturating_mul(2);
        // This hub's own attempts at one app are one at a time (`bring_up`): an order of
        // its own that is still in the record is one whose outcome was lost.
        let serving = orderer.hub != self.config.id
            && self.registry.hubs().iter().any(|h| h.id == orderer.hub);
        serving && !overdue
    }

    async fn start_somewhere(self: &Arc<Self>, name: &str) -> Result<Ipv4Addr, String> {
        let deadline = Instant::now() + self.config.start_limit;
        let mut changes = self.apps_changed.subscribe();
        let (worker, client, claim, before) = loop {
            let Some(before) = self.get(name) else {
                return Err(format!("no app named {name}"));
            };
            if let (AppState::Resident, Some(address)) = (before.state, before.address) {
                return Ok(address);
            }
            if self.order_pending(&before) {
                // Another hub ordered it: its outcome comes through the registry.
                let orderer = before.ordered_by.as_ref().map(|o| o.hub.clone());
                if Instant::now() >= deadline {
                    return Err(format!(
                        "hub {} did not bring it up in time",
                        orderer.unwrap_or_default()
                    ));
                }
                let _ = tokio::time::timeout(WAITING_LOOK, changes.changed()).await;
                continue;
            }
            // A start another hub ordered and left goes to the same worker again (it
            // may be under way there: the worker shares one start per app, and answers
            // at once if the app is running), else to the best worker.
            let ordered_before = (before.state == AppState::Starting)
                .then(|| before.worker.clone())
                .flatten()
                .and_then(|w| self.live_client(&w).map(|client| (w, client)));
            let Some((worker, client)) = ordered_before.or_else(|| self.choose_worker(name)) else {
                let error = "no live worker to run it".to_string();
                self.failed(name, None, &error);
                return Err(error);
            };
            let me = self.config.id.clone();
            let claim = StartOrderer {
                hub: me.clone(),
                at_unix_ms: unix_ms(),
            };
            let claimed = self.try_update(name, true, |r| {
                let resident = r.state == AppState::Resident && r.address.is_some();
                if resident || self.order_pending(r) {
                    return false;
                }
                r.state = AppState::Starting;
                r.worker = Some(worker.clone());
                r.ordered_by = Some(claim.clone());
                r.wake_at_unix_ms = None;
                r.event(match &r.snapshot {
                    Some(s) => format!("restoring snapshot {s} on worker {worker} (hub {me})"),
                    None => format!("starting on worker {worker} (hub {me})"),
                });
                true
            });
            match claimed {
                Ok(Some(claimed)) => break (worker, client, claim, claimed),
                // Resident, or ordered by another hub, since this hub last looked.
                Ok(None) => continue,
                Err(e) => return Err(format!("the registry: {e}")),
            }
        };
        let snapshot = before.snapshot.clone();
        let ordered = Instant::now();
        let order = StartOrder {
            spec: before.spec.clone(),
            snapshot: snapshot.clone(),
            chain_hint: before.chain_hint.clone(),
        };
        let answer: Result<Started, _> = client
            .post_within("/v1/start", &order, self.config.start_limit)
            .await;
        self.metrics
            .start_order(snapshot.is_some(), ordered.elapsed(), answer.is_ok());
        match answer {
            Ok(started) => {
                tracing::info!(app = %name, %worker, address = %started.address, ms = started.ms, "resident");
                let written = self.update(name, true, |r| {
                    // Its worker's report may have said so first; and if another hub took
                    // the start over meanwhile, the record is that hub's to write.
                    let told = r.state == AppState::Resident
                        && r.worker.as_deref() == Some(worker.as_str());
                    if r.ordered_by.as_ref() != Some(&claim) && !told {
                        return false;
                    }
                    r.state = AppState::Resident;
                    r.worker = Some(worker.clone());
                    r.ordered_by = None;
                    r.address = Some(started.address);
                    r.last_error = None;
                    if snapshot.is_some() && !told {
                        r.usage.swap_ins += 1;
                    }
                    r.event(format!(
                        "resident on worker {worker} at {} after {:.1} ms",
                        started.address, started.ms
                    ));
                    true
                });
                if written.is_some() {
                    return Ok(started.address);
                }
                // What the registry says now: this start's outcome, or another's.
                match self.get(name) {
                    Some(r) if r.state == AppState::Resident => r
                        .address
                        .ok_or_else(|| "resident with no address".to_string()),
                    Some(r) if r.worker.as_deref() == Some(worker.as_str()) => Ok(started.address),
                    _ => Err(format!("another hub took {name}'s start over")),
                }
            }
            Err(e) => {
                let error = format!("worker {worker} could not start it: {e}");
                self.failed(name, Some(&claim), &error);
                Err(error)
            }
        }
    }

    /// Records that app `name` could not be started: under this hub's `claim`, only if
    /// the record is still that claim's (another hub may have taken the start over, or
    /// the worker's report made it resident); with none (no order went out), unless it
    /// is resident or starting.
    fn failed(&self, name: &str, claim: Option<&StartOrderer>, error: &str) {
        tracing::warn!(app = %name, "{error}");
        self.update(name, true, |r| {
            let ours = match claim {
                Some(claim) => r.ordered_by.as_ref() == Some(claim),
                None => !matches!(r.state, AppState::Resident | AppState::Starting),
            };
            if !ours {
                return false;
            }
            r.state = AppState::Failed;
            r.worker = None;
            r.ordered_by = None;
            r.address = None;
            r.last_error = Some(error.to_string());
            r.event(format!("failed: {error}"));
            true
        });
    }

    // ---- workers -----------------------------------------------------------------------

    /// A worker introduces itself (again). One that was restarted (another instance
    /// under the same id) runs none of the apps its last instance ran: they go back to
    /// their snapshots.
    pub fn register_worker(&self, hello: WorkerHello) -> Result<(), HubError> {
        tracing::info!(id = %hello.id, url = %hello.url, "worker registered");
        let restarted = self.registry.live_workers().into_iter().any(|w| {
            w.hello.id == hello.id
                && w.hello.instance != 0
                && hello.instance != 0
                && w.hello.instance != hello.instance
        });
        if restarted {
            tracing::warn!(worker = %hello.id, "worker restarted: the apps it ran go back to their snapshots");
            let ran: Vec<String> = lock(&self.apps)
                .values()
                .filter(|v| v.record.worker.as_deref() == Some(hello.id.as_str()))
                .map(|v| v.record.spec.name.clone())
                .collect();
            for name in ran {
                self.update(&name, true, |r| {
                    let ran_there = matches!(r.state, AppState::Resident | AppState::Starting)
                        && r.worker.as_deref() == Some(hello.id.as_str());
                    if ran_there {
                        back_to_snapshot(r, "restarted");
                    }
                    ran_there
                });
            }
        }
        let worker = WorkerRecord {
            hello,
            memory_bytes: 0,
            resident: 0,
            held: Vec::new(),
            reported_at_unix_ms: unix_ms(),
        };
        Ok(self
            .registry
            .worker_alive(&worker, self.config.worker_timeout)?)
    }

    /// The live workers: id, URL, resident apps, memory, seconds since the last report.
    pub fn workers(&self) -> Vec<serde_json::Value> {
        let mut live = self.registry.live_workers();
        live.sort_by(|a, b| a.hello.id.cmp(&b.hello.id));
        live.iter()
            .map(|w| {
                let since_ms = unix_ms().saturating_sub(w.reported_at_unix_ms);
                serde_json::json!({
                    "id": w.hello.id,
                    "url": w.hello.url,
                    "resident": w.resident,
                    "memory_bytes": w.memory_bytes,
                    "memory_limit_bytes": w.hello.memory_limit_bytes,
                    "last_report_s": since_ms as f64 / 1000.0,
                })
            })
            .collect()
    }

    /// Whether the hub lost its hold on its registry for good: it must stop.
    pub fn registry_lost(&self) -> bool {
        self.registry.lost()
    }

    /// The metrics as `GET /metrics` serves them, its gauges brought up to date.
    pub fn render_metrics(&self) -> String {
        let mut by_state: HashMap<String, i64> = HashMap::new();
        for known in lock(&self.apps).values() {
            *by_state.entry(known.record.state.to_string()).or_default() += 1;
        }
        // Every state is shown, at 0 when no app is in it.
        for state in [
            AppState::New,
            AppState::Starting,
            AppState::Resident,
            AppState::SwappedOut,
            AppState::Failed,
        ] {
            let label = crate::metrics::StateLabel {
                state: state.to_string(),
            };
            let count = by_state.get(&label.state).copied().unwrap_or(0);
            self.metrics.apps.get_or_create(&label).set(count);
        }
        let live = self.registry.live_workers().len();
        self.metrics.workers.set(live as i64);
        self.metrics.render()
    }

    /// Takes a worker's report.
    pub fn report(&self, id: &str, report: WorkerReport) -> Result<(), HubError> {
        let mut worker = self
            .registry
            .live_workers()
            .into_iter()
            .find(|w| w.hello.id == id)
            .ok_or_else(|| HubError::NoSuchWorker(id.into()))?;
        worker.memory_bytes = report.memory_bytes;
        worker.resident = report.resident_count;
        worker.reported_at_unix_ms = unix_ms();
        if report.full {
            worker.held = report.held.clone();
        } else {
            worker
                .held
                .retain(|(name, _)| !report.unheld.contains(name));
            worker
                .held
                .retain(|(name, _)| !report.held.iter().any(|(n, _)| n == name));
            worker.held.extend(report.held.iter().cloned());
        }
        worker.held.sort();
        if !report.leaving {
            self.registry
                .worker_alive(&worker, self.config.worker_timeout)?;
        }
        self.metrics.swap_outs.inc_by(report.swapped.len() as u64);
        // Every app the report names, in batches of one registry transaction each.
        let mut named: Vec<&str> = (report.usage.iter().map(|(n, _)| n.as_str()))
            .chain(report.stored.iter().map(|s| s.name.as_str()))
            .chain(report.swapped.iter().map(|s| s.name.as_str()))
            .chain(report.ended.iter().map(|(n, _)| n.as_str()))
            .chain(report.resident.iter().map(|(n, _)| n.as_str()))
            .collect();
        named.sort();
        named.dedup();
        for batch in named.chunks(MAX_BATCH) {
            self.apply_report(id, &report, batch)?;
        }
        if report.leaving {
            tracing::info!(worker = %id, "worker left");
            self.registry.worker_left(id)?;
            lock(&self.known_workers).remove(id);
        }
        Ok(())
    }

    /// Applies what `report` says of the apps `names` to their records: in one
    /// transaction; or, if another hub wrote one of them first, one by one, each read
    /// again.
    fn apply_report(
        &self,
        id: &str,
        report: &WorkerReport,
        names: &[&str],
    ) -> Result<(), HubError> {
        {
            let mut apps = lock(&self.apps);
            let mut changed = Vec::new();
            let mut sync = false;
            for name in names {
                let Some(known) = apps.get(*name) else {
                    continue;
                };
                let mut record = known.record.clone();
                let (did, durable) = report_on_app(id, report, &mut record);
                if did {
                    sync |= durable;
                    changed.push((record, known.revision));
                }
            }
            if changed.is_empty() {
                return Ok(());
            }
            let batch: Vec<(&AppRecord, i64)> = changed.iter().map(|(r, v)| (r, *v)).collect();
            match self.registry.save_all(&batch, sync) {
                Ok(revisions) => {
                    for ((record, _), revision) in changed.into_iter().zip(revisions) {
                        apps.insert(record.spec.name.clone(), Versioned { record, revision });
                    }
                    drop(apps);
                    self.apps_changed.send_modify(|n| *n += 1);
                    return Ok(());
                }
                Err(RegistryError::Conflict) => {}
                Err(e) => {
                    // The worker sends it again (and deletes nothing it names meanwhile).
                    tracing::error!(worker = %id, "saving the registry: {e}");
                    return Err(e.into());
                }
            }
        }
        for name in names {
            self.try_update(name, true, |r| report_on_app(id, report, r).0)?;
        }
        Ok(())
    }

    // ---- maintenance ---------------------------------------------------------------------

    /// One round of maintenance: dead workers, due timers. Returns the apps woken.
    pub fn maintain(self: &Arc<Self>) -> Vec<String> {
        let live: HashSet<String> = self
            .registry
            .live_workers()
            .into_iter()
            .map(|w| w.hello.id)
            .collect();
        let dead: Vec<String> = {
            let mut known = lock(&self.known_workers);
            let dead = known.difference(&live).cloned().collect();
            *known = live.clone();
            dead
        };
        for id in &dead {
            tracing::warn!(worker = %id, "worker stopped reporting: its apps go back to their snapshots");
        }
        // Apps on dead workers, or (a while after a hub restart) on workers that never came
        // back, fall back to their last snapshot. Every hub does this; the first write
        // wins, and the others find nothing left to do.
        let grace = self.booted.elapsed() > self.config.worker_timeout * 2;
        let gone = |r: &AppRecord| {
            matches!(r.state, AppState::Resident | AppState::Starting)
                && r.worker.as_ref().is_some_and(|w| {
                    dead.contains(w)
                        || (grace && !live.contains(w) && r.state == AppState::Resident)
                })
        };
        let orphans: Vec<String> = lock(&self.apps)
            .values()
            .filter(|v| gone(&v.record))
            .map(|v| v.record.spec.name.clone())
            .collect();
        for name in orphans {
            self.update(&name, true, |r| {
                if !gone(r) {
                    return false;
                }
                back_to_snapshot(r, "gone");
                true
            });
        }
        // A start whose ordering hub died before writing the outcome is taken over now,
        // not at the next query (a timer-woken app has no query coming): every hub
        // tries, and the first claim wins; the start is ordered on the same worker.
        let grace = u64::try_from(self.config.worker_timeout.as_millis()).unwrap_or(u64::MAX);
        let abandoned: Vec<String> = lock(&self.apps)
            .values()
            .map(|v| &v.record)
            .filter(|r| r.state == AppState::Starting)
            .filter(|r| {
                r.ordered_by.as_ref().is_some_and(|o| {
                    o.hub != self.config.id && unix_ms().saturating_sub(o.at_unix_ms) > grace
                })
            })
            .filter(|r| !self.order_pending(r))
            .map(|r| r.spec.name.clone())
            .collect();
        for name in &abandoned {
            tracing::info!(app = %name, "its start's hub is gone: taking the start over");
            drop(self.bring_up(name));
        }
        let now = unix_ms();
        let due: Vec<String> = lock(&self.apps)
            .values()
            .map(|v| &v.record)
            .filter(|r| r.state == AppState::SwappedOut)
            .filter(|r| r.wake_at_unix_ms.is_some_and(|t| t <= now))
            .map(|r| r.spec.name.clone())
            .collect();
        for name in &due {
            tracing::info!(app = %name, "its timer is due: bringing it back");
            self.update(name, true, |r| {
                if r.wake_at_unix_ms.is_none() {
                    return false;
                }
                r.wake_at_unix_ms = None;
                r.event("timer due");
                true
            });
            drop(self.bring_up(name));
        }
        due
    }

    /// Runs maintenance every `period`, and makes the registry durable every few rounds.
    pub async fn maintain_forever(self: Arc<Self>, period: Duration) {
        let mut ticker = tokio::time::interval(period);
        let mut rounds = 0u64;
        loop {
            ticker.tick().await;
            self.maintain();
            rounds += 1;
            if rounds.is_multiple_of(20) {
                if let Err(e) = self.registry.flush() {
                    tracing::error!("flushing the registry: {e}");
                }
            }
        }
    }

    /// Makes every registry write durable (at shutdown).
    pub fn flush(&self) {
        if let Err(e) = self.registry.flush() {
            tracing::error!("flushing the registry: {e}");
        }
    }
}

/// Returns `record`'s app, which its worker no longer runs (the worker is `why`), to its
/// last snapshot (or to a fresh start).
fn back_to_snapshot(record: &mut AppRecord, why: &str) {
    let worker = record.worker.take().unwrap_or_default();
    record.state = if record.snapshot.is_some() {
        AppState::SwappedOut
    } else {
        AppState::New
    };
    record.address = None;
    record.ordered_by = None;
    record.event(format!(
        "worker {worker} is {why}: back to {}",
        record
            .snapshot
            .as_deref()
            .map(|s| format!("snapshot {s}"))
            .unwrap_or_else(|| "a fresh start".into())
    ));
}

/// Applies what worker `id`'s `report` says of `record`'s app: whether it changed it,
/// and whether durably (a change of state; usage alone is flushed with the next durable
/// write).
fn report_on_app(id: &str, report: &WorkerReport, record: &mut AppRecord) -> (bool, bool) {
    let name = record.spec.name.clone();
    let mut changed = false;
    let mut durable = false;
    for (_, delta) in report.usage.iter().filter(|(n, _)| *n == name) {
        // A figure no worker measures (negative, infinite, not a number) would make the
        // record one that no longer encodes as JSON numbers: it is left out.
        let measurable = |x: f64| x.is_finite() && x >= 0.0;
        if !measurable(delta.cpu_seconds) || !measurable(delta.memory_gib_seconds) {
            tracing::warn!(app = %name, worker = %id, "a usage report that is not a measurement: ignored");
            continue;
        }
        record.usage.add(delta);
        changed = true;
    }
    // Snapshots in the order the worker made them (a re-sent report's older ones
    // first), each only if the app is not another worker's now.
    let mut snapshots: Vec<(bool, &SwappedOut)> = (report.stored.iter().map(|s| (false, s)))
        .chain(report.swapped.iter().map(|s| (true, s)))
        .filter(|(_, s)| s.name == name)
        .collect();
    snapshots.sort_by_key(|(_, s)| s.seq);
    for (swapped_out, snapshot) in snapshots {
        let theirs = record.worker.as_deref().is_none_or(|w| w == id);
        if !theirs {
            if swapped_out {
                tracing::warn!(app = %name, worker = %id, "a swap-out from a worker the app is no longer on: ignored");
            }
            continue;
        }
        record.snapshot = Some(snapshot.snapshot.clone());
        record.chain_hint = snapshot.chain_hint.clone().bounded();
        record.usage.stored_bytes = snapshot.stored_bytes;
        record.usage.logical_bytes = snapshot.logical_bytes;
        changed = true;
        durable = true;
        if !swapped_out {
            record.event(format!(
                "snapshot {} in cold storage ({} bytes); it came back from the worker's copy meanwhile",
                snapshot.snapshot, snapshot.stored_bytes
            ));
            continue;
        }
        record.state = AppState::SwappedOut;
        record.worker = None;
        record.ordered_by = None;
        record.address = None;
        record.wake_at_unix_ms = snapshot.wake_at_unix_ms;
        record.event(format!(
            "swapped out to snapshot {} ({} bytes in cold storage){}",
            snapshot.snapshot,
            snapshot.stored_bytes,
            snapshot
                .wake_at_unix_ms
                .map(|t| format!(", wakes in {} ms", t.saturating_sub(unix_ms())))
                .unwrap_or_default()
        ));
    }
    for (_, why) in report.ended.iter().filter(|(n, _)| *n == name) {
        record.state = if record.snapshot.is_some() {
            AppState::SwappedOut
        } else {
            AppState::New
        };
        record.worker = None;
        record.ordered_by = None;
        record.address = None;
        record.last_error = Some(why.clone());
        record.event(format!("ended on worker {id}: {why}"));
        changed = true;
        durable = true;
    }
    for (_, address) in report.resident.iter().filter(|(n, _)| *n == name) {
        // After a hub restart, a start whose answer was lost, or a start ordered by a
        // hub that ended before the answer came: the worker says where it runs.
        let ours_starting =
            record.state == AppState::Starting && record.worker.as_deref() == Some(id);
        let known = record.state == AppState::Resident
            && record.worker.as_deref() == Some(id)
            && record.address == Some(*address);
        let stale = !known && (record.state != AppState::Starting || ours_starting);
        if stale {
            if ours_starting && record.snapshot.is_some() {
                record.usage.swap_ins += 1;
            }
            record.state = AppState::Resident;
            record.worker = Some(id.to_string());
            record.ordered_by = None;
            record.address = Some(*address);
            record.event(format!("resident on worker {id} at {address} (reported)"));
            changed = true;
            durable = true;
        }
    }
    (changed, durable)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub_with_worker(dir: &std::path::Path) -> Arc<Hub> {
        let registry = crate::registry::RegistryConfig::Redb(dir.join("registry"));
        let hub = Hub::open(HubConfig::default(), &registry, "t").unwrap();
        hub.register_worker(WorkerHello {
            id: "w".into(),
            url: "http://127.0.0.1:1".into(),
            memory_limit_bytes: 1 << 30,
            instance: 0,
        })
        .unwrap();
        for name in ["a", "b", "c"] {
            hub.add(AppSpec {
                name: name.into(),
                image: "img".into(),
                memory_mib: None,
                env: Vec::new(),
                idle_after_secs: None,
            })
            .unwrap();
        }
        hub
    }

    fn held(hub: &Hub) -> Vec<String> {
        let worker = hub
            .registry
            .live_workers()
            .into_iter()
            .find(|w| w.hello.id == "w");
        let mut held: Vec<String> = worker.unwrap().held.into_iter().map(|(n, _)| n).collect();
        held.sort();
        held
    }

    #[test]
    fn a_report_of_changes_updates_what_a_full_one_set() {
        let dir = tempfile::tempdir().unwrap();
        let hub = hub_with_worker(dir.path());
        let address = Ipv4Addr::new(10, 0, 0, 1);
        hub.report(
            "w",
            WorkerReport {
                full: true,
                resident: vec![("a".into(), address)],
                resident_count: 1,
                held: vec![("b".into(), Ipv4Addr::new(10, 0, 0, 2))],
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(held(&hub), ["b"]);
        assert_eq!(hub.get("a").unwrap().state, AppState::Resident);
        assert_eq!(hub.get("a").unwrap().address, Some(address));
        // A change: c is held now, b no longer; a is still resident though not named.
        hub.report(
            "w",
            WorkerReport {
                resident_count: 1,
                held: vec![("c".into(), Ipv4Addr::new(10, 0, 0, 3))],
                unheld: vec!["b".into()],
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(held(&hub), ["c"]);
        assert_eq!(hub.get("a").unwrap().state, AppState::Resident);
        assert_eq!(hub.workers()[0]["resident"], 1);
        // A full report replaces the set.
        hub.report(
            "w",
            WorkerReport {
                full: true,
                held: vec![("a".into(), address)],
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(held(&hub), ["a"]);
        assert_eq!(hub.workers()[0]["resident"], 0);
        // Its last report: the hub forgets it, and the addresses it held, at once.
        hub.report(
            "w",
            WorkerReport {
                leaving: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert!(hub.workers().is_empty());
        assert_eq!(hub.held_address("a"), None);
    }

    #[test]
    fn a_held_app_is_answered_with_its_address_before_it_is_back() {
        let dir = tempfile::tempdir().unwrap();
        let hub = hub_with_worker(dir.path());
        let held_at = Ipv4Addr::new(10, 0, 0, 2);
        hub.report(
            "w",
            WorkerReport {
                full: true,
                swapped: vec![crate::model::SwappedOut {
                    name: "b".into(),
                    snapshot: "s1".into(),
                    chain_hint: Default::default(),
                    stored_bytes: 1,
                    logical_bytes: 1,
                    wake_at_unix_ms: None,
                    seq: 1,
                }],
                held: vec![("b".into(), held_at)],
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(hub.get("b").unwrap().state, AppState::SwappedOut);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            // The worker's URL refuses: the answer cannot have waited for a start.
            assert_eq!(hub.resolve("b").await, Resolution::Address(held_at));
            // An app nobody holds waits for its start, which fails here.
            assert!(matches!(hub.resolve("c").await, Resolution::Failed(_)));
        });
    }

    #[test]
    fn a_snapshot_stored_after_its_app_came_back_moves_the_restore_point_only() {
        let dir = tempfile::tempdir().unwrap();
        let hub = hub_with_worker(dir.path());
        let address = Ipv4Addr::new(10, 0, 0, 1);
        // Each snapshot builds on the one before it.
        let snapshot = |id: &str, seq: u64| crate::model::SwappedOut {
            name: "a".into(),
            snapshot: id.into(),
            chain_hint: picocenter_snapshots::chain::ChainHint {
                ancestors: (0..seq).rev().map(|s| format!("s{s}")).collect(),
                first_parts: vec![4096; seq as usize + 1],
                ..Default::default()
            },
            stored_bytes: 7,
            logical_bytes: 9,
            wake_at_unix_ms: None,
            seq,
        };
        let resident = WorkerReport {
            resident: vec![("a".into(), address)],
            ..Default::default()
        };
        hub.report("w", resident).unwrap();
        // The upload of s1 ended after a request had brought the app back: still resident,
        // at the same address, but a worker that dies now leaves it at s1.
        hub.report(
            "w",
            WorkerReport {
                stored: vec![snapshot("s1", 1)],
                resident_count: 1,
                ..Default::default()
            },
        )
        .unwrap();
        let record = hub.get("a").unwrap();
        assert_eq!(record.state, AppState::Resident);
        assert_eq!(record.address, Some(address));
        assert_eq!(record.snapshot.as_deref(), Some("s1"));
        assert_eq!(record.usage.stored_bytes, 7);
        assert_eq!(record.usage.logical_bytes, 9);
        // A report re-sent with newer news (a re-sent report is a full one) carries a
        // swap-out (s2) and the snapshot stored after the app came back (s3): applied in
        // the worker's order, it ends at s3, resident.
        hub.report(
            "w",
            WorkerReport {
                full: true,
                stored: vec![snapshot("s3", 3)],
                swapped: vec![snapshot("s2", 2)],
                resident: vec![("a".into(), address)],
                resident_count: 1,
                ..Default::default()
            },
        )
        .unwrap();
        let record = hub.get("a").unwrap();
        assert_eq!(record.snapshot.as_deref(), Some("s3"));
        // A restore asks for the chain behind it at once.
        assert_eq!(record.chain_hint.ancestors, ["s2", "s1", "s0"]);
        assert_eq!(record.chain_hint.first_parts, [4096; 4]);
        assert_eq!(record.state, AppState::Resident);
        // A swap-out reported by a worker the app is no longer on changes nothing.
        hub.register_worker(WorkerHello {
            id: "other".into(),
            url: "http://127.0.0.1:1".into(),
            memory_limit_bytes: 1 << 30,
            instance: 0,
        })
        .unwrap();
        hub.report(
            "other",
            WorkerReport {
                swapped: vec![snapshot("s4", 4)],
                ..Default::default()
            },
        )
        .unwrap();
        let record = hub.get("a").unwrap();
        assert_eq!(record.snapshot.as_deref(), Some("s3"));
        assert_eq!(record.worker.as_deref(), Some("w"));
    }

    #[test]
    fn maintenance_takes_over_a_start_whose_hub_is_gone_without_a_query() {
        let dir = tempfile::tempdir().unwrap();
        let (_etcd, registry) = etcd_registry(dir.path(), "left");
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let (survivor, _following) = hub_on(&registry, "hub-b");
            let (url, orders) = counting_worker(Duration::from_millis(10)).await;
            register_worker_w(&survivor, url);
            survivor.add(app_spec("app")).unwrap();
            // A hub that is not serving claimed the start a while ago, and never wrote
            // its outcome.
            claim_start(&survivor, "hub-gone", unix_ms() - 60_000);
            until("maintenance brings it up", || {
                survivor.maintain();
                survivor.get("app").unwrap().state == AppState::Resident
            })
            .await;
            assert_eq!(orders.load(std::sync::atomic::Ordering::SeqCst), 1);
        });
    }

    #[test]
    fn a_restarted_worker_runs_none_of_its_last_instances_apps() {
        let dir = tempfile::tempdir().unwrap();
        let registry = crate::registry::RegistryConfig::Redb(dir.path().join("registry"));
        let hub = Hub::open(HubConfig::default(), &registry, "t").unwrap();
        let hello = |instance| WorkerHello {
            id: "w".into(),
            url: "http://127.0.0.1:1".into(),
            memory_limit_bytes: 1 << 30,
            instance,
        };
        hub.register_worker(hello(1)).unwrap();
        hub.add(app_spec("a")).unwrap();
        let address = Ipv4Addr::new(10, 0, 0, 1);
        let resident = WorkerReport {
            full: true,
            resident: vec![("a".into(), address)],
            resident_count: 1,
            ..Default::default()
        };
        hub.report("w", resident).unwrap();
        assert_eq!(hub.get("a").unwrap().state, AppState::Resident);
        // The same instance registering again (its hub restarted) changes nothing.
        hub.register_worker(hello(1)).unwrap();
        assert_eq!(hub.get("a").unwrap().state, AppState::Resident);
        // Another instance under the same id (the worker restarted within its lease).
        hub.register_worker(hello(2)).unwrap();
        let record = hub.get("a").unwrap();
        assert_eq!(record.state, AppState::New);
        assert_eq!((record.worker, record.address), (None, None));
        let last = record.events.last().unwrap();
        assert!(last.what.contains("restarted"), "{}", last.what);
    }

    /// A worker's order API that answers every start after `delay`, at 10.9.0.1, and
    /// counts the orders: its URL and the count.
    async fn counting_worker(delay: Duration) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        let orders = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = orders.clone();
        let router = axum::Router::new().route(
            "/v1/start",
            axum::routing::post(move || {
                let counted = counted.clone();
                async move {
                    counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    tokio::time::sleep(delay).await;
                    axum::Json(Started {
                        address: Ipv4Addr::new(10, 9, 0, 1),
                        ms: 1.0,
                    })
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, router).await });
        (url, orders)
    }

    /// Hub `id` on `registry`, following it and announced: the hub, and the task that
    /// follows the registry (it holds the hub too).
    fn hub_on(
        registry: &crate::registry::RegistryConfig,
        id: &str,
    ) -> (Arc<Hub>, tokio::task::JoinHandle<()>) {
        let config = HubConfig {
            id: id.into(),
            ..HubConfig::default()
        };
        let hub = Hub::open(config, registry, "t").unwrap();
        let following = tokio::spawn(hub.clone().follow_registry());
        hub.announce("127.0.0.1:53".parse().unwrap()).unwrap();
        (hub, following)
    }

    fn app_spec(name: &str) -> AppSpec {
        AppSpec {
            name: name.into(),
            image: "img".into(),
            memory_mib: None,
            env: Vec::new(),
            idle_after_secs: None,
        }
    }

    /// A registry under `prefix` on a new etcd with its data in `dir` (the server lives as
    /// long as the first value).
    fn etcd_registry(
        dir: &std::path::Path,
        prefix: &str,
    ) -> (
        crate::registry::etcd::testing::EtcdServer,
        crate::registry::RegistryConfig,
    ) {
        let etcd = crate::registry::etcd::testing::EtcdServer::start(dir);
        let url = format!("{}/{prefix}", etcd.url);
        let registry = crate::registry::RegistryConfig::parse(&url, "x".into()).unwrap();
        (etcd, registry)
    }

    /// Registers worker "w", whose order API is at `url`, with `hub`.
    fn register_worker_w(hub: &Hub, url: String) {
        hub.register_worker(WorkerHello {
            id: "w".into(),
            url,
            memory_limit_bytes: 1 << 30,
            instance: 0,
        })
        .unwrap();
    }

    /// Writes through `hub` that hub `by` claimed app "app"'s start on worker "w" at
    /// `at_unix_ms`, as `start_somewhere` does before its order goes out.
    fn claim_start(hub: &Hub, by: &str, at_unix_ms: u64) {
        hub.try_update("app", true, |r| {
            r.state = AppState::Starting;
            r.worker = Some("w".into());
            r.ordered_by = Some(StartOrderer {
                hub: by.into(),
                at_unix_ms,
            });
            true
        })
        .unwrap()
        .unwrap();
    }

    /// Waits (bounded) until `ready` holds.
    async fn until(what: &str, ready: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ready() {
            assert!(Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[test]
    fn of_two_hubs_asked_for_one_app_at_once_exactly_one_orders_its_start() {
        let dir = tempfile::tempdir().unwrap();
        let (_etcd, registry) = etcd_registry(dir.path(), "race");
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let (first, second) = (hub_on(&registry, "hub-a").0, hub_on(&registry, "hub-b").0);
            let (url, orders) = counting_worker(Duration::from_millis(300)).await;
            // The worker registers with one hub; an app is added at the other.
            register_worker_w(&first, url);
            for round in 0..3 {
                let name = format!("app-{round}");
                second.add(app_spec(&name)).unwrap();
                until("the first hub sees the app and the worker", || {
                    first.contains(&name) && second.choose_worker(&name).is_some()
                })
                .await;
                let before = orders.load(std::sync::atomic::Ordering::SeqCst);
                let (a, b) = tokio::join!(first.resolve(&name), second.resolve(&name));
                let address = Resolution::Address(Ipv4Addr::new(10, 9, 0, 1));
                assert_eq!((&a, &b), (&address, &address), "round {round}");
                let ordered = orders.load(std::sync::atomic::Ordering::SeqCst) - before;
                assert_eq!(ordered, 1, "round {round}: one start order, from one hub");
                // Both hubs agree on the record; it counts the start once.
                until("the hubs agree", || first.get(&name) == second.get(&name)).await;
                let record = first.get(&name).unwrap();
                assert_eq!(record.state, AppState::Resident);
                assert_eq!(record.ordered_by, None);
                // The same name added at the other hub meanwhile is refused.
                let again = first.add(record.spec.clone()).unwrap_err();
                assert!(matches!(again, HubError::Exists(_)), "{again}");
            }
        });
    }

    #[test]
    fn a_hub_waiting_for_another_hubs_order_takes_over_when_that_hub_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let (_etcd, registry) = etcd_registry(dir.path(), "gone");
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let (survivor, _following) = hub_on(&registry, "hub-b");
            let (url, orders) = counting_worker(Duration::from_millis(10)).await;
            register_worker_w(&survivor, url);
            survivor.add(app_spec("app")).unwrap();
            // Another hub claimed the app's start, and ended before its order went out.
            {
                let (doomed, following) = hub_on(&registry, "hub-a");
                until("hub-a sees the app", || doomed.contains("app")).await;
                claim_start(&doomed, "hub-a", unix_ms());
                until("hub-b sees the claim", || {
                    survivor.get("app").unwrap().state == AppState::Starting
                })
                .await;
                following.abort();
                let _ = following.await;
                // The last reference: its registry lets go of its key.
                drop(doomed);
            }
            // The survivor waits for it while it serves, then orders the start itself.
            let address = Resolution::Address(Ipv4Addr::new(10, 9, 0, 1));
            assert_eq!(survivor.resolve("app").await, address);
            assert_eq!(orders.load(std::sync::atomic::Ordering::SeqCst), 1);
            let record = survivor.get("app").unwrap();
            assert_eq!(record.state, AppState::Resident);
        });
    }
}
