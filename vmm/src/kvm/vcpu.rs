//! The vCPU as the run loop sees it: run, decode the exit into an owned value, read and
//! write registers through `kvm_run`'s sync area, and the platform-specific steps of
//! completing a syscall and invalidating translations.

use super::cpu;
use super::system;
use super::{KvmError, Machine};
use crate::memory::layout::slot;
use crate::platform::{Invalidation, InvalidationMethod, Platform};
use kvm_bindings::{kvm_regs, kvm_sregs};
use kvm_ioctls::{SyncReg, VcpuExit, VcpuFd};
use picocenter_guest_shim::abi;

/// Why `KVM_RUN` returned, decoded and detached from `kvm_run`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// The doorbell rang: a system call is waiting in the registers.
    Syscall,
    /// The app stored to the doorbell's MMIO page from outside the doorbell.
    StrayDoorbellStore {
        /// Where it did so.
        rip: u64,
    },
    /// A calibration exit; resume at once.
    Calibration,
    /// The PTE writer finished its list.
    PteWriterDone,
    /// The doorbell asks the VMM to act (deliver signals) after a mailbox call.
    Notify,
    /// An exception stub ran for this vector.
    Exception(u8),
    /// A kick interrupted the run (EINTR).
    Interrupted,
    /// KVM could not get a host page behind guest memory (EFAULT): a file mapped into
    /// guest memory shrank on the host.
    HostFault,
    /// Anything else: the guest is beyond repair.
    Unexpected(String),
}

