//! fork: a new process of the app is a host fork of this VMM process.
//!
//! The host kernel makes guest RAM (private anonymous memory) copy-on-write between the
//! two VMMs, and copies the fd table, so the child's files are the parent's open file
//! descriptions, as Linux has them. What the fork cannot carry over is rebuilt in the
//! child, on the one thread a fork keeps (this vCPU thread):
//!
//! * the VM and vCPU belong to the parent's address space (their ioctls fail with EIO
//!   here): a new VM is made over the same memory and a vCPU with the caller's context,
//!   and the inherited `kvm_run` page, still the parent's, is unmapped before anything
//!   writes to it;
//! * the parent's other threads (mailbox poller, timer, time slicer, control socket) do
//!   not exist here: their handles are forgotten, never dropped (a drop would wait for a
//!   thread that is not there, or remove the parent's files), and the child gets its own
//!   kicker and timer; it answers every call with an exit;
//! * the child is not the app's first process: it has no control socket or stats page,
//!   and when it ends, its VMM ends with the app process's status
//!   ([`exit_as_forked_process`]), which is what its parent's wait4 reads.
//!
//! PLATFORM.md measured this against the alternatives (a memfd and a copy stops the
//! parent for 62 ms at 64 MiB; MAP_PRIVATE of a memfd is not a snapshot).

use super::{Exits, RunOutcome};
use crate::kernel::tree::{AppTree, ChildProcess, RootWatch};
use crate::kvm::cpu;
use crate::kvm::kick::{reason, Kicker};
use crate::kvm::vcpu::Vcpu;
use crate::memory::layout::FIRST_CPU;
use crate::memory::UserAddr;
use crate::syscalls::children::ForkRequest;
use crate::VmmError;
use rustix::io::Errno;
use std::os::fd::OwnedFd;
use std::sync::Arc;

/// The child's side of a fork: what it takes from its parent's state.
struct ChildStart {
    pid: i32,
    regs: kvm_bindings::kvm_regs,
    xsave: Box<kvm_bindings::kvm_xsave>,
    fs_base: u64,
    gs_base: u64,
    vfork_done: Option<OwnedFd>,
}

/// Every signal blocked on this thread until dropped, then the old mask back.
struct SignalsBlocked(libc::sigset_t);

impl SignalsBlocked {
    fn now() -> Self {
        // SAFETY: sigset_t is plain data; the calls write only the sets we pass.
        unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old);
            Self(old)
        }
    }
}

impl Drop for SignalsBlocked {
    fn drop(&mut self) {
        // SAFETY: restores the mask saved in `now`.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.0, std::ptr::null_mut()) };
    }
}

fn host_error(what: &'static str) -> impl FnOnce(std::io::Error) -> VmmError {
    move |source| VmmError::Host { what, source }
}

