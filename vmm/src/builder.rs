//! Assembling a picoprocess: the steps a fresh start and a restore share.
//!
//! ```text
//! prepare ── memory, VM, CPUID, system pages, sandbox
//!   (fresh: load the program; restore: map the snapshot)
//! process ── the app's process state around the address space
//!   (fresh: stdio; restore: the snapshot's fds, signals, clocks)
//! finish ─── vCPU wrapper, control socket, mailbox poller
//! ```

use crate::kernel::process::Process;
use crate::kvm::cpu::{self, CpuFeatures};
use crate::kvm::kick::Kicker;
use crate::kvm::system;
use crate::kvm::vcpu::Vcpu;
use crate::kvm::Machine;
use crate::mailbox;
use crate::memory::layout::FIRST_CPU;
use crate::memory::phys::PhysicalMemory;
use crate::memory::AddressSpace;
use crate::platform::Platform;
use crate::sandbox::{self, Sandbox};
use crate::{alarm, control, Config, Picoprocess, VmmError};
use kvm_bindings::CpuId;
use kvm_ioctls::VcpuFd;
use picocenter_snapshots::format::{AppRecord, CpuRecord, CpuidBits};
use std::sync::Arc;

/// The VM a picoprocess is built around.
pub(crate) struct Parts {
    pub platform: Platform,
    pub machine: Machine,
    pub cpuid: CpuId,
    pub features: CpuFeatures,
}

/// Memory, VM, CPUID, system pages and sandbox for `config`.
pub(crate) fn prepare(config: &Config) -> Result<(Parts, AddressSpace, Sandbox), VmmError> {
    let platform = Platform::detect();
    let phys = PhysicalMemory::new(config.memory_mib << 20)?;
    let machine = Machine::new(phys.slots())?;
    let (cpuid, features) = cpu::guest_cpuid(&machine)?;
    let mut space = AddressSpace::new(phys, features.nx)?;
    system::install(&mut space, features.nx)?;
    let mut sandbox = Sandbox::new(&config.root)?;
    sandbox.set_cpus(config.vcpus.min(crate::memory::layout::MAX_VCPUS as usize));
    for (guest, host) in &config.writable {
        sandbox.mount(guest, host, true)?;
    }
    for (guest, host) in &config.readonly {
        sandbox.mount(guest, host, false)?;
    }
    Ok((
        Parts {
            platform,
            machine,
            cpuid,
            features,
        },
        space,
        sandbox,
    ))
}

/// The CPU features an app on this host may rely on, for snapshots.
pub(crate) fn cpu_record(parts: &Parts) -> CpuRecord {
    let bits = |function: u32, index: u32, ebx: u32, ecx: u32, edx: u32| {
        isa_bits(&CpuidBits {
            function,
            index,
            ebx,
            ecx,
            edx,
        })
    };
    let wanted = [(1, 0), (7, 0), (0x8000_0001, 0)];
    let leaves = if parts.platform == crate::platform::Platform::Pvm {
        // kvm_pvm runs the app at CPL 3 on the host CPU, and without CPUID faulting its
        // `cpuid` and `xgetbv` answer from the host, not from KVM's table: record that.
        wanted
            .iter()
            .map(|&(function, index)| {
                let r = std::arch::x86_64::__cpuid_count(function, index);
                bits(function, index, r.ebx, r.ecx, r.edx)
            })
            .collect()
    } else {
        parts
            .cpuid
            .as_slice()
            .iter()
            .filter(|e| wanted.contains(&(e.function, if e.function == 7 { e.index } else { 0 })))
            .map(|e| {
                bits(
                    e.function,
                    if e.function == 7 { e.index } else { 0 },
                    e.ebx,
                    e.ecx,
                    e.edx,
                )
            })
            .collect()
    };
    CpuRecord {
        leaves,
        xcr0: parts.features.xcr0,
    }
}

