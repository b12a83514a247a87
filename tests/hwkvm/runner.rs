//! The host side of the hardware-KVM runner: the kernel (from apt, cached under the cargo
//! target dir), the VMM binary, the initramfs, and QEMU with a time limit.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The Debian package whose dependency names the cloud kernel to use.
const KERNEL_META_PACKAGE: &str = "linux-image-cloud-amd64";
/// The modules that make /dev/kvm on an AMD CPU, in load order (tests/hwkvm/init.sh).
const MODULES: [&str; 3] = [
    "kernel/virt/lib/irqbypass.ko",
    "kernel/arch/x86/kvm/kvm.ko",
    "kernel/arch/x86/kvm/kvm-amd.ko",
];

/// Fails loudly, naming the fix, when a tool the runner needs is missing.
pub fn require_tools() {
    let need = [
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("cpio", "cpio"),
        ("gcc", "gcc"),
        ("apt-get", "apt"),
        ("dpkg-deb", "dpkg"),
        ("strip", "binutils"),
    ];
    for (tool, package) in need {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            found,
            "{tool} is missing: install Debian's {package} (scripts/setup.sh installs \
             qemu-system-x86, cpio and busybox-static)"
        );
    }
    assert!(
        Path::new("/bin/busybox").exists(),
        "/bin/busybox is missing: install Debian's busybox-static (scripts/setup.sh does)"
    );
}

/// `<cargo target dir>/hwkvm`: the kernel cache and the last initramfs and serial log.
pub fn work_dir() -> PathBuf {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let dir = tmp.parent().unwrap_or(tmp).join("hwkvm");
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// Holds `work` for this run: concurrent runs (two `cargo test`s) would share its files,
/// the app name and the address of the snapshot step. Released when the file is dropped.
pub fn lock(work: &Path) -> fs::File {
    use std::os::fd::AsRawFd;
    let file = fs::File::create(work.join("lock")).unwrap();
    // SAFETY: flock only takes a lock on the open descriptor, which `file` owns and keeps
    // open for as long as the caller holds it.
    let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
    assert_eq!(locked, 0, "locking {}", work.display());
    file
}

/// The last path component, as a string.
pub fn file_name(path: &Path) -> String {
    path.file_name().unwrap().to_string_lossy().into_owned()
}

/// A kernel to boot and its KVM modules.
pub struct Kernel {
    /// The bzImage.
    pub vmlinuz: PathBuf,
    /// irqbypass, kvm and kvm-amd, in load order.
    pub modules: Vec<PathBuf>,
}

fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The cloud kernel package apt offers (the one the meta-package depends on).
fn kernel_package() -> String {
    let depends = |cmd: &mut Command| {
        cmd.output().ok().and_then(|out| {
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| l.trim().strip_prefix("Depends: "))
                .find(|p| p.starts_with("linux-image-"))
                .map(str::to_string)
        })
    };
    let ask = || depends(Command::new("apt-cache").args(["depends", KERNEL_META_PACKAGE]));
    if let Some(package) = ask() {
        return package;
    }
    // A fresh machine may have no package lists yet.
    run(Command::new("apt-get").arg("update"), "apt-get update");
    ask().unwrap_or_else(|| panic!("apt offers no {KERNEL_META_PACKAGE}"))
}

/// The kernel, downloaded with apt once: its bzImage and KVM modules are kept in
/// `work/kernel/<package>/` (the rest of the package is dropped).
pub fn kernel(work: &Path) -> Kernel {
    let cache = work.join("kernel");
    let dir = match cached_kernel(&cache) {
        Some(dir) => dir,
        None => {
            let package = kernel_package();
            let scratch = cache.join("scratch");
            let _ = fs::remove_dir_all(&scratch);
            fs::create_dir_all(&scratch).unwrap();
            run(
                Command::new("apt-get")
                    .arg("download")
                    .arg(&package)
                    .current_dir(&scratch),
                "apt-get download",
            );
            let deb = find(&scratch, &package);
            let unpacked = scratch.join("unpacked");
            run(
                Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked),
                "dpkg-deb -x",
            );
            let kept = scratch.join("kept");
            fs::create_dir(&kept).unwrap();
            let vmlinuz = find(&unpacked.join("boot"), "vmlinuz-");
            fs::copy(vmlinuz, kept.join("vmlinuz")).unwrap();
            let modules = find(&unpacked.join("lib/modules"), "");
            for module in MODULES {
                fs::copy(
                    modules.join(module),
                    kept.join(file_name(Path::new(module))),
                )
                .unwrap_or_else(|e| panic!("{module} in {package}: {e}"));
            }
            // Renamed into place last, so an interrupted run leaves no half a kernel.
            let dir = cache.join(&package);
            let _ = fs::remove_dir_all(&dir);
            fs::rename(&kept, &dir).unwrap();
            fs::remove_dir_all(&scratch).unwrap();
            dir
        }
    };
    Kernel {
        vmlinuz: dir.join("vmlinuz"),
        modules: MODULES
            .iter()
            .map(|m| dir.join(file_name(Path::new(m))))
            .collect(),
    }
}

