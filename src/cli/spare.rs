//! `picocenter spare`: a VMM process a worker starts ahead of need (its warm pool). It
//! makes its VM, then waits for the worker to say which app it runs (see
//! `picocenter_vmm::spare`), and becomes that app's `run` or `snapshot restore`.

use anyhow::{bail, Context};
use picocenter_vmm::spare::{self, ASSIGNMENT_FD};
use std::os::fd::BorrowedFd;

/// Arguments of `picocenter spare`.
#[derive(Debug, clap::Args)]
pub struct SpareArgs {}

/// Runs a spare: VM first, then the assignment, then the app.
pub fn spare(_: SpareArgs) -> anyhow::Result<i32> {
    // SAFETY: fcntl(F_GETFD) only asks whether the fd is open.
    if unsafe { libc::fcntl(ASSIGNMENT_FD, libc::F_GETFD) } < 0 {
        bail!(
            "fd {ASSIGNMENT_FD} is not open: `picocenter spare` is started by a worker, which \
             hands it the socket its assignment comes on"
        );
    }
    // SAFETY: the fd is open (checked above) and stays open until `install`, which is
    // where this process gives it up; the borrow ends before.
    let socket = unsafe { BorrowedFd::borrow_raw(ASSIGNMENT_FD) };
    if rustix::net::sockopt::socket_type(socket).ok() != Some(rustix::net::SocketType::SEQPACKET) {
        bail!("fd {ASSIGNMENT_FD} is not the worker's assignment socket (a seqpacket socket)");
    }
    spare::reserve_handed_range(socket).context("keeping the handed-down fds free")?;
    if let Err(err) = picocenter_vmm::kvm::ahead::make() {
        // The app's own VM creation then reports what is wrong, to the app's log.
        tracing::warn!("spare: no VM made ahead: {err}");
    }
    if let Err(err) = picocenter_vmm::sandbox::seccomp::prepare() {
        tracing::warn!("spare: no seccomp filter compiled ahead: {err}");
    }
    picocenter_vmm::platform::Platform::detect();
    // The command-line parser, built ahead: building it is most of a parse (~0.3 ms).
    let mut parser = <super::Cli as clap::CommandFactory>::command();
    parser.build();
    let received = match spare::receive(socket) {
        Ok(received) => received,
        // The pool went (the worker ended, or discarded this spare): nothing to run.
        Err(spare::SpareError::Closed) => return Ok(0),
        Err(err) => return Err(err).context("waiting for an app to run"),
    };
    let assignment = spare::install(received).context("taking the handed-down fds")?;
    tracing::debug!(args = ?assignment.args, "spare: assigned");
    for (name, value) in &assignment.env {
        // Nothing but this thread runs yet (a spare starts none before its app).
        match value {
            Some(value) => std::env::set_var(name, value),
            None => std::env::remove_var(name),
        }
    }
    let matches = parser
        .try_get_matches_from_mut(
            std::iter::once("picocenter".to_string()).chain(assignment.args.iter().cloned()),
        )
        .context("the assignment's command line")?;
    let cli = <super::Cli as clap::FromArgMatches>::from_arg_matches(&matches)
        .context("the assignment's command line")?;
    tracing::trace!("spare: command line parsed");
    let runs_an_app = match &cli.command {
        super::Command::Run(_) => true,
        super::Command::Snapshot(args) => args.runs_an_app(),
        _ => false,
    };
    if !runs_an_app {
        bail!(
            "a spare becomes `run` or `snapshot restore`, not `{}`",
            assignment.args.join(" ")
        );
    }
    super::dispatch(cli)
}
