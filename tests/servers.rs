//! Real servers in picoprocesses, with clients on the host: nginx, lighttpd, python-http and
//! counter-http, each behind its own address.

mod common;

use common::*;
use std::io::{Read, Write};
use std::path::PathBuf;

/// Every file of the shipped site, as (URL path, host path in the built image).
fn site_files(image: &str) -> Vec<(String, PathBuf)> {
    let root = state_dir()
        .join("images")
        .join(image)
        .join("rootfs/srv/www");
    let mut files = Vec::new();
    let mut stack = vec![root.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let url = format!("/{}", path.strip_prefix(&root).unwrap().display());
                files.push((url, path));
            }
        }
    }
    assert!(files.len() >= 5, "the site has {} files", files.len());
    files
}

fn serves_every_file(image: &str, ip: &str) {
    let server = Server::start(image, &format!("test-{image}-files"), ip, 80, &[]);
    for (url, path) in site_files(image) {
        let response = http(server.address, "GET", &url, b"");
        assert_eq!(response.status, 200, "{image} {url}");
        let expected = std::fs::read(&path).unwrap();
        assert!(
            response.body == expected,
            "{image} {url}: {} bytes, expected {}",
            response.body.len(),
            expected.len()
        );
    }
    assert_eq!(http(server.address, "GET", "/missing", b"").status, 404);
}

#[test]
fn nginx_serves_every_file_byte_for_byte() {
    serves_every_file("nginx", "127.0.1.1");
}

#[test]
fn lighttpd_serves_every_file_byte_for_byte() {
    serves_every_file("lighttpd", "127.0.1.2");
}

fn body(response: &Response) -> String {
    String::from_utf8_lossy(&response.body).into_owned()
}

