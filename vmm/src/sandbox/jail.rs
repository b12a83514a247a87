//! The jail a VMM process runs in, as Firecracker's jailer sets one up: after setup, the
//! VMM of an app sees only the files it needs, runs as a user of its own with no
//! capabilities and `no_new_privs`, and may make only the host system calls it uses.
//!
//! Three steps, in this order, because each needs what the previous still allows:
//!
//! 1. [`enter_filesystem`], while the process is still single-threaded (a mount
//!    namespace is per thread until then): a private mount namespace whose root is an
//!    empty, read-only tmpfs holding, at their own host paths, bind mounts of exactly the
//!    paths the VMM needs (the app's root and data directories read-only or writable, its
//!    control socket directory, its snapshot store, /dev/kvm, the harmless devices, and
//!    /proc, whose `/proc/self/fd` magic links the sandbox acts through). Writable binds
//!    are `nosuid,nodev`. Paths therefore keep their meaning, and nothing else exists.
//! 2. [`drop_privileges`], once the VM, its memory and every file the VMM keeps are open:
//!    the app's own uid and gid, no supplementary groups, no capabilities, and
//!    `no_new_privs`.
//! 3. [`restrict_syscalls`] (see [`super::seccomp`]): a seccomp filter on every thread.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Why the jail could not be entered. The VMM must not run an app outside its jail, so
/// every one of these ends the VMM before the app starts.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// A step of the jail failed.
    #[error("jail: {step}")]
    Step {
        /// What was being done.
        step: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// The process still had threads (a mount namespace would cover only one).
    #[error("jail: the mount namespace must be entered before any thread starts")]
    Threaded,
    /// The jail's configuration is wrong.
    #[error("jail: {0}")]
    Config(String),
    /// Capabilities remained after the change of user.
    #[error("jail: capabilities remain after dropping to uid {0}")]
    CapabilitiesRemain(u32),
}

/// How the VMM may use a path inside its jail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read only.
    ReadOnly,
    /// Read and write (but no set-id programs and no device nodes).
    ReadWrite,
    /// A device node, read and write.
    Device,
}

/// What a VMM's jail shows, and whose it is.
#[derive(Debug, Clone, Default)]
pub struct JailSpec {
    /// Host paths visible at their own paths, with their access.
    pub visible: Vec<(PathBuf, Access)>,
    /// An empty host directory to build the new root on (it stays empty on the host).
    pub scratch: PathBuf,
}

impl JailSpec {
    /// Adds a path (ignored when it does not exist: nothing to show).
    pub fn show(&mut self, path: impl Into<PathBuf>, access: Access) {
        let path = path.into();
        if !self.visible.iter().any(|(p, _)| *p == path) {
            self.visible.push((path, access));
        }
    }
}

/// The paths every VMM needs besides the app's own.
pub fn base_paths(spec: &mut JailSpec) {
    spec.show("/dev/kvm", Access::Device);
    for device in super::DEVICES {
        spec.show(device, Access::Device);
    }
}

fn step(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> JailError {
    let step = what.into();
    move |source| JailError::Step { step, source }
}

fn c_path(path: &Path) -> Result<CString, JailError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| JailError::Step {
        step: format!("{} holds a NUL byte", path.display()),
        source: std::io::ErrorKind::InvalidInput.into(),
    })
}

/// mount(2) with optional source and type.
fn mount(
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
) -> std::io::Result<()> {
    mount_with_data(source, target, fstype, flags, None)
}

