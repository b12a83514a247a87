//! Starting the servers: a hub (DNS over UDP and TCP, the HTTP API, maintenance) and a
//! worker (its order API and its watch-and-report loop), on the caller's tokio runtime.

use crate::cold::{Cold, ColdConfig};
use crate::dns::{DnsHandler, Zone};
use crate::hub::{Hub, HubConfig, HubError};
use crate::worker::{Worker, WorkerConfig};
use hickory_proto::rr::Name;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Why a server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A socket could not be bound.
    #[error("binding {what} on {address}: {source}")]
    Bind {
        /// Which server.
        what: &'static str,
        /// Where.
        address: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The zone is not a DNS name.
    #[error("bad zone {0:?}")]
    Zone(String),
    /// Cold storage is not usable.
    #[error("cold storage: {0}")]
    Cold(String),
    /// The hubs' clients could not be made.
    #[error("the hubs' API: {0}")]
    Hubs(String),
    /// The hub could not open its registry.
    #[error(transparent)]
    Hub(#[from] HubError),
    /// The API's certificate or key is unusable.
    #[error("the API's TLS certificate {cert} or key {key}: {source}")]
    Tls {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file could not be read or written.
    #[error("{what} {path}: {source}")]
    File {
        /// The step.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// How to run a hub.
#[derive(Debug, Clone)]
pub struct HubOptions {
    /// DNS (UDP and TCP) address.
    pub dns: SocketAddr,
    /// HTTP API address.
    pub api: SocketAddr,
    /// The zone, e.g. `pico.local.`.
    pub zone: String,
    /// TTL of app answers, seconds.
    pub ttl: u32,
    /// Where the hub keeps its files (the redb registry, by default).
    pub data_dir: PathBuf,
    /// The registry: redb in `data_dir` unless this names another.
    pub registry: Option<crate::registry::RegistryConfig>,
    /// The API token.
    pub token: String,
    /// Placement and liveness settings.
    pub config: HubConfig,
    /// Serve the API over TLS with this certificate chain and key (PEM files).
    pub tls: Option<TlsFiles>,
}

/// A server's certificate chain and private key, PEM files.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The certificate chain, leaf first.
    pub cert: PathBuf,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// A running hub.
pub struct RunningHub {
    /// The hub.
    pub hub: Arc<Hub>,
    /// Where DNS is served.
    pub dns: SocketAddr,
    /// Where the API is served.
    pub api: SocketAddr,
    /// The API's URL scheme: `https` with TLS, else `http`.
    pub scheme: &'static str,
    dns_server: hickory_server::Server<DnsHandler>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for RunningHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningHub")
            .field("dns", &self.dns)
            .field("api", &self.api)
            .finish()
    }
}

impl RunningHub {
    /// Stops serving and makes the registry durable.
    pub async fn shutdown(mut self) {
        let _ = self.dns_server.shutdown_gracefully().await;
        for task in &self.tasks {
            task.abort();
        }
        self.hub.flush();
    }
}

/// Makes `dir` (and its parents) exist, with `dir` itself 0700.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Starts a hub.
pub async fn start_hub(options: HubOptions) -> Result<RunningHub, ServeError> {
    // The registry holds app environments (secrets): the hub's directory is its own.
    private_dir(&options.data_dir).map_err(|source| ServeError::File {
        what: "creating",
        path: options.data_dir.clone(),
        source,
    })?;
    let registry = options.registry.clone().unwrap_or_else(|| {
        crate::registry::RegistryConfig::Redb(options.data_dir.join("registry.redb"))
    });
    let hub = Hub::open(options.config.clone(), &registry, &options.token)?;
    let apex = Name::from_ascii(&options.zone)
        .map(|n| {
            let mut n = n;
            n.set_fqdn(true);
            n
        })
        .map_err(|_| ServeError::Zone(options.zone.clone()))?;
    let ns_address = match options.dns.ip() {
        IpAddr::V4(a) if !a.is_unspecified() => a,
        _ => Ipv4Addr::LOCALHOST,
    };
    let handler = DnsHandler::new(
        hub.clone(),
        Zone {
            apex,
            ttl: options.ttl,
            ns_address,
        },
    );
    let (dns_server, dns) = crate::dns::serve(handler, options.dns)
        .await
        .map_err(|source| ServeError::Bind {
            what: "DNS",
            address: options.dns,
            source,
        })?;
    let listener = tokio::net::TcpListener::bind(options.api)
        .await
        .map_err(|source| ServeError::Bind {
            what: "the API",
            address: options.api,
            source,
        })?;
    let api = listener.local_addr().map_err(|source| ServeError::Bind {
        what: "the API",
        address: options.api,
        source,
    })?;
    let router = crate::api::router(hub.clone());
    let (api_task, scheme) = match &options.tls {
        None => (
            tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, router).await {
                    tracing::error!("the API server failed: {e}");
                }
            }),
            "http",
        ),
        Some(files) => {
            let tls_error = |source| ServeError::Tls {
                cert: files.cert.clone(),
                key: files.key.clone(),
                source,
            };
            let config =
                axum_server::tls_rustls::RustlsConfig::from_pem_file(&files.cert, &files.key)
                    .await
                    .map_err(tls_error)?;
            let listener = listener.into_std().map_err(tls_error)?;
            let server = axum_server::from_tcp_rustls(listener, config).map_err(tls_error)?;
            let task = tokio::spawn(async move {
                if let Err(e) = server.serve(router.into_make_service()).await {
                    tracing::error!("the API server failed: {e}");
                }
            });
            (task, "https")
        }
    };
    hub.announce(SocketAddr::new(IpAddr::V4(ns_address), dns.port()))?;
    let maintenance = tokio::spawn(hub.clone().maintain_forever(Duration::from_millis(100)));
    let following = tokio::spawn(hub.clone().follow_registry());
    tracing::info!(%dns, %api, scheme, zone = %options.zone, id = hub.id(), "hub up");
    Ok(RunningHub {
        hub,
        dns,
        api,
        scheme,
        dns_server,
        tasks: vec![api_task, maintenance, following],
    })
}

