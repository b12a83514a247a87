//! Restoring an app that is a tree of processes.
//!
//! Each process of an app is its own VMM, and a parent's wait4 needs its children to be
//! its VMM's host children (see `crate::run::fork`). So the restore forks the VMMs first,
//! as the tree was, before any of them has a VM or threads; then each builds its own
//! process from its part of the snapshot:
//!
//! ```text
//! first VMM: the app's table, the root watch, a channel to each other process
//!   fork ─► VMM of process 5 ─ fork ─► VMM of process 9 ...   (parents fork children)
//! first VMM: builds its process, and makes every pipe and socket a process of the tree
//!            holds; hands each process its own over its channel (SCM_RIGHTS)
//! every other VMM: takes its pipes and sockets, builds its process, runs it
//! ```
//!
//! A pipe or socket two processes held is one again: its bytes are in it once, and a
//! listening socket's workers all accept on it.

use super::files::SharedObjects;
use super::restore::RestoreOptions;
use super::PersistError;
use crate::kernel::process::Process;
use crate::kernel::tree::{AppTree, ChildProcess, ProcessIds, RootWatch};
use crate::{Config, Picoprocess};
use picocenter_snapshots::format::{Manifest, ProcessPart, TreeRecord};
use picocenter_snapshots::store::Store;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

/// A process's place in a restored tree, set on its process state before it runs.
pub trait Role {
    /// Whether it is the app's first process.
    fn is_first(&self) -> bool;
    /// Gives the process its ids, its children, and the app's table.
    fn set_up(&mut self, p: &mut Process) -> Result<(), PersistError>;
}

fn host(what: &str) -> impl FnOnce(std::io::Error) -> PersistError + '_ {
    move |source| PersistError::Data {
        what: what.to_string(),
        source,
    }
}

fn errno(what: &str) -> impl FnOnce(rustix::io::Errno) -> PersistError + '_ {
    move |e| PersistError::Data {
        what: what.to_string(),
        source: e.into(),
    }
}

/// What one process (first or not) is given before its VMM builds it.
struct Place {
    ids: ProcessIds,
    tree: Arc<AppTree>,
    root_watch: Option<RootWatch>,
    children: Vec<ChildProcess>,
    /// The eventfd its children report stops to (made before it forks them).
    children_changed: Option<Arc<OwnedFd>>,
    /// Its parent's.
    parent_changed: Option<Arc<OwnedFd>>,
}

impl Place {
    fn set_up(&mut self, p: &mut Process) {
        p.ids = self.ids;
        p.clock.pid = self.ids.pid;
        p.tree = Some(self.tree.clone());
        p.root_watch = self.root_watch.take();
        p.children = std::mem::take(&mut self.children);
        p.jobs.children_changed = self.children_changed.take();
        p.jobs.parent_changed = self.parent_changed.take();
    }
}

/// The first process of a restored tree, until it has handed the others their files.
pub struct FirstProcess {
    place: Place,
    /// Its end of each other process's channel.
    channels: Vec<(i32, OwnedFd)>,
}

impl Role for FirstProcess {
    fn is_first(&self) -> bool {
        true
    }

    fn set_up(&mut self, p: &mut Process) -> Result<(), PersistError> {
        self.place.set_up(p);
        Ok(())
    }
}

/// A process of a restored tree other than its first.
struct OtherProcess<'a> {
    place: Place,
    part: &'a ProcessPart,
}

impl Role for OtherProcess<'_> {
    fn is_first(&self) -> bool {
        false
    }

    fn set_up(&mut self, p: &mut Process) -> Result<(), PersistError> {
        self.place.set_up(p);
        p.forked = true;
        p.parent_host_pid = std::os::unix::process::parent_id() as i32;
        p.signals.stops_ignored = false;
        p.exe = self.part.exe.clone();
        p.run_as = self.part.run_as.clone();
        p.cmdline = self.part.cmdline.clone();
        p.describe_in_tree();
        Ok(())
    }
}

