//! `picocenter snapshot restore`: the app's configuration comes from the caller, and the
//! snapshot's record of it is only compared (the VMM refuses a snapshot of another app).

use super::image::StateDir;
use super::key::KeyFile;
use super::program_root::{program_root, ProgramRoot};
use super::run::{claim_name, data_dir, run_in_jail, SHARED_MEMORY_DIR};
use anyhow::{bail, Context};
use picocenter_images::BuiltImage;
use picocenter_snapshots::format::Manifest;
use picocenter_snapshots::names::{validate_app_name, validate_guest_dir, validate_image_name};
use picocenter_snapshots::{LocalStore, Store};
use picocenter_vmm::persist::restore::{RestoreMode, RestoreOptions};
use picocenter_vmm::{Config, Picoprocess};
use std::net::IpAddr;
use std::path::PathBuf;

/// What `--help` says about where each setting comes from.
const DEFAULTS: &str = "\
Where the settings come from:
  The snapshot's manifest is read only if it checks out under the cluster's key; then
  every setting given here is compared with what it records, and a snapshot of another
  app (name, image, writable directories, memory, or host program of its root) is
  refused before anything runs.
  A setting left out is taken as follows (a worker always gives them all):
    root          --image, --root or --root-from; else the image the snapshot records,
                  if it is a plain image name built in the state directory. Never the
                  snapshot's host path, nor its host program unless --root-from names it.
    writable      the image's (plus --writable); else --writable; else the snapshot's
    memory        --memory; else the image's; else the snapshot's
    name          --name; else the snapshot's
    address       --address; else the snapshot's
  The snapshot's values are used only within their bounds: plain names, plain absolute
  writable directories (placed under --data-dir), at most 16 GiB of memory.";

/// Arguments of `picocenter snapshot restore`.
#[derive(Debug, clap::Args)]
#[command(after_long_help = DEFAULTS)]
pub struct RestoreArgs {
    /// The snapshot directory.
    dir: PathBuf,
    /// A snapshot id (default: the newest).
    #[arg(long)]
    id: Option<String>,
    /// What to bring into memory before the app runs: eager (everything, each chunk
    /// verified), lazy (nothing: pages come from the page cache as touched, unverified),
    /// activeset (the pages it used last time, verified), stream (nothing: the app runs
    /// while a thread copies the newest page file in, each chunk verified, ActiveSet first,
    /// and a page it touches first jumps the queue; for slow storage).
    #[arg(long, default_value = "activeset")]
    mode: RestoreMode,
    /// In activeset mode, still let the next snapshot learn the ActiveSet afresh.
    #[arg(long)]
    relearn: bool,
    /// In activeset mode, the port the app's first client connects to (a worker passes it
    /// when a connection waits on the app's held sockets): the pages that port's requests
    /// used last time come first, instead of the app-wide ActiveSet.
    #[arg(long, value_name = "PORT")]
    first_port: Option<u16>,
    /// Run it from this built image (see `picocenter image ls`); the image's writable
    /// directories and memory are the defaults.
    #[arg(long, value_name = "NAME", conflicts_with_all = ["root", "root_from"])]
    image: Option<String>,
    /// Its root directory on this host.
    #[arg(long, value_name = "DIR", conflicts_with = "root_from")]
    root: Option<PathBuf>,
    /// Its root made from this host program and its libraries, as `picocenter run PROGRAM`
    /// makes it (the kept one, if none of them changed); it must be the program the
    /// snapshot records.
    #[arg(long, value_name = "PROGRAM")]
    root_from: Option<PathBuf>,
    /// The app's name (compared with the snapshot's).
    #[arg(long)]
    name: Option<String>,
    /// Guest RAM in MiB (compared with the snapshot's).
    #[arg(long, value_name = "MIB")]
    memory: Option<u64>,
    /// A writable guest directory (repeatable; the set is compared with the snapshot's).
    #[arg(long, value_name = "GUEST_DIR")]
    writable: Vec<String>,
    /// Where its writable directories live (default: a temporary directory). They are
    /// filled from the snapshot.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// The app's address now (it may move).
    #[arg(long, value_name = "IP")]
    address: Option<IpAddr>,
    /// Stop the app after this many seconds (exit status 124).
    #[arg(long, value_name = "SECS")]
    timeout: Option<f64>,
    /// Make every forwarded syscall a VM exit (no mailbox).
    #[arg(long)]
    no_mailbox: bool,
    /// The most vCPUs the app may have (see `run --vcpus`). [default: the host's CPUs, at
    /// most 64]
    #[arg(long, value_name = "N", env = "PICOCENTER_VCPUS", value_parser = clap::value_parser!(u16).range(1..=64))]
    vcpus: Option<u16>,

