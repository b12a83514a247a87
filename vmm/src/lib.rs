//! One picoprocess: an unmodified Linux x86-64 program in a kernel-less KVM guest, whose
//! system calls the VMM performs.
//!
//! The guest has no kernel. The app runs in ring 3 on page tables the VMM writes; its
//! `syscall` instruction jumps to a one-instruction doorbell that exits to the VMM
//! (see `picocenter_guest_shim::abi`), and the VMM implements the Linux ABI on its behalf
//! ([`syscalls`]), inside a file sandbox ([`sandbox`]).
//!
//! ```text
//! Picoprocess::new ── memory (slots, page tables, VMAs) ── kvm (VM, vCPU, system pages)
//!                  └─ loader (ELF, interpreter, stack)   └─ process (fds, cwd, signals)
//! Picoprocess::run ── exit (the run loop) ── syscalls/{fs,mem,time,process,signal}
//! ```

pub mod activeset;
pub mod alarm;
mod builder;
pub mod control;
pub mod doorbell;
pub mod fdtable;
pub mod heap;
pub mod hostcall;
pub mod kernel;
pub mod kvm;
pub mod loader;
pub mod mailbox;
pub mod memory;
pub mod panics;
pub mod persist;
pub mod platform;
pub mod report;
pub mod run;
pub mod sandbox;
pub mod spare;
pub mod stats_page;
pub mod syscalls;
pub mod timeout;
pub mod trace;
pub mod vdso;

use kvm::cpu::{self, CpuSetupError};
use kvm::kick::Kicker;
use kvm::system::SystemPagesError;
use kvm::vcpu::{Vcpu, VcpuError};
use kvm::{KvmError, Machine};
use memory::paging::PagingError;
use memory::phys::PhysError;
use platform::Platform;
use sandbox::SandboxError;
use std::path::PathBuf;
use std::sync::Arc;

pub use run::RunOutcome;

/// What to run and how.
#[derive(Debug, Clone)]
pub struct Config {
    /// The program's path inside the root.
    pub program: String,
    /// argv (argv[0] included).
    pub argv: Vec<String>,
    /// The environment, as `K=V`.
    pub env: Vec<String>,
    /// The host directory that is the app's read-only root.
    pub root: PathBuf,
    /// Further read-only host directories and the guest paths they appear at (over
    /// the root, and over writable directories).
    pub readonly: Vec<(String, PathBuf)>,
    /// Writable host directories and the guest paths they appear at.
    pub writable: Vec<(String, PathBuf)>,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// Initial working directory (guest path).
    pub cwd: String,
    /// The app's name.
    pub name: String,
    /// Whether to count and time every syscall.
    pub trace_syscalls: bool,
    /// The app's own IP address: binds to INADDR_ANY (or in6addr_any) are rewritten to it,
    /// and binds to any other address are refused.
    pub address: std::net::IpAddr,
    /// Whether the app may open outbound connections to other hosts.
    pub allow_outbound: bool,
    /// Sockets handed down for a restore (see `syscalls::net::restore_socket`).
    pub inherited_sockets: Vec<std::sync::Arc<std::os::fd::OwnedFd>>,
    /// The control socket (`picocenter stop`, `ps`, snapshots), if the app has one.
    pub control: Option<control::Control>,
    /// Whether forwarded syscalls may go through the shared-memory mailbox while a poller
    /// thread is awake (see [`mailbox`]).
    pub mailbox: bool,
    /// The most vCPUs the app may have: each thread runs on one of its own while there
    /// are (see [`run::cpus`]); 1 puts every thread on the first.
    pub vcpus: usize,
    /// Whether the doorbell may answer time calls from the time page (otherwise they exit,
    /// which benchmarks use to measure the difference).
    pub doorbell_time: bool,
    /// Whether files of the read-only root that the app keeps reading get windows, so
    /// that the doorbell answers their pread64 and fstat (see [`kernel::windows`]).
    pub guest_reads: bool,
    /// The image the app comes from, if any (recorded in snapshots).
    pub image: Option<String>,
    /// The host program the (temporary) root was made from, if it was (recorded in
    /// snapshots, so a restore can make the root again).
    pub root_from: Option<String>,
    /// The cluster's snapshot key: snapshots of this app are authenticated with it, and a
    /// restore reads only manifests that check out under it. Without one, the app cannot
    /// be snapshotted or restored.
    pub snapshot_key: Option<picocenter_snapshots::SnapshotKey>,
}

