//! The hub and workers end to end: real DNS queries (dig, over UDP and TCP), real HTTP to
//! real apps, idle swap-outs to cold storage (a local directory, and S3 on a loopback moto
//! server), coalesced restores, worker death, hub restarts, and hostile input.

mod common;

use common::cluster::*;
use common::wan::{LinkShape, WanLink};
use common::*;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const TOKEN: &str = "test-token-0123456789";

/// A hub process with its own registry.
struct Hub {
    proc: Proc,
    dns: SocketAddr,
    api: SocketAddr,
    data: PathBuf,
}

impl Hub {
    fn start(data: &Path) -> Hub {
        Self::start_with(data, &[])
    }

    /// A hub with `extra` flags.
    fn start_with(data: &Path, extra: &[&str]) -> Hub {
        let mut cmd = picocenter();
        cmd.args(["hub", "--dns", "127.0.0.1:0", "--api", "127.0.0.1:0"]);
        cmd.args([
            "--token",
            TOKEN,
            "--worker-timeout",
            "2",
            "--start-timeout",
            "20",
        ]);
        cmd.arg("--data-dir").arg(data);
        cmd.args(extra);
        let proc = Proc::spawn(cmd, data.with_extension("log"));
        let (dns, api) = wait_for("the hub to come up", Duration::from_secs(60), || {
            let log = proc.log();
            assert!(!log.contains("error:"), "the hub failed:\n{log}");
            hub_addresses(&proc.log)
        });
        Hub {
            proc,
            dns,
            api,
            data: data.to_path_buf(),
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.api)
    }

    /// One API call: (status, JSON body).
    fn call(&self, method: &str, path: &str, body: Option<&str>) -> (u16, serde_json::Value) {
        api(self.api, method, path, body, Some(TOKEN))
    }

    fn add(&self, name: &str, image: &str, idle_after: f64) {
        let body =
            format!(r#"{{"name":"{name}","image":"{image}","idle_after_secs":{idle_after}}}"#);
        let (status, answer) = self.call("POST", "/v1/apps", Some(&body));
        assert_eq!(status, 201, "{answer}");
    }

    fn app(&self, name: &str) -> serde_json::Value {
        let (status, answer) = self.call("GET", &format!("/v1/apps/{name}"), None);
        assert_eq!(status, 200, "{answer}");
        answer
    }

    /// App `name`'s state; empty while the hub does not know it (another hub added it,
    /// and this one's watch has not told it yet).
    fn state(&self, name: &str) -> String {
        let (_, app) = self.call("GET", &format!("/v1/apps/{name}"), None);
        app["state"].as_str().unwrap_or_default().to_string()
    }

    fn events(&self, name: &str) -> Vec<String> {
        self.app(name)["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["what"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    fn wait_state(&self, name: &str, state: &str, limit: Duration) {
        wait_for(&format!("{name} to be {state}"), limit, || {
            (self.state(name) == state).then_some(())
        });
    }
}

/// Worker flags for cold storage in `bucket` of the S3 server at `endpoint` (moto's test
/// credentials), then `extra`.
fn s3_cold(bucket: &str, endpoint: &str, extra: &[&str]) -> Vec<String> {
    let flags = [
        "--s3-bucket",
        bucket,
        "--s3-endpoint",
        endpoint,
        "--s3-path-style",
    ];
    let keys = ["--s3-access-key", "test", "--s3-secret-key", "test"];
    flags
        .iter()
        .chain(&keys)
        .chain(extra)
        .map(|f| f.to_string())
        .collect()
}

/// App `app`'s snapshots in `bucket` (under `prefix`) of the S3 server `s3`, as a worker
/// with [`s3_cold`]'s flags keeps them; listings cached under `dir`.
fn app_bucket(
    s3: &S3Server,
    bucket: &str,
    prefix: &str,
    app: &str,
    dir: &Path,
) -> picocenter_snapshots::s3::S3Store {
    let config = picocenter_snapshots::s3::S3Config {
        endpoint: Some(s3.endpoint.clone()),
        bucket: bucket.into(),
        prefix: prefix.into(),
        path_style: true,
        access_key: Some("test".into()),
        secret_key: Some("test".into()),
        ..Default::default()
    };
    picocenter_snapshots::s3::S3Store::open(&config, app, &dir.join("s3-listing")).unwrap()
}

fn as_strs(flags: &[String]) -> Vec<&str> {
    flags.iter().map(String::as_str).collect()
}

/// A worker process.
fn worker(hub: &Hub, id: &str, pool: &str, idle_after: &str, cold: &[&str]) -> Proc {
    worker_of(&[hub], id, pool, idle_after, cold)
}

/// A worker process that reports to the first of `hubs` that answers.
fn worker_of(hubs: &[&Hub], id: &str, pool: &str, idle_after: &str, cold: &[&str]) -> Proc {
    let hub = hubs[0];
    let urls: Vec<String> = hubs.iter().map(|h| h.url()).collect();
    let mut cmd = picocenter();
    worker_args(&mut cmd, &urls, TOKEN, id);
    cmd.args(["--addresses", pool, "--idle-after", idle_after]);
    cmd.args(cold);
    // What it does with apps, for the tests that follow it and for failures' messages.
    cmd.env("RUST_LOG", "warn,picocenter_hub=info");
    let proc = Proc::spawn(cmd, hub.data.with_extension(format!("{id}.log")));
    wait_until_registered(hub, id);
    proc
}

/// Waits (at most 20 s) until `hub` lists worker `id`: only then can it run apps there.
fn wait_until_registered(hub: &Hub, id: &str) {
    common::cluster::wait_until_registered(hub.api, TOKEN, id);
}

/// `dig` at the hub: (status, answers).
fn dig(dns: SocketAddr, name: &str, kind: &str, tcp: bool) -> (String, Vec<String>) {
    let mut cmd = Command::new("dig");
    cmd.arg(format!("@{}", dns.ip()))
        .args(["-p", &dns.port().to_string()])
        .args(["+tries=3", "+time=15", "+nocookie"])
        .arg(if tcp { "+tcp" } else { "+notcp" })
        .args([name, kind]);
    let out = cmd.output().expect("dig (apt-get install dnsutils)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let status = text
        .split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or("none")
        .to_string();
    let answers = text
        .split(";; ANSWER SECTION:")
        .nth(1)
        .map(|s| {
            s.lines()
                .skip(1)
                .take_while(|l| !l.trim().is_empty())
                .filter_map(|l| l.split_whitespace().last().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    (status, answers)
}

/// The address `name` resolves to (A, over UDP).
fn resolve(hub: &Hub, name: &str) -> String {
    let (status, answers) = dig(hub.dns, &format!("{name}.pico.local"), "A", false);
    assert_eq!(
        status,
        "NOERROR",
        "{name}: {answers:?}\nhub log:\n{}",
        hub.proc.log()
    );
    assert_eq!(answers.len(), 1, "{answers:?}");
    answers[0].clone()
}

fn get(address: &str, path: &str) -> String {
    let response = http(format!("{address}:80").parse().unwrap(), "GET", path, b"");
    assert_eq!(response.status, 200);
    String::from_utf8_lossy(&response.body).trim().to_string()
}

fn count(address: &str) -> u64 {
    get(address, "/")
        .strip_prefix("count=")
        .and_then(|c| c.parse().ok())
        .expect("count=N")
}

fn setup(name: &str) -> (tempfile::TempDir, Hub) {
    build_image("counter-http");
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::start(&dir.path().join(name));
    (dir, hub)
}

/// The pids of `pid`'s child processes.
fn children_of(pid: u32) -> Vec<u32> {
    let mut children = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // The fields after the command's closing parenthesis: state, ppid, ...
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
        if ppid == Some(pid) {
            children.extend(
                entry
                    .file_name()
                    .to_str()
                    .and_then(|p| p.parse::<u32>().ok()),
            );
        }
    }
    children
}

#[test]
fn a_query_starts_an_app_and_an_idle_app_swaps_out_and_comes_back() {
    let (dir, hub) = setup("basic");
    let store = dir.path().join("cold");
    let _worker = worker(
        &hub,
        "w-basic",
        "127.3.1.0/24",
        "60",
        &["--store", store.to_str().unwrap()],
    );
    hub.add("cbasic", "counter-http", 1.0);
    assert_eq!(hub.state("cbasic"), "new");

    let address = resolve(&hub, "cbasic");
    assert!(address.starts_with("127.3.1."), "{address}");
    assert_eq!(count(&address), 1);
    assert_eq!(count(&address), 2);
    // The worker supervises the jailed VMM (it bound port 80 for it): no supervisor
    // process beside it, and the jail's scratch directory goes when the VMM does.
    let pid = vmm_pid("cbasic");
    assert_eq!(
        children_of(pid),
        Vec::<u32>::new(),
        "the VMM has a supervisor"
    );
    let uid = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("Uid:")?
                .split_whitespace()
                .next()
                .map(String::from)
        })
        .unwrap();
    let scratch = state_dir().join(format!("run/jail-{uid}"));
    assert!(scratch.is_dir(), "{}", scratch.display());

    // Idle for a second: swapped out, its memory freed, its snapshot in the store.
    hub.wait_state("cbasic", "swapped_out", Duration::from_secs(15));
    let snapshot = hub.app("cbasic")["snapshot"].as_str().unwrap().to_string();
    assert!(store
        .join("cbasic")
        .join(format!("{snapshot}.pages"))
        .exists());
    // Cold storage is the owner's only: 0700 directories, 0600 files.
    assert_private(&store.join("cbasic"));
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&store).unwrap().permissions())
            & 0o777,
        0o700
    );
    assert!(!control_socket_live("cbasic"), "the VMM still runs");
    wait_for(
        "the worker to remove the VMM's scratch",
        Duration::from_secs(10),
        || (!scratch.exists()).then_some(()),
    );
    wait_for(
        "the worker to report no memory",
        Duration::from_secs(5),
        || {
            let (_, workers) = hub.call("GET", "/v1/workers", None);
            (workers[0]["memory_bytes"] == 0 && workers[0]["resident"] == 0).then_some(())
        },
    );

    // A query brings it back with its state.
    let address = resolve(&hub, "cbasic");
    assert_eq!(count(&address), 3);
    // The worker held its address, so the hub answered at once and the client waited in
    // the backlog: the hub may learn that the restore ended just after it was served.
    hub.wait_state("cbasic", "resident", Duration::from_secs(10));
    let app = hub.app("cbasic");
    assert_eq!(app["usage"]["swap_ins"], 1);
    assert!(app["usage"]["stored_bytes"].as_u64().unwrap() > 0);
    // CPU time is counted in clock ticks (10 ms): requests go on until one has passed,
    // which a loaded machine may take a while to see.
    wait_for("usage to be reported", Duration::from_secs(20), || {
        let usage = hub.app("cbasic")["usage"].clone();
        let reported = usage["requests"].as_u64()? >= 3
            && usage["cpu_seconds"].as_f64()? > 0.0
            && usage["memory_gib_seconds"].as_f64()? > 0.0;
        if !reported {
            count(&address);
        }
        reported.then_some(())
    });
    // The same answer again, now from the resident app, also over TCP.
    let (status, answers) = dig(hub.dns, "cbasic.pico.local", "A", true);
    assert_eq!((status.as_str(), answers), ("NOERROR", vec![address]));

