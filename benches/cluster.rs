//! The hub and workers as a client meets them, measured side by side in one run:
//!
//! * DNS query to the first byte of the HTTP response, for counter-http, nginx and
//!   python-http, when the app is resident, swapped out to the local store, and swapped
//!   out to S3 (a moto server on loopback, and the same server behind a 20 ms, 50 MB/s
//!   link; the worker's local copy is deleted first, so the restore reads S3)
//!   (`cargo bench --bench cluster -- swap` runs only this);
//! * the same for bigmem (256 MiB, 8 MiB used) over the link, streamed against downloaded
//!   whole first (`cargo bench --bench cluster -- big` runs only this; it needs s3s-fs);
//! * DNS queries per second the hub answers for a resident app (a UDP load generator here);
//! * host memory per idle resident picoprocess beyond the guest pages it touched, and how
//!   many idle counter-http apps a worker holds in 16 GiB;
//! * issue #15's warm pool: DNS query to first byte for fresh starts and restores from the
//!   local store, through a worker with no spare VMMs and one with its default pool, and
//!   what a waiting spare costs in memory (`cargo bench --bench cluster -- warm` runs
//!   only this);
//! * issue #14's storage: what 100 nginx apps take in S3 with page files stored once per
//!   image against every page file whole (`cargo bench --bench cluster -- dedup` runs
//!   only this; it needs s3s-fs);
//! * the registry in etcd against redb: DNS to first byte (resident, and swapped out to the
//!   local store) and the hub's queries per second, the two hubs side by side
//!   (`cargo bench --bench cluster -- registry` runs only this; it needs etcd);
//! * issue #16's failover, two hubs on etcd: a swapped-out app's DNS query to first byte
//!   at a hub just after the other hub was killed, against the same with both hubs up;
//!   and from a worker's death (it and its VMMs killed) to its app answering from the
//!   other worker (`cargo bench --bench cluster -- failover` runs only this);
//! * issue #16's chaos loop: two hubs on etcd and two workers, one of the four killed
//!   (SIGKILL) every few seconds and started again, while clients query 20 apps at
//!   either hub: requests attempted, answered and failed, and apps lost
//!   (`cargo bench --bench cluster -- chaos` runs only this).
//!
//! * issue #15's before and after: DNS query to first byte of counter-http and nginx
//!   swapped out to the local store, through a hub and worker of another build
//!   (`PICOCENTER_BEFORE=<its picocenter binary>`) against this build's, rounds
//!   alternating (`cargo bench --bench cluster -- before` runs only this).
//!
//! Run with `cargo bench --bench cluster`.

#[path = "../tests/common/mod.rs"]
mod common;

use common::cluster::{
    api, descendants, first_a, first_byte_of_root, mem_available, pss_bytes, query, start_hub_with,
    wait_for, waiting_spares, worker_args, Proc, S3Server,
};
use common::wan::{LinkShape, WanLink};
use common::{build_image, median, picocenter, state_dir, with_build, Build};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::time::{Duration, Instant};

const TOKEN: &str = "bench-token";
const ROUNDS: usize = 11;
const LIMIT: Duration = Duration::from_secs(60);

/// One authenticated API call: (status, JSON).
fn call(address: SocketAddr, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
    api(address, method, path, Some(body), Some(TOKEN))
}

/// A hub and one worker.
struct Cluster {
    _hub: Proc,
    _worker: Proc,
    dns: SocketAddr,
    api: SocketAddr,
    worker_api: SocketAddr,
    cache: PathBuf,
}

impl Cluster {
    fn start(name: &str, pool: &str, cold: &[&str]) -> Cluster {
        Self::start_with_hub(name, pool, cold, &[])
    }

    /// [`Cluster::start`] with `hub` flags.
    fn start_with_hub(name: &str, pool: &str, cold: &[&str], hub: &[&str]) -> Cluster {
        Self::start_with(name, pool, cold, hub, &[])
    }

