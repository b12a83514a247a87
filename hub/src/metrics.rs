//! Prometheus metrics of the hub and of a worker, served as `GET /metrics` (OpenMetrics
//! text) on each one's HTTP API, behind its bearer token like every route.
//!
//! Counters and histograms are updated where things happen; gauges of sets (apps by
//! state, resident apps) are read when scraped, so they cost nothing in between. No
//! metric is labelled by app: with thousands of apps that would be thousands of series.
//!
//! | metric | what |
//! |---|---|
//! | `picocenter_hub_dns_queries_total{answer}` | DNS queries, by answer: `address`, `empty` (no record of that type), `nxdomain`, `servfail`, `refused`, `formerr` |
//! | `picocenter_hub_start_orders_total{kind}` | start orders to workers, `fresh` or `restore` |
//! | `picocenter_hub_start_seconds{kind}` | from a start order to the app's bound sockets, as the hub waits for it |
//! | `picocenter_hub_start_failures_total{kind}` | start orders that failed |
//! | `picocenter_hub_swap_outs_total` | swap-outs workers reported |
//! | `picocenter_hub_apps{state}` | apps by state (at scrape) |
//! | `picocenter_hub_workers` | live workers (at scrape) |
//! | `picocenter_worker_swap_ins_total`, `picocenter_worker_starts_total` | restores and fresh starts that answered |
//! | `picocenter_worker_swap_in_seconds`, `picocenter_worker_start_seconds` | from the order to the app's bound sockets |
//! | `picocenter_worker_start_failures_total{kind}` | starts (`fresh`) and restores (`restore`) that failed |
//! | `picocenter_worker_swap_outs_total`, `picocenter_worker_swap_out_seconds` | swap-outs, from their start to the app's memory freed (the upload to S3 runs after) |
//! | `picocenter_worker_swap_out_failures_total` | swap-outs that failed (not those of busy apps) |
//! | `picocenter_worker_upload_seconds`, `picocenter_worker_upload_failures_total` | uploads of settled snapshots to S3 |
//! | `picocenter_worker_cold_storage_bytes_total{direction}` | bytes to (`up`) and from (`down`) S3 over the wire; 0 with a local directory, which the VMM writes and maps in place |
//! | `picocenter_worker_resident_apps`, `picocenter_worker_held_apps`, `picocenter_worker_resident_memory_bytes` | at scrape |
//! | `picocenter_worker_warm_starts_total` | starts and restores whose VMM was a spare from the warm pool |
//! | `picocenter_worker_spare_vmms` | spare VMMs waiting in the warm pool, at scrape |

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::time::Duration;

/// Latency buckets: 1 ms to ~65 s, doubling.
fn latency_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.001, 2.0, 17)
}

fn latency() -> Histogram {
    Histogram::new(latency_buckets())
}

/// One label: its name is the field's.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AnswerLabel {
    /// See the table above.
    pub answer: &'static str,
}

/// Whether an order was a fresh start or a restore.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// `fresh` or `restore`.
    pub kind: &'static str,
}

impl KindLabel {
    /// The label of an order with or without a snapshot.
    pub fn of(restore: bool) -> Self {
        Self {
            kind: if restore { "restore" } else { "fresh" },
        }
    }
}

/// An app state.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    /// As `picocenter app ls` shows it.
    pub state: String,
}

/// A direction of cold-storage traffic.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabel {
    /// `up` or `down`.
    pub direction: &'static str,
}

/// The content type of what [`render`] writes (OpenMetrics text, which Prometheus reads).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Renders `registry` in the OpenMetrics text format.
pub fn render(registry: &Registry) -> String {
    let mut text = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut text, registry);
    text
}

/// The hub's metrics.
#[derive(Debug)]
pub struct HubMetrics {
    /// DNS queries by answer.
    pub dns_queries: Family<AnswerLabel, Counter>,
    /// Start orders by kind.
    pub start_orders: Family<KindLabel, Counter>,
    /// Start order latency by kind.
    pub start_seconds: Family<KindLabel, Histogram>,
    /// Failed start orders by kind.
    pub start_failures: Family<KindLabel, Counter>,
    /// Swap-outs reported.
    pub swap_outs: Counter,
    /// Apps by state, set at scrape.
    pub apps: Family<StateLabel, Gauge>,
    /// Live workers, set at scrape.
    pub workers: Gauge,
    registry: Registry,
}

