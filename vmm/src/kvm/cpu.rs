//! vCPU state for a picoprocess: CPUID, control registers, the syscall MSRs, XCR0 and the
//! user-mode entry state. The vCPU starts directly in ring 3; no guest boot code runs.

use super::system::{GDT_LIMIT, IDT_LIMIT, TSS_LIMIT};
use super::Machine;
use kvm_bindings::{kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, kvm_xcrs, CpuId, Msrs};
use kvm_ioctls::VcpuFd;
use picocenter_guest_shim::abi::{self, selector};

/// CR0: PE, MP, ET, NE, WP, PG (SSE needs MP set and EM clear).
pub const CR0: u64 = 0x8001_0033;
/// CR4.PAE.
const CR4_PAE: u64 = 1 << 5;
/// CR4.OSFXSR | CR4.OSXMMEXCPT: SSE and its exceptions.
const CR4_SSE: u64 = 0x600;
/// CR4.OSXSAVE: XSAVE and AVX.
const CR4_OSXSAVE: u64 = 1 << 18;
/// EFER: SCE, LME, LMA.
const EFER_BASE: u64 = 0x501;
/// EFER.NXE.
const EFER_NXE: u64 = 1 << 11;
/// RFLAGS for user mode: IF and the always-one bit.
pub const USER_RFLAGS: u64 = 0x202;
/// SYSCALL's RFLAGS mask: TF, DF, IOPL, NT, AC. IF stays set because `popfq` at CPL 3
/// cannot restore it.
const SFMASK: u64 = 0x47500;
/// XCR0 features the app may use: x87, SSE, AVX and the AVX-512 state. AMX and PKRU need
/// host permission or CR4 bits the guest does not get.
const XCR0_ALLOWED: u64 = 0xe7;