/// Why a vCPU operation failed on the host side.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A register ioctl failed.
    #[error("{op} failed")]
    Ioctl {
        /// The ioctl.
        op: &'static str,
        /// What KVM said.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Re-registering the page-table slot failed.
    #[error("invalidating guest translations")]
    Invalidate(#[source] KvmError),
}

fn ioctl(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
    move |source| VcpuError::Ioctl { op, source }
}

/// A vCPU's fd and `kvm_run` mapping, as numbers: in a forked copy of the VMM, the
/// `Vcpu` that owns them lives on a thread the fork did not copy, so it is never dropped
/// there; [`ForkedVcpu::release`] closes and unmaps them instead.
#[derive(Debug, Clone, Copy)]
pub struct ForkedVcpu {
    fd: i32,
    run_page: usize,
    run_size: usize,
}

impl ForkedVcpu {
    /// Closes the fd and unmaps the `kvm_run` page.
    ///
    /// # Safety
    ///
    /// Only in a forked process, on a vCPU whose `Vcpu` belongs to a thread of the parent
    /// (so that nothing in this process uses it or ever drops it), and at most once.
    pub unsafe fn release(self) {
        // SAFETY: per the contract, nothing in this process uses the mapping or the fd,
        // nor will release them again; munmap of a range that is no longer mapped, or a
        // close of a closed fd, fails harmlessly.
        unsafe {
            if self.run_size > 0 {
                libc::munmap(self.run_page as *mut libc::c_void, self.run_size);
            }
            libc::close(self.fd);
        }
    }
}

/// A vCPU of a picoprocess.
#[derive(Debug)]
pub struct Vcpu {
    fd: VcpuFd,
    platform: Platform,
    sregs_synced: bool,
}

impl Vcpu {
    /// Wraps a configured vCPU. On hardware KVM the segment registers are synced through
    /// `kvm_run` too, because every syscall return must rewrite CS and SS.
    ///
    /// `kvm_run`'s register area only holds the vCPU's registers after a `KVM_RUN`; until
    /// then it is zero. The registers the setup (or a restore) gave the vCPU are copied in
    /// here, so that what the VMM reads before the first run (to deliver a signal a
    /// restored timer raised, say) is the app's context and not zeros, and so that a
    /// change made before the first run does not write those zeros back.
    pub fn new(mut fd: VcpuFd, platform: Platform) -> Result<Self, VcpuError> {
        let regs = fd.get_regs().map_err(ioctl("KVM_GET_REGS"))?;
        fd.sync_regs_mut().regs = regs;
        fd.set_sync_valid_reg(SyncReg::Register);
        let sregs_synced = platform.syscall_enters_ring0();
        if sregs_synced {
            let sregs = fd.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
            fd.sync_regs_mut().sregs = sregs;
            fd.set_sync_valid_reg(SyncReg::SystemRegister);
        }
        Ok(Self {
            fd,
            platform,
            sregs_synced,
        })
    }

    /// The platform this vCPU runs on.
    pub fn platform(&self) -> Platform {
        self.platform
    }

    /// What a forked copy of this VMM must let go of by hand, should this vCPU's thread
    /// not exist there (see [`ForkedVcpu::release`]).
    pub fn forked_copy(&mut self, kvm: &kvm_ioctls::Kvm) -> ForkedVcpu {
        use std::os::fd::AsRawFd;
        ForkedVcpu {
            fd: self.fd.as_raw_fd(),
            run_page: (&raw mut *self.fd.get_kvm_run()) as usize,
            run_size: kvm.get_vcpu_mmap_size().unwrap_or(0),
        }
    }

    /// Pointer to `kvm_run.immediate_exit`, for the kick handler.
    pub fn immediate_exit_ptr(&mut self) -> *mut u8 {
        &raw mut self.fd.get_kvm_run().immediate_exit
    }

    /// Clears a kick that has been handled.
    pub fn clear_immediate_exit(&mut self) {
        self.fd.set_kvm_immediate_exit(0);
    }

    /// Runs the guest until the next exit.
    pub fn run(&mut self) -> Exit {
        match self.fd.run() {
            Ok(VcpuExit::MmioWrite(addr, _)) if addr == abi::DOORBELL_MMIO_GPA => {
                let rip = self.fd.sync_regs().regs.rip;
                if rip.wrapping_sub(abi::DOORBELL_VA) < abi::PAGE_SIZE {
                    Exit::Syscall
                } else {
                    Exit::StrayDoorbellStore { rip }
                }
            }
            Ok(VcpuExit::MmioWrite(addr, _)) if addr == abi::CALIBRATION_MMIO_GPA => {
                Exit::Calibration
            }
            Ok(VcpuExit::MmioWrite(addr, _)) if addr == abi::NOTIFY_MMIO_GPA => Exit::Notify,
            Ok(VcpuExit::IoOut(port, _))
                if (abi::EXCEPTION_PORT_BASE
                    ..abi::EXCEPTION_PORT_BASE + abi::STUB_COUNT as u16)
                    .contains(&port) =>
            {
                Exit::Exception((port - abi::EXCEPTION_PORT_BASE) as u8)
            }
            Ok(VcpuExit::IoOut(port, _)) if port == abi::PTE_WRITER_DONE_PORT => {
                Exit::PteWriterDone
            }
            Ok(VcpuExit::Intr) => Exit::Interrupted,
            Ok(other) => Exit::Unexpected(format!("{other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Exit::Interrupted,
            Err(e) if e.errno() == libc::EFAULT => Exit::HostFault,
            Err(e) => Exit::Unexpected(format!("KVM_RUN failed: {e}")),
        }
    }

    /// The general registers as of the last exit.
    pub fn regs(&self) -> kvm_regs {
        self.fd.sync_regs().regs
    }

    /// The general registers, for changing; they are written back on the next run.
    pub fn regs_mut(&mut self) -> &mut kvm_regs {
        self.fd.set_sync_dirty_reg(SyncReg::Register);
        &mut self.fd.sync_regs_mut().regs
    }

    /// The segment and control registers.
    pub fn sregs(&self) -> Result<kvm_sregs, VcpuError> {
        if self.sregs_synced {
            Ok(self.fd.sync_regs().sregs)
        } else {
            self.fd.get_sregs().map_err(ioctl("KVM_GET_SREGS"))
        }
    }

    /// Sets the segment and control registers.
    pub fn set_sregs(&mut self, sregs: &kvm_sregs) -> Result<(), VcpuError> {
        if self.sregs_synced {
            self.fd.sync_regs_mut().sregs = *sregs;
            self.fd.set_sync_dirty_reg(SyncReg::SystemRegister);
            Ok(())
        } else {
            self.fd.set_sregs(sregs).map_err(ioctl("KVM_SET_SREGS"))
        }
    }

    /// Completes a syscall the VMM has answered: resume the app after its `syscall`
    /// instruction, as `sysret` would.
    /// Where the doorbell ran at CPL 0 (see `Platform::syscall_enters_ring0`), the user
    /// code and stack segments come back too.
    pub fn complete_syscall(&mut self) -> Result<(), VcpuError> {
        let regs = self.regs_mut();
        regs.rip = regs.rcx;
        regs.rflags = regs.r11;
        if self.platform.syscall_enters_ring0() {
            let mut sregs = self.sregs()?;
            let fs_base = sregs.fs.base;
            cpu::set_user_segments(&mut sregs, fs_base);
            self.set_sregs(&sregs)?;
        }
        Ok(())
    }

    /// Sets the FS base (arch_prctl(ARCH_SET_FS)).
    pub fn set_fs_base(&mut self, base: u64) -> Result<(), VcpuError> {
        let mut sregs = self.sregs()?;
        sregs.fs.base = base;
        self.set_sregs(&sregs)
    }

    /// Makes removed or reduced translations take effect before the guest runs again.
    pub fn invalidate_translations(
        &mut self,
        machine: &Machine,
        space: &crate::memory::AddressSpace,
    ) -> Result<Invalidation, VcpuError> {
        /// CR4.PGE: changing it makes KVM flush the guest TLB on hardware KVM.
        const CR4_PGE: u64 = 1 << 7;
        let reregister = |machine: &Machine| {
            machine
                .reregister_slot(slot::PAGE_TABLES)
                .map_err(VcpuError::Invalidate)
                .map(|()| Invalidation::Everything)
        };
        match self.platform.invalidation_method() {
            InvalidationMethod::RewriteEntriesElseReregister => {
                if let Some(entries) = space.stale_entries() {
                    if let Ok(Some((list, count))) = system::write_pte_list(space, &entries) {
                        if self.run_pte_writer(list, count)? {
                            return Ok(Invalidation::Entries(count));
                        }
                    }
                }
                reregister(machine)
            }
            InvalidationMethod::Reregister => reregister(machine),
            InvalidationMethod::FlushTlb => {
                let mut sregs = self.sregs()?;
                sregs.cr4 ^= CR4_PGE;
                self.set_sregs(&sregs)?;
                Ok(Invalidation::Everything)
            }
        }
    }

    /// Makes another vCPU's invalidation of translations (see
    /// [`Vcpu::invalidate_translations`]) take effect on this one too, before it runs
    /// again. On kvm_pvm both ways of invalidating act on the VM's shadow tables, which
    /// every vCPU shares, so nothing is left to do; on hardware KVM each vCPU flushes its
    /// own TLB.
    pub fn catch_up_invalidation(&mut self) -> Result<(), VcpuError> {
        if let InvalidationMethod::FlushTlb = self.platform.invalidation_method() {
            /// CR4.PGE: changing it makes KVM flush the guest TLB on hardware KVM.
            const CR4_PGE: u64 = 1 << 7;
            let mut sregs = self.sregs()?;
            sregs.cr4 ^= CR4_PGE;
            self.set_sregs(&sregs)?;
        }
        Ok(())
    }

    /// Runs the PTE writer over the list at `list_va` (`count` entries) in ring 0, then puts
    /// the vCPU back exactly as it was. Returns whether the writer finished (a kick, say,
    /// can stop it; the caller then invalidates the other way).
    pub fn run_pte_writer(&mut self, list_va: u64, count: u64) -> Result<bool, VcpuError> {
        let saved_regs = self.regs();
        let saved_sregs = self.sregs()?;
        let mut sregs = saved_sregs;
        cpu::set_kernel_segments(&mut sregs);
        self.set_sregs(&sregs)?;
        {
            let regs = self.regs_mut();
            regs.rip = abi::STUBS_VA + abi::PTE_WRITER_OFFSET;
            regs.rsp = super::system::kernel_stack_top();
            regs.rsi = list_va;
            regs.rcx = count;
            regs.rflags = 0x2;
        }
        let finished = self.run() == Exit::PteWriterDone;
        self.set_sregs(&saved_sregs)?;
        *self.regs_mut() = saved_regs;
        Ok(finished)
    }

    /// Puts the vCPU back in ring 3 at `rip`/`rsp`/`rflags` (after an exception).
    pub fn resume_user(&mut self, rip: u64, rsp: u64, rflags: u64) -> Result<(), VcpuError> {
        let mut sregs = self.sregs()?;
        let fs_base = sregs.fs.base;
        cpu::set_user_segments(&mut sregs, fs_base);
        self.set_sregs(&sregs)?;
        let regs = self.regs_mut();
        regs.rip = rip;
        regs.rsp = rsp;
        regs.rflags = rflags;
        Ok(())
    }

    /// Whether KVM holds an exception it has not yet delivered to the guest: a fault it
    /// took while the guest ran and must inject when the guest runs again. Such an exception
    /// belongs to the instruction at the current RIP; it is injected at whatever RIP the
    /// registers hold on the next `KVM_RUN`.
    pub fn exception_in_flight(&self) -> Result<bool, VcpuError> {
        let events = self
            .fd
            .get_vcpu_events()
            .map_err(ioctl("KVM_GET_VCPU_EVENTS"))?;
        Ok(events.exception.injected != 0 || events.exception.pending != 0)
    }

    /// The FPU/SSE/AVX state (KVM_GET_XSAVE).
    pub fn xsave(&self) -> Result<kvm_bindings::kvm_xsave, VcpuError> {
        self.fd.get_xsave().map_err(ioctl("KVM_GET_XSAVE"))
    }

    /// Sets the FPU/SSE/AVX state (KVM_SET_XSAVE). KVM validates the image and refuses
    /// a malformed one.
    pub fn set_xsave(&self, xsave: &kvm_bindings::kvm_xsave) -> Result<(), VcpuError> {
        // SAFETY: the guest never has dynamically enabled XSTATE features (XCR0 excludes AMX
        // and the VMM never asks for guest permission to use them), so the state KVM copies
        // fits in the 4096-byte `kvm_xsave`.
        unsafe { self.fd.set_xsave(xsave) }.map_err(ioctl("KVM_SET_XSAVE"))
    }

    /// The raw vCPU, for setup and state capture.
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A restored vCPU is read (to deliver a pending signal, or to snapshot it again)
    /// before it has run once; it must read as the context it was given, not zeros.
    #[test]
    fn registers_set_before_the_first_run_are_what_the_vmm_reads() {
        let kvm = kvm_ioctls::Kvm::new().expect("every Picocenter host has /dev/kvm");
        let vm = kvm.create_vm().expect("KVM_CREATE_VM");
        let fd = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
        let given = kvm_regs {
            rip: 0x40_1000,
            rsp: 0x7fff_f000,
            rax: 39,
            rflags: 0x202,
            ..Default::default()
        };
        fd.set_regs(&given).expect("KVM_SET_REGS");
        let given_sregs = fd.get_sregs().expect("KVM_GET_SREGS");
        let platform = Platform::detect();
        let mut vcpu = Vcpu::new(fd, platform).expect("the vCPU");
        let read = vcpu.regs();
        assert_eq!((read.rip, read.rsp, read.rax), (0x40_1000, 0x7fff_f000, 39));
        assert_eq!(vcpu.sregs().unwrap().cr0, given_sregs.cr0);
        // A change before the first run keeps the rest of the context.
        vcpu.regs_mut().rax = 7;
        assert_eq!(vcpu.regs().rsp, 0x7fff_f000);
    }
}
