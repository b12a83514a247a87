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
//!
//! [`WanLink::start_http`] also keeps HTTP/1.1 connections alive at the far end, as a real
//! object store's front end does, for a test server that closes its connection after every
//! response (moto does): each request a client sends on its connection goes to the server
//! on a connection of its own, on the server's side of the link, so only the client's first
//! request pays for a handshake over the link.

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
        Self::start_with(server, shape, Far::Tcp)
    }

    /// A link shaped as `shape` to the HTTP server at `server`, with connections kept
    /// alive at the link's far end (see the module's documentation).
    pub fn start_http(server: SocketAddr, shape: LinkShape) -> WanLink {
        Self::start_with(server, shape, Far::HttpKeepAlive)
    }

    fn start_with(server: SocketAddr, shape: LinkShape, far: Far) -> WanLink {
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
                    carry(client, server, shape, far, down);
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

/// What is at the far end of the link.
#[derive(Debug, Clone, Copy)]
enum Far {
    /// The server itself: each client connection is one server connection.
    Tcp,
    /// An HTTP/1.1 front that keeps the client's connection alive and sends each request
    /// to the server on a connection of its own.
    HttpKeepAlive,
}

/// Carries one client connection to the server and back, shaped, until either side
/// closes. Connection threads end with their connection.
fn carry(
    client: TcpStream,
    server: SocketAddr,
    shape: LinkShape,
    far: Far,
    downloaded: Arc<AtomicU64>,
) {
    let _ = client.set_nodelay(true);
    // The handshake's round trip.
    std::thread::sleep(shape.rtt);
    let upstream = match far {
        Far::Tcp => TcpStream::connect(server),
        Far::HttpKeepAlive => http_front(server),
    };
    let Ok(upstream) = upstream else {
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

/// How far a connection may get ahead of its bandwidth before its pump sleeps.
const PACING_SLACK: Duration = Duration::from_millis(1);

/// Copies `from` to `to`, each chunk delayed by half the round trip and paced to the
/// bandwidth; closes `to`'s sending side when `from` ends.
fn pump(mut from: TcpStream, to: TcpStream, shape: LinkShape, counter: Option<Arc<AtomicU64>>) {
    let one_way = shape.rtt / 2;
    let (send, receive) = mpsc::channel::<(Instant, Vec<u8>)>();
    let mut writer_end = to;
    let writer = std::thread::spawn(move || {
        let mut busy_until = Instant::now();
        for (due, chunk) in receive {
            // The same slack for the delay: a chunk due within it goes at once.
            let early = due.saturating_duration_since(Instant::now());
            if early > PACING_SLACK {
                std::thread::sleep(early);
            }
            // Paced: a chunk takes len / bandwidth on the wire, after the one before.
            let wire = Duration::from_secs_f64(chunk.len() as f64 / shape.bytes_per_second as f64);
            busy_until = busy_until.max(Instant::now()) + wire;
            // Sleeping for each chunk's own wire time (82 us for 4 KiB at 50 MB/s, and
            // S3 servers write that small) overshoots by about as much again, which
            // halved the rate: a chunk goes out at once unless the connection is more
            // than PACING_SLACK ahead of its rate, so bursts stay under a millisecond's
            // worth of bytes and the rate is the shape's.
            let ahead = busy_until.saturating_duration_since(Instant::now());
            if ahead > PACING_SLACK {
                std::thread::sleep(ahead);
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

/// Starts a keep-alive HTTP front for `server` and returns the link's end of a loopback
/// connection to it.
fn http_front(server: SocketAddr) -> std::io::Result<TcpStream> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let near = TcpStream::connect(listener.local_addr()?)?;
    let (front, _) = listener.accept()?;
    let _ = near.set_nodelay(true);
    let _ = front.set_nodelay(true);
    std::thread::spawn(move || {
        let _ = serve_keep_alive(front, server);
    });
    Ok(near)
}

/// Reads HTTP/1.1 requests from `front` one after another, sends each to `server` on a new
/// connection, and writes the response back, made keep-alive, until `front` closes.
fn serve_keep_alive(front: TcpStream, server: SocketAddr) -> std::io::Result<()> {
    let mut reader = std::io::BufReader::new(front.try_clone()?);
    let mut writer = front;
    while let Some(head) = read_head(&mut reader)? {
        let method = head.split(' ').next().unwrap_or("").to_string();
        let expects_continue =
            header(&head, "expect").is_some_and(|value| value.eq_ignore_ascii_case("100-continue"));
        if expects_continue {
            writer.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        }
        let body = read_body(&mut reader, &head)?;
        let mut request = without_headers(&head, &["connection", "expect"]);
        request.push_str("Connection: close\r\n\r\n");
        let mut upstream = TcpStream::connect(server)?;
        let _ = upstream.set_nodelay(true);
        let mut message = request.into_bytes();
        message.extend_from_slice(&body);
        upstream.write_all(&message)?;
        let mut response = Vec::new();
        upstream.read_to_end(&mut response)?;
        writer.write_all(&keep_alive(&response, &method))?;
    }
    let _ = writer.shutdown(Shutdown::Write);
    Ok(())
}

/// A message's head, up to and including its blank line; `None` at a clean end.
fn read_head(reader: &mut impl std::io::BufRead) -> std::io::Result<Option<String>> {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return if head.is_empty() {
                Ok(None)
            } else {
                Err(std::io::ErrorKind::UnexpectedEof.into())
            };
        }
        head.push_str(&line);
        if line == "\r\n" || line == "\n" {
            return Ok(Some(head));
        }
    }
}

/// The value of header `name` in `head`.
fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.trim()
            .eq_ignore_ascii_case(name)
            .then_some(value.trim())
    })
}

/// `head` without its blank line and without the headers in `names`.
fn without_headers(head: &str, names: &[&str]) -> String {
    let mut kept = String::new();
    for line in head.split_inclusive('\n') {
        if line.trim().is_empty() {
            continue;
        }
        let named = line
            .split_once(':')
            .is_some_and(|(key, _)| names.iter().any(|n| key.trim().eq_ignore_ascii_case(n)));
        if !named {
            kept.push_str(line);
        }
    }
    kept
}

/// A request's body, by its Content-Length or its chunked encoding (kept encoded).
fn read_body(reader: &mut impl std::io::BufRead, head: &str) -> std::io::Result<Vec<u8>> {
    let chunked = header(head, "transfer-encoding")
        .is_some_and(|value| value.to_ascii_lowercase().contains("chunked"));
    if !chunked {
        let length: usize = header(head, "content-length")
            .and_then(|value| value.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0u8; length];
        reader.read_exact(&mut body)?;
        return Ok(body);
    }
    let mut body = Vec::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        body.extend_from_slice(line.as_bytes());
        let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
            .map_err(|_| std::io::Error::other("a bad chunk size"))?;
        if size == 0 {
            // Trailers, up to the blank line.
            loop {
                let mut trailer = String::new();
                if reader.read_line(&mut trailer)? == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                body.extend_from_slice(trailer.as_bytes());
                if trailer.trim().is_empty() {
                    return Ok(body);
                }
            }
        }
        let mut chunk = vec![0u8; size + 2];
        reader.read_exact(&mut chunk)?;
        body.extend_from_slice(&chunk);
    }
}

/// A whole response from a server that closed after it, made keep-alive: its Connection
/// header replaced and, when it was delimited only by the close, a Content-Length added.
fn keep_alive(response: &[u8], method: &str) -> Vec<u8> {
    let Some(end) = response.windows(4).position(|w| w == b"\r\n\r\n") else {
        return response.to_vec();
    };
    let head = String::from_utf8_lossy(&response[..end + 4]).into_owned();
    let body = &response[end + 4..];
    let mut fixed = without_headers(&head, &["connection"]);
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let bodiless = method == "HEAD" || status == 204 || status == 304 || status < 200;
    let delimited =
        header(&head, "content-length").is_some() || header(&head, "transfer-encoding").is_some();
    if !bodiless && !delimited {
        fixed.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    fixed.push_str("Connection: keep-alive\r\n\r\n");
    let mut out = fixed.into_bytes();
    out.extend_from_slice(body);
    out
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
