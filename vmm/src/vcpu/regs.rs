//! Architectural state of the boot vCPU: GDT, identity page tables, segment and control
//! registers, general registers, FPU, MSRs and the local APIC's LINT pins.

use kvm_bindings::{
    kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs,
};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use crate::boot::{EntryMode, KernelEntry};
use crate::memory::{self, GuestMemory};

/// Setting up a vCPU's registers failed.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("cannot write boot page tables or GDT to guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
    #[error("KVM refused the vCPU's {what}: {source}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM accepted only {set} of {total} boot MSRs")]
    Msrs { set: usize, total: usize },
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> RegsError {
    move |source| RegsError::Kvm { what, source }
}

// GDT descriptors as (flags << 8 | access) pairs; see the Intel SDM vol. 3 §3.4.5.
const CODE64: u16 = 0xa09b; // G, L; present, ring 0, code, execute/read, accessed
const CODE32: u16 = 0xc09b; // G, D; present, ring 0, code, execute/read, accessed
const DATA: u16 = 0xc093; // G, B; present, ring 0, data, read/write, accessed
const TSS: u16 = 0x008b; // present, ring 0, 32/64-bit busy TSS

const CODE_INDEX: usize = 1;
const DATA_INDEX: usize = 2;
const TSS_INDEX: usize = 3;

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Page-table entry bits: present, writable, and (in a page directory) 2 MiB page.
const PTE_PRESENT_RW: u64 = 0x3;
const PDE_2M_PAGE: u64 = 0x83;
/// The boot identity map covers the first 4 GiB with 2 MiB pages.
const IDENTITY_MAP_GIB: u64 = 4;

