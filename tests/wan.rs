//! The wide-area link of tests/common/wan.rs does what the swap-in tests and benchmarks
//! rely on (issue #14): it adds its round trip, paces each connection to its bandwidth,
//! and admits only so many connections at once.

mod common;

use common::wan::{LinkShape, WanLink};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A server that answers each connection's first byte with `size` bytes, then closes.
fn bulk_server(size: usize) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || {
                let mut one = [0u8; 1];
                if stream.read_exact(&mut one).is_ok() {
                    let _ = stream.write_all(&vec![7u8; size]);
                }
            });
        }
    });
    address
}

/// Milliseconds from connecting to `address` to the first byte and to the last, and the
/// bytes received.
fn fetch(address: std::net::SocketAddr) -> (f64, f64, usize) {
    let started = Instant::now();
    let mut stream = TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream.write_all(b"?").unwrap();
    let mut first = [0u8; 1];
    stream.read_exact(&mut first).unwrap();
    let first_ms = started.elapsed().as_secs_f64() * 1e3;
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).unwrap();
    (
        first_ms,
        started.elapsed().as_secs_f64() * 1e3,
        rest.len() + 1,
    )
}

#[test]
fn the_link_adds_its_round_trip_and_paces_each_connection() {
    let server = bulk_server(5_000_000);
    let link = WanLink::start(
        server,
        LinkShape {
            rtt: Duration::from_millis(40),
            bytes_per_second: 25_000_000,
            max_connections: 16,
        },
    );
    let (first_ms, last_ms, bytes) = fetch(link.address);
    assert_eq!(bytes, 5_000_000);
    // A handshake, then the request one way and the answer back: two round trips.
    assert!(first_ms >= 80.0, "first byte after {first_ms:.1} ms");
    // 5 MB at 25 MB/s: 200 ms on the wire.
    assert!(last_ms >= 80.0 + 190.0, "last byte after {last_ms:.1} ms");
    assert!(link.downloaded.load(Ordering::SeqCst) >= 5_000_000);
}

#[test]
fn connections_beyond_the_limit_wait_for_one_to_end() {
    let server = bulk_server(1_000_000);
    let link = WanLink::start(
        server,
        LinkShape {
            rtt: Duration::from_millis(10),
            // Each fetch takes ~200 ms on the wire.
            bytes_per_second: 5_000_000,
            max_connections: 2,
        },
    );
    let started = Instant::now();
    let fetches: Vec<_> = (0..4)
        .map(|_| {
            let address = link.address;
            std::thread::spawn(move || {
                let (_, last_ms, bytes) = fetch(address);
                assert_eq!(bytes, 1_000_000);
                last_ms
            })
        })
        .collect();
    let mut done: Vec<f64> = fetches.into_iter().map(|f| f.join().unwrap()).collect();
    done.sort_by(|a, b| a.total_cmp(b));
    let total = started.elapsed().as_secs_f64() * 1e3;
    // Two at a time: the last two finish a whole fetch after the first two.
    assert!(done[3] >= done[0] + 150.0, "{done:?}");
    assert!(
        total >= 390.0,
        "four fetches two at a time took {total:.0} ms"
    );
}

/// An HTTP server that answers every request with `body`, delimited only by closing its
/// connection (as moto does with `Connection: close`), and counts its connections.
fn closing_http_server(body: &'static str) -> (std::net::SocketAddr, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicU64::new(0));
    let counter = accepted.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            counter.fetch_add(1, Ordering::SeqCst);
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut length = 0;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = value.trim().parse().unwrap();
                    }
                    if line == "\r\n" {
                        break;
                    }
                }
                let mut request_body = vec![0u8; length];
                reader.read_exact(&mut request_body).unwrap();
                let mut stream = stream;
                let _ = write!(
                    stream,
                    "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{body}:{}",
                    request_body.len()
                );
            });
        }
    });
    (address, accepted)
}

/// Sends one request with a body of `body_len` bytes on `stream` and reads its response,
/// which the link delimits by Content-Length.
fn request(reader: &mut BufReader<TcpStream>, body_len: usize) -> String {
    let stream = reader.get_mut();
    write!(
        stream,
        "PUT /x HTTP/1.1\r\nHost: s3\r\nContent-Length: {body_len}\r\n\r\n"
    )
    .unwrap();
    stream.write_all(&vec![1u8; body_len]).unwrap();
    let mut length = None;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let lower = line.to_ascii_lowercase();
        if let Some(value) = lower.strip_prefix("content-length:") {
            length = Some(value.trim().parse::<usize>().unwrap());
        }
        assert!(!lower.starts_with("connection: close"), "{line}");
        if line == "\r\n" {
            break;
        }
    }
    let mut body = vec![0u8; length.expect("a Content-Length")];
    reader.read_exact(&mut body).unwrap();
    String::from_utf8(body).unwrap()
}

#[test]
fn an_http_link_keeps_the_clients_connection_alive_for_a_server_that_closes_it() {
    let (server, accepted) = closing_http_server("hello");
    let rtt = Duration::from_millis(40);
    let link = WanLink::start_http(
        server,
        LinkShape {
            rtt,
            ..LinkShape::default()
        },
    );
    let stream = TcpStream::connect(link.address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut reader = BufReader::new(stream);
    let started = Instant::now();
    assert_eq!(request(&mut reader, 3), "hello:3");
    let first = started.elapsed();
    let started = Instant::now();
    assert_eq!(request(&mut reader, 100_000), "hello:100000");
    let second = started.elapsed();
    // The first pays for the handshake too; the second is one round trip on the open
    // connection.
    assert!(first >= 2 * rtt, "first after {first:?}");
    assert!(second >= rtt && second < 2 * rtt, "second after {second:?}");
    assert_eq!(link.connections.load(Ordering::SeqCst), 1);
    // Each request reached the server on a connection of its own.
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}