const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SFMASK: u32 = 0xc000_0084;
const MSR_FS_BASE: u32 = 0xc000_0100;
const MSR_GS_BASE: u32 = 0xc000_0101;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// Why the vCPU could not be configured.
#[derive(Debug, thiserror::Error)]
pub enum CpuSetupError {
    /// KVM_GET_SUPPORTED_CPUID failed.
    #[error(transparent)]
    GetSupportedCpuid(super::KvmError),
    /// KVM_SET_CPUID2 failed.
    #[error("KVM_SET_CPUID2")]
    SetCpuid(#[source] kvm_ioctls::Error),
    /// KVM_GET_SREGS failed.
    #[error("KVM_GET_SREGS")]
    GetSregs(#[source] kvm_ioctls::Error),
    /// KVM_SET_SREGS failed.
    #[error("KVM_SET_SREGS")]
    SetSregs(#[source] kvm_ioctls::Error),
    /// KVM_SET_MSRS failed or set fewer MSRs than asked.
    #[error("KVM_SET_MSRS")]
    SetMsrs(#[source] Option<kvm_ioctls::Error>),
    /// KVM_SET_XCRS failed.
    #[error("KVM_SET_XCRS (XCR0 = {xcr0:#x})")]
    SetXcrs {
        /// The value tried.
        xcr0: u64,
        /// What KVM said.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM_SET_FPU failed.
    #[error("KVM_SET_FPU")]
    SetFpu(#[source] kvm_ioctls::Error),
    /// KVM_SET_REGS failed.
    #[error("KVM_SET_REGS")]
    SetRegs(#[source] kvm_ioctls::Error),
    /// KVM_SET_XSAVE refused the FPU state.
    #[error("KVM_SET_XSAVE (the snapshot's FPU state)")]
    SetXsave(#[source] kvm_ioctls::Error),
}

/// CPU features the guest gets, derived from what KVM supports.
#[derive(Debug, Clone, Copy)]
pub struct CpuFeatures {
    /// Whether no-execute pages are available (EFER.NXE).
    pub nx: bool,
    /// XCR0 to run with (0 when XSAVE is unavailable).
    pub xcr0: u64,
}

/// Builds the guest CPUID from KVM's supported list, and says which features follow.
///
/// FSGSBASE, PKU and OSPKE are hidden: their CR4 bits stay clear, and glibc must not try
/// `wrfsbase` (the VMM keeps the FS base; see `arch_prctl`).
pub fn guest_cpuid(machine: &Machine) -> Result<(CpuId, CpuFeatures), CpuSetupError> {
    let mut cpuid = machine
        .supported_cpuid()
        .map_err(CpuSetupError::GetSupportedCpuid)?;
    let mut features = CpuFeatures { nx: false, xcr0: 0 };
    let mut has_xsave = false;
    for entry in cpuid.as_mut_slice() {
        match (entry.function, entry.index) {
            (1, _) => has_xsave = entry.ecx & (1 << 26) != 0,
            (7, 0) => {
                entry.ebx &= !1; // FSGSBASE
                entry.ecx &= !((1 << 3) | (1 << 4)); // PKU, OSPKE
            }
            (0xd, 0) => {
                let supported = (entry.eax as u64) | ((entry.edx as u64) << 32);
                features.xcr0 = supported & XCR0_ALLOWED;
                entry.eax = features.xcr0 as u32;
                entry.edx = (features.xcr0 >> 32) as u32;
            }
            (0x8000_0001, _) => features.nx = entry.edx & (1 << 20) != 0,
            _ => {}
        }
    }
    if !has_xsave {
        features.xcr0 = 0;
    }
    Ok((cpuid, features))
}

fn user_code_segment() -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: selector::USER_CS,
        type_: 0xb,
        present: 1,
        dpl: 3,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        ..Default::default()
    }
}

fn user_data_segment() -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: selector::USER_DS,
        type_: 0x3,
        present: 1,
        dpl: 3,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        ..Default::default()
    }
}

/// Puts `sregs` in ring 0 with the kernel selectors (to run the PTE writer).
pub fn set_kernel_segments(sregs: &mut kvm_sregs) {
    sregs.cs = kvm_segment {
        selector: selector::KERNEL_CS,
        dpl: 0,
        ..user_code_segment()
    };
    sregs.ss = kvm_segment {
        selector: selector::KERNEL_DS,
        dpl: 0,
        ..user_data_segment()
    };
}

/// Puts `sregs` in ring 3 with the user selectors, keeping everything else. Used at start
/// and whenever the VMM resumes the app from ring 0 (after an exception).
pub fn set_user_segments(sregs: &mut kvm_sregs, fs_base: u64) {
    sregs.cs = user_code_segment();
    sregs.ss = user_data_segment();
    sregs.ds = user_data_segment();
    sregs.es = user_data_segment();
    sregs.fs = kvm_segment {
        base: fs_base,
        ..user_data_segment()
    };
    sregs.gs = user_data_segment();
}

/// Long mode, paging at `cr3`, the GDT/IDT/TSS of [`super::system`], user segments.
fn long_mode_sregs(sregs: &mut kvm_sregs, cr3: u64, features: CpuFeatures) {
    set_user_segments(sregs, 0);
    sregs.tr = kvm_segment {
        base: abi::SYSTEM_VA + abi::TSS_PAGE * abi::PAGE_SIZE,
        limit: TSS_LIMIT,
        selector: selector::TSS,
        type_: 0xb,
        present: 1,
        ..Default::default()
    };
    sregs.ldt = kvm_segment {
        selector: 0,
        type_: 0x2,
        unusable: 1,
        ..Default::default()
    };
    sregs.gdt.base = abi::SYSTEM_VA + abi::GDT_PAGE * abi::PAGE_SIZE;
    sregs.gdt.limit = GDT_LIMIT;
    sregs.idt.base = abi::SYSTEM_VA + abi::IDT_PAGE * abi::PAGE_SIZE;
    sregs.idt.limit = IDT_LIMIT;
    sregs.cr0 = CR0;
    sregs.cr3 = cr3;
    sregs.cr4 = CR4_PAE | CR4_SSE | if features.xcr0 != 0 { CR4_OSXSAVE } else { 0 };
    sregs.efer = EFER_BASE | if features.nx { EFER_NXE } else { 0 };
}

fn msr(index: u32, data: u64) -> kvm_msr_entry {
    kvm_msr_entry {
        index,
        data,
        ..Default::default()
    }
}

/// The host's TSC.
pub fn host_tsc() -> u64 {
    // SAFETY: rdtsc has no preconditions; CR4.TSD is clear on every Linux host.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Reads the guest's TSC and the host's at (nearly) the same moment, with the TSC rate,
/// for the time page. `None` when KVM cannot tell.
pub fn tsc_calibration(vcpu: &VcpuFd) -> Option<TscCalibration> {
    let khz = vcpu.get_tsc_khz().ok()?;
    let mut msrs = Msrs::from_entries(&[msr(0x10, 0)]).ok()?;
    let host = host_tsc();
    if vcpu.get_msrs(&mut msrs).ok()? != 1 {
        return None;
    }
    let guest = msrs.as_slice()[0].data;
    TscCalibration::new(khz, guest, host)
}

/// Sets the guest TSC of `vcpu` to `value` (a vCPU made later than the others starts
/// its TSC where theirs is).
pub fn set_tsc(vcpu: &VcpuFd, value: u64) -> Result<(), CpuSetupError> {
    let msrs = Msrs::from_entries(&[msr(0x10, value)]).map_err(|_| CpuSetupError::SetMsrs(None))?;
    match vcpu.set_msrs(&msrs) {
        Ok(1) => Ok(()),
        Ok(_) => Err(CpuSetupError::SetMsrs(None)),
        Err(e) => Err(CpuSetupError::SetMsrs(Some(e))),
    }
}

/// Configures `vcpu` to start the app at `entry` with stack `rsp`, in ring 3.
pub fn configure(
    vcpu: &VcpuFd,
    cpuid: &CpuId,
    features: CpuFeatures,
    cr3: u64,
    entry: u64,
    rsp: u64,
) -> Result<(), CpuSetupError> {
    vcpu.set_cpuid2(cpuid).map_err(CpuSetupError::SetCpuid)?;
    let mut sregs = vcpu.get_sregs().map_err(CpuSetupError::GetSregs)?;
    long_mode_sregs(&mut sregs, cr3, features);
    vcpu.set_sregs(&sregs).map_err(CpuSetupError::SetSregs)?;

    let entries = [
        msr(
            MSR_STAR,
            (0x23u64 << 48) | ((selector::KERNEL_CS as u64) << 32),
        ),
        msr(MSR_LSTAR, abi::DOORBELL_VA),
        msr(MSR_CSTAR, 0),
        msr(MSR_SFMASK, SFMASK),
        msr(MSR_FS_BASE, 0),
        msr(MSR_GS_BASE, 0),
        msr(MSR_KERNEL_GS_BASE, 0),
    ];
    let msrs = Msrs::from_entries(&entries).map_err(|_| CpuSetupError::SetMsrs(None))?;
    let written = vcpu
        .set_msrs(&msrs)
        .map_err(|e| CpuSetupError::SetMsrs(Some(e)))?;
    if written != entries.len() {
        return Err(CpuSetupError::SetMsrs(None));
    }

    if features.xcr0 != 0 {
        let mut xcrs = kvm_xcrs {
            nr_xcrs: 1,
            ..Default::default()
        };
        xcrs.xcrs[0].xcr = 0;
        xcrs.xcrs[0].value = features.xcr0;
        vcpu.set_xcrs(&xcrs)
            .map_err(|source| CpuSetupError::SetXcrs {
                xcr0: features.xcr0,
                source,
            })?;
    }

    let fpu = kvm_bindings::kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(CpuSetupError::SetFpu)?;

    let regs = kvm_regs {
        rip: entry,
        rsp,
        rflags: USER_RFLAGS,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(CpuSetupError::SetRegs)?;
    Ok(())
}

/// The general registers of an app context from a snapshot.
pub fn user_regs(context: &picocenter_snapshots::format::UserContext) -> kvm_regs {
    let g = &context.gprs;
    kvm_regs {
        rax: g[0],
        rbx: g[1],
        rcx: g[2],
        rdx: g[3],
        rsi: g[4],
        rdi: g[5],
        rsp: g[6],
        rbp: g[7],
        r8: g[8],
        r9: g[9],
        r10: g[10],
        r11: g[11],
        r12: g[12],
        r13: g[13],
        r14: g[14],
        r15: g[15],
        rip: context.rip,
        // Only the flags an app can hold; IF stays set.
        rflags: (context.rflags & 0x4_0cd5) | USER_RFLAGS,
    }
}

/// A `kvm_xsave` from a snapshot's 4096-byte image (KVM validates it when it is set).
pub fn xsave_from(bytes: &[u8]) -> kvm_bindings::kvm_xsave {
    let mut xsave = kvm_bindings::kvm_xsave::default();
    for (slot, chunk) in xsave.region.iter_mut().zip(bytes.chunks_exact(4)) {
        *slot = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
    }
    xsave
}

/// Puts the vCPU at an app context from a snapshot: registers, FS/GS base, FPU state.
pub fn restore_context(
    vcpu: &VcpuFd,
    context: &picocenter_snapshots::format::UserContext,
) -> Result<(), CpuSetupError> {
    let xsave = xsave_from(&context.xsave);
    set_context(
        vcpu,
        &user_regs(context),
        context.fs_base,
        context.gs_base,
        &xsave,
    )
}

/// Puts the vCPU at an app context: registers, user segments with these FS and GS bases,
/// FPU state (a restore's, or a forked process's from its parent).
pub fn set_context(
    vcpu: &VcpuFd,
    regs: &kvm_regs,
    fs_base: u64,
    gs_base: u64,
    xsave: &kvm_bindings::kvm_xsave,
) -> Result<(), CpuSetupError> {
    vcpu.set_regs(regs).map_err(CpuSetupError::SetRegs)?;
    let mut sregs = vcpu.get_sregs().map_err(CpuSetupError::GetSregs)?;
    set_user_segments(&mut sregs, fs_base);
    sregs.gs.base = gs_base;
    vcpu.set_sregs(&sregs).map_err(CpuSetupError::SetSregs)?;
    // SAFETY: the guest never has dynamically enabled XSTATE features (XCR0 excludes AMX),
    // so KVM reads no more than the 4096-byte `kvm_xsave`.
    unsafe { vcpu.set_xsave(xsave) }.map_err(CpuSetupError::SetXsave)?;
    Ok(())
}

/// The guest TSC as a function of the host's, for the time page.
#[derive(Debug, Clone, Copy)]
pub struct TscCalibration {
    /// Guest TSC minus host TSC (KVM keeps it constant).
    pub guest_minus_host: i64,
    /// Nanoseconds per tick, 32.32 fixed point.
    pub mult: u64,
}

impl TscCalibration {
    /// The calibration for a TSC of `khz` kHz whose guest value is `guest_tsc` when the
    /// host's is `host_tsc`.
    pub fn new(khz: u32, guest_tsc: u64, host_tsc: u64) -> Option<Self> {
        if khz == 0 {
            return None;
        }
        Some(Self {
            guest_minus_host: guest_tsc.wrapping_sub(host_tsc) as i64,
            mult: (1_000_000u64 << 32) / khz as u64,
        })
    }
}