fn gdt_entry(flags_access: u16, base: u32, limit: u32) -> u64 {
    let base = u64::from(base);
    let limit = u64::from(limit);
    let flags_access = u64::from(flags_access);
    ((base & 0xff00_0000) << 32)
        | ((flags_access & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

fn segment(entry: u64, index: usize) -> kvm_segment {
    let access = (entry >> 40) & 0xff;
    let flags = (entry >> 52) & 0xf;
    let raw_limit = ((entry >> 32) & 0x000f_0000) | (entry & 0xffff);
    let granular = flags & 0x8 != 0;
    kvm_segment {
        base: ((entry >> 32) & 0xff00_0000) | ((entry >> 16) & 0x00ff_ffff),
        limit: if granular {
            ((raw_limit << 12) | 0xfff) as u32
        } else {
            raw_limit as u32
        },
        selector: (index * 8) as u16,
        type_: (access & 0xf) as u8,
        present: ((access >> 7) & 1) as u8,
        dpl: ((access >> 5) & 3) as u8,
        db: ((flags >> 2) & 1) as u8,
        s: ((access >> 4) & 1) as u8,
        l: ((flags >> 1) & 1) as u8,
        g: granular as u8,
        avl: (flags & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

fn gdt(mode: EntryMode) -> [u64; 4] {
    let code = match mode {
        EntryMode::Linux64 => CODE64,
        EntryMode::Pvh => CODE32,
    };
    [
        0,
        gdt_entry(code, 0, 0xfffff),
        gdt_entry(DATA, 0, 0xfffff),
        gdt_entry(TSS, 0, 0xfffff),
    ]
}

/// Writes the GDT and, for a long-mode entry, identity page tables for the first 4 GiB.
pub fn write_boot_tables(mem: &GuestMemory, mode: EntryMode) -> Result<(), RegsError> {
    for (i, entry) in gdt(mode).iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(memory::GDT_ADDR + i as u64 * 8))?;
    }
    if mode == EntryMode::Linux64 {
        let pml4 = memory::PML4_ADDR;
        let pdpt = pml4 + 0x1000;
        let pd0 = pdpt + 0x1000;
        mem.write_obj(pdpt | PTE_PRESENT_RW, GuestAddress(pml4))?;
        for gib in 0..IDENTITY_MAP_GIB {
            let pd = pd0 + gib * 0x1000;
            mem.write_obj(pd | PTE_PRESENT_RW, GuestAddress(pdpt + gib * 8))?;
            for i in 0..512u64 {
                let phys = ((gib << 9) + i) << 21;
                mem.write_obj(phys | PDE_2M_PAGE, GuestAddress(pd + i * 8))?;
            }
        }
    }
    Ok(())
}

/// Segment and control registers for `mode`'s entry.
pub fn setup_sregs(vcpu: &VcpuFd, mode: EntryMode) -> Result<(), RegsError> {
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(kvm("special registers"))?;
    let table = gdt(mode);
    let code = segment(table[CODE_INDEX], CODE_INDEX);
    let data = segment(table[DATA_INDEX], DATA_INDEX);
    let tss = segment(table[TSS_INDEX], TSS_INDEX);
    sregs.gdt.base = memory::GDT_ADDR;
    sregs.gdt.limit = (std::mem::size_of_val(&table) - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    match mode {
        EntryMode::Linux64 => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.cr3 = memory::PML4_ADDR;
            sregs.cr4 = X86_CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
        }
        EntryMode::Pvh => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
    vcpu.set_sregs(&sregs).map_err(kvm("special registers"))
}

/// General registers: entry point, stack, and the boot-information pointer.
pub fn setup_regs(vcpu: &VcpuFd, entry: KernelEntry) -> Result<(), RegsError> {
    let mut regs = kvm_regs {
        rflags: 0x2, // bit 1 is reserved and always set
        rip: entry.entry.0,
        ..Default::default()
    };
    match entry.mode {
        EntryMode::Linux64 => {
            regs.rsp = memory::BOOT_STACK_TOP;
            regs.rbp = memory::BOOT_STACK_TOP;
            regs.rsi = memory::ZERO_PAGE_ADDR;
        }
        EntryMode::Pvh => regs.rbx = memory::PVH_INFO_ADDR,
    }
    vcpu.set_regs(&regs).map_err(kvm("general registers"))
}

/// x87 control word and MXCSR at their reset values.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("FPU state"))
}

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MISC_ENABLE_FAST_STRING: u64 = 1;
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_TYPE_WRBACK: u64 = 6;

/// MSRs every vCPU starts with: syscall MSRs cleared, fast strings on, write-back memory.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let entries: Vec<kvm_msr_entry> = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_TYPE_WRBACK),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect();
    let total = entries.len();
    let msrs = Msrs::from_entries(&entries).map_err(|_| RegsError::Msrs { set: 0, total })?;
    let set = vcpu.set_msrs(&msrs).map_err(kvm("MSRs"))?;
    if set != total {
        return Err(RegsError::Msrs { set, total });
    }
    Ok(())
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn lapic_reg(state: &kvm_lapic_state, offset: usize) -> u32 {
    let bytes: [u8; 4] = std::array::from_fn(|i| state.regs[offset + i] as u8);
    u32::from_le_bytes(bytes)
}

fn set_lapic_reg(state: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        state.regs[offset + i] = *b as _;
    }
}

fn delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// Wires LINT0 to ExtINT and LINT1 to NMI, as firmware would.
pub fn setup_lapic(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let mut state = vcpu.get_lapic().map_err(kvm("local APIC"))?;
    let lvt0 = lapic_reg(&state, APIC_LVT0);
    set_lapic_reg(&mut state, APIC_LVT0, delivery_mode(lvt0, APIC_MODE_EXTINT));
    let lvt1 = lapic_reg(&state, APIC_LVT1);
    set_lapic_reg(&mut state, APIC_LVT1, delivery_mode(lvt1, APIC_MODE_NMI));
    vcpu.set_lapic(&state).map_err(kvm("local APIC"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode_to_flat_segments() {
        let code = segment(gdt_entry(CODE64, 0, 0xfffff), 1);
        assert_eq!(code.base, 0);
        assert_eq!(code.limit, 0xffff_ffff);
        assert_eq!(
            (code.l, code.db, code.g, code.present, code.s),
            (1, 0, 1, 1, 1)
        );
        assert_eq!(code.type_, 0xb);
        assert_eq!(code.selector, 8);
        let data = segment(gdt_entry(DATA, 0, 0xfffff), 2);
        assert_eq!((data.l, data.db, data.type_), (0, 1, 0x3));
        assert_eq!(gdt_entry(CODE64, 0, 0xfffff), 0x00af_9b00_0000_ffff);
    }

    #[test]
    fn boot_page_tables_identity_map_4g() {
        let mem = memory::create(64 << 20).unwrap();
        write_boot_tables(&mem, EntryMode::Linux64).unwrap();
        let pdpt: u64 = mem.read_obj(GuestAddress(memory::PML4_ADDR)).unwrap();
        assert_eq!(pdpt, memory::PML4_ADDR + 0x1000 + 3);
        let pd3: u64 = mem
            .read_obj(GuestAddress(memory::PML4_ADDR + 0x1000 + 24))
            .unwrap();
        let last: u64 = mem
            .read_obj(GuestAddress((pd3 & !0xfff) + 511 * 8))
            .unwrap();
        assert_eq!(last, ((4u64 << 30) - (2 << 20)) | PDE_2M_PAGE);
    }

    #[test]
    fn lapic_delivery_mode_keeps_other_bits() {
        assert_eq!(delivery_mode(0x1_0000, APIC_MODE_EXTINT), 0x1_0700);
        assert_eq!(delivery_mode(0x1_0700, APIC_MODE_NMI), 0x1_0400);
    }
}