/// Forks the VMMs of `tree`'s other processes (see the module docs); returns in the
/// first process only, with what it needs to build itself and hand the others on.
pub fn fork_processes(
    config: &Config,
    store: &dyn Store,
    chain: &[Manifest],
    tree: &TreeRecord,
    options: &RestoreOptions,
    objects: &SharedObjects,
) -> Result<FirstProcess, PersistError> {
    let first_ids = ProcessIds {
        pid: tree.pid,
        ppid: crate::kernel::GUEST_PPID,
        pgid: tree.pgid,
        sid: tree.sid,
    };
    let table = AppTree::new(
        first_ids,
        std::process::id() as i32,
        tree.next_pid.saturating_sub(1),
    )
    .map_err(host("mapping the app's process table"))?;
    let table = Arc::new(table);
    let mut slots = Vec::new();
    for part in &tree.others {
        let slot = table.claim(part.pid).ok_or_else(|| {
            PersistError::Incompatible(format!("no room for process {}", part.pid))
        })?;
        table.fill(slot, ids_of(part), 0);
        table.describe(part.pid, part.ppid, "", &[]);
        slots.push(slot);
    }
    let root_watch = RootWatch::new().map_err(host("the root watch pipe"))?;
    let mut channels = Vec::new();
    for part in &tree.others {
        let (ours, theirs) = rustix::net::socketpair(
            rustix::net::AddressFamily::UNIX,
            rustix::net::SocketType::SEQPACKET,
            rustix::net::SocketFlags::CLOEXEC,
            None,
        )
        .map_err(errno("a channel to a process"))?;
        channels.push((part.pid, Some(ours), Some(theirs)));
    }
    let mut place = Place {
        ids: first_ids,
        tree: table.clone(),
        root_watch: Some(root_watch),
        children: Vec::new(),
        children_changed: None,
        parent_changed: None,
    };
    let forks = Forks {
        config,
        store,
        chain,
        tree,
        options,
        slots: &slots,
        memory: &objects.memory,
    };
    forks.fork_children_of(&mut place, &mut channels)?;
    Ok(FirstProcess {
        place,
        channels: channels
            .into_iter()
            .filter_map(|(pid, ours, _)| Some((pid, ours?)))
            .collect(),
    })
}

fn ids_of(part: &ProcessPart) -> ProcessIds {
    ProcessIds {
        pid: part.pid,
        ppid: part.ppid,
        pgid: part.pgid,
        sid: part.sid,
    }
}

/// A channel to process `.0`: the first process's end, and that process's.
type Channel = (i32, Option<OwnedFd>, Option<OwnedFd>);

struct Forks<'a> {
    config: &'a Config,
    store: &'a dyn Store,
    /// The snapshot's chain, newest first.
    chain: &'a [Manifest],
    tree: &'a TreeRecord,
    options: &'a RestoreOptions,
    slots: &'a [usize],
    /// The shared memory, made before the forks.
    memory: &'a std::collections::HashMap<u64, Arc<std::fs::File>>,
}

