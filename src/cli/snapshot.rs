//! `picocenter snapshot`: create, restore, inspect and compact snapshots.

use super::image::StateDir;
use super::key::KeyFile;
use super::restore::{restore, RestoreArgs};
use anyhow::{bail, Context};
use picocenter_snapshots::format::{Manifest, PageSource};
use picocenter_snapshots::store::{chain, Store};
use picocenter_snapshots::{archive, pagefile, LocalStore};
use picocenter_vmm::control::{self, Request};
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
        /// Also print a digest of the app's memory as captured (non-zero pages by address
        /// and contents), to check a restore against: the app's control socket answers
        /// `{"op":"digest"}` with the same digest of its memory then.
        #[arg(long)]
        digest: bool,
        #[command(flatten)]
        state: StateDir,
        #[command(flatten)]
        key: KeyFile,
    },
    /// Run an app from its newest snapshot (or --id) in this process, as `run` would,
    /// configured by these options (see --help); the snapshot must be of that app.
    Restore(Box<RestoreArgs>),
    /// Show what a snapshot holds, and check its key, every page digest and its data.
    Inspect {
        /// The snapshot directory.
        dir: PathBuf,
        /// A snapshot id (default: the newest).
        #[arg(long)]
        id: Option<String>,
        #[command(flatten)]
        state: StateDir,
        #[command(flatten)]
        key: KeyFile,
    },
    /// Merge the newest snapshot and the chain it is an increment of into one full
    /// snapshot, and remove what the chain no longer needs.
    Compact {
        /// The snapshot directory.
        dir: PathBuf,
        #[command(flatten)]
        state: StateDir,
        #[command(flatten)]
        key: KeyFile,
    },
}

impl SnapshotArgs {
    /// Whether it runs an app (`snapshot restore`), as a spare VMM may.
    pub fn runs_an_app(&self) -> bool {
        matches!(self.command, SnapshotCommand::Restore(_))
    }
}

