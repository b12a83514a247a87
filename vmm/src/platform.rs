//! What differs between the two kinds of KVM host, and nothing else.
//!
//! | | kvm_pvm (this project's machines) | hardware KVM (VMX/SVM) |
//! |---|---|---|
//! | `syscall` from ring 3 | reaches LSTAR still at CPL 3 | enters LSTAR at CPL 0 |
//! | completing a syscall | RIP = RCX, RFLAGS = R11 | also CS/SS back to user |
//! | removed translations | seen after re-registering the page-table slot | with EPT/NPT, seen after a guest TLB flush; with shadow paging, as on kvm_pvm |
//!
//! See ../shared/PLATFORM.md for the measurements behind each row. Hardware KVM without
//! EPT/NPT (`kvm_amd npt=0`, `kvm_intel ept=0`, or a CPU without them) shadows the guest's
//! page tables as kvm_pvm does: the VMM's own writes to them are invisible to KVM, and a
//! guest TLB flush only re-syncs shadow pages KVM already knows to be out of date, so a
//! stale writable translation survives it (found by the hardware-KVM runner, tests/hwkvm).

use std::path::Path;

/// How an invalidation was done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalidation {
    /// These many entries were rewritten one by one.
    Entries(u64),
    /// Every translation was dropped.
    Everything,
}

/// The kind of KVM this host provides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Platform {
    /// kvm_pvm: paravirtual, shadow paging, guests at hardware CPL 3.
    Pvm,
    /// kvm_intel or kvm_amd with nested paging (EPT/NPT), on bare metal or a nested-virt
    /// host: the CPU walks the guest's page tables itself.
    Hardware,
    /// kvm_intel or kvm_amd without EPT/NPT: KVM shadows the guest's page tables.
    HardwareShadowPaging,
}

impl Platform {
    /// Detects the platform from the loaded KVM module and its paging mode.
    /// Detected once per process, from /sys/module: a jailed VMM no longer sees it, so
    /// the jail detects before it hides the host (see `sandbox::jail`).
    pub fn detect() -> Self {
        static DETECTED: std::sync::OnceLock<Platform> = std::sync::OnceLock::new();
        *DETECTED.get_or_init(|| Self::detect_in(Path::new("/sys/module")))
    }

    fn detect_in(modules: &Path) -> Self {
        if modules.join("kvm_pvm").exists() {
            return Platform::Pvm;
        }
        // The module parameters read "N" when nested paging is off or the CPU lacks it.
        let off = |param: &str| {
            std::fs::read_to_string(modules.join(param)).is_ok_and(|v| v.trim() == "N")
        };
        if off("kvm_amd/parameters/npt") || off("kvm_intel/parameters/ept") {
            Platform::HardwareShadowPaging
        } else {
            Platform::Hardware
        }
    }

    /// A name for logs and `picocenter run --verbose`.
    pub fn describe(self) -> &'static str {
        match self {
            Platform::Pvm => "kvm_pvm (syscall stays at CPL 3; invalidate by slot re-registration)",
            Platform::Hardware => {
                "hardware KVM (syscall enters CPL 0; invalidate by guest TLB flush)"
            }
            Platform::HardwareShadowPaging => {
                "hardware KVM with shadow paging (syscall enters CPL 0; invalidate by slot re-registration)"
            }
        }
    }

    /// Whether the doorbell runs at CPL 0, so that completing a syscall must also restore
    /// the user code and stack segments.
    pub fn syscall_enters_ring0(self) -> bool {
        self != Platform::Pvm
    }

    /// How removed or reduced translations are made to take effect (carried out by
    /// `Vcpu::invalidate_translations`).
    pub fn invalidation_method(self) -> InvalidationMethod {
        match self {
            // The shadow MMU ignores guest TLB flushes. A few entries are cheapest to
            // rewrite from ring 0, which makes it drop just those (~1.4 µs per emulated
            // instruction); many at once, or if that was interrupted, by re-registering
            // the page-table slot, which drops every translation (~60 µs plus refaults).
            Platform::Pvm => InvalidationMethod::RewriteEntriesElseReregister,
            // Hardware shadow paging: there the ring-0 PTE writer runs natively, and its
            // stores only mark KVM's shadow page out of sync, to be re-read at the next
            // guest TLB flush; re-registering the slot drops every shadow page for sure.
            Platform::HardwareShadowPaging => InvalidationMethod::Reregister,
            // Changing CR4 through KVM_SET_SREGS resets KVM's MMU context, and loading the
            // new root flushes the guest's TLB. No global pages are used, so PGE itself
            // changes nothing else.
            Platform::Hardware => InvalidationMethod::FlushTlb,
        }
    }
}

/// How a platform invalidates translations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvalidationMethod {
    /// Rewrite the changed entries from ring 0 with the PTE writer; if they are too many
    /// or the writer is interrupted, re-register the page-table slot.
    RewriteEntriesElseReregister,
    /// Re-register the page-table slot, which drops every translation.
    Reregister,
    /// Flush the guest TLB by toggling CR4.PGE.
    FlushTlb,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_pvm_by_its_module() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Platform::detect_in(dir.path()), Platform::Hardware);
        std::fs::create_dir(dir.path().join("kvm_pvm")).unwrap();
        assert_eq!(Platform::detect_in(dir.path()), Platform::Pvm);
    }

    #[test]
    fn detects_shadow_paging_on_hardware() {
        let dir = tempfile::tempdir().unwrap();
        let params = dir.path().join("kvm_amd/parameters");
        std::fs::create_dir_all(&params).unwrap();
        std::fs::write(params.join("npt"), "Y\n").unwrap();
        assert_eq!(Platform::detect_in(dir.path()), Platform::Hardware);
        std::fs::write(params.join("npt"), "N\n").unwrap();
        assert_eq!(
            Platform::detect_in(dir.path()),
            Platform::HardwareShadowPaging
        );
        assert!(Platform::HardwareShadowPaging.syscall_enters_ring0());
    }
}
