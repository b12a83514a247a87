//! Memory as a kernel would provide it, and faults reported as segmentation faults.

mod common;

use common::*;

fn memory_program() -> String {
    guest("memory", Link::Static).to_str().unwrap().to_string()
}

#[test]
fn mmap_munmap_mprotect_mremap_madvise_brk_work() {
    let out = run(&[&memory_program(), "ok"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(stdout(&out).contains("PASSED"), "{}", describe(&out));
}

#[test]
fn dynamic_build_of_the_memory_checks_passes_too() {
    let program = guest("memory", Link::Dynamic);
    let out = run(&[program.to_str().unwrap(), "ok"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
}

/// A program kept under /tmp (the default writable directory, which would hide it) stays
/// visible at its own path, so argv[0] and `open(argv[0])` agree, as they do natively.
#[test]
fn a_program_under_the_writable_tmp_runs_from_its_own_path() {
    for link in [Link::Static, Link::Dynamic] {
        let dir = tempfile::Builder::new()
            .prefix("picocenter-test-")
            .tempdir_in("/tmp")
            .unwrap();
        let program = dir.path().join("memory-checks");
        std::fs::copy(guest("memory", link), &program).unwrap();
        let out = run(&[program.to_str().unwrap(), "ok"]);
        assert_eq!(out.status.code(), Some(0), "{link:?}: {}", describe(&out));
        assert!(stdout(&out).contains("PASSED"), "{}", describe(&out));
    }
}

/// MAP_POPULATE beyond the free memory succeeds as on Linux and leaves nothing behind:
/// it used to fail with ENOMEM and keep the area and the frames it had populated.
#[test]
fn populating_beyond_the_free_memory_fails_nothing_and_keeps_nothing() {
    let out = run(&["--memory", "32", &memory_program(), "populate-beyond"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(stdout(&out).contains("PASSED"), "{}", describe(&out));
}

fn assert_segfault(mode: &str, expect: &str) {
    let out = run(&[&memory_program(), mode]);
    assert_eq!(out.status.code(), Some(139), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("segmentation fault") && stderr.contains(expect),
        "{}",
        describe(&out)
    );
}

#[test]
fn touching_an_unmapped_page_is_a_segfault() {
    assert_segfault("munmap-touch", "read at 0x");
}

#[test]
fn writing_a_read_only_page_is_a_segfault() {
    let out = run(&[&memory_program(), "mprotect-write"]);
    // The read before the write succeeded.
    assert!(
        stdout(&out).contains("read after mprotect: 1"),
        "{}",
        describe(&out)
    );
    assert_segfault("mprotect-write", "write at 0x");
}

#[test]
fn the_guard_page_stops_a_runaway_stack() {
    assert_segfault("stack-overflow", "write at 0x7fff");
}

#[test]
fn a_null_dereference_is_a_segfault() {
    assert_segfault("null", "read at 0x0 (address not mapped)");
}
