//! The hub's authoritative DNS server for the apps' zone (hickory-server, UDP and TCP).
//!
//! | query | answer |
//! |---|---|
//! | `A app.<zone>`, app resident | its address, TTL `ttl` |
//! | `A app.<zone>`, app swapped out, its address held by a live worker | that address at once, while the app is brought back there |
//! | `A app.<zone>`, app swapped out, not held | after the app's sockets are bound on a worker |
//! | `A app.<zone>`, start failed or timed out | SERVFAIL |
//! | `AAAA app.<zone>` (and other types) | NOERROR, no records, SOA in authority |
//! | unknown name in the zone | NXDOMAIN, SOA in authority |
//! | `SOA <zone>` | the zone's SOA, naming `ns.<zone>` |
//! | `NS <zone>` | `ns-<id>.<zone>` for each hub serving the registry (one, or several on etcd) |
//! | `A ns-<id>.<zone>` | that hub's DNS address |
//! | `A ns.<zone>` | the answering hub's DNS address |
//! | a name outside the zone | REFUSED |
//!
//! Malformed packets never reach this handler: hickory answers FORMERR or drops them.

use crate::hub::{Hub, Resolution};
use hickory_proto::op::{Metadata, ResponseCode};
use hickory_proto::rr::rdata::{A, NS, SOA};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use hickory_server::net::runtime::Time;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use hickory_server::Server;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

/// The zone and what the server says about itself.
#[derive(Debug, Clone)]
pub struct Zone {
    /// The zone's apex, e.g. `pico.local.`.
    pub apex: Name,
    /// TTL of app answers, seconds (short: an app moves when it is swapped).
    pub ttl: u32,
    /// The address `ns.<zone>` answers.
    pub ns_address: Ipv4Addr,
}

/// The DNS request handler.
#[derive(Debug, Clone)]
pub struct DnsHandler {
    hub: Arc<Hub>,
    zone: Zone,
    soa: Record,
    ns: Record,
}

impl DnsHandler {
    /// A handler answering for `zone` from `hub`.
    pub fn new(hub: Arc<Hub>, zone: Zone) -> Self {
        let ns_name = Name::from_ascii("ns")
            .and_then(|n| n.append_domain(&zone.apex))
            .unwrap_or_else(|_| zone.apex.clone());
        let hostmaster = Name::from_ascii("hostmaster")
            .and_then(|n| n.append_domain(&zone.apex))
            .unwrap_or_else(|_| zone.apex.clone());
        let soa = Record::from_rdata(
            zone.apex.clone(),
            zone.ttl,
            RData::SOA(SOA::new(
                ns_name.clone(),
                hostmaster,
                1,
                3600,
                600,
                86400,
                zone.ttl,
            )),
        );
        let ns = Record::from_rdata(zone.apex.clone(), 3600, RData::NS(NS(ns_name)));
        Self { hub, zone, soa, ns }
    }

    /// The hubs serving the zone: each one's label (`ns-<id>`, its id made a DNS label)
    /// and DNS address.
    fn name_servers(&self) -> Vec<(String, Ipv4Addr)> {
        self.hub
            .hubs()
            .into_iter()
            .filter_map(|hub| match hub.dns.ip() {
                // (A hub that does not serve DNS yet has no address.)
                std::net::IpAddr::V4(address) if !address.is_unspecified() => {
                    Some((name_server_label(&hub.id), address))
                }
                _ => None,
            })
            .collect()
    }

    /// The zone's NS records: every hub serving it (this hub's own if none is known).
    fn name_server_records(&self) -> Vec<Record> {
        let records: Vec<Record> = self
            .name_servers()
            .into_iter()
            .filter_map(|(label, _)| {
                let name = Name::from_ascii(&label)
                    .and_then(|n| n.append_domain(&self.zone.apex))
                    .ok()?;
                Some(Record::from_rdata(
                    self.zone.apex.clone(),
                    3600,
                    RData::NS(NS(name)),
                ))
            })
            .collect();
        if records.is_empty() {
            vec![self.ns.clone()]
        } else {
            records
        }
    }

