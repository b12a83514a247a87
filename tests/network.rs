//! Forwarded networking inside one picoprocess: TCP, UDP and AF_UNIX through the per-app
//! address, epoll, eventfd, timerfd and select.

mod common;

use common::*;

#[test]
fn sockets_work_behind_the_apps_address() {
    let program = guest("net", Link::Static);
    let out = run(&[
        "--address",
        "127.0.0.13",
        "--timeout",
        "30",
        program.to_str().unwrap(),
        "127.0.0.13",
        "127.0.0.14",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(stdout(&out).contains("PASSED"), "{}", describe(&out));
}

#[test]
fn dynamic_build_works_too() {
    let program = guest("net", Link::Dynamic);
    let out = run(&[
        "--address",
        "127.0.0.15",
        program.to_str().unwrap(),
        "127.0.0.15",
        "127.0.0.16",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
}

/// 127.0.0.1 inside an app is the app's own and private: its sockets there take the app's
/// own connections and datagrams, while a client from outside (here the host, at the
/// app's address and that port) gets nothing through.
#[test]
fn localhost_sockets_take_only_the_apps_own_traffic() {
    use std::io::{BufRead, Read, Write};
    let program = guest("localhost", Link::Static);
    let mut app = picocenter()
        .args(["run", "--address", "127.0.0.17", "--timeout", "30"])
        .arg(&program)
        .arg("2")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(app.stdout.take().unwrap());
    let mut first = String::new();
    lines.read_line(&mut first).unwrap();
    let port: u16 = first
        .trim()
        .strip_prefix("port ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("the app said {first:?}"));
    let address = std::net::SocketAddr::from(([127, 0, 0, 17], port));
    // The connection may be made by the host kernel, but the app never takes it: it is
    // closed unseen, so the client reads end of file or a reset, never an answer.
    if let Ok(mut stream) = std::net::TcpStream::connect(address) {
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let _ = stream.write_all(b"hello");
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        assert!(answer.is_empty());
    }
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.send_to(b"hello", address).unwrap();
    let mut rest = String::new();
    lines.read_to_string(&mut rest).unwrap();
    let status = app.wait().unwrap();
    assert!(rest.contains("outsiders=0"), "{first}{rest}");
    assert!(status.success() && rest.contains("PASSED"), "{first}{rest}");
}
