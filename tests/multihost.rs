//! Issue #16: workers on separate hosts. The "hosts" are network namespaces this test
//! makes, each with a veth pair onto one bridge in the test's own namespace (where the
//! two hubs and etcd run): two worker hosts and a client host, all on 10.77.0.0/16. Each
//! worker gives its apps addresses from a range of that network (10.77.1.0/24,
//! 10.77.2.0/24) and puts each on its interface while an app has it, so the client
//! reaches an app directly (ARP on the bridge finds it) after resolving its name at a
//! hub. When a worker host dies (every process in its namespace killed), its app comes
//! back on the other host from its last snapshot, and the next answer names the new
//! address. A hub killed right after it ordered a restore loses nothing: the other hub
//! answers. Cold storage is an S3 server (moto) on the bridge, reached from every host.
//! After each fault the registry is checked against the workers: every app once, and
//! none resident on two workers.

mod common;

use common::cluster::{
    api, hub_addresses, wait_for, wait_until_registered, worker_args, Proc, S3Server,
};
use common::{build_image, state_dir};
use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::Duration;

const TOKEN: &str = "multihost-token";
const LIMIT: Duration = Duration::from_secs(30);

/// Runs `ip` with `args`, which must succeed.
fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The bridge and the namespaces, removed (their processes killed) when dropped.
struct Network {
    tag: String,
    bridge: String,
    namespaces: Vec<String>,
}

impl Network {
    /// The bridge, at 10.77.0.1/16 in the test's namespace.
    fn new() -> Network {
        let tag = (std::process::id() % 100_000).to_string();
        let bridge = format!("pcbr{tag}");
        let _ = Command::new("ip").args(["link", "del", &bridge]).output();
        ip(&["link", "add", &bridge, "type", "bridge"]);
        let network = Network {
            tag,
            bridge: bridge.clone(),
            namespaces: Vec::new(),
        };
        ip(&["addr", "add", "10.77.0.1/16", "dev", &bridge]);
        ip(&["link", "set", &bridge, "up"]);
        network
    }

    /// A host: a namespace whose `eth0` is at `address`/16 on the bridge. Its name.
    fn host(&mut self, name: &str, address: &str) -> String {
        let namespace = format!("pc{}-{name}", self.tag);
        let _ = Command::new("ip")
            .args(["netns", "del", &namespace])
            .output();
        ip(&["netns", "add", &namespace]);
        self.namespaces.push(namespace.clone());
        let (outside, inside) = (
            format!("pv{}{name}", self.tag),
            format!("pv{}{name}n", self.tag),
        );
        ip(&[
            "link", "add", &outside, "type", "veth", "peer", "name", &inside,
        ]);
        ip(&["link", "set", &inside, "netns", &namespace]);
        ip(&["-n", &namespace, "link", "set", &inside, "name", "eth0"]);
        ip(&[
            "-n",
            &namespace,
            "addr",
            "add",
            &format!("{address}/16"),
            "dev",
            "eth0",
        ]);
        ip(&["-n", &namespace, "link", "set", "eth0", "up"]);
        ip(&["-n", &namespace, "link", "set", "lo", "up"]);
        ip(&["link", "set", &outside, "master", &self.bridge]);
        ip(&["link", "set", &outside, "up"]);
        namespace
    }

    /// Kills every process in `namespace` (its host died).
    fn kill_host(&self, namespace: &str) {
        let out = Command::new("ip")
            .args(["netns", "pids", namespace])
            .output()
            .unwrap();
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                // SAFETY: kill(2) of a process of this test's namespace.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        for namespace in &self.namespaces {
            self.kill_host(namespace);
            let _ = Command::new("ip")
                .args(["netns", "del", namespace])
                .output();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .output();
    }
}

/// Runs `work` on a thread inside `namespace` (what it connects to, and the processes it
/// starts, are that host's).
fn on_host<T: Send + 'static>(namespace: &str, work: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{namespace}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap();
        // SAFETY: setns(2) on this thread only, with a namespace file it opened.
        let entered =
            unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
        assert_eq!(entered, 0, "{}", std::io::Error::last_os_error());
        work()
    })
    .join()
    .unwrap()
}

