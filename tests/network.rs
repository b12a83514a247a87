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
