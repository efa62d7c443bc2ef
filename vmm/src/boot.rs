//! Putting the kernel, the initrd, the command line and the boot information into guest memory.
//!
//! Two entry protocols: the Linux 64-bit boot protocol for bzImages (and ELF kernels without a
//! PVH note), where the boot vCPU starts in long mode with RSI pointing at `boot_params`; and
//! PVH for ELF kernels that carry the Xen PVH entry note, where it starts in 32-bit protected
//! mode with EBX pointing at `hvm_start_info`.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{self, BzImage, Cmdline, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use crate::memory::{self, GuestMemory};

/// How the boot vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryMode {
    /// 64-bit long mode, RSI = the zero page.
    Linux64,
    /// 32-bit protected mode without paging, EBX = `hvm_start_info`.
    Pvh,
}

/// Where and how the boot vCPU starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelEntry {
    pub entry: GuestAddress,
    pub mode: EntryMode,
}

/// A boot step that failed.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("kernel: cannot open {path}: {source}; check the path given to --kernel")]
    KernelOpen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "kernel: {path} is not a bootable x86_64 kernel (a bzImage or an ELF vmlinux): {source}"
    )]
    KernelFormat {
        path: PathBuf,
        #[source]
        source: loader::Error,
    },
    #[error("initrd: cannot read {path}: {source}; check the path given to --initrd")]
    InitrdRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "initrd: {path} ({size_mib} MiB) does not fit in guest memory next to the kernel; \
         give the VM more memory with --memory"
    )]
    InitrdTooLarge { path: PathBuf, size_mib: u64 },
    #[error("cmdline: the kernel command line is {len} bytes, more than this kernel's {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("cmdline: {0}")]
    Cmdline(String),
    #[error("cannot write boot information into guest memory: {0}")]
    GuestMemory(String),
}

type Result<T> = std::result::Result<T, BootError>;

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
/// Offset of the 64-bit entry point from the start of a bzImage's protected-mode kernel.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const PAGE_SIZE: u64 = 0x1000;

/// Loads the kernel, initrd and command line, and writes the boot information the kernel's
/// entry protocol expects. `rsdp` is where the ACPI tables begin.
pub fn load(
    mem: &GuestMemory,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
    rsdp: GuestAddress,
) -> Result<KernelEntry> {
    let mem_size: u64 = mem.iter().map(vm_memory::GuestMemoryRegion::len).sum();
    let mut file = File::open(kernel).map_err(|source| BootError::KernelOpen {
        path: kernel.into(),
        source,
    })?;
    let format_err = |source| BootError::KernelFormat {
        path: kernel.into(),
        source,
    };
    let mut magic = [0u8; 4];
    let is_elf = file.read_exact(&mut magic).is_ok() && &magic == ELF_MAGIC;
    file.seek(SeekFrom::Start(0))
        .map_err(|source| BootError::KernelOpen {
            path: kernel.into(),
            source,
        })?;

    let himem = Some(GuestAddress(memory::HIMEM_START));
    let (loaded, entry, header) = if is_elf {
        let loaded = Elf::load(mem, None, &mut file, himem).map_err(format_err)?;
        let entry = match loaded.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(addr) => KernelEntry {
                entry: addr,
                mode: EntryMode::Pvh,
            },
            _ => KernelEntry {
                entry: loaded.kernel_load,
                mode: EntryMode::Linux64,
            },
        };
        (loaded, entry, None)
    } else {
        let loaded = BzImage::load(mem, None, &mut file, himem).map_err(format_err)?;
        let entry = KernelEntry {
            entry: loaded.kernel_load.unchecked_add(BZIMAGE_64BIT_ENTRY_OFFSET),
            mode: EntryMode::Linux64,
        };
        let header = loaded.setup_header;
        (loaded, entry, header)
    };

    let kernel_end = loaded.kernel_load.raw_value() + loaded.kernel_end;
    let initrd = initrd
        .map(|path| load_initrd(mem, mem_size, path, kernel_end, header.as_ref()))
        .transpose()?;

    let max_cmdline = header
        .map(|h| h.cmdline_size as usize)
        .filter(|&n| n > 0)
        .unwrap_or(memory::CMDLINE_MAX - 1)
        .min(memory::CMDLINE_MAX - 1);
    if cmdline.len() > max_cmdline {
        return Err(BootError::CmdlineTooLong {
            len: cmdline.len(),
            max: max_cmdline,
        });
    }
    let mut cl = Cmdline::new(max_cmdline + 1).map_err(|e| BootError::Cmdline(e.to_string()))?;
    cl.insert_str(cmdline)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    loader::load_cmdline(mem, GuestAddress(memory::CMDLINE_ADDR), &cl)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;

    let e820 = memory::e820_map(mem_size);
    match entry.mode {
        EntryMode::Linux64 => {
            write_zero_page(mem, header, cmdline.len(), initrd, &e820, rsdp)?;
        }
        EntryMode::Pvh => write_pvh_start_info(mem, cmdline.len(), initrd, &e820, rsdp)?,
    }
    Ok(entry)
}

