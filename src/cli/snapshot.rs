//! `picocenter snapshot`: create, restore, inspect and compact snapshots.

use super::image::StateDir;
use super::run::{claim_name, data_dir, run_in_jail};
use anyhow::{bail, Context};
use picocenter_snapshots::format::{Manifest, PageSource};
use picocenter_snapshots::store::{chain, Store};
use picocenter_snapshots::{pagefile, LocalStore};
use picocenter_vmm::control::{self, Request};
use picocenter_vmm::persist::restore::{RestoreMode, RestoreOptions};
use picocenter_vmm::{Config, Picoprocess};
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Arguments of `picocenter snapshot`.
#[derive(Debug, clap::Args)]
pub struct SnapshotArgs {
    #[command(subcommand)]
    command: SnapshotCommand,
}

#[derive(Debug, clap::Subcommand)]
enum SnapshotCommand {
    /// Snapshot a running app into its store (see `run --store`), and copy it out.
    ///
    /// The app is stopped at a clean point (a blocking call is rewound to be made again),
    /// its registers, memory, files, sockets, signals and clocks are written, and it goes
    /// on running, or ends with --stop. If it was restored from (or last saved to) its
    /// store, only the pages changed since are written, with a reference to that snapshot,
    /// unless --full. The app's VMM writes only into its own store; with -o, the snapshot
    /// (and the chain it needs) is then copied into DIR.
    Create {
        /// The app's name (see `picocenter ps`).
        name: String,
        /// Also copy the snapshot into this snapshot directory.
        #[arg(short, long, value_name = "DIR")]
        output: Option<PathBuf>,
        /// End the app once the snapshot is safely written.
        #[arg(long)]
        stop: bool,
        /// Write every page, not an increment.
        #[arg(long)]
        full: bool,
        #[command(flatten)]
        state: StateDir,
    },
    /// Run an app from its newest snapshot (or --id) in this process, as `run` would.
    Restore(RestoreArgs),
    /// Show what a snapshot holds, and check every checksum.
    Inspect {
        /// The snapshot directory.
        dir: PathBuf,
        /// A snapshot id (default: the newest).
        #[arg(long)]
        id: Option<String>,
    },
    /// Merge the newest snapshot and the chain it is an increment of into one full
    /// snapshot, and remove what the chain no longer needs.
    Compact {
        /// The snapshot directory.
        dir: PathBuf,
    },
}

/// Arguments of `picocenter snapshot restore`.
#[derive(Debug, clap::Args)]
pub struct RestoreArgs {
    /// The snapshot directory.
    dir: PathBuf,
    /// A snapshot id (default: the newest).
    #[arg(long)]
    id: Option<String>,
    /// What to bring into memory before the app runs: eager (everything), lazy (nothing:
    /// pages come from the page cache as touched), activeset (the pages it used last time),
    /// stream (nothing: the app runs while a thread copies the newest page file in,
    /// ActiveSet first, and a page it touches first jumps the queue; for slow storage).
    #[arg(long, default_value = "activeset")]
    mode: RestoreMode,
    /// In activeset mode, still let the next snapshot learn the ActiveSet afresh.
    #[arg(long)]
    relearn: bool,
    /// The app's address now (default: the snapshot's).
    #[arg(long, value_name = "IP")]
    address: Option<IpAddr>,
    /// The app's name now (default: the snapshot's).
    #[arg(long)]
    name: Option<String>,
    /// Its root directory now (default: the image's in the state directory, else the root
    /// it had).
    #[arg(long, value_name = "DIR")]
    root: Option<PathBuf>,
    /// Where its writable directories live (default: a temporary directory). They are
    /// filled from the snapshot.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Stop the app after this many seconds (exit status 124).
    #[arg(long, value_name = "SECS")]
    timeout: Option<f64>,
    /// Make every forwarded syscall a VM exit (no mailbox).
    #[arg(long)]
    no_mailbox: bool,
    #[command(flatten)]
    state: StateDir,
}

/// Runs a `snapshot` subcommand.
pub fn snapshot(args: SnapshotArgs) -> anyhow::Result<i32> {
    match args.command {
        SnapshotCommand::Create {
            name,
            output,
            stop,
            full,
            state,
        } => create(&name, output.as_deref(), stop, full, &state),
        SnapshotCommand::Restore(args) => restore(args),
        SnapshotCommand::Inspect { dir, id } => inspect(&dir, id.as_deref()),
        SnapshotCommand::Compact { dir } => {
            let store = LocalStore::open(&dir)?;
            let head = store
                .head()?
                .with_context(|| format!("no snapshot in {}", dir.display()))?;
            let manifest = picocenter_snapshots::compact::compact(&store, &head)?;
            println!(
                "{}: compacted into {} ({} stored pages)",
                dir.display(),
                manifest.id,
                manifest.page_count
            );
            Ok(0)
        }
    }
}