impl Exits<'_, '_> {
    /// Forks the app process for `request`: the value its call returns (the child's pid
    /// in the parent, 0 in the child), or the errno the parent gets.
    pub(super) fn fork(&mut self, request: ForkRequest) -> Result<Result<u64, Errno>, VmmError> {
        let p: &mut crate::kernel::process::Process = self.p;
        // The child shares the open files, and so their offsets: the host fds keep them.
        p.windows.give_offsets_back(&p.mem);
        // A signal may have been missed; the processes must not be.
        p.reap_unwaited_children();
        if p.tree.is_none() {
            let highest = p.threads.highest_tid().max(p.thread.tid);
            match AppTree::new(p.ids, std::process::id() as i32, highest) {
                Ok(tree) => {
                    let tree = Arc::new(tree);
                    self.live.attach_processes(tree.clone().lister());
                    p.tree = Some(tree);
                    p.describe_in_tree();
                }
                Err(e) => {
                    tracing::warn!("fork: cannot map the app's process table: {e}");
                    return Ok(Err(Errno::AGAIN));
                }
            }
        }
        if p.root_watch.is_none() && !p.forked {
            match RootWatch::new() {
                Ok(watch) => p.root_watch = Some(watch),
                Err(_) => return Ok(Err(Errno::AGAIN)),
            }
        }
        let Some(tree) = p.tree.clone() else {
            return Ok(Err(Errno::AGAIN));
        };
        let Some(pid) = tree.allocate_pid() else {
            return Ok(Err(Errno::AGAIN));
        };
        let Some(slot) = tree.claim(pid) else {
            // The app has as many processes as it may (RLIMIT_NPROC says how many).
            return Ok(Err(Errno::AGAIN));
        };
        // The child is a copy of this process until it execs.
        tree.describe(pid, p.ids.pid, &p.comm(), &p.cmdline_bytes());
        tree.describe_paths(pid, &p.exe, &p.cwd);
        if p.mem.finish_streaming().is_err() {
            tree.release(pid);
            return Ok(Err(Errno::NOMEM));
        }
        let vfork = match request.vfork {
            true => match rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC) {
                Ok(pipe) => Some(pipe),
                Err(_) => {
                    tree.release(pid);
                    return Ok(Err(Errno::AGAIN));
                }
            },
            false => None,
        };
        // The child's context is the caller's at its call; the run loop completes the
        // call in each process with its own return value.
        let mut regs = self.vcpu.regs();
        if request.stack != 0 {
            regs.rsp = request.stack;
        }
        let xsave = Box::new(self.vcpu.xsave()?);
        let gs_base = self.vcpu.sregs()?.gs.base;
        let fs_base = request.tls.unwrap_or(self.p.thread.fs_base);
        // The parent's group and session as the table has them (a parent's setpgid on it).
        let (pgid, sid) = self.p.group();
        let parent_ids = crate::kernel::tree::ProcessIds {
            pgid,
            sid,
            ..self.p.ids
        };
        // The child's entry is complete before it runs, so that its own early setpgid or
        // setsid is not overwritten; its host pid follows.
        tree.fill(slot, parent_ids.child(pid), 0);
        // The child has the parent's SIGCHLD action; the parent's own entry may not have
        // been told of it yet (the table is made at the first fork).
        self.p.publish_no_stop_signal();
        let no_stop_signal = self.p.signals.actions[libc::SIGCHLD as usize - 1].flags
            & crate::kernel::signals::SA_NOCLDSTOP
            != 0;
        tree.set_no_stop_signal(pid, no_stop_signal);
        // The eventfd the child reports its stops and continues to.
        if self.p.jobs.children_changed().is_err() {
            tree.release(pid);
            return Ok(Err(Errno::AGAIN));
        }
        // An fd kept free for the child's pidfd: without one, the child would run with
        // nobody waiting for it.
        let Ok(pidfd_slot) = rustix::io::dup(self.p.kicker.wake_fd()) else {
            tree.release(pid);
            return Ok(Err(Errno::AGAIN));
        };
        let parent_host_pid = std::process::id() as i32;