    // What happened shows in both metrics (a start, a swap-out and a swap-in).
    let hub_metrics = metrics(hub.api);
    assert!(
        metric(
            &hub_metrics,
            "picocenter_hub_dns_queries_total{answer=\"address\"}"
        ) >= 3.0
    );
    assert_eq!(
        metric(
            &hub_metrics,
            "picocenter_hub_start_orders_total{kind=\"fresh\"}"
        ),
        1.0
    );
    assert!(
        metric(
            &hub_metrics,
            "picocenter_hub_start_seconds_count{kind=\"restore\"}"
        ) >= 1.0
    );
    assert_eq!(metric(&hub_metrics, "picocenter_hub_swap_outs_total"), 1.0);
    assert_eq!(
        metric(&hub_metrics, "picocenter_hub_apps{state=\"resident\"}"),
        1.0
    );
    assert_eq!(metric(&hub_metrics, "picocenter_hub_workers"), 1.0);
    let worker_metrics = metrics(worker_api(&hub, "w-basic"));
    for (name, least) in [
        ("picocenter_worker_starts_total", 1.0),
        ("picocenter_worker_swap_ins_total", 1.0),
        ("picocenter_worker_swap_outs_total", 1.0),
        ("picocenter_worker_swap_out_seconds_count", 1.0),
        ("picocenter_worker_resident_apps", 1.0),
    ] {
        assert_eq!(
            metric(&worker_metrics, name),
            least,
            "{name}\n{worker_metrics}"
        );
    }
    // Without the token, nothing.
    let (status, _) = api(hub.api, "GET", "/metrics", None, None);
    assert_eq!(status, 401);

    // Removing it ends it and deletes its snapshots.
    let (status, _) = hub.call("DELETE", "/v1/apps/cbasic", None);
    assert_eq!(status, 204);
    assert!(
        !store.join("cbasic").exists(),
        "its snapshots are still in the store"
    );
    let (status, _) = dig(hub.dns, "cbasic.pico.local", "A", false);
    assert_eq!(status, "NXDOMAIN");
    wait_for("its VMM to end", Duration::from_secs(10), || {
        std::os::unix::net::UnixStream::connect(state_dir().join("run/cbasic.sock"))
            .is_err()
            .then_some(())
    });
}

#[test]
fn fifty_concurrent_queries_bring_a_swapped_out_app_back_once() {
    let (dir, hub) = setup("fifty");
    let store = dir.path().join("cold");
    let _worker = worker(
        &hub,
        "w-fifty",
        "127.3.2.0/24",
        "60",
        &["--store", store.to_str().unwrap()],
    );
    // Idle for 3 s before a swap-out: long enough that the restored app is not swapped
    // out again while fifty digs start on a loaded machine.
    hub.add("cfifty", "counter-http", 3.0);
    let address = resolve(&hub, "cfifty");
    assert_eq!(count(&address), 1);
    hub.wait_state("cfifty", "swapped_out", Duration::from_secs(15));

    let digs: Vec<std::thread::JoinHandle<(String, Vec<String>)>> = (0..50)
        .map(|i| {
            let dns = hub.dns;
            std::thread::spawn(move || dig(dns, "cfifty.pico.local", "A", i % 5 == 0))
        })
        .collect();
    let answers: Vec<(String, Vec<String>)> = digs.into_iter().map(|t| t.join().unwrap()).collect();
    let address = answers[0].1[0].clone();
    for (status, a) in &answers {
        assert_eq!(status, "NOERROR");
        assert_eq!(a, &vec![address.clone()]);
    }
    // The digs brought it back once. (Idle again for 3 s on a slow machine, it may be
    // swapped out again before the request below, which then wakes it.)
    let events = hub.events("cfifty");
    let restores = events
        .iter()
        .filter(|e| e.starts_with("restoring snapshot"))
        .count();
    assert_eq!(restores, 1, "{events:?}");
    assert_eq!(count(&address), 2);
}

#[test]
fn a_killed_worker_s_apps_come_back_on_another_worker() {
    let (dir, hub) = setup("failover");
    let store = dir.path().join("cold");
    let cold = ["--store", store.to_str().unwrap()];
    let mut first = worker(&hub, "w-first", "127.3.3.0/24", "60", &cold);
    hub.add("cfail", "counter-http", 60.0);
    let address = resolve(&hub, "cfail");
    assert!(address.starts_with("127.3.3."));
    assert_eq!(count(&address), 1);
    // A snapshot to fall back to: swap it out through the worker, bring it back there.
    let (_, workers) = hub.call("GET", "/v1/workers", None);
    let url: SocketAddr = workers[0]["url"].as_str().unwrap()["http://".len()..]
        .parse()
        .unwrap();
    let (status, swapped) = api(url, "POST", "/v1/apps/cfail/swap-out", None, Some(TOKEN));
    assert_eq!(status, 200, "{swapped}");
    hub.wait_state("cfail", "swapped_out", Duration::from_secs(10));
    let address = resolve(&hub, "cfail");
    assert_eq!(count(&address), 2);

    let _second = worker(&hub, "w-second", "127.3.4.0/24", "60", &cold);
    first.kill();
    // The first worker's VMMs die with it; the hub notices the silence.
    hub.wait_state("cfail", "swapped_out", Duration::from_secs(15));
    assert!(hub
        .events("cfail")
        .iter()
        .any(|e| e.contains("w-first is gone")));
    let address = resolve(&hub, "cfail");
    assert!(address.starts_with("127.3.4."), "{address}");
    // Back at its last snapshot (count 1 was in it; the request after it was lost).
    assert_eq!(count(&address), 2);
    assert_eq!(hub.app("cfail")["worker"], "w-second");
}

#[test]
fn a_hub_restart_keeps_the_registry() {
    let (dir, mut hub) = setup("restart");
    hub.add("keep-a", "counter-http", 5.0);
    hub.add("keep-b", "nginx", 7.0);
    hub.proc.terminate();
    let hub = Hub::start(&dir.path().join("restart"));
    let (status, apps) = hub.call("GET", "/v1/apps", None);
    assert_eq!(status, 200);
    let names: Vec<&str> = apps
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["spec"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["keep-a", "keep-b"]);
    assert_eq!(hub.app("keep-b")["spec"]["idle_after_secs"], 7.0);
}

/// Issue #16: several hubs on one etcd registry. An app added at one hub is answered
/// alike at the other; the zone's NS records name both. A hub is killed (SIGKILL) right
/// after it ordered the app's restore: the restore finishes, the worker reports to the
/// other hub instead, and the other hub answers with the app's address, its state kept.
/// A new hub on the same etcd, with a data directory of its own (another host, as far
/// as files go), knows all of it. After each fault the registry holds the app once, on
/// the one worker, and that worker once.
#[test]
fn hubs_on_etcd_answer_alike_and_a_hub_killed_mid_restore_loses_nothing() {
    build_image("counter-http");
    let dir = tempfile::tempdir().unwrap();
    let etcd = picocenter_hub::registry::etcd::testing::EtcdServer::start(dir.path());
    let registry = format!("{}/cluster-test", etcd.url);
    let hub_flags = |id: &'static str| ["--registry", registry.as_str(), "--hub-id", id];
    let mut first = Hub::start_with(&dir.path().join("etcd-hub-a"), &hub_flags("hub-a"));
    let second = Hub::start_with(&dir.path().join("etcd-hub-b"), &hub_flags("hub-b"));
    let store = dir.path().join("cold");
    let cold = ["--store", store.to_str().unwrap()];
    let _worker = worker_of(&[&first, &second], "w-etcd", "127.3.20.0/24", "60", &cold);
    wait_until_registered(&second, "w-etcd");
    first.add("cetcd", "counter-http", 1.0);
    // The other hub knows it as soon as its watch tells it (a few ms; longer on a loaded
    // machine), and refuses it a second time.
    wait_for(
        "the other hub to know the app",
        Duration::from_secs(10),
        || (second.call("GET", "/v1/apps/cetcd", None).0 == 200).then_some(()),
    );
    let body = r#"{"name":"cetcd","image":"counter-http"}"#;
    assert_eq!(second.call("POST", "/v1/apps", Some(body)).0, 409);
    let address = resolve(&second, "cetcd");
    assert_eq!(count(&address), 1);
    assert_eq!(resolve(&first, "cetcd"), address);
    for hub in [&first, &second] {
        let (status, servers) = dig(hub.dns, "pico.local", "NS", false);
        assert_eq!(status, "NOERROR");
        let mut servers = servers;
        servers.sort();
        assert_eq!(servers, ["ns-hub-a.pico.local.", "ns-hub-b.pico.local."]);
        for (server, hub) in servers.iter().zip([&first, &second]) {
            let (_, glue) = dig(hub.dns, server, "A", false);
            assert_eq!(glue, [hub.dns.ip().to_string()]);
        }
    }
    // (`states`: what the app may be in; idle for a second, it may be swapped out.)
    let consistent = |hub: &Hub, states: &[&str]| {
        let (_, apps) = hub.call("GET", "/v1/apps", None);
        let apps = apps.as_array().unwrap().clone();
        assert_eq!(apps.len(), 1, "{apps:?}");
        let state = apps[0]["state"].as_str().unwrap_or_default();
        assert!(states.contains(&state), "{apps:?}");
        if state == "resident" {
            assert_eq!(apps[0]["worker"], "w-etcd", "{apps:?}");
        }
        let (_, workers) = hub.call("GET", "/v1/workers", None);
        let ids: Vec<&str> = workers
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|w| w["id"].as_str())
            .collect();
        assert_eq!(ids, ["w-etcd"]);
    };
    second.wait_state("cetcd", "swapped_out", Duration::from_secs(20));
    first.wait_state("cetcd", "swapped_out", Duration::from_secs(5));
    consistent(&first, &["swapped_out"]);
    consistent(&second, &["swapped_out"]);

    // The first hub orders the restore (its answer, the held address, comes at once),
    // and dies before it hears the outcome.
    assert_eq!(resolve(&first, "cetcd"), address);
    first.proc.kill();
    assert!(
        !first.proc.log().contains("panicked"),
        "{}",
        first.proc.log()
    );
    // The other hub answers, and the app kept its state.
    assert_eq!(resolve(&second, "cetcd"), address);
    assert_eq!(count(&address), 2);
    second.wait_state("cetcd", "resident", Duration::from_secs(20));
    consistent(&second, &["resident", "swapped_out"]);
    // Which hub ordered the restore depends on whether the first wrote its order before
    // it died; either way exactly one restore happened.
    let events = second.events("cetcd");
    let restores: Vec<&String> = events
        .iter()
        .filter(|e| e.starts_with("restoring snapshot"))
        .collect();
    assert_eq!(restores.len(), 1, "{events:?}");
    eprintln!("the restore: {}", restores[0]);

    // A new hub, with nothing on its disk, knows everything.
    let mut third = Hub::start_with(&dir.path().join("etcd-hub-c"), &hub_flags("hub-c"));
    assert!(!dir.path().join("etcd-hub-c/registry.redb").exists());
    consistent(&third, &["resident", "swapped_out"]);
    assert_eq!(resolve(&third, "cetcd"), address);
    assert_eq!(count(&address), 3);

    // A hub killed while its start order is on its way: the start finishes, and the
    // worker's report makes the app resident for the other hub.
    third.add("cnew", "counter-http", 60.0);
    let dns = third.dns;
    // (Its answer never comes: dig gives up by itself, on a thread left behind.)
    drop(std::thread::spawn(move || {
        dig(dns, "cnew.pico.local", "A", false)
    }));
    // Caught while its order is out (the usual case), or, on a slow machine, already
    // done: either way nothing may be lost.
    let caught = wait_for(
        "hub-c's order in the registry",
        Duration::from_secs(20),
        || {
            // (Not yet known there, the app is a 404 for a moment.)
            let (_, app) = second.call("GET", "/v1/apps/cnew", None);
            if app["ordered_by"]["hub"] == "hub-c" {
                Some(true)
            } else {
                (app["state"] == "resident").then_some(false)
            }
        },
    );
    eprintln!("hub-c killed with its order out: {caught}");
    third.proc.kill();
    second.wait_state("cnew", "resident", Duration::from_secs(20));
    let events = second.events("cnew");
    assert!(
        events
            .iter()
            .any(|e| e.starts_with("starting on worker w-etcd (hub hub-c)")),
        "{events:?}"
    );
    let new_address = resolve(&second, "cnew");
    assert_eq!(count(&new_address), 1);
    let (_, apps) = second.call("GET", "/v1/apps", None);
    let states: Vec<(&str, &str)> = apps
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["spec"]["name"].as_str().unwrap(),
                a["state"].as_str().unwrap(),
            )
        })
        .collect();
    // (cetcd, idle for a second, may have been swapped out meanwhile.)
    assert_eq!(states.len(), 2, "{states:?}");
    assert_eq!(states[1], ("cnew", "resident"));
}

