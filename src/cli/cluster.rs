//! `picocenter hub`, `picocenter worker`, `picocenter app` and `picocenter demo`: the
//! control plane's servers and their operator CLI, wired from `picocenter-hub`.

use super::image::StateDir;
use super::key::KeyFile;
use anyhow::{bail, Context};
use picocenter_hub::client::Client;
use picocenter_hub::cold::ColdConfig;
use picocenter_hub::hub::HubConfig;
use picocenter_hub::model::{AppRecord, AppSpec};
use picocenter_hub::registry::RegistryConfig;
use picocenter_hub::serve::{self, HubOptions, WorkerOptions};
use picocenter_hub::worker::WorkerConfig;
use picocenter_snapshots::s3::S3Config;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Arguments of `picocenter hub`.
#[derive(Debug, clap::Args)]
pub struct HubArgs {
    #[command(flatten)]
    state: StateDir,
    #[command(flatten)]
    hub: HubFlags,
    /// Serve the API over HTTPS with this certificate chain (PEM, leaf first); workers
    /// and `picocenter app` then need `--hub https://...` and, unless it chains to the
    /// system's roots, `--hub-ca`.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

/// Trust for a hub whose API is served over HTTPS.
#[derive(Debug, Clone, clap::Args)]
struct HubCa {
    /// Certificates (PEM) to trust for the hub's HTTPS API besides the system's roots:
    /// the private CA that signed its certificate.
    #[arg(long, value_name = "FILE", env = "PICOCENTER_HUB_CA", global = true)]
    hub_ca: Option<PathBuf>,
}

impl HubCa {
    /// The certificates to trust for the hub at `hub`; refuses them for a plain `http://`
    /// hub, where they would protect nothing while the token goes in clear.
    fn read(&self, hub: &str) -> anyhow::Result<Option<Vec<u8>>> {
        let Some(path) = &self.hub_ca else {
            return Ok(None);
        };
        if !hub.starts_with("https://") {
            bail!(
                "--hub-ca {} is for an https:// hub, and --hub is {hub}",
                path.display()
            );
        }
        let pem = std::fs::read(path).with_context(|| format!("--hub-ca {}", path.display()))?;
        Ok(Some(pem))
    }
}

/// The hub's settings (shared with `demo`).
#[derive(Debug, Clone, clap::Args)]
struct HubFlags {
    /// Where to answer DNS (UDP and TCP).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:5353")]
    dns: SocketAddr,
    /// Where to serve the HTTP API.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8600")]
    api: SocketAddr,
    /// The zone the hub is authoritative for; apps are NAME.<zone>.
    #[arg(long, default_value = "pico.local.")]
    zone: String,
    /// TTL of app answers, seconds: short, since an app's address changes when it moves.
    #[arg(long, value_name = "SECONDS", default_value_t = 5)]
    ttl: u32,
    /// How long a start or restore may take before its query gets SERVFAIL.
    #[arg(long, value_name = "SECONDS", default_value_t = 30.0)]
    start_timeout: f64,
    /// A worker that has not reported for this long is dead; its apps go back to their
    /// last snapshot.
    #[arg(long, value_name = "SECONDS", default_value_t = 3.0)]
    worker_timeout: f64,
    /// The API token; by default the one in <state-dir>/hub/token (made if missing).
    #[arg(long, env = "PICOCENTER_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// This hub's id, unique among the hubs sharing an etcd registry (its name server
    /// is `ns-<id>.<zone>`); by default the host name and the process id.
    #[arg(long, value_name = "ID")]
    hub_id: Option<String>,
    /// Where the hub keeps its files (default: <state-dir>/hub).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Where the app registry lives: `redb` (a database file in --data-dir) or
    /// `etcd://HOST:PORT[,HOST:PORT...][/PREFIX]` (an etcd cluster; keys under PREFIX,
    /// default `picocenter`). Any number of hubs may share an etcd registry: each answers
    /// DNS for every app, the zone's NS records name them all, and workers given all
    /// their URLs (`worker --hub`) report to whichever answers.
    #[arg(
        long,
        value_name = "STORE",
        default_value = "redb",
        env = "PICOCENTER_REGISTRY"
    )]
    registry: String,
}

/// Arguments of `picocenter worker`.
#[derive(Debug, clap::Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    state: StateDir,
    /// The hub's API; with several hubs on one etcd registry, all of theirs,
    /// comma-separated: the worker reports to the first that answers, and moves on to the
    /// next when it cannot reach it.
    #[arg(
        long,
        value_name = "URL[,URL...]",
        default_value = "http://127.0.0.1:8600",
        value_delimiter = ','
    )]
    hub: Vec<String>,
    #[command(flatten)]
    hub_ca: HubCa,
    #[command(flatten)]
    worker: WorkerFlags,
    /// The API token; by default the one in <state-dir>/hub/token.
    #[arg(long, env = "PICOCENTER_TOKEN", hide_env_values = true)]
    token: Option<String>,
    #[command(flatten)]
    key: KeyFile,
}

