//! The vDSO image: a one-page ELF shared object, built here around the guest shim's vDSO
//! code (`picocenter_guest_shim::vdso_code`), that the loader advertises with
//! AT_SYSINFO_EHDR. It has what glibc's `setup_vdso` and Go's runtime read (the ELF and
//! program headers, a dynamic section, a symbol table, its strings and a SysV hash table)
//! and its symbol versions (every function is LINUX_2.6, as Linux's are: Go's runtime
//! reads the definitions unchecked, and glibc's rtld needs DT_VERSYM once there are
//! definitions), and nothing else: no sections, no relocations.

use picocenter_guest_shim::abi::{vdso, PAGE_SIZE};
use std::sync::OnceLock;

const EHDR_SIZE: usize = 64;
const PHDR_SIZE: usize = 56;
const SYM_SIZE: usize = 24;
const PHDRS_AT: usize = EHDR_SIZE;
const DYNSYM_AT: usize = 0x100;
const DYNSTR_AT: usize = 0x300;
const HASH_AT: usize = 0x500;
const DYNAMIC_AT: usize = 0x600;
const VERDEF_AT: usize = 0x700;
const VERSYM_AT: usize = 0x780;
/// Bytes of an Elf64_Verdef, and of the one Elf64_Verdaux after each.
const VERDEF_SIZE: usize = 20;
const VERDAUX_SIZE: usize = 8;
const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const PF_X: u32 = 1;
const PF_R: u32 = 4;
const DT_NULL: u64 = 0;
const DT_HASH: u64 = 4;
const DT_STRTAB: u64 = 5;
const DT_SYMTAB: u64 = 6;
const DT_STRSZ: u64 = 10;
const DT_SYMENT: u64 = 11;
const DT_SONAME: u64 = 14;
const DT_VERSYM: u64 = 0x6fff_fff0;
const DT_VERDEF: u64 = 0x6fff_fffc;
const DT_VERDEFNUM: u64 = 0x6fff_fffd;
const VER_FLG_BASE: u16 = 1;
/// The version Linux's vDSO gives its functions, which glibc and Go ask for.
const VERSION: &str = "LINUX_2.6";
const STB_GLOBAL: u8 = 1;
const STB_WEAK: u8 = 2;
const STT_FUNC: u8 = 2;
/// The index symbols name as their section. There are no section headers; what matters
/// is that it is neither SHN_UNDEF (glibc and Go skip those) nor SHN_ABS (glibc would not
/// add the load address).
const TEXT_SECTION: u16 = 1;

/// The exported functions: (name, offset of the entry point in the code, binding). Linux
/// exports each as `__vdso_NAME` and as a weak `NAME`.
const SYMBOLS: [(&str, u64, u8); 8] = [
    ("__vdso_clock_gettime", vdso::CLOCK_GETTIME, STB_GLOBAL),
    ("__vdso_gettimeofday", vdso::GETTIMEOFDAY, STB_GLOBAL),
    ("__vdso_time", vdso::TIME, STB_GLOBAL),
    ("__vdso_getcpu", vdso::GETCPU, STB_GLOBAL),
    ("clock_gettime", vdso::CLOCK_GETTIME, STB_WEAK),
    ("gettimeofday", vdso::GETTIMEOFDAY, STB_WEAK),
    ("time", vdso::TIME, STB_WEAK),
    ("getcpu", vdso::GETCPU, STB_WEAK),
];

/// The SysV ELF hash of a symbol name.
fn elf_hash(name: &[u8]) -> u32 {
    let mut h: u32 = 0;
    for &c in name {
        h = (h << 4).wrapping_add(u32::from(c));
        let g = h & 0xf000_0000;
        if g != 0 {
            h ^= g >> 24;
        }
        h &= !g;
    }
    h
}

fn put(page: &mut [u8], at: usize, bytes: &[u8]) {
    page[at..at + bytes.len()].copy_from_slice(bytes);
}

