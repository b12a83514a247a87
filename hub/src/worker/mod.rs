//! The worker: runs apps as child VMM processes, watches them for idleness, swaps idle
//! ones out to cold storage (freeing guest memory, vCPU and fd table with the process),
//! and brings them back when the hub orders it.
//!
//! * **Idle**: an app is idle when its threads have taken no CPU and it accepted no
//!   connection for `idle_after`, as the VMM's stats page and the kernel's CPU clocks say
//!   (see `picocenter_vmm::stats_page::StatsView`), read every [`look_period`]. Waiting in
//!   `accept`, `poll` or `epoll_wait` costs a picoprocess no CPU at all, and looking at it
//!   never wakes it.
//! * **Uploads**: with S3, a swap-out frees the app's memory once its snapshot is on the
//!   worker's disk; the upload runs after, and the hub hears of the swap-out when it ends
//!   (see [`upload`]).
//! * **Capacity**: before starting an app, least-recently-active apps are swapped out
//!   until the resident memory of all apps fits under the limit.
//! * **Reports**: every second the worker tells the hub what changed: apps that became
//!   resident, what apps used, which it swapped out or lost, and whose sockets it holds.
//!   The first report after it registers carries everything; the others only changes, so
//!   a report costs the same with 10 apps or 5,000 that idle. The report is also the
//!   heartbeat.
//! * **Addresses**: an app keeps its address while it is swapped out here. The worker
//!   holds the app's listening and UDP sockets (see [`held`]), so connections queue in
//!   their backlog and the first one wakes the app (through the hub, which places it
//!   back here); the restored VMM takes the same sockets back. An address an app leaves
//!   is not given to another app for `address_quarantine`, longer than any client should
//!   keep a DNS answer.

pub mod api;
pub mod child;
pub mod held;
pub mod limits;
pub mod pool;
pub mod supervision;
mod upload;
pub mod vmm;

use crate::cold::{Cold, MAX_CHAIN};
use crate::model::{AppSpec, StartOrder, Started, SwappedOut, UsageDelta, WorkerReport};
use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;
use vmm::{Launch, Vmm};

/// Streams `chain` into app `name`'s VMM over `feed` on a blocking thread, and logs how
/// it went; the task says whether it completed the local copy.
fn feed(
    name: String,
    chain: picocenter_snapshots::s3::ChainStream,
    feed: std::os::unix::net::UnixStream,
) -> tokio::task::JoinHandle<bool> {
    tokio::task::spawn_blocking(move || match chain.run(feed) {
        Ok(report) => {
            tracing::info!(
                app = %name,
                mib = report.bytes as f64 / 1048576.0,
                wanted = report.wanted,
                ms = report.ms,
                "streamed its page files from S3"
            );
            true
        }
        Err(e) => {
            tracing::warn!(
                app = %name,
                "streaming its page files from S3 failed: {}",
                picocenter_vmm::report::error_chain(&e)
            );
            false
        }
    })
}

/// How long a swap-out waits for the app's page files to finish streaming in.
const STREAM_WAIT: Duration = Duration::from_secs(60);

/// How a worker runs.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Its id, unique among the hub's workers.
    pub id: String,
    /// The addresses it gives its apps: the first, and how many.
    pub addresses: (Ipv4Addr, u32),
    /// Swap an app out after this long without CPU or connections.
    pub idle_after: Duration,
    /// Resident memory all its apps may use, bytes.
    pub memory_limit: u64,
    /// The `picocenter` binary that runs VMMs.
    pub picocenter: PathBuf,
    /// The state directory the VMMs use (images, control sockets).
    pub state_dir: PathBuf,
    /// The cluster's snapshot key, which the VMMs sign and check snapshots with.
    pub key_file: PathBuf,
    /// The worker's own directory (logs, staging).
    pub work_dir: PathBuf,
    /// How long a start or restore may take.
    pub start_limit: Duration,
    /// How long an address an app left stays unused before another app gets it.
    pub address_quarantine: Duration,
    /// Bytes the local copies of S3 snapshots may take: past it, the copies of
    /// swapped-out apps go, the longest out first (their next restore fetches from S3).
    pub cache_limit: u64,
    /// With S3: start a restoring VMM once the manifests are in, and stream the page files
    /// to it (else download everything first).
    pub stream_swap_in: bool,
    /// With S3: shape a restore's first round trip by the hub's [`ChainHint`]
    /// (`picocenter_snapshots::chain::ChainHint`): the ancestors it names, and each page
    /// file's ActiveSet, asked for with the newest manifest (else each ancestor only once
    /// a manifest lists it, and 2 MiB of each page file; for comparison).
    pub use_chain_hint: bool,
    /// Spare VMMs kept started ahead, with their VMs made (0: none).
    pub warm_pool: usize,
    /// The network interface (its index) that each app's address is added to while an
    /// app has it, so that other hosts reach apps directly (`None`: the addresses are
    /// already this host's, as 127.0.0.0/8 is).
    pub interface: Option<u32>,
}

impl WorkerConfig {
    /// The temporary directory of the VMMs it starts (their `TMPDIR`), in its own
    /// directory.
    pub fn temp_dir(&self) -> PathBuf {
        self.work_dir.join("tmp")
    }
}

/// Takes the worker's own directory `work_dir` for this process (a lease on its
/// `worker.lock`, held while the returned lease lives), and then empties the VMMs'
/// temporary directory `temp_dir` in it: what is there was left by VMMs of an earlier run
/// of this worker, which died with it (a VMM never outlives its worker). A directory
/// another live worker holds (the same id, twice) is left alone.
fn take_work_dir(
    work_dir: &Path,
    temp_dir: &Path,
) -> Option<picocenter_vmm::sandbox::lease::Lease<&'static str>> {
    let lease = match picocenter_vmm::sandbox::lease::take_first_free(work_dir, ["worker"]) {
        Ok(Some(lease)) => lease,
        held => {
            let why = held.err().map_or("held".to_string(), |e| e.to_string());
            tracing::warn!(
                "{}/worker.lock: {why}; another worker with this id may be running: what \
                 its VMMs left in {} stays",
                work_dir.display(),
                temp_dir.display()
            );
            return None;
        }
    };
    match std::fs::remove_dir_all(temp_dir) {
        Ok(()) => tracing::debug!("removed what earlier VMMs left in {}", temp_dir.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!("emptying {}: {e}", temp_dir.display()),
    }
    if let Err(e) = picocenter_snapshots::private::create_dir_all(temp_dir) {
        tracing::warn!("creating {}: {e}", temp_dir.display());
    }
    Some(lease)
}