#[test]
fn dns_answers_are_right_for_the_zone_and_failures_are_servfail() {
    let (dir, hub) = setup("zone");
    let store = dir.path().join("cold");
    let _worker = worker(
        &hub,
        "w-zone",
        "127.3.5.0/24",
        "60",
        &["--store", store.to_str().unwrap()],
    );
    hub.add("czone", "counter-http", 60.0);
    hub.add("broken", "no-such-image", 60.0);
    for tcp in [false, true] {
        let (status, answers) = dig(hub.dns, "nobody.pico.local", "A", tcp);
        assert_eq!((status.as_str(), answers.len()), ("NXDOMAIN", 0));
        let (status, answers) = dig(hub.dns, "czone.pico.local", "AAAA", tcp);
        assert_eq!((status.as_str(), answers.len()), ("NOERROR", 0));
        let (status, answers) = dig(hub.dns, "pico.local", "SOA", tcp);
        assert_eq!(status, "NOERROR");
        assert_eq!(answers, ["5"], "SOA minimum is the TTL");
        // One hub serves the zone: one name server, whose address is the hub's.
        let (status, answers) = dig(hub.dns, "pico.local", "NS", tcp);
        assert_eq!((status.as_str(), answers.len()), ("NOERROR", 1));
        assert!(
            answers[0].starts_with("ns-") && answers[0].ends_with(".pico.local."),
            "{answers:?}"
        );
        let (status, glue) = dig(hub.dns, &answers[0], "A", tcp);
        assert_eq!(
            (status.as_str(), glue),
            ("NOERROR", vec![hub.dns.ip().to_string()])
        );
        let (status, _) = dig(hub.dns, "example.com", "A", tcp);
        assert_eq!(status, "REFUSED");
    }
    // An app that cannot start: SERVFAIL, and the failure in its status.
    let (status, _) = dig(hub.dns, "broken.pico.local", "A", false);
    assert_eq!(status, "SERVFAIL");
    let app = hub.app("broken");
    assert_eq!(app["state"], "failed");
    assert!(
        app["last_error"]
            .as_str()
            .unwrap()
            .contains("no-such-image"),
        "{app}"
    );
    // The AAAA query did not start czone; its A query does.
    assert_eq!(hub.state("czone"), "new");
    let address = resolve(&hub, "czone");
    assert_eq!(count(&address), 1);
}

/// Builds the image `ticker` (tests/guests/ticker.c: wakes every 3 s, counts its ticks,
/// answers `ticks=N` on port 80), its definition under `dir`.
fn build_ticker(dir: &Path) {
    let definition = dir.join("ticker");
    std::fs::create_dir_all(&definition).unwrap();
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guests/ticker.c"),
        definition.join("ticker.c"),
    )
    .unwrap();
    std::fs::write(
        definition.join("image.toml"),
        "description = \"wakes every 3 s\"\n[run]\nargv = [\"/bin/ticker\"]\nmemory_mib = 16\nports = [80]\n\
         [root]\ncompile = [{ sources = [\"ticker.c\"], output = \"/bin/ticker\", flags = [\"-O2\", \"-static\"] }]\n",
    )
    .unwrap();
    let mut build = picocenter();
    build.args(["image", "build"]).arg(&definition);
    let out = run_with_limit(&mut build, Duration::from_secs(120));
    assert!(out.status.success(), "{}", describe(&out));
}

/// The ticks `ticker` at `address` counted.
fn ticks(address: &str) -> u64 {
    get(address, "/")
        .strip_prefix("ticks=")
        .and_then(|t| t.parse().ok())
        .expect("ticks=N")
}

#[test]
fn timers_bring_a_swapped_out_app_back_without_a_query() {
    let (dir, hub) = setup("timer");
    build_ticker(dir.path());
    let store = dir.path().join("cold");
    let _worker = worker(
        &hub,
        "w-timer",
        "127.3.6.0/24",
        "60",
        &["--store", store.to_str().unwrap()],
    );
    hub.add("ticker", "ticker", 1.0);
    let address = resolve(&hub, "ticker");
    assert_eq!(get(&address, "/"), "ticks=0");
    // Idle after 1 s; its poll times out 3 s after it began: the worker brings it back
    // then, with no query, and it ticks.
    hub.wait_state("ticker", "swapped_out", Duration::from_secs(10));
    wait_for("the timer to wake it", Duration::from_secs(15), || {
        hub.events("ticker")
            .iter()
            .any(|e| e == "timer due")
            .then_some(())
    });
    wait_for(
        "it to tick while nobody asked",
        Duration::from_secs(20),
        || {
            let app = hub.app("ticker");
            let swaps = app["usage"]["swap_ins"].as_u64()?;
            (swaps >= 1).then_some(())
        },
    );
    let address = resolve(&hub, "ticker");
    assert!(ticks(&address) >= 1, "it never ran while swapped out");
}

/// A timer that falls due while the app's snapshot is still being uploaded to S3 brings
/// the app back from the worker's local copy at once (the hub does not know the timer
/// before the upload ends).
#[test]
fn a_timer_due_during_an_upload_brings_the_app_back_from_the_local_copy() {
    let (dir, hub) = setup("timer-upload");
    build_ticker(dir.path());
    let (moto, link) = moto_behind(
        dir.path(),
        LinkShape {
            bytes_per_second: 5_000,
            ..LinkShape::default()
        },
    );
    let cold = s3_cold("picocenter-timer", &link.url(), &[]);
    let worker = worker(&hub, "w-timer-up", "127.3.22.0/24", "60", &as_strs(&cold));
    hub.add("tickup", "ticker", 1.0);
    let address = resolve(&hub, "tickup");
    assert_eq!(ticks(&address), 0);
    // Idle after 1 s, swapped out; its 3 s poll falls due while the upload crawls.
    wait_in_log(
        &worker,
        "uploading to cold storage while its sockets are held",
        1,
    );
    wait_in_log(&worker, "its timer is due during its upload", 1);
    let bucket = app_bucket(&moto, "picocenter-timer", "", "tickup", dir.path());
    use picocenter_snapshots::Store;
    assert_eq!(
        bucket.head().unwrap(),
        None,
        "the upload ended first; worker log:\n{}",
        worker.log()
    );
    // Back: its poll, past its deadline, times out, and it ticks. (A request that arrives
    // first restarts the poll's 3 s, so ask once, a full period later.)
    wait_in_log(&worker, "restored=true", 1);
    std::thread::sleep(Duration::from_secs(4));
    assert!(ticks(&address) >= 1, "worker log:\n{}", worker.log());
    assert_eq!(hub.state("tickup"), "resident");
}