/// A worker's settings (shared with `demo`).
#[derive(Debug, Clone, clap::Args)]
struct WorkerFlags {
    /// The addresses this worker gives its apps, as A.B.C.D/N (loopback: 127.x.y.z).
    #[arg(long, value_name = "CIDR", default_value = "127.1.0.0/24")]
    addresses: String,
    /// Add each app's address to this network interface while an app has it (and take
    /// it off after), so that clients on other hosts reach apps directly: give
    /// --addresses a range that the network routes to this host (or that shares the
    /// interface's link). Without it the addresses must already be this host's (as
    /// 127.0.0.0/8 is).
    #[arg(long, value_name = "NAME")]
    interface: Option<String>,
    /// This worker's id; by default the host name and the process id.
    #[arg(long)]
    id: Option<String>,
    /// Where the worker's order API listens (port 0: any free port).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Swap an app out after this many seconds without CPU or connections.
    #[arg(long, value_name = "SECONDS", default_value_t = 60.0)]
    idle_after: f64,
    /// Resident memory all apps together may use; least-recently-active apps are swapped
    /// out to stay under it.
    #[arg(long, value_name = "MIB", default_value_t = 16384)]
    memory_limit_mib: u64,
    /// Cold storage in a local directory (the default: <state-dir>/cold).
    #[arg(long, value_name = "DIR", conflicts_with = "s3_bucket")]
    store: Option<PathBuf>,
    /// Cold storage in this S3 bucket instead.
    #[arg(long, value_name = "BUCKET")]
    s3_bucket: Option<String>,
    /// The S3 endpoint (for S3-compatible servers); AWS when unset.
    #[arg(long, value_name = "URL", requires = "s3_bucket")]
    s3_endpoint: Option<String>,
    /// A key prefix in the bucket.
    #[arg(
        long,
        value_name = "PREFIX",
        default_value = "",
        requires = "s3_bucket"
    )]
    s3_prefix: String,
    /// Path-style S3 addressing (most S3-compatible servers need it).
    #[arg(long, requires = "s3_bucket")]
    s3_path_style: bool,
    /// The S3 region.
    #[arg(long, default_value = "us-east-1", requires = "s3_bucket")]
    s3_region: String,
    /// The S3 access key; AWS_ACCESS_KEY_ID when unset.
    #[arg(long, requires = "s3_bucket")]
    s3_access_key: Option<String>,
    /// The S3 secret key; AWS_SECRET_ACCESS_KEY when unset.
    #[arg(long, requires = "s3_bucket", hide_env_values = true)]
    s3_secret_key: Option<String>,
    /// How long the worker gives an app to start or come back before giving up on it.
    #[arg(long, value_name = "SECONDS", default_value_t = 30.0)]
    launch_timeout: f64,
    /// How long an address an app left (it was removed, moved, or ended) stays unused
    /// before another app gets it: longer than clients keep the app's DNS answer, so that
    /// no client still holding it reaches somebody else's app. While an app is swapped
    /// out here it keeps its address, whatever this says.
    #[arg(long, value_name = "SECONDS", default_value_t = 120.0)]
    address_quarantine: f64,
    /// With S3: the disk the local copies of snapshots may take. Past it, the copies of
    /// apps swapped out here go, the longest out first; their next restore fetches them
    /// from S3 again.
    #[arg(long, value_name = "MIB", default_value_t = 8192)]
    cache_limit_mib: u64,
    /// With S3: download a swapped-out app's whole snapshot before its VMM starts, instead
    /// of starting it once the manifests are in and streaming its page files behind it
    /// (pages it touches first jump the queue). For comparison; slower over a wide-area
    /// link.
    #[arg(long, requires = "s3_bucket")]
    s3_download_first: bool,
    /// With S3: ignore what the hub knows of a snapshot's chain: fetch its ancestors only
    /// once its manifest lists them, and 2 MiB of each page file first, whatever its
    /// ActiveSet (more round trips per restore; for measuring what the hint saves).
    #[arg(long, requires = "s3_bucket", hide = true)]
    s3_no_chain_hint: bool,
    /// Store every page file whole in S3. By default a page file of up to 64 MiB that
    /// shares pages with the first one stored for the same image (its base) is stored as
    /// the pages it does not share, and rebuilt from the base at swap-in.
    #[arg(long, requires = "s3_bucket")]
    s3_no_dedup: bool,
    /// Keep this many spare VMM processes started ahead, each with its KVM VM made, so
    /// that a start or restore skips process start-up and VM creation (each costs about
    /// 1 MiB of host memory while it waits; 0: none, at most 64). Refilled in the
    /// background.
    #[arg(long, value_name = "N", default_value_t = 2, value_parser = clap::value_parser!(u8).range(0..=64))]
    warm_pool: u8,
}

