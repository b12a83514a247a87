//! The registry in etcd: one key per app, `{prefix}/apps/{name}`, holding its record
//! (JSON). etcd replicates and syncs every write through its raft log, so there is
//! nothing to batch or flush here; several records written at once go in one
//! transaction (in pieces of [`OPS_PER_TRANSACTION`], under etcd's default limit of 128).
//!
//! The client is async (gRPC); the registry's interface is not, so the client runs on a
//! runtime of its own and each call waits for its answer, bounded by [`CALL_TIMEOUT`].
//!
//! One hub at a time uses a registry: it holds the key `{prefix}/hub` under a lease of
//! [`HUB_LEASE_TTL`] seconds that it keeps alive, and every write is a transaction that
//! first checks that the key is still under that lease. A second hub waits for the hold
//! (a hub that died loses it when its lease expires) and gives up after
//! [`HOLD_WAIT`]; a hub that lost its hold (it was cut off from etcd for longer than the
//! TTL, and another hub took over) can write nothing more.

use super::{RegistryError, RegistryStore};
use crate::model::AppRecord;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse,
};
use std::time::Duration;

/// Puts per transaction.
pub const OPS_PER_TRANSACTION: usize = 64;
/// How long one call to etcd may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Seconds a hub's hold on the registry outlives the hub's last keep-alive.
pub const HUB_LEASE_TTL: i64 = 5;
/// How long a hub waits for another's hold on the registry to end.
pub const HOLD_WAIT: Duration = Duration::from_secs(2 * HUB_LEASE_TTL as u64);
/// The key prefix when `--registry` names none.
pub const DEFAULT_PREFIX: &str = "picocenter";

/// Where the registry is in etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// The cluster's client URLs (`http://HOST:PORT`).
    pub endpoints: Vec<String>,
    /// The keys' prefix, without a trailing slash.
    pub prefix: String,
}

impl EtcdConfig {
    /// Parses `etcd://HOST:PORT[,HOST:PORT...][/PREFIX]`.
    pub fn parse(text: &str) -> Result<Self, RegistryError> {
        let bad = || RegistryError::Config(text.to_string());
        let rest = text.strip_prefix("etcd://").ok_or_else(bad)?;
        let (hosts, prefix) = match rest.split_once('/') {
            Some((hosts, prefix)) => (hosts, prefix.trim_end_matches('/')),
            None => (rest, DEFAULT_PREFIX),
        };
        let endpoints: Vec<String> = hosts
            .split(',')
            .map(|host| {
                let (name, port) = host.rsplit_once(':').ok_or_else(bad)?;
                let port: u16 = port.parse().map_err(|_| bad())?;
                if name.is_empty() || port == 0 {
                    return Err(bad());
                }
                Ok(format!("http://{name}:{port}"))
            })
            .collect::<Result<_, _>>()?;
        let prefix_ok = !prefix.is_empty()
            && prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b));
        if !prefix_ok {
            return Err(bad());
        }
        Ok(Self {
            endpoints,
            prefix: prefix.to_string(),
        })
    }

    fn apps(&self) -> String {
        format!("{}/apps/", self.prefix)
    }

    fn hub(&self) -> String {
        format!("{}/hub", self.prefix)
    }
}

