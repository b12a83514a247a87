//! The hardware-KVM branches of the VMM, run for real on a machine that only has kvm_pvm.
//!
//! QEMU emulates an AMD CPU with SVM in software (TCG). A Debian cloud kernel booted that
//! way loads kvm_amd and offers a hardware-style /dev/kvm, where `syscall` enters the
//! doorbell at CPL 0 and removed mappings need a guest TLB flush. This test packs the VMM,
//! busybox, test programs and the kvm modules into an initramfs, boots it, and reads the
//! verdict of the suite in tests/hwkvm/ from the serial log (QEMU's exit status says
//! nothing about it). See README.md, "Hardware KVM in CI".

mod common;

#[path = "hwkvm/runner.rs"]
mod runner;

use common::*;
use runner::Initramfs;
use std::path::Path;
use std::time::{Duration, Instant};

/// The checks tests/hwkvm/suite.sh reports with nested paging, each of which must pass.
const CHECKS: &[&str] = &[
    "kvm-amd-loaded",
    "platform-is-hardware-kvm",
    "static-hello",
    "syscall-loop-exits",
    "munmap-touch-faults",
    "mprotect-write-faults",
    "memory-checks",
    "threads",
    "threads-unmap-across",
    "threads-vcpus",
    "threads-unmap-across-vcpus",
    "hostile-bad-pointers",
    "guest-reads",
    "hostile-ud2",
    "signals",
    "signal-storm",
    "busybox-echo",
    "busybox-sh-exit-3",
    "fork-exec-wait",
    "shell-pipeline",
    "dynamic-workload",
    "syscall-loop-mailbox",
    "threads-own-calls-vcpus",
    "snapshot-from-kvm-pvm",
    "snapshot-restore-on-hardware-kvm",
];

/// The checks it repeats with shadow paging (kvm_amd npt=0), named with "-shadow".
const SHADOW_CHECKS: &[&str] = &[
    "kvm-amd-loaded",
    "platform-is-hardware-kvm",
    "static-hello",
    "syscall-loop-exits",
    "munmap-touch-faults",
    "mprotect-write-faults",
    "memory-checks",
    "threads",
    "threads-unmap-across",
    "threads-vcpus",
    "threads-unmap-across-vcpus",
    "hostile-bad-pointers",
    "guest-reads",
];

/// The address counter-http has on the host and in the guest (127.0.7.x are the snapshot
/// tests').
const COUNTER_IP: &str = "127.0.9.1";

/// Runs counter-http here (kvm_pvm), answers one request (count=1), snapshots and stops it,
/// and packs the snapshot and the image's root into the initramfs at /snap and
/// /srv/counter-http; tests/hwkvm/snapshot.sh restores it in the guest.
fn snapshot_counter_http(work: &Path, initramfs: &mut Initramfs) {
    let server = Server::start("counter-http", "hwkvm-counter", COUNTER_IP, 80, &[]);
    let answer = http(server.address, "GET", "/", b"");
    assert_eq!(String::from_utf8_lossy(&answer.body).trim(), "count=1");
    let dir = work.join("snapshot");
    let _ = std::fs::remove_dir_all(&dir);
    let mut cmd = picocenter();
    cmd.args(["snapshot", "create", "hwkvm-counter", "--stop", "-o"])
        .arg(&dir);
    let out = run_with_limit(&mut cmd, Duration::from_secs(60));
    assert!(out.status.success(), "snapshot create: {}", describe(&out));
    let stopped = server.stop_waiting();
    assert_eq!(stopped.status.code(), Some(0), "{}", describe(&stopped));
    initramfs.tree(&dir, "snap");
    // The cluster key it is authenticated with (0600, which the copy keeps).
    initramfs.file(
        &picocenter_snapshots::key::default_path(&state_dir()),
        "snap.key",
    );
    initramfs.tree(
        &state_dir().join("images/counter-http/rootfs"),
        "srv/counter-http",
    );
}

/// How long the whole guest may take before QEMU is killed.
const GUEST_LIMIT: Duration = Duration::from_secs(300);

#[test]
fn the_vmm_passes_its_smoke_suite_on_hardware_kvm_in_an_svm_guest() {
    let started = Instant::now();
    runner::require_tools();
    let work = runner::work_dir();
    let _lock = runner::lock(&work);
    let kernel = runner::kernel(&work);
    let vmm = runner::vmm();
    let prepared = started.elapsed();

    let mut initramfs = Initramfs::new(&work.join("initramfs"));
    initramfs.script("init", "tests/hwkvm/init.sh");
    initramfs.script("suite.sh", "tests/hwkvm/suite.sh");
    initramfs.script("snapshot.sh", "tests/hwkvm/snapshot.sh");
    initramfs.file(Path::new("/bin/busybox"), "bin/busybox");
    initramfs.program(&vmm, "bin/picocenter");
    initramfs.strip_debug("bin/picocenter");
    for module in &kernel.modules {
        initramfs.file(module, &format!("modules/{}", runner::file_name(module)));
    }
    for (name, link) in [
        ("hello", Link::Static),
        ("memory", Link::Static),
        ("threads", Link::Static),
        ("hostile", Link::Static),
        ("fork", Link::Static),
        ("signals", Link::Static),
        ("storm", Link::Static),
        ("syscall_loop", Link::Static),
        ("syscall_bench", Link::Static),
        ("guest_reads", Link::Static),
        ("workload", Link::Dynamic),
    ] {
        let binary = guest(name, link);
        initramfs.program(&binary, &format!("guests/{}", runner::file_name(&binary)));
    }
    // What the workload prints natively is what it must print in the picoprocess.
    let workload = guest("workload", Link::Dynamic);
    let scratch = tempfile::tempdir().unwrap();
    let native = std::process::Command::new(&workload)
        .arg(scratch.path().join("workload.txt"))
        .output()
        .expect("running the workload natively");
    assert!(native.status.success(), "the native workload failed");
    initramfs.contents("expected/workload.txt", &native.stdout);
    // Likewise the reads answered in the guest (of the program's own file).
    let reads = guest("guest_reads", Link::Static);
    let native = std::process::Command::new(&reads)
        .arg(&reads)
        .output()
        .expect("running guest_reads natively");
    assert!(native.status.success(), "guest_reads failed natively");
    initramfs.contents("expected/guest_reads.txt", &native.stdout);
    snapshot_counter_http(&work, &mut initramfs);
    let image = initramfs.pack(&work.join("initrd.cpio"));
    let packed = started.elapsed();

    let serial = work.join("serial.log");
    let booted = Instant::now();
    let log = runner::boot(&kernel.vmlinuz, &image, &serial, GUEST_LIMIT);
    let shadow: Vec<String> = SHADOW_CHECKS
        .iter()
        .map(|c| format!("{c}-shadow"))
        .collect();
    let all: Vec<&str> = CHECKS
        .iter()
        .copied()
        .chain(shadow.iter().map(String::as_str))
        .collect();
    let verdict = runner::verdict(&log, &all);
    eprintln!(
        "hwkvm: prepared in {:.1} s, initramfs packed in {:.1} s, guest ran {:.1} s; {}",
        prepared.as_secs_f64(),
        (packed - prepared).as_secs_f64(),
        booted.elapsed().as_secs_f64(),
        runner::infos(&log).join(", ")
    );
    if let Err(why) = verdict {
        panic!(
            "the hardware-KVM smoke suite failed: {why}\n\
             full serial log: {}\n--- last lines ---\n{}",
            serial.display(),
            runner::tail(&log, 60)
        );
    }
}