impl Forks<'_> {
    /// Forks the VMM of each child of the process `place` is of; in each child, goes on
    /// with its own children, then builds and runs it, never returning.
    fn fork_children_of(
        &self,
        place: &mut Place,
        channels: &mut [Channel],
    ) -> Result<(), PersistError> {
        let parent = place.ids.pid;
        for (index, part) in self.tree.others.iter().enumerate() {
            if part.ppid != parent {
                continue;
            }
            let changed = match &place.children_changed {
                Some(fd) => fd.clone(),
                None => {
                    let fd = Arc::new(
                        rustix::event::eventfd(
                            0,
                            rustix::event::EventfdFlags::CLOEXEC
                                | rustix::event::EventfdFlags::NONBLOCK,
                        )
                        .map_err(errno("the children's eventfd"))?,
                    );
                    place.children_changed = Some(fd.clone());
                    fd
                }
            };
            // SAFETY: the restore forks before this process has a VM or threads of its
            // own; the child runs only this code, and ends without returning.
            let host = unsafe { libc::fork() };
            if host < 0 {
                return Err(host_error("forking a process's VMM"));
            }
            if host == 0 {
                self.become_process(index, part, place, changed, channels);
            }
            place.tree.set_host_pid(self.slots[index], host);
            let pidfd = rustix::process::Pid::from_raw(host)
                .ok_or(rustix::io::Errno::SRCH)
                .and_then(|pid| {
                    rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty())
                })
                .map_err(errno("a pidfd of a process's VMM"))?;
            place.children.push(ChildProcess {
                pid: part.pid,
                host_pid: host,
                pgid: part.pgid,
                pidfd,
            });
        }
        Ok(())
    }

    /// In the forked VMM of `part`: forks its children, takes its files, builds and runs
    /// it. Never returns: it ends as the process does.
    fn become_process(
        &self,
        index: usize,
        part: &ProcessPart,
        parent: &mut Place,
        parent_changed: Arc<OwnedFd>,
        channels: &mut [Channel],
    ) -> ! {
        let mut place = Place {
            ids: ids_of(part),
            tree: parent.tree.clone(),
            root_watch: None,
            children: Vec::new(),
            children_changed: None,
            parent_changed: Some(parent_changed),
        };
        // A VM made ahead (a worker's spare) is the first process's: of no use here.
        let remade = crate::kvm::ahead::remake_after_fork();
        // The parent's children are not this one's, nor is the first process's end of
        // the root watch: only the first process may hold that.
        parent.children.clear();
        let alive = parent.root_watch.take().map(|watch| watch.alive);
        let result = (|| {
            remade.map_err(|e| PersistError::Incompatible(format!("a VM of its own: {e}")))?;
            place.root_watch = Some(RootWatch {
                alive: alive.ok_or_else(|| PersistError::Incompatible("no root watch".into()))?,
                holder: None,
            });
            // Its children first: no thread of this process's may run across their forks.
            self.fork_children_of(&mut place, channels)?;
            if let Some(watch) = place.root_watch.as_mut() {
                watch
                    .watch_from_fork()
                    .map_err(host("watching the app's first process"))?;
            }
            // Only this process's own end of its own channel stays open here.
            let mine = channels
                .get_mut(index)
                .and_then(|(_, _, theirs)| theirs.take())
                .ok_or_else(|| PersistError::Incompatible("no channel".into()))?;
            for channel in channels.iter_mut() {
                channel.1 = None;
                channel.2 = None;
            }
            let objects = receive_objects(&mine)?;
            let chain = Manifest::part_chain(self.chain, part.pid);
            let options = RestoreOptions {
                mode: match self.options.mode {
                    super::restore::RestoreMode::Stream => super::restore::RestoreMode::ActiveSet,
                    mode => mode,
                },
                relearn: self.options.relearn,
                first_port: None,
                feed: None,
                lockdown: None,
            };
            let mut config = self.config.clone();
            config.control = None;
            config.inherited_sockets.clear();
            let mut role = OtherProcess { place, part };
            let mut objects = objects;
            objects.memory = self.memory.clone();
            let picoprocess = Picoprocess::build(
                &config,
                self.store,
                &chain,
                &options,
                &mut objects,
                Some(&mut role),
            )?;
            if let Some(lockdown) = &self.options.lockdown {
                lockdown.now().map_err(|e| {
                    PersistError::Incompatible(format!("locking the process's VMM down: {e}"))
                })?;
            }
            // Built and locked down: the first process may report the app restored.
            rustix::net::send(&mine, READY, rustix::net::SendFlags::NOSIGNAL)
                .map_err(errno("telling the first process it is restored"))?;
            Ok::<_, PersistError>(picoprocess)
        })();
        match result {
            Ok(mut picoprocess) => {
                // A forked process's run ends its VMM with the process's status.
                let ended = match crate::kvm::kick::forward_host_signals(&picoprocess.kicker()) {
                    Ok(()) => picoprocess.run().err().map(|e| e.to_string()),
                    Err(e) => Some(format!("forwarding host signals: {e}")),
                };
                eprintln!(
                    "picocenter: error: process {} of the app failed: {}",
                    part.pid,
                    ended.unwrap_or_else(|| "its run returned".into())
                );
            }
            Err(e) => eprintln!(
                "picocenter: error: process {} of the app could not be restored: {}",
                part.pid,
                crate::report::error_chain(&e)
            ),
        }
        // SAFETY: ends this forked VMM at once; nothing of the first process's is touched.
        unsafe { libc::_exit(1) }
    }
}

fn host_error(what: &str) -> PersistError {
    PersistError::Data {
        what: what.to_string(),
        source: std::io::Error::last_os_error(),
    }
}

/// One handed-on object: which end (a byte), its id and, for one end of a socketpair,
/// the host inode of the other (0 if not; `u64` LE each), and the descriptor with it.
const MESSAGE: usize = 17;
/// What each other process says once it is built and locked down.
const READY: &[u8] = b"ready";
/// How long the first process waits for the others to be built.
const READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
/// The message that ends the handing on.
const DONE: u8 = 0xff;

/// Takes the pipes and sockets the first process hands this one, until it says it is done.
fn receive_objects(channel: &OwnedFd) -> Result<SharedObjects, PersistError> {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
    let mut objects = SharedObjects::default();
    loop {
        let mut message = [0u8; MESSAGE];
        let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut ancillary = RecvAncillaryBuffer::new(&mut space);
        let received = rustix::net::recvmsg(
            channel,
            &mut [std::io::IoSliceMut::new(&mut message)],
            &mut ancillary,
            RecvFlags::CMSG_CLOEXEC,
        );
        let received = match received {
            Err(rustix::io::Errno::INTR) => continue,
            other => other.map_err(errno("taking the app's files from its first process"))?,
        };
        if received.bytes == 0 {
            return Err(PersistError::Incompatible(
                "the app's first process ended before handing on its files".into(),
            ));
        }
        let mut fd = None;
        for item in ancillary.drain() {
            if let RecvAncillaryMessage::ScmRights(mut fds) = item {
                fd = fds.next();
            }
        }
        if message[0] == DONE {
            return Ok(objects);
        }
        let id = u64::from_le_bytes(message[1..9].try_into().unwrap_or_default());
        let peer = u64::from_le_bytes(message[9..17].try_into().unwrap_or_default());
        match (fd, peer) {
            (Some(fd), 0) => objects.insert((id, message[0]), fd),
            (Some(fd), peer) => objects.insert_pair_end(id, fd, peer),
            (None, _) => {}
        }
    }
}

