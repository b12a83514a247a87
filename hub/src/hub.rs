//! The hub: the registry of apps and workers, placement, and bringing apps back.
//!
//! [`Hub::resolve`] is what a DNS query for an app does: a resident app's address at once;
//! otherwise a start order to a worker (a restore when the app has a snapshot), answered
//! once the app's listening sockets are bound. Concurrent queries for one app share one
//! order. A maintenance loop ([`Hub::maintain`]) declares silent workers dead (their apps
//! fall back to their last snapshot), wakes swapped-out apps whose timers are due, and
//! makes usage updates durable.

use crate::client::Client;
use crate::model::{
    unix_ms, AppRecord, AppSpec, AppState, StartOrder, Started, SwappedOut, WorkerHello,
    WorkerReport,
};
use crate::registry::{Registry, RegistryError};
use futures::future::{BoxFuture, FutureExt, Shared};
use std::collections::HashMap;
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
}

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            start_limit: Duration::from_secs(30),
            worker_timeout: Duration::from_secs(3),
        }
    }
}

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

/// A worker as the hub knows it.
#[derive(Debug)]
struct WorkerEntry {
    hello: WorkerHello,
    client: Client,
    last_report: Instant,
    memory_bytes: u64,
    resident: usize,
    /// Swapped-out apps whose addresses it holds, and the addresses.
    held: HashMap<String, Ipv4Addr>,
}

type Bringing = Shared<BoxFuture<'static, Result<Ipv4Addr, String>>>;

