//! What the hub, the workers and the CLI say to each other: apps, their state, usage and
//! events, and the messages of the HTTP API. Everything here is plain serde data.

use picocenter_snapshots::chain::ChainHint;
use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;

/// How an operator wants an app run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AppSpec {
    /// The app's name: a DNS label (`NAME.<zone>`).
    pub name: String,
    /// The image it runs (`picocenter image ls`).
    pub image: String,
    /// Guest memory in MiB; the image's default if absent.
    #[serde(default)]
    pub memory_mib: Option<u64>,
    /// Extra environment, `K=V`.
    #[serde(default)]
    pub env: Vec<String>,
    /// Swap the app out after this many seconds without traffic or CPU; the worker's
    /// default if absent.
    #[serde(default)]
    pub idle_after_secs: Option<f64>,
}

impl AppSpec {
    /// Checks that the name is a lower-case DNS label.
    pub fn validate(&self) -> Result<(), String> {
        let ok = !self.name.is_empty()
            && self.name.len() <= 63
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !self.name.starts_with('-')
            && !self.name.ends_with('-');
        if !ok {
            return Err(format!(
                "app name {:?} must be a DNS label: a-z, 0-9 and '-', at most 63",
                self.name
            ));
        }
        if self.image.is_empty() {
            return Err("an app needs an image".into());
        }
        if self.idle_after_secs.is_some_and(|s| s.is_nan() || s <= 0.0) {
            return Err("idle_after_secs must be positive".into());
        }
        Ok(())
    }
}

/// Where an app is in its life.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AppState {
    /// Registered, never run: the first query starts it fresh.
    New,
    /// A worker is starting or restoring it.
    Starting,
    /// Running on a worker.
    Resident,
    /// Its state is in cold storage; a query brings it back.
    SwappedOut,
    /// The last start or restore failed; the next query tries again.
    Failed,
}

impl std::fmt::Display for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AppState::New => "new",
            AppState::Starting => "starting",
            AppState::Resident => "resident",
            AppState::SwappedOut => "swapped-out",
            AppState::Failed => "failed",
        })
    }
}

/// What an app has used, for billing by use rather than by time.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct Usage {
    /// CPU seconds its VMM spent (guest and syscall handling).
    pub cpu_seconds: f64,
    /// Resident host memory integrated over time, GiB × seconds.
    pub memory_gib_seconds: f64,
    /// Bytes its snapshots hold in cold storage now: what is stored for it alone (pages it
    /// shares with its image's base are not counted).
    pub stored_bytes: u64,
    /// Bytes its snapshots' chain takes on the worker's disk: every page file whole (as
    /// a restore maps it), manifests and data archives.
    #[serde(default)]
    pub logical_bytes: u64,
    /// Times it was brought back from cold storage.
    pub swap_ins: u64,
    /// Connections it accepted.
    pub requests: u64,
}

impl Usage {
    /// Adds what a worker measured since its last report.
    /// (Saturating: a total stays a number JSON can hold.)
    pub fn add(&mut self, delta: &UsageDelta) {
        let sum = |a: f64, b: f64| (a + b).min(f64::MAX);
        self.cpu_seconds = sum(self.cpu_seconds, delta.cpu_seconds);
        self.memory_gib_seconds = sum(self.memory_gib_seconds, delta.memory_gib_seconds);
        self.requests = self.requests.saturating_add(delta.requests);
    }
}

/// Usage a worker measured for one app since its last report.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct UsageDelta {
    /// CPU seconds.
    pub cpu_seconds: f64,
    /// GiB × seconds of resident memory.
    pub memory_gib_seconds: f64,
    /// Connections accepted.
    pub requests: u64,
}

/// Something that happened to an app.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Event {
    /// Unix time, milliseconds.
    pub at_unix_ms: u64,
    /// What happened.
    pub what: String,
}

/// Everything the hub knows about an app.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AppRecord {
    /// How it should run.
    pub spec: AppSpec,
    /// Where it is.
    pub state: AppState,
    /// The worker it runs on, while resident or starting.
    pub worker: Option<String>,
    /// Which hub ordered its start, and when, while starting: the other hubs wait for
    /// that order's outcome instead of ordering another, unless that hub is gone or the
    /// order is long overdue.
    #[serde(default)]
    pub ordered_by: Option<StartOrderer>,
    /// Its address, while resident.
    pub address: Option<Ipv4Addr>,
    /// Its newest snapshot in cold storage.
    pub snapshot: Option<String>,
    /// What that snapshot's chain looks like (its ancestors, and how much of each page
    /// file a restore needs first): a restore from S3 asks for all of it in its first
    /// round trip (see `Cold::fetch_streaming`).
    #[serde(default)]
    pub chain_hint: ChainHint,
    /// When the app asked to wake by itself (a timer), Unix ms, while swapped out.
    pub wake_at_unix_ms: Option<u64>,
    /// Why the last start or restore failed.
    pub last_error: Option<String>,
    /// What it has used.
    pub usage: Usage,
    /// The latest events, oldest first.
    pub events: Vec<Event>,
}

/// The hub that ordered an app's start.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StartOrderer {
    /// The hub's id.
    pub hub: String,
    /// When it ordered it, Unix ms.
    pub at_unix_ms: u64,
}

/// Events kept per app.
pub const EVENTS_KEPT: usize = 50;