/// The registry in etcd.
pub struct EtcdRegistry {
    config: EtcdConfig,
    client: Client,
    /// The lease under which this hub holds the registry.
    lease: i64,
    /// Set when the lease expired: the hold is gone for good.
    lost: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// `Some` until dropped (then shut down without blocking: a hub may drop its registry
    /// on an async thread).
    runtime: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for EtcdRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdRegistry")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl EtcdRegistry {
    /// Connects to the cluster `config` names (failing at once if none of it answers).
    pub fn open(config: &EtcdConfig) -> Result<Self, RegistryError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("registry-etcd")
            .enable_all()
            .build()
            .map_err(RegistryError::Runtime)?;
        let endpoints = config.endpoints.clone();
        let options = ConnectOptions::new()
            .with_connect_timeout(CALL_TIMEOUT)
            .with_timeout(CALL_TIMEOUT);
        let connect = async move {
            let mut client = Client::connect(endpoints, Some(options)).await?;
            // A round trip now: an unreachable cluster fails the hub's start, not its
            // first write.
            client.status().await?;
            Ok(client)
        };
        let client = wait(&runtime, connect).map_err(|source| etcd_error(config, source))?;
        let lease = wait(&runtime, hold(client.clone(), config.hub()))
            .map_err(|source| etcd_error(config, source))?
            .map_err(|holder| RegistryError::Held {
                registry: format!("{}/{}", config.endpoints.join(","), config.prefix),
                holder,
            })?;
        let lost = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        runtime.spawn(keep_alive(client.clone(), lease, lost.clone()));
        tracing::info!(endpoints = %config.endpoints.join(","), prefix = %config.prefix, lease, "holding the registry in etcd");
        Ok(Self {
            config: config.clone(),
            client,
            lease,
            lost,
            runtime: Some(runtime),
        })
    }

    fn call<T: Send + 'static>(
        &self,
        call: impl FnOnce(Client) -> futures::future::BoxFuture<'static, Result<T, etcd_client::Error>>,
    ) -> Result<T, RegistryError> {
        let Some(runtime) = &self.runtime else {
            return Err(RegistryError::Lost);
        };
        wait(runtime, call(self.client.clone())).map_err(|e| etcd_error(&self.config, e))
    }
}

/// What says who holds a registry.
fn holder_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("a hub on {} (pid {})", host.trim(), std::process::id())
}