        // Signals wait until the child has its own kicker: one that arrived before would
        // reach the parent's, whose wake-up eventfd the child shares.
        let blocked = SignalsBlocked::now();
        // SAFETY: fork in a process with other threads: the child has only this one. It
        // runs none of their code, and takes no lock they may have held at the fork: the
        // process state's lock is this thread's, and the handles of the others are
        // forgotten in `become_child`. glibc's fork keeps malloc usable in the child.
        let host = unsafe { libc::fork() };
        if host < 0 {
            tree.release(pid);
            return Ok(Err(Errno::AGAIN));
        }
        drop(pidfd_slot);
        if host == 0 {
            // From here on this is the child: whatever happens, it never returns to what
            // started the first process (which would clean up after the whole app).
            self.p.forked = true;
            self.p.parent_host_pid = parent_host_pid;
            self.p.jobs.forked();
            // Only the app's first process ignores stop signals.
            self.p.signals.stops_ignored = false;
            let (vfork_read, vfork_write) = vfork.unzip();
            drop(vfork_read);
            let start = ChildStart {
                pid,
                regs,
                xsave,
                fs_base,
                gs_base,
                vfork_done: vfork_write,
            };
            let built = self.become_child(start, request, parent_ids);
            drop(blocked);
            if let Err(e) = built {
                exit_as_forked_process(&Err(e));
            }
            return Ok(Ok(0));
        }
        drop(blocked);
        let p: &mut crate::kernel::process::Process = self.p;
        tree.set_host_pid(slot, host);
        let Some(host_pid) = rustix::process::Pid::from_raw(host) else {
            return Ok(Err(Errno::AGAIN));
        };
        let pidfd =
            match rustix::process::pidfd_open(host_pid, rustix::process::PidfdFlags::empty()) {
                Ok(fd) => fd,
                Err(e) => {
                    // Unreachable in practice: the child cannot have been reaped yet. Its
                    // VMM runs on unwatched and ends with the app's first process.
                    tracing::error!("fork: pidfd_open of the child's VMM: {e}");
                    return Ok(Err(Errno::AGAIN));
                }
            };
        p.children.push(ChildProcess {
            pid,
            host_pid: host,
            pgid: parent_ids.pgid,
            pidfd,
        });
        if let Some(at) = request.parent_tid {
            let _ = p.mem.write_pod(UserAddr(at), &pid);
        }
        if let Some((done, write_end)) = vfork {
            drop(write_end);
            self.wait_for_vfork_child(&done);
        }
        tracing::debug!(pid, host, "forked");
        Ok(Ok(pid as u64))
    }

    /// A vfork parent waits until its child calls execve or ends (its end of `done`
    /// closes), or until an operator's kick wants the parent.
    fn wait_for_vfork_child(&self, done: &OwnedFd) {
        loop {
            let mut fds = [
                rustix::event::PollFd::new(done, rustix::event::PollFlags::IN),
                rustix::event::PollFd::new(self.p.kicker.wake_fd(), rustix::event::PollFlags::IN),
            ];
            match rustix::event::poll(&mut fds, None) {
                Ok(_) | Err(Errno::INTR) => {}
                Err(_) => return,
            }
            if !fds[0].revents().is_empty() {
                return;
            }
            let stop =
                reason::STOP | reason::TIMEOUT | reason::FAILED | reason::PAUSE | reason::CAPTURE;
            if self.p.kicker.pending() & stop != 0 {
                return;
            }
            if !fds[1].revents().is_empty() {
                // Only a signal: the child goes on; so does the wait.
                let _ = rustix::io::read(self.p.kicker.wake_fd(), &mut [0u8; 8]);
            }
        }
    }

    /// In the forked VMM: lets go of the parent's threads, VM and vCPU, and builds this
    /// process's own around the inherited memory.
    fn become_child(
        &mut self,
        start: ChildStart,
        request: ForkRequest,
        parent_ids: crate::kernel::tree::ProcessIds,
    ) -> Result<(), VmmError> {
        // The kick handler must not write to the inherited `kvm_run`: it is the parent's.
        Kicker::arm(std::ptr::null_mut());
        crate::kernel::shared_futex::forked();
        let had_poller = self.poller.is_some();
        std::mem::forget(self.poller.take());
        std::mem::forget(std::mem::replace(
            self.live,
            Arc::new(crate::control::LiveStats::default()),
        ));
        std::mem::forget(self.control.take());
        // The channel to the supervisor (privileged binds) is the first process's: two
        // processes' requests on it could interleave. A child's bind below 1024 gets
        // EACCES, as an unprivileged process's does; servers bind before they fork.
        crate::sandbox::binder::close();
        let kicker = Kicker::for_current_thread().map_err(host_error("the vCPU kick signal"))?;
        crate::kvm::kick::forward_host_signals(&kicker)
            .map_err(host_error("forwarding host signals"))?;
        let p: &mut crate::kernel::process::Process = self.p;
        std::mem::forget(std::mem::replace(
            &mut p.alarm,
            crate::alarm::Alarm::new(kicker.clone()),
        ));
        std::mem::forget(p.threads.slicer.take());
        // Only the calling thread lives on in the child, on its first vCPU.
        p.threads.parked.clear();
        p.threads.elsewhere.clear();
        p.threads.cpus.clear();
        p.threads.hold = false;
        p.threads.current_cpu = 0;
        self.cpus.forget_helpers();
        let limit = self.cpus.limit();
        std::mem::forget(std::mem::replace(
            self.cpus,
            Arc::new(super::cpus::CpuShared::new(limit)),
        ));
        p.kicker = kicker;
        self.cpus.register_first(p);
        p.children.clear();
        p.ids = parent_ids.child(start.pid);
        p.signals.pending = 0;
        p.signals.thread_pending = 0;
        p.thread.tid = start.pid;
        p.thread.clear_child_tid = request.clear_child_tid;
        p.thread.robust_list = 0;
        p.thread.restart = None;
        p.thread.fs_base = start.fs_base;
        p.thread.fs_base_changed = true;
        p.restored_from = None;
        p.prefetched = None;
        p.activeset = Default::default();
        p.handoff = Default::default();
        p.inherited_sockets.clear();
        // The parent's /proc view is the parent's: this process makes its own when it
        // first looks (a path that reaches /proc through a link sees none until then).
        p.proc_view = None;
        p.sandbox.unmount("/proc");
        p.vfork_done = start.vfork_done;
        p.clock.pid = start.pid;
        if let Some(watch) = &mut p.root_watch {
            watch
                .watch_from_fork()
                .map_err(host_error("watching the app's first process"))?;
        }

        let machine = self.machine.for_forked_process()?;
        let (cpuid, features) = cpu::guest_cpuid(&machine)?;
        let fd = machine.create_vcpu()?;
        cpu::configure(
            &fd,
            &cpuid,
            features,
            crate::kvm::system::cpu_root(&p.mem, FIRST_CPU)?,
            start.regs.rip,
            start.regs.rsp,
        )?;
        cpu::set_context(&fd, &start.regs, start.fs_base, start.gs_base, &start.xsave)?;
        if p.clock.tsc.is_some() {
            p.clock.tsc = cpu::tsc_calibration(&fd);
        }
        let platform = self.vcpu.platform();
        // Replacing the vCPU unmaps the parent's `kvm_run` from this process.
        *self.vcpu = Vcpu::new(fd, platform)?;
        let parents = std::mem::replace(self.machine, Arc::new(machine));
        // SAFETY: this is the forked process; the other references to the parent's VM
        // are its vCPU threads' (`CpuShared::forget_helpers` above forgot them).
        unsafe { crate::kvm::Machine::release_forked(parents) };
        Kicker::arm(self.vcpu.immediate_exit_ptr());
        let phys = p.mem.phys();
        p.clock.publish(phys, true);
        crate::kernel::clock::publish_tid(phys, FIRST_CPU, start.pid);
        // The parent's poller is not here: the mailbox is empty and asleep until this
        // process's own poller (an exit costs ~50 us on kvm_pvm, a mailbox call ~14 us).
        let mailbox = phys.shared_page(crate::memory::layout::cpu_local_gpa(
            FIRST_CPU,
            picocenter_guest_shim::abi::cpu_local::MAILBOX_PAGE,
        ))?;
        mailbox
            .u32(picocenter_guest_shim::abi::mailbox::AWAKE)
            .store(0, std::sync::atomic::Ordering::SeqCst);
        if had_poller {
            let poller =
                crate::mailbox::Poller::start(mailbox, self.process.clone(), self.live.clone())
                    .map_err(host_error("the mailbox poller"))?;
            *self.poller = Some(std::sync::Arc::new(poller));
        }
        if let Some(at) = request.child_tid {
            let _ = p.mem.write_pod(UserAddr(at), &start.pid);
        }
        Ok(())
    }
}