impl AppRecord {
    /// A newly registered app.
    pub fn new(spec: AppSpec) -> Self {
        let mut record = AppRecord {
            spec,
            state: AppState::New,
            worker: None,
            ordered_by: None,
            address: None,
            snapshot: None,
            chain_hint: ChainHint::default(),
            wake_at_unix_ms: None,
            last_error: None,
            usage: Usage::default(),
            events: Vec::new(),
        };
        record.event("registered");
        record
    }

    /// Records an event, keeping the latest [`EVENTS_KEPT`].
    pub fn event(&mut self, what: impl Into<String>) {
        self.events.push(Event {
            at_unix_ms: unix_ms(),
            what: what.into(),
        });
        if self.events.len() > EVENTS_KEPT {
            let extra = self.events.len() - EVENTS_KEPT;
            self.events.drain(..extra);
        }
    }
}

/// Now, in Unix milliseconds.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A worker introducing itself to the hub.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WorkerHello {
    /// Its id (unique per worker process).
    pub id: String,
    /// The base URL of its order API.
    pub url: String,
    /// Resident memory it may use for apps, bytes.
    pub memory_limit_bytes: u64,
    /// A number drawn at the worker's start: a worker that registers again with the
    /// same id and another instance was restarted, and runs none of the apps its last
    /// instance ran.
    #[serde(default)]
    pub instance: u64,
}

/// A worker's periodic report.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct WorkerReport {
    /// Whether `resident` and `held` are the whole sets (the first report after the
    /// worker registers, or after a report was lost), or only what changed since the last
    /// report.
    pub full: bool,
    /// Apps resident there, name and address: all of them, or those that became resident
    /// (or moved) since the last report.
    pub resident: Vec<(String, Ipv4Addr)>,
    /// How many apps are resident there.
    pub resident_count: usize,
    /// Usage since the last report, per app.
    pub usage: Vec<(String, UsageDelta)>,
    /// Apps it swapped out since the last report (their snapshot is in cold storage).
    pub swapped: Vec<SwappedOut>,
    /// Snapshots that reached cold storage after their app came back from the worker's
    /// local copy (traffic arrived during the upload): the app's restore point moves on,
    /// and it stays resident. Taken before `swapped`.
    pub stored: Vec<SwappedOut>,
    /// Apps that ended or failed there since the last report: name and why.
    pub ended: Vec<(String, String)>,
    /// Resident memory of its apps, bytes.
    pub memory_bytes: u64,
    /// Swapped-out apps whose address (and listening sockets) it holds, with the address:
    /// a connection there wakes the app, so the app comes back there, and the hub may
    /// answer a query with that address before the app is back. All of them, or those it
    /// began holding since the last report.
    pub held: Vec<(String, Ipv4Addr)>,
    /// Apps whose sockets it stopped holding since the last report.
    pub unheld: Vec<String>,
    /// The worker is stopping, and this is its last report: the hub forgets it at once
    /// (it holds no address any more, and runs nothing).
    pub leaving: bool,
}

/// An app a worker put into cold storage.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SwappedOut {
    /// The app.
    pub name: String,
    /// Its new newest snapshot.
    pub snapshot: String,
    /// What that snapshot's chain looks like.
    #[serde(default)]
    pub chain_hint: ChainHint,
    /// Bytes its snapshots hold in cold storage (pages shared with its image's base not
    /// counted).
    pub stored_bytes: u64,
    /// Bytes its snapshots stand for, page files whole.
    #[serde(default)]
    pub logical_bytes: u64,
    /// When it wants to wake by itself, Unix ms.
    pub wake_at_unix_ms: Option<u64>,
    /// Where it falls among the worker's swap-outs and stored snapshots: the hub applies
    /// a report's `stored` and `swapped` in this order, so a report that carries a re-sent
    /// older one beside a newer one ends at the newer.
    #[serde(default)]
    pub seq: u64,
}

/// The hub's order to a worker: run this app (from its snapshot, if it has one).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StartOrder {
    /// The app.
    pub spec: AppSpec,
    /// Its newest snapshot, or none for a fresh start.
    pub snapshot: Option<String>,
    /// What that snapshot's chain looks like, as the hub knows it: fetched with it.
    #[serde(default)]
    pub chain_hint: ChainHint,
}

/// A worker's answer to a [`StartOrder`], once the app's listening sockets are bound.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Started {
    /// The address the app listens on.
    pub address: Ipv4Addr,
    /// Milliseconds from the order to bound sockets.
    pub ms: f64,
}

/// An error answer of either API.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ApiError {
    /// What went wrong.
    pub error: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str) -> AppSpec {
        AppSpec {
            name: name.into(),
            image: "counter-http".into(),
            memory_mib: None,
            env: vec![],
            idle_after_secs: None,
        }
    }

    #[test]
    fn names_are_dns_labels() {
        assert!(spec("counter").validate().is_ok());
        assert!(spec("a-1").validate().is_ok());
        for bad in ["", "Counter", "a.b", "-a", "a-", &"x".repeat(64), "a b"] {
            assert!(spec(bad).validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn events_are_bounded() {
        let mut record = AppRecord::new(spec("a"));
        for i in 0..(EVENTS_KEPT * 2) {
            record.event(format!("e{i}"));
        }
        assert_eq!(record.events.len(), EVENTS_KEPT);
        assert_eq!(
            record.events.last().unwrap().what,
            format!("e{}", EVENTS_KEPT * 2 - 1)
        );
    }
}