/// Why an order failed.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The VMM failed.
    #[error(transparent)]
    Vmm(#[from] vmm::VmmError),
    /// Cold storage failed.
    #[error("cold storage: {0}")]
    Store(#[from] picocenter_snapshots::StoreError),
    /// No address left.
    #[error("no free address among the worker's {0}")]
    NoAddress(u32),
    /// The app is not here.
    #[error("app {0} is not resident on this worker")]
    NotHere(String),
    /// The app was not idle when its snapshot was to be taken: it runs on.
    #[error("{0}")]
    Busy(String),
    /// A blocking task failed.
    #[error("internal: {0}")]
    Internal(String),
    /// An app name that cannot name its files.
    #[error(transparent)]
    Name(#[from] picocenter_snapshots::names::NameError),
    /// The app's address could not be added to the worker's interface.
    #[error(transparent)]
    Interface(#[from] picocenter_vmm::sandbox::rtnetlink::NetlinkError),
}

/// How a swap-out went, once the app's memory is free.
#[derive(Debug)]
enum SwapOut {
    /// Its snapshot is in cold storage, and the hub will hear of it.
    Stored(SwappedOut),
    /// Its snapshot is on its way to S3: the task ends with the upload (see [`upload`]).
    Uploading(tokio::task::JoinHandle<Result<SwappedOut, WorkerError>>),
}

/// One start of an app, shared by the orders that ask for it at once.
type StartOnce = tokio::sync::OnceCell<Result<Started, String>>;

/// How long an app's memory use may go unreported while it idles (CPU and requests are
/// reported at once).
const MEMORY_REPORT_PERIOD: Duration = Duration::from_secs(60);

/// How often the worker looks at an app's counters: often enough to swap it out within
/// 5% of its idle limit, and no more often than every half second nor less than every
/// five (at the default 60 s limit, every 3 s: a worker holding 5,000 idle apps looks at
/// about 1,700 a second, at two system calls each).
fn look_period(idle_after: Duration) -> Duration {
    (idle_after / 20).clamp(Duration::from_millis(500), Duration::from_secs(5))
}

/// One resident app.
#[derive(Debug)]
struct Resident {
    /// How it runs (what a swap-out needs to bring it back from the local copy).
    spec: AppSpec,
    vmm: Vmm,
    /// Its counters without waking it, when its stats page can be read.
    view: Option<picocenter_vmm::stats_page::StatsView>,
    /// Usage not yet in a report, and since when it accrues.
    unreported: UsageDelta,
    unreported_since: Instant,
    address: Ipv4Addr,
    /// When it last used CPU or accepted a connection.
    last_active: Instant,
    /// Its idle limit.
    idle_after: Duration,
    /// Counters at the last look, for deltas.
    cpu: Duration,
    app_cpu: Duration,
    connections: u64,
    rss: u64,
    looked: Instant,
    /// The stream of its page files from S3, while it runs (a swap-out waits for it: the
    /// next snapshot builds on them).
    feeding: Option<Feeding>,
}

/// A stream of an app's page files from S3 into its VMM.
#[derive(Debug)]
struct Feeding {
    /// The stream; true if it completed the local copy.
    task: tokio::task::JoinHandle<bool>,
    /// The snapshot the app was restored from.
    snapshot: String,
}

/// The sockets of a swapped-out app, and the task that wakes it on traffic.
#[derive(Debug)]
struct Held {
    sockets: held::HeldSockets,
    watcher: tokio::task::JoinHandle<()>,
    /// Since when (the least recently used app's cache goes first).
    since: Instant,
}

/// A worker.
#[derive(Debug)]
pub struct Worker {
    config: WorkerConfig,
    cold: Cold,
    apps: Mutex<HashMap<String, Resident>>,
    /// Swapped-out apps whose sockets (and so addresses) this worker holds.
    held: Mutex<HashMap<String, Held>>,
    /// Addresses apps left, and when: not given out again before the quarantine ends.
    quarantine: std::sync::Mutex<Vec<(Ipv4Addr, Instant)>>,
    /// Addresses of apps being started or swapped out (in neither `apps` nor `held`
    /// meanwhile), which no other app may be given.
    reserved: std::sync::Mutex<std::collections::HashSet<Ipv4Addr>>,
    /// The hub, for waking apps (set when the worker runs).
    hub: std::sync::OnceLock<Arc<crate::client::Failover>>,
    /// What the next report carries besides the changes of the resident and held sets.
    pending: std::sync::Mutex<Pending>,
    /// What the hub was last told of the resident and held sets.
    told: std::sync::Mutex<Told>,
    /// Starts in progress, by app, so concurrent orders for one app wait for one start.
    starting: Mutex<HashMap<String, Arc<StartOnce>>>,
    /// Set when a child process of the worker ended (SIGCHLD): the next watch asks every
    /// app's VMM whether it was the one, rather than every watch asking each.
    child_ended: Arc<std::sync::atomic::AtomicBool>,
    /// Wakes the report loop before its next tick: a swap-out is news the hub needs at
    /// once (until it has it, traffic on the held sockets cannot bring the app back).
    report_soon: tokio::sync::Notify,
    /// Snapshots a compaction replaced, by the snapshot that replaced them: deleted from
    /// S3 only once the hub has the report naming their replacement (until then it may
    /// still restore one of them, or fall back to it if this worker dies).
    prunes: std::sync::Mutex<HashMap<String, (String, Vec<String>)>>,
    /// Uploads to S3 of swapped-out apps' snapshots (see [`upload`]).
    uploads: upload::Uploads,
    /// What `GET /metrics` serves.
    metrics: crate::metrics::WorkerMetrics,
    /// The last sequence number given to a swap-out or a stored snapshot (see
    /// [`SwappedOut::seq`]).
    snapshot_seq: std::sync::atomic::AtomicU64,
    /// Spare VMMs started ahead (once the worker runs).
    warm_pool: std::sync::OnceLock<pool::WarmPool>,
    /// The app addresses this worker added to its interface (`WorkerConfig::interface`).
    on_interface: std::sync::Mutex<std::collections::HashSet<Ipv4Addr>>,
    /// This process's hold on its work directory (see [`take_work_dir`]).
    _work_dir_lock: Option<picocenter_vmm::sandbox::lease::Lease<&'static str>>,
}

impl Worker {
    /// A worker with no apps yet.
    pub fn new(config: WorkerConfig, cold: Cold) -> Arc<Self> {
        let work_dir_lock = take_work_dir(&config.work_dir, &config.temp_dir());
        Arc::new(Self {
            _work_dir_lock: work_dir_lock,
            config,
            cold,
            apps: Mutex::new(HashMap::new()),
            held: Mutex::new(HashMap::new()),
            quarantine: std::sync::Mutex::new(Vec::new()),
            reserved: Default::default(),
            hub: std::sync::OnceLock::new(),
            pending: Default::default(),
            told: Default::default(),
            starting: Mutex::new(HashMap::new()),
            child_ended: Arc::new(std::sync::atomic::AtomicBool::new(true)),
            report_soon: tokio::sync::Notify::new(),
            prunes: Default::default(),
            uploads: Default::default(),
            metrics: Default::default(),
            snapshot_seq: Default::default(),
            warm_pool: std::sync::OnceLock::new(),
            on_interface: Default::default(),
        })
    }

    /// Starts the warm pool of spare VMMs (see [`pool`]), if the configuration asks for
    /// one. Within the tokio runtime.
    pub fn start_warm_pool(&self) {
        let command = pool::SpareCommand {
            picocenter: self.config.picocenter.clone(),
            state_dir: self.config.state_dir.clone(),
            log_dir: self.config.work_dir.join("logs"),
            temp_dir: self.config.temp_dir(),
        };
        self.warm_pool
            .get_or_init(|| pool::WarmPool::start(self.config.warm_pool, command));
    }

    /// Its configuration.
    pub fn config(&self) -> &WorkerConfig {
        &self.config
    }

    /// Runs an app as the hub ordered (restores it if the order names a snapshot) and
    /// answers once its listening sockets are bound. Concurrent orders for one app share
    /// one start.
    pub async fn start(self: &Arc<Self>, order: StartOrder) -> Result<Started, String> {
        let name = order.spec.name.clone();
        if let Some(app) = self.apps.lock().await.get(&name) {
            return Ok(Started {
                address: app.address,
                ms: 0.0,
            });
        }
        let cell = self
            .starting
            .lock()
            .await
            .entry(name.clone())
            .or_default()
            .clone();
        let this = self.clone();
        let result = cell
            .get_or_init(|| async move { this.start_now(order).await.map_err(|e| e.to_string()) })
            .await
            .clone();
        self.starting.lock().await.remove(&name);
        result
    }

    /// [`Worker::start`] as a future of a named type, for the tasks that swap-outs spawn
    /// (a start may swap apps out to make room: the compiler cannot see through the loop).
    fn start_boxed(
        self: &Arc<Self>,
        order: StartOrder,
    ) -> futures::future::BoxFuture<'static, Result<Started, String>> {
        let this = self.clone();
        Box::pin(async move { this.start(order).await })
    }

    async fn start_now(self: &Arc<Self>, mut order: StartOrder) -> Result<Started, WorkerError> {
        let began = Instant::now();
        let name = order.spec.name.clone();
        tracing::debug!(app = %name, snapshot = ?order.snapshot, "start order");
        picocenter_snapshots::names::validate_app_name(&name)?;
        // An app whose upload has not ended comes back from its newest snapshot, here
        // (the hub may know only an older one); the upload's end waits to be reported
        // until this start has ended.
        let comeback = self
            .uploads
            .comeback(&name)
            .and_then(|order| order.snapshot);
        let local = comeback
            .as_ref()
            .is_some_and(|id| self.uploads.begin_comeback(&name, id));
        if comeback.is_some() {
            order.snapshot = comeback;
            // The hub's list belongs to the snapshot it knows; the local copy needs none.
            order.chain_hint = Default::default();
        }
        self.make_room().await;
        // An app whose sockets are held here comes back at its address, on them.
        let held = match &order.snapshot {
            Some(_) => self.held.lock().await.remove(&name),
            None => None,
        };
        if let Some(held) = &held {
            held.watcher.abort();
        }
        if local && held.is_none() {
            // Its sockets are not here any more (it was removed meanwhile): it does not
            // come back at another address.
            let id = order.snapshot.clone().unwrap_or_default();
            self.report_comeback(false, self.uploads.end_comeback(&name, &id, false));
            return Err(WorkerError::NotHere(name));
        }
        let fresh_address = held.is_none();
        let address = match &held {
            Some(held) => {
                self.reserve(held.sockets.address);
                held.sockets.address
            }
            None => self.free_address().await?,
        };
        let snapshot = order.snapshot.clone();
        let started = self
            .launch_at(order, name.clone(), address, held, began)
            .await;
        self.metrics
            .started(snapshot.is_some(), began.elapsed(), started.is_ok());
        if let (true, Some(id)) = (local, &snapshot) {
            let back = started.is_ok();
            self.report_comeback(back, self.uploads.end_comeback(&name, id, back));
        }
        if started.is_err() && fresh_address {
            // Nobody has it: it was never any app's, so it needs no quarantine. (Before
            // the reservation ends: then another start may take it.)
            self.leave_interface(address);
        }
        self.unreserve(address);
        started
    }

    /// The rest of [`Worker::start_now`], with `address` reserved for app `name`.
    async fn launch_at(
        self: &Arc<Self>,
        order: StartOrder,
        name: String,
        address: Ipv4Addr,
        held: Option<Held>,
        began: Instant,
    ) -> Result<Started, WorkerError> {
        let spec = &order.spec;
        // Explicit memory: the registry's, else the image's (the VMM would use that too).
        let memory_mib = spec.memory_mib.or_else(|| {
            picocenter_images::load(&self.config.state_dir, &spec.image)
                .ok()
                .map(|image| image.meta.run.memory_mib)
        });
        // The worker's end of a page feed to the VMM, and the VMM's (until it has it).
        let mut feeding = None;
        let mut vmm_end = None;
        let launch = match &order.snapshot {
            Some(id) => {
                let cold = self.cold.clone();
                let (app, snapshot) = (name.clone(), id.clone());
                let hint = match self.config.use_chain_hint {
                    true => order.chain_hint.clone(),
                    false => Default::default(),
                };
                let stream = self.config.stream_swap_in;
                let first_port = held.as_ref().and_then(|h| h.sockets.first_port());
                let fetched = tokio::task::spawn_blocking(move || {
                    if stream {
                        cold.fetch_streaming(&app, &snapshot, &hint, first_port)
                    } else {
                        cold.fetch(&app, &snapshot, &hint).map(|dir| (dir, None))
                    }
                })
                .await
                .map_err(|e| WorkerError::Internal(e.to_string()))
                .and_then(|fetched| fetched.map_err(WorkerError::from))
                .and_then(|(dir, chain)| match chain {
                    Some(chain) => std::os::unix::net::UnixStream::pair()
                        .map(|pair| (dir, Some((chain, pair))))
                        .map_err(|e| WorkerError::Internal(format!("a page feed: {e}"))),
                    None => Ok((dir, None)),
                });
                let (dir, chain) = match fetched {
                    Ok(fetched) => fetched,
                    Err(e) => {
                        // The sockets stay held: what queues there waits for the next try.
                        if let Some(held) = held {
                            self.hold(&name, held.sockets).await;
                        }
                        return Err(e);
                    }
                };
                let feed = match chain {
                    Some((chain, (ours, theirs))) => {
                        let ids = chain.ids();
                        feeding = Some(Feeding {
                            task: feed(name.clone(), chain, ours),
                            snapshot: id.clone(),
                        });
                        let fd = std::os::fd::AsRawFd::as_raw_fd(&theirs);
                        vmm_end = Some(theirs);
                        Some((fd, ids))
                    }
                    None => None,
                };
                Launch::Restore {
                    dir,
                    id: id.clone(),
                    image: spec.image.clone(),
                    memory_mib,
                    sockets: held
                        .as_ref()
                        .map(|h| h.sockets.raw_fds())
                        .unwrap_or_default(),
                    first_port,
                    feed,
                }
            }
            None => Launch::Fresh {
                image: spec.image.clone(),
                memory_mib,
                env: spec.env.clone(),
                store: self.cold.local_dir(&name)?,
            },
        };
        let log_dir = self.config.work_dir.join("logs");
        let temp_dir = self.config.temp_dir();
        let paths = vmm::Paths {
            picocenter: &self.config.picocenter,
            state_dir: &self.config.state_dir,
            key_file: &self.config.key_file,
            log_dir: &log_dir,
            temp_dir: &temp_dir,
        };
        let launched = vmm::launch(
            &paths,
            &name,
            address,
            &launch,
            self.config.start_limit,
            self.warm_pool.get(),
        )
        .await;
        // The VMM has its copy (or is gone, and the stream then fails on the closed feed).
        drop(vmm_end);
        let vmm = match launched {
            Ok(vmm) => vmm,
            Err(e) => {
                // The sockets stay held: what queues there waits for the next attempt.
                if let Some(held) = held {
                    self.hold(&name, held.sockets).await;
                }
                return Err(e.into());
            }
        };
        // The VMM has its own copies of the held sockets now.
        drop(held);
        let ms = began.elapsed().as_secs_f64() * 1e3;
        if vmm.from_pool {
            self.metrics.warm_starts.inc();
        }
        tracing::info!(
            app = %name,
            %address,
            ms,
            restored = order.snapshot.is_some(),
            warm = vmm.from_pool,
            "started"
        );
        let idle_after = order
            .spec
            .idle_after_secs
            .and_then(|s| Duration::try_from_secs_f64(s).ok())
            .unwrap_or(self.config.idle_after);
        let view = match vmm::stats_view(&vmm) {
            Ok(view) => Some(view),
            Err(e) => {
                tracing::warn!(app = %name, "its stats page cannot be read ({e}): its control socket is asked instead");
                None
            }
        };
        self.apps.lock().await.insert(
            name,
            Resident {
                spec: order.spec,
                vmm,
                view,
                unreported: UsageDelta::default(),
                unreported_since: Instant::now(),
                address,
                last_active: Instant::now(),
                idle_after,
                cpu: Duration::ZERO,
                app_cpu: Duration::ZERO,
                connections: 0,
                rss: 0,
                looked: Instant::now(),
                feeding,
            },
        );
        Ok(Started { address, ms })
    }

    /// The first address of the pool that no app here has (resident, starting, or swapped
    /// out with its sockets held) and that no app left within the quarantine; reserved
    /// until [`Worker::unreserve`].
    async fn free_address(&self) -> Result<Ipv4Addr, WorkerError> {
        let apps = self.apps.lock().await;
        let held = self.held.lock().await;
        let mut quarantine = self.quarantine.lock().unwrap_or_else(|e| e.into_inner());
        quarantine.retain(|(_, left)| left.elapsed() < self.config.address_quarantine);
        let mut reserved = self.reserved.lock().unwrap_or_else(|e| e.into_inner());
        let taken: std::collections::HashSet<Ipv4Addr> = apps
            .values()
            .map(|app| app.address)
            .chain(held.values().map(|h| h.sockets.address))
            .chain(quarantine.iter().map(|(q, _)| *q))
            .collect();
        let (first, count) = self.config.addresses;
        let base = u32::from(first);
        let address = (0..count)
            .map(|i| Ipv4Addr::from(base.wrapping_add(i)))
            .find(|a| !taken.contains(a) && !reserved.contains(a))
            .ok_or(WorkerError::NoAddress(count))?;
        if let Some(index) = self.config.interface {
            if picocenter_vmm::sandbox::rtnetlink::add_address(index, address)? {
                self.on_interface
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(address);
            } else {
                tracing::warn!(%address, "the address was on the interface already: it stays there after its app");
            }
        }
        reserved.insert(address);
        Ok(address)
    }

    /// App `address` is no longer any app's here: nobody gets it for the quarantine, and
    /// it leaves the interface.
    fn release_address(&self, address: Ipv4Addr) {
        self.quarantine
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((address, Instant::now()));
        self.leave_interface(address);
    }

    /// Takes `address` off the worker's interface, if it put it there.
    fn leave_interface(&self, address: Ipv4Addr) {
        let (Some(index), true) = (
            self.config.interface,
            self.on_interface
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&address),
        ) else {
            return;
        };
        if let Err(e) = picocenter_vmm::sandbox::rtnetlink::remove_address(index, address) {
            tracing::warn!(%address, "{e}");
        }
    }

    /// Takes every app address it added off the worker's interface (it is stopping).
    fn leave_interface_all(&self) {
        let added: Vec<Ipv4Addr> = self
            .on_interface
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .copied()
            .collect();
        for address in added {
            self.leave_interface(address);
        }
    }

    /// Holds `sockets` of swapped-out app `name`, and wakes it (through the hub) when a
    /// connection or a datagram arrives on one.
    async fn hold(self: &Arc<Self>, name: &str, sockets: held::HeldSockets) {
        let probe = match sockets.probe() {
            Ok(probe) => probe,
            Err(e) => {
                tracing::warn!(app = %name, "cannot watch its sockets: {e}");
                self.release_address(sockets.address);
                return;
            }
        };
        let this = self.clone();
        let app = name.to_string();
        // Until the app is back (its start takes the sockets and ends this task): traffic
        // that is still waiting asks again, in case the hub had not yet heard that the
        // app is out (its report may be on the way) and so ordered nothing.
        let watcher = tokio::spawn(async move {
            // Soon at first (the report is usually a few ms behind), then every 0.5 s.
            let mut pause = Duration::from_millis(25);
            loop {
                if let Err(e) = probe.wait_for_traffic().await {
                    tracing::warn!(app = %app, "watching its sockets: {e}");
                    return;
                }
                this.wake(&app).await;
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(500));
            }
        });
        tracing::debug!(app = %name, address = %sockets.address, sockets = sockets.fds.len(), "holding its sockets");
        if let Some(old) = self.held.lock().await.insert(
            name.to_string(),
            Held {
                sockets,
                watcher,
                since: Instant::now(),
            },
        ) {
            old.watcher.abort();
        }
    }

    /// Asks the hub to bring app `name` back (traffic arrived on its held sockets); or,
    /// if its upload has not ended (the hub takes it for resident here), brings it back
    /// from the local copy.
    async fn wake(self: &Arc<Self>, name: &str) {
        if let Some(order) = self.uploads.comeback(name) {
            tracing::info!(app = %name, "traffic on its held sockets during its upload: bringing it back from the local copy");
            // On a task of its own: the start ends the watcher that calls this.
            let start = self.start_boxed(order);
            let app = name.to_string();
            tokio::spawn(async move {
                if let Err(e) = start.await {
                    tracing::warn!(app = %app, "bringing it back from the local copy: {e}");
                }
            });
            return;
        }
        let Some(hub) = self.hub.get() else {
            return;
        };
        tracing::info!(app = %name, "traffic on its held sockets: waking it");
        let path = format!("/v1/apps/{name}/start");
        let woken = hub
            .post_within::<_, serde_json::Value>(
                &path,
                &serde_json::json!({}),
                self.config.start_limit,
            )
            .await;
        if let Err(e) = woken {
            tracing::warn!(app = %name, "waking it: {e}");
        }
    }

    /// Stops holding app `name`'s sockets (it was removed, or runs elsewhere): its address
    /// then refuses connections, and is quarantined.
    async fn unhold(&self, name: &str) {
        if let Some(held) = self.held.lock().await.remove(name) {
            held.watcher.abort();
            self.release_address(held.sockets.address);
        }
    }

    /// Swaps out least-recently-active apps until the resident memory leaves room for one
    /// more small app.
    async fn make_room(self: &Arc<Self>) {
        const HEADROOM: u64 = 8 << 20;
        loop {
            let victim = {
                let mut apps = self.apps.lock().await;
                // Fresh figures: the last look may be seconds old, and a young app's memory
                // grows fast (this costs two system calls for an app that idles).
                for app in apps.values_mut() {
                    if let Some(page) = app.view.as_mut().and_then(|view| view.read()) {
                        app.rss = page.rss_bytes;
                    }
                }
                let used: u64 = apps.values().map(|a| a.rss).sum();
                if used + HEADROOM <= self.config.memory_limit || apps.is_empty() {
                    return;
                }
                apps.iter()
                    .min_by_key(|(_, a)| a.last_active)
                    .map(|(name, _)| name.clone())
            };
            let Some(victim) = victim else { return };
            tracing::info!(app = %victim, "swapping out to make room");
            // Its memory is free once its snapshot is settled: the upload runs on.
            if let Err(e) = self.swap_out_if(&victim, false).await {
                tracing::warn!(app = %victim, "could not swap out to make room: {e}");
                return;
            }
        }
    }

    /// Snapshots app `name` into cold storage and ends its VMM, freeing its memory; answers
    /// once the snapshot is in cold storage (traffic may have brought the app back from
    /// the local copy meanwhile).
    pub async fn swap_out(self: &Arc<Self>, name: &str) -> Result<SwappedOut, WorkerError> {
        match self.swap_out_if(name, false).await? {
            SwapOut::Stored(swapped) => Ok(swapped),
            SwapOut::Uploading(upload) => upload
                .await
                .map_err(|e| WorkerError::Internal(e.to_string()))?,
        }
    }

    /// [`Worker::swap_out`], answering once the app's memory is free; with `if_idle`,
    /// only if the app is idle at the clean point (else [`WorkerError::Busy`], and it
    /// stays resident). Its sockets are taken over first, so its address never stops
    /// accepting.
    async fn swap_out_if(
        self: &Arc<Self>,
        name: &str,
        if_idle: bool,
    ) -> Result<SwapOut, WorkerError> {
        // An app still starting may already serve (its first client was answered with its
        // held address): its start ends before it can be swapped out.
        let starting = self.starting.lock().await.get(name).cloned();
        if let Some(start) = starting {
            let _ = start
                .get_or_init(|| async { Err("not started here".to_string()) })
                .await;
        }
        let Some(app) = self.apps.lock().await.remove(name) else {
            return Err(WorkerError::NotHere(name.to_string()));
        };
        // Its address is nobody else's while the swap-out runs, whatever becomes of it.
        let address = app.address;
        self.reserve(address);
        let began = Instant::now();
        let result = self.swap_out_resident(name, app, if_idle).await;
        self.unreserve(address);
        match &result {
            Ok(_) => {
                self.metrics.swap_outs.inc();
                self.metrics
                    .swap_out_seconds
                    .observe(began.elapsed().as_secs_f64());
            }
            Err(WorkerError::Busy(_)) => {}
            Err(_) => {
                self.metrics.swap_out_failures.inc();
            }
        }
        result
    }

    fn reserve(&self, address: Ipv4Addr) {
        self.reserved
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(address);
    }

    /// Ends a reservation (the app is in `apps` or `held` now, or has left).
    fn unreserve(&self, address: Ipv4Addr) {
        self.reserved
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&address);
    }

    /// [`Worker::swap_out_if`] for `app`, taken out of the resident apps.
    async fn swap_out_resident(
        self: &Arc<Self>,
        name: &str,
        mut app: Resident,
        if_idle: bool,
    ) -> Result<SwapOut, WorkerError> {
        // The snapshot builds on the page files the app was restored from, so they must be
        // whole in the local store first: the stream ends before the VMM stops (which
        // closes its feed), never the other way round.
        if let Some(mut feeding) = app.feeding.take() {
            match tokio::time::timeout(STREAM_WAIT, &mut feeding.task).await {
                Err(_) => {
                    // A VMM slow to read its feed holds this up: not this swap-out.
                    app.feeding = Some(feeding);
                    self.apps.lock().await.insert(name.to_string(), app);
                    return Err(WorkerError::Busy(
                        "its page files are still streaming in".into(),
                    ));
                }
                Ok(Ok(true)) => {}
                Ok(_) => {
                    // The stream failed after the VMM had what it needed (or the VMM lives
                    // on without it): the local copy is completed the plain way first.
                    let cold = self.cold.clone();
                    let (app_name, snapshot) = (name.to_string(), feeding.snapshot.clone());
                    let fetched = tokio::task::spawn_blocking(move || {
                        cold.fetch(&app_name, &snapshot, &Default::default())
                    })
                    .await
                    .map_err(|e| WorkerError::Internal(e.to_string()))
                    .and_then(|fetched| fetched.map_err(WorkerError::from));
                    if let Err(e) = fetched {
                        self.apps.lock().await.insert(name.to_string(), app);
                        return Err(e);
                    }
                }
            }
        }
        if let Ok(stats) = vmm::counters(&app.vmm.control, app.view.as_mut()).await {
            self.account(name, &mut app, &stats);
        }
        // Whatever becomes of it, what it used so far is reported.
        self.flush_usage(name, &mut app);
        let dir = match self.cold.local_dir(name) {
            Ok(dir) => dir,
            Err(e) => {
                self.apps.lock().await.insert(name.to_string(), app);
                return Err(e.into());
            }
        };
        let (control, address) = (app.vmm.control.clone(), app.address);
        let sockets = tokio::task::spawn_blocking(move || held::take(&control, address))
            .await
            .map_err(|e| WorkerError::Internal(e.to_string()))?;
        let sockets = match sockets {
            Ok(sockets) => Some(sockets),
            Err(e) => {
                tracing::warn!(app = %name, "its sockets cannot be held ({e}): its address will refuse while it is out");
                None
            }
        };
        let answer = vmm::request(
            &app.vmm.control,
            &serde_json::json!({"op": "snapshot", "dir": dir, "stop": true, "if_idle": if_idle}),
            Duration::from_secs(300),
        )
        .await;
        let answer = match answer {
            Ok(answer) => answer,
            Err(e) => {
                // Still running: it stays resident (and keeps its own sockets).
                let busy = matches!(&e, vmm::VmmError::Control { message, .. } if message.starts_with("busy"));
                if busy {
                    app.last_active = Instant::now();
                }
                self.apps.lock().await.insert(name.to_string(), app);
                return Err(if busy {
                    WorkerError::Busy(e.to_string())
                } else {
                    e.into()
                });
            }
        };
        let id = answer["id"].as_str().unwrap_or_default().to_string();
        let _ = tokio::time::timeout(Duration::from_secs(10), app.vmm.child.wait()).await;

        // Settled in the local store (compacted if its chain is long, unless an upload
        // still reads the chain: then only once that upload has ended).
        let in_flight = self.uploads.in_flight(name);
        let turn = in_flight.then(|| self.uploads.turn(name));
        let cold = self.cold.clone();
        let (app_name, snapshot) = (name.to_string(), id.clone());
        let settled = async move {
            let long = in_flight && cold.chain_len(&app_name, &snapshot)? >= MAX_CHAIN;
            let waited = match (long, &turn) {
                (true, Some(turn)) => Some(turn.lock().await),
                _ => None,
            };
            let may_compact = !in_flight || waited.is_some();
            tokio::task::spawn_blocking(move || cold.settle(&app_name, &snapshot, may_compact))
                .await
                .map_err(|e| WorkerError::Internal(e.to_string()))?
                .map_err(WorkerError::from)
        };
        let stored = match settled.await {
            Ok(stored) => stored,
            Err(e) => {
                // Its VMM has ended, so it is not resident any more: the hub falls back
                // to its last snapshot in cold storage.
                self.release_address(address);
                self.pending_report()
                    .ended
                    .push((name.to_string(), format!("swap-out failed: {e}")));
                return Err(e);
            }
        };
        let Some(sockets) = sockets else {
            // Nothing holds its address, so nothing brings it back here during the upload:
            // the hub hears of the swap-out once the snapshot is in cold storage.
            self.release_address(address);
            let upload = self.upload_in_background(name, app.spec, stored, false);
            return Ok(SwapOut::Uploading(upload));
        };
        if self.cold.uploads() {
            tracing::info!(app = %name, snapshot = %stored.id, "swapped out here; uploading to cold storage while its sockets are held");
            // Whatever comes meanwhile brings it back from the local copy.
            let upload = self.upload_in_background(name, app.spec, stored, true);
            self.hold(name, sockets).await;
            return Ok(SwapOut::Uploading(upload));
        }
        self.hold(name, sockets).await;
        let swapped = SwappedOut {
            name: name.to_string(),
            snapshot: stored.id,
            chain_hint: stored.chain_hint,
            stored_bytes: stored.bytes,
            logical_bytes: stored.bytes,
            wake_at_unix_ms: stored.wake_at_unix_ms,
            seq: self.next_seq(),
        };
        tracing::info!(app = %name, snapshot = %swapped.snapshot, stored_bytes = swapped.stored_bytes, wake_at_unix_ms = ?swapped.wake_at_unix_ms, "swapped out");
        self.pending_report().swapped.push(swapped.clone());
        self.report_soon.notify_one();
        Ok(SwapOut::Stored(swapped))
    }

    /// Keeps the local copies of S3 snapshots under the cache limit: the copies of apps
    /// swapped out here go, the longest out first. The held sockets' lock is kept
    /// throughout, since a restore takes an app's sockets from there before it fetches:
    /// no restore reads a copy while it goes.
    async fn trim_cache(&self) {
        let held = self.held.lock().await;
        // Not the copy of an app being uploaded: it is the app's only newest state.
        let mut out: Vec<(Instant, String)> = held
            .iter()
            .filter(|(name, _)| !self.uploads.is_out(name) && !self.uploads.in_flight(name))
            .map(|(name, h)| (h.since, name.clone()))
            .collect();
        out.sort();
        let (cold, limit) = (self.cold.clone(), self.config.cache_limit);
        let evicted = tokio::task::spawn_blocking(move || {
            cold.trim_cache(limit, out.into_iter().map(|(_, name)| name))
        })
        .await;
        drop(held);
        match evicted {
            Ok(Ok(evicted)) if !evicted.is_empty() => {
                tracing::info!(?evicted, limit, "local copies of snapshots evicted")
            }
            Ok(Err(e)) => tracing::warn!("trimming the snapshot cache: {e}"),
            _ => {}
        }
    }

    /// Deletes app `name`'s snapshots from cold storage (it was removed). Returns how many
    /// there were.
    pub async fn forget(&self, name: &str) -> Result<usize, WorkerError> {
        self.unhold(name).await;
        // An upload under way would put back what this deletes: it ends first, and
        // nothing brings the app back from its local copy meanwhile.
        self.uploads.forget(name);
        let turn = self.uploads.turn(name);
        let removed = {
            let _turn = turn.lock().await;
            let cold = self.cold.clone();
            let app = name.to_string();
            tokio::task::spawn_blocking(move || cold.forget(&app)).await
        };
        drop(turn);
        self.uploads.drop_turn(name);
        let removed = removed.map_err(|e| WorkerError::Internal(e.to_string()))??;
        tracing::info!(app = %name, removed, "snapshots deleted");
        Ok(removed)
    }

    /// Ends app `name` without a snapshot (it was removed).
    pub async fn discard(&self, name: &str) -> Result<(), WorkerError> {
        let Some(app) = self.apps.lock().await.remove(name) else {
            return Err(WorkerError::NotHere(name.to_string()));
        };
        // SIGTERM first (the VMM passes it to the app, and cleans up after itself), then
        // SIGKILL if it has not ended within two seconds.
        let _ = app.vmm.child.signal(rustix::process::Signal::TERM);
        if tokio::time::timeout(Duration::from_secs(2), app.vmm.child.wait())
            .await
            .is_err()
        {
            let _ = app.vmm.child.kill().await;
        }
        self.release_address(app.address);
        Ok(())
    }

    /// The next [`SwappedOut::seq`].
    fn next_seq(&self) -> u64 {
        self.snapshot_seq
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            .saturating_add(1)
    }

    fn pending_report(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn told(&self) -> std::sync::MutexGuard<'_, Told> {
        self.told.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds what `app` used since the last look (its VMM's `stats`) to its unreported
    /// usage, which goes into the next report if it used CPU or took requests, or has
    /// accrued memory use for [`MEMORY_REPORT_PERIOD`]; CPU used by the app's threads,
    /// or a new connection, makes it active.
    fn account(&self, name: &str, app: &mut Resident, stats: &vmm::Stats) {
        let now = Instant::now();
        let (cpu, app_cpu) = (
            Duration::from_nanos(stats.cpu_ns),
            Duration::from_nanos(stats.app_cpu_ns),
        );
        let delta = UsageDelta {
            cpu_seconds: cpu.saturating_sub(app.cpu).as_secs_f64(),
            memory_gib_seconds: stats.rss_bytes as f64 / (1u64 << 30) as f64
                * now.duration_since(app.looked).as_secs_f64(),
            requests: stats.connections.saturating_sub(app.connections),
        };
        if app_cpu > app.app_cpu || stats.connections > app.connections {
            app.last_active = now;
        }
        app.cpu = cpu;
        app.app_cpu = app_cpu;
        app.connections = stats.connections;
        app.rss = stats.rss_bytes;
        app.looked = now;
        add_usage(&mut app.unreported, &delta);
        if delta.cpu_seconds > 0.0
            || delta.requests > 0
            || app.unreported_since.elapsed() >= MEMORY_REPORT_PERIOD
        {
            self.flush_usage(name, app);
        }
    }

    /// Moves `app`'s unreported usage into the next report.
    fn flush_usage(&self, name: &str, app: &mut Resident) {
        let usage = std::mem::take(&mut app.unreported);
        app.unreported_since = Instant::now();
        if usage != UsageDelta::default() {
            let mut pending = self.pending_report();
            add_usage(pending.usage.entry(name.to_string()).or_default(), &usage);
        }
    }

    /// One round of watching: usage and activity, ended apps, idle ones swapped out. An
    /// idle app costs two system calls here (see `picocenter_vmm::stats_page::StatsView`)
    /// and is never woken.
    pub async fn watch(self: &Arc<Self>) {
        let mut idle = Vec::new();
        let mut ended = Vec::new();
        // Apps with no readable stats page are asked through their control socket,
        // outside the lock.
        let unviewed: Vec<(String, PathBuf)> = {
            let apps = self.apps.lock().await;
            apps.iter()
                .filter(|(_, a)| a.view.is_none())
                .map(|(n, a)| (n.clone(), a.vmm.control.clone()))
                .collect()
        };
        let mut asked = HashMap::new();
        for (name, control) in unviewed {
            if let Ok(answer) = vmm::stats(&control).await {
                asked.insert(name, answer);
            }
        }
        {
            let mut apps = self.apps.lock().await;
            let mut gone = Vec::new();
            let child_ended = self
                .child_ended
                .swap(false, std::sync::atomic::Ordering::SeqCst);
            for (name, app) in apps.iter_mut() {
                let due = app.looked.elapsed() >= look_period(app.idle_after) || app.view.is_none();
                if !due && !child_ended {
                    continue;
                }
                if let Ok(Some(status)) = app.vmm.child.try_wait() {
                    let why = format!("{status}: {}", vmm::tail(&app.vmm.log, 500));
                    tracing::warn!(app = %name, "ended: {why}");
                    self.flush_usage(name, app);
                    ended.push((name.clone(), why));
                    self.release_address(app.address);
                    gone.push(name.clone());
                    continue;
                }
                if !due {
                    continue;
                }
                let stats = match app.view.as_mut() {
                    Some(view) => match view.read() {
                        Some(page) => Some(vmm::Stats::from(page)),
                        None => {
                            tracing::warn!(app = %name, "its stats page cannot be read: its control socket is asked from now on");
                            app.view = None;
                            None
                        }
                    },
                    None => asked.remove(name),
                };
                if let Some(stats) = stats {
                    self.account(name, app, &stats);
                }
                // An app whose page files still stream in is not idle: its swap-out would
                // wait for the stream, holding up this loop.
                if app.feeding.as_ref().is_some_and(|f| !f.task.is_finished()) {
                    app.last_active = Instant::now();
                }
                if app.last_active.elapsed() >= app.idle_after {
                    idle.push(name.clone());
                }
            }
            for name in gone {
                apps.remove(&name);
            }
        }
        self.pending_report().ended.extend(ended);
        for name in idle {
            tracing::info!(app = %name, "idle: swapping out");
            match self.swap_out_if(&name, true).await {
                Ok(_) => {}
                Err(WorkerError::Busy(why)) => {
                    tracing::info!(app = %name, "not swapped out: {why}");
                }
                Err(e) => tracing::warn!(app = %name, "swap-out failed: {e}"),
            }
        }
    }

    /// The report to send now: what is pending, and what changed in the resident and
    /// held sets since the last report (everything, the first time after registering).
    /// Put it back with [`Worker::unsend`] if sending fails.
    pub async fn report(&self) -> WorkerReport {
        let apps = self.apps.lock().await;
        let held = self.held.lock().await;
        let pending = std::mem::take(&mut *self.pending_report());
        let mut told = self.told();
        let full = !told.valid;
        let report = WorkerReport {
            full,
            resident: apps
                .iter()
                .filter(|(n, a)| full || told.resident.get(*n) != Some(&a.address))
                .map(|(n, a)| (n.clone(), a.address))
                .collect(),
            resident_count: apps.len(),
            usage: pending.usage.into_iter().collect(),
            swapped: pending.swapped,
            stored: pending.stored,
            ended: pending.ended,
            memory_bytes: apps.values().map(|a| a.rss).sum(),
            held: held
                .iter()
                .filter(|(n, _)| full || !told.held.contains(*n))
                .map(|(n, h)| (n.clone(), h.sockets.address))
                .collect(),
            unheld: told
                .held
                .iter()
                .filter(|n| !full && !held.contains_key(*n))
                .cloned()
                .collect(),
            leaving: false,
        };
        // Brought up to date without copying what the hub already knows.
        told.resident.retain(|n, _| apps.contains_key(n));
        for (name, address) in &report.resident {
            told.resident.insert(name.clone(), *address);
        }
        told.held.retain(|n| held.contains_key(n));
        told.held.extend(report.held.iter().map(|(n, _)| n.clone()));
        told.valid = true;
        report
    }

    /// After the hub accepted `report`: deletes from S3 the snapshots that the ones it
    /// reports swapped out or stored replaced (see [`Worker::prunes`]). Returns the
    /// deletions.
    pub fn prune_reported(&self, report: &WorkerReport) -> Vec<tokio::task::JoinHandle<()>> {
        let mut prunes = self.prunes.lock().unwrap_or_else(|e| e.into_inner());
        report
            .swapped
            .iter()
            .chain(&report.stored)
            .filter_map(|swapped| prunes.remove(&swapped.snapshot))
            .map(|(app, replaced)| {
                let cold = self.cold.clone();
                tokio::task::spawn_blocking(move || {
                    if let Err(e) = cold.prune(&app, &replaced) {
                        tracing::warn!(app, "removing the snapshots a compaction replaced: {e}");
                    }
                })
            })
            .collect()
    }

    /// Puts back what a report that could not be sent carried; the next report then
    /// carries the whole resident and held sets.
    pub fn unsend(&self, report: WorkerReport) {
        let mut pending = self.pending_report();
        for (name, delta) in report.usage {
            add_usage(pending.usage.entry(name).or_default(), &delta);
        }
        pending.swapped.extend(report.swapped);
        pending.stored.extend(report.stored);
        pending.ended.extend(report.ended);
        self.told().valid = false;
    }

    /// The metrics as `GET /metrics` serves them, its gauges brought up to date.
    pub async fn render_metrics(&self) -> String {
        {
            let apps = self.apps.lock().await;
            self.metrics.resident_apps.set(apps.len() as i64);
            let memory: u64 = apps.values().map(|a| a.rss).sum();
            self.metrics
                .resident_memory_bytes
                .set(i64::try_from(memory).unwrap_or(i64::MAX));
        }
        self.metrics
            .held_apps
            .set(self.held.lock().await.len() as i64);
        let spares = self.warm_pool.get().map_or(0, pool::WarmPool::waiting);
        self.metrics.spare_vmms.set(spares as i64);
        let (up, down) = self.cold.traffic();
        self.metrics.cold_storage_traffic(up, down);
        self.metrics.render()
    }

    /// Names and addresses of the resident apps.
    pub async fn resident(&self) -> Vec<(String, Ipv4Addr)> {
        self.apps
            .lock()
            .await
            .iter()
            .map(|(n, a)| (n.clone(), a.address))
            .collect()
    }

    /// Swaps every resident app out (a graceful shutdown).
    pub async fn swap_out_all(self: &Arc<Self>) {
        // Traffic during an upload may bring an app back: a few rounds.
        for _ in 0..3 {
            let names: Vec<String> = self.apps.lock().await.keys().cloned().collect();
            for name in names {
                if let Err(e) = self.swap_out(&name).await {
                    tracing::warn!(app = %name, "swap-out at shutdown failed: {e}");
                }
            }
            self.uploads.drained().await;
            if self.apps.lock().await.is_empty() {
                break;
            }
        }
    }
}

/// What the next report carries besides the changes of the resident and held sets.
#[derive(Debug, Default)]
struct Pending {
    usage: HashMap<String, UsageDelta>,
    swapped: Vec<SwappedOut>,
    stored: Vec<SwappedOut>,
    ended: Vec<(String, String)>,
}

/// What the hub was last told of the resident and held sets (`valid` is false before the
/// first report after registering, and after a report was lost).
#[derive(Debug, Default)]
struct Told {
    valid: bool,
    resident: HashMap<String, Ipv4Addr>,
    held: std::collections::HashSet<String>,
}

impl Worker {
    /// With S3: every [`GARBAGE_PERIOD`](crate::cold::GARBAGE_PERIOD), removes the image
    /// bases nothing names any more ([`Cold::collect_garbage`](crate::cold::Cold::collect_garbage)).
    fn start_garbage_collection(&self) -> Option<tokio::task::JoinHandle<()>> {
        if !self.cold.uploads() {
            return None;
        }
        let cold = self.cold.clone();
        Some(tokio::spawn(async move {
            loop {
                tokio::time::sleep(crate::cold::GARBAGE_PERIOD).await;
                let cold = cold.clone();
                let collected = tokio::task::spawn_blocking(move || {
                    cold.collect_garbage(crate::cold::BASE_GRACE)
                })
                .await;
                match collected {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => tracing::warn!("collecting garbage in cold storage: {e}"),
                    Err(e) => tracing::warn!("collecting garbage in cold storage: {e}"),
                }
            }
        }))
    }
}

fn add_usage(total: &mut UsageDelta, delta: &UsageDelta) {
    total.cpu_seconds += delta.cpu_seconds;
    total.memory_gib_seconds += delta.memory_gib_seconds;
    total.requests += delta.requests;
}

/// A number that differs from one start of a worker process to the next: the clock's
/// nanoseconds and the process id.
fn instance_number() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    (nanos ^ (u64::from(std::process::id()) << 40)).max(1)
}