/// Ends a forked VMM with its app process's outcome, so that the parent's wait4 reads
/// it from the host: an exit code as the exit code, a fatal signal as death by that
/// signal. Nothing of the first process's (its files, its caller) is touched.
pub fn exit_as_forked_process(outcome: &Result<RunOutcome, VmmError>) -> ! {
    let signal = match outcome {
        // SAFETY: _exit ends this process at once; nothing else runs.
        Ok(RunOutcome::Exited(code)) => unsafe { libc::_exit(code & 0xff) },
        Ok(RunOutcome::Killed { signal, report }) => {
            if ![libc::SIGKILL, libc::SIGPIPE, libc::SIGTERM, libc::SIGINT].contains(signal) {
                tracing::warn!(
                    pid = std::process::id(),
                    "a process of the app died: {report}"
                );
            }
            *signal
        }
        // SAFETY: as above.
        Ok(RunOutcome::TimedOut) => unsafe { libc::_exit(124) },
        // SAFETY: as above.
        Ok(RunOutcome::Snapshotted(_)) => unsafe { libc::_exit(0) },
        Err(e) => {
            eprintln!("picocenter: error: a process of the app failed: {e}");
            libc::SIGKILL
        }
    };
    let no_core = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: these calls change only this process's limits, one signal's disposition and
    // the signal mask, then end the process by the signal (or _exit if it survives it).
    unsafe {
        libc::setrlimit(libc::RLIMIT_CORE, &no_core);
        libc::signal(signal, libc::SIG_DFL);
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut all);
        libc::sigaddset(&mut all, signal);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &all, std::ptr::null_mut());
        libc::raise(signal);
        libc::_exit(128 + signal)
    }
}