#[test]
fn malformed_dns_and_api_requests_get_errors_not_crashes() {
    let (_dir, hub) = setup("hostile");
    hub.add("calm", "counter-http", 60.0);
    // DNS: garbage datagrams, a truncated header, a header claiming questions it lacks,
    // a label running past the end, a compression loop; then garbage over TCP.
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let packets: Vec<Vec<u8>> = vec![
        vec![],
        vec![0xff; 3],
        vec![0x12, 0x34, 0x01, 0x00, 0x00, 0x05, 0, 0, 0, 0, 0, 0],
        vec![
            0x12, 0x34, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0, 63, b'a', b'b',
        ],
        vec![
            0x12, 0x34, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0, 0xc0, 12, 0, 1, 0, 1,
        ],
        (0..512).map(|i| (i * 7) as u8).collect(),
    ];
    for packet in &packets {
        udp.send_to(packet, hub.dns).unwrap();
        let mut answer = [0u8; 512];
        if let Ok((n, _)) = udp.recv_from(&mut answer) {
            assert!(n >= 12, "a DNS answer has a header");
            assert_ne!(answer[3] & 0x0f, 0, "an error code for garbage");
        }
    }
    let mut tcp = std::net::TcpStream::connect(hub.dns).unwrap();
    let _ = tcp.write_all(&[0x00, 0x05, 1, 2, 3, 4, 5, 0xff, 0xff, 9, 9]);
    drop(tcp);

    // API: no token, a wrong one, bad JSON, a bad name, an unknown app.
    let (status, _) = api(hub.api, "GET", "/v1/apps", None, None);
    assert_eq!(status, 401);
    let (status, _) = api(hub.api, "GET", "/v1/apps", None, Some("wrong"));
    assert_eq!(status, 401);
    let (status, _) = api(hub.api, "POST", "/v1/apps", Some("{not json"), Some(TOKEN));
    assert_eq!(status, 400);
    let (status, _) = api(
        hub.api,
        "POST",
        "/v1/apps",
        Some(r#"{"name":"x"}"#),
        Some(TOKEN),
    );
    assert_eq!(status, 422);
    let (status, e) = hub.call(
        "POST",
        "/v1/apps",
        Some(r#"{"name":"Bad.Name","image":"i"}"#),
    );
    assert_eq!(status, 400, "{e}");
    let (status, _) = hub.call("POST", "/v1/apps", Some(r#"{"name":"calm","image":"i"}"#));
    assert_eq!(status, 409);
    let (status, _) = hub.call("GET", "/v1/apps/nobody", None);
    assert_eq!(status, 404);
    let (status, _) = hub.call("POST", "/v1/workers/ghost/report", Some("{}"));
    assert_eq!(status, 404);
    // A body declared too big is refused from its header: send only its start.
    let mut stream = std::net::TcpStream::connect(hub.api).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(
        stream,
        "POST /v1/apps HTTP/1.1\r\nHost: hub\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{{\"name\":\"",
        4 << 20
    )
    .unwrap();
    let mut answer = [0u8; 64];
    let n = stream.read(&mut answer).unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");

    // Still serving both.
    let (status, _) = dig(hub.dns, "calm.pico.local", "AAAA", false);
    assert_eq!(status, "NOERROR");
    assert_eq!(hub.state("calm"), "new");
}

#[test]
fn the_s3_backend_swaps_out_and_back() {
    let (dir, hub) = setup("s3");
    let moto = S3Server::moto(dir.path().join("moto.log"));
    let cold = s3_cold("picocenter-test", &moto.endpoint, &["--s3-prefix", "apps"]);
    let worker = worker(&hub, "w-s3", "127.3.7.0/24", "60", &as_strs(&cold));
    hub.add("cs3", "counter-http", 1.0);
    let address = resolve(&hub, "cs3");
    assert_eq!(count(&address), 1);
    hub.wait_state("cs3", "swapped_out", Duration::from_secs(20));
    // The worker's local copy goes: the restore must come from S3.
    let cache = state_dir().join("workers/w-s3/cache/cs3");
    std::fs::remove_dir_all(&cache).unwrap();
    let address = resolve(&hub, "cs3");
    assert_eq!(
        count(&address),
        2,
        "worker log:\n{}\nmoto:\n{}",
        worker.log(),
        moto.proc.log()
    );
    assert!(cache.join("store").exists());
    assert!(hub.app("cs3")["usage"]["stored_bytes"].as_u64().unwrap() > 0);
    // Its second snapshot is an increment of the first, but the chain is small: it is
    // compacted to one, so the next restore from S3 fetches one snapshot.
    hub.wait_state("cs3", "swapped_out", Duration::from_secs(20));
    let bucket = app_bucket(&moto, "picocenter-test", "apps", "cs3", dir.path());
    use picocenter_snapshots::Store;
    // The snapshots it replaced go after the swap-out is reported.
    let kept = wait_for(
        "the replaced snapshot to go",
        Duration::from_secs(10),
        || {
            let kept = bucket.list().unwrap();
            (kept.len() == 1).then_some(kept)
        },
    );
    assert_eq!(bucket.head().unwrap().as_ref(), kept.first());
    std::fs::remove_dir_all(&cache).unwrap();
    let address = resolve(&hub, "cs3");
    assert_eq!(count(&address), 3, "worker log:\n{}", worker.log());
}

/// An app that is a tree of processes (image nginx-workers: a master and two workers)
/// through the cluster: it swaps out when idle and comes back on a query, with all three
/// processes, from the worker's copy and from S3 (fetched whole, not streamed).
#[test]
fn a_master_and_its_workers_swap_out_and_back_through_a_worker() {
    let (dir, hub) = setup("tree");
    build_image("nginx-workers");
    let moto = S3Server::moto(dir.path().join("moto.log"));
    let cold = s3_cold("picocenter-tree", &moto.endpoint, &["--s3-prefix", "apps"]);
    let worker = worker(&hub, "w-tree", "127.3.9.0/24", "60", &as_strs(&cold));
    hub.add("ngw", "nginx-workers", 1.0);
    let expected =
        std::fs::read(state_dir().join("images/nginx-workers/rootfs/srv/www/files/1k.txt"))
            .unwrap();
    let cache = state_dir().join("workers/w-tree/cache/ngw");
    for round in 0..3 {
        let address = resolve(&hub, "ngw");
        let target: SocketAddr = format!("{address}:80").parse().unwrap();
        all_answered(target, "/files/1k.txt", 4, &expected);
        let processes = app_processes(vmm_pid("ngw"));
        assert_eq!(processes, 3, "round {round}: worker log:\n{}", worker.log());
        let deadline = Instant::now() + Duration::from_secs(30);
        while hub.state("ngw") != "swapped_out" {
            assert!(
                Instant::now() < deadline,
                "round {round}: not swapped out; worker log:\n{}",
                worker.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        if round == 1 {
            // The next restore comes from S3.
            std::fs::remove_dir_all(&cache).unwrap();
        }
    }
}

/// How many VMMs an app's tree has: its first's and those below it that are the app's
/// (the same user), not a supervisor.
fn app_processes(first: u32) -> usize {
    let uid = uid_of(first);
    let mut queue = vec![first];
    let mut count = 0;
    while let Some(pid) = queue.pop() {
        count += 1;
        queue.extend(
            children_of(pid)
                .into_iter()
                .filter(|&child| uid_of(child) == uid),
        );
    }
    count
}

/// Apps of one image share their pages in S3: the first one's page file is the image's
/// base, the others' are stored as what they do not share with it (README of the
/// snapshots crate, §5.7), and each comes back from S3 whole, on a worker that has no copy
/// of anything.
#[test]
fn apps_of_one_image_store_their_shared_pages_once_in_s3() {
    let (dir, hub) = setup("dedup");
    let moto = S3Server::moto(dir.path().join("moto.log"));
    let cold = s3_cold("picocenter-test", &moto.endpoint, &["--s3-prefix", "apps"]);
    let worker = worker(&hub, "w-dedup", "127.3.9.0/24", "60", &as_strs(&cold));
    let apps = ["dd1", "dd2", "dd3"];
    for app in apps {
        hub.add(app, "counter-http", 1.0);
        assert_eq!(count(&resolve(&hub, app)), 1);
        hub.wait_state(app, "swapped_out", Duration::from_secs(20));
    }
    let usage = |app: &str| {
        let usage = hub.app(app)["usage"].clone();
        let field = |name: &str| usage[name].as_u64().unwrap();
        (field("stored_bytes"), field("logical_bytes"))
    };
    let snapshot = |app: &str| hub.app(app)["snapshot"].as_str().unwrap().to_string();
    let (first_stored, first_logical) = usage("dd1");
    assert!(
        first_stored >= first_logical && first_logical > 0,
        "{:?}",
        usage("dd1")
    );
    let base = format!("dd1/{}", snapshot("dd1"));
    for app in &apps[1..] {
        let (stored, logical) = usage(app);
        eprintln!("{app}: {stored} bytes stored of {logical} ({first_stored} for the first)");
        let bucket = app_bucket(&moto, "picocenter-test", "apps", app, dir.path());
        let (bytes, packed_against) = bucket.stored_as(&snapshot(app)).unwrap();
        assert_eq!(
            packed_against.as_ref(),
            Some(&base),
            "{app}: worker log:\n{}",
            worker.log()
        );
        assert_eq!(bytes, stored);
        // The manifest is most of what is left: the pages are mostly the base's.
        assert!(
            stored < logical && logical > 0,
            "{app}: {stored} of {logical}"
        );
    }
    // Nothing local: not the apps' copies, not the image's base.
    let cache = state_dir().join("workers/w-dedup/cache");
    for entry in std::fs::read_dir(&cache).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            std::fs::remove_dir_all(&path).unwrap();
        }
    }
    for app in apps {
        assert_eq!(
            count(&resolve(&hub, app)),
            2,
            "{app}: worker log:\n{}",
            worker.log()
        );
    }
}

/// A server whose chain in S3 holds several packed levels (python-http: increments that
/// share pages with its image's base) comes back from S3 over the wide-area link every
/// time, the worker's copy of it deleted before each restore, and every other time its
/// copy of the image's base too. (The link admits 16 connections and keeps them: a
/// restore that asked for more at once would wait for ever.)
#[test]
fn a_chain_of_packed_levels_comes_back_from_s3() {
    build_image("python-http");
    let (dir, hub) = setup("packedchain");
    // Behind the wide-area link: its latency is what a chain's round trips meet.
    let (_moto, link) = moto_behind(dir.path(), LinkShape::default());
    let cold = s3_cold("picocenter-test", &link.url(), &["--s3-prefix", "apps"]);
    let worker = worker(&hub, "w-pchain", "127.3.11.0/24", "60", &as_strs(&cold));
    hub.add("pchain", "python-http", 60.0);
    let (_, workers) = hub.call("GET", "/v1/workers", None);
    let url: SocketAddr = workers[0]["url"].as_str().unwrap()["http://".len()..]
        .parse()
        .unwrap();
    let cache = state_dir().join("workers/w-pchain/cache/pchain");
    for round in 0..8 {
        let address = resolve(&hub, "pchain");
        let answer = raw_get(&address, "/", Duration::from_secs(30));
        assert!(
            answer
                .as_ref()
                .is_ok_and(|text| text.starts_with("HTTP/1.")),
            "round {round}: {answer:?}; worker log:\n{}",
            worker.log()
        );
        let (status, answer) = api(url, "POST", "/v1/apps/pchain/swap-out", None, Some(TOKEN));
        assert_eq!(status, 200, "{answer}");
        hub.wait_state("pchain", "swapped_out", Duration::from_secs(20));
        std::fs::remove_dir_all(&cache).unwrap();
        if round % 2 == 1 {
            let _ = std::fs::remove_dir_all(cache.with_file_name(".bases"));
        }
    }
}

/// With S3 and a cache limit of 0, a swapped-out app's local copy is evicted at once, and
/// its next restore fetches it from S3 again, state and all.
#[test]
fn a_worker_evicts_local_copies_past_its_cache_limit() {
    let (dir, hub) = setup("evict");
    let moto = S3Server::moto(dir.path().join("moto.log"));
    let cold = s3_cold(
        "picocenter-evict",
        &moto.endpoint,
        &["--cache-limit-mib", "0"],
    );
    let worker = worker(&hub, "w-evict", "127.3.15.0/24", "60", &as_strs(&cold));
    hub.add("cevict", "counter-http", 1.0);
    let address = resolve(&hub, "cevict");
    assert_eq!(count(&address), 1);
    hub.wait_state("cevict", "swapped_out", Duration::from_secs(20));
    let cache = state_dir().join("workers/w-evict/cache/cevict");
    wait_for("the local copy to go", Duration::from_secs(10), || {
        (!cache.exists()).then_some(())
    });
    let address = resolve(&hub, "cevict");
    assert_eq!(count(&address), 2, "worker log:\n{}", worker.log());
    // Without the limit the copy stays (the_s3_backend_swaps_out_and_back finds it).
}

#[test]
fn a_full_worker_swaps_out_its_least_recently_active_app() {
    let (dir, hub) = setup("capacity");
    let store = dir.path().join("cold");
    // Room for about one app: each VMM holds a few MiB, and a start wants 8 MiB free.
    let _worker = worker(
        &hub,
        "w-capacity",
        "127.3.8.0/24",
        "60",
        &[
            "--store",
            store.to_str().unwrap(),
            "--memory-limit-mib",
            "12",
        ],
    );
    hub.add("cold-a", "counter-http", 60.0);
    hub.add("cold-b", "counter-http", 60.0);
    let a = resolve(&hub, "cold-a");
    assert_eq!(count(&a), 1);
    wait_for(
        "the worker to report its memory",
        Duration::from_secs(5),
        || {
            let (_, workers) = hub.call("GET", "/v1/workers", None);
            (workers[0]["memory_bytes"].as_u64()? > 0).then_some(())
        },
    );
    let b = resolve(&hub, "cold-b");
    assert_eq!(count(&b), 1);
    hub.wait_state("cold-a", "swapped_out", Duration::from_secs(10));
    assert_eq!(hub.state("cold-b"), "resident");
    // And it comes back, with its count, pushing the other out.
    let a = resolve(&hub, "cold-a");
    assert_eq!(count(&a), 2);
    hub.wait_state("cold-b", "swapped_out", Duration::from_secs(10));
}

#[test]
fn a_long_snapshot_chain_is_compacted() {
    let (dir, hub) = setup("chain");
    let store = dir.path().join("cold");
    let _worker = worker(
        &hub,
        "w-chain",
        "127.3.10.0/24",
        "60",
        &["--store", store.to_str().unwrap()],
    );
    hub.add("cchain", "counter-http", 60.0);
    let (_, workers) = hub.call("GET", "/v1/workers", None);
    let url: SocketAddr = workers[0]["url"].as_str().unwrap()["http://".len()..]
        .parse()
        .unwrap();
    for expected in 1..=12 {
        let address = resolve(&hub, "cchain");
        assert_eq!(count(&address), expected);
        let (status, answer) = api(url, "POST", "/v1/apps/cchain/swap-out", None, Some(TOKEN));
        assert_eq!(status, 200, "{answer}");
        hub.wait_state("cchain", "swapped_out", Duration::from_secs(10));
    }
    let manifests = std::fs::read_dir(store.join("cchain"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".manifest"))
        .count();
    assert!(manifests <= 8, "{manifests} snapshots kept for one app");
    let address = resolve(&hub, "cchain");
    assert_eq!(count(&address), 13);
}

/// One GET / to counter-http at `address` (port 80), as a client would make it: the count,
/// or what went wrong (refused, reset, timed out, a bad answer).
fn try_count(address: &str) -> Result<u64, String> {
    let text = raw_get(address, "/", Duration::from_secs(30))?;
    text.split("\r\n\r\n")
        .nth(1)
        .and_then(|body| body.trim().strip_prefix("count="))
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("answer {text:?}"))
}

/// `GET path` from `address`:80 on a connection of its own, waiting up to `limit` for
/// the whole answer: its text.
fn raw_get(address: &str, path: &str, limit: Duration) -> Result<String, String> {
    let addr: SocketAddr = format!("{address}:80")
        .parse()
        .map_err(|e| format!("{e}"))?;
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(20))
        .map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(limit))
        .map_err(|e| e.to_string())?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .map_err(|e| format!("read: {e}"))?;
    Ok(String::from_utf8_lossy(&raw).into_owned())
}

/// One datagram to udp-counter at `address` (port 53): its count.
fn udp_count(address: &str) -> u64 {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    socket.send_to(b"hello", format!("{address}:53")).unwrap();
    let mut answer = [0u8; 64];
    let n = socket
        .recv(&mut answer)
        .expect("an answer from the UDP app");
    String::from_utf8_lossy(&answer[..n])
        .trim()
        .strip_prefix("count=")
        .and_then(|c| c.parse().ok())
        .expect("count=N")
}

#[test]
fn a_swapped_out_app_keeps_its_address_and_a_connection_wakes_it() {
    let (dir, hub) = setup("wake");
    let store = dir.path().join("cold");
    let _worker = worker(
        &hub,
        "w-wake",
        "127.3.8.0/24",
        "60",
        &["--store", store.to_str().unwrap()],
    );
    hub.add("cwake", "counter-http", 1.0);
    let address = resolve(&hub, "cwake");
    assert_eq!(count(&address), 1);
    hub.wait_state("cwake", "swapped_out", Duration::from_secs(15));
    // No DNS query: a client that kept the address connects, and the connection waits in
    // the held socket's backlog while the app comes back; it is served by the same app.
    assert_eq!(try_count(&address), Ok(2));
    // The app answers as soon as it is back; the hub hears of it just after.
    hub.wait_state("cwake", "resident", Duration::from_secs(10));
    assert!(
        hub.events("cwake")
            .iter()
            .any(|e| e.contains("restoring snapshot")),
        "{:?}",
        hub.events("cwake")
    );
    // And again, through DNS now: the same address.
    hub.wait_state("cwake", "swapped_out", Duration::from_secs(15));
    assert_eq!(resolve(&hub, "cwake"), address);
    assert_eq!(count(&address), 3);
}

#[test]
fn a_datagram_wakes_a_swapped_out_udp_app_and_is_answered() {
    build_image("udp-counter");
    let (dir, hub) = setup("udpwake");
    let store = dir.path().join("cold");
    let _worker = worker(
        &hub,
        "w-udp",
        "127.3.9.0/24",
        "60",
        &["--store", store.to_str().unwrap()],
    );
    hub.add("uwake", "udp-counter", 1.0);
    let address = resolve(&hub, "uwake");
    assert_eq!(udp_count(&address), 1);
    hub.wait_state("uwake", "swapped_out", Duration::from_secs(15));
    // The datagram waits in the held UDP socket; the restored app reads and answers it.
    assert_eq!(udp_count(&address), 2);
    hub.wait_state("uwake", "resident", Duration::from_secs(10));
}

#[test]
fn requests_during_a_slow_swap_out_are_all_served_by_the_app() {
    let (dir, hub) = setup("slowswap");
    let store = dir.path().join("cold");
    // Every snapshot takes an extra second (a debug-build test knob), so requests land
    // while the app is stopped at its clean point, and while it is held.
    let mut cmd = picocenter();
    cmd.env("PICOCENTER_TEST_SNAPSHOT_DELAY_MS", "1000");
    worker_args(&mut cmd, &[hub.url()], TOKEN, "w-slow");
    cmd.args(["--addresses", "127.3.10.0/24", "--idle-after", "60"]);
    cmd.args(["--store", store.to_str().unwrap()]);
    let _worker = Proc::spawn(cmd, hub.data.with_extension("w-slow.log"));
    wait_for("the worker to register", Duration::from_secs(20), || {
        let (_, workers) = hub.call("GET", "/v1/workers", None);
        workers
            .as_array()?
            .iter()
            .any(|w| w["id"] == "w-slow")
            .then_some(())
    });
    hub.add("cslow", "counter-http", 1.0);
    let address = resolve(&hub, "cslow");
    assert_eq!(count(&address), 1);
    // Wait until the swap-out has begun (the app is past its idle time), then send
    // requests in a row while it is being snapshotted, stopped and held.
    std::thread::sleep(Duration::from_millis(1400));
    let clients: Vec<_> = (0..5)
        .map(|i| {
            let address = address.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(i * 300));
                try_count(&address)
            })
        })
        .collect();
    let mut counts: Vec<u64> = clients
        .into_iter()
        .map(|c| c.join().unwrap().expect("every request is answered"))
        .collect();
    counts.sort();
    assert_eq!(counts, [2, 3, 4, 5, 6], "no request lost, none twice");
}