/// The bits of a recorded leaf that describe the instruction set (what an app can rely
/// on); a check compares only these, so records made before the filter still compare.
pub(crate) fn isa_bits(leaf: &CpuidBits) -> CpuidBits {
    let (ebx, ecx, edx) = match leaf.function {
        1 => (0, LEAF1_ECX_ISA, LEAF1_EDX_ISA),
        7 => LEAF7_ISA,
        0x8000_0001 => (0, EXT1_ECX_ISA, EXT1_EDX_ISA),
        _ => (0, 0, 0),
    };
    CpuidBits {
        function: leaf.function,
        index: leaf.index,
        ebx: leaf.ebx & ebx,
        ecx: leaf.ecx & ecx,
        edx: leaf.edx & edx,
    }
}

/// Sets bits `bits` of a u32.
const fn bits(bits: &[u32]) -> u32 {
    let mut mask = 0;
    let mut i = 0;
    while i < bits.len() {
        mask |= 1 << bits[i];
        i += 1;
    }
    mask
}

/// Leaf 7.0 (EBX, ECX, EDX) instruction-set bits: FSGSBASE, BMI1, HLE, AVX2, BMI2, ERMS,
/// RTM, the AVX-512 family, RDSEED, ADX, CLFLUSHOPT, CLWB, SHA; PREFETCHWT1, VBMI,
/// WAITPKG, VBMI2, GFNI, VAES, VPCLMULQDQ, VNNI, BITALG, VPOPCNTDQ, RDPID, CLDEMOTE,
/// MOVDIRI, MOVDIR64B, ENQCMD; 4VNNIW, 4FMAPS, FSRM, UINTR, VP2INTERSECT, SERIALIZE,
/// TSXLDTRK, AMX and AVX512-FP16. Not the mitigation and platform bits.
const LEAF7_ISA: (u32, u32, u32) = (
    bits(&[
        0, 3, 4, 5, 8, 9, 11, 16, 17, 18, 19, 21, 23, 24, 26, 27, 28, 29, 30, 31,
    ]),
    bits(&[0, 1, 5, 6, 8, 9, 10, 11, 12, 14, 22, 25, 27, 28, 29]),
    bits(&[2, 3, 4, 5, 8, 14, 16, 22, 23, 24, 25]),
);
/// Leaf 0x8000_0001 ECX instruction-set bits: LAHF, LZCNT, SSE4A, PREFETCHW, XOP, FMA4, TBM.
const EXT1_ECX_ISA: u32 = bits(&[0, 5, 6, 8, 11, 16, 21]);
/// Leaf 0x8000_0001 EDX instruction-set bits: SYSCALL, NX, MMXEXT, RDTSCP, LM, 3DNow!.
const EXT1_EDX_ISA: u32 = bits(&[11, 20, 22, 27, 29, 30, 31]);

/// Leaf 1 ECX bits an app can use: SSE3, PCLMULQDQ, SSSE3, FMA, CX16, SSE4.1, SSE4.2,
/// MOVBE, POPCNT, AES, XSAVE, AVX, F16C, RDRAND. The rest (TSC-deadline, x2APIC, OSXSAVE,
/// the hypervisor bit...) describe the machine, not the instruction set.
const LEAF1_ECX_ISA: u32 = (1 << 0)
    | (1 << 1)
    | (1 << 9)
    | (1 << 12)
    | (1 << 13)
    | (1 << 19)
    | (1 << 20)
    | (1 << 22)
    | (1 << 23)
    | (1 << 25)
    | (1 << 26)
    | (1 << 28)
    | (1 << 29)
    | (1 << 30);
/// Leaf 1 EDX bits an app can use: FPU, TSC, CX8, CMOV, CLFLUSH, MMX, FXSR, SSE, SSE2.
const LEAF1_EDX_ISA: u32 = (1 << 0)
    | (1 << 4)
    | (1 << 8)
    | (1 << 15)
    | (1 << 19)
    | (1 << 23)
    | (1 << 24)
    | (1 << 25)
    | (1 << 26);