impl Default for HubMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("picocenter_hub");
        let dns_queries = Family::<AnswerLabel, Counter>::default();
        registry.register("dns_queries", "DNS queries, by answer", dns_queries.clone());
        let start_orders = Family::<KindLabel, Counter>::default();
        registry.register(
            "start_orders",
            "Start orders sent to workers",
            start_orders.clone(),
        );
        let start_seconds =
            Family::<KindLabel, Histogram>::new_with_constructor(latency as fn() -> Histogram);
        registry.register(
            "start_seconds",
            "From a start order to the app's bound sockets",
            start_seconds.clone(),
        );
        let start_failures = Family::<KindLabel, Counter>::default();
        registry.register(
            "start_failures",
            "Start orders that failed",
            start_failures.clone(),
        );
        let swap_outs = Counter::default();
        registry.register("swap_outs", "Swap-outs workers reported", swap_outs.clone());
        let apps = Family::<StateLabel, Gauge>::default();
        registry.register("apps", "Apps by state", apps.clone());
        let workers = Gauge::default();
        registry.register("workers", "Live workers", workers.clone());
        Self {
            dns_queries,
            start_orders,
            start_seconds,
            start_failures,
            swap_outs,
            apps,
            workers,
            registry,
        }
    }
}

impl HubMetrics {
    /// Counts a DNS query answered with `answer`.
    pub fn dns_query(&self, answer: &'static str) {
        self.dns_queries
            .get_or_create(&AnswerLabel { answer })
            .inc();
    }

    /// Records a start order's outcome.
    pub fn start_order(&self, restore: bool, took: Duration, ok: bool) {
        let kind = KindLabel::of(restore);
        self.start_orders.get_or_create(&kind).inc();
        if ok {
            self.start_seconds
                .get_or_create(&kind)
                .observe(took.as_secs_f64());
        } else {
            self.start_failures.get_or_create(&kind).inc();
        }
    }

    /// The text to serve.
    pub fn render(&self) -> String {
        render(&self.registry)
    }
}

/// A worker's metrics.
#[derive(Debug)]
pub struct WorkerMetrics {
    /// Restores that answered.
    pub swap_ins: Counter,
    /// Their latency.
    pub swap_in_seconds: Histogram,
    /// Fresh starts that answered.
    pub starts: Counter,
    /// Their latency.
    pub start_seconds: Histogram,
    /// Failed starts and restores.
    pub start_failures: Family<KindLabel, Counter>,
    /// Swap-outs that freed the app's memory.
    pub swap_outs: Counter,
    /// Their latency.
    pub swap_out_seconds: Histogram,
    /// Swap-outs that failed.
    pub swap_out_failures: Counter,
    /// Uploads to S3 that ended well, and how long they took.
    pub upload_seconds: Histogram,
    /// Uploads to S3 that failed (after their retries).
    pub upload_failures: Counter,
    /// Bytes to and from S3, set at scrape from the connection's own count.
    pub cold_storage_bytes: Family<DirectionLabel, Counter>,
    /// Set at scrape.
    pub resident_apps: Gauge,
    /// Set at scrape.
    pub held_apps: Gauge,
    /// Set at scrape.
    pub resident_memory_bytes: Gauge,
    /// Starts and restores whose VMM came from the warm pool.
    pub warm_starts: Counter,
    /// Set at scrape.
    pub spare_vmms: Gauge,
    /// Two scrapes at once would both add the same difference.
    traffic_update: std::sync::Mutex<()>,
    registry: Registry,
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("picocenter_worker");
        let mut counter = |name: &str, help: &str| {
            let counter = Counter::default();
            registry.register(name, help, counter.clone());
            counter
        };
        let swap_ins = counter("swap_ins", "Restores that answered");
        let starts = counter("starts", "Fresh starts that answered");
        let swap_outs = counter("swap_outs", "Swap-outs that freed the app's memory");
        let swap_out_failures = counter("swap_out_failures", "Swap-outs that failed");
        let warm_starts = counter(
            "warm_starts",
            "Starts and restores whose VMM was a spare from the warm pool",
        );
        let upload_failures = counter(
            "upload_failures",
            "Uploads of settled snapshots to S3 that failed after their retries",
        );
        let mut histogram = |name: &str, help: &str| {
            let histogram = latency();
            registry.register(name, help, histogram.clone());
            histogram
        };
        let swap_in_seconds = histogram("swap_in_seconds", "From a restore order to bound sockets");
        let start_seconds = histogram("start_seconds", "From a fresh start order to bound sockets");
        let swap_out_seconds = histogram(
            "swap_out_seconds",
            "From a swap-out's start to the app's memory freed",
        );
        let upload_seconds = histogram("upload_seconds", "Uploads of settled snapshots to S3");
        let start_failures = Family::<KindLabel, Counter>::default();
        registry.register(
            "start_failures",
            "Starts and restores that failed",
            start_failures.clone(),
        );
        let cold_storage_bytes = Family::<DirectionLabel, Counter>::default();
        registry.register(
            "cold_storage_bytes",
            "Bytes to (up) and from (down) S3",
            cold_storage_bytes.clone(),
        );
        let mut gauge = |name: &str, help: &str| {
            let gauge = Gauge::default();
            registry.register(name, help, gauge.clone());
            gauge
        };
        let resident_apps = gauge("resident_apps", "Apps resident on this worker");
        let held_apps = gauge(
            "held_apps",
            "Swapped-out apps whose sockets this worker holds",
        );
        let resident_memory_bytes = gauge(
            "resident_memory_bytes",
            "Resident memory of this worker's apps",
        );
        let spare_vmms = gauge(
            "spare_vmms",
            "Spare VMMs waiting in the warm pool, their VMs made",
        );
        Self {
            swap_ins,
            swap_in_seconds,
            starts,
            start_seconds,
            start_failures,
            swap_outs,
            swap_out_seconds,
            swap_out_failures,
            upload_seconds,
            upload_failures,
            cold_storage_bytes,
            resident_apps,
            held_apps,
            resident_memory_bytes,
            warm_starts,
            spare_vmms,
            traffic_update: Default::default(),
            registry,
        }
    }
}