    /// Make pread64 and fstat of files of the read-only root always go to the VMM (see
    /// `run --no-guest-reads`).
    #[arg(long, hide = true)]
    no_guest_reads: bool,
    /// Adopt N sockets passed as fds 3, 4, ... (a worker passes the sockets it held while
    /// the app was swapped out): a socket of the snapshot bound to the same address takes
    /// the passed one, with the connections and datagrams that queued on it meanwhile.
    #[arg(long, value_name = "N", default_value_t = 0)]
    listen_fds: u32,
    /// Stream page files from a worker that is still downloading them: FD is a stream
    /// socket (the worker's page feed) over which the page files of the snapshots named
    /// by --fed arrive, each chunk checked against its manifest, while the app already
    /// runs. Needs --mode stream.
    #[arg(long, value_name = "FD", requires = "fed")]
    feed_fd: Option<i32>,
    /// A snapshot of the chain whose page file comes over --feed-fd, not from the store
    /// (repeatable, newest first, in the feed's order).
    #[arg(long, value_name = "ID", requires = "feed_fd")]
    fed: Vec<String>,
    /// Print a digest of the restored memory before the app runs (as `snapshot create
    /// --digest` prints it as captured): "NAME: memory digest D (N pages) as restored".
    #[arg(long)]
    digest: bool,
    #[command(flatten)]
    state: StateDir,
    #[command(flatten)]
    key: KeyFile,
}

/// Where the root comes from.
enum Root {
    /// A built image (boxed: its metadata is large).
    Image(Box<BuiltImage>),
    /// A directory the caller named.
    Dir(PathBuf),
    /// The root made from a host program (its absolute path): see `program_root`.
    FromProgram(ProgramRoot, String),
}

/// The image to run: the one given, else (with no other root) the snapshot's.
fn image_name(args: &RestoreArgs, manifest: &Manifest) -> anyhow::Result<Option<String>> {
    if args.root.is_some() || args.root_from.is_some() {
        return Ok(None);
    }
    let name = match (&args.image, &manifest.app.image, &manifest.app.root_from) {
        (Some(image), _, _) => image.clone(),
        (None, Some(image), _) => image.clone(),
        (None, None, Some(program)) => bail!(
            "the snapshot's root was made from the host program {program}: give \
             --root-from {program} (or --root DIR)"
        ),
        (None, None, None) => bail!("give the app's root: --image, --root or --root-from"),
    };
    validate_image_name(&name)?;
    Ok(Some(name))
}

/// The writable directories, each in its plain spelling.
fn writable(
    args: &RestoreArgs,
    image: Option<&BuiltImage>,
    m: &Manifest,
) -> anyhow::Result<Vec<String>> {
    let chosen: Vec<String> = match image {
        Some(image) => image
            .meta
            .run
            .writable
            .iter()
            .chain(&args.writable)
            .cloned()
            .collect(),
        None if !args.writable.is_empty() => args.writable.clone(),
        None => m.app.writable.clone(),
    };
    // `run` adds /dev/shm to every app's set; so does a restore of such an app.
    let chosen = if m.app.writable.iter().any(|d| d == SHARED_MEMORY_DIR) {
        super::run::with_shared_memory_dir(chosen)
    } else {
        chosen
    };
    let mut plain = Vec::new();
    for dir in chosen {
        let dir = validate_guest_dir(&dir)?;
        if !plain.contains(&dir) {
            plain.push(dir);
        }
    }
    Ok(plain)
}