/// A spinner on a terminal, nothing otherwise.
fn progress(message: String) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new_spinner();
    if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        bar.set_message(message);
        bar.enable_steady_tick(Duration::from_millis(100));
    } else {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar
}

fn create(
    name: &str,
    output: Option<&std::path::Path>,
    stop: bool,
    full: bool,
    state: &StateDir,
) -> anyhow::Result<i32> {
    let socket = state.state_dir().join("run").join(format!("{name}.sock"));
    let (stats, _) = control::request(&socket, &Request::Stats)
        .with_context(|| format!("no running app named {name} ({})", socket.display()))?;
    let store = serde_json::from_str::<control::StatsReply>(&stats)
        .ok()
        .and_then(|s| s.store)
        .with_context(|| format!("{name} has no snapshot store"))?;
    let started = Instant::now();
    let bar = progress(format!("snapshotting {name}"));
    let (reply, _stream) = control::request(
        &socket,
        &Request::Snapshot {
            dir: None,
            stop,
            full,
        },
    )
    .with_context(|| format!("no running app named {name} ({})", socket.display()))?;
    bar.finish_and_clear();
    let answer: serde_json::Value =
        serde_json::from_str(&reply).with_context(|| format!("bad reply: {reply}"))?;
    if answer["ok"] != serde_json::Value::Bool(true) {
        bail!(
            "snapshot of {name} failed: {}",
            answer["error"].as_str().unwrap_or(reply.trim())
        );
    }
    let id = answer["id"].as_str().unwrap_or("?");
    let stats = &answer["stats"];
    println!(
        "{name}: snapshot {id} in {} ({} pages stored, {} zero, {} from files, {} unchanged from {}; ActiveSet {} pages) in {:.1} ms{}",
        store.display(),
        stats["stored_pages"],
        stats["zero_pages"],
        stats["file_pages"],
        stats["parent_pages"],
        answer["parent"].as_str().unwrap_or("no parent"),
        stats["activeset_pages"],
        started.elapsed().as_secs_f64() * 1000.0,
        if stop { "; the app has stopped" } else { "" },
    );
    if let Some(output) = output {
        let from = LocalStore::open(&store)?;
        let to = LocalStore::open(output)?;
        if from.dir() != to.dir() {
            picocenter_snapshots::store::copy_chain(&from, &to, id)?;
            println!("{name}: snapshot {id} copied into {}", to.dir().display());
        }
    }
    Ok(0)
}

fn restore(args: RestoreArgs) -> anyhow::Result<i32> {
    let store = LocalStore::open(&args.dir)?;
    let id = match &args.id {
        Some(id) => id.clone(),
        None => store
            .head()?
            .with_context(|| format!("no snapshot in {}", args.dir.display()))?,
    };
    let manifest = store.manifest(&id)?;
    let app = &manifest.app;
    let mut _temp_root = None;
    let mut readonly = Vec::new();
    let root = match (&args.root, &app.image, &app.root_from) {
        (Some(root), _, _) => root.clone(),
        (None, Some(image), _) => match picocenter_images::load(args.state.state_dir(), image) {
            Ok(built) => built.rootfs,
            Err(_) => PathBuf::from(&app.root),
        },
        // A temporary root made from a host program: make it again.
        (None, None, Some(program)) => {
            let temp = super::run::temporary_root(std::path::Path::new(program), &app.writable)?;
            let path = temp.dir.path().to_path_buf();
            readonly = temp.mounts.clone();
            _temp_root = Some(temp);
            path
        }
        (None, None, None) => PathBuf::from(&app.root),
    };
    if !root.is_dir() {
        bail!("the app's root {} is not here; give --root", root.display());
    }
    let (_temp_data, data) = data_dir(args.data_dir.as_ref())?;
    let mut writable = Vec::new();
    for guest in &app.writable {
        let host = data.join(guest.trim_start_matches('/'));
        std::fs::create_dir_all(&host).with_context(|| format!("creating {}", host.display()))?;
        writable.push((guest.clone(), host));
    }
    let mut _lease = None;
    let address = match (args.address, &app.address) {
        (Some(a), _) => a,
        (None, Some(a)) => a.parse().context("the snapshot's address")?,
        (None, None) => {
            let lease = super::address::lease(args.state.state_dir())?;
            let address = std::net::IpAddr::V4(lease.value);
            _lease = Some(lease);
            address
        }
    };
    let mut config = Config {
        program: app.program.clone(),
        argv: vec![app.program.clone()],
        env: Vec::new(),
        root,
        readonly,
        writable,
        memory_mib: app.memory_mib,
        cwd: manifest.process.cwd.clone(),
        name: args.name.clone().unwrap_or_else(|| app.name.clone()),
        trace_syscalls: false,
        address,
        allow_outbound: false,
        control: None,
        mailbox: !args.no_mailbox,
        doorbell_time: true,
        image: app.image.clone(),
        root_from: app.root_from.clone(),
    };
    let options = RestoreOptions {
        mode: args.mode,
        relearn: args.relearn,
    };
    let state_dir = args.state.state_dir();
    // The app goes on snapshotting into the store it came from.
    claim_name(
        &mut config,
        state_dir,
        true,
        Some(store.dir().to_path_buf()),
    )?;
    run_in_jail(config, state_dir, args.timeout, |config| {
        Picoprocess::restore(config, &store, &id, &options)
    })
}