    /// [`Cluster::start`] with `hub` flags and more `worker` flags.
    fn start_with(name: &str, pool: &str, cold: &[&str], hub: &[&str], worker: &[&str]) -> Cluster {
        let dir = state_dir().join("bench-cluster").join(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (hub, dns, api_address) = start_hub_with(&dir, TOKEN, hub);
        let id = format!("bench-{name}");
        let mut cmd = picocenter();
        cmd.args(["worker", "--hub", &format!("http://{api_address}")]);
        cmd.args(["--token", TOKEN, "--id", &id]);
        cmd.args(["--addresses", pool, "--idle-after", "3600"]);
        cmd.args(cold);
        cmd.args(worker);
        let worker = Proc::spawn(cmd, dir.join("worker.log"));
        let worker_api = wait_for("the worker", LIMIT, || {
            let (_, workers) = call(api_address, "GET", "/v1/workers", "");
            let url = workers.as_array()?.first()?["url"].as_str()?.to_string();
            url.strip_prefix("http://")?.parse().ok()
        });
        Cluster {
            _hub: hub,
            _worker: worker,
            dns,
            api: api_address,
            worker_api,
            cache: state_dir().join("workers").join(id).join("cache"),
        }
    }

    fn add(&self, name: &str, image: &str) {
        let body = format!(r#"{{"name":"{name}","image":"{image}"}}"#);
        let (status, answer) = call(self.api, "POST", "/v1/apps", &body);
        assert!(status == 201 || status == 409, "{answer}");
    }

    /// The address the hub gives app `name`.
    fn address(&self, name: &str) -> Ipv4Addr {
        let (_, app) = call(self.api, "GET", &format!("/v1/apps/{name}"), "");
        app["address"]
            .as_str()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("{name} has no address: {app}"))
    }

    fn state(&self, name: &str) -> String {
        let (_, app) = call(self.api, "GET", &format!("/v1/apps/{name}"), "");
        app["state"].as_str().unwrap_or_default().to_string()
    }

    /// Swaps `name` out through its worker and waits until the hub has the news. An app
    /// that left a timer pending (nginx's buffered access log flushes a second after a
    /// request) is woken by the hub at that time: let that happen, then swap it out
    /// again, so that the round measures a restore by query.
    fn swap_out(&self, name: &str) {
        let path = format!("/v1/apps/{name}/swap-out");
        for _ in 0..10 {
            let (status, answer) = call(self.worker_api, "POST", &path, "");
            assert_eq!(status, 200, "{answer}");
            let snapshot = answer["snapshot"].clone();
            let app = wait_for("the swap-out report", LIMIT, || {
                let (_, app) = call(self.api, "GET", &format!("/v1/apps/{name}"), "");
                (app["snapshot"] == snapshot).then_some(app)
            });
            if app["wake_at_unix_ms"].is_null() && app["state"] == "swapped_out" {
                return;
            }
            wait_for("the timer wake-up", LIMIT, || {
                (self.state(name) == "resident").then_some(())
            });
        }
        panic!("{name} keeps a timer pending");
    }
}

/// Waits (at most [`LIMIT`]) until nothing has crossed a link for half a second.
fn wait_until_quiet(downloaded: &std::sync::atomic::AtomicU64) {
    let started = Instant::now();
    let mut last = downloaded.load(std::sync::atomic::Ordering::SeqCst);
    while started.elapsed() < LIMIT {
        std::thread::sleep(Duration::from_millis(500));
        let now = downloaded.load(std::sync::atomic::Ordering::SeqCst);
        if now == last {
            return;
        }
        last = now;
    }
}

/// Whether app `name`'s restore point in `cluster`'s hub is an increment (its snapshot has
/// ancestors).
fn has_ancestor(cluster: &Cluster, name: &str) -> bool {
    let (_, app) = call(cluster.api, "GET", &format!("/v1/apps/{name}"), "");
    app["chain_hint"]["ancestors"]
        .as_array()
        .is_some_and(|a| !a.is_empty())
}

/// Milliseconds from sending the query to the first byte of the response to `GET path`.
fn query_to_first_byte(dns: SocketAddr, name: &str, path: &str) -> f64 {
    query_answer_and_first_byte(dns, name, path).1
}

/// Milliseconds from sending the query to its answer, and to the first byte of the
/// response to `GET path`.
fn query_answer_and_first_byte(dns: SocketAddr, name: &str, path: &str) -> (f64, f64) {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let started = Instant::now();
    socket.send_to(&query(name, 7), dns).unwrap();
    let mut answer = [0u8; 512];
    let n = socket.recv(&mut answer).unwrap();
    let answered = started.elapsed().as_secs_f64() * 1e3;
    let address = first_a(&answer[..n])
        .unwrap_or_else(|| panic!("no address for {name}: {:02x?}", &answer[..n]));
    (answered, first_byte(address, path, started))
}

/// Milliseconds from `started` to the first byte of the response to `GET path` at
/// `address`, connecting now.
fn first_byte(address: Ipv4Addr, path: &str, started: Instant) -> f64 {
    let mut stream = std::net::TcpStream::connect((address, 80)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut first = [0u8; 1];
    stream.read_exact(&mut first).unwrap();
    let ms = started.elapsed().as_secs_f64() * 1e3;
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
    ms
}

/// Median query-to-first-byte for an app brought back from cold storage each round.
fn swapped(cluster: &Cluster, name: &str, path: &str, from_s3: bool) -> f64 {
    swapped_answer_and_first_byte(cluster, name, path, from_s3).1
}

/// Medians of [`query_answer_and_first_byte`] for an app swapped out each round (from
/// S3: its local copy deleted first).
fn swapped_answer_and_first_byte(
    cluster: &Cluster,
    name: &str,
    path: &str,
    from_s3: bool,
) -> (f64, f64) {
    let dns_name = format!("{name}.pico.local");
    query_to_first_byte(cluster.dns, &dns_name, path);
    let (mut answers, mut times) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        cluster.swap_out(name);
        if from_s3 {
            let _ = std::fs::remove_dir_all(cluster.cache.join(name));
        }
        let (answer, first) = query_answer_and_first_byte(cluster.dns, &dns_name, path);
        answers.push(answer);
        times.push(first);
    }
    (median(&mut answers), median(&mut times))
}

/// Median connect-to-first-byte for an app swapped out each round, reached at the
/// address a client kept, with no DNS query: the worker holds its sockets, and the
/// connection itself wakes it.
fn swapped_no_dns(cluster: &Cluster, name: &str, path: &str, from_s3: bool) -> f64 {
    let dns_name = format!("{name}.pico.local");
    query_to_first_byte(cluster.dns, &dns_name, path);
    let address: Ipv4Addr = cluster.address(name);
    let mut times = Vec::new();
    for _ in 0..ROUNDS {
        cluster.swap_out(name);
        if from_s3 {
            let _ = std::fs::remove_dir_all(cluster.cache.join(name));
        }
        times.push(first_byte(address, path, Instant::now()));
        // The app answers as soon as it is back; its worker and the hub record it just
        // after: wait for that before the next swap-out.
        wait_for("the app to be resident again", LIMIT, || {
            (cluster.state(name) == "resident").then_some(())
        });
    }
    median(&mut times)
}

fn resident(cluster: &Cluster, name: &str, path: &str) -> f64 {
    let dns_name = format!("{name}.pico.local");
    query_to_first_byte(cluster.dns, &dns_name, path);
    let mut times: Vec<f64> = (0..ROUNDS)
        .map(|_| query_to_first_byte(cluster.dns, &dns_name, path))
        .collect();
    median(&mut times)
}

/// Queries per second the hub answers for `name`, with `threads` clients each keeping
/// `window` queries in flight, for `seconds`.
fn queries_per_second(
    dns: SocketAddr,
    name: &str,
    threads: usize,
    window: usize,
    seconds: f64,
) -> f64 {
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let name = name.to_string();
            std::thread::spawn(move || {
                let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
                socket.connect(dns).unwrap();
                socket
                    .set_read_timeout(Some(Duration::from_millis(200)))
                    .unwrap();
                let packet = query(&name, t as u16);
                let mut answered = 0u64;
                for _ in 0..window {
                    socket.send(&packet).unwrap();
                }
                let mut buffer = [0u8; 512];
                while Instant::now() < deadline {
                    match socket.recv(&mut buffer) {
                        Ok(_) => {
                            answered += 1;
                            socket.send(&packet).unwrap();
                        }
                        // A lost datagram: put another in flight.
                        Err(_) => {
                            socket.send(&packet).unwrap();
                        }
                    }
                }
                answered
            })
        })
        .collect();
    let answered: u64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
    answered as f64 / seconds
}

fn as_strs(flags: &[String]) -> Vec<&str> {
    flags.iter().map(String::as_str).collect()
}

/// Rounds of the big app's swap-in: each moves 256 MiB through the link.
const BIG_ROUNDS: usize = 7;