/// How to run a worker.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// The hubs' API URLs: reports go to the first that answers.
    pub hubs: Vec<String>,
    /// Certificates (PEM) to trust for the hub's API besides the system's roots.
    pub hub_ca: Option<Vec<u8>>,
    /// The API token.
    pub token: String,
    /// Where the worker's order API listens (port 0: any).
    pub listen: SocketAddr,
    /// The worker itself.
    pub config: WorkerConfig,
    /// Cold storage.
    pub cold: ColdConfig,
    /// How often it watches its apps and reports.
    pub period: Duration,
}

/// Runs a worker until `shutdown` resolves; then swaps its apps out.
pub async fn run_worker(
    options: WorkerOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ServeError> {
    let listener = tokio::net::TcpListener::bind(options.listen)
        .await
        .map_err(|source| ServeError::Bind {
            what: "the worker API",
            address: options.listen,
            source,
        })?;
    let key_file = options.config.key_file.clone();
    let key = tokio::task::spawn_blocking(move || {
        picocenter_snapshots::SnapshotKey::load_or_create(&key_file)
    })
    .await
    .map_err(|e| ServeError::Cold(e.to_string()))?
    .map_err(|e| ServeError::Cold(e.to_string()))?;
    let cold = Cold::new(
        options.cold.clone(),
        &options.config.work_dir.join("cache"),
        key,
    );
    tracing::info!(cold = %cold.describe(), "cold storage");
    let probe = cold.clone();
    tokio::task::spawn_blocking(move || probe.prepare())
        .await
        .map_err(|e| ServeError::Cold(e.to_string()))?
        .map_err(|e| ServeError::Cold(e.to_string()))?;
    if let Err(e) = picocenter_vmm::sandbox::loopback6::route_app_prefix() {
        tracing::warn!("{e:#}: apps' IPv6 addresses are unreachable from this host");
    }
    let limits = crate::worker::limits::check_and_raise(options.config.addresses.1);
    for note in &limits.notes {
        tracing::warn!("{note}");
    }
    tracing::info!(apps = limits.apps, tightest = %limits.tightest, "this host's limits allow about {} resident apps", limits.apps);
    let worker = Worker::new(options.config.clone(), cold);
    let clients = options
        .hubs
        .iter()
        .map(|url| {
            // Well under a worker's lease (3 s by default): a hub that does not answer
            // in time is left for the next before the worker's lease runs out.
            crate::client::Client::trusting(
                url,
                &options.token,
                Duration::from_millis(1500),
                options.hub_ca.as_deref(),
            )
            .map_err(|e| ServeError::Hubs(format!("{url}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let hub = crate::client::Failover::new(clients)
        .ok_or_else(|| ServeError::Hubs("a worker needs at least one hub".into()))?;
    crate::worker::run(
        worker,
        Arc::new(hub),
        listener,
        options.token.as_str().into(),
        options.period,
        shutdown,
    )
    .await
    .map_err(|source| ServeError::Bind {
        what: "the worker API",
        address: options.listen,
        source,
    })
}

/// Parses `A.B.C.D/N` into the first usable address and how many there are (the network
/// and broadcast addresses are left out of pools larger than two).
pub fn parse_pool(cidr: &str) -> Result<(Ipv4Addr, u32), String> {
    let (base, bits) = cidr
        .split_once('/')
        .ok_or_else(|| format!("{cidr:?} is not A.B.C.D/N"))?;
    let base: Ipv4Addr = base
        .parse()
        .map_err(|_| format!("{base:?} is not an IPv4 address"))?;
    let bits: u32 = bits
        .parse()
        .ok()
        .filter(|b| (8..=32).contains(b))
        .ok_or_else(|| format!("/{bits}: the prefix must be 8 to 32"))?;
    let size = 1u64 << (32 - bits);
    let network = u32::from(base) & (u32::MAX.checked_shl(32 - bits).unwrap_or(0));
    if size > 2 {
        Ok((Ipv4Addr::from(network + 1), (size - 2) as u32))
    } else {
        Ok((Ipv4Addr::from(network), size as u32))
    }
}

/// The API token in `path`, made (random, mode 0600) if there is none yet.
pub fn token_file(path: &Path) -> Result<String, ServeError> {
    if let Ok(token) = std::fs::read_to_string(path) {
        let token = token.trim().to_string();
        if !token.is_empty() {
            return Ok(token);
        }
    }
    let mut bytes = [0u8; 24];
    let mut random = std::fs::File::open("/dev/urandom").map_err(|source| ServeError::File {
        what: "opening",
        path: "/dev/urandom".into(),
        source,
    })?;
    std::io::Read::read_exact(&mut random, &mut bytes).map_err(|source| ServeError::File {
        what: "reading",
        path: "/dev/urandom".into(),
        source,
    })?;
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    if let Some(dir) = path.parent() {
        let _ = private_dir(dir);
    }
    use std::os::unix::fs::OpenOptionsExt;
    let write = |source| ServeError::File {
        what: "writing",
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(write)?;
    std::io::Write::write_all(&mut file, token.as_bytes()).map_err(write)?;
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools() {
        assert_eq!(
            parse_pool("127.1.0.0/24").unwrap(),
            (Ipv4Addr::new(127, 1, 0, 1), 254)
        );
        assert_eq!(
            parse_pool("127.1.0.7/32").unwrap(),
            (Ipv4Addr::new(127, 1, 0, 7), 1)
        );
        assert!(parse_pool("127.1.0.0").is_err());
        assert!(parse_pool("127.1.0.0/40").is_err());
        assert!(parse_pool("x/24").is_err());
    }

    #[test]
    fn tokens_are_made_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub/token");
        let first = token_file(&path).unwrap();
        assert_eq!(first.len(), 48);
        assert_eq!(token_file(&path).unwrap(), first);
    }
}