/// Takes the hold on the registry at `key` under a new lease, waiting up to [`HOLD_WAIT`]
/// for another hub's: the lease, or who holds it.
async fn hold(mut client: Client, key: String) -> Result<Result<i64, String>, etcd_client::Error> {
    let deadline = tokio::time::Instant::now() + HOLD_WAIT;
    loop {
        let lease = client.lease_grant(HUB_LEASE_TTL, None).await?.id();
        let take = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.clone(),
                holder_name(),
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else([TxnOp::get(key.clone(), None)]);
        let taken = client.txn(take).await?;
        if taken.succeeded() {
            return Ok(Ok(lease));
        }
        client.lease_revoke(lease).await?;
        let holder = taken
            .op_responses()
            .into_iter()
            .find_map(|response| match response {
                TxnOpResponse::Get(got) => got
                    .kvs()
                    .first()
                    .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()),
                _ => None,
            })
            .unwrap_or_else(|| "another hub".into());
        if tokio::time::Instant::now() >= deadline {
            return Ok(Err(holder));
        }
        tracing::info!(%holder, "the registry is held by another hub: waiting for its lease to end");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Keeps `lease` alive, three times per TTL, for as long as the registry lives (its
/// runtime ends this task); sets `lost` if it expired.
async fn keep_alive(
    mut client: Client,
    lease: i64,
    lost: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    let period = Duration::from_secs(HUB_LEASE_TTL as u64) / 3;
    let mut keeping = None;
    loop {
        if keeping.is_none() {
            keeping = client.lease_keep_alive(lease).await.ok();
        }
        if let Some((keeper, stream)) = keeping.as_mut() {
            let kept = async {
                keeper.keep_alive().await?;
                stream.message().await
            };
            match tokio::time::timeout(CALL_TIMEOUT, kept).await {
                Ok(Ok(Some(answer))) if answer.ttl() > 0 => {}
                Ok(Ok(_)) => {
                    tracing::error!(lease, "the hub's hold on the registry expired");
                    lost.store(true, std::sync::atomic::Ordering::SeqCst);
                    return;
                }
                Ok(Err(e)) => {
                    tracing::warn!(lease, "keeping the hold on the registry: {e}");
                    keeping = None;
                }
                Err(_) => {
                    tracing::warn!(lease, "keeping the hold on the registry: no answer");
                    keeping = None;
                }
            }
        }
        tokio::time::sleep(period).await;
    }
}

fn etcd_error(config: &EtcdConfig, source: etcd_client::Error) -> RegistryError {
    RegistryError::Etcd {
        endpoints: config.endpoints.join(","),
        source,
    }
}

/// Runs `future` on `runtime` and waits for it from this (maybe async) thread.
fn wait<T: Send + 'static>(
    runtime: &tokio::runtime::Runtime,
    future: impl std::future::Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
) -> Result<T, etcd_client::Error> {
    let (send, receive) = std::sync::mpsc::sync_channel(1);
    runtime.spawn(async move {
        let _ = send.send(future.await);
    });
    receive.recv().unwrap_or_else(|_| {
        Err(etcd_client::Error::InvalidArgs(
            "the registry's runtime stopped".into(),
        ))
    })
}

impl EtcdRegistry {
    /// Runs `operations` in one transaction if this hub still holds the registry.
    fn fenced(&self, operations: Vec<TxnOp>) -> Result<(), RegistryError> {
        let (hub, lease) = (self.config.hub(), self.lease);
        let done = self.call(move |mut client| {
            Box::pin(async move {
                let txn = Txn::new()
                    .when([Compare::lease(hub, CompareOp::Equal, lease)])
                    .and_then(operations);
                Ok(client.txn(txn).await?.succeeded())
            })
        })?;
        if done {
            Ok(())
        } else {
            Err(RegistryError::Lost)
        }
    }
}

impl Drop for EtcdRegistry {
    /// Lets go of the registry at once, so the next hub need not wait for the lease.
    fn drop(&mut self) {
        let lease = self.lease;
        let _ = self.call(move |mut client| {
            Box::pin(async move {
                client.lease_revoke(lease).await?;
                Ok(())
            })
        });
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl RegistryStore for EtcdRegistry {
    fn load(&self) -> Result<Vec<AppRecord>, RegistryError> {
        let prefix = self.config.apps();
        let kvs = self.call(move |mut client| {
            Box::pin(async move {
                let got = client
                    .get(prefix, Some(GetOptions::new().with_prefix()))
                    .await?;
                Ok(got
                    .kvs()
                    .iter()
                    .map(|kv| (kv.key().to_vec(), kv.value().to_vec()))
                    .collect::<Vec<_>>())
            })
        })?;
        kvs.into_iter()
            .map(|(key, value)| {
                serde_json::from_slice(&value).map_err(|source| RegistryError::Record {
                    name: String::from_utf8_lossy(&key).into_owned(),
                    source,
                })
            })
            .collect()
    }

    fn save_all(&self, records: &[&AppRecord], _sync: bool) -> Result<(), RegistryError> {
        for piece in records.chunks(OPS_PER_TRANSACTION) {
            let mut puts = Vec::with_capacity(piece.len());
            for record in piece {
                let value = serde_json::to_vec(record).map_err(|source| RegistryError::Record {
                    name: record.spec.name.clone(),
                    source,
                })?;
                let key = format!("{}{}", self.config.apps(), record.spec.name);
                puts.push(TxnOp::put(key, value, None));
            }
            self.fenced(puts)?;
        }
        Ok(())
    }

    /// Every write is durable when etcd answers it.
    fn flush(&self) -> Result<(), RegistryError> {
        Ok(())
    }

    fn remove(&self, name: &str) -> Result<(), RegistryError> {
        let key = format!("{}{name}", self.config.apps());
        self.fenced(vec![TxnOp::delete(key, None)])
    }

    fn lost(&self) -> bool {
        self.lost.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// An etcd server for tests (the hub's and the end-to-end ones): one member on free
/// loopback ports, its data in a directory the caller gives, killed when dropped.
#[doc(hidden)]
pub mod testing {
    use std::path::Path;
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    /// A running etcd.
    pub struct EtcdServer {
        child: Child,
        /// `etcd://127.0.0.1:PORT`, for `--registry`.
        pub url: String,
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free loopback port")
    }

    impl EtcdServer {
        /// Starts one with its data under `dir`, and waits until it accepts clients.
        pub fn start(dir: &Path) -> Self {
            let (client, peer) = (free_port(), free_port());
            let client_url = format!("http://127.0.0.1:{client}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let child = Command::new("etcd")
                .args(["--name", "test", "--data-dir"])
                .arg(dir.join("etcd-data"))
                .args(["--listen-client-urls", &client_url])
                .args(["--advertise-client-urls", &client_url])
                .args(["--listen-peer-urls", &peer_url])
                .args(["--initial-advertise-peer-urls", &peer_url])
                .args(["--initial-cluster", &format!("test={peer_url}")])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("etcd (scripts/setup.sh installs etcd-server)");
            let mut server = Self {
                child,
                url: format!("etcd://127.0.0.1:{client}"),
            };
            let started = Instant::now();
            while std::net::TcpStream::connect(("127.0.0.1", client)).is_err() {
                if let Ok(Some(status)) = server.child.try_wait() {
                    panic!("etcd ended at start: {status}");
                }
                assert!(
                    started.elapsed() < Duration::from_secs(20),
                    "etcd did not start"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            server
        }
    }

    impl Drop for EtcdServer {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{suite, Registry, RegistryConfig, RegistryError};
    use super::*;

    #[test]
    fn the_registry_suite_passes_on_etcd() {
        let dir = tempfile::tempdir().unwrap();
        let server = testing::EtcdServer::start(dir.path());
        let config = RegistryConfig::parse(&format!("{}/suite", server.url), "x".into()).unwrap();
        suite::records_survive_a_reopen(&config);
        // Another prefix is another registry.
        let other = RegistryConfig::parse(&format!("{}/other", server.url), "x".into()).unwrap();
        assert!(Registry::open(&other).unwrap().load().unwrap().is_empty());
    }

    #[test]
    fn one_hub_at_a_time_holds_a_registry() {
        let dir = tempfile::tempdir().unwrap();
        let server = testing::EtcdServer::start(dir.path());
        let config = RegistryConfig::parse(&format!("{}/held", server.url), "x".into()).unwrap();
        let first = Registry::open(&config).unwrap();
        let record = crate::model::AppRecord::new(crate::model::AppSpec {
            name: "a".into(),
            image: "i".into(),
            memory_mib: None,
            env: vec![],
            idle_after_secs: None,
        });
        first.save(&record, true).unwrap();
        // A second hub waits for the hold, then says who has it.
        let started = std::time::Instant::now();
        let error = Registry::open(&config).unwrap_err().to_string();
        assert!(started.elapsed() >= HOLD_WAIT, "{error}");
        assert!(error.contains("one hub at a time"), "{error}");
        assert!(
            error.contains(&format!("pid {}", std::process::id())),
            "{error}"
        );
        // Once the first lets go, the next holds it at once, and finds what it wrote.
        drop(first);
        let started = std::time::Instant::now();
        let next = Registry::open(&config).unwrap();
        assert!(started.elapsed() < HOLD_WAIT / 2);
        assert_eq!(next.load().unwrap(), vec![record.clone()]);
        // Taken from it (its key gone, as when its lease expired and another hub took
        // over), it writes nothing more.
        let etcd = EtcdConfig::parse(&format!("{}/held", server.url)).unwrap();
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let mut client = Client::connect(etcd.endpoints.clone(), None).await.unwrap();
            client.delete(etcd.hub(), None).await.unwrap();
        });
        let error = next.save(&record, true).unwrap_err();
        assert!(matches!(error, RegistryError::Lost), "{error}");
        assert!(matches!(next.remove("a"), Err(RegistryError::Lost)));
    }

    #[test]
    fn an_unreachable_cluster_fails_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let port = testing::EtcdServer::start(dir.path()).url.clone();
        // The server is gone now: nothing answers there.
        let config = RegistryConfig::parse(&port, "x".into()).unwrap();
        let started = std::time::Instant::now();
        let error = Registry::open(&config).unwrap_err().to_string();
        assert!(error.contains("127.0.0.1"), "{error}");
        assert!(started.elapsed() < CALL_TIMEOUT * 3);
    }

    #[test]
    fn registry_urls_parse_or_say_what_they_expect() {
        let parsed = EtcdConfig::parse("etcd://10.0.0.1:2379,etcd-2:2379/prod/zone").unwrap();
        assert_eq!(
            parsed.endpoints,
            ["http://10.0.0.1:2379", "http://etcd-2:2379"]
        );
        assert_eq!(parsed.prefix, "prod/zone");
        assert_eq!(
            EtcdConfig::parse("etcd://h:1").unwrap().prefix,
            DEFAULT_PREFIX
        );
        for bad in [
            "etcd://",
            "etcd://h",
            "etcd://h:0",
            "etcd://h:x",
            "etcd://:1",
            "http://h:1",
            "etcd://h:1/",
            "etcd://h:1/a b",
            "mysql",
        ] {
            let error = RegistryConfig::parse(bad, "x".into()).unwrap_err();
            assert!(
                error.to_string().contains("expected `redb`"),
                "{bad}: {error}"
            );
        }
        assert_eq!(
            RegistryConfig::parse("redb", "/r".into()).unwrap(),
            RegistryConfig::Redb("/r".into())
        );
    }
}