/// Arguments of `picocenter app`.
#[derive(Debug, clap::Args)]
pub struct AppArgs {
    #[command(flatten)]
    state: StateDir,
    /// The hub's API.
    #[arg(
        long,
        value_name = "URL",
        default_value = "http://127.0.0.1:8600",
        global = true
    )]
    hub: String,
    #[command(flatten)]
    hub_ca: HubCa,
    /// The API token; by default the one in <state-dir>/hub/token.
    #[arg(long, env = "PICOCENTER_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    #[command(subcommand)]
    command: AppCommand,
}

#[derive(Debug, clap::Subcommand)]
enum AppCommand {
    /// Register an app: it starts on the first DNS query for NAME.<zone>.
    Add {
        /// The app's name (a DNS label).
        name: String,
        /// The image it runs (see `picocenter image ls`).
        #[arg(long)]
        image: String,
        /// Guest memory in MiB (default: the image's).
        #[arg(long, value_name = "MIB")]
        memory: Option<u64>,
        /// Extra environment, K=V (repeatable).
        #[arg(long = "env", value_name = "K=V")]
        env: Vec<String>,
        /// Swap it out after this many seconds idle (default: the worker's).
        #[arg(long, value_name = "SECONDS")]
        idle_after: Option<f64>,
    },
    /// Remove an app (ending it if it runs).
    Rm {
        /// The app.
        name: String,
    },
    /// List the apps: state, worker, address and usage.
    Ls,
    /// One app in detail: state, usage, last error and recent events.
    Status {
        /// The app.
        name: String,
    },
}

/// Arguments of `picocenter demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    #[command(flatten)]
    state: StateDir,
    #[command(flatten)]
    hub: HubFlags,
    #[command(flatten)]
    worker: WorkerFlags,
    /// The image definitions to build and register (folders with an image.toml).
    #[arg(long, value_name = "DIR", default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/images"))]
    images: PathBuf,
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn token(given: &Option<String>, state: &Path) -> anyhow::Result<String> {
    match given {
        Some(t) => Ok(t.clone()),
        None => {
            let path = state.join("hub/token");
            serve::token_file(&path).with_context(|| format!("the API token in {}", path.display()))
        }
    }
}

fn seconds(value: f64, what: &str) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(value)
        .with_context(|| format!("{what} must be a positive number of seconds"))
}

fn hub_options(flags: &HubFlags, state: &Path) -> anyhow::Result<HubOptions> {
    let data_dir = flags.data_dir.clone().unwrap_or_else(|| state.join("hub"));
    let registry = RegistryConfig::parse(&flags.registry, data_dir.join("registry.redb"))?;
    Ok(HubOptions {
        dns: flags.dns,
        api: flags.api,
        zone: flags.zone.clone(),
        ttl: flags.ttl,
        registry: Some(registry),
        data_dir,
        token: token(&flags.token, state)?,
        config: HubConfig {
            start_limit: seconds(flags.start_timeout, "--start-timeout")?,
            worker_timeout: seconds(flags.worker_timeout, "--worker-timeout")?,
            id: flags
                .hub_id
                .clone()
                .unwrap_or_else(picocenter_hub::hub::default_hub_id),
        },
        tls: None,
    })
}

