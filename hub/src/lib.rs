//! Picocenter's control plane.
//!
//! * The **hub** ([`hub`]) is the authoritative DNS server for the apps' zone ([`dns`]), the
//!   app registry ([`registry`]: redb, or etcd) and the placement of apps on workers, with an HTTP API
//!   ([`api`]) for operators and workers.
//! * Both serve Prometheus metrics ([`metrics`]).
//! * A **worker** ([`worker`]) runs apps as child VMM processes, swaps idle ones out to cold
//!   storage ([`cold`]) and brings them back when the hub orders it.
//!
//! A DNS query for a swapped-out app makes the hub order a restore and answer once the
//! app's listening sockets are bound; the kernel queues the client's connection while the
//! rest of the app comes back.

pub mod api;
pub mod client;
pub mod cold;
pub mod dns;
pub mod http;
pub mod hub;
pub mod metrics;
pub mod model;
pub mod registry;
pub mod serve;
pub mod worker;
