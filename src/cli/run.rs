//! `picocenter run`.

use super::image::StateDir;
use super::key::KeyFile;
use super::program_root::{program_root, ProgramRoot};
use anyhow::{bail, Context};
use picocenter_images::BuiltImage;
use picocenter_snapshots::names::{app_name_from, validate_app_name, validate_guest_dir};
use picocenter_vmm::kvm::kick::reason;
use picocenter_vmm::sandbox::supervise::Lockdown;
pub(super) use picocenter_vmm::sandbox::SHARED_MEMORY_DIR;
use picocenter_vmm::{Config, Picoprocess, RunOutcome};
use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use std::net::IpAddr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Arguments of `picocenter run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The app's root directory: PROGRAM and every path it opens are looked up inside it,
    /// read-only. Without it (or --image), a root is made holding PROGRAM (a host path)
    /// and its shared-library closure, and kept in <state-dir>/roots for its next run
    /// until one of those files changes; a PROGRAM right in a writable directory (such as
    /// /tmp/prog) is copied into it, which stays writable.
    #[arg(long, value_name = "DIR")]
    pub root: Option<PathBuf>,

    /// Run a built image (see `picocenter image build`): its root filesystem, entrypoint,
    /// environment, working directory, memory, writable directories and address are the
    /// defaults, and the options here override them. PROGRAM, if given, replaces the
    /// image's entrypoint (a path inside the image).
    #[arg(long, value_name = "NAME", conflicts_with = "root")]
    pub image: Option<String>,

    #[command(flatten)]
    pub state: StateDir,

    #[command(flatten)]
    pub key: KeyFile,

    /// The app's settings; boxed, as they are most of these arguments.
    #[command(flatten)]
    pub app: Box<AppSettings>,

    /// The directory the app's snapshots go to (`picocenter snapshot create`); the app's
    /// VMM writes nowhere else. Default: <state>/snapshots/<name>.
    #[arg(long, value_name = "DIR")]
    pub store: Option<PathBuf>,

    /// Stop the app after this many seconds (exit status 124).
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<f64>,

    /// Count and time every syscall, and print a summary like `strace -c` on exit. Calls
    /// answered inside the guest (getpid, clock_gettime, ...) never reach the VMM and are
    /// not counted.
    #[arg(long)]
    pub trace_syscalls: bool,

    /// Make every forwarded syscall a VM exit. By default, while calls come in bursts, a
    /// VMM poller thread answers them through a shared-memory mailbox with no exit (it
    /// sleeps after 50 us without a call, so an idle app costs no CPU); see BENCHMARKS.md.
    #[arg(long)]
    pub no_mailbox: bool,

    /// The most vCPUs the app may have, and the CPUs it is shown: while it has fewer
    /// threads, each runs on a vCPU of its own, in parallel with the others; beyond that,
    /// threads share the first vCPU, which switches among them every 10 ms. 1 runs every
    /// thread on one vCPU. [default: the host's CPUs, at most 64]
    #[arg(long, value_name = "N", env = "PICOCENTER_VCPUS", value_parser = clap::value_parser!(u16).range(1..=64))]
    pub vcpus: Option<u16>,

    /// Make time calls exit to the VMM instead of being answered in the guest (for
    /// measuring what that saves).
    #[arg(long, hide = true)]
    pub no_doorbell_time: bool,

    /// Make pread64 and fstat of files of the read-only root always go to the VMM,
    /// instead of being answered in the guest from a window onto the file (for measuring
    /// what that saves).
    #[arg(long, hide = true)]
    pub no_guest_reads: bool,

    /// The program to run: a path inside --root or the image, or a host path without
    /// either. Optional with --image.
    #[arg(required_unless_present = "image")]
    pub program: Option<String>,

    /// Arguments passed to the program.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

/// The app's settings, which override an image's.
#[derive(Debug, clap::Args)]
pub struct AppSettings {
    /// Guest RAM in MiB (a multiple of 2). Default: the image's, else 256.
    #[arg(long, value_name = "MIB")]
    pub memory: Option<u64>,

    /// Set an environment variable for the app (repeatable). The app's environment holds
    /// only these, the image's, and PATH and HOME defaults.
    #[arg(long = "env", value_name = "K=V")]
    pub env: Vec<String>,

    /// Read environment variables from FILE, one K=V a line (blank lines and lines
    /// starting with # are skipped), before the --env settings. Secrets belong here:
    /// unlike --env, a file does not show them on the command line to other users.
    #[arg(long, value_name = "FILE")]
    pub env_file: Option<PathBuf>,

    /// The app's initial working directory, inside its root. Default: the image's, else /.
    #[arg(long, value_name = "DIR")]
    pub cwd: Option<String>,

    /// The app's name, for logs and its hostname: 1 to 64 of A-Z, a-z, 0-9, '.', '_' and
    /// '-'. Default: the image's, else PROGRAM's file name (other characters become '-').
    #[arg(long)]
    pub name: Option<String>,

    /// Make a guest directory writable (repeatable). It is backed by a directory of its
    /// own under --data-dir; everything else in the root is read-only. Default: /tmp, or
    /// an image's writable directories (which these add to). /dev/shm is always writable,
    /// as its tmpfs is on Linux, for POSIX shared memory and named semaphores. A fresh
    /// backing directory starts empty, or with a copy of what the image holds at that path.
    #[arg(long, value_name = "GUEST_DIR")]
    pub writable: Vec<String>,

    /// Where the writable directories live on the host. Without it, a temporary directory
    /// is used and removed when the app ends.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// The app's IP address (such as 127.0.0.2): its binds to 0.0.0.0 are rewritten to it
    /// and binds to other addresses refused. Default: the image's, else a free one from
    /// 127.100.0.0/16 (printed in the log, and shown by `picocenter ps`). Never the
    /// host's own 127.0.0.1 unless given here.
    #[arg(long, value_name = "IP")]
    pub address: Option<IpAddr>,

    /// Let the app open outbound connections to other hosts (refused by default).
    #[arg(long)]
    pub allow_outbound: bool,
}

/// What to run, resolved from the arguments and the image.
struct App {
    /// The root made from a host program (kept in use, or removed, until the app ends).
    _temp_root: Option<ProgramRoot>,
    root: PathBuf,
    /// Read-only mounts besides the root: (guest directory, host directory).
    readonly: Vec<(String, PathBuf)>,
    program: String,
    argv: Vec<String>,
    env: Vec<String>,
    cwd: String,
    memory: u64,
    writable: Vec<String>,
    address: Option<IpAddr>,
    name: String,
    image: Option<BuiltImage>,
    /// The host program the root was made from.
    root_from: Option<String>,
}

impl App {
    /// The app of a built image, with the arguments' overrides.
    fn from_image(args: &RunArgs, name: &str) -> anyhow::Result<Self> {
        let image = picocenter_images::load(args.state.state_dir(), name)?;
        let run = image.meta.run.clone();
        let argv = match &args.program {
            Some(program) => command_line(program, &args.args),
            None => run.argv.iter().chain(&args.args).cloned().collect(),
        };
        let mut writable = run.writable.clone();
        writable.extend(args.app.writable.iter().cloned());
        let writable = with_shared_memory_dir(writable);
        Ok(Self {
            _temp_root: None,
            root: image.rootfs.clone(),
            readonly: Vec::new(),
            program: argv[0].clone(),
            argv,
            env: run.env,
            cwd: args.app.cwd.clone().unwrap_or(run.cwd),
            memory: args.app.memory.unwrap_or(run.memory_mib),
            writable,
            address: args.app.address.or(run.address.map(IpAddr::V4)),
            name: args
                .app
                .name
                .clone()
                .unwrap_or_else(|| image.meta.name.clone()),
            image: Some(image),
            root_from: None,
        })
    }

    /// A program in --root, or a host program in a temporary root.
    fn from_program(args: &RunArgs, program: &str) -> anyhow::Result<Self> {
        let writable = with_shared_memory_dir(if args.app.writable.is_empty() {
            vec!["/tmp".to_string()]
        } else {
            args.app.writable.clone()
        });
        let (temp_root, root, guest_program, readonly) = match &args.root {
            Some(root) => (None, root.clone(), program.to_string(), Vec::new()),
            None => {
                let temp = program_root(args.state.state_dir(), Path::new(program), &writable)?;
                let path = temp.dir.clone();
                let (guest, mounts) = (temp.program.clone(), temp.mounts.clone());
                (Some(temp), path, guest, mounts)
            }
        };
        let root_from = match args.root {
            Some(_) => None,
            None => Some(std::path::absolute(program)?.display().to_string()),
        };
        let name = Path::new(program)
            .file_name()
            .map(|n| app_name_from(&n.to_string_lossy()))
            .unwrap_or_else(|| "app".into());
        Ok(Self {
            _temp_root: temp_root,
            root,
            argv: command_line(&guest_program, &args.args),
            program: guest_program,
            readonly,
            env: Vec::new(),
            cwd: args.app.cwd.clone().unwrap_or_else(|| "/".into()),
            memory: args.app.memory.unwrap_or(256),
            writable,
            address: args.app.address,
            name: args.app.name.clone().unwrap_or(name),
            image: None,
            root_from,
        })
    }
}

fn command_line(program: &str, args: &[String]) -> Vec<String> {
    std::iter::once(program.to_string())
        .chain(args.iter().cloned())
        .collect()
}

/// The host directory backing guest directory `guest` (validated) under `data_dir`, made
/// where missing, with no symlink on the way below `data_dir`: an app sharing the data
/// directory could have made one, to lead this root-run code, the jail's bind and its
/// chown to a host directory of its choice. Returns its path and an fd (O_PATH) of it.
pub(super) fn backing_dir(data_dir: &Path, guest: &str) -> anyhow::Result<(PathBuf, OwnedFd)> {
    let opening = |path: &Path| format!("opening {}", path.display());
    // The data directory itself is the operator's (made if missing, as before).
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let mut dir = rustix::fs::open(
        data_dir,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .with_context(|| opening(data_dir))?;
    let mut path = data_dir.to_path_buf();
    for part in guest.split('/').filter(|part| !part.is_empty()) {
        if part == "." || part == ".." {
            bail!("{guest}: not a plain guest directory");
        }
        path.push(part);
        match rustix::fs::mkdirat(&dir, part, Mode::from_raw_mode(0o755)) {
            Ok(()) | Err(Errno::EXIST) => {}
            Err(e) => return Err(e).with_context(|| format!("creating {}", path.display())),
        }
        // O_PATH with O_NOFOLLOW would open a symlink itself; O_DIRECTORY then refuses it.
        dir = match rustix::fs::openat(
            &dir,
            part,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(dir) => dir,
            Err(Errno::NOTDIR | Errno::LOOP) => bail!(
                "refusing {}: it is a symlink or not a directory (an app sharing the data \
                 directory may have made it)",
                path.display()
            ),
            Err(e) => return Err(e).with_context(|| opening(&path)),
        };
    }
    Ok((path, dir))
}

/// The host directory behind writable guest directory `guest`: under the data directory
/// ([`backing_dir`]), except /dev/shm, which is a fresh directory of this run that
/// `private` keeps until the app ends. On Linux /dev/shm is a tmpfs: private to the
/// machine, and empty at each start; apps that share a data directory must not share
/// their shared memory and semaphores, nor find those of a run before.
pub(super) fn writable_host_dir(
    data_dir: &Path,
    guest: &str,
    private: &mut Vec<tempfile::TempDir>,
) -> anyhow::Result<PathBuf> {
    if guest == SHARED_MEMORY_DIR {
        let dir = tempfile::Builder::new()
            .prefix("picocenter-shm-")
            .tempdir()
            .context("creating the app's /dev/shm")?;
        let host = dir.path().to_path_buf();
        private.push(dir);
        return Ok(host);
    }
    Ok(backing_dir(data_dir, guest)?.0)
}

/// The writable directories as (guest path, host path), each backed by a directory under
/// `data_dir` (but /dev/shm, see [`writable_host_dir`], kept by `private`); a fresh one gets
/// a copy of what the image holds at that path.
fn writable_dirs(
    app: &App,
    data_dir: &Path,
    private: &mut Vec<tempfile::TempDir>,
) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let mut writable = Vec::new();
    for guest in &app.writable {
        // One plain spelling each, and each once: snapshots record the set.
        let guest = &validate_guest_dir(guest)?;
        if writable.iter().any(|(g, _)| g == guest) {
            continue;
        }
        let fresh = !data_dir.join(guest.trim_start_matches('/')).exists();
        let host = writable_host_dir(data_dir, guest, private)?;
        if let (true, Some(image)) = (fresh, &app.image) {
            image
                .seed_writable(guest, &host)
                .with_context(|| format!("filling {} from the image", host.display()))?;
        }
        writable.push((guest.clone(), host));
    }
    Ok(writable)
}

/// The environment settings: those of --env-file, then those of --env.
fn settings_env(settings: &AppSettings) -> anyhow::Result<Vec<String>> {
    let mut env = Vec::new();
    if let Some(file) = &settings.env_file {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("reading --env-file {}", file.display()))?;
        env.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_string),
        );
    }
    env.extend(settings.env.iter().cloned());
    Ok(env)
}

/// PATH and HOME defaults, then `base` (the image's), then the --env settings.
fn environment(base: &[String], settings: &[String]) -> anyhow::Result<Vec<String>> {
    let mut env = vec![
        "PATH=/usr/local/bin:/usr/bin:/bin".to_string(),
        "HOME=/".to_string(),
    ];
    for var in base.iter().chain(settings) {
        if !var.contains('=') {
            bail!("--env {var}: expected K=V");
        }
        let key = var.split('=').next().unwrap_or_default();
        env.retain(|e| e.split('=').next() != Some(key));
        env.push(var.clone());
    }
    Ok(env)
}

/// The control socket of app `name` in `run_dir`, once the name is checked: it must not
/// lead anywhere else.
pub(super) fn control_socket(run_dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    validate_app_name(name)?;
    Ok(run_dir.join(format!("{name}.sock")))
}

/// Claims the app's name in `<state>/run` and sets up its control socket and its
/// snapshot store (`store`, else `<state>/snapshots/<name>`). A name the user chose must
/// be free; a default one gets a numeric suffix when taken.
pub(super) fn claim_name(
    config: &mut Config,
    state_dir: &Path,
    explicit_name: bool,
    store: Option<PathBuf>,
) -> anyhow::Result<()> {
    use picocenter_vmm::control::{Control, ControlError, NameLease};
    let run_dir = state_dir.join("run");
    let base = config.name.clone();
    let mut attempt = 1;
    let lease = loop {
        let name = if attempt == 1 {
            base.clone()
        } else {
            format!("{base}-{attempt}")
        };
        // The name becomes the control socket's and the store's file names.
        validate_app_name(&name)?;
        match NameLease::take(&run_dir, &name) {
            Err(ControlError::NameInUse(_)) if !explicit_name && attempt < 1000 => attempt += 1,
            other => break other.with_context(|| format!("starting {name}"))?,
        }
    };
    config.name = lease.name.clone();
    let store = match store {
        Some(store) => store,
        None => state_dir.join("snapshots").join(&config.name),
    };
    picocenter_vmm::control::private_dir(&store)
        .with_context(|| format!("creating the snapshot store {}", store.display()))?;
    config.control = Some(Control {
        lease,
        address: config.address,
        store: Some(store),
    });
    Ok(())
}

/// Runs `build` in the app's jail (see `jail`), then the app, and returns its status.
pub(super) fn run_in_jail(
    config: Config,
    state_dir: &Path,
    temporary: &[&Path],
    timeout: Option<f64>,
    build: impl FnOnce(&Config, &Lockdown) -> Result<Picoprocess, picocenter_vmm::VmmError>,
) -> anyhow::Result<i32> {
    let mut plan = super::jail::Plan::for_config(state_dir, &config);
    for dir in temporary {
        plan.remove_after(dir);
    }
    // The jailed VMM may not remove its own control socket.
    if let Some(control) = &config.control {
        plan.remove_after(&control.lease.socket);
        plan.remove_after(&control.lease.socket.with_extension("stats"));
        plan.hold(&control.lease);
    }
    if let Some(store) = config.control.as_ref().and_then(|c| c.store.as_ref()) {
        plan.writable(store);
    }
    super::jail::run_jailed(plan, move |lockdown| {
        let picoprocess =
            build(&config, lockdown).with_context(|| format!("starting {}", config.name))?;
        lockdown.now()?;
        execute(picoprocess, timeout)
    })
}

/// A data directory: the one given, or a temporary one removed when the app ends.
pub(super) fn data_dir(
    given: Option<&PathBuf>,
) -> anyhow::Result<(Option<tempfile::TempDir>, PathBuf)> {
    Ok(match given {
        Some(dir) => (None, dir.clone()),
        None => {
            let temp = tempfile::Builder::new()
                .prefix("picocenter-data-")
                .tempdir()
                .context("creating a temporary data directory")?;
            let path = temp.path().to_path_buf();
            (Some(temp), path)
        }
    })
}

/// Runs a built picoprocess to its end and returns the exit status: signals forwarded, the
/// time limit enforced, the outcome reported.
pub(super) fn execute(mut picoprocess: Picoprocess, timeout: Option<f64>) -> anyhow::Result<i32> {
    let name = picoprocess.name().to_string();
    picocenter_vmm::kvm::kick::forward_host_signals(&picoprocess.kicker())
        .context("forwarding signals to the app")?;
    tracing::debug!(
        platform = picoprocess.platform().describe(),
        "running {name}"
    );
    if let Some(secs) = timeout {
        let kicker = picoprocess.kicker();
        let limit = Duration::try_from_secs_f64(secs).context("--timeout must be positive")?;
        std::thread::spawn(move || {
            std::thread::sleep(limit);
            kicker.kick(reason::TIMEOUT);
        });
    }
    let outcome = picoprocess.run().context("running the app")?;
    tracing::debug!(
        exits = ?picoprocess.stats(),
        memory = ?picoprocess.memory_stats(),
        mailbox_calls = picoprocess.mailbox_calls(),
        mailbox_calls_from_other_vcpus = picoprocess.mailbox_calls_from_other_vcpus(),
        unlocked_transfers = picoprocess.unlocked_transfers(),
        shootdowns = picoprocess.shootdowns(),
        "{name} ended"
    );
    if let Some(trace) = picoprocess.trace() {
        eprint!("{}", trace.summary());
    }
    match &outcome {
        RunOutcome::Exited(_) => {}
        RunOutcome::Killed { signal, report } => {
            eprintln!("picocenter: {name}: killed by signal {signal}: {report}");
        }
        RunOutcome::TimedOut => {
            eprintln!("picocenter: {name}: stopped after the --timeout");
        }
        RunOutcome::Snapshotted(id) => {
            eprintln!("picocenter: {name}: snapshotted as {id} and stopped");
        }
    }
    Ok(outcome.exit_status())
}

/// The snapshot key the app's snapshots are authenticated with. An app still runs without
/// one (a user who may not write the state directory, say); it cannot be snapshotted then.
fn snapshot_key(args: &RunArgs) -> Option<picocenter_snapshots::SnapshotKey> {
    match args.key.load_or_create(args.state.state_dir()) {
        Ok(key) => Some(key),
        Err(e) => {
            tracing::warn!("{e:#}: the app cannot be snapshotted");
            None
        }
    }
}

/// Runs the app and returns the exit status.
pub fn run(args: RunArgs) -> anyhow::Result<i32> {
    picocenter_vmm::heap::use_one_arena();
    tracing::trace!("run: arguments parsed");
    let app = match (&args.image, &args.program) {
        (Some(image), _) => App::from_image(&args, image)?,
        (None, Some(program)) => App::from_program(&args, program)?,
        (None, None) => bail!("give a PROGRAM to run, or --image"),
    };
    tracing::trace!("run: root ready");
    if app.memory == 0 || !app.memory.is_multiple_of(2) {
        bail!("--memory must be a positive, even number of MiB");
    }
    if !app.root.is_dir() {
        bail!("--root {} is not a directory", app.root.display());
    }
    let (_temp_data, data_dir) = data_dir(args.app.data_dir.as_ref())?;
    // The app's IPv6 address is reachable once its prefix is routed to loopback (as root).
    if let Err(e) = picocenter_vmm::sandbox::loopback6::route_app_prefix() {
        tracing::debug!("{e:#}");
    }
    let mut _lease = None;
    let address = match app.address {
        Some(address) => address,
        None => {
            let lease = super::address::lease(args.state.state_dir())?;
            let address = IpAddr::V4(lease.value);
            _lease = Some(lease);
            address
        }
    };
    let mut private_dirs = Vec::new();
    let writable = writable_dirs(&app, &data_dir, &mut private_dirs)?;
    if let Some(temp) = &app._temp_root {
        temp.copy_program(&data_dir)?;
    }
    let mut config = Config {
        writable,
        env: environment(&app.env, &settings_env(&args.app)?)?,
        program: app.program,
        argv: app.argv,
        root: app.root,
        readonly: app.readonly,
        memory_mib: app.memory,
        cwd: app.cwd,
        name: app.name.clone(),
        trace_syscalls: args.trace_syscalls,
        address,
        allow_outbound: args.app.allow_outbound,
        control: None,
        inherited_sockets: Vec::new(),
        mailbox: !args.no_mailbox,
        vcpus: vcpus_or_default(args.vcpus),
        doorbell_time: !args.no_doorbell_time,
        guest_reads: !args.no_guest_reads,
        image: app.image.as_ref().map(|i| i.meta.name.clone()),
        root_from: app.root_from.clone(),
        snapshot_key: snapshot_key(&args),
    };
    let explicit_name = args.app.name.is_some() || args.image.is_some();
    let state_dir = args.state.state_dir();
    claim_name(&mut config, state_dir, explicit_name, args.store.clone())?;
    let temporary: Vec<&Path> = app
        ._temp_root
        .iter()
        .filter_map(|root| root.temporary.as_ref())
        .map(|root| root.path())
        .chain(_temp_data.iter().map(|data| data.path()))
        .chain(private_dirs.iter().map(|dir| dir.path()))
        .collect();
    run_in_jail(config, state_dir, &temporary, args.timeout, |config, _| {
        Picoprocess::new(config)
    })
}

/// The writable directories with /dev/shm among them: every Linux system has it writable
/// (a tmpfs), and glibc's shm_open and sem_open make their files there (Python's
/// multiprocessing needs them for its locks).
pub(super) fn with_shared_memory_dir(mut writable: Vec<String>) -> Vec<String> {
    if !writable
        .iter()
        .any(|dir| dir.trim_end_matches('/') == SHARED_MEMORY_DIR)
    {
        writable.push(SHARED_MEMORY_DIR.to_string());
    }
    writable
}

/// The vCPU limit asked for, or by default one per CPU of the host (at most 64).
pub fn vcpus_or_default(asked: Option<u16>) -> usize {
    asked.map_or_else(
        || std::thread::available_parallelism().map_or(1, |n| n.get().min(64)),
        usize::from,
    )
}