/// The caller's configuration for restoring `manifest`, with the root and the temporary
/// directories (data, /dev/shm) it needs kept alive.
fn configure(
    args: &RestoreArgs,
    manifest: &Manifest,
    key: picocenter_snapshots::SnapshotKey,
) -> anyhow::Result<(Config, Root, Vec<tempfile::TempDir>)> {
    let image = match image_name(args, manifest)? {
        Some(name) => Some(
            picocenter_images::load(args.state.state_dir(), &name)
                .with_context(|| format!("image {name} (or give --root or --root-from)"))?,
        ),
        None => None,
    };
    let writable_dirs = writable(args, image.as_ref(), manifest)?;
    let memory = match (&args.memory, &image) {
        (Some(memory), _) => *memory,
        (None, Some(image)) => image.meta.run.memory_mib,
        (None, None) => manifest.app.memory_mib,
    };
    let name = args
        .name
        .clone()
        .unwrap_or_else(|| manifest.app.name.clone());
    validate_app_name(&name)?;
    let address = match (args.address, &manifest.app.address) {
        (Some(a), _) => a,
        (None, Some(a)) => a.parse().context("the snapshot's address")?,
        (None, None) => bail!("the snapshot records no address: give --address"),
    };
    let root = match (image, &args.root, &args.root_from) {
        (Some(image), _, _) => Root::Image(Box::new(image)),
        (None, Some(dir), _) => Root::Dir(dir.clone()),
        (None, None, Some(program)) => {
            let absolute = std::path::absolute(program)?.display().to_string();
            Root::FromProgram(
                program_root(args.state.state_dir(), program, &writable_dirs)?,
                absolute,
            )
        }
        (None, None, None) => bail!("give the app's root: --image, --root or --root-from"),
    };
    let (root_dir, readonly, image_name, root_from) = match &root {
        Root::Image(image) => (
            image.rootfs.clone(),
            vec![],
            Some(image.meta.name.clone()),
            None,
        ),
        Root::Dir(dir) => (dir.clone(), vec![], None, None),
        Root::FromProgram(temp, program) => (
            temp.dir.clone(),
            temp.mounts.clone(),
            None,
            Some(program.clone()),
        ),
    };
    if !root_dir.is_dir() {
        bail!("the app's root {} is not a directory", root_dir.display());
    }
    let (temp_data, data) = data_dir(args.data_dir.as_ref())?;
    let mut temporary: Vec<tempfile::TempDir> = temp_data.into_iter().collect();
    let mut writable = Vec::new();
    for guest in writable_dirs {
        // A plain absolute guest path: its host directory stays under the data directory,
        // reached with no symlink on the way (or is this run's own, for /dev/shm).
        let host = super::run::writable_host_dir(&data, &guest, &mut temporary)?;
        writable.push((guest, host));
    }
    if let Root::FromProgram(temp, _) = &root {
        // The program, should it live in a writable directory; the data archive, if it
        // holds the app's copy, replaces it when unpacked.
        temp.copy_program(&data)?;
    }
    let config = Config {
        program: manifest.app.program.clone(),
        argv: vec![manifest.app.program.clone()],
        env: Vec::new(),
        root: root_dir,
        readonly,
        writable,
        memory_mib: memory,
        cwd: manifest.process.cwd.clone(),
        name,
        trace_syscalls: false,
        address,
        allow_outbound: false,
        control: None,
        inherited_sockets: inherited_sockets(args.listen_fds)?,
        mailbox: !args.no_mailbox,
        vcpus: super::run::vcpus_or_default(args.vcpus),
        doorbell_time: true,
        guest_reads: !args.no_guest_reads,
        image: image_name,
        root_from,
        snapshot_key: Some(key),
    };
    Ok((config, root, temporary))
}

/// The first fd of those handed down (as systemd's socket activation does).
const FIRST_HANDED_FD: i32 = 3;

/// Takes the `count` sockets passed as fds 3, 4, ...: each must be an open socket.
fn inherited_sockets(count: u32) -> anyhow::Result<Vec<std::sync::Arc<std::os::fd::OwnedFd>>> {
    use std::os::fd::FromRawFd;
    let count = i32::try_from(count).context("--listen-fds: too many")?;
    let mut sockets = Vec::new();
    for raw in FIRST_HANDED_FD..FIRST_HANDED_FD.saturating_add(count) {
        // SAFETY: fcntl(F_GETFD) only asks whether `raw` is open.
        if unsafe { libc::fcntl(raw, libc::F_GETFD) } < 0 {
            bail!("--listen-fds: fd {raw} is not open");
        }
        // SAFETY: `raw` is open and was handed to this process to own; nothing else here
        // uses it (the CLI opens nothing before this).
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
        rustix::io::fcntl_setfd(&fd, rustix::io::FdFlags::CLOEXEC)?;
        if rustix::net::sockopt::socket_type(&fd).is_err() {
            bail!("--listen-fds: fd {raw} is not a socket");
        }
        sockets.push(std::sync::Arc::new(fd));
    }
    Ok(sockets)
}