/// mount(2) with optional source, type and data string (filesystem options).
fn mount_with_data(
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> std::io::Result<()> {
    let source = source.map(|s| CString::new(s.as_os_str().as_bytes()).unwrap_or_default());
    let target = CString::new(target.as_os_str().as_bytes()).unwrap_or_default();
    let fstype = fstype.map(|t| CString::new(t).unwrap_or_default());
    let data = data.map(|d| CString::new(d).unwrap_or_default());
    let ptr = |s: &Option<CString>| s.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
    // SAFETY: every pointer is a NUL-terminated string that outlives the call, or NULL
    // where mount(2) allows it.
    let rc = unsafe {
        libc::mount(
            ptr(&source),
            target.as_ptr(),
            ptr(&fstype),
            flags,
            ptr(&data).cast(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Whether this process has only one thread.
fn single_threaded() -> bool {
    std::fs::read_dir("/proc/self/task").is_ok_and(|tasks| tasks.count() == 1)
}

/// Enters a mount namespace that shows only `spec.visible`, at their own paths.
pub fn enter_filesystem(spec: &JailSpec) -> Result<(), JailError> {
    if !single_threaded() {
        return Err(JailError::Threaded);
    }
    // What the VMM learns from the host's /sys, it learns now.
    crate::platform::Platform::detect();
    // SAFETY: unshare(CLONE_NEWNS) changes only this (single-threaded) process's view of
    // the mounts; it touches no memory.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        return Err(step("unshare(CLONE_NEWNS)")(std::io::Error::last_os_error()));
    }
    // Nothing done here may propagate back to the host's mounts.
    mount(None, Path::new("/"), None, libc::MS_REC | libc::MS_PRIVATE)
        .map_err(step("making the mounts private"))?;
    let root = &spec.scratch;
    mount(
        Some(Path::new("tmpfs")),
        root,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
    )
    .map_err(step(format!(
        "mounting the jail's root on {}",
        root.display()
    )))?;
    tracing::trace!("jail: own mount namespace");
    let mut visible = spec.visible.clone();
    // Parents before children, so a child's bind lands inside its parent's.
    visible.sort_by_key(|(path, _)| path.components().count());
    for (path, access) in &visible {
        bind(root, path, *access)?;
    }
    // A devpts of the VMM's own for the app's pseudo-terminals (syscalls::pty): its ptys
    // are nobody else's, and nobody else's are visible. Best effort: without it the app
    // gets no /dev/ptmx.
    let pts = root.join("dev/pts");
    if std::fs::create_dir_all(&pts).is_ok() {
        if let Err(e) = mount_with_data(
            Some(Path::new("devpts")),
            &pts,
            Some("devpts"),
            libc::MS_NOSUID | libc::MS_NOEXEC,
            Some("newinstance,ptmxmode=0666,mode=0620"),
        ) {
            tracing::debug!("no devpts in the jail: {e}");
        }
    }
    let proc = root.join("proc");
    std::fs::create_dir_all(&proc).map_err(step("creating /proc"))?;
    mount(
        Some(Path::new("proc")),
        &proc,
        Some("proc"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
    )
    .map_err(step("mounting /proc"))?;
    // A small tmpfs for the app's view of /proc (`crate::kernel::procview`): sticky and
    // writable by all, as the VMM's uid is set later; only this VMM and its forks live in
    // the jail. Best effort: without it the app's /proc has files but no directories.
    let views = root.join(super::PROC_VIEWS.trim_start_matches('/'));
    match std::fs::create_dir_all(&views).and_then(|()| {
        mount_with_data(
            Some(Path::new("tmpfs")),
            &views,
            Some("tmpfs"),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            Some("mode=1777,size=8m,nr_inodes=65536"),
        )
    }) {
        Ok(()) => PROC_VIEWS_MOUNTED.store(true, std::sync::atomic::Ordering::SeqCst),
        Err(e) => tracing::debug!("no tmpfs for the /proc views: {e}"),
    }
    tracing::trace!("jail: mounts made");
    switch_root(root)?;
    // The root itself (the tmpfs of mount points) is read-only.
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
    )
    .map_err(step("making the jail's root read-only"))
}

/// Binds host `path` at the same path under `root`, with `access`.
fn bind(root: &Path, path: &Path, access: Access) -> Result<(), JailError> {
    let Ok(meta) = std::fs::metadata(path) else {
        return Ok(());
    };
    let target = root.join(path.strip_prefix("/").unwrap_or(path));
    if meta.is_dir() {
        std::fs::create_dir_all(&target)
    } else {
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)
                .map_err(step(format!("creating {}", parent.display())))?;
        }
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&target)
            .map(drop)
    }
    .map_err(step(format!("creating {}", target.display())))?;
    mount(Some(path), &target, None, libc::MS_BIND | libc::MS_REC)
        .map_err(step(format!("binding {}", path.display())))?;
    let mut flags = libc::MS_REMOUNT | libc::MS_BIND | libc::MS_NOSUID;
    flags |= match access {
        Access::ReadOnly => libc::MS_RDONLY | libc::MS_NODEV,
        Access::ReadWrite => libc::MS_NODEV,
        Access::Device => 0,
    };
    mount(None, &target, None, flags).map_err(step(format!("restricting {}", path.display())))
}

/// Makes `root` the process's root: pivot_root where the current root allows it, else
/// (an initramfs, whose rootfs cannot be pivoted) move it over / and chroot.
fn switch_root(root: &Path) -> Result<(), JailError> {
    std::env::set_current_dir(root).map_err(step("entering the jail's root"))?;
    let dot = c_path(Path::new("."))?;
    // SAFETY: pivot_root(".", ".") stacks the old root under the new one; both arguments
    // are valid NUL-terminated strings.
    let pivoted = unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) } == 0;
    if pivoted {
        // SAFETY: detaching the old root, now mounted on ".", with a valid path.
        if unsafe { libc::umount2(dot.as_ptr(), libc::MNT_DETACH) } != 0 {
            return Err(step("detaching the host's root")(
                std::io::Error::last_os_error(),
            ));
        }
    } else {
        mount(Some(root), Path::new("/"), None, libc::MS_MOVE)
            .map_err(step("moving the jail's root over /"))?;
        // SAFETY: chroot to the current directory, a valid path.
        if unsafe { libc::chroot(dot.as_ptr()) } != 0 {
            return Err(step("chroot")(std::io::Error::last_os_error()));
        }
    }
    std::env::set_current_dir("/").map_err(step("entering /"))
}