/// Whether the process at the other end of `channel` says it is ready before `deadline`
/// (it says nothing if it failed: it ends, and the channel with it).
fn ready(channel: &OwnedFd, deadline: std::time::Instant) -> bool {
    while super::readable_before(channel, deadline) {
        let mut said = [0u8; 16];
        match rustix::net::recv(channel, &mut said, rustix::net::RecvFlags::DONTWAIT) {
            Ok((n, _)) => return said.get(..n) == Some(READY),
            Err(rustix::io::Errno::INTR | rustix::io::Errno::AGAIN) => {}
            Err(_) => return false,
        }
    }
    false
}

/// Sends `fd` as object `key` (with the inode of its other end, if it is one end of a
/// socketpair) over `channel`.
fn send_object(
    channel: &OwnedFd,
    key: (u64, u8),
    fd: &OwnedFd,
    peer: Option<u64>,
) -> Result<(), PersistError> {
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    let mut message = [0u8; MESSAGE];
    message[0] = key.1;
    message[1..9].copy_from_slice(&key.0.to_le_bytes());
    message[9..17].copy_from_slice(&peer.unwrap_or(0).to_le_bytes());
    let fds = [fd.as_fd()];
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut ancillary = SendAncillaryBuffer::new(&mut space);
    ancillary.push(SendAncillaryMessage::ScmRights(&fds));
    loop {
        match rustix::net::sendmsg(
            channel,
            &[std::io::IoSlice::new(&message)],
            &mut ancillary,
            SendFlags::NOSIGNAL,
        ) {
            Err(rustix::io::Errno::INTR) => continue,
            other => {
                other.map_err(errno("handing a file to another process"))?;
                return Ok(());
            }
        }
    }
}

impl FirstProcess {
    /// Once the first process is built: makes the pipes and sockets only the others
    /// hold, calls `before_they_run` (the others run as soon as they have their files),
    /// hands each process those it holds, and lists the tree for `picocenter ps`.
    pub fn hand_on(
        self,
        picoprocess: &Picoprocess,
        newest: &Manifest,
        tree: &TreeRecord,
        objects: &mut SharedObjects,
        before_they_run: impl FnOnce() -> Result<(), PersistError>,
    ) -> Result<(), PersistError> {
        {
            let mut p = crate::kernel::process::lock(&picoprocess.process);
            for part in &tree.others {
                // A unix socket's relative name is the part's, from its directory.
                let cwd = std::mem::replace(&mut p.cwd, part.process.cwd.clone());
                let made = super::files::make_objects(&mut p, &part.files, objects);
                p.cwd = cwd;
                made?;
            }
            p.describe_in_tree();
        }
        before_they_run()?;
        // Once the app's sockets are its user's (see `reconnect_unix`), and before any
        // process that holds one runs.
        objects.connect_all(&crate::kernel::process::lock(&picoprocess.process));
        for (pid, channel) in &self.channels {
            let Some(part) = tree.others.iter().find(|part| part.pid == *pid) else {
                continue;
            };
            let mut sent = std::collections::HashSet::new();
            for record in &part.files {
                let Some(key) = SharedObjects::key(record) else {
                    continue;
                };
                if !sent.insert(key) {
                    continue;
                }
                if let Some(fd) = objects.fd(key) {
                    send_object(channel, key, fd, objects.peer(key))?;
                }
            }
            let mut done = [0u8; MESSAGE];
            done[0] = DONE;
            rustix::net::sendmsg(
                channel,
                &[std::io::IoSlice::new(&done)],
                &mut rustix::net::SendAncillaryBuffer::default(),
                rustix::net::SendFlags::NOSIGNAL,
            )
            .map_err(errno("handing the files to another process"))?;
        }
        // The restore is done once every process is built: one that could not be makes
        // it fail (and the others end with the first, see `RootWatch`).
        let deadline = std::time::Instant::now() + READY_TIMEOUT;
        for (pid, channel) in &self.channels {
            if !ready(channel, deadline) {
                return Err(PersistError::Incompatible(format!(
                    "process {pid} of the app could not be restored"
                )));
            }
        }
        picoprocess
            .live
            .attach_processes(self.place.tree.clone().lister());
        tracing::info!(
            processes = tree.others.len() + 1,
            snapshot = %newest.id,
            "restored a tree of processes"
        );
        Ok(())
    }
}
