//! Files inside the root only: every escape fails, the root is read-only, and the writable
//! directory behaves like a normal one.

mod common;

use common::*;

/// Debian's static busybox, which scripts/test.sh installs.
fn busybox() -> &'static std::path::Path {
    let busybox = std::path::Path::new("/bin/busybox");
    assert!(
        busybox.exists(),
        "install busybox-static (scripts/test.sh does)"
    );
    busybox
}

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
    let busybox = busybox();
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

/// A host program right in a writable directory (such as `run /tmp/prog`, /tmp being
/// writable by default) runs from a copy in that directory: the directory stays writable,
/// and what the app writes to its copy never reaches the host's file.
#[test]
fn a_host_program_in_a_writable_directory_leaves_it_writable() {
    let busybox = busybox();
    let dir = tempfile::tempdir().unwrap();
    let dir_path = dir.path().to_str().unwrap();
    let program = dir.path().join("busybox");
    std::fs::copy(busybox, &program).unwrap();
    let original = std::fs::read(&program).unwrap();
    let path = program.to_str().unwrap();
    let script = format!(
        "echo kept > {dir_path}/new && read line < {dir_path}/new && echo $line && echo overwritten > {path} && echo done"
    );
    let out = run(&["--writable", dir_path, path, "sh", "-c", &script]);
    assert_eq!(stdout(&out), "kept\ndone\n", "{}", describe(&out));
    assert_eq!(
        std::fs::read(&program).unwrap(),
        original,
        "the host's program changed"
    );
    assert!(
        !dir.path().join("new").exists(),
        "the app wrote the host's directory"
    );
}

/// The attack on that copy: an earlier app left a symlink to a host file where the copy
/// goes, in a data directory kept between runs. The copy replaces the link and never
/// writes through it.
#[test]
fn the_program_s_copy_never_writes_through_a_link_left_in_the_data_directory() {
    let busybox = busybox();
    let dir = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let victim = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(victim.path(), "host secret\n").unwrap();
    let program = dir.path().join("busybox");
    std::fs::copy(busybox, &program).unwrap();
    let dir_path = dir.path().to_str().unwrap();
    let backing = data.path().join(dir_path.trim_start_matches('/'));
    std::fs::create_dir_all(&backing).unwrap();
    std::os::unix::fs::symlink(victim.path(), backing.join("busybox")).unwrap();
    let out = run(&[
        "--writable",
        dir_path,
        "--data-dir",
        data.path().to_str().unwrap(),
        program.to_str().unwrap(),
        "echo",
        "ran",
    ]);
    assert_eq!(stdout(&out), "ran\n", "{}", describe(&out));
    assert_eq!(
        std::fs::read_to_string(victim.path()).unwrap(),
        "host secret\n"
    );
    assert!(
        !backing.join("busybox").is_symlink(),
        "the link is still there"
    );
}

/// The same attack a level up: a directory on the way to a writable directory's backing
/// directory is a symlink to a host directory (which an app sharing the data directory
/// can make). The app is refused before anything is made, given or bound there.
#[test]
fn a_link_on_the_way_to_a_writable_directory_is_refused() {
    let busybox = busybox();
    let root = tempfile::tempdir().unwrap();
    let guest_path = install(root.path(), busybox, "busybox");
    let data = tempfile::tempdir().unwrap();
    let victim = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(victim.path(), data.path().join("var")).unwrap();
    let out = run(&[
        "--root",
        root.path().to_str().unwrap(),
        "--writable",
        "/var/state",
        "--data-dir",
        data.path().to_str().unwrap(),
        &guest_path,
        "true",
    ]);
    assert_ne!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("refusing"),
        "{}",
        describe(&out)
    );
    assert!(
        !victim.path().join("state").exists(),
        "made in the host's directory"
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

/// Names that are not UTF-8, memfd_create, copy_file_range, splice, tee, mincore, an
/// IPv6-only listener beside an IPv4 one (redis's default `bind * -::*`) and getifaddrs
/// through rtnetlink: the same checks pass natively and in a picoprocess (which also
/// refuses netlink requests that would change something).
#[test]
fn abi_calls_behave_as_natively() {
    let program = guest("abi", Link::Static);
    let native_dir = tempfile::tempdir().unwrap();
    let native = std::process::Command::new(&program)
        .arg(native_dir.path())
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&native.stdout).contains("PASSED"),
        "natively: {}",
        describe(&native)
    );
    let data = tempfile::tempdir().unwrap();
    let out = run(&[
        "--data-dir",
        data.path().to_str().unwrap(),
        "--writable",
        "/data",
        "--timeout",
        "30",
        program.to_str().unwrap(),
        "/data",
        "confined",
    ]);
    assert!(stdout(&out).contains("PASSED"), "{}", describe(&out));
    // The names reached the host as the app's bytes: nothing is left, and nothing was
    // made under another spelling.
    assert_eq!(
        std::fs::read_dir(data.path().join("data")).unwrap().count(),
        0
    );
}

