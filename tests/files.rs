//! Files inside the root only: every escape fails, the root is read-only, and the writable
//! directory behaves like a normal one.

mod common;

use common::*;

#[test]
fn file_calls_work_and_escapes_fail() {
    let root = tempfile::tempdir().unwrap();
    let program = guest("files", Link::Static);
    let guest_path = install(root.path(), &program, "files");
    std::fs::create_dir_all(root.path().join("data")).unwrap();
    std::fs::write(root.path().join("data/hello.txt"), "hello, file\n").unwrap();
    std::os::unix::fs::symlink("/etc/hostname", root.path().join("escape-abs")).unwrap();
    std::os::unix::fs::symlink("../../../../etc/hostname", root.path().join("escape-rel")).unwrap();
    std::os::unix::fs::symlink("/loop", root.path().join("loop")).unwrap();
    let out = run(&["--root", root.path().to_str().unwrap(), &guest_path]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(stdout(&out).contains("PASSED"), "{}", describe(&out));
    // Nothing leaked into the read-only root.
    assert!(!root.path().join("data/new").exists());
    assert!(!root.path().join("tmp/out.txt").exists());
}

#[test]
fn writable_directories_persist_in_the_data_dir() {
    let root = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let busybox = std::path::Path::new("/bin/busybox");
    assert!(
        busybox.exists(),
        "install busybox-static (scripts/test.sh does)"
    );
    let guest_path = install(root.path(), busybox, "busybox");
    let out = run(&[
        "--root",
        root.path().to_str().unwrap(),
        "--writable",
        "/var/state",
        "--data-dir",
        data.path().to_str().unwrap(),
        &guest_path,
        "sh",
        "-c",
        "echo kept > /var/state/file && read line < /var/state/file && echo $line",
    ]);
    assert_eq!(stdout(&out), "kept\n", "{}", describe(&out));
    assert_eq!(
        std::fs::read_to_string(data.path().join("var/state/file")).unwrap(),
        "kept\n"
    );
}

/// fcntl and flock locks are the host file's: an app's own never conflict with it (as
/// Linux has them), and two apps sharing a data directory see each other's; a blocking
/// request waits, and a signal interrupts it.
#[test]
fn file_locks_hold_between_apps_sharing_a_data_directory() {
    let program = guest("locks", Link::Static);
    let data = tempfile::tempdir().unwrap();
    let common = |mode: &str| -> Vec<String> {
        [
            "--data-dir",
            data.path().to_str().unwrap(),
            "--writable",
            "/data",
            "--timeout",
            "30",
            program.to_str().unwrap(),
            mode,
            "/data/db",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let own = common("self");
    let out = run(&own.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(stdout(&out).contains("PASSED"), "{}", describe(&out));
    let mut hold = common("hold");
    hold.push("5".into());
    let mut holder = picocenter()
        .arg("run")
        .args(&hold)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(holder.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line, "held\n");
    let probe = common("probe");
    let out = run(&probe.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(stdout(&out).contains("PASSED"), "{}", describe(&out));
    let _ = holder.kill();
    let _ = holder.wait();
}
