//! A hostile tenant tries to reach host files and sockets through every path-taking call,
//! with absolute and relative symlinks planted in the image's root and in a seeded data
//! directory. The sandbox is judged by the host: its files and sockets must be untouched.

mod common;

use common::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Host things no app may reach: a root-only file in a directory of its own, and a
/// listening AF_UNIX socket.
struct HostTargets {
    _dir: tempfile::TempDir,
    secret_dir: PathBuf,
    secret: PathBuf,
    socket: PathBuf,
    listener: std::os::unix::net::UnixListener,
}

const SECRET: &[u8] = b"host secret\n";

impl HostTargets {
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("picocenter-escape-")
            .tempdir_in("/tmp")
            .unwrap();
        let secret_dir = dir.path().join("hostdir");
        std::fs::create_dir(&secret_dir).unwrap();
        let secret = secret_dir.join("secret");
        std::fs::write(&secret, SECRET).unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        let socket = dir.path().join("host.sock");
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        listener.set_nonblocking(true).unwrap();
        Self {
            _dir: dir,
            secret_dir,
            secret,
            socket,
            listener,
        }
    }

    /// (name, target) of the symlinks an attacker plants: absolute and relative, to the
    /// file, its directory and the socket.
    fn links(&self) -> Vec<(&'static str, String)> {
        let relative = |path: &Path| format!("../../../../../../../..{}", path.display());
        vec![
            ("abs-file", self.secret.display().to_string()),
            ("rel-file", relative(&self.secret)),
            ("abs-dir", self.secret_dir.display().to_string()),
            ("rel-dir", relative(&self.secret_dir)),
            ("abs-sock", self.socket.display().to_string()),
            ("rel-sock", relative(&self.socket)),
        ]
    }

    fn plant(&self, dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        for (name, target) in self.links() {
            std::os::unix::fs::symlink(target, dir.join(name)).unwrap();
        }
    }

    /// Panics unless the host's file, directory and socket are exactly as they were.
    fn assert_untouched(&self, context: &str) {
        assert_eq!(std::fs::read(&self.secret).unwrap(), SECRET, "{context}");
        let meta = std::fs::metadata(&self.secret).unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o600, "{context}: mode changed");
        assert_eq!(meta.uid(), 0, "{context}: owner changed");
        assert!(
            meta.mtime() > 1_000_000_000,
            "{context}: times changed to {}",
            meta.mtime()
        );
        let entries: Vec<_> = std::fs::read_dir(&self.secret_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(entries, ["secret"], "{context}: files planted on the host");
        match self.listener.accept() {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            other => panic!("{context}: the host socket was reached: {other:?}"),
        }
    }
}

/// Runs the escape guest in a root whose `/` and writable `/data` hold the planted links.
fn run_escape(host: &HostTargets, args: &[&str], extra: &[&str]) -> std::process::Output {
    let root = tempfile::tempdir().unwrap();
    host.plant(root.path());
    let program = install(root.path(), &guest("escape", Link::Static), "escape");
    let data = tempfile::tempdir().unwrap();
    host.plant(&data.path().join("data"));
    let mut cmd = vec![
        "--timeout",
        "60",
        "--root",
        root.path().to_str().unwrap(),
        "--data-dir",
        data.path().to_str().unwrap(),
        "--writable",
        "/data",
        "--writable",
        "/tmp",
    ];
    cmd.extend_from_slice(extra);
    cmd.push(&program);
    cmd.extend_from_slice(args);
    run(&cmd)
}