impl WorkerMetrics {
    /// Records a start's or a restore's outcome.
    pub fn started(&self, restore: bool, took: Duration, ok: bool) {
        match (ok, restore) {
            (true, true) => {
                self.swap_ins.inc();
                self.swap_in_seconds.observe(took.as_secs_f64());
            }
            (true, false) => {
                self.starts.inc();
                self.start_seconds.observe(took.as_secs_f64());
            }
            (false, _) => {
                self.start_failures
                    .get_or_create(&KindLabel::of(restore))
                    .inc();
            }
        }
    }

    /// Brings the cold-storage byte counters up to `up` and `down` in all.
    pub fn cold_storage_traffic(&self, up: u64, down: u64) {
        let _one_at_a_time = self
            .traffic_update
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for (direction, total) in [("up", up), ("down", down)] {
            let counter = self
                .cold_storage_bytes
                .get_or_create(&DirectionLabel { direction });
            counter.inc_by(total.saturating_sub(counter.get()));
        }
    }

    /// The text to serve.
    pub fn render(&self) -> String {
        render(&self.registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hub_s_metrics_render_with_their_labels() {
        let metrics = HubMetrics::default();
        metrics.dns_query("address");
        metrics.dns_query("address");
        metrics.dns_query("nxdomain");
        metrics.start_order(true, Duration::from_millis(3), true);
        metrics.start_order(false, Duration::from_millis(3), false);
        let text = metrics.render();
        assert!(
            text.contains("picocenter_hub_dns_queries_total{answer=\"address\"} 2"),
            "{text}"
        );
        assert!(text.contains("picocenter_hub_dns_queries_total{answer=\"nxdomain\"} 1"));
        assert!(text.contains("picocenter_hub_start_seconds_count{kind=\"restore\"} 1"));
        assert!(text.contains("picocenter_hub_start_failures_total{kind=\"fresh\"} 1"));
        assert!(text.contains("# TYPE picocenter_hub_start_seconds histogram"));
    }

    #[test]
    fn cold_storage_traffic_follows_the_connection_s_totals() {
        let metrics = WorkerMetrics::default();
        metrics.cold_storage_traffic(100, 5);
        metrics.cold_storage_traffic(250, 5);
        let text = metrics.render();
        assert!(
            text.contains("picocenter_worker_cold_storage_bytes_total{direction=\"up\"} 250"),
            "{text}"
        );
        assert!(text.contains("picocenter_worker_cold_storage_bytes_total{direction=\"down\"} 5"));
    }
}
