//! Real programs run to completion in a picoprocess with the right output and status.

mod common;

use common::*;
use std::path::Path;

fn assert_hello(link: Link) {
    let program = guest("hello", link);
    let out = run(&[program.to_str().unwrap(), "7"]);
    assert_eq!(out.status.code(), Some(7), "{}", describe(&out));
    assert!(
        stdout(&out).starts_with("hello from a picoprocess: argc=2"),
        "{}",
        describe(&out)
    );
}

#[test]
fn static_program_runs() {
    assert_hello(Link::Static);
}

#[test]
fn static_pie_program_runs() {
    assert_hello(Link::StaticPie);
}

/// A host program's root is kept for the program's next run, and made again when the
/// program changes (rewritten in place, or replaced by another file): a run never finds
/// an old copy. A program changed within the last two seconds gets a root for that run
/// alone (a change within one tick of the file system's clock would not show).
#[test]
fn a_kept_program_root_follows_changes_to_the_program() {
    let dir = tempfile::tempdir().unwrap();
    let program = dir.path().join("prog");
    let hello = guest("hello", Link::Static);
    let ids = guest("ids", Link::Static);
    // Modified `seconds` ago: settled, as a program is that was not just written.
    let settle = |seconds: u64| {
        let file = std::fs::File::options().write(true).open(&program).unwrap();
        file.set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(seconds))
            .unwrap();
    };
    let run = || {
        let out = picocenter()
            .env("RUST_LOG", "debug")
            .arg("run")
            .arg(&program)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
        let said = String::from_utf8_lossy(&out.stderr);
        let kept = said.contains("the program's root, kept from an earlier run");
        (stdout(&out), kept)
    };
    std::fs::copy(&hello, &program).unwrap();
    let (first, kept) = run();
    assert!(first.starts_with("hello from a picoprocess"), "{first}");
    assert!(!kept);
    let (_, kept) = run();
    assert!(
        !kept,
        "a root made from a program written just now was kept"
    );
    settle(60);
    run();
    let (second, kept) = run();
    assert!(second.starts_with("hello from a picoprocess"), "{second}");
    assert!(kept, "the root was not kept");

    // Rewritten in place (the same inode, a hard link in the root would show it too).
    std::fs::write(&program, std::fs::read(&ids).unwrap()).unwrap();
    settle(50);
    let (third, kept) = run();
    assert!(third.contains("PASSED"), "{third}");
    assert!(!kept, "a root made from the old program was used");
    let (third, kept) = run();
    assert!(third.contains("PASSED") && kept, "{third}");

    // Replaced by another file (a new inode: a hard link in the root would not follow).
    let next = dir.path().join("next");
    std::fs::copy(&hello, &next).unwrap();
    std::fs::rename(&next, &program).unwrap();
    settle(40);
    let (fourth, kept) = run();
    assert!(fourth.starts_with("hello from a picoprocess"), "{fourth}");
    assert!(!kept, "a root made from the old program was used");
    let (_, kept) = run();
    assert!(kept, "the new root was not kept");

    // A root holds hard links to host files (set-id programs among them, or copies of
    // them across file systems): no other user may reach them through it.
    use std::os::unix::fs::PermissionsExt;
    let roots = state_dir().join("roots");
    let mode = std::fs::metadata(&roots).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700, "{} is {mode:o}", roots.display());
}

#[test]
fn dynamic_program_runs() {
    assert_hello(Link::Dynamic);
}