/// The names of process `pid`'s threads.
fn thread_names(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|tasks| {
            tasks
                .flatten()
                .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
                .map(|name| name.trim().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// An idle app's VMM keeps only its vCPU thread: the mailbox poller's retires after
/// `mailbox::RETIRE_AFTER` asleep (the next call starts another), and no thread waits at
/// the control socket (a connection kicks the run loop). The app's CPU time, as a worker
/// reads it from the stats page, never goes back when a thread ends.
#[test]
fn an_idle_app_s_vmm_keeps_only_its_vcpu_thread_and_its_cpu_time_never_goes_back() {
    use picocenter_vmm::stats_page::StatsView;
    let server = Server::start("counter-http", "test-poller-retire", "127.0.1.12", 80, &[]);
    let pid = vmm_pid(&server.name);
    let page = state_dir().join(format!("run/{}.stats", server.name));
    let mut view = StatsView::open(&page, pid).unwrap();
    let poller = |pid| {
        thread_names(pid)
            .iter()
            .any(|name| name.starts_with("picocenter-mail"))
    };
    for n in 1..=50 {
        let response = http(server.address, "GET", "/", b"");
        assert_eq!(body(&response).trim(), format!("count={n}"));
    }
    let busy = view.read().expect("the stats page").app_cpu_ns;
    assert!(busy > 0);
    let limit = picocenter_vmm::mailbox::RETIRE_AFTER * 5;
    let started = std::time::Instant::now();
    while poller(pid) {
        assert!(
            started.elapsed() < limit,
            "the idle VMM still has its poller thread: {:?}",
            thread_names(pid)
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let own: Vec<String> = thread_names(pid)
        .into_iter()
        .filter(|name| name.starts_with("picocenter"))
        .collect();
    assert_eq!(own, ["picocenter"], "the idle VMM's threads");
    let idle = view.read().expect("the stats page").app_cpu_ns;
    assert!(
        idle >= busy,
        "the app's CPU time went back: {busy} then {idle} ns"
    );
    // A request wakes the app, and its calls a poller again.
    for n in 51..=60 {
        let response = http(server.address, "GET", "/", b"");
        assert_eq!(body(&response).trim(), format!("count={n}"));
    }
    assert!(
        poller(pid),
        "no poller after requests: {:?}",
        thread_names(pid)
    );
    let after = view.read().expect("the stats page").app_cpu_ns;
    assert!(
        after >= idle,
        "the app's CPU time went back: {idle} then {after} ns"
    );
    let out = server.stop();
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
}

#[test]
fn counter_http_keeps_its_count() {
    let server = Server::start("counter-http", "test-counter-state", "127.0.1.3", 80, &[]);
    for n in 1..=5 {
        let response = http(server.address, "GET", "/", b"");
        assert_eq!(response.status, 200);
        assert_eq!(body(&response).trim(), format!("count={n}"));
    }
    let out = server.stop();
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
}

#[test]
fn python_http_keeps_state_and_stops_cleanly() {
    let server = Server::start("python-http", "test-python-state", "127.0.1.4", 80, &[]);
    let first = http(server.address, "GET", "/", b"");
    assert_eq!(first.status, 200, "{}", body(&first));
    assert!(body(&first).contains("\"hits\": 1"), "{}", body(&first));
    let posted = http(server.address, "POST", "/items", b"apple");
    assert!(
        posted.status == 200 || posted.status == 201,
        "{}",
        body(&posted)
    );
    http(server.address, "POST", "/items", b"pear");
    let items = http(server.address, "GET", "/items", b"");
    assert!(
        body(&items).contains("apple") && body(&items).contains("pear"),
        "{}",
        body(&items)
    );
    let again = http(server.address, "GET", "/", b"");
    assert!(body(&again).contains("\"hits\": 2"), "{}", body(&again));
    let out = server.stop();
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
}

#[test]
fn nginx_stops_cleanly_on_sigterm() {
    let server = Server::start("nginx", "test-nginx-stop", "127.0.1.5", 80, &[]);
    assert_eq!(http(server.address, "GET", "/", b"").status, 200);
    let out = server.stop();
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
}

#[test]
fn fifty_concurrent_clients_are_all_answered() {
    let server = Server::start("nginx", "test-nginx-fifty", "127.0.1.6", 80, &[]);
    let expected =
        std::fs::read(state_dir().join("images/nginx/rootfs/srv/www/files/1k.txt")).unwrap();
    all_answered(server.address, "/files/1k.txt", 50, &expected);
}

#[test]
fn two_apps_share_port_80_on_their_own_addresses() {
    let a = Server::start("counter-http", "test-port80-a", "127.0.1.7", 80, &[]);
    let b = Server::start("counter-http", "test-port80-b", "127.0.1.8", 80, &[]);
    for _ in 0..3 {
        http(a.address, "GET", "/", b"");
    }
    assert_eq!(body(&http(a.address, "GET", "/", b"")).trim(), "count=4");
    assert_eq!(body(&http(b.address, "GET", "/", b"")).trim(), "count=1");
}

#[test]
fn an_app_cannot_bind_another_apps_address() {
    let _owner = Server::start("counter-http", "test-owner", "127.0.1.9", 80, &[]);
    // A second app, whose own address is different, asks for the first one's.
    let program = guest("net", Link::Static);
    let out = run(&[
        "--address",
        "127.0.1.10",
        program.to_str().unwrap(),
        "bind",
        "127.0.1.9",
        "80",
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    assert!(
        stdout(&out).contains("Cannot assign requested address"),
        "{}",
        describe(&out)
    );
    // Its own address is fine.
    let out = run(&[
        "--address",
        "127.0.1.10",
        program.to_str().unwrap(),
        "bind",
        "127.0.1.10",
        "80",
    ]);
    assert_eq!(stdout(&out), "bound\n", "{}", describe(&out));
}

#[test]
fn a_client_that_disconnects_mid_response_does_not_disturb_the_server() {
    let server = Server::start("nginx", "test-nginx-disconnect", "127.0.1.11", 80, &[]);
    for _ in 0..5 {
        let mut stream = std::net::TcpStream::connect(server.address).unwrap();
        stream
            .write_all(b"GET /files/1m.txt HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut some = [0u8; 4096];
        let _ = stream.read(&mut some).unwrap();
        drop(stream);
    }
    let expected =
        std::fs::read(state_dir().join("images/nginx/rootfs/srv/www/files/1m.txt")).unwrap();
    let response = http(server.address, "GET", "/files/1m.txt", b"");
    assert_eq!(response.status, 200);
    assert!(response.body == expected);
}

/// Debian's nginx with its default process model: a master that forks two workers, which
/// share its listening socket. Every file is served byte for byte by 50 concurrent
/// clients; `stop` (SIGTERM to the master, which signals its workers) ends every process.
#[test]
fn nginx_with_a_master_and_two_workers_serves_and_stops() {
    let (server, _data) = nginx_with_workers("test-nginx-master", "127.0.10.1");
    let expected =
        std::fs::read(state_dir().join("images/nginx/rootfs/srv/www/files/1k.txt")).unwrap();
    all_answered(server.address, "/files/1k.txt", 50, &expected);
    // `ps` lists the master and its two workers.
    let ps = run_with_limit(picocenter().arg("ps"), std::time::Duration::from_secs(30));
    let listed = stdout(&ps);
    let line = listed
        .lines()
        .find(|l| l.starts_with("test-nginx-master "))
        .unwrap_or_else(|| panic!("ps does not list the app:\n{listed}"));
    assert!(line.trim_end().ends_with(" 3"), "{listed}");
    assert!(listed.matches("  pid ").count() >= 3, "{listed}");
    let out = server.stop();
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    // The workers end with the master (at once, or when they see it gone).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while app_processes("test-nginx-master") > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(
        app_processes("test-nginx-master"),
        0,
        "processes outlived the app"
    );
}

/// How many host processes run `picocenter run --name NAME` (the app's VMMs and the
/// first one's supervisor).
fn app_processes(name: &str) -> usize {
    let mut count = 0;
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        if args
            .windows(2)
            .any(|w| w[0] == b"--name" && w[1] == name.as_bytes())
            && args.iter().any(|a| *a == b"run")
        {
            count += 1;
        }
    }
    count
}