/// The hub.
#[derive(Debug)]
pub struct Hub {
    config: HubConfig,
    registry: Registry,
    apps: Mutex<HashMap<String, AppRecord>>,
    workers: Mutex<HashMap<String, WorkerEntry>>,
    bringing: Mutex<HashMap<String, Bringing>>,
    token: Arc<str>,
    booted: Instant,
    /// Counters.
    /// What `GET /metrics` serves.
    pub metrics: crate::metrics::HubMetrics,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Hub {
    /// A hub over the registry `registry` names, whose APIs (its own and the workers')
    /// use `token`.
    pub fn open(
        config: HubConfig,
        registry: &crate::registry::RegistryConfig,
        token: &str,
    ) -> Result<Arc<Self>, HubError> {
        let registry = Registry::open(registry)?;
        let apps = registry
            .load()?
            .into_iter()
            .map(|r| (r.spec.name.clone(), r))
            .collect();
        Ok(Arc::new(Self {
            config,
            registry,
            apps: Mutex::new(apps),
            workers: Mutex::new(HashMap::new()),
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

    /// Applies `change` to app `name` and writes it through (`sync`: durably).
    fn update(&self, name: &str, sync: bool, change: impl FnOnce(&mut AppRecord)) {
        let mut apps = lock(&self.apps);
        if let Some(record) = apps.get_mut(name) {
            change(record);
            if let Err(e) = self.registry.save(record, sync) {
                tracing::error!(app = %name, "saving the registry: {e}");
            }
        }
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
        self.registry.save(&record, true)?;
        tracing::info!(app = %record.spec.name, image = %record.spec.image, "app registered");
        apps.insert(record.spec.name.clone(), record.clone());
        Ok(record)
    }

    /// Removes an app: a resident one is ended on its worker, and a live worker deletes its
    /// snapshots from cold storage.
    pub async fn remove(&self, name: &str) -> Result<(), HubError> {
        let record = self
            .get(name)
            .ok_or_else(|| HubError::NoSuchApp(name.into()))?;
        if let Some(worker) = &record.worker {
            let client = lock(&self.workers).get(worker).map(|w| w.client.clone());
            if let Some(client) = client {
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
        lock(&self.apps).get(name).cloned()
    }

    /// Every app, by name.
    pub fn list(&self) -> Vec<AppRecord> {
        let mut all: Vec<AppRecord> = lock(&self.apps).values().cloned().collect();
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
                Some(r) => (r.state, r.address),
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
        lock(&self.workers)
            .values()
            .filter(|w| w.last_report.elapsed() < self.config.worker_timeout)
            .find_map(|w| w.held.get(name).copied())
    }

    /// Where app `name` should run: the live worker that holds its address (so that
    /// its clients' cached address keeps working, and what queued there is served), else
    /// the live worker with the least resident memory.
    fn choose_worker(&self, name: &str) -> Option<(String, Client)> {
        let workers = lock(&self.workers);
        let live = || {
            workers
                .values()
                .filter(|w| w.last_report.elapsed() < self.config.worker_timeout)
        };
        live()
            .find(|w| w.held.contains_key(name))
            .or_else(|| live().min_by_key(|w| (w.memory_bytes, w.resident)))
            .map(|w| (w.hello.id.clone(), w.client.clone()))
    }

    async fn start_somewhere(self: &Arc<Self>, name: &str) -> Result<Ipv4Addr, String> {
        let Some(before) = self.get(name) else {
            return Err(format!("no app named {name}"));
        };
        if let (AppState::Resident, Some(address)) = (before.state, before.address) {
            return Ok(address);
        }
        let Some((worker, client)) = self.choose_worker(name) else {
            let error = "no live worker to run it".to_string();
            self.failed(name, &error);
            return Err(error);
        };
        let snapshot = before.snapshot.clone();
        self.update(name, true, |r| {
            r.state = AppState::Starting;
            r.worker = Some(worker.clone());
            r.wake_at_unix_ms = None;
            r.event(match &snapshot {
                Some(s) => format!("restoring snapshot {s} on worker {worker}"),
                None => format!("starting on worker {worker}"),
            });
        });
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
                self.update(name, true, |r| {
                    r.state = AppState::Resident;
                    r.worker = Some(worker.clone());
                    r.address = Some(started.address);
                    r.last_error = None;
                    if snapshot.is_some() {
                        r.usage.swap_ins += 1;
                    }
                    r.event(format!(
                        "resident on worker {worker} at {} after {:.1} ms",
                        started.address, started.ms
                    ));
                });
                Ok(started.address)
            }
            Err(e) => {
                let error = format!("worker {worker} could not start it: {e}");
                self.failed(name, &error);
                Err(error)
            }
        }
    }

    fn failed(&self, name: &str, error: &str) {
        tracing::warn!(app = %name, "{error}");
        self.update(name, true, |r| {
            r.state = AppState::Failed;
            r.worker = None;
            r.address = None;
            r.last_error = Some(error.to_string());
            r.event(format!("failed: {error}"));
        });
    }

    // ---- workers -----------------------------------------------------------------------

    /// A worker introduces itself (again).
    pub fn register_worker(&self, hello: WorkerHello) {
        tracing::info!(id = %hello.id, url = %hello.url, "worker registered");
        let client = Client::new(&hello.url, &self.token, self.config.start_limit);
        lock(&self.workers).insert(
            hello.id.clone(),
            WorkerEntry {
                hello,
                client,
                last_report: Instant::now(),
                memory_bytes: 0,
                resident: 0,
                held: Default::default(),
            },
        );
    }

    /// The registered workers: id, URL, resident apps, memory, seconds since the last
    /// report.
    pub fn workers(&self) -> Vec<serde_json::Value> {
        lock(&self.workers)
            .values()
            .map(|w| {
                serde_json::json!({
                    "id": w.hello.id,
                    "url": w.hello.url,
                    "resident": w.resident,
                    "memory_bytes": w.memory_bytes,
                    "memory_limit_bytes": w.hello.memory_limit_bytes,
                    "last_report_s": w.last_report.elapsed().as_secs_f64(),
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
        for record in lock(&self.apps).values() {
            *by_state.entry(record.state.to_string()).or_default() += 1;
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
        let live = lock(&self.workers)
            .values()
            .filter(|w| w.last_report.elapsed() < self.config.worker_timeout)
            .count();
        self.metrics.workers.set(live as i64);
        self.metrics.render()
    }

    /// Takes a worker's report.
    pub fn report(&self, id: &str, report: WorkerReport) -> Result<(), HubError> {
        {
            let mut workers = lock(&self.workers);
            let worker = workers
                .get_mut(id)
                .ok_or_else(|| HubError::NoSuchWorker(id.into()))?;
            worker.last_report = Instant::now();
            worker.memory_bytes = report.memory_bytes;
            worker.resident = report.resident_count;
            if report.full {
                worker.held = report.held.iter().cloned().collect();
            } else {
                for name in &report.unheld {
                    worker.held.remove(name);
                }
                worker.held.extend(report.held.iter().cloned());
            }
        }
        // One lock and one registry transaction for the whole report; durable if any
        // app changed state (usage alone is flushed with the next durable write).
        let mut apps = lock(&self.apps);
        let mut changed = std::collections::BTreeSet::new();
        let mut sync = false;
        // `change` says whether it changed anything.
        let mut edit =
            |name: &str, durable: bool, change: &mut dyn FnMut(&mut AppRecord) -> bool| {
                if apps.get_mut(name).is_some_and(change) {
                    changed.insert(name.to_string());
                    sync |= durable;
                }
            };
        for (name, delta) in &report.usage {
            edit(name, false, &mut |r| {
                r.usage.add(delta);
                true
            });
        }
        // Snapshots in the order the worker made them (a re-sent report's older ones
        // first), each only if the app is not another worker's now.
        let mut snapshots: Vec<(bool, &SwappedOut)> = (report.stored.iter().map(|s| (false, s)))
            .chain(report.swapped.iter().map(|s| (true, s)))
            .collect();
        snapshots.sort_by_key(|(_, s)| s.seq);
        self.metrics.swap_outs.inc_by(report.swapped.len() as u64);
        for (swapped_out, snapshot) in snapshots {
            let theirs = |r: &AppRecord| r.worker.as_deref().is_none_or(|w| w == id);
            if !swapped_out {
                edit(&snapshot.name, true, &mut |r| {
                    if !theirs(r) {
                        return false;
                    }
                    r.snapshot = Some(snapshot.snapshot.clone());
                    r.chain_hint = snapshot.chain_hint.clone().bounded();
                    r.usage.stored_bytes = snapshot.stored_bytes;
                    r.usage.logical_bytes = snapshot.logical_bytes;
                    r.event(format!(
                        "snapshot {} in cold storage ({} bytes); it came back from the worker's copy meanwhile",
                        snapshot.snapshot, snapshot.stored_bytes
                    ));
                    true
                });
                continue;
            }
            let swapped = snapshot;
            edit(&swapped.name, true, &mut |r| {
                if !theirs(r) {
                    tracing::warn!(app = %swapped.name, worker = %id, "a swap-out from a worker the app is no longer on: ignored");
                    return false;
                }
                r.state = AppState::SwappedOut;
                r.worker = None;
                r.address = None;
                r.snapshot = Some(swapped.snapshot.clone());
                r.chain_hint = swapped.chain_hint.clone().bounded();
                r.usage.stored_bytes = swapped.stored_bytes;
                r.usage.logical_bytes = swapped.logical_bytes;
                r.wake_at_unix_ms = swapped.wake_at_unix_ms;
                r.event(format!(
                    "swapped out to snapshot {} ({} bytes in cold storage){}",
                    swapped.snapshot,
                    swapped.stored_bytes,
                    swapped
                        .wake_at_unix_ms
                        .map(|t| format!(", wakes in {} ms", t.saturating_sub(unix_ms())))
                        .unwrap_or_default()
                ));
                true
            });
        }
        for (name, why) in &report.ended {
            edit(name, true, &mut |r| {
                r.state = if r.snapshot.is_some() {
                    AppState::SwappedOut
                } else {
                    AppState::New
                };
                r.worker = None;
                r.address = None;
                r.last_error = Some(why.clone());
                r.event(format!("ended on worker {id}: {why}"));
                true
            });
        }
        for (name, address) in &report.resident {
            // After a hub restart, or a start whose answer was lost.
            edit(name, true, &mut |r| {
                let stale = r.state != AppState::Starting
                    && (r.state != AppState::Resident || r.worker.as_deref() != Some(id));
                if stale {
                    r.state = AppState::Resident;
                    r.worker = Some(id.to_string());
                    r.address = Some(*address);
                    r.event(format!("resident on worker {id} at {address} (reported)"));
                }
                stale
            });
        }
        if !changed.is_empty() {
            let records = changed.iter().filter_map(|name| apps.get(name));
            if let Err(e) = self.registry.save_all(records, sync) {
                // The worker sends it again (and deletes nothing it names meanwhile).
                tracing::error!(worker = %id, "saving the registry: {e}");
                return Err(e.into());
            }
        }
        drop(apps);
        if report.leaving {
            tracing::info!(worker = %id, "worker left");
            lock(&self.workers).remove(id);
        }
        Ok(())
    }

    // ---- maintenance ---------------------------------------------------------------------

    /// One round of maintenance: dead workers, due timers. Returns the apps woken.
    pub fn maintain(self: &Arc<Self>) -> Vec<String> {
        let dead: Vec<String> = {
            let mut workers = lock(&self.workers);
            let dead: Vec<String> = workers
                .values()
                .filter(|w| w.last_report.elapsed() >= self.config.worker_timeout)
                .map(|w| w.hello.id.clone())
                .collect();
            for id in &dead {
                workers.remove(id);
            }
            dead
        };
        for id in &dead {
            tracing::warn!(worker = %id, "worker stopped reporting: its apps go back to their snapshots");
        }
        let live: Vec<String> = lock(&self.workers).keys().cloned().collect();
        // Apps on dead workers, or (a while after a hub restart) on workers that never came
        // back, fall back to their last snapshot.
        let grace = self.booted.elapsed() > self.config.worker_timeout * 2;
        let orphans: Vec<String> = lock(&self.apps)
            .values()
            .filter(|r| matches!(r.state, AppState::Resident | AppState::Starting))
            .filter(|r| {
                r.worker.as_ref().is_some_and(|w| {
                    dead.contains(w)
                        || (grace && !live.contains(w) && r.state == AppState::Resident)
                })
            })
            .map(|r| r.spec.name.clone())
            .collect();
        for name in orphans {
            self.update(&name, true, |r| {
                let worker = r.worker.take().unwrap_or_default();
                r.state = if r.snapshot.is_some() {
                    AppState::SwappedOut
                } else {
                    AppState::New
                };
                r.address = None;
                r.event(format!(
                    "worker {worker} is gone: back to {}",
                    r.snapshot
                        .as_deref()
                        .map(|s| format!("snapshot {s}"))
                        .unwrap_or_else(|| "a fresh start".into())
                ));
            });
        }
        let now = unix_ms();
        let due: Vec<String> = lock(&self.apps)
            .values()
            .filter(|r| r.state == AppState::SwappedOut)
            .filter(|r| r.wake_at_unix_ms.is_some_and(|t| t <= now))
            .map(|r| r.spec.name.clone())
            .collect();
        for name in &due {
            tracing::info!(app = %name, "its timer is due: bringing it back");
            self.update(name, true, |r| {
                r.wake_at_unix_ms = None;
                r.event("timer due");
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
        });
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
        let mut held: Vec<String> = lock(&hub.workers)["w"].held.keys().cloned().collect();
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
        });
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
}