/// The soak of issue #17: twenty apps that swap out after 1.5 s idle, and a client loop
/// that for 60 s picks an app at random, resolves it (or, half the time, reuses the
/// address it cached), and asks for its count. Every request must be answered, by its own
/// app, with the count one above the last: none refused, reset, lost or misrouted.
#[test]
fn a_soak_of_twenty_swapping_apps_refuses_and_misroutes_nothing() {
    const APPS: usize = 20;
    let (dir, hub) = setup("soak");
    let store = dir.path().join("cold");
    let _worker = worker(
        &hub,
        "w-soak",
        "127.3.12.0/24",
        "60",
        &["--store", store.to_str().unwrap()],
    );
    let names: Vec<String> = (0..APPS).map(|i| format!("soak{i}")).collect();
    for name in &names {
        hub.add(name, "counter-http", 1.5);
    }
    let mut last = [0u64; APPS];
    let mut cached: Vec<Option<String>> = vec![None; APPS];
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut random = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let (mut failures, mut latencies, mut swapped_requests) = (Vec::new(), Vec::new(), 0);
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(60) {
        let i = (random() % APPS as u64) as usize;
        let address = match (&cached[i], random() % 2) {
            (Some(address), 0) => address.clone(),
            _ => {
                let address = resolve(&hub, &names[i]);
                cached[i] = Some(address.clone());
                address
            }
        };
        if hub.state(&names[i]) == "swapped_out" {
            swapped_requests += 1;
        }
        let asked = std::time::Instant::now();
        match try_count(&address) {
            Ok(count) if count == last[i] + 1 => {
                last[i] = count;
                latencies.push(asked.elapsed().as_secs_f64() * 1e3);
            }
            Ok(count) => failures.push(format!(
                "{}: count {count} after {} (another app's, or state lost)",
                names[i], last[i]
            )),
            Err(e) => failures.push(format!("{} at {address}: {e}", names[i])),
        }
        std::thread::sleep(Duration::from_millis(random() % 300));
    }
    assert!(failures.is_empty(), "{failures:#?}");
    assert!(
        swapped_requests >= 10,
        "too few requests found their app swapped out ({swapped_requests}) to test anything"
    );
    latencies.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
    println!(
        "soak: {} requests ({swapped_requests} to swapped-out apps), latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        latencies.len(),
        at(0.5),
        at(0.99),
        at(1.0)
    );
}

