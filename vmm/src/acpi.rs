//! ACPI tables: RSDP, XSDT, FADT, MADT and DSDT, written to guest memory at boot.
//!
//! podvm is a hardware-reduced ACPI platform (no PM timer, no GPE blocks, no SCI): the FADT
//! points the sleep control/status and reset registers at `devices::acpi_pm`, the MADT lists
//! one local APIC per vCPU and the IOAPIC, and the DSDT describes COM1 and the `\_S5` sleep
//! state. Devices that describe themselves in AML (virtio-mmio, later) add to the DSDT through
//! [`AcpiDevice`].

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use devices::acpi_pm;
use devices::legacy::serial;
use vm_memory::{Bytes, GuestAddress};

use crate::memory::{self, GuestMemory};

const OEM_ID: [u8; 6] = *b"PODVM ";
const OEM_TABLE_ID: [u8; 8] = *b"PODVMTBL";
const OEM_REVISION: u32 = 1;
/// IAPC_BOOT_ARCH: no VGA, no CMOS RTC (podvm emulates neither). The 8042 bit stays clear, so
/// Linux does not probe for a keyboard controller; its `reboot=k` path still finds the reset
/// line podvm provides.
const IAPC_BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_BOOT_ARCH_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;

/// Something that describes itself in the DSDT.
pub trait AcpiDevice {
    /// Appends the device's AML (usually one `Device` object) to `dsdt`.
    fn append_aml(&self, dsdt: &mut Vec<u8>);
}

/// Failure to place the tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("ACPI tables ({size} bytes) do not fit below 1 MiB")]
    TooLarge { size: u64 },
    #[error("cannot write ACPI tables to guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

/// Builds the tables for vCPUs with `apic_ids` (in vCPU order) plus `devices`, writes them
/// at [`memory::ACPI_START`] and returns the RSDP's address.
pub fn write_tables(
    mem: &GuestMemory,
    apic_ids: &[u32],
    devices: &[&dyn AcpiDevice],
) -> Result<GuestAddress, AcpiError> {
    let mut writer = TableWriter {
        mem,
        next: memory::ACPI_START,
    };
    // The RSDP goes first so it sits at the start of the scanned area; it is written last,
    // once the XSDT's address is known.
    let rsdp_addr = writer.reserve(Rsdp::len() as u64)?;

    let dsdt = writer.write(&dsdt(devices))?;
    let fadt = writer.write(&fadt(dsdt))?;
    let madt = writer.write(&madt(apic_ids))?;
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt.0);
    xsdt.add_entry(madt.0);
    let xsdt = writer.write(&to_bytes(&xsdt))?;

    mem.write_slice(&to_bytes(&Rsdp::new(OEM_ID, xsdt.0)), rsdp_addr)?;
    Ok(rsdp_addr)
}

struct TableWriter<'a> {
    mem: &'a GuestMemory,
    next: u64,
}

impl TableWriter<'_> {
    fn reserve(&mut self, len: u64) -> Result<GuestAddress, AcpiError> {
        let at = self.next;
        let end = at + len;
        if end > memory::ACPI_END {
            return Err(AcpiError::TooLarge {
                size: end - memory::ACPI_START,
            });
        }
        // Tables are 16-byte aligned for tidiness; the spec needs only byte alignment.
        self.next = end.next_multiple_of(16);
        Ok(GuestAddress(at))
    }

    fn write(&mut self, table: &[u8]) -> Result<GuestAddress, AcpiError> {
        let at = self.reserve(table.len() as u64)?;
        self.mem.write_slice(table, at)?;
        Ok(at)
    }
}

fn to_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

fn io_gas(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(port),
    )
}

fn fadt(dsdt: GuestAddress) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt.0)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.iapc_boot_arch =
        (IAPC_BOOT_ARCH_VGA_NOT_PRESENT | IAPC_BOOT_ARCH_CMOS_RTC_NOT_PRESENT).into();
    fadt.sleep_control_reg = io_gas(acpi_pm::PORT_BASE + acpi_pm::SLEEP_CONTROL);
    fadt.sleep_status_reg = io_gas(acpi_pm::PORT_BASE + acpi_pm::SLEEP_STATUS);
    fadt.reset_reg = io_gas(acpi_pm::PORT_BASE + acpi_pm::RESET);
    fadt.reset_value = acpi_pm::RESET_VALUE;
    to_bytes(&fadt.finalize())
}

/// One local APIC per vCPU: processor UID the vCPU's index, APIC ID its own (the IDs have
/// gaps when a topology's counts are not powers of two; config validation keeps them below
/// 0xff).
fn madt(apic_ids: &[u32]) -> Vec<u8> {
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(memory::LAPIC_ADDR as u32),
    );
    for (uid, &apic_id) in apic_ids.iter().enumerate() {
        madt.add_structure(ProcessorLocalApic::new(
            uid as u8,
            apic_id as u8,
            EnabledStatus::Enabled,
        ));
    }
    madt.add_structure(IoApic::new(0, memory::IOAPIC_ADDR as u32, 0));
    to_bytes(&madt)
}

/// COM1 as an ACPI device, so the guest sees its ports and IRQ as claimed.
struct Com1;

impl AcpiDevice for Com1 {
    fn append_aml(&self, dsdt: &mut Vec<u8>) {
        let port = serial::COM1_PORT_BASE;
        aml::Device::new(
            "COM1".into(),
            vec![
                &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501")),
                &aml::Name::new("_UID".into(), &aml::ZERO),
                &aml::Name::new(
                    "_CRS".into(),
                    &aml::ResourceTemplate::new(vec![
                        &aml::IO::new(port, port, 1, serial::PORT_LEN as u8),
                        &aml::Interrupt::new(true, true, false, false, serial::COM1_IRQ),
                    ]),
                ),
            ],
        )
        .to_aml_bytes(dsdt);
    }
}

