//! Command-line definitions and dispatch.

mod address;
mod cluster;
mod image;
mod jail;
mod key;
mod program_root;
mod ps;
mod restore;
mod run;
mod snapshot;
mod spare;
mod stop;

use clap::{Parser, Subcommand};

/// Picocenter hosts long-lived, mostly-idle Linux apps in picoprocesses: tiny KVM guests
/// with no guest kernel, whose system calls the host performs.
#[derive(Debug, Parser)]
#[command(name = "picocenter", version, about, long_about = None)]
pub struct Cli {
    /// More logging (-v: debug, -vv: trace; the default is warnings, and what happens to
    /// apps for `hub` and `worker`). RUST_LOG overrides it.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,

    /// How log lines look on stderr: `text` for people, `json` (one object a line, with
    /// its fields and spans) for a log collector. The VMMs a worker starts log JSON too
    /// when it is set through the environment.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true, env = "PICOCENTER_LOG_FORMAT")]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a Linux x86-64 program in a picoprocess.
    ///
    /// The program's output appears on this command's stdout and stderr, and its exit
    /// status becomes this command's. An app killed by a signal (a segmentation fault, say)
    /// exits with 128 + the signal number; one stopped by --timeout exits with 124.
    Run(run::RunArgs),
    /// Build app images from their definitions (image.toml), and list the built images.
    Image(image::ImageArgs),
    /// Stop a running app: SIGTERM, then SIGKILL after a grace period.
    Stop(stop::StopArgs),
    /// List the running apps of this host, with their memory.
    Ps(ps::PsArgs),
    /// Snapshot a running app, bring one back, inspect or compact snapshots.
    Snapshot(snapshot::SnapshotArgs),
    /// Run the hub: the authoritative DNS server for the apps' zone, the app registry and
    /// the HTTP API. A query for a swapped-out app brings it back on a worker.
    Hub(cluster::HubArgs),
    /// Run a worker: it runs apps for the hub, swaps idle ones out to cold storage (a
    /// local directory or S3) and restores them when the hub orders it.
    Worker(cluster::WorkerArgs),
    /// Register, remove, list and inspect apps on the hub.
    App(cluster::AppArgs),
    /// A hub and a worker in one process with the sample apps registered: query their
    /// names, watch them swap out when idle and come back on the next query.
    Demo(cluster::DemoArgs),
    /// A VMM started ahead of need by a worker (its warm pool): it makes its KVM VM and
    /// vCPU, then waits on fd 3 for the `run` or `snapshot restore` it is to become, with
    /// the fds that command is handed. Only a worker starts it.
    #[command(hide = true)]
    Spare(spare::SpareArgs),
}

/// The format of log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object a line.
    Json,
}

impl Cli {
    /// Whether the command is a long-running service, whose operators want to see what
    /// it does with apps (info) by default.
    pub fn is_service(&self) -> bool {
        matches!(self.command, Command::Hub(_) | Command::Worker(_))
    }
}

/// Sets up tracing to stderr: warnings by default, info for a service.
pub fn init_logging(verbose: u8, format: LogFormat, service: bool) {
    let default = match verbose {
        // Its own crates only: hickory logs every query at info.
        0 if service => "warn,picocenter=info,picocenter_hub=info",
        0 => "warn",
        1 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colours for a terminal only: not in a log file or the journal.
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(terminal)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => subscriber.with_target(false).init(),
        LogFormat::Json => subscriber.json().with_current_span(true).init(),
    }
}

/// Runs a parsed command and returns the process exit status.
pub fn dispatch(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Run(args) => run::run(args),
        Command::Image(args) => image::image(args),
        Command::Stop(args) => stop::stop(args),
        Command::Ps(args) => ps::ps(args),
        Command::Snapshot(args) => snapshot::snapshot(args),
        Command::Hub(args) => cluster::hub(args),
        Command::Worker(args) => cluster::worker(args),
        Command::App(args) => cluster::app(args),
        Command::Demo(args) => cluster::demo(args),
        Command::Spare(args) => spare::spare(args),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