/// A `#!` script runs through its interpreter, with Linux's argv, also without --root
/// (the temporary root holds the interpreter); Python and Perl find their standard
/// libraries and native modules there.
#[test]
fn scripts_and_interpreters_run_without_a_root() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let script = dir.path().join("args.sh");
    std::fs::write(&script, "#!/bin/sh -e\necho \"argv0=$0 args=$*\"\n").unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let script = script.to_str().unwrap();
    let out = run(&[script, "one", "two"]);
    assert_eq!(
        stdout(&out),
        format!("argv0={script} args=one two\n"),
        "{}",
        describe(&out)
    );
    let out = run(&[
        "/usr/bin/python3",
        "-c",
        "import json, encodings, sqlite3; print(json.dumps(sqlite3.sqlite_version != ''))",
    ]);
    assert_eq!(stdout(&out), "true\n", "{}", describe(&out));
    let out = run(&[
        "/usr/bin/perl",
        "-e",
        "use strict; use POSIX qw(floor); print floor(2.5), \"\\n\"",
    ]);
    assert_eq!(stdout(&out), "2\n", "{}", describe(&out));
}

/// Pseudo-terminals (tests/guests/pty.c): openpty, posix_openpt with ptsname and an open
/// by name, termios and window sizes, data both ways, as natively; a number the app did
/// not open is nobody's.
#[test]
fn pseudo_terminals_work_as_natively() {
    let program = guest("pty", Link::Static);
    let native = std::process::Command::new(&program).output().unwrap();
    assert!(
        String::from_utf8_lossy(&native.stdout).contains("PASSED"),
        "natively: {}",
        describe(&native)
    );
    let out = run(&["--timeout", "30", program.to_str().unwrap()]);
    assert!(stdout(&out).contains("PASSED"), "{}", describe(&out));
}

/// pread64, fstat, read and lseek of a file of the read-only root, with Linux's edge cases
/// and offsets shared with a dup and a forked child (tests/guests/guest_reads.c): the
/// doorbell answers them from a file window once the file has been read a few times, and
/// the program prints exactly what it prints natively, with windows, without them
/// (`--no-guest-reads`) and with every forwarded call an exit. With windows, most of its
/// reads never reach the VMM.
#[test]
fn reads_answered_in_the_guest_match_native_reads() {
    let program = guest("guest_reads", Link::Static);
    let program = program.to_str().unwrap();
    let native = std::process::Command::new(program)
        .arg(program)
        .output()
        .unwrap();
    assert!(native.status.success(), "natively: {}", describe(&native));
    let expected = String::from_utf8_lossy(&native.stdout).into_owned();
    let traced = |flags: &[&str]| {
        let mut args = vec!["--trace-syscalls", "--timeout", "60"];
        args.extend_from_slice(flags);
        args.extend_from_slice(&[program, program]);
        let out = run(&args);
        assert_eq!(stdout(&out), expected, "{flags:?}: {}", describe(&out));
        ["pread64", "newfstatat", "read", "lseek"].map(|name| traced_calls(&out.stderr, name))
    };
    let [preads, stats, reads, seeks] = traced(&[]);
    let [all_preads, all_stats, all_reads, all_seeks] = traced(&["--no-guest-reads"]);
    let [exit_preads, _, exit_reads, _] = traced(&["--no-mailbox"]);
    assert!(
        all_preads > 7000 && all_stats > 5000,
        "{all_preads} {all_stats}"
    );
    // Forwarded: the reads of each file before it has a window (see
    // `kernel::windows::READS_BEFORE_WINDOW`), those of fds past the table's 64, reads
    // and seeks of a file shared with a dup or a forked child, and the edge cases.
    assert!(preads < all_preads / 4, "{preads} of {all_preads}");
    assert!(stats < 20, "{stats} of {all_stats}");
    assert!(reads * 2 < all_reads, "{reads} of {all_reads}");
    assert!(seeks * 2 < all_seeks, "{seeks} of {all_seeks}");
    assert_eq!((exit_preads, exit_reads), (preads, reads));
}