/// Runs a `snapshot` subcommand.
pub fn snapshot(args: SnapshotArgs) -> anyhow::Result<i32> {
    match args.command {
        SnapshotCommand::Create {
            name,
            output,
            stop,
            full,
            digest,
            state,
            key,
        } => create(&name, output.as_deref(), stop, full, digest, &state, &key),
        SnapshotCommand::Restore(args) => restore(*args),
        SnapshotCommand::Inspect {
            dir,
            id,
            state,
            key,
        } => inspect(&dir, id.as_deref(), &key.load(state.state_dir())?),
        SnapshotCommand::Compact { dir, state, key } => {
            let key = key.load(state.state_dir())?;
            let store = LocalStore::open(&dir)?;
            let head = store
                .head()?
                .with_context(|| format!("no snapshot in {}", dir.display()))?;
            let manifest = picocenter_snapshots::compact::compact(&store, &key, &head)?;
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

/// The line `snapshot create --digest` and `snapshot restore --digest` print, which a
/// check compares: "NAME: memory digest D (N pages) as WHEN".
pub(super) fn digest_line(
    name: &str,
    digest: &str,
    pages: &dyn std::fmt::Display,
    when: &str,
) -> String {
    format!("{name}: memory digest {digest} ({pages} pages) as {when}")
}

fn create(
    name: &str,
    output: Option<&std::path::Path>,
    stop: bool,
    full: bool,
    digest: bool,
    state: &StateDir,
    key: &KeyFile,
) -> anyhow::Result<i32> {
    let socket = super::run::control_socket(&state.state_dir().join("run"), name)?;
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
            if_idle: false,
            digest,
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
    if let Some(digest) = answer["digest"].as_object() {
        println!(
            "{}",
            digest_line(
                name,
                digest["digest"].as_str().unwrap_or("?"),
                &digest["pages"],
                "captured"
            )
        );
    }
    if let Some(output) = output {
        let from = LocalStore::open(&store)?;
        let to = LocalStore::open(output)?;
        if from.dir() != to.dir() {
            let key = key.load(state.state_dir())?;
            picocenter_snapshots::store::copy_chain(&from, &to, &key, id)?;
            println!("{name}: snapshot {id} copied into {}", to.dir().display());
        }
    }
    Ok(0)
}

fn count(m: &Manifest, which: fn(&PageSource) -> bool) -> u64 {
    m.pages
        .iter()
        .filter(|r| which(&r.source))
        .map(|r| r.count)
        .sum()
}

/// How well the restore before snapshot `m` guessed: of the pages it prefetched from
/// `parent` (the snapshot restored), how many the app used before `m` was taken (its
/// ActiveSet), and how many of those it used had been prefetched.
fn prefetch_line(m: &Manifest, parent: Option<&Manifest>) -> Option<String> {
    let record = m.prefetched.as_ref()?;
    let parent = parent.filter(|parent| parent.id == record.from)?;
    let fetched = picocenter_snapshots::chain::hot_set(parent, record.port);
    let pages = |ranges: &[picocenter_snapshots::format::VpnRange]| -> u64 {
        ranges.iter().map(|r| r.count).sum()
    };
    let (fetched_pages, used_pages) = (pages(fetched), pages(&m.activeset));
    let both = picocenter_snapshots::chain::overlap(fetched, &m.activeset);
    let percent = |part: u64, whole: u64| part as f64 * 100.0 / whole.max(1) as f64;
    let which = match record.port {
        Some(port) => format!("port {port}'s set"),
        None => "the app-wide ActiveSet".to_string(),
    };
    let caveat = if record.accessed_preset {
        " (their Accessed bits were set at the restore, so all count as used: restore with \
         --relearn to measure)"
    } else {
        ""
    };
    Some(format!(
        "{fetched_pages} pages ({which}) at the restore from {}: {both} used since ({:.1}%); \
         {both} of the {used_pages} pages used since had been prefetched ({:.1}%){caveat}",
        parent.id,
        percent(both, fetched_pages),
        percent(both, used_pages),
    ))
}

/// The snapshot's logical size (the memory it restores: its resident pages, by where they
/// come from) against what its chain stores (`chain`: newest first).
fn size_line(chain: &[Manifest], store: &LocalStore) -> anyhow::Result<String> {
    let (mut stored, mut parent, mut file, mut zero) = (0u64, 0u64, 0u64, 0u64);
    for run in &chain[0].pages {
        let count = match run.source {
            PageSource::Stored { .. } => &mut stored,
            PageSource::Parent => &mut parent,
            PageSource::File => &mut file,
            PageSource::Zero => &mut zero,
        };
        *count = count.saturating_add(run.count);
    }
    let resident = stored + parent + file + zero;
    let mut on_disk = 0u64;
    for each in chain {
        on_disk = on_disk.saturating_add(store.size(&each.id)?);
    }
    Ok(format!(
        "logical {} bytes ({resident} resident pages: {stored} stored here, {parent} from \
         parents, {file} from image files, {zero} zero), stored {on_disk} bytes (the chain's \
         manifests, page files and data)",
        resident.saturating_mul(picocenter_snapshots::format::PAGE_SIZE)
    ))
}

fn inspect(
    dir: &std::path::Path,
    id: Option<&str>,
    key: &picocenter_snapshots::SnapshotKey,
) -> anyhow::Result<i32> {
    let store = LocalStore::open(dir)?;
    let id = match id {
        Some(id) => id.to_string(),
        None => store
            .head()?
            .with_context(|| format!("no snapshot in {}", dir.display()))?,
    };
    let manifests = chain(&store, key, &id)?;
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
    // RSP is gprs[6]; a thread rewound to its `syscall` holds the call's number in RAX.
    println!(
        "  stopped at    rip {:#x}, rsp {:#x}, rax {:#x}; {} other thread(s)",
        m.context.rip,
        m.context.gprs[6],
        m.context.gprs[0],
        m.threads.len()
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
    if let Some(line) = prefetch_line(m, manifests.get(1)) {
        println!("  prefetch      {line}");
    }
    println!(
        "  files         {} descriptors; {} connections closed at capture",
        m.files.len(),
        m.stats.closed_connections
    );
    if let Some(tree) = &m.tree {
        // The first process is the manifest's own; each other one keeps its own pages.
        println!("  processes     {}", tree.others.len() + 1);
        for part in &tree.others {
            let resident: u64 = part.pages.iter().map(|r| r.count).sum();
            let stored: u64 = part
                .pages
                .iter()
                .filter(|r| matches!(r.source, PageSource::Stored { .. }))
                .map(|r| r.count)
                .sum();
            println!(
                "    pid {:<7} parent {:<7} {} ({resident} pages resident, {stored} in the page file, {} descriptors)",
                part.pid,
                part.ppid,
                part.exe,
                part.files.len()
            );
        }
    }
    if !m.shared_memory.is_empty() {
        let bytes: usize = m.shared_memory.iter().map(|r| r.data.len()).sum();
        println!(
            "  shared memory {} area(s), {bytes} bytes",
            m.shared_memory.len()
        );
    }
    println!("  size          {}", size_line(&manifests, &store)?);
    let mut healthy = true;
    for each in &manifests {
        let size = store.size(&each.id)?;
        let pages = store.page_file(&each.id)?;
        let verdict = match pagefile::verify(&pages, each, 0, each.page_count) {
            Ok(()) => "key and checksums valid".to_string(),
            Err(e) => {
                healthy = false;
                format!("BAD: {e}")
            }
        };
        let data = match store.data_archive(&each.id)? {
            Some(path) => {
                // Its entries are checked against the writable directories the snapshot
                // records; nothing is written.
                let dirs: Vec<(String, PathBuf)> = each
                    .app
                    .writable
                    .iter()
                    .map(|guest| (guest.clone(), PathBuf::new()))
                    .collect();
                match archive::check(&path, each.data_bytes, &each.data_digest, &dirs) {
                    Ok(()) => format!(", data {} bytes valid", each.data_bytes),
                    Err(e) => {
                        healthy = false;
                        format!(", data archive BAD: {e}")
                    }
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