fn build() -> Vec<u8> {
    let mut page = vec![0u8; PAGE_SIZE as usize];
    let code = picocenter_guest_shim::vdso_code();
    let code_at = vdso::CODE as usize;
    assert!(
        code_at + code.len() <= page.len(),
        "the vDSO code fits its page"
    );
    put(&mut page, code_at, code);

    // Strings: the soname, then each symbol's name.
    let mut strings = vec![0u8];
    let soname = strings.len() as u64;
    strings.extend_from_slice(b"linux-vdso.so.1\0");
    let version = strings.len() as u32;
    strings.extend_from_slice(VERSION.as_bytes());
    strings.push(0);
    let mut names = Vec::new();
    for (name, _, _) in SYMBOLS {
        names.push(strings.len() as u32);
        strings.extend_from_slice(name.as_bytes());
        strings.push(0);
    }
    assert!(DYNSTR_AT + strings.len() <= HASH_AT);
    put(&mut page, DYNSTR_AT, &strings);

    // Symbols: the null one, then ours.
    for (i, ((_, offset, binding), name)) in SYMBOLS.iter().zip(&names).enumerate() {
        let mut sym = [0u8; SYM_SIZE];
        sym[0..4].copy_from_slice(&name.to_le_bytes());
        sym[4] = (binding << 4) | STT_FUNC;
        sym[6..8].copy_from_slice(&TEXT_SECTION.to_le_bytes());
        sym[8..16].copy_from_slice(&(vdso::CODE + offset).to_le_bytes());
        sym[16..24].copy_from_slice(&16u64.to_le_bytes());
        put(&mut page, DYNSYM_AT + (i + 1) * SYM_SIZE, &sym);
    }
    let count = SYMBOLS.len() + 1;
    assert!(DYNSYM_AT + count * SYM_SIZE <= DYNSTR_AT);

    // A SysV hash table with one bucket per symbol.
    let buckets = count;
    let mut bucket = vec![0u32; buckets];
    let mut chain = vec![0u32; count];
    for (i, (name, _, _)) in SYMBOLS.iter().enumerate() {
        let index = (i + 1) as u32;
        let b = elf_hash(name.as_bytes()) as usize % buckets;
        chain[index as usize] = bucket[b];
        bucket[b] = index;
    }
    let mut hash = Vec::new();
    for word in [buckets as u32, count as u32]
        .into_iter()
        .chain(bucket)
        .chain(chain)
    {
        hash.extend_from_slice(&word.to_le_bytes());
    }
    assert!(HASH_AT + hash.len() <= DYNAMIC_AT);
    put(&mut page, HASH_AT, &hash);

    // Version definitions: the object itself (the base), then LINUX_2.6.
    let definitions = [
        (VER_FLG_BASE, 1u16, soname as u32, "linux-vdso.so.1"),
        (0, 2, version, VERSION),
    ];
    for (i, (flags, index, name, text)) in definitions.iter().enumerate() {
        let at = VERDEF_AT + i * (VERDEF_SIZE + VERDAUX_SIZE);
        let last = i + 1 == definitions.len();
        let mut def = Vec::with_capacity(VERDEF_SIZE + VERDAUX_SIZE);
        def.extend_from_slice(&1u16.to_le_bytes()); // vd_version
        def.extend_from_slice(&flags.to_le_bytes());
        def.extend_from_slice(&index.to_le_bytes());
        def.extend_from_slice(&1u16.to_le_bytes()); // vd_cnt
        def.extend_from_slice(&elf_hash(text.as_bytes()).to_le_bytes());
        def.extend_from_slice(&(VERDEF_SIZE as u32).to_le_bytes()); // vd_aux
        let next = if last { 0 } else { VERDEF_SIZE + VERDAUX_SIZE };
        def.extend_from_slice(&(next as u32).to_le_bytes());
        def.extend_from_slice(&name.to_le_bytes()); // vda_name
        def.extend_from_slice(&0u32.to_le_bytes()); // vda_next
        put(&mut page, at, &def);
    }
    assert!(VERDEF_AT + definitions.len() * (VERDEF_SIZE + VERDAUX_SIZE) <= VERSYM_AT);
    // Each symbol's version: the null symbol's is local (0), the rest LINUX_2.6 (2).
    let versions: Vec<u8> = std::iter::once(0u16)
        .chain(std::iter::repeat_n(2u16, SYMBOLS.len()))
        .flat_map(u16::to_le_bytes)
        .collect();
    assert!(VERSYM_AT + versions.len() <= code_at);
    put(&mut page, VERSYM_AT, &versions);

    let dynamic = [
        (DT_HASH, HASH_AT as u64),
        (DT_VERSYM, VERSYM_AT as u64),
        (DT_VERDEF, VERDEF_AT as u64),
        (DT_VERDEFNUM, definitions.len() as u64),
        (DT_STRTAB, DYNSTR_AT as u64),
        (DT_SYMTAB, DYNSYM_AT as u64),
        (DT_STRSZ, strings.len() as u64),
        (DT_SYMENT, SYM_SIZE as u64),
        (DT_SONAME, soname),
        (DT_NULL, 0),
    ];
    let dynamic: Vec<u8> = dynamic
        .iter()
        .flat_map(|(tag, value)| [tag.to_le_bytes(), value.to_le_bytes()].concat())
        .collect();
    assert!(DYNAMIC_AT + dynamic.len() <= VERDEF_AT);
    put(&mut page, DYNAMIC_AT, &dynamic);

    // The ELF header.
    let mut ehdr = [0u8; EHDR_SIZE];
    ehdr[0..4].copy_from_slice(b"\x7fELF");
    ehdr[4] = 2; // 64-bit
    ehdr[5] = 1; // little-endian
    ehdr[6] = 1; // version
    ehdr[16..18].copy_from_slice(&3u16.to_le_bytes()); // ET_DYN
    ehdr[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
    ehdr[20..24].copy_from_slice(&1u32.to_le_bytes());
    ehdr[32..40].copy_from_slice(&(PHDRS_AT as u64).to_le_bytes());
    ehdr[52..54].copy_from_slice(&(EHDR_SIZE as u16).to_le_bytes());
    ehdr[54..56].copy_from_slice(&(PHDR_SIZE as u16).to_le_bytes());
    ehdr[56..58].copy_from_slice(&2u16.to_le_bytes());
    ehdr[58..60].copy_from_slice(&64u16.to_le_bytes());
    put(&mut page, 0, &ehdr);

    // Program headers: the whole page as one read + execute segment, and the dynamic
    // section.
    let phdr = |kind: u32, flags: u32, offset: u64, size: u64, align: u64| {
        let mut out = [0u8; PHDR_SIZE];
        out[0..4].copy_from_slice(&kind.to_le_bytes());
        out[4..8].copy_from_slice(&flags.to_le_bytes());
        out[8..16].copy_from_slice(&offset.to_le_bytes()); // p_offset
        out[16..24].copy_from_slice(&offset.to_le_bytes()); // p_vaddr
        out[24..32].copy_from_slice(&offset.to_le_bytes()); // p_paddr
        out[32..40].copy_from_slice(&size.to_le_bytes()); // p_filesz
        out[40..48].copy_from_slice(&size.to_le_bytes()); // p_memsz
        out[48..56].copy_from_slice(&align.to_le_bytes());
        out
    };
    put(
        &mut page,
        PHDRS_AT,
        &phdr(PT_LOAD, PF_R | PF_X, 0, PAGE_SIZE, PAGE_SIZE),
    );
    put(
        &mut page,
        PHDRS_AT + PHDR_SIZE,
        &phdr(PT_DYNAMIC, PF_R, DYNAMIC_AT as u64, dynamic.len() as u64, 8),
    );
    page
}

/// The vDSO page.
pub fn image() -> &'static [u8] {
    static IMAGE: OnceLock<Vec<u8>> = OnceLock::new();
    IMAGE.get_or_init(build)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u64_at(page: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(page[at..at + 8].try_into().unwrap())
    }

    fn u32_at(page: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(page[at..at + 4].try_into().unwrap())
    }

    /// Finds a symbol the way a dynamic linker does: through the dynamic section to the
    /// hash table, then along the bucket's chain.
    fn lookup(page: &[u8], name: &str) -> Option<u64> {
        let phoff = u64_at(page, 32) as usize;
        let dynamic = (0..2)
            .map(|i| phoff + i * PHDR_SIZE)
            .find(|&ph| u32_at(page, ph) == PT_DYNAMIC)
            .map(|ph| u64_at(page, ph + 16) as usize)?;
        let mut tags = std::collections::HashMap::new();
        for entry in (dynamic..).step_by(16) {
            let tag = u64_at(page, entry);
            if tag == DT_NULL {
                break;
            }
            tags.insert(tag, u64_at(page, entry + 8) as usize);
        }
        let (hash, symtab, strtab) = (tags[&DT_HASH], tags[&DT_SYMTAB], tags[&DT_STRTAB]);
        let buckets = u32_at(page, hash) as usize;
        let mut index = u32_at(
            page,
            hash + 8 + 4 * (elf_hash(name.as_bytes()) as usize % buckets),
        );
        let chains = hash + 8 + 4 * buckets;
        while index != 0 {
            let sym = symtab + index as usize * SYM_SIZE;
            let start = strtab + u32_at(page, sym) as usize;
            let end = start + page[start..].iter().position(|&b| b == 0)?;
            if &page[start..end] == name.as_bytes() {
                return Some(u64_at(page, sym + 8));
            }
            index = u32_at(page, chains + 4 * index as usize);
        }
        None
    }

    #[test]
    fn every_function_is_found_at_its_fixed_entry_point() {
        let page = image();
        assert_eq!(page.len(), PAGE_SIZE as usize);
        assert_eq!(&page[..4], b"\x7fELF");
        for (name, offset, _) in SYMBOLS {
            assert_eq!(lookup(page, name), Some(vdso::CODE + offset), "{name}");
        }
        assert_eq!(lookup(page, "__vdso_nothing"), None);
        // The known hash of "printf", from the ELF specification's algorithm.
        assert_eq!(elf_hash(b"printf"), 0x077905a6);
    }
}