/// Takes the page feed passed as fd `raw`: it must be an open stream socket.
fn feed(
    raw: i32,
    ids: &[String],
    listen_fds: u32,
) -> anyhow::Result<picocenter_vmm::persist::stream::Feed> {
    use std::os::fd::FromRawFd;
    let first_free = i64::from(FIRST_HANDED_FD) + i64::from(listen_fds);
    if i64::from(raw) < first_free {
        bail!("--feed-fd: fd {raw} is not one handed down after the listen fds ({first_free} or above)");
    }
    // SAFETY: fcntl(F_GETFD) only asks whether `raw` is open.
    if unsafe { libc::fcntl(raw, libc::F_GETFD) } < 0 {
        bail!("--feed-fd: fd {raw} is not open");
    }
    // SAFETY: `raw` is open and was handed to this process to own; nothing else here uses
    // it (the listen fds are others: a worker passes the feed after them).
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
    rustix::io::fcntl_setfd(&fd, rustix::io::FdFlags::CLOEXEC)?;
    if rustix::net::sockopt::socket_type(&fd).ok() != Some(rustix::net::SocketType::STREAM) {
        bail!("--feed-fd: fd {raw} is not a stream socket");
    }
    for id in ids {
        picocenter_snapshots::store::check_id(id).context("--fed")?;
    }
    Ok(picocenter_vmm::persist::stream::Feed {
        socket: std::sync::Arc::new(std::os::unix::net::UnixStream::from(fd)),
        ids: ids.to_vec(),
    })
}

/// Runs `snapshot restore`.
pub fn restore(args: RestoreArgs) -> anyhow::Result<i32> {
    picocenter_vmm::heap::use_one_arena();
    let state = args.state.state_dir();
    let key = args.key.load(state)?;
    let store = LocalStore::open(&args.dir)?;
    let id = match &args.id {
        Some(id) => id.clone(),
        None => store
            .head()?
            .with_context(|| format!("no snapshot in {}", args.dir.display()))?,
    };
    // Authenticated and bounds-checked: only then are its values defaults.
    let manifest = store.manifest(&id, &key)?;
    tracing::trace!("restore: manifest read and checked");
    let (mut config, root, temporary_dirs) = configure(&args, &manifest, key)?;
    tracing::debug!(id, "restore: configured from the manifest");
    let feed = match args.feed_fd {
        Some(raw) if args.mode != RestoreMode::Stream => {
            bail!("--feed-fd {raw} needs --mode stream")
        }
        Some(raw) => Some(feed(raw, &args.fed, args.listen_fds)?),
        None => None,
    };
    let options = RestoreOptions {
        mode: args.mode,
        relearn: args.relearn,
        first_port: args.first_port,
        feed,
        lockdown: None,
    };
    // The app goes on snapshotting into the store it came from.
    claim_name(&mut config, state, true, Some(store.dir().to_path_buf()))?;
    tracing::trace!("restore: name claimed");
    let mut temporary = Vec::new();
    if let Some(temp) = match &root {
        Root::FromProgram(root, _) => root.temporary.as_ref(),
        _ => None,
    } {
        temporary.push(temp.path());
    }
    temporary.extend(temporary_dirs.iter().map(|dir| dir.path()));
    run_in_jail(
        config,
        state,
        &temporary,
        args.timeout,
        |config, lockdown| {
            // The app's other processes, if it has any, are locked down as this one is.
            let options = RestoreOptions {
                lockdown: Some(lockdown.clone()),
                ..options
            };
            let picoprocess = Picoprocess::restore(config, &store, &id, &options)?;
            if args.digest {
                print_restored_digest(&picoprocess)?;
            }
            Ok(picoprocess)
        },
    )
}

/// Prints the digest of a restored app's memory before it runs, flushed at once so that
/// whoever reads it can act while the app runs.
fn print_restored_digest(picoprocess: &Picoprocess) -> Result<(), picocenter_vmm::VmmError> {
    use std::io::Write;
    let (pages, digest) =
        picoprocess
            .memory_digest()
            .map_err(|errno| picocenter_vmm::VmmError::Host {
                what: "the restored memory's digest",
                source: errno.into(),
            })?;
    let mut out = std::io::stdout().lock();
    // A reader that went away does not stop the app.
    let digest = format!("{digest:016x}");
    let line = super::snapshot::digest_line(picoprocess.name(), &digest, &pages, "restored");
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
    Ok(())
}