/// The entry of `dir` whose name starts with `prefix`.
fn find(dir: &Path, prefix: &str) -> PathBuf {
    fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| file_name(p).starts_with(prefix))
        .unwrap_or_else(|| panic!("no {prefix}* in {}", dir.display()))
}

/// The kernel kept by an earlier run, if any.
fn cached_kernel(cache: &Path) -> Option<PathBuf> {
    fs::read_dir(cache)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| file_name(p).starts_with("linux-image-") && p.join("vmlinuz").is_file())
}

/// Names another `picocenter` binary to test (scripts/hwkvm.sh --release sets it to a
/// static release build).
pub const VMM_VAR: &str = "PICOCENTER_HWKVM_VMM";

/// The VMM to test: by default the `picocenter` binary the other end-to-end tests run
/// (carried into the guest with its shared libraries), so CI builds nothing more.
pub fn vmm() -> PathBuf {
    match std::env::var_os(VMM_VAR) {
        Some(path) => {
            let path = PathBuf::from(path);
            assert!(path.is_file(), "{VMM_VAR}={} is not a file", path.display());
            path
        }
        None => PathBuf::from(env!("CARGO_BIN_EXE_picocenter")),
    }
}

/// A directory that becomes the guest's root filesystem.
pub struct Initramfs {
    root: PathBuf,
}

impl Initramfs {
    /// Starts an empty tree at `root` (anything there is removed).
    pub fn new(root: &Path) -> Self {
        let _ = fs::remove_dir_all(root);
        fs::create_dir_all(root).unwrap();
        Initramfs {
            root: root.to_path_buf(),
        }
    }

    fn dest(&self, inside: &str) -> PathBuf {
        let dest = self.root.join(inside);
        fs::create_dir_all(dest.parent().unwrap()).unwrap();
        dest
    }

    /// Copies a file of this repository as an executable script.
    pub fn script(&mut self, inside: &str, repo_path: &str) {
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join(repo_path);
        let dest = self.dest(inside);
        fs::copy(&source, &dest).unwrap_or_else(|e| panic!("{}: {e}", source.display()));
        fs::set_permissions(&dest, fs::Permissions::from_mode(0o755)).unwrap();
    }

    /// Copies a host file.
    pub fn file(&mut self, host: &Path, inside: &str) {
        let dest = self.dest(inside);
        fs::copy(host, &dest).unwrap_or_else(|e| panic!("{}: {e}", host.display()));
    }

    /// Copies a host directory tree.
    pub fn tree(&mut self, host: &Path, inside: &str) {
        picocenter_images::rootfs::copy_tree(host, &self.dest(inside))
            .unwrap_or_else(|e| panic!("{}: {e}", host.display()));
    }

    /// Writes a file.
    pub fn contents(&mut self, inside: &str, bytes: &[u8]) {
        fs::write(self.dest(inside), bytes).unwrap();
    }

    /// Copies a program, and the interpreter and libraries it needs at their host paths.
    pub fn program(&mut self, host: &Path, inside: &str) {
        let files = picocenter_images::closure::closure(host)
            .unwrap_or_else(|e| panic!("the libraries of {}: {e}", host.display()));
        for library in &files[1..] {
            picocenter_images::rootfs::add_path(&self.root, library)
                .unwrap_or_else(|e| panic!("{}: {e}", library.display()));
        }
        self.file(host, inside);
    }

