//! `picocenter run`.

use anyhow::{bail, Context};
use picocenter_vmm::kvm::kick::reason;
use picocenter_vmm::{Config, Picoprocess, RunOutcome};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Arguments of `picocenter run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The app's root directory: PROGRAM and every path it opens are looked up inside it,
    /// read-only. Without it, a fresh temporary root is made holding PROGRAM (a host path)
    /// and its shared-library closure.
    #[arg(long, value_name = "DIR")]
    pub root: Option<PathBuf>,

    /// Guest RAM in MiB (a multiple of 2).
    #[arg(long, value_name = "MIB", default_value_t = 256)]
    pub memory: u64,

    /// Set an environment variable for the app (repeatable). The app's environment holds
    /// only these plus PATH and HOME defaults.
    #[arg(long = "env", value_name = "K=V")]
    pub env: Vec<String>,

    /// The app's initial working directory, inside its root.
    #[arg(long, value_name = "DIR", default_value = "/")]
    pub cwd: String,

    /// The app's name, for logs and its hostname.
    #[arg(long)]
    pub name: Option<String>,

    /// Make a guest directory writable (repeatable). It is backed by a directory of its
    /// own under --data-dir (created empty); everything else in the root is read-only.
    #[arg(long, value_name = "GUEST_DIR", default_values_t = vec!["/tmp".to_string()])]
    pub writable: Vec<String>,

    /// Where the writable directories live on the host. Without it, a temporary directory
    /// is used and removed when the app ends.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// Stop the app after this many seconds (exit status 124).
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<f64>,

    /// Count and time every syscall, and print a summary like `strace -c` on exit.
    #[arg(long)]
    pub trace_syscalls: bool,

    /// The program to run: a path inside --root, or a host path when --root is not given.
    pub program: String,

    /// Arguments passed to the program.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

/// A fresh root holding `program` and its shared-library closure. The program keeps its
/// host path, unless that lies under a writable directory (which would hide it): then it
/// goes to /app/NAME.
fn temporary_root(
    program: &Path,
    writable: &[String],
) -> anyhow::Result<(tempfile::TempDir, String)> {
    let given = std::path::absolute(program)
        .with_context(|| format!("cannot find program {}", program.display()))?;
    let real = std::fs::canonicalize(&given)
        .with_context(|| format!("cannot find program {}", program.display()))?;
    let root = tempfile::Builder::new()
        .prefix("picocenter-root-")
        .tempdir()
        .context("creating a temporary root")?;
    let files = picocenter_images::closure::closure(&real)
        .with_context(|| format!("finding the libraries {} needs", program.display()))?;
    for file in &files[1..] {
        picocenter_images::rootfs::add_path(root.path(), file)?;
    }
    let hidden = writable.iter().any(|dir| given.starts_with(dir));
    let guest_path = if hidden {
        let name = real.file_name().context("the program has no file name")?;
        let guest_path = format!("/app/{}", name.to_string_lossy());
        let inside = root.path().join(guest_path.trim_start_matches('/'));
        std::fs::create_dir_all(inside.parent().context("program path")?)?;
        if std::fs::hard_link(&real, &inside).is_err() {
            std::fs::copy(&real, &inside)
                .with_context(|| format!("copying {} into the root", real.display()))?;
        }
        guest_path
    } else {
        picocenter_images::rootfs::add_path(root.path(), &given)?;
        given.to_string_lossy().into_owned()
    };
    Ok((root, guest_path))
}

/// Runs the app and returns the exit status.
pub fn run(args: RunArgs) -> anyhow::Result<i32> {
    if args.memory == 0 || !args.memory.is_multiple_of(2) {
        bail!("--memory must be a positive, even number of MiB");
    }
    let (_temp_root, root, program) = match &args.root {
        Some(root) => (None, root.clone(), args.program.clone()),
        None => {
            let (temp, guest) = temporary_root(Path::new(&args.program), &args.writable)?;
            let path = temp.path().to_path_buf();
            (Some(temp), path, guest)
        }
    };
    if !root.is_dir() {
        bail!("--root {} is not a directory", root.display());
    }
    let (_temp_data, data_dir) = match &args.data_dir {
        Some(dir) => (None, dir.clone()),
        None => {
            let temp = tempfile::Builder::new()
                .prefix("picocenter-data-")
                .tempdir()
                .context("creating a temporary data directory")?;
            let path = temp.path().to_path_buf();
            (Some(temp), path)
        }
    };
    let mut writable = Vec::new();
    for guest in &args.writable {
        if !guest.starts_with('/') {
            bail!("--writable {guest}: the path must be absolute");
        }
        let host = data_dir.join(guest.trim_start_matches('/'));
        std::fs::create_dir_all(&host).with_context(|| format!("creating {}", host.display()))?;
        writable.push((guest.clone(), host));
    }
    let mut env = vec![
        "PATH=/usr/local/bin:/usr/bin:/bin".to_string(),
        "HOME=/".to_string(),
    ];
    for var in &args.env {
        if !var.contains('=') {
            bail!("--env {var}: expected K=V");
        }
        let key = var.split('=').next().unwrap_or_default();
        env.retain(|e| e.split('=').next() != Some(key));
        env.push(var.clone());
    }
    let name = args.name.clone().unwrap_or_else(|| {
        Path::new(&args.program)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "app".into())
    });
    let mut argv = vec![args.program.clone()];
    argv.extend(args.args.iter().cloned());
    let config = Config {
        program,
        argv,
        env,
        root,
        writable,
        memory_mib: args.memory,
        cwd: args.cwd.clone(),
        name: name.clone(),
        trace_syscalls: args.trace_syscalls,
        address: None,
        allow_outbound: false,
    };
    let mut picoprocess =
        Picoprocess::new(&config).with_context(|| format!("starting {}", args.program))?;
    tracing::debug!(
        platform = picoprocess.platform().describe(),
        "running {name}"
    );
    if let Some(secs) = args.timeout {
        let kicker = picoprocess.kicker();
        let limit = Duration::try_from_secs_f64(secs).context("--timeout must be positive")?;
        std::thread::spawn(move || {
            std::thread::sleep(limit);
            kicker.kick(reason::TIMEOUT);
        });
    }
    let outcome = picoprocess.run().context("running the app")?;
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
    }
    Ok(outcome.exit_status())
}