fn count(m: &Manifest, which: fn(&PageSource) -> bool) -> u64 {
    m.pages
        .iter()
        .filter(|r| which(&r.source))
        .map(|r| r.count)
        .sum()
}

fn inspect(dir: &std::path::Path, id: Option<&str>) -> anyhow::Result<i32> {
    let store = LocalStore::open(dir)?;
    let id = match id {
        Some(id) => id.to_string(),
        None => store
            .head()?
            .with_context(|| format!("no snapshot in {}", dir.display()))?,
    };
    let manifests = chain(&store, &id)?;
    let m = &manifests[0];
    println!("snapshot {} in {}", m.id, dir.display());
    println!(
        "  app           {} ({}; image {}; root {})",
        m.app.name,
        m.app.program,
        m.app.image.as_deref().unwrap_or("-"),
        m.app.root
    );
    println!(
        "  address       {}",
        m.app.address.as_deref().unwrap_or("-")
    );
    println!(
        "  memory        {} MiB, {} areas",
        m.app.memory_mib,
        m.vmas.len()
    );
    let chain_ids: Vec<&str> = manifests.iter().map(|m| m.id.as_str()).collect();
    println!("  chain         {}", chain_ids.join(" <- "));
    println!(
        "  pages         {} resident: {} stored here, {} zero, {} from files, {} from the parent",
        count(m, |_| true),
        count(m, |s| matches!(s, PageSource::Stored { .. })),
        count(m, |s| *s == PageSource::Zero),
        count(m, |s| *s == PageSource::File),
        count(m, |s| *s == PageSource::Parent),
    );
    let hot: u64 = m.activeset.iter().map(|r| r.count).sum();
    println!(
        "  ActiveSet     {hot} pages ({} KiB), {} of them first in the page file",
        hot * 4,
        m.activeset_prefix
    );
    for set in &m.port_sets {
        let pages: u64 = set.pages.iter().map(|r| r.count).sum();
        println!("    port {:<8} {pages} pages", set.port);
    }
    println!(
        "  files         {} descriptors; {} connections closed at capture",
        m.files.len(),
        m.stats.closed_connections
    );
    let mut healthy = true;
    for each in &manifests {
        let size = store.size(&each.id)?;
        let pages = store.page_file(&each.id)?;
        let verdict = match pagefile::verify(&pages, each, 0, each.page_count) {
            Ok(()) => "checksums valid".to_string(),
            Err(e) => {
                healthy = false;
                format!("BAD: {e}")
            }
        };
        let data = match store.data_archive(&each.id)? {
            Some(path) => {
                let bytes = std::fs::read(&path).unwrap_or_default();
                if bytes.len() as u64 == each.data_bytes
                    && crc32fast::hash(&bytes) == each.data_checksum
                {
                    format!(", data {} bytes valid", each.data_bytes)
                } else {
                    healthy = false;
                    ", data archive BAD".to_string()
                }
            }
            None => String::new(),
        };
        println!(
            "  {}  {:>10} bytes on disk, {} stored pages: {verdict}{data}",
            each.id, size, each.page_count
        );
    }
    Ok(if healthy { 0 } else { 1 })
}