    /// Drops the debug information of a copied binary: a debug build of the VMM is mostly
    /// that, and the emulated kernel unpacks a smaller initramfs faster.
    pub fn strip_debug(&mut self, inside: &str) {
        let path = self.root.join(inside);
        run(
            Command::new("strip").arg("--strip-debug").arg(&path),
            "strip",
        );
    }

    /// Packs the tree as an uncompressed cpio (newc) archive at `out`; the kernel unpacks
    /// that faster than a compressed one under emulation.
    pub fn pack(&self, out: &Path) -> PathBuf {
        let archive = fs::File::create(out).unwrap();
        let mut cpio = Command::new("sh")
            .args([
                "-c",
                "find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0",
            ])
            .current_dir(&self.root)
            .stdout(archive)
            .stderr(Stdio::piped())
            .spawn()
            .expect("running cpio");
        let status = cpio.wait().unwrap();
        assert!(status.success(), "packing the initramfs with cpio failed");
        out.to_path_buf()
    }
}

/// Boots `vmlinuz` with `initrd` under TCG with an SVM CPU, the serial console going to
/// `serial`, and returns the log once the guest powers off. QEMU is killed after `limit`.
pub fn boot(vmlinuz: &Path, initrd: &Path, serial: &Path, limit: Duration) -> String {
    let _ = fs::remove_file(serial);
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args(["-accel", "tcg", "-cpu", "max", "-m", "1024", "-smp", "1"])
        .args([
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
            "-monitor",
            "none",
        ])
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 quiet panic=-1"])
        .stdin(Stdio::null());
    // QEMU's own messages go to a file: a pipe nobody reads could fill up and stall it.
    let messages = serial.with_extension("qemu.log");
    let file = fs::File::create(&messages).unwrap();
    qemu.stdout(file.try_clone().unwrap()).stderr(file);
    let mut child = qemu.spawn().expect("starting qemu-system-x86_64");
    let started = Instant::now();
    let mut shown = 0;
    let status = loop {
        // Progress for `--nocapture`: the complete lines not shown yet.
        let log = fs::read_to_string(serial).unwrap_or_default();
        let complete = log.lines().count() - usize::from(!log.is_empty() && !log.ends_with('\n'));
        for line in log.lines().take(complete).skip(shown) {
            if line.starts_with("HWKVM ") {
                eprintln!("hwkvm: [{:5.1} s] {line}", started.elapsed().as_secs_f64());
            }
        }
        shown = complete;
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            let log = fs::read_to_string(serial).unwrap_or_default();
            panic!(
                "the guest ran longer than {limit:?}; QEMU was killed. Serial log ({}):\n{}",
                serial.display(),
                tail(&log, 60)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        status.success(),
        "qemu-system-x86_64 failed ({status}): {}",
        fs::read_to_string(&messages).unwrap_or_default()
    );
    fs::read_to_string(serial).unwrap_or_default()
}

/// Checks the suite's report in `log`: a DONE line, no FAIL, and a PASS for every check.
pub fn verdict(log: &str, checks: &[&str]) -> Result<(), String> {
    let passed: Vec<&str> = log
        .lines()
        .filter_map(|l| l.trim_end().strip_prefix("HWKVM PASS "))
        .collect();
    let failed: Vec<&str> = log
        .lines()
        .filter_map(|l| l.trim_end().strip_prefix("HWKVM FAIL "))
        .collect();
    let missing: Vec<&&str> = checks.iter().filter(|c| !passed.contains(c)).collect();
    let done = log.lines().any(|l| l.starts_with("HWKVM DONE "));
    if !failed.is_empty() {
        return Err(format!("failed: {}", failed.join("; ")));
    }
    if !done {
        return Err("the suite never finished (no HWKVM DONE line)".into());
    }
    if !missing.is_empty() {
        return Err(format!("never passed: {missing:?}"));
    }
    Ok(())
}

/// The suite's measurements (`HWKVM INFO` lines).
pub fn infos(log: &str) -> Vec<String> {
    log.lines()
        .filter_map(|l| l.trim_end().strip_prefix("HWKVM INFO "))
        .map(str::to_string)
        .collect()
}

/// The last `n` lines of `log`.
pub fn tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
