//! Guest physical memory: the layout podvm boots with, and the RAM backing it.
//!
//! ```text
//! 0x0000_0500  GDT                     0x0000_6000  PVH start_info + memory map
//! 0x0000_7000  Linux zero page         0x0000_8ff0  boot stack top
//! 0x0000_9000  PML4, PDPT, 4 PDs       0x0002_0000  kernel command line
//! 0x0009_fc00  EBDA (reserved) ..      0x000e_0000  ACPI tables (RSDP first) .. 1 MiB
//! 0x0010_0000  kernel, then initrd at the top of low RAM
//! 0xc000_0000  MMIO hole (IOAPIC 0xfec0_0000, LAPIC 0xfee0_0000) .. 4 GiB
//! 4 GiB ..     the rest of RAM when the guest has more than 3 GiB
//! ```

use vm_memory::{GuestAddress, GuestMemoryMmap};

/// Guest RAM: the devices' type, so both sides agree (dirty-page tracking changes it there).
pub type GuestMemory = devices::GuestMemoryMmap;

/// The boot GDT.
pub const GDT_ADDR: u64 = 0x500;
/// PVH `hvm_start_info`, followed by its memory map.
pub const PVH_INFO_ADDR: u64 = 0x6000;
/// The PVH memory map, right after the start info.
pub const PVH_MEMMAP_ADDR: u64 = 0x6040;
/// Linux `boot_params` ("zero page").
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer for the boot vCPU.
pub const BOOT_STACK_TOP: u64 = 0x8ff0;
/// Top-level page table; the PDPT and four page directories follow it, one page each.
pub const PML4_ADDR: u64 = 0x9000;
/// The kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Longest command line podvm writes (the kernel's own limit is usually lower).
pub const CMDLINE_MAX: usize = 0x10000;
/// Start of the extended BIOS data area; from here to 1 MiB is not RAM to the guest.
pub const EBDA_START: u64 = 0x9fc00;
/// Where the ACPI tables start; the RSDP must lie in 0xe0000..0x100000 to be found by a scan.
pub const ACPI_START: u64 = 0xe0000;
/// End of the ACPI area.
pub const ACPI_END: u64 = 0x100000;
/// Where the kernel goes ("high memory" to the boot protocol).
pub const HIMEM_START: u64 = 0x100000;
/// Start of the 32-bit MMIO hole; RAM above this address is moved past 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO hole.
pub const MMIO_HOLE_END: u64 = 1 << 32;
/// virtio-mmio devices: one 4 KiB window each from here.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// IOAPIC registers.
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// Local APIC registers.
pub const LAPIC_ADDR: u64 = 0xfee0_0000;

/// e820 type for usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type for reserved ranges.
pub const E820_RESERVED: u32 = 2;

/// Failure to create guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot allocate {mib} MiB of guest memory")]
    Allocate {
        mib: u64,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
}

/// The RAM ranges for a guest of `size` bytes: below the MMIO hole, then above 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, u64)> {
    let low = size.min(MMIO_HOLE_START);
    let mut ranges = vec![(GuestAddress(0), low)];
    if size > low {
        ranges.push((GuestAddress(MMIO_HOLE_END), size - low));
    }
    ranges
}

/// The e820 map handed to the guest: (start, length, type).
pub fn e820_map(size: u64) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
    ];
    for (start, len) in ram_ranges(size) {
        let end = start.0 + len;
        let start = start.0.max(HIMEM_START);
        if end > start {
            map.push((start, end - start, E820_RAM));
        }
    }
    map
}

/// End (exclusive) of the RAM below the MMIO hole.
pub fn low_ram_end(size: u64) -> u64 {
    size.min(MMIO_HOLE_START)
}

