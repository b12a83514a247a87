//! The wide-area link of tests/common/wan.rs does what the swap-in tests and benchmarks
//! rely on (issue #14): it adds its round trip, paces each connection to its bandwidth,
//! and admits only so many connections at once.

mod common;

use common::wan::{LinkShape, WanLink};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
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
    assert!(link.downloaded.load(std::sync::atomic::Ordering::SeqCst) >= 5_000_000);
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