/// Set once this process's jail has mounted the tmpfs of /proc views: a VMM outside a
/// jail keeps none (a host directory of that name is nobody's to write).
static PROC_VIEWS_MOUNTED: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Whether this VMM's jail has the tmpfs of /proc views (see `crate::kernel::procview`).
pub fn proc_views_mounted() -> bool {
    PROC_VIEWS_MOUNTED.load(std::sync::atomic::Ordering::SeqCst)
}

/// Gives `path` and everything in it to `uid`:`gid`, without following symlinks.
fn give_tree(path: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))?;
    if std::fs::symlink_metadata(path)?.is_dir() {
        for entry in std::fs::read_dir(path)? {
            give_tree(&entry?.path(), uid, gid)?;
        }
    }
    Ok(())
}

/// Becomes `uid`:`gid` with no supplementary groups, no capabilities, and
/// `no_new_privs`, on every thread (glibc applies set*id calls process-wide). The /proc
/// views made before (a restore builds the app as root) become the new uid's, which
/// keeps them up to date from then on.
pub fn drop_privileges(uid: u32, gid: u32) -> Result<(), JailError> {
    if proc_views_mounted() {
        if let Err(e) = give_tree(Path::new(super::PROC_VIEWS), uid, gid) {
            tracing::debug!("giving the /proc views to uid {uid}: {e}");
        }
    }
    // SAFETY: setgroups with an empty list reads no memory.
    if unsafe { libc::setgroups(0, std::ptr::null()) } != 0 {
        return Err(step("setgroups")(std::io::Error::last_os_error()));
    }
    // SAFETY: plain id changes; they touch no memory.
    if unsafe { libc::setresgid(gid, gid, gid) } != 0 {
        return Err(step(format!("setresgid({gid})"))(
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: as above. Leaving uid 0 for a non-zero uid clears every capability set.
    if unsafe { libc::setresuid(uid, uid, uid) } != 0 {
        return Err(step(format!("setresuid({uid})"))(
            std::io::Error::last_os_error(),
        ));
    }
    set_no_new_privs()?;
    if effective_capabilities()? != 0 {
        return Err(JailError::CapabilitiesRemain(uid));
    }
    Ok(())
}

/// prctl(PR_SET_NO_NEW_PRIVS): nothing this process runs can gain privileges.
pub fn set_no_new_privs() -> Result<(), JailError> {
    rustix::thread::set_no_new_privs(true).map_err(|e| step("no_new_privs")(e.into()))
}

/// The effective capability set, from /proc/self/status.
pub fn effective_capabilities() -> Result<u64, JailError> {
    let status =
        std::fs::read_to_string("/proc/self/status").map_err(step("reading /proc/self/status"))?;
    Ok(status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(u64::MAX))
}
