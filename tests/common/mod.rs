//! Shared helpers for the end-to-end tests: the picocenter binary, guest programs compiled
//! from tests/guests, and roots assembled from host files.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How a guest program is linked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// `-static`.
    Static,
    /// `-static-pie`.
    StaticPie,
    /// Dynamically linked against glibc.
    Dynamic,
}

/// Fails loudly when this machine has no KVM: every Picocenter host has it, so a missing
/// /dev/kvm is a broken machine, not a reason to skip.
pub fn require_kvm() {
    assert!(
        Path::new("/dev/kvm").exists(),
        "/dev/kvm is missing: Picocenter's tests run real picoprocesses and need KVM"
    );
}

/// The picocenter binary under test.
pub fn picocenter() -> Command {
    require_kvm();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_picocenter"));
    cmd.stdin(Stdio::null());
    // One state directory for the whole test run: images built once serve every test,
    // and control sockets stay out of the host's /var/lib/picocenter.
    cmd.env("PICOCENTER_STATE_DIR", state_dir());
    cmd
}

/// The state directory the tests share (see [`picocenter`]).
pub fn state_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("state")
}

static COMPILE: Mutex<()> = Mutex::new(());

/// Compiles tests/guests/NAME.c with gcc (once per link kind) and returns the binary.
pub fn guest(name: &str, link: Link) -> PathBuf {
    let _guard = COMPILE.lock().unwrap_or_else(|e| e.into_inner());
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("guests");
    std::fs::create_dir_all(&dir).unwrap();
    let suffix = match link {
        Link::Static => "static",
        Link::StaticPie => "static-pie",
        Link::Dynamic => "dynamic",
    };
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/guests/{name}.c"));
    let out = dir.join(format!("{name}-{suffix}"));
    let fresh = |path: &Path| {
        let built = std::fs::metadata(path).and_then(|m| m.modified());
        let source_time = std::fs::metadata(&source).and_then(|m| m.modified());
        matches!((built, source_time), (Ok(b), Ok(s)) if b >= s)
    };
    if !fresh(&out) {
        let tmp = dir.join(format!("{name}-{suffix}.{}.tmp", std::process::id()));
        let mut cmd = Command::new("gcc");
        cmd.args(["-O2", "-g", "-w", "-o"]).arg(&tmp).arg(&source);
        match link {
            Link::Static => cmd.arg("-static"),
            Link::StaticPie => cmd.arg("-static-pie"),
            Link::Dynamic => &mut cmd,
        };
        let status = cmd.status().expect("gcc must be installed");
        assert!(status.success(), "compiling {}", source.display());
        std::fs::rename(&tmp, &out).unwrap();
    }
    out
}

/// Runs `cmd` with a hard time limit, so that a hung picoprocess fails the test instead of
/// hanging it.
pub fn run_with_limit(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning picocenter");
    let started = Instant::now();
    loop {
        if child.try_wait().expect("waiting for picocenter").is_some() {
            return child.wait_with_output().unwrap();
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "picocenter ran longer than {limit:?}\nstdout: {}\nstderr: {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `picocenter run ARGS...` with a 60 s limit.
pub fn run(args: &[&str]) -> Output {
    let mut cmd = picocenter();
    cmd.arg("run").args(args);
    run_with_limit(&mut cmd, Duration::from_secs(60))
}

/// Everything about a finished run, for assertion messages.
pub fn describe(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The app's stdout.
pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A temporary root holding the given host files (and the symlinks on their paths).
pub fn root_with(files: &[&Path]) -> tempfile::TempDir {
    let root = tempfile::Builder::new()
        .prefix("picocenter-test-root-")
        .tempdir()
        .unwrap();
    for file in files {
        picocenter_images::rootfs::add_path(root.path(), file).unwrap();
    }
    root
}

/// Copies a guest binary into `root` at `/bin/NAME` and returns its guest path.
pub fn install(root: &Path, binary: &Path, name: &str) -> String {
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::copy(binary, root.join("bin").join(name)).unwrap();
    format!("/bin/{name}")
}

/// The median of `values` (sorted in place); benchmarks report it.
pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}