/// The app's process state around its address space and sandbox.
pub(crate) fn process(
    config: &Config,
    parts: &Parts,
    mem: AddressSpace,
    sandbox: Sandbox,
    vcpu: &VcpuFd,
) -> Result<Process, VmmError> {
    let kicker = Kicker::for_current_thread().map_err(|source| VmmError::Host {
        what: "the vCPU kick signal",
        source,
    })?;
    let tsc = cpu::tsc_calibration(vcpu);
    Ok(Process {
        mem,
        files: Default::default(),
        windows: crate::kernel::windows::FileWindows::new(config.guest_reads),
        sandbox,
        cwd: sandbox::normalize("/", &config.cwd),
        umask: 0o022,
        credentials: Default::default(),
        nice: 0,
        signals: Default::default(),
        clock: crate::kernel::clock::Clock {
            tsc: tsc.filter(|_| config.doorbell_time),
            pid: crate::kernel::GUEST_PID,
            ..Default::default()
        },
        kicker: kicker.clone(),
        thread: crate::kernel::thread::ThreadState::new(crate::kernel::thread::MAIN_TID),
        threads: Default::default(),
        name: config.name.clone(),
        trace: config.trace_syscalls.then(Default::default),
        alarm: alarm::Alarm::new(kicker),
        net: crate::kernel::netpolicy::NetPolicy {
            address: config.address,
            allow_outbound: config.allow_outbound,
            name: config.name.clone(),
        },
        app: AppRecord {
            name: config.name.clone(),
            image: config.image.clone(),
            root: config.root.display().to_string(),
            writable: config.writable.iter().map(|(g, _)| g.clone()).collect(),
            memory_mib: config.memory_mib,
            address: Some(config.address.to_string()),
            program: config.program.clone(),
            root_from: config.root_from.clone(),
        },
        writable_dirs: config.writable.clone(),
        snapshot_key: config.snapshot_key.clone(),
        cpu: cpu_record(parts),
        restored_from: None,
        prefetched: None,
        activeset: Default::default(),
        first_request: None,
        accepted: 0,
        warned: Default::default(),
        handoff: Default::default(),
        inherited_sockets: config.inherited_sockets.clone(),
        ids: Default::default(),
        children: Vec::new(),
        tree: None,
        root_watch: None,
        vfork_done: None,
        proc_view: None,
        exe: config.program.clone(),
        run_as: config.program.clone(),
        cmdline: config.argv.clone(),
        parent_host_pid: 0,
        forked: false,
        jobs: Default::default(),
    })
}

/// Puts the parts together with the vCPU, the control socket and the mailbox poller.
pub(crate) fn finish(
    config: &Config,
    parts: Parts,
    vcpu_fd: VcpuFd,
    mut process: Process,
) -> Result<Picoprocess, VmmError> {
    let Parts {
        platform, machine, ..
    } = parts;
    process.clock.publish(process.mem.phys(), true);
    crate::kernel::clock::publish_tid(process.mem.phys(), FIRST_CPU, process.thread.tid);
    let vcpu = Vcpu::new(vcpu_fd, platform)?;
    let live = Arc::new(control::LiveStats::default());
    let ops = Arc::new(control::PendingOps::default());
    if let Some(control) = &config.control {
        let path = control.lease.socket.with_extension("stats");
        let page =
            crate::stats_page::StatsPage::create(&path).map_err(|source| VmmError::Host {
                what: "the stats page",
                source,
            })?;
        live.attach_page(page);
    }
    let control = match &config.control {
        Some(control) => Some(control::ControlServer::start(
            control,
            process.kicker.clone(),
            live.clone(),
            ops.clone(),
            process.handoff.clone(),
        )?),
        None => None,
    };
    let doorbell = crate::doorbell::Doorbell::new(process.mem.phys(), FIRST_CPU)?;
    let mailbox_page = doorbell.mailbox().clone();
    let process = Arc::new(parking_lot::Mutex::new(process));
    let poller = if config.mailbox {
        let poller = mailbox::Poller::start(mailbox_page, process.clone(), live.clone()).map_err(
            |source| VmmError::Host {
                what: "the mailbox poller",
                source,
            },
        )?;
        Some(Arc::new(poller))
    } else {
        None
    };
    tracing::debug!(platform = platform.describe(), "picoprocess built");
    Ok(Picoprocess {
        vcpu,
        machine: Arc::new(machine),
        poller,
        doorbell,
        process,
        stats: Default::default(),
        live,
        ops,
        name: config.name.clone(),
        control,
        // Made for the run, from the sandbox's CPU count (see `Picoprocess::run`).
        cpus: Default::default(),
        seen_invalidations: 0,
    })
}