    /// What to answer for one question: code, answers, whether to add the SOA.
    async fn answer(&self, name: &Name, kind: RecordType) -> (ResponseCode, Vec<Record>, bool) {
        if !self.zone.apex.zone_of(name) {
            return (ResponseCode::Refused, vec![], false);
        }
        let labels = name.num_labels() - self.zone.apex.num_labels();
        if labels == 0 {
            return match kind {
                RecordType::SOA => (ResponseCode::NoError, vec![self.soa.clone()], false),
                RecordType::NS => (ResponseCode::NoError, self.name_server_records(), false),
                _ => (ResponseCode::NoError, vec![], true),
            };
        }
        if labels != 1 {
            return (ResponseCode::NXDomain, vec![], true);
        }
        let label = name
            .iter()
            .next()
            .map(|l| String::from_utf8_lossy(l).to_ascii_lowercase())
            .unwrap_or_default();
        let name_server = if label == "ns" {
            Some(self.zone.ns_address)
        } else {
            self.name_servers()
                .into_iter()
                .find(|(ns_label, _)| *ns_label == label)
                .map(|(_, address)| address)
        };
        if let Some(address) = name_server.filter(|_| !self.hub.contains(&label)) {
            return match kind {
                RecordType::A => (ResponseCode::NoError, vec![self.a(name, address)], false),
                _ => (ResponseCode::NoError, vec![], true),
            };
        }
        if !self.hub.contains(&label) {
            return (ResponseCode::NXDomain, vec![], true);
        }
        if kind != RecordType::A {
            return (ResponseCode::NoError, vec![], true);
        }
        match self.hub.resolve(&label).await {
            Resolution::Address(address) => {
                (ResponseCode::NoError, vec![self.a(name, address)], false)
            }
            Resolution::Unknown => (ResponseCode::NXDomain, vec![], true),
            Resolution::Failed(why) => {
                tracing::warn!(app = %label, "SERVFAIL: {why}");
                (ResponseCode::ServFail, vec![], false)
            }
        }
    }

    fn a(&self, name: &Name, address: Ipv4Addr) -> Record {
        Record::from_rdata(name.clone(), self.zone.ttl, RData::A(A(address)))
    }
}

#[async_trait::async_trait]
impl RequestHandler for DnsHandler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let builder = MessageResponseBuilder::from_message_request(request);
        let info = match request.request_info() {
            Ok(info) => info,
            Err(_) => {
                self.hub.metrics.dns_query("formerr");
                let response = builder.error_msg(&request.metadata, ResponseCode::FormErr);
                return send(&mut response_handle, response, &request.metadata).await;
            }
        };
        let name: Name = info.query.name().clone().into();
        let (code, answers, with_soa) = self.answer(&name, info.query.query_type()).await;
        self.hub.metrics.dns_query(match code {
            ResponseCode::NoError if answers.is_empty() => "empty",
            ResponseCode::NoError => "address",
            ResponseCode::NXDomain => "nxdomain",
            ResponseCode::ServFail => "servfail",
            ResponseCode::Refused => "refused",
            _ => "other",
        });
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.authoritative = code != ResponseCode::Refused;
        metadata.response_code = code;
        let soa: Vec<&Record> = if with_soa { vec![&self.soa] } else { vec![] };
        let response = builder.build(metadata, answers.iter(), [], soa, []);
        send(&mut response_handle, response, &request.metadata).await
    }
}

/// `ns-<id>` with `id` lowercased, every character but letters, digits and `-` made
/// `-`, and cut to a DNS label's 63 bytes.
fn name_server_label(id: &str) -> String {
    let mut label = String::from("ns-");
    label.extend(id.chars().map(|c| match c.to_ascii_lowercase() {
        c @ ('a'..='z' | '0'..='9' | '-') => c,
        _ => '-',
    }));
    label.truncate(63);
    label
}

async fn send<'a, R: ResponseHandler>(
    handle: &mut R,
    response: hickory_server::zone_handler::MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
    >,
    request: &Metadata,
) -> ResponseInfo {
    match handle.send_response(response).await {
        Ok(info) => info,
        Err(e) => {
            tracing::debug!("DNS answer not sent: {e}");
            let mut metadata = Metadata::response_from_request(request);
            metadata.response_code = ResponseCode::ServFail;
            hickory_proto::op::Header {
                metadata,
                counts: Default::default(),
            }
            .into()
        }
    }
}

/// Serves `handler` over UDP and TCP on `address` until the returned server is shut down.
pub async fn serve(
    handler: DnsHandler,
    address: SocketAddr,
) -> std::io::Result<(Server<DnsHandler>, SocketAddr)> {
    let (udp, tcp, bound) = bind_udp_and_tcp(address).await?;
    let mut server = Server::new(handler);
    server.register_socket(udp);
    server.register_listener(tcp, Duration::from_secs(10), 64 * 1024);
    Ok((server, bound))
}

/// Binds UDP and TCP on the same port. With port 0 the kernel picks the UDP port, and
/// another socket may already hold that number for TCP: then both are tried again on a
/// new port (a bounded number of times).
async fn bind_udp_and_tcp(
    address: SocketAddr,
) -> std::io::Result<(tokio::net::UdpSocket, tokio::net::TcpListener, SocketAddr)> {
    const ATTEMPTS: usize = 64;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let udp = tokio::net::UdpSocket::bind(address).await?;
        let bound = udp.local_addr()?;
        match tokio::net::TcpListener::bind(bound).await {
            Ok(tcp) => return Ok((udp, tcp, bound)),
            Err(e)
                if address.port() == 0
                    && e.kind() == std::io::ErrorKind::AddrInUse
                    && attempt < ATTEMPTS =>
            {
                tracing::debug!(%bound, "TCP port taken; choosing another for DNS");
            }
            Err(e) => return Err(e),
        }
    }
}