/// A file of a `--root` directory that the host shrinks while the app reads it through a
/// file window: the app is not killed (KVM cannot map the pages past the new end), its
/// windows are taken down and its reads see what Linux would, the file's new size.
#[test]
fn a_file_that_shrinks_on_the_host_under_a_window_ends_the_window_not_the_app() {
    use std::io::BufRead;
    // The program in the root's /bin: the app's /tmp is a writable directory of its own
    // (hiding the root's), and a clone under /tmp would build it there.
    let root = tempfile::tempdir().unwrap();
    let program = install(
        root.path(),
        &guest("guest_reads", Link::Static),
        "guest_reads",
    );
    let data = root.path().join("data");
    std::fs::write(&data, vec![b'x'; 300_000]).unwrap();
    let mut cmd = picocenter();
    cmd.args(["run", "--timeout", "60", "--root"])
        .arg(root.path())
        .arg(&program)
        .args(["/data", "watch"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut lines = Vec::new();
    for line in stdout.lines() {
        let line = line.unwrap();
        if lines.len() == 10 {
            // Shrunk in place, as `truncate` or a copy over the file would.
            std::fs::OpenOptions::new()
                .write(true)
                .open(&data)
                .unwrap()
                .set_len(0)
                .unwrap();
        }
        lines.push(line);
    }
    let out = child.wait_with_output().unwrap();
    let all = lines.join("\n");
    assert!(out.status.success(), "{all}\n{}", describe(&out));
    assert_eq!(lines[5], "5: pread 65536 size 300000", "{all}");
    assert_eq!(lines.last().unwrap(), "PASSED: 0 failures", "{all}");
    assert_eq!(lines[lines.len() - 2], "79: pread 0 size 0", "{all}");
}

/// A read whose offset + count overflows fails with EINVAL, as Linux checks it, also when
/// the doorbell keeps the file's offset (the seek before it goes through the VMM). On a
/// root on tmpfs, which lets a file's offset go that far (ext4 does not).
#[test]
fn a_read_past_the_largest_offset_fails_as_on_linux() {
    let dir = tempfile::tempdir().unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=16m", "picocenter-test"])
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(
        mounted.success(),
        "mounting a tmpfs (the tests run as root)"
    );
    struct Unmount<'a>(&'a std::path::Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(self.0).status();
        }
    }
    let _unmount = Unmount(dir.path());
    let program = install(
        dir.path(),
        &guest("guest_reads", Link::Static),
        "guest_reads",
    );
    std::fs::write(dir.path().join("data"), vec![b'x'; 100_000]).unwrap();
    let native = std::process::Command::new(dir.path().join("bin/guest_reads"))
        .arg(dir.path().join("data"))
        .arg("huge")
        .output()
        .unwrap();
    let root = dir.path().to_str().unwrap();
    for flags in [&[][..], &["--no-guest-reads"][..]] {
        let mut args = vec!["--root", root];
        args.extend_from_slice(flags);
        args.extend_from_slice(&[&program, "/data", "huge"]);
        let out = run(&args);
        assert_eq!(
            stdout(&out),
            stdout(&native),
            "{flags:?}: {}",
            describe(&out)
        );
        assert!(
            stdout(&out).contains("read past the largest offset: errno 0\nPASSED"),
            "{}",
            describe(&out)
        );
    }
}