/// Issue #18: idleness is judged by the app's CPU too, not only by its connections: an
/// app that computes for five seconds after its last connection, with no system call, is
/// not swapped out while it does, though its idle limit is one second.
#[test]
fn an_app_that_computes_without_connections_is_not_swapped_out_as_idle() {
    let (dir, hub) = setup("burn");
    let store = dir.path().join("cold");
    let _worker = worker(
        &hub,
        "w-burn",
        "127.3.13.0/24",
        "60",
        &["--store", store.to_str().unwrap()],
    );
    hub.add("cburn", "counter-http", 1.0);
    let address = resolve(&hub, "cburn");
    assert_eq!(get(&address, "/burn"), "burning");
    let burning = Instant::now();
    while burning.elapsed() < Duration::from_secs(4) {
        assert_eq!(
            hub.state("cburn"),
            "resident",
            "swapped out {:?} into a 5 s computation",
            burning.elapsed()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Done computing, it idles, and goes.
    hub.wait_state("cburn", "swapped_out", Duration::from_secs(20));
}

/// Issue #14's rig end to end: cold storage is the S3 test server behind a slow link
/// (tests/common/wan.rs; 300 ms round trips here, so that every step through it is
/// plainly slower than anything on loopback). A swapped-out app whose local copy is gone
/// comes back from S3 through the link with its state, and the hub's DNS answer does not
/// wait for it: the worker holds the app's address, so the hub answers with it at once
/// and the client's connection waits in the held socket's backlog.
/// A moto S3 server (its log in `dir`), and a link shaped as `shape` in front of it.
fn moto_behind(dir: &Path, shape: LinkShape) -> (S3Server, WanLink) {
    let moto = S3Server::moto(dir.join("moto.log"));
    let server = moto.endpoint.trim_start_matches("http://").parse().unwrap();
    let link = WanLink::start_http(server, shape);
    (moto, link)
}

#[test]
fn a_swapped_out_app_comes_back_over_a_wide_area_link_and_dns_does_not_wait() {
    let (dir, hub) = setup("s3wan");
    let rtt = Duration::from_millis(400);
    let (moto, link) = moto_behind(
        dir.path(),
        LinkShape {
            rtt,
            ..LinkShape::default()
        },
    );
    let endpoint = link.url();
    let cold = s3_cold("picocenter-wan", &endpoint, &[]);
    let worker = worker(&hub, "w-s3wan", "127.3.14.0/24", "60", &as_strs(&cold));
    hub.add("cs3wan", "counter-http", 1.0);
    let first = resolve(&hub, "cs3wan");
    assert_eq!(count(&first), 1);
    // The report that says it is out says the worker holds its address, too.
    hub.wait_state("cs3wan", "swapped_out", Duration::from_secs(60));
    let cache = state_dir().join("workers/w-s3wan/cache/cs3wan");
    std::fs::remove_dir_all(&cache).unwrap();
    let before = link.downloaded.load(std::sync::atomic::Ordering::SeqCst);

    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let asked = Instant::now();
    socket
        .send_to(&query("cs3wan.pico.local", 9), hub.dns)
        .unwrap();
    let mut answer = [0u8; 512];
    let n = socket.recv(&mut answer).unwrap();
    let answered = asked.elapsed();
    let address = first_a(&answer[..n]).expect("an address");
    assert_eq!(address.to_string(), first, "the held address");
    assert_eq!(
        count(&first),
        2,
        "worker log:\n{}\nmoto:\n{}",
        worker.log(),
        moto.proc.log()
    );
    let served = asked.elapsed();
    let fetched = link.downloaded.load(std::sync::atomic::Ordering::SeqCst) - before;
    assert!(fetched > 0, "nothing came through the link");
    // The restore needed one round trip through the link, and only one: the worker keeps
    // connections open, and asks for the manifest and the first part of the page file and
    // the data archive at once. The answer needed none.
    assert!(served >= rtt, "served after {served:?}");
    assert!(
        served < 2 * rtt,
        "served after {served:?}, more than one round trip; worker log:\n{}",
        worker.log()
    );
    assert!(answered < rtt / 2, "answered after {answered:?}");
}

/// `GET path` from `address`:80, waiting up to 2 minutes for the answer: its body.
fn patient_get(address: &str, path: &str) -> Result<String, String> {
    let text = raw_get(address, path, Duration::from_secs(120))?;
    if !text.starts_with("HTTP/1.1 200") && !text.starts_with("HTTP/1.0 200") {
        return Err(format!("answer {text:?}"));
    }
    let body = text.split("\r\n\r\n").nth(1).ok_or("no body")?;
    Ok(body.trim().to_string())
}

/// Issue #14: a swapped-out app whose page file is too big to come with its manifest
/// (bigmem: 256 MiB, of which requests read 8) comes back from S3 over the wide-area link
/// by streaming. Its VMM starts once the manifests are in, and the first response comes
/// when a small part of the page file has crossed the link; the rest follows, each chunk
/// checked, and completes the worker's local copy, from which the next swap-out builds.
#[test]
fn a_big_swapped_out_app_streams_from_s3_and_answers_before_its_memory_is_in() {
    build_image("bigmem");
    let (dir, hub) = setup("s3stream");
    // Slow enough per connection that the whole page file takes well over a second.
    let (moto, link) = moto_behind(
        dir.path(),
        LinkShape {
            bytes_per_second: 10_000_000,
            ..LinkShape::default()
        },
    );
    let cold = s3_cold("picocenter-stream", &link.url(), &[]);
    let worker = worker(&hub, "w-s3stream", "127.3.16.0/24", "60", &as_strs(&cold));
    // Patient (moto serves each ranged GET of the 256 MiB object in ~170 ms, one at a
    // time, and slower still beside the other tests), and a failed request says what
    // the worker saw.
    let get = |address: &str, path: &str| {
        patient_get(address, path).unwrap_or_else(|e| {
            panic!(
                "GET {path} from {address} failed: {e}; worker log:\n{}",
                worker.log()
            )
        })
    };
    hub.add("bigs3", "bigmem", 2.0);
    let address = resolve(&hub, "bigs3");
    let checksum = get(&address, "/");
    hub.wait_state("bigs3", "swapped_out", Duration::from_secs(120));
    let cache = state_dir().join("workers/w-s3stream/cache/bigs3");
    std::fs::remove_dir_all(&cache).unwrap();
    let before = link.downloaded.load(std::sync::atomic::Ordering::SeqCst);

    let asked = Instant::now();
    let again = resolve(&hub, "bigs3");
    assert_eq!(again, address, "the held address");
    assert_eq!(get(&address, "/"), checksum);
    let at_first_response = link.downloaded.load(std::sync::atomic::Ordering::SeqCst) - before;
    eprintln!(
        "first response {:.1} ms after the query, {:.1} MiB through the link by then",
        asked.elapsed().as_secs_f64() * 1e3,
        at_first_response as f64 / 1048576.0
    );
    // The page file holds the 256 MiB the app filled; the response needed the 8 it reads.
    assert!(
        at_first_response < 64 << 20,
        "{} MiB had come through the link at the first response; worker log:\n{}",
        at_first_response >> 20,
        worker.log()
    );
    // The rest streams in behind it and completes the local copy (until then the
    // snapshot is pending there: a manifest without a page file, and no HEAD).
    let store = cache.join("store");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let head = std::fs::read_to_string(store.join("HEAD")).unwrap_or_default();
        let head = head.trim();
        if !head.is_empty() && store.join(format!("{head}.pages")).exists() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the page files did not stream in; worker log:\n{}",
            worker.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let streamed = link.downloaded.load(std::sync::atomic::Ordering::SeqCst) - before;
    eprintln!(
        "streamed in {:.1} s, {:.1} MiB",
        asked.elapsed().as_secs_f64(),
        streamed as f64 / 1048576.0
    );
    assert!(streamed > 256 << 20, "only {} MiB came", streamed >> 20);
    assert!(
        !worker.log().contains("failed"),
        "worker log:\n{}",
        worker.log()
    );
    // The next swap-out builds on the streamed snapshot, and the one after comes back
    // from the local copy it completed, same memory.
    hub.wait_state("bigs3", "swapped_out", Duration::from_secs(120));
    assert_eq!(get(&resolve(&hub, "bigs3"), "/"), checksum);

    // One byte of the 256 MiB page file damaged in the bucket, far from the pages
    // requests read: the VMM refuses that chunk when it comes and stops, and no response
    // ever carries memory that is not the app's.
    hub.wait_state("bigs3", "swapped_out", Duration::from_secs(120));
    let bucket = app_bucket(&moto, "picocenter-stream", "", "bigs3", dir.path());
    use picocenter_snapshots::Store;
    let base = bucket
        .list()
        .unwrap()
        .into_iter()
        .max_by_key(|id| bucket.size(id).unwrap())
        .unwrap();
    let url = format!("{}/picocenter-stream/bigs3/{base}.pages", moto.endpoint);
    let copy = dir.path().join("damaged.pages");
    let curl = |args: &[&str]| {
        let out = Command::new("curl")
            .args(["-sSf"])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "curl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    curl(&["-o", copy.to_str().unwrap(), &url]);
    let mut bytes = std::fs::read(&copy).unwrap();
    assert!(bytes.len() > 256 << 20, "{base}: {} bytes", bytes.len());
    bytes[200 << 20] ^= 1;
    std::fs::write(&copy, bytes).unwrap();
    // Put back the way a worker uploads (multipart: moto refuses a 256 MiB PUT).
    let manifest = bucket.manifest(&base, &snapshot_key()).unwrap();
    assert_eq!(manifest.data_bytes, 0, "bigmem has no writable directories");
    bucket
        .commit(&manifest, &snapshot_key(), &copy, None)
        .unwrap();
    std::fs::remove_dir_all(&cache).unwrap();
    let address = resolve(&hub, "bigs3");
    // The first request may be answered (its pages come first, undamaged) or not.
    if let Ok(body) = std::panic::catch_unwind(|| {
        let addr: SocketAddr = format!("{address}:80").parse().unwrap();
        String::from_utf8_lossy(&http(addr, "GET", "/", b"").body)
            .trim()
            .to_string()
    }) {
        assert!(body.is_empty() || body == checksum, "{body:?}");
    }
    let app_log = state_dir().join("workers/w-s3stream/logs/bigs3.log");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let log = std::fs::read_to_string(&app_log).unwrap_or_default();
        if log.contains("fails its checksum") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the damaged chunk was not refused; app log:\n{log}\nworker log:\n{}",
            worker.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Nothing of the damaged snapshot is taken as whole in the worker's copy.
    let store = cache.join("store");
    assert!(!store.join(format!("{base}.pages")).exists());
}

/// `GET /metrics` of the API at `address`: the text.
fn metrics(address: SocketAddr) -> String {
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).unwrap();
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    assert!(raw.contains("application/openmetrics-text"), "{raw}");
    raw.split_once("\r\n\r\n").unwrap().1.to_string()
}

/// The value of the sample `series` (name and labels as written) in metrics `text`.
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

/// Worker `id`'s API address, from the hub's list of workers.
fn worker_api(hub: &Hub, id: &str) -> SocketAddr {
    let (_, workers) = hub.call("GET", "/v1/workers", None);
    let url = workers
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["id"] == id)
        .and_then(|w| w["url"].as_str())
        .unwrap_or_else(|| panic!("{id} in {workers}"))
        .to_string();
    url["http://".len()..].parse().unwrap()
}

/// Waits up to 30 s for `text`'s `n`th appearance in `proc`'s log.
fn wait_in_log(proc: &Proc, text: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while proc.log().matches(text).count() < n {
        assert!(
            Instant::now() < deadline,
            "{text:?} is not {n} times in the log:\n{}",
            proc.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Issue #14, item 6: a swap-out to S3 never makes a request wait for its upload, and a
/// worker that dies during an upload leaves the app's previous snapshot whole. S3 is
/// reached through a link of 10 kB/s a connection, so each upload takes seconds.
#[test]
fn a_request_during_an_upload_is_served_from_the_local_copy_and_a_crash_keeps_the_last_snapshot() {
    let (dir, hub) = setup("upload");
    let (moto, link) = moto_behind(
        dir.path(),
        LinkShape {
            bytes_per_second: 10_000,
            ..LinkShape::default()
        },
    );
    let cold = s3_cold("picocenter-upload", &link.url(), &[]);
    let mut first = worker(&hub, "w-up1", "127.3.17.0/24", "60", &as_strs(&cold));
    hub.add("cup", "counter-http", 600.0);
    let address = resolve(&hub, "cup");
    assert_eq!(count(&address), 1);
    let url = worker_api(&hub, "w-up1");
    let bucket = app_bucket(&moto, "picocenter-upload", "", "cup", dir.path());
    use picocenter_snapshots::Store;
    const UPLOADING: &str = "uploading to cold storage while its sockets are held";

    // A swap-out through the worker's API, which answers once the upload has ended.
    let swap_out = move || {
        std::thread::spawn(move || api(url, "POST", "/v1/apps/cup/swap-out", None, Some(TOKEN)))
    };
    let swapping = swap_out();
    wait_in_log(&first, UPLOADING, 1);
    let asked = Instant::now();
    assert_eq!(count(&address), 2, "worker log:\n{}", first.log());
    let served = asked.elapsed();
    // Nothing was in S3 yet when the request was answered: it did not wait for the upload.
    assert_eq!(
        bucket.head().unwrap(),
        None,
        "answered after {served:?}, after the upload; worker log:\n{}",
        first.log()
    );
    assert!(served < Duration::from_secs(5), "answered after {served:?}");
    assert_eq!(hub.state("cup"), "resident");
    let (status, swapped) = swapping.join().unwrap();
    assert_eq!(status, 200, "{swapped}");
    let uploaded_in = asked.elapsed();
    let s1 = swapped["snapshot"].as_str().unwrap().to_string();
    assert_eq!(bucket.head().unwrap().as_deref(), Some(s1.as_str()));
    // The hub's restore point moved on; the app stayed resident.
    wait_for("the hub to hear of it", Duration::from_secs(10), || {
        (hub.app("cup")["snapshot"] == s1.as_str()).then_some(())
    });
    assert_eq!(hub.state("cup"), "resident");
    assert!(hub
        .events("cup")
        .iter()
        .any(|e| e.contains("came back from the worker's copy")));
    eprintln!("answered {served:?} into a swap-out whose upload took {uploaded_in:?}");
    let uploaded = metrics(url);
    assert_eq!(
        metric(&uploaded, "picocenter_worker_upload_seconds_count"),
        1.0
    );
    assert!(
        metric(
            &uploaded,
            "picocenter_worker_cold_storage_bytes_total{direction=\"up\"}"
        ) >= swapped["stored_bytes"].as_f64().unwrap()
    );

    // The next swap-out (its chain is compacted into one full snapshot, so its upload
    // takes as long): the worker dies in the middle of it.
    let _dying = swap_out();
    wait_in_log(&first, UPLOADING, 2);
    first.kill();
    assert_eq!(
        bucket.head().unwrap().as_deref(),
        Some(s1.as_str()),
        "worker log:\n{}",
        first.log()
    );
    bucket.manifest(&s1, &snapshot_key()).unwrap();
    // Another worker brings it back from s1, straight from S3.
    let cold = s3_cold("picocenter-upload", &moto.endpoint, &[]);
    let second = worker(&hub, "w-up2", "127.3.18.0/24", "60", &as_strs(&cold));
    hub.wait_state("cup", "swapped_out", Duration::from_secs(15));
    assert!(hub
        .events("cup")
        .iter()
        .any(|e| e.contains(&format!("w-up1 is gone: back to snapshot {s1}"))));
    let address = resolve(&hub, "cup");
    assert!(address.starts_with("127.3.18."), "{address}");
    // s1 held count 1; the request after it, served from the local copy, was lost.
    assert_eq!(count(&address), 2, "worker log:\n{}", second.log());
    let downloaded = metrics(worker_api(&hub, "w-up2"));
    assert!(
        metric(
            &downloaded,
            "picocenter_worker_cold_storage_bytes_total{direction=\"down\"}"
        ) > 0.0
    );
}

/// `--log-format json`: every log line the hub writes is a JSON object with a level and
/// a message.
#[test]
fn a_hub_logs_json_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = picocenter();
    cmd.args(["hub", "--dns", "127.0.0.1:0", "--api", "127.0.0.1:0"]);
    cmd.args(["--token", TOKEN, "--log-format", "json"]);
    cmd.arg("--data-dir").arg(dir.path().join("hub"));
    let mut hub = Proc::spawn(cmd, dir.path().join("hub.log"));
    let (dns, api_at) = wait_for("the hub", Duration::from_secs(60), || {
        hub_addresses(&hub.log)
    });
    // An app no worker can run: its query fails, and the hub logs why.
    let body = r#"{"name":"nowhere","image":"counter-http"}"#;
    assert_eq!(
        api(api_at, "POST", "/v1/apps", Some(body), Some(TOKEN)).0,
        201
    );
    let (status, _) = dig(dns, "nowhere.pico.local", "A", false);
    assert_eq!(status, "SERVFAIL");
    hub.terminate();
    let log = hub.log();
    let mut records = 0;
    for line in log.lines().filter(|l| !l.starts_with("hub: ")) {
        let record: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:?}\n{log}"));
        assert!(record["level"].is_string(), "{line}");
        assert!(record["fields"]["message"].is_string(), "{line}");
        records += 1;
    }
    assert!(log.contains("SERVFAIL"), "{log}");
    assert!(records > 0, "{log}");
}

/// `hub --tls-cert --tls-key`: the API over HTTPS. A worker and `picocenter app` that
/// trust the certificate (`--hub-ca`) use it, and apps start as usual; `picocenter app`
/// without that trust is refused, and plain HTTP gets no API.
#[test]
fn the_hub_serves_its_api_over_tls() {
    build_image("counter-http");
    let dir = tempfile::tempdir().unwrap();
    // A private CA, and the hub's certificate for 127.0.0.1 signed by it.
    let file = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let (ca, cert, key) = (file("ca.pem"), file("cert.pem"), file("key.pem"));
    std::fs::write(
        file("leaf.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\n",
    )
    .unwrap();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    for args in [
        [
            &["req", "-x509"][..],
            &ec,
            &["-days", "1", "-subj", "/CN=picocenter test CA"],
        ]
        .concat()
        .into_iter()
        .chain(["-keyout", &file("ca.key"), "-out", &ca])
        .collect::<Vec<_>>(),
        [&["req"][..], &ec, &["-subj", "/CN=hub", "-keyout", &key]]
            .concat()
            .into_iter()
            .chain(["-out", &file("hub.csr")])
            .collect(),
        vec![
            "x509",
            "-req",
            "-in",
            &file("hub.csr"),
            "-CA",
            &ca,
            "-CAkey",
            &file("ca.key"),
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            &file("leaf.ext"),
            "-out",
            &cert,
        ],
    ] {
        let made = Command::new("openssl")
            .args(&args)
            .output()
            .expect("openssl");
        assert!(
            made.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&made.stderr)
        );
    }
    let mut cmd = picocenter();
    cmd.args(["hub", "--dns", "127.0.0.1:0", "--api", "127.0.0.1:0"]);
    cmd.args(["--token", TOKEN, "--worker-timeout", "2"]);
    cmd.args(["--tls-cert", &cert, "--tls-key", &key]);
    cmd.arg("--data-dir").arg(dir.path().join("hub"));
    let hub = Proc::spawn(cmd, dir.path().join("hub.log"));
    let (dns, api_at) = wait_for("the hub", Duration::from_secs(60), || {
        let log = hub.log();
        let line = log.lines().find(|l| l.starts_with("hub: DNS on "))?;
        let dns = line
            .strip_prefix("hub: DNS on ")?
            .split_whitespace()
            .next()?;
        let api = line.split("https://").nth(1)?.split(';').next()?;
        Some((dns.parse::<SocketAddr>().ok()?, api.to_string()))
    });
    let url = format!("https://{api_at}");
    let app = |trust: bool, args: &[&str]| {
        let mut cmd = picocenter();
        cmd.args(["app", "--hub", &url, "--token", TOKEN]);
        if trust {
            cmd.args(["--hub-ca", &ca]);
        }
        cmd.args(args).output().unwrap()
    };
    // The CA with a plain http:// hub is a mistake, said as such.
    let mut plain = picocenter();
    plain.args([
        "app",
        "--hub",
        &format!("http://{api_at}"),
        "--token",
        TOKEN,
    ]);
    let plain = plain.args(["--hub-ca", &ca, "ls"]).output().unwrap();
    assert!(
        !plain.status.success() && describe(&plain).contains("is for an https:// hub"),
        "{}",
        describe(&plain)
    );
    let refused = app(false, &["ls"]);
    assert!(
        !refused.status.success() && describe(&refused).contains("certificate"),
        "{}",
        describe(&refused)
    );
    let added = app(true, &["add", "ctls", "--image", "counter-http"]);
    assert!(added.status.success(), "{}", describe(&added));
    // Plain HTTP to the HTTPS port is no API (the server may close before the whole
    // request is written).
    let mut plain = std::net::TcpStream::connect(&api_at).unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let request = format!("GET /v1/apps HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\n\r\n");
    let _ = plain.write_all(request.as_bytes());
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(!answer.contains("ctls"), "{answer}");

    let store = dir.path().join("cold");
    let mut cmd = picocenter();
    // Its secrets through the environment, as the systemd unit passes them.
    cmd.env("PICOCENTER_TOKEN", TOKEN);
    cmd.env("AWS_SECRET_ACCESS_KEY", "not-for-vmms");
    cmd.args(["worker", "--hub", &url, "--id", "w-tls"]);
    cmd.args(["--addresses", "127.3.19.0/24", "--idle-after", "60"]);
    cmd.args(["--hub-ca", &ca]);
    cmd.arg("--store").arg(&store);
    let worker = Proc::spawn(cmd, dir.path().join("w-tls.log"));
    wait_for("the worker to register", Duration::from_secs(20), || {
        let listed = app(true, &["ls"]);
        (listed.status.success() && worker.log().contains("registered with the hub")).then_some(())
    });
    let (status, answers) = dig(dns, "ctls.pico.local", "A", false);
    assert_eq!(status, "NOERROR", "worker log:\n{}", worker.log());
    assert_eq!(count(&answers[0]), 1);
    let status = app(true, &["status", "ctls"]);
    assert!(
        stdout(&status).contains("resident"),
        "{}",
        describe(&status)
    );
    // The app's VMM has none of the worker's secrets in its environment.
    let pid = vmm_pid("ctls");
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let environ = String::from_utf8_lossy(&environ);
    assert!(environ.contains("PICOCENTER_STATE_DIR="), "{environ}");
    assert!(!environ.contains(TOKEN), "the token reached the VMM");
    assert!(
        !environ.contains("not-for-vmms"),
        "an AWS key reached the VMM"
    );
}

/// A worker stopped with SIGTERM swaps its apps out and waits for their uploads while it
/// goes on reporting: the hub never takes it for dead meanwhile, and hears of every
/// swap-out. S3 is behind a 10 kB/s link, so the upload outlasts the hub's 2 s worker
/// timeout several times.
#[test]
fn a_stopping_worker_reports_its_swap_outs_until_their_uploads_end() {
    let (dir, hub) = setup("stopping");
    let (_moto, link) = moto_behind(
        dir.path(),
        LinkShape {
            bytes_per_second: 10_000,
            ..LinkShape::default()
        },
    );
    let cold = s3_cold("picocenter-stopping", &link.url(), &[]);
    let mut first = worker(&hub, "w-stop-1", "127.3.23.0/24", "60", &as_strs(&cold));
    hub.add("cstop", "counter-http", 600.0);
    let address = resolve(&hub, "cstop");
    assert_eq!(count(&address), 1);
    let stopped = Instant::now();
    first.terminate();
    eprintln!("the worker stopped in {:?}", stopped.elapsed());
    assert_eq!(hub.state("cstop"), "swapped_out", "{}", first.log());
    assert!(hub.app("cstop")["snapshot"].is_string());
    assert!(
        !hub.events("cstop").iter().any(|e| e.contains("is gone")),
        "{:?}",
        hub.events("cstop")
    );
    // Its state is in S3: another worker brings it back with it.
    let cold = s3_cold("picocenter-stopping", &link.url(), &[]);
    let _second = worker(&hub, "w-stop-2", "127.3.24.0/24", "60", &as_strs(&cold));
    let address = resolve(&hub, "cstop");
    assert_eq!(count(&address), 2);
}

/// The inodes of the seqpacket Unix sockets on this host (/proc/net/unix, type 0005).
fn seqpacket_inodes() -> std::collections::HashSet<String> {
    std::fs::read_to_string("/proc/net/unix")
        .unwrap()
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.get(4) == Some(&"0005")).then(|| fields.get(6).map(|s| s.to_string()))?
        })
        .collect()
}

