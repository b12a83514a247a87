//! What differs between the two kinds of KVM host, and nothing else.
//!
//! | | kvm_pvm (this project's machines) | hardware KVM (VMX/SVM) |
//! |---|---|---|
//! | `syscall` from ring 3 | reaches LSTAR still at CPL 3 | enters LSTAR at CPL 0 |
//! | completing a syscall | RIP = RCX, RFLAGS = R11 | also CS/SS back to user |
//! | removed translations | seen after re-registering the page-table slot | seen after a guest TLB flush |
//!
//! See ../shared/PLATFORM.md for the measurements behind each row.

use std::path::Path;

/// The kind of KVM this host provides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Platform {
    /// kvm_pvm: paravirtual, shadow paging, guests at hardware CPL 3.
    Pvm,
    /// kvm_intel or kvm_amd, on bare metal or a nested-virt host.
    Hardware,
}

impl Platform {
    /// Detects the platform from the loaded KVM module.
    pub fn detect() -> Self {
        Self::detect_in(Path::new("/sys/module"))
    }

    fn detect_in(modules: &Path) -> Self {
        if modules.join("kvm_pvm").exists() {
            Platform::Pvm
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
        }
    }

    /// Whether the doorbell runs at CPL 0, so that completing a syscall must also restore
    /// the user code and stack segments.
    pub fn syscall_enters_ring0(self) -> bool {
        self == Platform::Hardware
    }
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
}
