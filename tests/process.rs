//! Process basics of a single-threaded program.

mod common;

use common::*;

#[test]
fn process_basics_work() {
    for link in [Link::Static, Link::Dynamic] {
        let program = guest("process", link);
        let out = run(&[program.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(0), "{link:?}: {}", describe(&out));
        assert!(stdout(&out).contains("PASSED"), "{}", describe(&out));
    }
}