#[test]
fn planted_symlinks_never_reach_host_files_or_sockets() {
    let host = HostTargets::new();
    let mut paths = Vec::new();
    for (name, _) in host.links() {
        paths.push(format!("/{name}"));
        paths.push(format!("/data/{name}"));
        // A path that goes through the link, and one that climbs out of the mount first.
        paths.push(format!("/data/../data/{name}/secret"));
    }
    let mut args = vec!["escape"];
    args.extend(paths.iter().map(String::as_str));
    let out = run_escape(&host, &args, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    host.assert_untouched(&describe(&out));
    // What the sandbox let through acted only on the app's own links: lchown of a link
    // in its data directory (a no-op inside the app's own files).
    let through: Vec<String> = stdout(&out)
        .lines()
        .filter(|l| l.starts_with("LET THROUGH"))
        .filter(|l| !l.starts_with("LET THROUGH: lchown /data/"))
        // A symlink the app makes is only text: resolving it stays inside the mount.
        .filter(|l| !l.starts_with("LET THROUGH: symlink "))
        .map(str::to_string)
        .collect();
    assert!(through.is_empty(), "{through:#?}\n{}", describe(&out));
    // Every path was tried.
    let attempts = stdout(&out).lines().filter(|l| l.contains(": ")).count();
    assert!(attempts >= paths.len() * 15, "{}", describe(&out));
    println!(
        "escape: {attempts} attempts through {} planted paths, none reached the host",
        paths.len()
    );
}

#[test]
fn hard_and_symbolic_links_stay_inside_their_writable_mount() {
    let host = HostTargets::new();
    let out = run_escape(&host, &["links"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(stdout(&out).contains("PASSED"), "{}", describe(&out));
    host.assert_untouched(&describe(&out));
}

#[test]
fn files_the_app_makes_never_carry_set_id_bits() {
    let host = HostTargets::new();
    let out = run_escape(&host, &["setid", "/data"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let text = stdout(&out);
    for line in [
        "created 755",
        "after fchmod 755",
        "after chmod 755",
        "mkdir 755",
    ] {
        assert!(text.contains(line), "{line}: {}", describe(&out));
    }
}

#[test]
fn host_devices_cannot_be_changed_even_under_a_writable_dev() {
    let host = HostTargets::new();
    let before = std::fs::metadata("/dev/null").unwrap();
    let out = run_escape(&host, &["device"], &["--writable", "/dev"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(stdout(&out).contains("PASSED"), "{}", describe(&out));
    let after = std::fs::metadata("/dev/null").unwrap();
    assert_eq!(before.mode(), after.mode());
    assert_eq!(before.uid(), after.uid());
}

#[test]
fn the_default_address_is_the_apps_own_and_host_services_stay_out_of_reach() {
    let host = HostTargets::new();
    let service = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    service.set_nonblocking(true).unwrap();
    let port = service.local_addr().unwrap().port().to_string();
    let out = run_escape(&host, &["network", &port], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(stdout(&out).contains("PASSED"), "{}", describe(&out));
    let bound = stdout(&out)
        .lines()
        .find_map(|l| l.strip_prefix("bound to ").map(str::to_string))
        .expect("the guest reports its address");
    assert!(bound.starts_with("127.100."), "{bound}");
    assert!(
        service.accept().is_err(),
        "the host service was reached: {}",
        describe(&out)
    );
}

/// The stats a running app's control socket reports, as JSON, once the VMM runs jailed
/// (the socket answers from before the VMM drops to its own uid, while it builds the VM).
fn stats_of(name: &str) -> serde_json::Value {
    use std::io::{BufRead, Write};
    let socket = state_dir().join("run").join(format!("{name}.sock"));
    for _ in 0..500 {
        if let Ok(mut stream) = std::os::unix::net::UnixStream::connect(&socket) {
            stream.write_all(b"{\"op\":\"stats\"}\n").unwrap();
            let mut line = String::new();
            std::io::BufReader::new(stream)
                .read_line(&mut line)
                .unwrap();
            if let Ok(value) = serde_json::from_str::<serde_json::Value>(&line) {
                if value["uid"].as_u64().is_some_and(|uid| uid != 0) {
                    return value;
                }
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!(
        "{name} never answered as a jailed VMM on {}",
        socket.display()
    );
}

#[test]
fn the_vmm_runs_jailed_as_an_unprivileged_user_of_its_own() {
    let name = "test-jailed";
    let mut app = picocenter()
        .args([
            "run",
            "--name",
            name,
            "--timeout",
            "30",
            "/bin/busybox",
            "sleep",
            "30",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stats = stats_of(name);
    let pid = stats["pid"].as_u64().unwrap();
    // The seccomp filter is the jail's last step, after the uid: wait for it (5 s at most).
    let mut status = String::new();
    for _ in 0..500 {
        status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        if status
            .lines()
            .any(|l| l.starts_with("Seccomp:") && l.ends_with('2'))
        {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let field = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .map(|v| v.split_whitespace().collect::<Vec<_>>())
            .unwrap_or_default()
    };
    let uid: u32 = field("Uid:")[0].parse().unwrap();
    assert!(uid >= 1000, "{status}");
    assert_eq!(stats["uid"].as_u64(), Some(u64::from(uid)));
    assert!(
        field("Uid:").iter().all(|id| *id == uid.to_string()),
        "{status}"
    );
    assert_eq!(field("CapEff:"), ["0000000000000000"], "{status}");
    assert_eq!(field("CapPrm:"), ["0000000000000000"], "{status}");
    assert_eq!(field("NoNewPrivs:"), ["1"], "{status}");
    assert_eq!(field("Seccomp:"), ["2"], "a seccomp filter is on: {status}");
    // Its root holds only what it needs: no /etc, /home, /root, /usr of the host.
    let mut seen: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/root"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    seen.sort();
    for host_only in ["etc", "home", "root", "usr", "boot"] {
        assert!(!seen.iter().any(|s| s == host_only), "{seen:?}");
    }
    assert!(seen.iter().any(|s| s == "dev") && seen.iter().any(|s| s == "proc"));
    // Two apps never share a user.
    let other = "test-jailed-other";
    let mut second = picocenter()
        .args([
            "run",
            "--name",
            other,
            "--timeout",
            "30",
            "/bin/busybox",
            "sleep",
            "30",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    assert_ne!(stats_of(other)["uid"], stats["uid"]);
    for child in [&mut app, &mut second] {
        let _ = child.kill();
        let _ = child.wait();
    }
}