#[test]
fn a_warm_pool_s_spares_run_apps_jailed_and_die_with_their_worker() {
    let (dir, hub) = setup("warm");
    let store = dir.path().join("cold");
    let mut cmd = picocenter();
    cmd.args(["worker", "--hub", &hub.url(), "--id", "w-warm"]);
    cmd.args(["--addresses", "127.3.30.0/24", "--idle-after", "60"]);
    cmd.args(["--store", store.to_str().unwrap(), "--warm-pool", "2"]);
    // Through the environment: no VMM may find it in its own.
    cmd.env("PICOCENTER_TOKEN", TOKEN);
    cmd.env("RUST_LOG", "warn,picocenter_hub=debug");
    let mut worker = Proc::spawn(cmd, hub.data.with_extension("w-warm.log"));
    let worker_pid = worker.child.id();
    let limit = Duration::from_secs(20);
    wait_for("two spares", limit, || {
        (waiting_spares(worker_pid).len() == 2).then_some(())
    });
    let spares = waiting_spares(worker_pid);
    // Its spares may be up before the hub has taken it in (the hub logs a registration
    // before it has made the worker's client): a query before then finds no live worker.
    wait_until_registered(&hub, "w-warm");

    hub.add("cwarm", "counter-http", 60.0);
    let address = resolve(&hub, "cwarm");
    assert_eq!(count(&address), 1);
    let pid = vmm_pid("cwarm");
    assert!(
        spares.contains(&pid),
        "the app's VMM {pid} is not one of the spares {spares:?}"
    );
    // Jailed as its own uid like any VMM, with nothing of the worker's secrets, and with
    // no assignment socket left open (an app could otherwise send it another command line).
    let uid = uid_of(pid).unwrap();
    assert!(uid >= 2_000_000_000, "the VMM runs as uid {uid}");
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    assert!(
        !String::from_utf8_lossy(&environ).contains("PICOCENTER_TOKEN"),
        "the worker's token reached the VMM"
    );
    let seqpackets = seqpacket_inodes();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        let target = std::fs::read_link(fd.path()).unwrap_or_default();
        let target = target.to_string_lossy();
        if let Some(inode) = target
            .strip_prefix("socket:[")
            .and_then(|t| t.strip_suffix(']'))
        {
            assert!(
                !seqpackets.contains(inode),
                "the VMM kept its assignment socket open as fd {:?}",
                fd.file_name()
            );
        }
    }
    // The pool makes another, and the next spare serves the restore.
    wait_for("the pool to refill", limit, || {
        (waiting_spares(worker_pid).len() == 2).then_some(())
    });
    let worker_address = worker_api(&hub, "w-warm");
    let (status, answer) = api(
        worker_address,
        "POST",
        "/v1/apps/cwarm/swap-out",
        None,
        Some(TOKEN),
    );
    assert_eq!(status, 200, "{answer}");
    hub.wait_state("cwarm", "swapped_out", limit);
    let address = resolve(&hub, "cwarm");
    assert_eq!(count(&address), 2);
    let restored = vmm_pid("cwarm");
    assert_ne!(restored, pid);
    let text = metrics(worker_address);
    assert_eq!(
        metric(&text, "picocenter_worker_warm_starts_total"),
        2.0,
        "{text}"
    );
    wait_for("the pool to refill", limit, || {
        (waiting_spares(worker_pid).len() == 2).then_some(())
    });

    // A waiting spare that dies is reaped and replaced (a scrape of the metrics looks).
    let killed = waiting_spares(worker_pid)[0];
    // SAFETY: kill(2) of a child of the worker this test started.
    assert_eq!(unsafe { libc::kill(killed as i32, libc::SIGKILL) }, 0);
    wait_for("the dead spare to be replaced", limit, || {
        let text = metrics(worker_address);
        let spares = waiting_spares(worker_pid);
        (metric(&text, "picocenter_worker_spare_vmms") == 2.0
            && spares.len() == 2
            && !spares.contains(&killed))
        .then_some(())
    });
    assert!(
        !children_of(worker_pid).contains(&killed),
        "the dead spare was not reaped"
    );

    // The restored app's temporary data directory and /dev/shm are in the worker's own
    // directory, not the host's /tmp.
    let temp_dir = common::state_dir().join("workers/w-warm/tmp");
    let made_by_vmms = || -> Vec<String> {
        std::fs::read_dir(&temp_dir)
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    let made = made_by_vmms();
    assert!(
        made.iter().any(|n| n.starts_with("picocenter-data-"))
            && made.iter().any(|n| n.starts_with("picocenter-shm-")),
        "the VMM's temporary directories are not in the worker's: {made:?}"
    );

    // The spares die with their worker, waiting or running an app.
    let spares = waiting_spares(worker_pid);
    worker.kill();
    wait_for("the spares and the app's VMM to end", limit, || {
        spares
            .iter()
            .chain([&restored])
            .all(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .map_or(true, |stat| stat.contains(") Z "))
            })
            .then_some(())
    });

    // What its VMMs left (a worker killed does not remove it) goes when the worker comes
    // back: nothing piles up, run after run.
    let mut cmd = picocenter();
    cmd.args(["worker", "--hub", &hub.url(), "--id", "w-warm"]);
    cmd.args(["--addresses", "127.3.31.0/24", "--warm-pool", "0"]);
    cmd.args(["--store", store.to_str().unwrap()]);
    cmd.env("PICOCENTER_TOKEN", TOKEN);
    let mut again = Proc::spawn(cmd, hub.data.with_extension("w-warm-2.log"));
    wait_for(
        "the worker back to empty its VMMs' directory",
        limit,
        || {
            let now = made_by_vmms();
            (!now.iter().any(|n| made.contains(n))).then_some(())
        },
    );
    again.kill();
}