/// Why a picoprocess could not be built or run. Guest misbehaviour is never one of these:
/// it ends the app with a [`RunOutcome`] instead.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// Guest memory could not be set up.
    #[error("setting up guest memory")]
    Memory(#[from] PhysError),
    /// The page tables could not be created.
    #[error("creating page tables")]
    Paging(#[from] PagingError),
    /// KVM refused something.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// The vCPU could not be configured.
    #[error("configuring the vCPU")]
    Cpu(#[from] CpuSetupError),
    /// The system pages could not be installed.
    #[error(transparent)]
    SystemPages(#[from] SystemPagesError),
    /// A vCPU operation failed while running.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// A VMM thread panicked (a bug in the VMM): the run ended, with this report.
    #[error("a VMM thread panicked: {0}")]
    Panicked(String),
    /// The app could not be brought out of the doorbell to a clean point.
    #[error("bringing the app to a clean point")]
    CleanPoint(#[from] doorbell::CleanPointError),
    /// The sandbox could not be set up.
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    /// The program could not be loaded.
    #[error(transparent)]
    Load(#[from] loader::LoadError),
    /// A restore failed.
    #[error("restoring the snapshot")]
    Restore(#[source] persist::PersistError),
    /// The control socket could not be opened.
    #[error(transparent)]
    Control(#[from] control::ControlError),
    /// The kick handler or stdio could not be set up.
    #[error("setting up {what}")]
    Host {
        /// What.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A picoprocess, ready to run on the thread that created it.
#[derive(Debug)]
pub struct Picoprocess {
    // Field order is drop order: the vCPU and VM go before the memory they map.
    vcpu: Vcpu,
    machine: Arc<Machine>,
    /// The mailbox poller, which every vCPU's host thread holds too.
    poller: Option<Arc<mailbox::Poller>>,
    doorbell: doorbell::Doorbell,
    process: kernel::process::SharedProcess,
    stats: run::ExitStats,
    live: Arc<control::LiveStats>,
    ops: Arc<control::PendingOps>,
    name: String,
    control: Option<control::ControlServer>,
    /// What the app's vCPUs share (see [`run::cpus`]).
    cpus: Arc<run::cpus::CpuShared>,
    /// The invalidations of translations the first vCPU has caught up with.
    seen_invalidations: u64,
}

impl Picoprocess {
    /// Builds a picoprocess for `config`: memory, VM, vCPU, the program and its stack.
    /// Must be called on the thread that will call [`Picoprocess::run`].
    pub fn new(config: &Config) -> Result<Self, VmmError> {
        let (parts, mut space, sandbox) = builder::prepare(config)?;
        let hwcap = parts
            .cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == 1)
            .map_or(0, |e| e.edx as u64);
        let start = loader::load(
            &mut space,
            &sandbox,
            &loader::ExecInfo {
                argv: &config.argv,
                envp: &config.env,
                path: &config.program,
                hwcap,
                credentials: &Default::default(),
            },
        )?;
        // Nothing has run yet, so no translation can be stale.
        space.invalidated();
        let vcpu_fd = parts.machine.create_vcpu()?;
        cpu::configure(
            &vcpu_fd,
            &parts.cpuid,
            parts.features,
            kvm::system::cpu_root(&space, memory::layout::FIRST_CPU)?,
            start.entry,
            start.rsp,
        )?;
        let mut process = builder::process(config, &parts, space, sandbox, &vcpu_fd)?;
        syscalls::fs::install_stdio(&mut process).map_err(|e| VmmError::Host {
            what: "the app's stdio",
            source: e.into(),
        })?;
        builder::finish(config, parts, vcpu_fd, process)
    }

    /// A handle that can interrupt this picoprocess from another thread.
    pub fn kicker(&self) -> Kicker {
        kernel::process::lock(&self.process).kicker.clone()
    }

    /// The app's name (unique among the running apps of this host).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The platform the VMM detected.
    pub fn platform(&self) -> Platform {
        self.vcpu.platform()
    }

    /// The syscall trace, when tracing was asked for.
    pub fn trace(&self) -> Option<trace::SyscallTrace> {
        kernel::process::lock(&self.process).trace.clone()
    }

    /// Calls answered through the mailbox.
    pub fn mailbox_calls(&self) -> u64 {
        self.poller.as_ref().map_or(0, |p| p.calls())
    }

    /// Shootdowns that kicked another vCPU out of its guest.
    pub fn shootdowns(&self) -> u64 {
        self.cpus
            .shootdowns
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Transfers between files and app memory made without the process lock.
    pub fn unlocked_transfers(&self) -> u64 {
        self.cpus
            .unlocked_transfers
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Of [`Picoprocess::mailbox_calls`], those made on vCPUs other than the first.
    pub fn mailbox_calls_from_other_vcpus(&self) -> u64 {
        self.poller.as_ref().map_or(0, |p| p.calls_elsewhere())
    }

    /// Exit counters.
    pub fn stats(&self) -> run::ExitStats {
        self.stats
    }

    /// Memory counters.
    pub fn memory_stats(&self) -> memory::space::MemoryStats {
        kernel::process::lock(&self.process).mem.stats()
    }

    /// A digest of the app's memory now: (non-zero pages, digest), as the control
    /// socket's `{"op":"digest"}` and `snapshot create --digest` give it. Before the first
    /// run of a restored app it is the snapshot's memory exactly, which nothing else can
    /// observe (the app moves on as soon as it runs).
    pub fn memory_digest(&self) -> Result<(u64, u64), rustix::io::Errno> {
        kernel::process::lock(&self.process).mem.digest()
    }
}