/// Allocates guest RAM of `size` bytes (anonymous, not populated until touched).
pub fn create(size: u64) -> Result<GuestMemory, MemoryError> {
    let ranges: Vec<(GuestAddress, usize)> = ram_ranges(size)
        .into_iter()
        .map(|(a, l)| (a, l as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).map_err(|source| MemoryError::Allocate {
        mib: size >> 20,
        source,
    })
}

/// Makes `len` bytes of guest RAM at `gpa` (page-aligned, inside one region) read back as
/// zeroes without touching them: the pages of a private anonymous mapping are given back
/// (`MADV_DONTNEED`) and come back zero-filled on the next access. A migration destination
/// receives most of a guest's memory as runs of zero pages; reading each page to see
/// whether it needs zeroing faults every one of them in (seconds for a large guest under
/// nested virtualisation), this is one call per run.
pub fn zero_range(mem: &GuestMemory, gpa: GuestAddress, len: u64) -> std::io::Result<()> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    let invalid =
        |why: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, why.to_string());
    if len == 0 {
        return Ok(());
    }
    let page = 4096u64;
    if !gpa.0.is_multiple_of(page) || !len.is_multiple_of(page) {
        return Err(invalid("zeroed range not page-aligned"));
    }
    let region = mem
        .find_region(gpa)
        .ok_or_else(|| invalid("zeroed range outside guest memory"))?;
    let offset = gpa.0 - region.start_addr().0;
    if offset.checked_add(len).is_none_or(|end| end > region.len()) {
        return Err(invalid("zeroed range crosses the end of a memory region"));
    }
    let host = region
        .get_host_address(vm_memory::MemoryRegionAddress(offset))
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    // SAFETY: [host, host + len) lies inside one region of guest RAM, a private anonymous
    // mapping podvm made and keeps for the VM's life (checked above); MADV_DONTNEED only
    // drops its pages, which then read as zeroes. Guest memory is only ever accessed
    // through vm-memory's volatile accessors, so no Rust reference into it is invalidated.
    let rc = unsafe { libc::madvise(host.cast(), len as usize, libc::MADV_DONTNEED) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Tells KVM about guest memory, one slot per region (slot = region index), with dirty
/// page logging on or off. Registering again changes the flags of the existing slots.
pub fn register_slots(
    vm: &kvm_ioctls::VmFd,
    mem: &GuestMemory,
    log_dirty: bool,
) -> Result<(), kvm_ioctls::Error> {
    use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};
    for (slot, region) in mem.iter().enumerate() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|_| kvm_ioctls::Error::new(libc::EFAULT))?;
        let region_desc = kvm_bindings::kvm_userspace_memory_region {
            slot: slot as u32,
            flags: if log_dirty {
                kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region is a live anonymous mapping of exactly `memory_size` bytes owned
        // by `mem`, which the VM keeps alive as long as the VM fd; slots do not overlap
        // because the regions come from one non-overlapping layout.
        unsafe { vm.set_user_memory_region(region_desc) }?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_below_hole_is_one_range() {
        assert_eq!(ram_ranges(256 << 20), vec![(GuestAddress(0), 256 << 20)]);
        let map = e820_map(256 << 20);
        assert_eq!(map[0], (0, EBDA_START, E820_RAM));
        assert_eq!(map[2], (HIMEM_START, (256 << 20) - HIMEM_START, E820_RAM));
        assert_eq!(map.len(), 3);
    }

    #[test]
    fn memory_above_hole_moves_past_4g() {
        let size = 4u64 << 30;
        let ranges = ram_ranges(size);
        assert_eq!(ranges[0], (GuestAddress(0), MMIO_HOLE_START));
        assert_eq!(ranges[1], (GuestAddress(1 << 32), size - MMIO_HOLE_START));
        let map = e820_map(size);
        assert_eq!(map[3], (1 << 32, size - MMIO_HOLE_START, E820_RAM));
        let ram: u64 = map.iter().filter(|e| e.2 == E820_RAM).map(|e| e.1).sum();
        assert_eq!(ram, size - (HIMEM_START - EBDA_START));
    }
}