#[test]
fn a_spare_refuses_what_is_not_an_app_and_a_start_without_its_socket() {
    // Started by hand, with no socket at fd 3: a clear error.
    let out = picocenter().arg("spare").output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("started by a worker"), "{said}");

    // Told to become something other than an app's VMM: refused.
    use std::os::fd::{AsFd, AsRawFd};
    use std::os::unix::process::CommandExt;
    let (ours, theirs) = picocenter_vmm::spare::socket_pair().unwrap();
    let raw = theirs.as_raw_fd();
    let mut cmd = picocenter();
    cmd.arg("spare");
    // SAFETY: dup2 is async-signal-safe; it puts the socket at fd 3, without
    // close-on-exec, in the child only.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(raw, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let log = tempfile::NamedTempFile::new().unwrap();
    let child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(theirs);
    let assignment = picocenter_vmm::spare::Assignment {
        args: vec!["image".into(), "ls".into()],
        env: vec![],
    };
    picocenter_vmm::spare::send(ours.as_fd(), &assignment, &[], log.as_file().as_fd()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    // Its messages go to the log it was handed from then on.
    let said = std::fs::read_to_string(log.path()).unwrap();
    assert!(said.contains("a spare becomes"), "{said}");
}

#[test]
fn a_fresh_app_whose_listener_a_forked_process_opens_becomes_ready() {
    // `sh -c "server; true"` forks for the server: the listener is the child process's,
    // which the app's first VMM does not count among the sockets it serves.
    let (dir, hub) = setup("forked");
    let image = dir.path().join("forked-http");
    std::fs::create_dir_all(&image).unwrap();
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("images/counter-http/counter-http.c");
    std::fs::copy(source, image.join("counter-http.c")).unwrap();
    std::fs::write(
        image.join("image.toml"),
        r#"description = "counter-http under a shell that forks it"
[run]
argv = ["/bin/sh", "-c", "/bin/counter-http 8080; true"]
memory_mib = 32
[root]
host = ["/bin/sh"]
compile = [{ sources = ["counter-http.c"], output = "/bin/counter-http", flags = ["-O2", "-static"] }]
"#,
    )
    .unwrap();
    let mut cmd = picocenter();
    cmd.arg("image").arg("build").arg(&image);
    let out = run_with_limit(&mut cmd, Duration::from_secs(600));
    assert!(out.status.success(), "{}", describe(&out));
    let store = dir.path().join("cold");
    let _worker = worker(
        &hub,
        "w-forked",
        "127.3.31.0/24",
        "600",
        &["--store", store.to_str().unwrap()],
    );
    hub.add("cforked", "forked-http", 600.0);
    let address = resolve(&hub, "cforked");
    // (A forked process binds no privileged port: port 8080.)
    for expected in [1, 2] {
        let response = http(format!("{address}:8080").parse().unwrap(), "GET", "/", b"");
        assert_eq!(response.status, 200);
        let body = String::from_utf8_lossy(&response.body).trim().to_string();
        assert_eq!(body, format!("count={expected}"));
    }
}
