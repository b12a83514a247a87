//! Delivering a signal to an app handler, and `rt_sigreturn`: the x86-64 Linux
//! `rt_sigframe`, built on the app's stack (or its alternate stack) by the VMM.
//!
//! ```text
//! frame + 0    pretcode    the handler's return address: sa_restorer
//! frame + 8    ucontext    uc_flags, uc_link, uc_stack, uc_mcontext (sigcontext), uc_sigmask
//! frame + 312  siginfo     128 bytes
//! fpstate      XSAVE image of the FPU/SSE/AVX state, 64-byte aligned, below the frame
//! ```
//!
//! At handler entry RSP = frame, so that (RSP + 8) is 16-byte aligned as after a call.

use crate::kernel::process::Process;
use crate::kernel::signals::{bit, Disposition, SA_NODEFER, SA_ONSTACK, SA_RESETHAND, SA_RESTORER};
use crate::kvm::vcpu::{Vcpu, VcpuError};
use crate::memory::UserAddr;
use kvm_bindings::kvm_xsave;

const UCONTEXT: u64 = 8;
const MCONTEXT: u64 = UCONTEXT + 40;
const SIGMASK: u64 = MCONTEXT + 256;
const SIGINFO: u64 = SIGMASK + 8;
const FRAME_SIZE: u64 = SIGINFO + 128;
const XSAVE_SIZE: u64 = 4096;
const RED_ZONE: u64 = 128;
/// RFLAGS bits a handler (or a forged frame) may change: CF PF AF ZF SF TF DF OF AC RF.
const USER_FLAGS: u64 =
    0x1 | 0x4 | 0x10 | 0x40 | 0x80 | 0x100 | 0x400 | 0x800 | 0x4_0000 | 0x1_0000;
const UC_FP_XSTATE: u64 = 1;

/// What the app learns about a signal (the fields of `siginfo_t` Picocenter fills).
#[derive(Debug, Clone, Copy, Default)]
pub struct SigInfo {
    /// The signal.
    pub signo: i32,
    /// si_code: SI_USER (0), SI_KERNEL (0x80), SEGV_MAPERR (1), ...
    pub code: i32,
    /// The faulting address, for SIGSEGV, SIGBUS, SIGILL, SIGFPE.
    pub addr: u64,
    /// For SIGCHLD: the child's pid and its si_status (exit code or signal).
    pub child: Option<(i32, i32)>,
}

impl SigInfo {
    fn bytes(&self) -> [u8; 128] {
        let mut out = [0u8; 128];
        out[0..4].copy_from_slice(&self.signo.to_le_bytes());
        out[8..12].copy_from_slice(&self.code.to_le_bytes());
        if matches!(
            self.signo,
            libc::SIGSEGV | libc::SIGBUS | libc::SIGILL | libc::SIGFPE | libc::SIGTRAP
        ) {
            out[16..24].copy_from_slice(&self.addr.to_le_bytes());
        } else if let Some((pid, status)) = self.child {
            out[16..20].copy_from_slice(&pid.to_le_bytes());
            out[24..28].copy_from_slice(&status.to_le_bytes());
        } else {
            out[16..20].copy_from_slice(&crate::kernel::GUEST_PID.to_le_bytes());
        }
        out
    }
}

/// Why a signal could not be delivered: the app must die of SIGSEGV, as Linux would kill
/// it.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// The frame could not be written (a bad stack) or read back (a forged one).
    #[error("{0}")]
    BadFrame(String),
    /// A host-side vCPU operation failed.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
}