fn worker_options(
    flags: &WorkerFlags,
    state: &Path,
    hubs: &[String],
    token: String,
    key: &KeyFile,
) -> anyhow::Result<WorkerOptions> {
    let addresses = serve::parse_pool(&flags.addresses).map_err(anyhow::Error::msg)?;
    let id = flags.id.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!("{}-{}", host.trim(), std::process::id())
    });
    let cold = match &flags.s3_bucket {
        Some(bucket) => ColdConfig::S3(S3Config {
            endpoint: flags.s3_endpoint.clone(),
            bucket: bucket.clone(),
            prefix: flags.s3_prefix.clone(),
            path_style: flags.s3_path_style,
            region: flags.s3_region.clone(),
            access_key: flags.s3_access_key.clone(),
            secret_key: flags.s3_secret_key.clone(),
            dedup: !flags.s3_no_dedup,
        }),
        None => ColdConfig::Local {
            dir: flags.store.clone().unwrap_or_else(|| state.join("cold")),
        },
    };
    Ok(WorkerOptions {
        hubs: hubs.to_vec(),
        hub_ca: None,
        token,
        listen: flags.listen,
        config: WorkerConfig {
            work_dir: state.join("workers").join(&id),
            id,
            addresses,
            idle_after: seconds(flags.idle_after, "--idle-after")?,
            memory_limit: flags.memory_limit_mib << 20,
            picocenter: std::env::current_exe().context("finding the picocenter binary")?,
            state_dir: state.to_path_buf(),
            key_file: std::path::absolute(key.path(state))?,
            start_limit: seconds(flags.launch_timeout, "--launch-timeout")?,
            address_quarantine: seconds(flags.address_quarantine, "--address-quarantine")?,
            cache_limit: flags.cache_limit_mib.saturating_mul(1 << 20),
            stream_swap_in: !flags.s3_download_first,
            use_chain_hint: !flags.s3_no_chain_hint,
            warm_pool: usize::from(flags.warm_pool),
            interface: flags
                .interface
                .as_deref()
                .map(picocenter_vmm::sandbox::rtnetlink::interface_index)
                .transpose()
                .context("--interface")?,
        },
        cold,
        period: Duration::from_millis(500),
    })
}

/// Resolves on Ctrl-C or SIGTERM.
async fn terminated() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
    }
}