/// Serves the order API on `listener`, registers with the hub, and then watches and
/// reports every `period` until `shutdown` resolves; then swaps every app out.
pub async fn run(
    worker: Arc<Worker>,
    hub: Arc<crate::client::Failover>,
    listener: tokio::net::TcpListener,
    token: Arc<str>,
    period: Duration,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let url = format!("http://{}", listener.local_addr()?);
    let _ = worker.hub.set(hub.clone());
    worker.start_warm_pool();
    let garbage = worker.start_garbage_collection();
    let mut child_signals = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())?;
    let child_ended = worker.child_ended.clone();
    let child_watch = tokio::spawn(async move {
        while child_signals.recv().await.is_some() {
            child_ended.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    });
    let server = axum::serve(listener, api::router(worker.clone(), token));
    let server = tokio::spawn(async move { server.await });
    let hello = crate::model::WorkerHello {
        id: worker.config.id.clone(),
        url: url.clone(),
        memory_limit_bytes: worker.config.memory_limit,
        instance: instance_number(),
    };
    tracing::info!(id = %hello.id, %url, hubs = %hub.bases().join(","), "worker up");
    let mut registered = false;
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    // Once asked to stop: every app is swapped out (uploads included) while the reports go
    // on, so the hub hears of each swap-out and never takes the worker for dead meanwhile.
    let mut stopping: Option<tokio::task::JoinHandle<()>> = None;
    loop {
        tokio::select! {
            _ = &mut shutdown, if stopping.is_none() => {
                tracing::info!("worker stopping: swapping every app out");
                let this = worker.clone();
                stopping = Some(tokio::spawn(async move { this.swap_out_all().await }));
            }
            _ = ticker.tick() => {}
            _ = worker.report_soon.notified() => {}
        }
        if stopping.as_ref().is_some_and(|task| task.is_finished()) {
            break;
        }
        if !registered {
            match hub
                .post::<_, serde_json::Value>("/v1/workers", &hello)
                .await
            {
                Ok(_) => {
                    tracing::info!("registered with the hub");
                    registered = true;
                    // The hub knows nothing of us yet: the next report carries everything.
                    worker.told().valid = false;
                }
                Err(e) => {
                    tracing::warn!("cannot register with the hub: {e}");
                    continue;
                }
            }
        }
        if stopping.is_none() {
            worker.watch().await;
        }
        let report = worker.report().await;
        let path = format!("/v1/workers/{}/report", worker.config.id);
        match hub.post::<_, serde_json::Value>(&path, &report).await {
            Ok(_) => drop(worker.prune_reported(&report)),
            Err(crate::client::ClientError::Status { status: 404, .. }) => {
                // The hub forgot us (it restarted, or took us for dead): introduce
                // ourselves again, then report what we have.
                worker.unsend(report);
                registered = false;
            }
            Err(e) => {
                tracing::warn!("cannot report to the hub: {e}");
                worker.unsend(report);
            }
        }
    }
    let mut report = worker.report().await;
    report.leaving = true;
    let path = format!("/v1/workers/{}/report", worker.config.id);
    if hub
        .post::<_, serde_json::Value>(&path, &report)
        .await
        .is_ok()
    {
        for prune in worker.prune_reported(&report) {
            let _ = prune.await;
        }
    }
    worker.leave_interface_all();
    server.abort();
    child_watch.abort();
    if let Some(garbage) = garbage {
        garbage.abort();
    }
    Ok(())
}
