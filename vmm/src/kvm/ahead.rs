//! A VM made ahead of its app. A spare VMM process of a worker's warm pool opens /dev/kvm,
//! creates a VM and its vCPU before it knows which app it will run, and the next
//! [`Machine::new`](super::Machine::new) in that process takes them instead of making its
//! own: about 0.9 ms of a restore's critical path here (PLATFORM.md, "VM pools"). The
//! memory slots wait for the app, whose memory decides their size. KVM's supported CPUID
//! is asked ahead too: on kvm_pvm that one ioctl costs as much as the VM.
//!
//! A KVM VM belongs to the address space of the process that created it (its ioctls fail
//! with EIO in a forked child), so it is made in the process that will run it and kept in
//! a process-wide slot until then. It is used at most once: one app per spare.

use super::KvmError;
use kvm_bindings::CpuId;
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use std::sync::Mutex;

/// /dev/kvm, a VM with no memory yet, its one vCPU, and the CPUID KVM supports.
#[derive(Debug)]
pub(crate) struct MadeAhead {
    pub kvm: Kvm,
    pub vm: VmFd,
    pub vcpu: VcpuFd,
    pub supported_cpuid: CpuId,
}

/// KVM_GET_SUPPORTED_CPUID (~0.3 ms on kvm_pvm, as much as the VM's creation).
pub(crate) fn ask_supported_cpuid(kvm: &Kvm) -> Result<CpuId, KvmError> {
    kvm.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(KvmError::SupportedCpuid)
}

/// What [`make`] made, until the process's first VM takes it.
static AHEAD: Mutex<Option<MadeAhead>> = Mutex::new(None);

/// Makes the VM and vCPU the next [`super::Machine::new`] of this process will take.
/// Nothing is kept if a step fails: that machine then makes its own (and reports why).
pub fn make() -> Result<(), KvmError> {
    let (kvm, vm) = super::open_vm()?;
    let vcpu = vm.create_vcpu(0).map_err(KvmError::CreateVcpu)?;
    let supported_cpuid = ask_supported_cpuid(&kvm)?;
    *slot() = Some(MadeAhead {
        kvm,
        vm,
        vcpu,
        supported_cpuid,
    });
    Ok(())
}

/// The VM made ahead, if any, taken: it is never handed out twice.
pub(crate) fn take() -> Option<MadeAhead> {
    slot().take()
}

/// In a process just forked from one that made a VM ahead: that VM and vCPU are the
/// parent's (their ioctls fail here), so new ones take their place, made with the same
/// /dev/kvm (a jail may not show its path) and keeping the CPUID KVM supports.
pub fn remake_after_fork() -> Result<(), KvmError> {
    let Some(MadeAhead {
        kvm,
        vm,
        vcpu,
        supported_cpuid,
    }) = take()
    else {
        return Ok(());
    };
    // Closed in this process only; a vCPU's drop unmaps this process's copy of its
    // `kvm_run`, nothing of the parent's.
    drop(vcpu);
    drop(vm);
    let vm = kvm.create_vm().map_err(KvmError::CreateVm)?;
    let vcpu = vm.create_vcpu(0).map_err(KvmError::CreateVcpu)?;
    *slot() = Some(MadeAhead {
        kvm,
        vm,
        vcpu,
        supported_cpuid,
    });
    Ok(())
}

fn slot() -> std::sync::MutexGuard<'static, Option<MadeAhead>> {
    // A panic while holding it cannot leave it half-written: it is one assignment.
    AHEAD
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vm_made_ahead_is_taken_once_and_remade_in_a_fork() {
        make().expect("every Picocenter host has /dev/kvm");
        let ahead = take().expect("made");
        assert!(take().is_none());
        // It is a working VM: its vCPU answers.
        ahead
            .vcpu
            .get_regs()
            .expect("KVM_GET_REGS on the vCPU made ahead");
        // A forked child gets one of its own that works, and the parent keeps its own.
        // (One test: the slot is the process's, and a fork must not find it locked.)
        make().expect("a second VM made ahead");
        // SAFETY: the child uses only KVM ioctls and _exits; nothing of the test harness.
        let child = unsafe { libc::fork() };
        if child == 0 {
            let works = remake_after_fork().is_ok()
                && take().is_some_and(|made| made.vcpu.get_regs().is_ok());
            // SAFETY: ends the forked test process at once.
            unsafe { libc::_exit(if works { 0 } else { 1 }) };
        }
        let mut status = 0;
        // SAFETY: waits for our own child.
        unsafe { libc::waitpid(child, &mut status, 0) };
        assert_eq!(libc::WEXITSTATUS(status), 0);
        assert!(take().is_some_and(|made| made.vcpu.get_regs().is_ok()));
    }
}