/// Issue #14's big app: bigmem (256 MiB, of which its requests read 8) swapped out to S3
/// behind the link and brought back by a DNS query, streamed against downloaded whole
/// before its VMM starts (`--s3-download-first`), the two alternating round by round.
/// Its S3 server is s3s-fs: moto reads a whole object for every ranged GET (~170 ms for
/// 256 MiB here) and serves one request at a time, which no S3 does.
fn big_app_over_the_link() {
    println!("\n== bigmem (256 MiB, 8 MiB used) swapped out to S3 over a 20 ms / 50 MB/s link (median of {BIG_ROUNDS}) ==");
    build_image("bigmem");
    let dir = state_dir().join("bench-cluster/s3s");
    let _ = std::fs::remove_dir_all(&dir);
    let Some(server) = S3Server::s3s_fs(&dir.join("root"), dir.join("s3s.log")) else {
        println!(
            "  not measured: s3s-fs is not installed \
             (cargo install s3s-fs --version 0.14.1 --features binary --locked)"
        );
        return;
    };
    let address = server
        .endpoint
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    // s3s-fs keeps its connections alive itself, as S3 does: a plain link, one for each
    // worker. Each admits 64 connections, not 16: the download-first path asks for 16
    // ranges of the page file and the data archive at once, and here a connection past
    // the limit waits until another closes, which a kept-alive one never does.
    let shape = LinkShape {
        max_connections: 64,
        ..LinkShape::default()
    };
    let links = [(); 3].map(|()| WanLink::start(address, shape));
    let flags = |link: &WanLink, extra: Option<&str>| -> Vec<String> {
        let mut flags: Vec<String> = [
            "--s3-bucket",
            "bench-big",
            "--s3-endpoint",
            &link.url(),
            "--s3-path-style",
            "--s3-access-key",
            "test",
            "--s3-secret-key",
            "test",
        ]
        .map(String::from)
        .to_vec();
        flags.extend(extra.map(String::from));
        flags
    };
    let streamed_flags = flags(&links[0], None);
    let whole_flags = flags(&links[1], Some("--s3-download-first"));
    let unhinted_flags = flags(&links[2], Some("--s3-no-chain-hint"));
    let streamed = Cluster::start("s3big", "127.4.4.0/24", &as_strs(&streamed_flags));
    let whole = Cluster::start("s3bigwhole", "127.4.5.0/24", &as_strs(&whole_flags));
    // Streamed too, but without the hub's hint of the chain: what the hint saves.
    let unhinted = Cluster::start("s3bignohint", "127.4.6.0/24", &as_strs(&unhinted_flags));
    let runs = [
        (&streamed, "bigstream"),
        (&whole, "bigwhole"),
        (&unhinted, "bignohint"),
    ];
    for (cluster, name) in runs {
        cluster.add(name, "bigmem");
        query_to_first_byte(cluster.dns, &format!("{name}.pico.local"), "/");
    }
    let mut times: [Vec<f64>; 3] = Default::default();
    let mut fetched: [Vec<f64>; 3] = Default::default();
    // Chains of one (a full snapshot) and of two and three (increments on it) come by
    // turns; only those with an ancestor can gain from the hint's list of them.
    let mut chained: [Vec<f64>; 2] = Default::default();
    for _ in 0..BIG_ROUNDS {
        for (i, (cluster, name)) in runs.iter().enumerate() {
            cluster.swap_out(name);
            let _ = std::fs::remove_dir_all(cluster.cache.join(name));
            let link = &links[i].downloaded;
            let before = link.load(std::sync::atomic::Ordering::SeqCst);
            times[i].push(query_to_first_byte(
                cluster.dns,
                &format!("{name}.pico.local"),
                "/",
            ));
            let after = link.load(std::sync::atomic::Ordering::SeqCst);
            fetched[i].push((after - before) as f64 / 1048576.0);
            // The rest of the stream goes on behind the first byte: the next cluster is
            // measured once it is over, not against it for the two cores.
            wait_until_quiet(link);
        }
        if has_ancestor(&streamed, "bigstream") && has_ancestor(&unhinted, "bignohint") {
            chained[0].push(*times[0].last().unwrap());
            chained[1].push(*times[2].last().unwrap());
        }
    }
    let rounds = |t: &[f64]| {
        t.iter()
            .map(|ms| format!("{ms:.0}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!(
        "  each round, ms: streamed [{}]; downloaded first [{}]; streamed without the hub's hint [{}]",
        rounds(&times[0]),
        rounds(&times[1]),
        rounds(&times[2])
    );
    let [streamed_ms, whole_ms, unhinted_ms] = times.map(|mut t| median(&mut t));
    let [streamed_mib, whole_mib, _] = fetched.map(|mut f| median(&mut f));
    println!(
        "  DNS query to first HTTP byte: streamed {streamed_ms:7.1} ms ({streamed_mib:.1} MiB through the link by then)   downloaded first {whole_ms:7.1} ms ({whole_mib:.1} MiB)   downloaded first / streamed = {:.1}x",
        whole_ms / streamed_ms
    );
    let rounds = chained[0].len();
    let [chained_ms, chained_unhinted_ms] = chained.map(|mut t| median(&mut t));
    println!(
        "  streamed without the hub's hint of the chain (ancestors asked for once a manifest names them, 2 MiB first of each page file): {unhinted_ms:7.1} ms ({:.2}x); rounds restoring a chain ({rounds}): {chained_ms:.1} ms with the hint, {chained_unhinted_ms:.1} ms without ({:.2}x)",
        unhinted_ms / streamed_ms,
        chained_unhinted_ms / chained_ms
    );
}

/// The registry in etcd against redb (issue #16): two clusters, the same apps, measured
/// in alternation.
fn registry_etcd_against_redb() {
    build_image("counter-http");
    let dir = state_dir().join("bench-cluster/etcd");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let etcd = picocenter_hub::registry::etcd::testing::EtcdServer::start(&dir);
    let cold = state_dir().join("bench-cluster/registry-cold");
    let cold = ["--store", cold.to_str().unwrap()];
    let registry = format!("{}/bench", etcd.url);
    let clusters = [
        ("redb", Cluster::start("reg-redb", "127.4.5.0/24", &cold)),
        (
            "etcd",
            Cluster::start_with_hub(
                "reg-etcd",
                "127.4.6.0/24",
                &cold,
                &["--registry", &registry],
            ),
        ),
    ];
    println!("\n== the registry: etcd against redb (counter-http, median of {ROUNDS}) ==");
    for (store, cluster) in &clusters {
        cluster.add(&format!("reg{store}"), "counter-http");
    }
    let mut rows = Vec::new();
    for (store, cluster) in &clusters {
        let name = format!("reg{store}");
        let resident_ms = resident(cluster, &name, "/");
        let swapped_ms = swapped(cluster, &name, "/", false);
        let qps = queries_per_second(cluster.dns, &format!("{name}.pico.local"), 4, 16, 3.0);
        rows.push((store, resident_ms, swapped_ms, qps));
    }
    for (store, resident_ms, swapped_ms, qps) in &rows {
        println!(
            "  {store:<5} resident {resident_ms:6.2} ms   swapped, local store {swapped_ms:6.2} ms   {qps:7.0} queries/s"
        );
    }
    let (redb, etcd) = (&rows[0], &rows[1]);
    println!(
        "  etcd / redb: swapped {:.2}x, queries/s {:.2}x",
        etcd.2 / redb.2,
        etcd.3 / redb.3
    );
}

/// A worker reporting to the hub at `api`, with `id`, `pool` and the store `cold`.
fn failover_worker(
    dir: &std::path::Path,
    api: SocketAddr,
    id: &str,
    pool: &str,
    cold: &str,
) -> Proc {
    let mut cmd = picocenter();
    cmd.args(["worker", "--hub", &format!("http://{api}")]);
    cmd.args(["--token", TOKEN, "--id", id, "--addresses", pool]);
    cmd.args(["--idle-after", "3600", "--store", cold, "--warm-pool", "0"]);
    let worker = Proc::spawn(cmd, dir.join(format!("{id}.log")));
    common::cluster::wait_until_registered(api, TOKEN, id);
    worker
}

/// Issue #16's failover figures on one host: two hubs on one etcd.
/// * A hub's death: a swapped-out app's DNS query to first byte at the surviving hub,
///   just after the other hub was killed (SIGKILL), against the same query with both
///   hubs up; rounds alternate.
/// * A worker's death: the worker its app runs on and every process under it killed at
///   once (as when its host dies), then queries at the hub every 10 ms until one answers
///   with the other worker's address and the app answers there.
fn failover_on_etcd() {
    const FAILOVER_ROUNDS: usize = 7;
    build_image("counter-http");
    let dir = state_dir().join("bench-cluster/failover");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let etcd = picocenter_hub::registry::etcd::testing::EtcdServer::start(&dir);
    let registry = format!("{}/failover", etcd.url);
    let cold = dir.join("cold");
    let cold = cold.to_str().unwrap();
    let hub_dir = |name: String| {
        let hub_dir = dir.join(name);
        std::fs::create_dir_all(&hub_dir).unwrap();
        hub_dir
    };
    let flags = |id: &'static str| {
        [
            "--registry",
            registry.as_str(),
            "--hub-id",
            id,
            "--worker-timeout",
            "2",
        ]
    };
    let (_survivor, dns, api_address) =
        start_hub_with(&hub_dir("hub-b".into()), TOKEN, &flags("hub-b"));
    let body = r#"{"name":"fo","image":"counter-http"}"#;
    let (status, answer) = call(api_address, "POST", "/v1/apps", body);
    assert_eq!(status, 201, "{answer}");
    let mut one = failover_worker(&dir, api_address, "fo-1", "127.4.9.0/24", cold);
    let swap_out = |worker_api: SocketAddr| {
        let (status, answer) = call(worker_api, "POST", "/v1/apps/fo/swap-out", "");
        assert_eq!(status, 200, "{answer}");
        wait_for("the swap-out report", LIMIT, || {
            let (_, app) = call(api_address, "GET", "/v1/apps/fo", "");
            (app["state"] == "swapped_out").then_some(())
        });
    };
    let worker_api = |id: &str| -> SocketAddr {
        let (_, workers) = call(api_address, "GET", "/v1/workers", "");
        let url = workers
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["id"] == id)
            .unwrap()["url"]
            .as_str()
            .unwrap()
            .to_string();
        url.strip_prefix("http://").unwrap().parse().unwrap()
    };
    query_to_first_byte(dns, "fo.pico.local", "/");

    println!("\n== failover: two hubs on etcd (counter-http, median of {FAILOVER_ROUNDS}) ==");
    let (mut calm, mut after_death) = (Vec::new(), Vec::new());
    for round in 0..FAILOVER_ROUNDS {
        let (mut doomed, _, doomed_api) =
            start_hub_with(&hub_dir(format!("hub-a-{round}")), TOKEN, &flags("hub-a"));
        wait_for("the second hub to know the app", LIMIT, || {
            (call(doomed_api, "GET", "/v1/apps/fo", "").0 == 200).then_some(())
        });
        for dies in [round % 2 == 0, round % 2 == 1] {
            swap_out(worker_api("fo-1"));
            if dies {
                doomed.kill();
            }
            let ms = query_to_first_byte(dns, "fo.pico.local", "/");
            if dies {
                after_death.push(ms);
            } else {
                calm.push(ms);
            }
        }
        doomed.kill();
    }
    let (calm, after_death) = (median(&mut calm), median(&mut after_death));
    println!(
        "  swapped out, DNS to first byte: both hubs up {calm:6.2} ms   just after the other hub was killed {after_death:6.2} ms   ({:.2}x)",
        after_death / calm
    );

    let mut two = failover_worker(&dir, api_address, "fo-2", "127.4.10.0/24", cold);
    let mut recovery = Vec::new();
    let mut on_one = true;
    for _ in 0..FAILOVER_ROUNDS {
        // The app resident on the worker about to die, with a snapshot in the store.
        let (doomed_id, doomed_pool) = if on_one {
            ("fo-1", "127.4.9.0/24")
        } else {
            ("fo-2", "127.4.10.0/24")
        };
        let before = first_a(&query_answer(dns, "fo.pico.local")).unwrap();
        let prefix = &doomed_pool[..doomed_pool.len() - 4];
        assert!(
            before.to_string().starts_with(prefix),
            "{before} {doomed_pool}"
        );
        let doomed = if on_one { &mut one } else { &mut two };
        let pid = doomed.child.id();
        let tree = descendants(pid);
        let died = Instant::now();
        doomed.kill();
        for process in tree {
            // SAFETY: kill(2) of processes this bench started (the worker's VMMs).
            unsafe { libc::kill(process as i32, libc::SIGKILL) };
        }
        let moved = wait_for("the app on the other worker", LIMIT, || {
            std::thread::sleep(Duration::from_millis(10));
            let address = first_a(&query_answer(dns, "fo.pico.local"))?;
            if address == before {
                return None;
            }
            first_byte_of_root(address, died)
        });
        recovery.push(moved);
        // The dead worker comes back (its host rebooted), for the next round's move.
        *doomed = failover_worker(&dir, api_address, doomed_id, doomed_pool, cold);
        on_one = !on_one;
    }
    println!(
        "  a worker's death to its app answering from the other worker: {:6.0} ms (the worker's lease is 2 s; rounds {:?})",
        median(&mut recovery.clone()),
        recovery.iter().map(|ms| ms.round() as u64).collect::<Vec<_>>()
    );
}

