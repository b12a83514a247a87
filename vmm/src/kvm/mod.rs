//! KVM: the VM, its memory slots and its one vCPU.
//!
//! * [`system`]: the GDT, IDT, TSS, stubs and doorbell inside the guest;
//! * [`cpu`]: CPUID and the vCPU's registers;
//! * [`kick`]: getting the vCPU thread out of `KVM_RUN` from another thread;
//! * [`ahead`]: a VM and vCPU made before the app is known (a worker's warm pool).

pub mod ahead;
pub mod cpu;
pub mod kick;
pub mod system;
pub mod vcpu;

use crate::memory::phys::SlotInfo;
use kvm_bindings::{kvm_userspace_memory_region, CpuId};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};

/// Why the VM could not be created or changed.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// /dev/kvm could not be opened.
    #[error("opening /dev/kvm (every Picocenter host needs KVM)")]
    Open(#[source] kvm_ioctls::Error),
    /// KVM_CREATE_VM failed.
    #[error("KVM_CREATE_VM")]
    CreateVm(#[source] kvm_ioctls::Error),
    /// KVM_CREATE_VCPU failed.
    #[error("KVM_CREATE_VCPU")]
    CreateVcpu(#[source] kvm_ioctls::Error),
    /// KVM_SET_USER_MEMORY_REGION failed.
    #[error("KVM_SET_USER_MEMORY_REGION for slot {slot}")]
    SetMemoryRegion {
        /// The slot.
        slot: u32,
        /// What KVM said.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM_GET_SUPPORTED_CPUID failed.
    #[error("KVM_GET_SUPPORTED_CPUID")]
    SupportedCpuid(#[source] kvm_ioctls::Error),
    /// The host KVM lacks a capability the VMM needs.
    #[error("KVM lacks {0}")]
    MissingCapability(&'static str),
}

/// A KVM VM with its memory slots registered.
#[derive(Debug)]
pub struct Machine {
    /// The KVM system handle.
    pub kvm: Kvm,
    /// The VM.
    pub vm: VmFd,
    slots: [SlotInfo; 3],
    /// The vCPU made with the VM ahead of the app, which the first
    /// [`Machine::create_vcpu`] hands out.
    vcpu_ahead: std::sync::Mutex<Option<VcpuFd>>,
    /// What KVM_GET_SUPPORTED_CPUID answered, once asked (~0.3 ms a call on kvm_pvm).
    supported_cpuid: std::sync::OnceLock<CpuId>,
}

fn region(info: &SlotInfo, size: u64) -> kvm_userspace_memory_region {
    kvm_userspace_memory_region {
        slot: info.slot,
        guest_phys_addr: info.gpa,
        memory_size: size,
        userspace_addr: info.host_addr,
        flags: 0,
    }
}

/// Opens /dev/kvm, checks what the VMM needs of it, and creates a VM with no memory yet.
fn open_vm() -> Result<(Kvm, VmFd), KvmError> {
    let kvm = Kvm::new().map_err(KvmError::Open)?;
    if !kvm.check_extension(kvm_ioctls::Cap::SyncRegs) {
        return Err(KvmError::MissingCapability("KVM_CAP_SYNC_REGS"));
    }
    let vm = kvm.create_vm().map_err(KvmError::CreateVm)?;
    Ok((kvm, vm))
}

impl Machine {
    /// Creates a VM (or takes the one made [`ahead`]) and registers `slots`, whose host
    /// mappings must outlive it.
    pub fn new(slots: [SlotInfo; 3]) -> Result<Self, KvmError> {
        let supported_cpuid = std::sync::OnceLock::new();
        let (kvm, vm, vcpu_ahead) = match ahead::take() {
            Some(made) => {
                let _ = supported_cpuid.set(made.supported_cpuid);
                (made.kvm, made.vm, Some(made.vcpu))
            }
            None => {
                let (kvm, vm) = open_vm()?;
                (kvm, vm, None)
            }
        };
        let machine = Self {
            kvm,
            vm,
            slots,
            vcpu_ahead: std::sync::Mutex::new(vcpu_ahead),
            supported_cpuid,
        };
        for info in &machine.slots {
            machine.set_region(info, info.size)?;
        }
        Ok(machine)
    }

    /// In a forked VMM process: a new VM over the same guest memory, which the fork made
    /// copy-on-write. The inherited VM and vCPU belong to the parent's address space (their
    /// ioctls fail with EIO here); /dev/kvm's fd does not, so no path is opened again
    /// (the jail may not show /dev/kvm).
    pub fn for_forked_process(&self) -> Result<Self, KvmError> {
        use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
        let fd = rustix::io::fcntl_dupfd_cloexec(
            // SAFETY: the fd is our open /dev/kvm, borrowed for the duration of the call.
            unsafe { std::os::fd::BorrowedFd::borrow_raw(self.kvm.as_raw_fd()) },
            0,
        )
        .map_err(|e| KvmError::Open(kvm_ioctls::Error::new(e.raw_os_error())))?;
        // SAFETY: `fd` is a fresh duplicate of /dev/kvm that the new `Kvm` owns.
        let kvm = unsafe { Kvm::from_raw_fd(fd.into_raw_fd()) };
        let vm = kvm.create_vm().map_err(KvmError::CreateVm)?;
        let machine = Self {
            kvm,
            vm,
            slots: self.slots,
            vcpu_ahead: std::sync::Mutex::new(None),
            supported_cpuid: self.supported_cpuid.clone(),
        };
        for info in &machine.slots {
            machine.set_region(info, info.size)?;
        }
        Ok(machine)
    }

    /// In a forked VMM, lets go of the parent's VM (`machine`, which
    /// [`Machine::for_forked_process`] replaced). Dropped if this was the last reference;
    /// otherwise the rest belong to the parent's other vCPU threads, which the fork did not
    /// copy and which will never drop them here: its fds are closed by hand, and the
    /// references forgotten.
    ///
    /// # Safety
    ///
    /// Only in a forked process, whose other references to `machine` are all held by
    /// threads of the parent.
    pub unsafe fn release_forked(machine: std::sync::Arc<Self>) {
        use std::os::fd::AsRawFd;
        match std::sync::Arc::try_unwrap(machine) {
            Ok(machine) => drop(machine),
            Err(shared) => {
                // SAFETY: per the contract, no code in this process will use or drop the
                // machine again (its holders do not exist here), so its fds are ours to
                // close, once.
                unsafe {
                    libc::close(shared.vm.as_raw_fd());
                    libc::close(shared.kvm.as_raw_fd());
                }
                std::mem::forget(shared);
            }
        }
    }

    fn set_region(&self, info: &SlotInfo, size: u64) -> Result<(), KvmError> {
        // SAFETY: `info.host_addr .. + info.size` is a live mapping owned by the
        // picoprocess's `PhysicalMemory`, which outlives this VM (the `Picoprocess` drops
        // the VM first). A size of zero deletes the slot and touches no memory.
        unsafe { self.vm.set_user_memory_region(region(info, size)) }.map_err(|source| {
            KvmError::SetMemoryRegion {
                slot: info.slot,
                source,
            }
        })
    }

    /// Deletes and re-adds memory slot `slot`, which makes KVM drop every translation it
    /// derived from the pages in it. On kvm_pvm this is how changes to the page tables
    /// become visible (~55-60 µs for the small page-table slot).
    pub fn reregister_slot(&self, slot: u32) -> Result<(), KvmError> {
        let info = self.slots[slot as usize];
        self.set_region(&info, 0)?;
        self.set_region(&info, info.size)
    }

    /// The CPUID leaves this KVM supports (asked once per machine, or ahead).
    pub fn supported_cpuid(&self) -> Result<CpuId, KvmError> {
        if let Some(cpuid) = self.supported_cpuid.get() {
            return Ok(cpuid.clone());
        }
        let cpuid = ahead::ask_supported_cpuid(&self.kvm)?;
        Ok(self.supported_cpuid.get_or_init(|| cpuid).clone())
    }

    /// Creates vCPU `id` (1 and up: the first is [`Machine::create_vcpu`]'s).
    pub fn create_another_vcpu(&self, id: u64) -> Result<VcpuFd, KvmError> {
        self.vm.create_vcpu(id).map_err(KvmError::CreateVcpu)
    }

    /// Creates the first vCPU, or hands out the one made ahead with the VM.
    pub fn create_vcpu(&self) -> Result<VcpuFd, KvmError> {
        let ahead = self
            .vcpu_ahead
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        match ahead {
            Some(vcpu) => Ok(vcpu),
            None => self.vm.create_vcpu(0).map_err(KvmError::CreateVcpu),
        }
    }
}