fn xsave_bytes(xsave: &kvm_xsave) -> Vec<u8> {
    xsave.region.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// Builds a frame for `info.signo` and points the vCPU at its handler. The caller has
/// checked that the disposition is a handler.
pub fn deliver(p: &mut Process, vcpu: &mut Vcpu, info: SigInfo) -> Result<(), DeliveryError> {
    let signal = info.signo;
    let Disposition::Handle(action) = p.signals.disposition(signal) else {
        return Ok(());
    };
    if action.flags & SA_RESTORER == 0 {
        return Err(DeliveryError::BadFrame(format!(
            "signal {signal} has a handler but no SA_RESTORER, and there is no vDSO to return through"
        )));
    }
    let regs = vcpu.regs();
    let (ss_sp, ss_flags, ss_size) = p.signals.altstack;
    let on_altstack = regs.rsp.wrapping_sub(ss_sp) < ss_size;
    let top = if action.flags & SA_ONSTACK != 0 && ss_flags & libc::SS_DISABLE == 0 && !on_altstack
    {
        ss_sp.wrapping_add(ss_size)
    } else {
        regs.rsp.wrapping_sub(RED_ZONE)
    };
    let fpstate = top.wrapping_sub(XSAVE_SIZE) & !63;
    let frame = (fpstate.wrapping_sub(FRAME_SIZE) & !15).wrapping_sub(8);

    let old_mask = p.thread.saved_mask.take().unwrap_or(p.signals.mask);
    let mut bytes = vec![0u8; FRAME_SIZE as usize];
    let mut put = |offset: u64, value: u64| {
        bytes[offset as usize..offset as usize + 8].copy_from_slice(&value.to_le_bytes());
    };
    put(0, action.restorer);
    put(UCONTEXT, UC_FP_XSTATE);
    put(UCONTEXT + 16, ss_sp);
    put(
        UCONTEXT + 24,
        if on_altstack {
            1
        } else {
            ss_flags as u32 as u64
        },
    );
    put(UCONTEXT + 32, ss_size);
    let gprs = [
        regs.r8,
        regs.r9,
        regs.r10,
        regs.r11,
        regs.r12,
        regs.r13,
        regs.r14,
        regs.r15,
        regs.rdi,
        regs.rsi,
        regs.rbp,
        regs.rbx,
        regs.rdx,
        regs.rax,
        regs.rcx,
        regs.rsp,
        regs.rip,
        regs.rflags,
    ];
    for (i, value) in gprs.iter().enumerate() {
        put(MCONTEXT + i as u64 * 8, *value);
    }
    put(MCONTEXT + 144, 0x2b_0000_0000_0033); // cs, gs, fs, ss
    put(
        MCONTEXT + 176,
        if info.signo == libc::SIGSEGV {
            info.addr
        } else {
            0
        },
    ); // cr2
    put(MCONTEXT + 184, fpstate);
    put(SIGMASK, old_mask);
    bytes[SIGINFO as usize..].copy_from_slice(&info.bytes());

    let xsave = vcpu.xsave()?;
    let bad_stack = |_| {
        DeliveryError::BadFrame(format!(
            "cannot write the signal {signal} frame at {frame:#x} (bad stack)"
        ))
    };
    p.mem
        .write(UserAddr(fpstate), &xsave_bytes(&xsave))
        .map_err(bad_stack)?;
    p.mem.write(UserAddr(frame), &bytes).map_err(bad_stack)?;

    p.signals.clear(signal);
    p.signals.mask |= action.mask;
    if action.flags & SA_NODEFER == 0 {
        p.signals.mask |= bit(signal);
    }
    if action.flags & SA_RESETHAND != 0 {
        p.signals.actions[signal as usize - 1] = Default::default();
    }
    vcpu.resume_user(
        action.handler,
        frame,
        regs.rflags & !(0x100 | 0x400 | 0x1_0000),
    )?;
    let entry = vcpu.regs_mut();
    entry.rdi = signal as u64;
    entry.rax = 0;
    // x86-64 Linux passes the siginfo and ucontext whether or not SA_SIGINFO is set.
    entry.rsi = frame + SIGINFO;
    entry.rdx = frame + UCONTEXT;
    Ok(())
}

fn word(bytes: &[u8], offset: u64) -> u64 {
    let at = offset as usize;
    u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap_or_default())
}

/// rt_sigreturn: restores the context a handler's frame holds.
pub fn sigreturn(p: &mut Process, vcpu: &mut Vcpu) -> Result<(), DeliveryError> {
    let frame = vcpu.regs().rsp.wrapping_sub(8);
    let mut bytes = vec![0u8; FRAME_SIZE as usize];
    p.mem.read(UserAddr(frame), &mut bytes).map_err(|_| {
        DeliveryError::BadFrame(format!("rt_sigreturn with no frame at {frame:#x}"))
    })?;
    let g = |i: u64| word(&bytes, MCONTEXT + i * 8);
    let (rip, rsp, rflags) = (g(16), g(15), g(17));
    // The vDSO is the app's code too: a signal that interrupted it returns there.
    if !crate::memory::space::app_code_address(rip) {
        return Err(DeliveryError::BadFrame(format!(
            "rt_sigreturn to a non-user address {rip:#x}"
        )));
    }
    let fpstate = word(&bytes, MCONTEXT + 184);
    if fpstate != 0 {
        let mut image = vec![0u8; XSAVE_SIZE as usize];
        p.mem.read(UserAddr(fpstate), &mut image).map_err(|_| {
            DeliveryError::BadFrame(format!(
                "rt_sigreturn with a bad fpstate pointer {fpstate:#x}"
            ))
        })?;
        let mut xsave = kvm_xsave::default();
        for (slot, chunk) in xsave.region.iter_mut().zip(image.chunks_exact(4)) {
            *slot = u32::from_le_bytes(chunk.try_into().unwrap_or_default());
        }
        vcpu.set_xsave(&xsave).map_err(|_| {
            DeliveryError::BadFrame("rt_sigreturn with an invalid FPU state".into())
        })?;
    }
    p.signals.mask = word(&bytes, SIGMASK) & !(bit(libc::SIGKILL) | bit(libc::SIGSTOP));
    let flags = (vcpu.regs().rflags & !USER_FLAGS) | (rflags & USER_FLAGS) | 0x202;
    vcpu.resume_user(rip, rsp, flags)?;
    let r = vcpu.regs_mut();
    (r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15) =
        (g(0), g(1), g(2), g(3), g(4), g(5), g(6), g(7));
    (r.rdi, r.rsi, r.rbp, r.rbx, r.rdx, r.rax, r.rcx) =
        (g(8), g(9), g(10), g(11), g(12), g(13), g(14));
    Ok(())
}