/// The power button (PNP0C0C) and the Generic Event Device (ACPI0013) whose interrupt
/// reports a press.
struct PowerButton;

impl AcpiDevice for PowerButton {
    fn append_aml(&self, dsdt: &mut Vec<u8>) {
        let gsi = acpi_pm::GED_GSI;
        aml::Device::new(
            "PWRB".into(),
            vec![
                &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C0C")),
                &aml::Name::new("_UID".into(), &aml::ZERO),
            ],
        )
        .to_aml_bytes(dsdt);
        aml::Device::new(
            "GED_".into(),
            vec![
                &aml::Name::new("_HID".into(), &"ACPI0013"),
                &aml::Name::new("_UID".into(), &aml::ZERO),
                &aml::Name::new(
                    "_CRS".into(),
                    &aml::ResourceTemplate::new(vec![&aml::Interrupt::new(
                        true, true, false, false, gsi,
                    )]),
                ),
                &aml::Method::new(
                    "_EVT".into(),
                    1,
                    true,
                    vec![&aml::If::new(
                        &aml::Equal::new(&aml::Arg(0), &gsi),
                        vec![&aml::Notify::new(&aml::Path::new("\\_SB_.PWRB"), &0x80u8)],
                    )],
                ),
            ],
        )
        .to_aml_bytes(dsdt);
    }
}

fn dsdt(devices: &[&dyn AcpiDevice]) -> Vec<u8> {
    let mut body = Vec::new();
    // \_S5: the sleep type value the guest writes to the sleep control register to power off.
    aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&acpi_pm::S5_SLEEP_TYPE]),
    )
    .to_aml_bytes(&mut body);
    let mut sb = Vec::new();
    Com1.append_aml(&mut sb);
    PowerButton.append_aml(&mut sb);
    for dev in devices {
        dev.append_aml(&mut sb);
    }
    body.extend(aml::Scope::raw("_SB_".into(), sb));

    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    dsdt.append_slice(&body);
    dsdt.as_slice().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(table: &[u8]) -> bool {
        table.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    #[test]
    fn acpi_tables_have_valid_checksums_and_lengths() {
        let mem = crate::memory::create(64 << 20).unwrap();
        let rsdp = write_tables(&mem, &[0, 1], &[]).unwrap();
        assert_eq!(rsdp.0, memory::ACPI_START);
        let mut rsdp_bytes = [0u8; 36];
        mem.read_slice(&mut rsdp_bytes, rsdp).unwrap();
        assert_eq!(&rsdp_bytes[..8], b"RSD PTR ");
        assert!(checksum_ok(&rsdp_bytes[..20]));
        assert!(checksum_ok(&rsdp_bytes));
        let xsdt_addr = u64::from_le_bytes(rsdp_bytes[24..32].try_into().unwrap());
        let xsdt = read_table(&mem, xsdt_addr);
        assert_eq!(&xsdt[..4], b"XSDT");
        assert!(checksum_ok(&xsdt));
        let entries: Vec<u64> = xsdt[36..]
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(entries.len(), 2);
        let fadt = read_table(&mem, entries[0]);
        assert_eq!(&fadt[..4], b"FACP");
        assert!(checksum_ok(&fadt));
        let dsdt_addr = u64::from_le_bytes(fadt[140..148].try_into().unwrap());
        let dsdt = read_table(&mem, dsdt_addr);
        assert_eq!(&dsdt[..4], b"DSDT");
        assert!(checksum_ok(&dsdt));
        assert!(dsdt.windows(4).any(|w| w == b"_S5_"));
        let madt = read_table(&mem, entries[1]);
        assert_eq!(&madt[..4], b"APIC");
        assert!(checksum_ok(&madt));
        // Header (44) + 2 local APICs (8 each) + 1 IOAPIC (12).
        assert_eq!(madt.len(), 44 + 2 * 8 + 12);
    }

    #[test]
    fn acpi_madt_lists_each_vcpus_own_apic_id_in_vcpu_order() {
        // 2 sockets of 3 single-threaded cores: cores take 2 bits, so APIC IDs 0-2, 4-6.
        let topology = crate::vcpu::topology::Topology::new(
            6,
            Some(&crate::config::CpuTopology {
                sockets: 2,
                cores: 3,
                threads: 1,
            }),
        );
        let madt = madt(&topology.apic_ids());
        assert!(checksum_ok(&madt));
        // After the header (36) and the LAPIC address and flags (8): structures of
        // (type, length, ...); a local APIC is (0, 8, UID, APIC ID, flags u32).
        let mut lapics = Vec::new();
        let mut at = 44;
        while at < madt.len() {
            let (kind, len) = (madt[at], usize::from(madt[at + 1]));
            if kind == 0 {
                let flags = u32::from_le_bytes(madt[at + 4..at + 8].try_into().unwrap());
                lapics.push((madt[at + 2], madt[at + 3], flags & 1));
            }
            at += len;
        }
        assert_eq!(
            lapics,
            vec![
                (0, 0, 1),
                (1, 1, 1),
                (2, 2, 1),
                (3, 4, 1),
                (4, 5, 1),
                (5, 6, 1)
            ]
        );
    }

    fn read_table(mem: &GuestMemory, addr: u64) -> Vec<u8> {
        let mut header = [0u8; 8];
        mem.read_slice(&mut header, GuestAddress(addr)).unwrap();
        let len = u32::from_le_bytes(header[4..8].try_into().unwrap()) as usize;
        let mut table = vec![0u8; len];
        mem.read_slice(&mut table, GuestAddress(addr)).unwrap();
        table
    }
}