/// A small random number generator (xorshift), seeded from the clock: the chaos loop's
/// choices, with the seed printed so that a run can be repeated.
struct Chaos(u64);

impl Chaos {
    fn next(&mut self, below: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % below as u64) as usize
    }
}

/// One request to app `name` as a client makes it: a DNS query at `dns`, then `GET /`
/// at the answer, each given `limit`. Whether the query was answered, and whether the
/// app then answered.
fn client_request(dns: SocketAddr, name: &str, limit: Duration) -> (bool, bool) {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.set_read_timeout(Some(limit)).unwrap();
    if socket.send_to(&query(name, 9), dns).is_err() {
        return (false, false);
    }
    let mut answer = [0u8; 512];
    let Ok(n) = socket.recv(&mut answer) else {
        return (false, false);
    };
    let Some(address) = first_a(&answer[..n]) else {
        return (false, false);
    };
    (true, first_byte_of_root(address, Instant::now()).is_some())
}

/// Issue #16's chaos loop: two hubs on one etcd (fixed ports, so the workers' `--hub`
/// lists stay right when one comes back) and two workers reporting to both, 20
/// counter-http apps that swap out after 2 s idle. For [`CHAOS_SECONDS`], two clients
/// request a random app at a random hub (a resolver that tries the other hub when one
/// does not answer); every few seconds one of the four processes is killed (a worker
/// with its VMMs, as when its host dies) and started again 1.5 s later (a hub under a
/// new id, a worker under its own id). Then every app must come back.
fn chaos_loop() {
    const APPS: usize = 20;
    const CHAOS_SECONDS: u64 = 40;
    build_image("counter-http");
    let dir = state_dir().join("bench-cluster/chaos");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let etcd = picocenter_hub::registry::etcd::testing::EtcdServer::start(&dir);
    let registry = format!("{}/chaos", etcd.url);
    let cold = dir.join("cold");
    let cold = cold.to_str().unwrap().to_string();
    let port = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    };
    let hubs: Vec<(SocketAddr, SocketAddr)> = (0..2).map(|_| (port(), port())).collect();
    let start_hub = |which: usize, generation: usize| {
        let (dns, api) = hubs[which];
        let hub_dir = dir.join(format!("hub-{which}-{generation}"));
        std::fs::create_dir_all(&hub_dir).unwrap();
        let mut cmd = picocenter();
        cmd.args(["hub", "--dns", &dns.to_string(), "--api", &api.to_string()]);
        cmd.args(["--token", TOKEN, "--registry", &registry]);
        cmd.args(["--hub-id", &format!("chaos-{which}-{generation}")]);
        cmd.args(["--worker-timeout", "2", "--data-dir"]);
        cmd.arg(&hub_dir);
        let hub = Proc::spawn(cmd, hub_dir.join("hub.log"));
        wait_for("a hub", LIMIT, || common::cluster::hub_addresses(&hub.log));
        hub
    };
    let urls: Vec<String> = hubs
        .iter()
        .map(|(_, api)| format!("http://{api}"))
        .collect();
    let start_worker = |which: usize, generation: usize| {
        let id = format!("chaos-w{which}");
        let mut cmd = picocenter();
        worker_args(&mut cmd, &urls, TOKEN, &id);
        cmd.args(["--addresses", &format!("127.4.{}.0/24", 20 + which)]);
        cmd.args(["--idle-after", "2", "--store", &cold, "--warm-pool", "0"]);
        cmd.args(["--address-quarantine", "1"]);
        let worker = Proc::spawn(cmd, dir.join(format!("{id}-{generation}.log")));
        common::cluster::wait_until_registered(hubs[0].1, TOKEN, &id);
        worker
    };
    let mut processes: Vec<Proc> = vec![start_hub(0, 0), start_hub(1, 0)];
    processes.push(start_worker(0, 0));
    processes.push(start_worker(1, 0));
    for app in 0..APPS {
        let body = format!(r#"{{"name":"chaos{app}","image":"counter-http"}}"#);
        let (status, answer) = call(hubs[app % 2].1, "POST", "/v1/apps", &body);
        assert_eq!(status, 201, "{answer}");
    }
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    println!(
        "\n== chaos: 2 hubs on etcd, 2 workers, {APPS} apps, {CHAOS_SECONDS} s (seed {seed}) =="
    );
    let deadline = Instant::now() + Duration::from_secs(CHAOS_SECONDS);
    // Requests attempted, served, unanswered by both hubs, answered but not served.
    let tally = std::sync::Arc::new(std::sync::Mutex::new([0u64; 4]));
    let clients: Vec<_> = (0..2u64)
        .map(|client| {
            let tally = tally.clone();
            let dns: Vec<SocketAddr> = hubs.iter().map(|(dns, _)| *dns).collect();
            std::thread::spawn(move || {
                let mut choice = Chaos(seed.wrapping_mul(client + 3) | 1);
                while Instant::now() < deadline {
                    let app = format!("chaos{}.pico.local", choice.next(APPS));
                    let first = choice.next(2);
                    // A resolver asks the other name server when one does not answer.
                    let (mut answered, mut served) =
                        client_request(dns[first], &app, Duration::from_secs(2));
                    if !answered {
                        (answered, served) =
                            client_request(dns[1 - first], &app, Duration::from_secs(2));
                    }
                    let mut tally = tally.lock().unwrap();
                    tally[0] += 1;
                    tally[1] += u64::from(answered && served);
                    tally[2] += u64::from(!answered);
                    tally[3] += u64::from(answered && !served);
                    drop(tally);
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        })
        .collect();
    let mut chaos = Chaos(seed);
    let mut kills = [0usize; 4];
    let mut generation = 1;
    while Instant::now() + Duration::from_secs(4) < deadline {
        std::thread::sleep(Duration::from_millis(1500 + 500 * chaos.next(4) as u64));
        let victim = chaos.next(4);
        kills[victim] += 1;
        let process = &mut processes[victim];
        let tree = descendants(process.child.id());
        process.kill();
        for pid in tree {
            // SAFETY: kill(2) of a process this bench started (a worker's VMMs).
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(1500));
        processes[victim] = match victim {
            0 | 1 => start_hub(victim, generation),
            _ => start_worker(victim - 2, generation),
        };
        generation += 1;
    }
    for client in clients {
        client.join().unwrap();
    }
    // Every app must come back: registered, answered, and serving.
    let lost: Vec<usize> = (0..APPS)
        .filter(|app| {
            let name = format!("chaos{app}.pico.local");
            !(0..10)
                .any(|_| client_request(hubs[0].0, &name, Duration::from_secs(10)) == (true, true))
        })
        .collect();
    let [attempted, served, unanswered, unserved] = *tally.lock().unwrap();
    println!(
        "  kills: hub 0 {}, hub 1 {}, worker 0 {}, worker 1 {}",
        kills[0], kills[1], kills[2], kills[3]
    );
    println!(
        "  requests attempted {attempted}, served {served} ({:.1}%), failed {} (no DNS answer from either hub {unanswered}, answered but the app did not answer {unserved}); apps lost {} {lost:?}",
        100.0 * served as f64 / attempted.max(1) as f64,
        unanswered + unserved,
        lost.len()
    );
}

/// One DNS query for an A record at `dns`: the answer.
fn query_answer(dns: SocketAddr, name: &str) -> Vec<u8> {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.set_read_timeout(Some(LIMIT)).unwrap();
    socket.send_to(&query(name, 7), dns).unwrap();
    let mut answer = [0u8; 512];
    let n = socket.recv(&mut answer).unwrap();
    answer[..n].to_vec()
}

/// Issue #15's warm pool: the same restores and starts through a worker without spares
/// (`--warm-pool 0`) and one with its default pool, rounds alternating; then what a spare
/// costs in memory.
fn warm_pool_against_cold() {
    build_image("counter-http");
    build_image("nginx");
    let store = |name: &str| state_dir().join(format!("bench-cluster/cold-{name}"));
    let cold_store = store("nopool");
    let warm_store = store("pool");
    let cold = Cluster::start_with(
        "nopool",
        "127.4.5.0/24",
        &["--store", cold_store.to_str().unwrap()],
        &[],
        &["--warm-pool", "0"],
    );
    let warm = Cluster::start_with(
        "pool",
        "127.4.6.0/24",
        &["--store", warm_store.to_str().unwrap()],
        &[],
        &[],
    );
    println!("== warm pool: DNS query to first HTTP byte, no pool against the default pool (median of {ROUNDS}, rounds alternating) ==");
    println!("| app | what | no pool | warm pool (2 spares) | ratio |");
    println!("|---|---|---|---|---|");
    for (name, image, path) in [("counter", "counter-http", "/"), ("nginx", "nginx", "/")] {
        let (cold_name, warm_name) = (format!("np{name}"), format!("wp{name}"));
        let (mut cold_fresh, mut warm_fresh) = (Vec::new(), Vec::new());
        let (mut cold_swapped, mut warm_swapped) = (Vec::new(), Vec::new());
        for round in 0..ROUNDS {
            let both: [(&Cluster, &str, &mut Vec<f64>, &mut Vec<f64>); 2] = [
                (&cold, &cold_name, &mut cold_fresh, &mut cold_swapped),
                (&warm, &warm_name, &mut warm_fresh, &mut warm_swapped),
            ];
            let mut both = both;
            if round % 2 == 1 {
                both.reverse();
            }
            for (cluster, app, fresh, swapped) in both {
                // A fresh start: the app is registered anew, so the query starts it.
                let app = format!("{app}{round}");
                cluster.add(&app, image);
                let dns_name = format!("{app}.pico.local");
                fresh.push(query_to_first_byte(cluster.dns, &dns_name, path));
                // Let the pool refill (the worker starts a spare in the background).
                std::thread::sleep(Duration::from_millis(300));
                cluster.swap_out(&app);
                std::thread::sleep(Duration::from_millis(300));
                swapped.push(query_to_first_byte(cluster.dns, &dns_name, path));
                let (status, answer) = call(cluster.api, "DELETE", &format!("/v1/apps/{app}"), "");
                assert!(status == 200 || status == 204, "{answer}");
            }
        }
        for (what, c, w) in [
            ("fresh start", &mut cold_fresh, &mut warm_fresh),
            (
                "swapped out, local store",
                &mut cold_swapped,
                &mut warm_swapped,
            ),
        ] {
            let (c, w) = (median(c), median(w));
            println!(
                "| {image} | {what} | {c:.2} ms | {w:.2} ms | {:.2} |",
                w / c
            );
        }
    }
    let worker_pid = warm._worker.child.id();
    let spares = waiting_spares(worker_pid);
    let pss: Vec<f64> = spares.iter().map(|&p| pss_bytes(p) as f64).collect();
    drop(cold);
    drop(warm);

    // Memory: MemAvailable before and after a worker with 16 spares, less that worker's
    // own PSS, against the same worker with none.
    let measure = |pool: &str| -> (f64, usize) {
        // The last cluster's worker, spares and VMs end as this starts: let them go first,
        // or the memory they give back lands in this measurement.
        std::thread::sleep(Duration::from_secs(3));
        let before = mem_available();
        let cluster = Cluster::start_with(
            &format!("mem{pool}"),
            "127.4.7.0/24",
            &["--store", store("mem").to_str().unwrap()],
            &[],
            &["--warm-pool", pool],
        );
        let pid = cluster._worker.child.id();
        let wanted: usize = pool.parse().unwrap();
        wait_for("the spares", LIMIT, || {
            (waiting_spares(pid).len() >= wanted).then_some(())
        });
        std::thread::sleep(Duration::from_secs(1));
        let after = mem_available();
        let n = waiting_spares(pid).len();
        let worker_pss = pss_bytes(pid) as f64;
        ((before as f64 - after as f64) - worker_pss, n)
    };
    let mut none = Vec::new();
    let mut sixteen = Vec::new();
    let mut n = 0;
    for _ in 0..2 {
        none.push(measure("0").0);
        let (bytes, spares) = measure("16");
        sixteen.push(bytes);
        n = spares;
    }
    let (none, sixteen) = (median(&mut none), median(&mut sixteen));
    println!(
        "\n  a waiting spare: PSS {:.2} MiB (median of {}); MemAvailable {:.2} MiB per spare ({n} spares against none, workers' own PSS left out; medians of 2)",
        median(&mut pss.clone()) / 1048576.0,
        pss.len(),
        (sixteen - none) / n.max(1) as f64 / 1048576.0
    );
}

/// The files under `dir`, recursively.
fn files_under(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            match entry.file_type() {
                Ok(kind) if kind.is_dir() => stack.push(entry.path()),
                Ok(_) => files.push(entry.path()),
                Err(_) => {}
            }
        }
    }
    files
}

/// Bytes of the files under `dir` whose names end in each of `kinds` (the rest under
/// "other"), recursively.
fn bytes_by_kind(dir: &std::path::Path, kinds: &[&str]) -> std::collections::BTreeMap<String, u64> {
    let mut totals = std::collections::BTreeMap::new();
    for path in files_under(dir) {
        let name = path.to_string_lossy();
        let kind = kinds
            .iter()
            .find(|kind| name.ends_with(*kind))
            .map_or("other", |kind| kind);
        let bytes = std::fs::metadata(&path).map_or(0, |meta| meta.len());
        *totals.entry(kind.to_string()).or_default() += bytes;
    }
    totals
}

/// Issue #14 item 5: what `DEDUP_APPS` (100) nginx apps that each served a few requests
/// take in S3 (s3s-fs, on disk), with page files stored once per image (the default)
/// against every page file whole (`worker --s3-no-dedup`), the two clusters side by side.
fn stored_once_per_image() {
    let apps: usize = std::env::var("DEDUP_APPS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(100);
    println!("\n== {apps} nginx apps that served 3 requests each, swapped out to S3 (s3s-fs): bytes stored ==");
    build_image("nginx");
    let dir = state_dir().join("bench-cluster/dedup-s3");
    let _ = std::fs::remove_dir_all(&dir);
    let root = dir.join("root");
    let Some(server) = S3Server::s3s_fs(&root, dir.join("s3s.log")) else {
        println!(
            "  not measured: s3s-fs is not installed \
             (cargo install s3s-fs --version 0.14.1 --features binary --locked)"
        );
        return;
    };
    let flags = |bucket: &str, extra: &[&str]| -> Vec<String> {
        let base = [
            "--s3-bucket",
            bucket,
            "--s3-endpoint",
            &server.endpoint,
            "--s3-path-style",
            "--s3-access-key",
            "test",
            "--s3-secret-key",
            "test",
        ];
        base.iter().chain(extra).map(|f| f.to_string()).collect()
    };
    let (dedup_flags, plain_flags) = (
        flags("bench-dedup", &[]),
        flags("bench-plain", &["--s3-no-dedup"]),
    );
    let dedup = Cluster::start("dedup", "127.4.8.0/24", &as_strs(&dedup_flags));
    let plain = Cluster::start("plain", "127.4.9.0/24", &as_strs(&plain_flags));
    let started = Instant::now();
    // Per cluster: (stored, logical) bytes the hub reports for its first app, and in all.
    // (A deduplicated first app's own count is small: the image's base, its first page
    // file, is kept for all of them and counted to none.)
    let mut first = [(0u64, 0u64); 2];
    let mut total = [(0u64, 0u64); 2];
    for i in 0..apps {
        for (k, (cluster, prefix)) in [(&dedup, "dn"), (&plain, "pn")].into_iter().enumerate() {
            let app = format!("{prefix}{i}");
            cluster.add(&app, "nginx");
            query_to_first_byte(cluster.dns, &format!("{app}.pico.local"), "/");
            for _ in 0..2 {
                first_byte(cluster.address(&app), "/", Instant::now());
            }
            cluster.swap_out(&app);
            let (_, record) = call(cluster.api, "GET", &format!("/v1/apps/{app}"), "");
            let usage = &record["usage"];
            let bytes = (
                usage["stored_bytes"].as_u64().unwrap_or(0),
                usage["logical_bytes"].as_u64().unwrap_or(0),
            );
            if i == 0 {
                first[k] = bytes;
            }
            total[k] = (total[k].0 + bytes.0, total[k].1 + bytes.1);
        }
        if (i + 1) % 10 == 0 {
            println!(
                "  {} of {apps} apps of each in {:.0} s",
                i + 1,
                started.elapsed().as_secs_f64()
            );
        }
    }
    // The snapshots a compaction replaced go after their swap-out is reported: wait for
    // one manifest an app.
    let manifests = |bucket: &str| count_files(&root.join(bucket), ".manifest");
    wait_for("the replaced snapshots to go", LIMIT, || {
        (manifests("bench-dedup") == apps && manifests("bench-plain") == apps).then_some(())
    });
    let kinds = [".manifest", ".pages", ".packed", ".data", "HEAD", ".base"];
    let on_disk = |bucket: &str| bytes_by_kind(&root.join(bucket), &kinds);
    let (dedup_disk, plain_disk) = (on_disk("bench-dedup"), on_disk("bench-plain"));
    // The issue's goal: all of them within 1.5x one app's bytes plus their unique pages
    // (the pages of their packed page files that are their own).
    let unique = own_page_bytes(&root.join("bench-dedup"));
    // Apps brought back from S3 by a DNS query: on a worker with no copy of anything (its
    // cache deleted, and with it the image's base), and, for the deduplicated cluster, on
    // one that keeps the image's base (it served an app of the image before: the common
    // case). A different app each round; each restore is swapped out again after.
    let rounds = apps.min(7);
    let mut back_ms = [Vec::new(), Vec::new(), Vec::new()];
    for round in 0..rounds {
        let i = apps - 1 - round;
        let runs = [
            (&dedup, format!("dn{i}"), false),
            (&plain, format!("pn{i}"), false),
            (&dedup, format!("dn{i}"), true),
        ];
        for (k, (cluster, app, keep_bases)) in runs.into_iter().enumerate() {
            for entry in std::fs::read_dir(&cluster.cache)
                .into_iter()
                .flatten()
                .flatten()
            {
                if !(keep_bases && entry.file_name() == ".bases") {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
            let name = format!("{app}.pico.local");
            back_ms[k].push(query_to_first_byte(cluster.dns, &name, "/"));
            cluster.swap_out(&app);
        }
    }
    let back_ms = back_ms.map(|mut ms| median(&mut ms));
    let sum = |m: &std::collections::BTreeMap<String, u64>| m.values().sum::<u64>();
    let mib = |b: u64| b as f64 / 1048576.0;
    println!(
        "| {apps} nginx apps | page files stored once per image | every page file whole | ratio |"
    );
    println!("|---|---|---|---|");
    println!(
        "| all apps, stored (hub) | {:.2} MiB | {:.2} MiB | {:.3} |",
        mib(total[0].0),
        mib(total[1].0),
        total[0].0 as f64 / total[1].0.max(1) as f64
    );
    println!(
        "| all apps, logical (hub) | {:.2} MiB | {:.2} MiB | |",
        mib(total[0].1),
        mib(total[1].1)
    );
    println!(
        "| the bucket on disk | {:.2} MiB | {:.2} MiB | {:.3} |",
        mib(sum(&dedup_disk)),
        mib(sum(&plain_disk)),
        sum(&dedup_disk) as f64 / sum(&plain_disk).max(1) as f64
    );
    for kind in kinds
        .iter()
        .map(|k| k.to_string())
        .chain(["other".to_string()])
    {
        let (d, p) = (
            dedup_disk.get(&kind).copied().unwrap_or(0),
            plain_disk.get(&kind).copied().unwrap_or(0),
        );
        if d + p > 0 {
            println!("| ... `{kind}` | {:.2} MiB | {:.2} MiB | |", mib(d), mib(p));
        }
    }
    println!(
        "| back from S3, nothing cached: DNS to first byte (median of {rounds}) | {:.1} ms | {:.1} ms | {:.2} |",
        back_ms[0],
        back_ms[1],
        back_ms[0] / back_ms[1]
    );
    println!(
        "| back from S3, the image's base cached: DNS to first byte (median of {rounds}) | {:.1} ms | | {:.2} |",
        back_ms[2],
        back_ms[2] / back_ms[1]
    );
    let one = first[1].0;
    println!(
        "\n  goal: {:.2} MiB on disk <= 1.5 x {:.2} MiB (one app, every page file whole) + {:.2} MiB \
         (their own pages) = {:.2} MiB: {}",
        mib(sum(&dedup_disk)),
        mib(one),
        mib(unique),
        mib(one * 3 / 2 + unique),
        if sum(&dedup_disk) <= one * 3 / 2 + unique { "met" } else { "missed" }
    );
    let _ = first[0];
}

/// Files under `dir` (recursively) whose names end in `suffix`.
fn count_files(dir: &std::path::Path, suffix: &str) -> usize {
    files_under(dir)
        .iter()
        .filter(|path| path.to_string_lossy().ends_with(suffix))
        .count()
}

/// Bytes of the own pages of the packed page files under `dir` (from their headers).
fn own_page_bytes(dir: &std::path::Path) -> u64 {
    use picocenter_snapshots::packed::{decode_header, PackedHeader};
    files_under(dir)
        .iter()
        .filter(|path| path.to_string_lossy().ends_with(".packed"))
        .map(|path| {
            let bytes = std::fs::read(path).unwrap_or_default();
            PackedHeader::logical_pages_of(&bytes)
                .and_then(|pages| decode_header(&bytes, pages))
                .map_or(0, |header| header.own_pages * 4096)
        })
        .sum()
}

/// DNS query to first byte of swapped-out apps (local store) through a cluster of
/// `before` and one of this build, each with its own state directory and default flags.
fn before_and_after(before: &Build) {
    let start = |name: &str, pool: &str| {
        build_image("counter-http");
        build_image("nginx");
        let store = state_dir().join(format!("bench-cluster/cold-{name}"));
        Cluster::start_with(name, pool, &["--store", store.to_str().unwrap()], &[], &[])
    };
    let old = with_build(Some(before), || start("before", "127.4.7.0/24"));
    let new = start("after", "127.4.8.0/24");
    println!("== DNS query to first HTTP byte, swapped out to the local store: PICOCENTER_BEFORE against this build (median of {ROUNDS}, rounds alternating) ==");
    println!("| app | before | after | after/before |");
    println!("|---|---|---|---|");
    for (name, image) in [("counter", "counter-http"), ("nginx", "nginx")] {
        let (mut old_times, mut new_times) = (Vec::new(), Vec::new());
        for cluster in [&old, &new] {
            cluster.add(name, image);
            query_to_first_byte(cluster.dns, &format!("{name}.pico.local"), "/");
        }
        for round in 0..ROUNDS {
            let mut both = [(&old, &mut old_times), (&new, &mut new_times)];
            if round % 2 == 1 {
                both.reverse();
            }
            for (cluster, times) in both {
                cluster.swap_out(name);
                std::thread::sleep(Duration::from_millis(300));
                times.push(query_to_first_byte(
                    cluster.dns,
                    &format!("{name}.pico.local"),
                    "/",
                ));
            }
        }
        let (o, n) = (median(&mut old_times), median(&mut new_times));
        println!("| {image} | {o:.2} ms | {n:.2} ms | {:.2} |", n / o);
    }
}

fn main() {
    common::require_kvm();
    // `cargo bench --bench cluster -- before`: only issue #15's before and after.
    if std::env::args().skip(1).any(|arg| arg == "before") {
        let before = Build::before().expect("`-- before` needs PICOCENTER_BEFORE");
        before_and_after(&before);
        return;
    }
    // `cargo bench --bench cluster -- warm`: only the warm pool against none.
    if std::env::args().skip(1).any(|arg| arg == "warm") {
        warm_pool_against_cold();
        return;
    }
    // `cargo bench --bench cluster -- big`: only the big app over the link.
    if std::env::args().skip(1).any(|arg| arg == "big") {
        big_app_over_the_link();
        return;
    }
    // `cargo bench --bench cluster -- dedup`: only the bytes nginx apps take in S3.
    if std::env::args().skip(1).any(|arg| arg == "dedup") {
        stored_once_per_image();
        return;
    }
    // `cargo bench --bench cluster -- chaos`: only the chaos loop.
    if std::env::args().skip(1).any(|arg| arg == "chaos") {
        chaos_loop();
        return;
    }
    // `cargo bench --bench cluster -- failover`: only the failover figures.
    if std::env::args().skip(1).any(|arg| arg == "failover") {
        failover_on_etcd();
        return;
    }
    // `cargo bench --bench cluster -- registry`: only etcd against redb.
    if std::env::args().skip(1).any(|arg| arg == "registry") {
        registry_etcd_against_redb();
        return;
    }
    build_image("counter-http");
    build_image("nginx");
    build_image("python-http");

    let local = Cluster::start(
        "local",
        "127.4.1.0/24",
        &[
            "--store",
            state_dir().join("bench-cluster/cold").to_str().unwrap(),
        ],
    );
    let dir = state_dir().join("bench-cluster");
    std::fs::create_dir_all(&dir).unwrap();
    let moto = S3Server::moto(dir.join("moto.log"));
    let endpoint = moto.endpoint.clone();
    let s3_flags = |bucket: &'static str, endpoint: &str| -> Vec<String> {
        [
            "--s3-bucket",
            bucket,
            "--s3-endpoint",
            endpoint,
            "--s3-path-style",
            "--s3-access-key",
            "bench",
            "--s3-secret-key",
            "bench",
        ]
        .map(String::from)
        .to_vec()
    };
    let flags = s3_flags("bench", &endpoint);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let s3 = Cluster::start("s3", "127.4.2.0/24", &flags);
    // The same S3 server behind issue #14's wide-area link: 20 ms, 50 MB/s a connection,
    // 16 connections (tests/common/wan.rs).
    let server = endpoint.trim_start_matches("http://").parse().unwrap();
    let link = WanLink::start_http(server, LinkShape::default());
    let flags = s3_flags("bench-wan", &link.url());
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let wan = Cluster::start("s3wan", "127.4.3.0/24", &flags);
    println!("== DNS query to first HTTP response byte (median of {ROUNDS}) ==");
    let apps = [
        ("counter", "counter-http", "/"),
        ("nginx", "nginx", "/"),
        ("python", "python-http", "/"),
    ];
    for (name, image, path) in apps {
        // App names are host-wide (control sockets): the S3 cluster's get a prefix.
        let s3_name = format!("s3{name}");
        let wan_name = format!("wan{name}");
        local.add(name, image);
        s3.add(&s3_name, image);
        wan.add(&wan_name, image);
        let resident_ms = resident(&local, name, path);
        let local_ms = swapped(&local, name, path, false);
        let s3_ms = swapped(&s3, &s3_name, path, true);
        let before = link.downloaded.load(std::sync::atomic::Ordering::SeqCst);
        let (wan_answer_ms, wan_ms) = swapped_answer_and_first_byte(&wan, &wan_name, path, true);
        let wan_bytes = link.downloaded.load(std::sync::atomic::Ordering::SeqCst) - before;
        let local_direct = swapped_no_dns(&local, name, path, false);
        let s3_direct = swapped_no_dns(&s3, &s3_name, path, true);
        println!(
            "  {image:<13} resident {resident_ms:6.2} ms   swapped, local store {local_ms:6.2} ms   swapped, S3 {s3_ms:6.2} ms"
        );
        println!(
            "  {image:<13} no DNS query, connect to first byte:   swapped, local store {local_direct:6.2} ms   swapped, S3 {s3_direct:6.2} ms"
        );
        println!(
            "  {image:<13} swapped, S3 over a 20 ms / 50 MB/s link: {wan_ms:6.2} ms (DNS answered in {wan_answer_ms:.2} ms; {:.2} MiB fetched per swap-in)",
            wan_bytes as f64 / ROUNDS as f64 / 1048576.0
        );
    }

    // `cargo bench --bench cluster -- swap`: only the section above.
    if std::env::args().skip(1).any(|arg| arg == "swap") {
        return;
    }
    big_app_over_the_link();
    registry_etcd_against_redb();

    println!("\n== hub DNS queries per second, resident app (4 clients x 16 in flight, 3 s) ==");
    let qps = queries_per_second(local.dns, "counter.pico.local", 4, 16, 3.0);
    println!("  {qps:.0} queries/s");

    println!("\n== host memory per idle resident picoprocess (20 counter-http apps) ==");
    let mut overheads = Vec::new();
    let mut totals = Vec::new();
    for i in 0..20 {
        let name = format!("idle{i}");
        local.add(&name, "counter-http");
        query_to_first_byte(local.dns, &format!("{name}.pico.local"), "/");
    }
    std::thread::sleep(Duration::from_millis(500));
    for i in 0..20 {
        let socket = state_dir().join("run").join(format!("idle{i}.sock"));
        let mut stream = std::os::unix::net::UnixStream::connect(&socket).unwrap();
        writeln!(stream, r#"{{"op":"stats"}}"#).unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stream), &mut line).unwrap();
        let stats: serde_json::Value = serde_json::from_str(&line).unwrap();
        let pid = stats["pid"].as_u64().unwrap() as u32;
        let guest = stats["memory_bytes"].as_u64().unwrap();
        let pss = pss_bytes(pid);
        overheads.push(pss.saturating_sub(guest) as f64);
        totals.push(pss as f64);
    }
    let overhead = median(&mut overheads);
    let total = median(&mut totals);
    println!(
        "  PSS {:.2} MiB per app, of which {:.2} MiB beyond its guest pages; {:.0} idle apps fit in 16 GiB",
        total / 1048576.0,
        overhead / 1048576.0,
        (16u64 << 30) as f64 / total
    );
}
