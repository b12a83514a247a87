//! A wide-area link on loopback, for the tests and benchmarks of swap-in from cold storage
//! (issue #14): a TCP proxy in front of a server (the S3 test server) that adds a round-trip
//! time, limits each connection's bandwidth, and admits a bounded number of connections at
//! once, as a distant object store behind a real link would. `tc netem` is not available on
//! these machines; this needs nothing but threads.
//!
//! Each direction of each connection is a reader thread that timestamps what it reads and a
//! writer thread that sends it on no earlier than half the round trip later, no faster than
//! the bandwidth allows. Opening a connection costs one round trip (the handshake) before
//! the first byte goes through. Connections beyond the limit wait in the listener's backlog
//! until one ends.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// What the link is like.
#[derive(Debug, Clone, Copy)]
pub struct LinkShape {
    /// Round-trip time.
    pub rtt: Duration,
    /// Bytes per second, each connection and direction.
    pub bytes_per_second: u64,
    /// Connections open at once.
    pub max_connections: usize,
}

impl Default for LinkShape {
    /// Issue #14's defaults: 20 ms, 50 MB/s a connection, 16 connections.
    fn default() -> Self {
        Self {
            rtt: Duration::from_millis(20),
            bytes_per_second: 50_000_000,
            max_connections: 16,
        }
    }
}

/// A running link, stopped when dropped.
pub struct WanLink {
    /// Where clients connect.
    pub address: SocketAddr,
    stop: Arc<AtomicBool>,
    /// Bytes that went from the server to clients.
    pub downloaded: Arc<AtomicU64>,
    /// Connections accepted.
    pub connections: Arc<AtomicU64>,
    acceptor: Option<std::thread::JoinHandle<()>>,
}

/// Open connections, bounded.
struct Slots {
    open: Mutex<usize>,
    freed: Condvar,
    max: usize,
}

impl WanLink {
    /// A link shaped as `shape` to the server at `server`, on a free loopback port.
    pub fn start(server: SocketAddr, shape: LinkShape) -> WanLink {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let downloaded = Arc::new(AtomicU64::new(0));
        let connections = Arc::new(AtomicU64::new(0));
        let slots = Arc::new(Slots {
            open: Mutex::new(0),
            freed: Condvar::new(),
            max: shape.max_connections.max(1),
        });
        let (stop2, down2, conns2) = (stop.clone(), downloaded.clone(), connections.clone());
        let acceptor = std::thread::spawn(move || {
            while !stop2.load(Ordering::SeqCst) {
                // A free slot first: until then, new connections wait in the backlog.
                {
                    let mut open = slots.open.lock().unwrap();
                    while *open >= slots.max && !stop2.load(Ordering::SeqCst) {
                        open = slots
                            .freed
                            .wait_timeout(open, Duration::from_millis(50))
                            .unwrap()
                            .0;
                    }
                }
                if !readable(&listener, Duration::from_millis(50)) {
                    continue;
                }
                let Ok((client, _)) = listener.accept() else {
                    continue;
                };
                let _ = client.set_nonblocking(false);
                conns2.fetch_add(1, Ordering::SeqCst);
                *slots.open.lock().unwrap() += 1;
                let slots = slots.clone();
                let down = down2.clone();
                std::thread::spawn(move || {
                    carry(client, server, shape, down);
                    *slots.open.lock().unwrap() -= 1;
                    slots.freed.notify_one();
                });
            }
        });
        WanLink {
            address,
            stop,
            downloaded,
            connections,
            acceptor: Some(acceptor),
        }
    }

    /// `http://` and the link's address, for an S3 endpoint.
    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }
}

impl Drop for WanLink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

/// Carries one client connection to the server and back, shaped, until either side
/// closes. Connection threads end with their connection.
fn carry(client: TcpStream, server: SocketAddr, shape: LinkShape, downloaded: Arc<AtomicU64>) {
    let _ = client.set_nodelay(true);
    // The handshake's round trip.
    std::thread::sleep(shape.rtt);
    let Ok(upstream) = TcpStream::connect(server) else {
        return;
    };
    let _ = upstream.set_nodelay(true);
    let (Ok(client2), Ok(upstream2)) = (client.try_clone(), upstream.try_clone()) else {
        return;
    };
    let up = std::thread::spawn(move || pump(client2, upstream2, shape, None));
    pump(upstream, client, shape, Some(downloaded));
    let _ = up.join();
}

/// Copies `from` to `to`, each chunk delayed by half the round trip and paced to the
/// bandwidth; closes `to`'s sending side when `from` ends.
fn pump(mut from: TcpStream, to: TcpStream, shape: LinkShape, counter: Option<Arc<AtomicU64>>) {
    let one_way = shape.rtt / 2;
    let (send, receive) = mpsc::channel::<(Instant, Vec<u8>)>();
    let mut writer_end = to;
    let writer = std::thread::spawn(move || {
        let mut busy_until = Instant::now();
        for (due, chunk) in receive {
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            // Paced: a chunk takes len / bandwidth on the wire, after the one before.
            let wire = Duration::from_secs_f64(chunk.len() as f64 / shape.bytes_per_second as f64);
            busy_until = busy_until.max(Instant::now()) + wire;
            let now = Instant::now();
            if busy_until > now {
                std::thread::sleep(busy_until - now);
            }
            if writer_end.write_all(&chunk).is_err() {
                break;
            }
            if let Some(counter) = &counter {
                counter.fetch_add(chunk.len() as u64, Ordering::SeqCst);
            }
        }
        let _ = writer_end.shutdown(Shutdown::Write);
    });
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if send
                    .send((Instant::now() + one_way, buf[..n].to_vec()))
                    .is_err()
                {
                    break;
                }
            }
        }
    }
    drop(send);
    let _ = writer.join();
}

/// Whether `listener` has a connection waiting, waiting at most `limit`.
fn readable(listener: &TcpListener, limit: Duration) -> bool {
    use std::os::fd::AsRawFd;
    let mut fd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll reads and writes the one pollfd we pass.
    unsafe { libc::poll(&mut fd, 1, limit.as_millis() as i32) > 0 }
}