/// The A record `dig` gets for `name` at `dns`, asked from the client host.
fn resolve_from(client: &str, dns: SocketAddr, name: &str) -> Option<Ipv4Addr> {
    let name = name.to_string();
    on_host(client, move || {
        let out = Command::new("dig")
            .args(["+short", "+time=2", "+tries=1", "-p"])
            .arg(dns.port().to_string())
            .arg(format!("@{}", dns.ip()))
            .arg(format!("{name}.pico.local"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    })
}

/// counter-http's count at `address`, asked from the client host.
fn count_from(client: &str, address: Ipv4Addr) -> u64 {
    on_host(client, move || {
        let response = common::http(SocketAddr::from((address, 80)), "GET", "/", b"");
        assert_eq!(response.status, 200);
        let body = String::from_utf8_lossy(&response.body).trim().to_string();
        body.strip_prefix("count=")
            .and_then(|c| c.parse().ok())
            .expect("count=N")
    })
}

/// The IPv4 addresses on `eth0` of host `namespace`.
fn addresses_of(namespace: &str) -> Vec<String> {
    let out = Command::new("ip")
        .args(["-n", namespace, "-4", "-o", "addr", "show", "dev", "eth0"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().nth(3))
        .map(|a| a.split('/').next().unwrap_or_default().to_string())
        .collect()
}

/// A worker on host `namespace` reporting to `hubs`, its apps at `pool` on its `eth0`.
fn worker_on(
    namespace: &str,
    host_address: &str,
    id: &str,
    pool: &str,
    hubs: &[SocketAddr],
    s3: &str,
    log: std::path::PathBuf,
) -> Proc {
    let urls: Vec<String> = hubs.iter().map(|h| format!("http://{h}")).collect();
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", namespace])
        .arg(env!("CARGO_BIN_EXE_picocenter"));
    cmd.env("PICOCENTER_STATE_DIR", state_dir());
    cmd.env("RUST_LOG", "warn,picocenter_hub=info");
    worker_args(&mut cmd, &urls, TOKEN, id);
    cmd.args(["--listen", &format!("{host_address}:0")]);
    cmd.args(["--addresses", pool, "--interface", "eth0"]);
    cmd.args(["--idle-after", "1", "--warm-pool", "0"]);
    cmd.args([
        "--s3-bucket",
        "multihost",
        "--s3-endpoint",
        s3,
        "--s3-path-style",
    ]);
    cmd.args(["--s3-access-key", "test", "--s3-secret-key", "test"]);
    let worker = Proc::spawn(cmd, log);
    wait_until_registered(hubs[0], TOKEN, id);
    worker
}

/// Checks the registry at hub `hub` against the workers: `apps` registered, each once,
/// every resident one on a live worker that runs it, and no app resident on two workers.
fn consistent(hub: SocketAddr, apps: &[&str]) {
    let (_, records) = api(hub, "GET", "/v1/apps", None, Some(TOKEN));
    let records = records.as_array().unwrap().clone();
    let names: Vec<&str> = records
        .iter()
        .map(|r| r["spec"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, apps, "{records:?}");
    let (_, workers) = api(hub, "GET", "/v1/workers", None, Some(TOKEN));
    let mut running: Vec<(String, String)> = Vec::new();
    for worker in workers.as_array().unwrap() {
        let url = worker["url"].as_str().unwrap();
        let address: SocketAddr = url.trim_start_matches("http://").parse().unwrap();
        let (status, resident) = api(address, "GET", "/v1/apps", None, Some(TOKEN));
        assert_eq!(status, 200, "{resident}");
        for app in resident.as_array().unwrap() {
            let name = app[0].as_str().unwrap().to_string();
            running.push((name, worker["id"].as_str().unwrap().to_string()));
        }
    }
    for record in &records {
        let name = record["spec"]["name"].as_str().unwrap();
        let on: Vec<&String> = running
            .iter()
            .filter(|(app, _)| app == name)
            .map(|(_, worker)| worker)
            .collect();
        assert!(on.len() <= 1, "{name} is resident on {on:?}");
        if record["state"] == "resident" {
            assert_eq!(on, [record["worker"].as_str().unwrap()], "{record}");
        }
    }
}

fn state(hub: SocketAddr, app: &str) -> String {
    let (_, record) = api(hub, "GET", &format!("/v1/apps/{app}"), None, Some(TOKEN));
    record["state"].as_str().unwrap_or_default().to_string()
}

#[test]
fn apps_on_other_hosts_are_reached_directly_and_move_when_their_host_dies() {
    build_image("counter-http");
    let dir = tempfile::tempdir().unwrap();
    let mut network = Network::new();
    let first_host = network.host("w1", "10.77.0.11");
    let second_host = network.host("w2", "10.77.0.12");
    let client = network.host("cl", "10.77.0.13");
    let etcd = picocenter_hub::registry::etcd::testing::EtcdServer::start(dir.path());
    let registry = format!("{}/multihost", etcd.url);
    let mut hubs = Vec::new();
    let mut hub_processes = Vec::new();
    for id in ["hub-a", "hub-b"] {
        let hub_dir = dir.path().join(id);
        std::fs::create_dir_all(&hub_dir).unwrap();
        let mut cmd = common::picocenter();
        cmd.args(["hub", "--dns", "10.77.0.1:0", "--api", "10.77.0.1:0"]);
        cmd.args(["--token", TOKEN, "--registry", &registry, "--hub-id", id]);
        cmd.args(["--worker-timeout", "2"]);
        cmd.arg("--data-dir").arg(&hub_dir);
        let process = Proc::spawn(cmd, hub_dir.join("hub.log"));
        let addresses = wait_for("the hub", LIMIT, || hub_addresses(&process.log));
        hub_processes.push(process);
        hubs.push(addresses);
    }
    let apis: Vec<SocketAddr> = hubs.iter().map(|(_, api)| *api).collect();
    let s3 = S3Server::moto_on(Ipv4Addr::new(10, 77, 0, 1), dir.path().join("s3.log"));
    let cold = s3.endpoint.as_str();
    let _first = worker_on(
        &first_host,
        "10.77.0.11",
        "mh-w1",
        "10.77.1.0/24",
        &apis,
        cold,
        dir.path().join("w1.log"),
    );
    let body = r#"{"name":"mh","image":"counter-http","idle_after_secs":1.0}"#;
    let (status, answer) = api(apis[0], "POST", "/v1/apps", Some(body), Some(TOKEN));
    assert_eq!(status, 201, "{answer}");

    // The client resolves the app at a hub and reaches it on the first worker's host,
    // where its address is while the app has it.
    let address = resolve_from(&client, hubs[0].0, "mh").expect("an address");
    assert_eq!(address.octets()[..3], [10, 77, 1], "{address}");
    assert_eq!(count_from(&client, address), 1);
    assert!(addresses_of(&first_host).contains(&address.to_string()));
    assert!(!addresses_of(&second_host).contains(&address.to_string()));

    // Idle, it is swapped out; its address stays there, held, and a query at the other
    // hub brings it back at that address with its state.
    wait_for("the swap-out", LIMIT, || {
        (state(apis[1], "mh") == "swapped_out").then_some(())
    });
    assert!(addresses_of(&first_host).contains(&address.to_string()));
    assert_eq!(resolve_from(&client, hubs[1].0, "mh"), Some(address));
    assert_eq!(count_from(&client, address), 2);
    wait_for("the app back", LIMIT, || {
        (state(apis[0], "mh") == "resident").then_some(())
    });
    consistent(apis[0], &["mh"]);

    // The first worker's host dies with the app running. Its app comes back on the
    // other host from its last snapshot (taken after the first request), at an address
    // of that host's range.
    let _second = worker_on(
        &second_host,
        "10.77.0.12",
        "mh-w2",
        "10.77.2.0/24",
        &apis,
        cold,
        dir.path().join("w2.log"),
    );
    network.kill_host(&first_host);
    let moved = wait_for("the app on the second host", LIMIT, || {
        let moved = resolve_from(&client, hubs[0].0, "mh")?;
        (moved.octets()[..3] == [10, 77, 2]).then_some(moved)
    });
    assert_eq!(count_from(&client, moved), 2);
    assert!(addresses_of(&second_host).contains(&moved.to_string()));
    assert_eq!(resolve_from(&client, hubs[1].0, "mh"), Some(moved));
    consistent(apis[1], &["mh"]);

    // Swapped out again, the app is brought back by a query at the first hub, which is
    // killed as it answers (the restore it ordered under way); the other hub answers
    // with the same address, and the app kept its state.
    wait_for("the swap-out", LIMIT, || {
        (state(apis[1], "mh") == "swapped_out").then_some(())
    });
    assert_eq!(resolve_from(&client, hubs[0].0, "mh"), Some(moved));
    hub_processes[0].kill();
    assert_eq!(resolve_from(&client, hubs[1].0, "mh"), Some(moved));
    assert_eq!(count_from(&client, moved), 3);
    wait_for("the app back", LIMIT, || {
        (state(apis[1], "mh") == "resident").then_some(())
    });
    consistent(apis[1], &["mh"]);

    // Removed, the app's address leaves the host.
    let (status, answer) = api(apis[1], "DELETE", "/v1/apps/mh", None, Some(TOKEN));
    assert!(status < 300, "{status} {answer}");
    wait_for("the address to leave the host", LIMIT, || {
        (!addresses_of(&second_host).contains(&moved.to_string())).then_some(())
    });
}