/// Places the initrd at the highest page-aligned address it fits below the kernel's limit.
fn load_initrd(
    mem: &GuestMemory,
    mem_size: u64,
    path: &Path,
    kernel_end: u64,
    header: Option<&setup_header>,
) -> Result<(GuestAddress, u64)> {
    let read_err = |source| BootError::InitrdRead {
        path: path.into(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();
    let too_large = || BootError::InitrdTooLarge {
        path: path.into(),
        size_mib: size.div_ceil(1 << 20),
    };
    let mut limit = memory::low_ram_end(mem_size);
    if let Some(h) = header.filter(|h| h.initrd_addr_max != 0) {
        limit = limit.min(u64::from(h.initrd_addr_max) + 1);
    }
    let start = limit
        .checked_sub(size)
        .map(|a| a & !(PAGE_SIZE - 1))
        .filter(|&a| a >= kernel_end.next_multiple_of(PAGE_SIZE))
        .ok_or_else(too_large)?;
    mem.read_exact_volatile_from(GuestAddress(start), &mut file, size as usize)
        .map_err(|e| match e {
            vm_memory::GuestMemoryError::IOError(source) => read_err(source),
            other => BootError::GuestMemory(other.to_string()),
        })?;
    Ok((GuestAddress(start), size))
}

fn write_zero_page(
    mem: &GuestMemory,
    header: Option<setup_header>,
    cmdline_len: usize,
    initrd: Option<(GuestAddress, u64)>,
    e820: &[(u64, u64, u32)],
    rsdp: GuestAddress,
) -> Result<()> {
    let mut params = boot_params::default();
    if let Some(h) = header {
        params.hdr = h;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = memory::CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr.raw_value() as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    params.acpi_rsdp_addr = rsdp.raw_value();
    for (i, &(addr, size, type_)) in e820.iter().enumerate() {
        params.e820_table[i].addr = addr;
        params.e820_table[i].size = size;
        params.e820_table[i].r#type = type_;
    }
    params.e820_entries = e820.len() as u8;
    LinuxBootConfigurator::write_bootparams(
        &BootParams::new(&params, GuestAddress(memory::ZERO_PAGE_ADDR)),
        mem,
    )
    .map_err(|e| BootError::GuestMemory(e.to_string()))
}

fn write_pvh_start_info(
    mem: &GuestMemory,
    cmdline_len: usize,
    initrd: Option<(GuestAddress, u64)>,
    e820: &[(u64, u64, u32)],
    rsdp: GuestAddress,
) -> Result<()> {
    let write_err = |e: vm_memory::GuestMemoryError| BootError::GuestMemory(e.to_string());
    let entry_size = std::mem::size_of::<hvm_memmap_table_entry>() as u64;
    for (i, &(addr, size, type_)) in e820.iter().enumerate() {
        let entry = hvm_memmap_table_entry {
            addr,
            size,
            type_,
            reserved: 0,
        };
        let at = GuestAddress(memory::PVH_MEMMAP_ADDR + i as u64 * entry_size);
        mem.write_obj(entry, at).map_err(write_err)?;
    }
    let modlist_addr = memory::PVH_MEMMAP_ADDR + e820.len() as u64 * entry_size;
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: if cmdline_len > 0 {
            memory::CMDLINE_ADDR
        } else {
            0
        },
        rsdp_paddr: rsdp.raw_value(),
        memmap_paddr: memory::PVH_MEMMAP_ADDR,
        memmap_entries: e820.len() as u32,
        ..Default::default()
    };
    if let Some((addr, size)) = initrd {
        let module = hvm_modlist_entry {
            paddr: addr.raw_value(),
            size,
            ..Default::default()
        };
        mem.write_obj(module, GuestAddress(modlist_addr))
            .map_err(write_err)?;
        info.nr_modules = 1;
        info.modlist_paddr = modlist_addr;
    }
    mem.write_obj(info, GuestAddress(memory::PVH_INFO_ADDR))
        .map_err(write_err)
}
