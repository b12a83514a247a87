//! Guest memory: the VMM is the guest's kernel for memory.
//!
//! * [`layout`]: guest-physical layout and memory slots;
//! * [`phys`]: the host mappings behind the slots (vm-memory);
//! * [`frames`]: guest-physical frame allocation;
//! * [`paging`]: the page tables the VMM writes;
//! * [`vma`]: the app's areas;
//! * [`space`]: all of it together, with mmap, munmap, mprotect, mremap, brk, demand
//!   faults and the checked accessors for app pointers.

pub mod frames;
pub mod io;
pub mod layout;
pub mod paging;
pub mod phys;
pub mod space;
pub mod uffd;
pub mod vma;

pub use io::Pod;
pub use space::persist::PageState;
pub use space::{Access, AddressSpace, FaultResolution, Placement};
pub use vma::{Backing, Prot, Vma, VmaRole};

/// An address in the app's virtual address space. Host code reaches the memory behind it
/// only through [`AddressSpace`]'s checked accessors, which translate it through the page
/// tables and return EFAULT for anything the app itself could not access.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UserAddr(pub u64);

impl UserAddr {
    /// The address `bytes` further on, or `None` on overflow.
    pub fn offset(self, bytes: u64) -> Option<UserAddr> {
        self.0.checked_add(bytes).map(UserAddr)
    }

    /// Whether this is the null pointer.
    pub fn is_null(self) -> bool {
        self.0 == 0
    }
}