/// Runs `picocenter hub`.
pub fn hub(args: HubArgs) -> anyhow::Result<i32> {
    let mut options = hub_options(&args.hub, args.state.state_dir())?;
    if let (Some(cert), Some(key)) = (args.tls_cert, args.tls_key) {
        options.tls = Some(serve::TlsFiles { cert, key });
    }
    runtime()?.block_on(async {
        let running = serve::start_hub(options).await?;
        eprintln!(
            "hub: DNS on {} (udp+tcp), API on {}://{}; Ctrl-C stops",
            running.dns, running.scheme, running.api
        );
        // Until asked to stop, or until it lost its hold on an etcd registry (another
        // hub may hold it now: this one must not act on what it knows).
        let hub = running.hub.clone();
        let lost = async move {
            while !hub.registry_lost() {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        };
        let status = tokio::select! {
            _ = terminated() => 0,
            _ = lost => {
                eprintln!("picocenter: error: this hub lost its hold on the registry; stopping");
                1
            }
        };
        running.shutdown().await;
        Ok(status)
    })
}

/// Runs `picocenter worker`.
pub fn worker(args: WorkerArgs) -> anyhow::Result<i32> {
    let state = args.state.state_dir();
    let mut options = worker_options(
        &args.worker,
        state,
        &args.hub,
        token(&args.token, state)?,
        &args.key,
    )?;
    // The same CA for every hub (and none for an http:// one).
    for hub in &args.hub {
        options.hub_ca = args.hub_ca.read(hub)?;
    }
    runtime()?.block_on(async {
        serve::run_worker(options, terminated()).await?;
        Ok(0)
    })
}

/// Runs `picocenter app`.
pub fn app(args: AppArgs) -> anyhow::Result<i32> {
    let client = Client::trusting(
        &args.hub,
        &token(&args.token, args.state.state_dir())?,
        Duration::from_secs(60),
        args.hub_ca.read(&args.hub)?.as_deref(),
    )
    .context("--hub-ca")?;
    runtime()?.block_on(async {
        match args.command {
            AppCommand::Add {
                name,
                image,
                memory,
                env,
                idle_after,
            } => {
                let spec = AppSpec {
                    name,
                    image,
                    memory_mib: memory,
                    env,
                    idle_after_secs: idle_after,
                };
                let record: AppRecord = client.post("/v1/apps", &spec).await?;
                println!("{}: registered ({})", record.spec.name, record.state);
            }
            AppCommand::Rm { name } => {
                client.delete::<()>(&format!("/v1/apps/{name}")).await?;
                println!("{name}: removed");
            }
            AppCommand::Ls => {
                let apps: Vec<AppRecord> = client.get("/v1/apps").await?;
                print_table(&apps);
            }
            AppCommand::Status { name } => {
                let app: AppRecord = client.get(&format!("/v1/apps/{name}")).await?;
                print_status(&app);
            }
        }
        Ok(0)
    })
}

fn print_table(apps: &[AppRecord]) {
    println!(
        "{:<16} {:<14} {:<12} {:<16} {:>9} {:>10} {:>9} {:>8}",
        "NAME", "IMAGE", "STATE", "ADDRESS", "CPU-S", "MEM-GIB-S", "STORED", "SWAP-INS"
    );
    for a in apps {
        println!(
            "{:<16} {:<14} {:<12} {:<16} {:>9.3} {:>10.4} {:>9} {:>8}",
            a.spec.name,
            a.spec.image,
            a.state.to_string(),
            a.address
                .map(|x| x.to_string())
                .unwrap_or_else(|| "-".into()),
            a.usage.cpu_seconds,
            a.usage.memory_gib_seconds,
            human(a.usage.stored_bytes),
            a.usage.swap_ins
        );
    }
}

fn human(bytes: u64) -> String {
    match bytes {
        0 => "-".into(),
        b if b < 1 << 20 => format!("{:.1}K", b as f64 / 1024.0),
        b => format!("{:.1}M", b as f64 / 1048576.0),
    }
}

fn print_status(a: &AppRecord) {
    println!("app        {}", a.spec.name);
    println!("image      {}", a.spec.image);
    println!("state      {}", a.state);
    if let Some(w) = &a.worker {
        println!("worker     {w}");
    }
    if let Some(x) = a.address {
        println!("address    {x}");
    }
    if let Some(s) = &a.snapshot {
        println!("snapshot   {s}");
    }
    if let Some(e) = &a.last_error {
        println!("last error {e}");
    }
    println!(
        "usage      {:.3} CPU-s, {:.4} GiB-s memory, {} bytes stored ({} logical), {} swap-ins, {} requests",
        a.usage.cpu_seconds,
        a.usage.memory_gib_seconds,
        a.usage.stored_bytes,
        a.usage.logical_bytes,
        a.usage.swap_ins,
        a.usage.requests
    );
    println!("events (UTC)");
    for e in &a.events {
        let ms = e.at_unix_ms % 86_400_000;
        println!(
            "  {:02}:{:02}:{:02}.{:03}  {}",
            ms / 3_600_000,
            ms / 60_000 % 60,
            ms / 1000 % 60,
            ms % 1000,
            e.what
        );
    }
}

/// The sample apps the demo registers: (app name, image).
const DEMO_APPS: [(&str, &str); 4] = [
    ("counter", "counter-http"),
    ("nginx", "nginx"),
    ("python", "python-http"),
    ("lighttpd", "lighttpd"),
];

/// Runs `picocenter demo`: a hub and a worker in one process, with the sample apps.
pub fn demo(args: DemoArgs) -> anyhow::Result<i32> {
    let state = args.state.state_dir().to_path_buf();
    for (_, image) in DEMO_APPS {
        let dir = args.images.join(image);
        if !dir.join("image.toml").exists() {
            bail!(
                "no image definition in {} (pass --images with the repository's images folder)",
                dir.display()
            );
        }
        eprintln!("demo: building image {image}...");
        picocenter_images::build_with(&dir, &state, &Default::default())
            .with_context(|| format!("building the image in {}", dir.display()))?;
    }
    let hub_options = hub_options(&args.hub, &state)?;
    runtime()?.block_on(async move {
        let running = serve::start_hub(hub_options.clone()).await?;
        let api = format!("http://{}", running.api);
        for (name, image) in DEMO_APPS {
            if running.hub.get(name).is_none() {
                running.hub.add(AppSpec {
                    name: name.into(),
                    image: image.into(),
                    memory_mib: None,
                    env: vec![],
                    idle_after_secs: None,
                })?;
            }
        }
        let options = worker_options(
            &args.worker,
            &state,
            std::slice::from_ref(&api),
            hub_options.token.clone(),
            &KeyFile::at(picocenter_snapshots::key::default_path(&state)),
        )?;
        let zone = hub_options.zone.trim_end_matches('.').to_string();
        let (dns_ip, dns_port) = (running.dns.ip(), running.dns.port());
        println!("Picocenter demo: a hub and a worker in this process. Ctrl-C stops.");
        println!("Apps ({}s idle before a swap-out):", args.worker.idle_after);
        for (name, image) in DEMO_APPS {
            println!("  {name:<9} {image}");
        }
        println!();
        println!("Bring one up with a DNS query, then talk to it:");
        println!("  dig @{dns_ip} -p {dns_port} +short counter.{zone}");
        println!("  curl http://$(dig @{dns_ip} -p {dns_port} +short counter.{zone})/");
        println!("Watch it: picocenter app ls --hub {api}   (or app status counter)");
        println!("Cold storage: {}", state.join("cold").display());
        serve::run_worker(options, terminated()).await?;
        running.shutdown().await;
        Ok(0)
    })
}
