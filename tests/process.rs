//! Process basics, and apps of several processes: fork, exec and wait in C, busybox shells
//! and Python's subprocess.

mod common;

use common::*;

/// Runs guest `name`, static and dynamic, and checks that its own checks pass.
fn guest_passes(name: &str) {
    for link in [Link::Static, Link::Dynamic] {
        let program = guest(name, link);
        let out = run(&[program.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(0), "{link:?}: {}", describe(&out));
        assert!(stdout(&out).contains("PASSED"), "{}", describe(&out));
    }
}

#[test]
fn process_basics_work() {
    guest_passes("process");
}

/// fork, vfork, posix_spawn, execve, wait4 and waitid, pipes, copy-on-write, SIGCHLD,
/// process groups and kill between processes (tests/guests/fork.c).
#[test]
fn the_app_s_proc_lists_its_processes_and_fds() {
    guest_passes("procfs");
}

/// User and group ids (tests/guests/ids.c): set*id by Linux's rules, kept by fork, saved
/// by execve, shown in /proc/self/status.
#[test]
fn user_and_group_ids_change_as_linux_allows() {
    guest_passes("ids");
}

#[test]
fn fork_exec_and_wait_work() {
    guest_passes("fork");
}

/// Job control (tests/guests/jobs.c): SIGSTOP, SIGTSTP and SIGCONT stop and continue a
/// child, which wait4 (WUNTRACED, WCONTINUED), waitid, SIGCHLD and /proc report.
#[test]
fn job_control_stops_and_continues_a_child() {
    guest_passes("jobs");
}

/// Memory shared between processes (tests/guests/shared.c): shared anonymous, file and
/// memfd mappings, a named semaphore four processes wait on, a process-shared condition
/// variable, and SIGBUS past the end of a shared file mapping.
#[test]
fn memory_and_futexes_are_shared_between_processes() {
    guest_passes("shared");
}

/// Python's multiprocessing: a Pool of four worker processes maps a function (its queues
/// are pipes, its locks POSIX semaphores in /dev/shm, waited on across processes), then a
/// Lock and a Queue filled by a Process; the output is what the host's Python prints.
#[test]
fn python_multiprocessing_pool_maps_over_four_processes() {
    let code = r#"
import multiprocessing as mp, os
def square(x):
    return x * x
def pid(_):
    return os.getpid()
if __name__ == "__main__":
    with mp.Pool(4) as pool:
        print(sum(pool.map(square, range(1000))))
        workers = set(pool.map(pid, range(200), chunksize=1))
        print(len(pool._pool), os.getpid() not in workers, workers <= {w.pid for w in pool._pool})
    lock = mp.Lock()
    with lock:
        print("locked")
    queue = mp.Queue()
    child = mp.Process(target=queue.put, args=("from a child",))
    child.start()
    print(queue.get())
    child.join()
    print(child.exitcode)
"#;
    let native = std::process::Command::new("python3")
        .args(["-c", code])
        .output()
        .unwrap();
    assert!(native.status.success(), "{}", describe(&native));
    let out = run(&["/usr/bin/python3", "-c", code]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(stdout(&out), stdout(&native), "{}", describe(&out));
    assert_eq!(
        stdout(&out),
        "332833500\n4 True True\nlocked\nfrom a child\n0\n"
    );
}

/// A busybox shell pipeline: every stage is a forked and exec'd process, joined by pipes.
#[test]
fn a_shell_pipeline_runs() {
    let root = busybox_shell_root();
    let out = run(&[
        "--root",
        root.path().to_str().unwrap(),
        "/bin/sh",
        "-c",
        "ls /etc | sort | head -3; echo $(( $(wc -l < /etc/passwd) + 1 ))",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(stdout(&out), "a\nb\npasswd\n4\n", "{}", describe(&out));
}

/// A shell script with functions, subshells, command substitution, a background job and
/// `wait`, a trap, and a pipeline in a loop; its output is what a native run prints.
#[test]
fn a_shell_script_with_jobs_and_traps_runs() {
    let root = busybox_shell_root();
    let script = "f() { echo \"f:$1\"; }\n\
        f one\n\
        x=$(f two); echo \"got $x\"\n\
        ( echo sub; exit 3 ); echo \"sub=$?\"\n\
        sleep 0.2 & p=$!; echo bg; wait $p; echo \"waited=$?\"\n\
        trap 'echo trapped' USR1\n\
        kill -USR1 $$\n\
        echo \"$(echo nested $(echo deeper))\"\n\
        for i in 1 2 3; do echo \"i=$i\"; done | sort -r | head -2\n\
        exit 5\n";
    std::fs::write(root.path().join("script.sh"), script).unwrap();
    let out = run(&[
        "--root",
        root.path().to_str().unwrap(),
        "/bin/sh",
        "/script.sh",
    ]);
    assert_eq!(out.status.code(), Some(5), "{}", describe(&out));
    assert_eq!(
        stdout(&out),
        "f:one\ngot f:two\nsub\nsub=3\nbg\nwaited=0\ntrapped\nnested deeper\ni=3\ni=2\n",
        "{}",
        describe(&out)
    );
}

/// Python's subprocess (vfork and execve through _posixsubprocess) runs the interpreter
/// again and reads its output through a pipe.
#[test]
fn python_subprocess_runs_a_child() {
    let code = "import subprocess, sys\n\
        r = subprocess.run([sys.executable, '-c', 'print(6 * 7)'], capture_output=True)\n\
        print(r.stdout.decode().strip(), r.returncode)\n\
        r = subprocess.run([sys.executable, '-c', 'import sys; sys.exit(3)'])\n\
        print(r.returncode)\n";
    let out = run(&["/usr/bin/python3", "-c", code]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(stdout(&out), "42 0\n3\n", "{}", describe(&out));
}

/// busybox httpd forks a process for every connection: 50 concurrent clients are all
/// answered, and no process outlives the app.
#[test]
fn busybox_httpd_forks_per_connection_for_fifty_clients() {
    let root = busybox_shell_root();
    std::fs::create_dir_all(root.path().join("www")).unwrap();
    std::fs::write(root.path().join("www/index.html"), "hello from httpd\n").unwrap();
    let server = Server::run(
        "test-busybox-httpd",
        "127.0.10.2",
        80,
        &[
            "--root",
            root.path().to_str().unwrap(),
            "/bin/busybox",
            "httpd",
            "-f",
            "-p",
            "80",
            "-h",
            "/www",
        ],
    );
    all_answered(server.address, "/", 50, b"hello from httpd\n");
    drop(server);
}

/// Debian's git: init, add, commit (which starts `git maintenance run --auto`, a child
/// process) and log, in a writable directory kept between the runs.
#[test]
fn git_commits_in_a_writable_directory() {
    let data = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        data.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    std::fs::create_dir_all(data.path().join("work/repo")).unwrap();
    let git = |args: &[&str]| {
        let mut all = vec![
            "--writable",
            "/work",
            "--data-dir",
            data.path().to_str().unwrap(),
            "--cwd",
            "/work/repo",
        ];
        for setting in [
            "HOME=/work",
            "GIT_AUTHOR_NAME=Pico",
            "GIT_AUTHOR_EMAIL=pico@example.org",
            "GIT_COMMITTER_NAME=Pico",
            "GIT_COMMITTER_EMAIL=pico@example.org",
        ] {
            all.extend(["--env", setting]);
        }
        all.push("/usr/bin/git");
        all.extend_from_slice(args);
        let out = run(&all);
        assert_eq!(
            out.status.code(),
            Some(0),
            "git {args:?}: {}",
            describe(&out)
        );
        stdout(&out)
    };
    git(&["init", "-q", "."]);
    std::fs::write(data.path().join("work/repo/hello.txt"), "hello\n").unwrap();
    git(&["add", "hello.txt"]);
    git(&["commit", "-q", "-m", "the first commit"]);
    let log = git(&["log", "--format=%s %an"]);
    assert_eq!(log, "the first commit Pico\n");
    let files = git(&["ls-files"]);
    assert_eq!(files, "hello.txt\n");
}

/// `picocenter stop` sends SIGTERM to every process of the app: a background subshell's
/// trap runs too, before the shell's own trap waits for it and exits 0.
#[test]
fn stop_signals_every_process_of_the_app() {
    use std::io::BufRead;
    let root = busybox_shell_root();
    let data = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        data.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    // Each says it is ready once its trap is set: a TERM that came before the child's
    // trap would end it without one (a race this test had under load).
    // A second child is stopped (SIGSTOP) before the stop: it is continued, so that it
    // acts on its TERM too, and the parent's wait ends.
    let script = "(trap 'echo child got TERM > /tmp/child.txt; exit 0' TERM; \
                   echo child ready; while :; do sleep 0.05; done) &\n\
        (trap 'echo stopped child got TERM > /tmp/stopped.txt; exit 0' TERM; \
         : > /tmp/stopped.ready; while :; do sleep 0.05; done) &\n\
        stopped=$!\n\
        while [ ! -e /tmp/stopped.ready ]; do sleep 0.05; done\n\
        kill -STOP $stopped\n\
        trap 'wait; echo parent got TERM; exit 0' TERM\n\
        echo ready\n\
        while :; do sleep 0.05; done\n";
    std::fs::write(root.path().join("stop.sh"), script).unwrap();
    let mut child = picocenter()
        .args(["run", "--name", "test-stop-tree", "--root"])
        .arg(root.path())
        .arg("--data-dir")
        .arg(data.path())
        .args(["/bin/sh", "/stop.sh"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut ready: Vec<String> = (0..2)
        .map(|_| lines.next().and_then(|l| l.ok()).unwrap_or_default())
        .collect();
    ready.sort();
    assert_eq!(ready, ["child ready", "ready"]);
    let stop = run_with_limit(
        picocenter().args(["stop", "test-stop-tree", "--grace", "20"]),
        std::time::Duration::from_secs(30),
    );
    assert!(stop.status.success(), "{}", describe(&stop));
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    assert_eq!(
        lines.next().and_then(|l| l.ok()).as_deref(),
        Some("parent got TERM")
    );
    let said = std::fs::read_to_string(data.path().join("tmp/child.txt")).unwrap();
    assert_eq!(said, "child got TERM\n");
    let said = std::fs::read_to_string(data.path().join("tmp/stopped.txt")).unwrap();
    assert_eq!(said, "stopped child got TERM\n");
}

/// Debian's postfix (images/postfix): its master forks and execs smtpd, cleanup, qmgr,
/// trivial-rewrite and local, which take the postfix user's ids (smtpd refuses to serve
/// as root) or the recipient's; a mail sent to port 25 lands in alice's maildir, with the
/// headers postfix adds.
#[test]
fn postfix_takes_a_mail_on_port_25_and_delivers_it_to_a_maildir() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(
        "postfix",
        "test-postfix",
        "127.0.10.25",
        25,
        &["--data-dir", data.path().to_str().unwrap()],
    );
    let message =
        "Subject: hello from a test\nFrom: bob@example.org\n\nline one\n.a line with a dot\n";
    let queued = send_mail(
        server.address,
        "bob@example.org",
        "alice@localhost",
        message,
    );
    assert!(queued.contains("queued as"), "{queued}");
    let mails = maildir_messages(&data.path().join("home/alice/Maildir"), 1);
    let mail = &mails[0];
    for wanted in [
        "Return-Path: <bob@example.org>\n",
        "Delivered-To: alice@localhost\n",
        "by mail.picocenter.test (Postfix) with ESMTP id ",
        "for <alice@localhost>;",
        "Subject: hello from a test\n",
        "\nline one\n.a line with a dot\n",
    ] {
        assert!(mail.contains(wanted), "no {wanted:?} in the mail:\n{mail}");
    }
    let out = server.stop();
    let log = std::fs::read_to_string(data.path().join("var/log/postfix/mail.log")).unwrap();
    assert!(
        log.contains("status=sent (delivered to maildir)") && !log.contains("fatal"),
        "postfix's log:\n{log}\n{}",
        describe(&out)
    );
}