#[test]
fn dynamic_workload_matches_native() {
    let program = guest("workload", Link::Dynamic);
    let native = std::process::Command::new(&program)
        .arg(std::env::temp_dir().join(format!("workload-native-{}", std::process::id())))
        .output()
        .unwrap();
    assert!(native.status.success());
    let out = run(&[program.to_str().unwrap(), "/tmp/workload.txt"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(stdout(&out), String::from_utf8_lossy(&native.stdout));
}

fn busybox_root() -> tempfile::TempDir {
    let busybox = Path::new("/bin/busybox");
    assert!(
        busybox.exists(),
        "/bin/busybox is missing: install Debian's busybox-static (scripts/test.sh does)"
    );
    let root = root_with(&[busybox]);
    std::fs::create_dir_all(root.path().join("data")).unwrap();
    std::fs::write(
        root.path().join("data/words.txt"),
        "one two three\nfour five\n",
    )
    .unwrap();
    root
}

fn busybox(root: &Path, args: &[&str]) -> std::process::Output {
    let mut all = vec!["--root", root.to_str().unwrap(), "/bin/busybox"];
    all.extend_from_slice(args);
    run(&all)
}

#[test]
fn busybox_applets_work() {
    let root = busybox_root();
    let out = busybox(root.path(), &["echo", "hello", "world"]);
    assert_eq!(stdout(&out), "hello world\n", "{}", describe(&out));

    let out = busybox(root.path(), &["cat", "/data/words.txt"]);
    assert_eq!(
        stdout(&out),
        "one two three\nfour five\n",
        "{}",
        describe(&out)
    );

    let out = busybox(root.path(), &["wc", "/data/words.txt"]);
    let text = stdout(&out);
    let counts: Vec<&str> = text.split_whitespace().take(3).collect();
    assert_eq!(counts, ["2", "5", "24"], "{}", describe(&out));

    let out = busybox(root.path(), &["sha256sum", "/data/words.txt"]);
    let native = std::process::Command::new("sha256sum")
        .arg(root.path().join("data/words.txt"))
        .output()
        .unwrap();
    let digest = |s: &str| s.split_whitespace().next().unwrap_or_default().to_string();
    assert_eq!(
        digest(&stdout(&out)),
        digest(&String::from_utf8_lossy(&native.stdout)),
        "{}",
        describe(&out)
    );

    let out = busybox(root.path(), &["ls", "-l", "/data"]);
    let listing = stdout(&out);
    assert!(listing.contains("words.txt"), "{}", describe(&out));
    assert!(listing.contains("-rw-"), "{}", describe(&out));
    assert!(listing.contains(" 24 "), "{}", describe(&out));
}

#[test]
fn busybox_shell_exit_status() {
    let root = busybox_root();
    let out = busybox(root.path(), &["sh", "-c", "echo $((6*7)); exit 3"]);
    assert_eq!(stdout(&out), "42\n", "{}", describe(&out));
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
}

#[test]
fn python3_runs_with_its_standard_library() {
    let python = Path::new("/usr/bin/python3");
    let real = std::fs::canonicalize(python).unwrap();
    let files = picocenter_images::closure::closure(&real).unwrap();
    let mut paths: Vec<&Path> = files.iter().map(|p| p.as_path()).collect();
    paths.push(python);
    let stdlib = Path::new("/usr/lib/python3.11");
    paths.push(stdlib);
    let root = root_with(&paths);
    let code = "import json,hashlib; print(hashlib.sha256(json.dumps(list(range(10**5))).encode()).hexdigest())";
    let native = std::process::Command::new(python)
        .args(["-c", code])
        .output()
        .unwrap();
    let out = run(&[
        "--root",
        root.path().to_str().unwrap(),
        "/usr/bin/python3",
        "-c",
        code,
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(stdout(&out), String::from_utf8_lossy(&native.stdout));
}

#[test]
fn help_explains_every_run_option() {
    let out = picocenter().args(["run", "--help"]).output().unwrap();
    let help = stdout(&out);
    for option in [
        "--root",
        "--memory",
        "--env",
        "--cwd",
        "--name",
        "--timeout",
        "--writable",
        "--trace-syscalls",
        "--env-file",
        "--store",
    ] {
        assert!(help.contains(option), "--help lacks {option}:\n{help}");
    }
}

#[test]
fn env_cwd_and_name_reach_the_app() {
    let root = busybox_root();
    // Secrets come from a file, so they never show on a command line.
    let env_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(env_file.path(), "# the app's secrets\n\nSECRET=s3cr3t\n").unwrap();
    let out = run(&[
        "--root",
        root.path().to_str().unwrap(),
        "--env-file",
        env_file.path().to_str().unwrap(),
        "--env",
        "GREETING=hi",
        "--cwd",
        "/data",
        "--name",
        "myapp",
        "/bin/busybox",
        "sh",
        "-c",
        "echo $GREETING $SECRET; pwd; hostname",
    ]);
    assert_eq!(
        stdout(&out),
        "hi s3cr3t\n/data\nmyapp\n",
        "{}",
        describe(&out)
    );
}

/// The vDSO answers libc's time calls with no syscall (static and dynamic glibc), agrees
/// with the VMM's answers, and never goes backwards; time(2) made with `syscall` is
/// answered in the doorbell, never by the VMM.
#[test]
fn time_calls_go_through_the_vdso() {
    for link in [Link::Static, Link::Dynamic] {
        let program = guest("vdso", link);
        let out = run(&[
            "--trace-syscalls",
            "--timeout",
            "60",
            program.to_str().unwrap(),
        ]);
        assert!(stdout(&out).contains("PASSED"), "{}", describe(&out));
        assert_eq!(traced_calls(&out.stderr, "time"), 0, "{}", describe(&out));
    }
}
