//! What a migration carries besides memory: the VM's shape (checked first), and the state
//! of every vCPU, the in-kernel irqchip, PIT and clock, COM1 and the virtio devices.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    CpuId, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use devices::legacy::serial::SerialSnapshot;
use devices::virtio::mmio::TransportState;

/// The VM as both sides must have built it: a destination with another shape refuses the
/// migration before it takes any memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shape {
    pub memory_bytes: u64,
    pub vcpus: u8,
    /// Each virtio device in guest order: "block <bytes>", "net" or "rng".
    pub devices: Vec<String>,
    /// The vCPU topology when one was given (it sets the vCPUs' APIC IDs, which KVM takes
    /// as their vCPU IDs). Absent from the JSON when `None`, as before topologies existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology: Option<crate::config::CpuTopology>,
    /// Which VM this is ([`MigrationConfig::vm_id`](super::MigrationConfig::vm_id)), when
    /// it was given. Absent from the JSON when `None`, as before VM IDs existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_id: Option<String>,
    /// The source's proof that it holds the VM's migration token, for this TLS session
    /// (see `tls::Tls::prove`); not part of the shape's comparison.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proof: Option<String>,
}

impl Shape {
    /// Where `self` (the destination) differs from `source`, in words.
    pub fn mismatch(&self, source: &Shape) -> Option<String> {
        // A destination for one VM takes no other: not a source without an ID either.
        if let Some(ours) = &self.vm_id {
            if source.vm_id.as_ref() != Some(ours) {
                return Some(format!(
                    "this destination is for VM {ours:?}, the source carries {} (--migration-vm-id)",
                    source
                        .vm_id
                        .as_ref()
                        .map_or_else(|| "a VM without an ID".to_string(), |id| format!("VM {id:?}"))
                ));
            }
        }
        if self.memory_bytes != source.memory_bytes {
            return Some(format!(
                "the source has {} MiB of memory, this VM {} MiB (--memory)",
                source.memory_bytes >> 20,
                self.memory_bytes >> 20
            ));
        }
        if self.vcpus != source.vcpus {
            return Some(format!(
                "the source has {} vCPUs, this VM {} (--cpus)",
                source.vcpus, self.vcpus
            ));
        }
        if self.topology != source.topology {
            let show = |t: &Option<crate::config::CpuTopology>| {
                t.map_or_else(|| "none".to_string(), |t| t.to_string())
            };
            return Some(format!(
                "the source's vCPU topology is {}, this VM's {} (--topology)",
                show(&source.topology),
                show(&self.topology)
            ));
        }
        if self.devices != source.devices {
            return Some(format!(
                "the source's devices are {:?}, this VM's {:?} (give the same --disk, --net and --rng, in the same order)",
                source.devices, self.devices
            ));
        }
        None
    }
}

/// Decodes arbitrary bytes as a state section (as a destination does) and restores what is
/// restored outside KVM into fresh devices: COM1, which then takes input and is read, and
/// every virtio transport (into a virtio-rng transport:
/// `devices::virtio::mmio_fuzzing::fuzz_restore_transport`). Never a panic or a hang. The
/// vCPU and in-kernel device states go to KVM, which checks them itself; they are not
/// fuzzed here (no KVM in a fuzzing run).
#[cfg(any(test, feature = "fuzzing"))]
pub fn fuzz_restore_state(data: &[u8]) {
    use devices::bus::BusDevice;
    let Ok(state) = VmState::decode(data) else {
        return;
    };
    let irq = devices::irq::IrqTrigger::new().expect("an eventfd");
    let mut serial = devices::legacy::Serial::new(irq, Box::new(std::io::sink()));
    if serial.restore(&state.serial).is_ok() {
        assert!(serial.input_waiting() <= 64, "a FIFO over 64 bytes");
        serial.enqueue_input(b"typed after the migration");
        serial.raise_received_data();
        for offset in 0..8 {
            serial.read(offset, &mut [0u8]);
        }
        for _ in 0..80 {
            serial.read(0, &mut [0u8]);
        }
        serial.write(0, b"x");
        assert!(serial.input_waiting() <= 64, "a FIFO over 64 bytes");
    }
    for transport in state.virtio.iter().take(16) {
        devices::virtio::mmio_fuzzing::fuzz_restore_transport(transport);
    }
}

/// One vCPU's architectural state.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<kvm_msr_entry>,
    pub events: kvm_vcpu_events,
}

/// The in-kernel devices of the VM.
#[derive(Serialize, Deserialize)]
pub struct MachineState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

/// Everything but memory.
#[derive(Serialize, Deserialize)]
pub struct VmState {
    pub vcpus: Vec<VcpuState>,
    pub machine: MachineState,
    pub serial: SerialSnapshot,
    pub virtio: Vec<TransportState>,
}

impl VmState {
    /// The state section's payload: postcard, a compact binary serde format. The KVM
    /// structures serialize as their raw bytes, so a vCPU's 4 KiB XSAVE area costs 4 KiB
    /// here (as JSON it was a list of numbers that took the destination most of its part of
    /// the pause to parse).
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("the VM state serializes")
    }

    /// Parses a state section; anything but exactly one well-formed state is refused.
    pub fn decode(payload: &[u8]) -> Result<Self, String> {
        let (state, rest) =
            postcard::take_from_bytes::<Self>(payload).map_err(|e| format!("state: {e}"))?;
        if !rest.is_empty() {
            return Err(format!(
                "state: {} bytes after the end of the state",
                rest.len()
            ));
        }
        Ok(state)
    }
}

/// Saving or restoring state failed.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("KVM refused to {what}: {source}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError::Kvm { what, source }
}

/// MSRs per KVM_GET_MSRS call (the bindings' wrapper holds at most 256).
const MSR_CHUNK: usize = 200;

/// Saves a parked vCPU's state. `msr_index` is KVM's list of MSRs to save; those this vCPU
/// cannot read are left out.
pub fn save_vcpu(fd: &VcpuFd, msr_index: &[u32]) -> Result<VcpuState, StateError> {
    let cpuid = fd
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm("read the CPUID"))?
        .as_slice()
        .to_vec();
    let mp_state = fd.get_mp_state().map_err(kvm("read the MP state"))?;
    let regs = fd.get_regs().map_err(kvm("read the registers"))?;
    let sregs = fd.get_sregs().map_err(kvm("read the special registers"))?;
    let xsave = fd.get_xsave().map_err(kvm("read the XSAVE area"))?;
    let xcrs = fd.get_xcrs().map_err(kvm("read the XCRs"))?;
    let debug_regs = fd
        .get_debug_regs()
        .map_err(kvm("read the debug registers"))?;
    let lapic = fd.get_lapic().map_err(kvm("read the local APIC"))?;
    let msrs = save_msrs(fd, msr_index)?;
    let events = fd.get_vcpu_events().map_err(kvm("read the vCPU events"))?;
    Ok(VcpuState {
        cpuid,
        mp_state,
        regs,
        sregs,
        xsave,
        xcrs,
        debug_regs,
        lapic,
        msrs,
        events,
    })
}

/// Reads every MSR of `index` the vCPU has: KVM reads in order and stops at the first it
/// refuses, which is skipped.
fn save_msrs(fd: &VcpuFd, index: &[u32]) -> Result<Vec<kvm_msr_entry>, StateError> {
    let mut saved = Vec::with_capacity(index.len());
    let mut rest = index;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(MSR_CHUNK)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries)
            .map_err(|e| StateError::Invalid(format!("MSR list: {e:?}")))?;
        let read = fd.get_msrs(&mut msrs).map_err(kvm("read the MSRs"))?;
        saved.extend_from_slice(&msrs.as_slice()[..read]);
        // The one after the last read is one KVM refuses: skip it.
        rest = &rest[(read + 1).min(rest.len())..];
    }
    Ok(saved)
}

/// Restores a vCPU that has not run yet.
pub fn restore_vcpu(fd: &VcpuFd, s: &VcpuState) -> Result<(), StateError> {
    let cpuid =
        CpuId::from_entries(&s.cpuid).map_err(|e| StateError::Invalid(format!("CPUID: {e:?}")))?;
    fd.set_cpuid2(&cpuid).map_err(kvm("set the CPUID"))?;
    fd.set_mp_state(s.mp_state)
        .map_err(kvm("set the MP state"))?;
    fd.set_sregs(&s.sregs)
        .map_err(kvm("set the special registers"))?;
    fd.set_regs(&s.regs).map_err(kvm("set the registers"))?;
    // SAFETY: `kvm_xsave` is the fixed 4 KiB legacy XSAVE area; KVM_SET_XSAVE reads no more
    // than that struct (podvm never enables the larger dynamic XSAVE features).
    unsafe { fd.set_xsave(&s.xsave) }.map_err(kvm("set the XSAVE area"))?;
    fd.set_xcrs(&s.xcrs).map_err(kvm("set the XCRs"))?;
    fd.set_debug_regs(&s.debug_regs)
        .map_err(kvm("set the debug registers"))?;
    fd.set_lapic(&s.lapic).map_err(kvm("set the local APIC"))?;
    for chunk in s.msrs.chunks(MSR_CHUNK) {
        let msrs = Msrs::from_entries(chunk)
            .map_err(|e| StateError::Invalid(format!("MSR list: {e:?}")))?;
        let set = fd.set_msrs(&msrs).map_err(kvm("set the MSRs"))?;
        if set != chunk.len() {
            return Err(StateError::Invalid(format!(
                "KVM refused MSR {:#x}",
                chunk[set].index
            )));
        }
    }
    fd.set_vcpu_events(&s.events)
        .map_err(kvm("set the vCPU events"))?;
    Ok(())
}

fn chip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, StateError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip).map_err(kvm("read the irqchip"))?;
    Ok(chip)
}

/// Saves the irqchip and PIT; `clock` is the KVM clock as the VM paused.
pub fn save_machine(vm: &VmFd, clock: kvm_clock_data) -> Result<MachineState, StateError> {
    Ok(MachineState {
        pic_master: chip(vm, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: chip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: chip(vm, KVM_IRQCHIP_IOAPIC)?,
        pit: vm.get_pit2().map_err(kvm("read the PIT"))?,
        clock,
    })
}

/// Restores the irqchip, PIT and clock of a VM whose vCPUs have not run yet.
pub fn restore_machine(vm: &VmFd, s: &MachineState) -> Result<(), StateError> {
    for (chip, id) in [
        (&s.pic_master, KVM_IRQCHIP_PIC_MASTER),
        (&s.pic_slave, KVM_IRQCHIP_PIC_SLAVE),
        (&s.ioapic, KVM_IRQCHIP_IOAPIC),
    ] {
        if chip.chip_id != id {
            return Err(StateError::Invalid(format!(
                "irqchip {} where {id} was expected",
                chip.chip_id
            )));
        }
        vm.set_irqchip(chip).map_err(kvm("set the irqchip"))?;
    }
    vm.set_pit2(&s.pit).map_err(kvm("set the PIT"))?;
    let mut clock = s.clock;
    // The value only: the guest's clock continues from where it paused.
    clock.flags = 0;
    vm.set_clock(&clock).map_err(kvm("set the KVM clock"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Replays the committed corpus of the `migration_state` fuzz target; its seed is the
    /// state of a real VM (COM1 and a virtio transport), so the fuzzer starts from one.
    #[test]
    fn migration_state_fuzz_corpus_replays_cleanly() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/migration_state");
        devices::fuzz_replay::replay_dir(&dir, fuzz_restore_state);
        // A real VM's state (COM1, no virtio device), and one with a running virtio-rng
        // transport whose queue lies in the fuzzed transport's memory, so restoring gets as
        // far as serving the queue. PODVM_WRITE_SEEDS=1 rewrites the second.
        VmState::decode(&std::fs::read(dir.join("seed-state")).unwrap()).unwrap();
        let rng = rng_seed().encode();
        let path = dir.join("seed-rng-running");
        if std::env::var("PODVM_WRITE_SEEDS").as_deref() == Ok("1") {
            std::fs::write(&path, &rng).unwrap();
        }
        assert_eq!(
            std::fs::read(&path).unwrap(),
            rng,
            "{} is stale: run this test with PODVM_WRITE_SEEDS=1",
            path.display()
        );
    }

    /// [`sample_state`] with COM1's receive interrupt on and a virtio-rng transport the
    /// driver has brought up: one 16-entry queue at 0x1000/0x2000/0x3000.
    fn rng_seed() -> VmState {
        use devices::virtio::mmio::{QueueSnapshot, TransportState};
        let mut state = sample_state();
        state.serial.registers = [0, 0, 1, 0xc1, 0x03, 0x60, 0x0b, 0xb0, 0];
        state.virtio = vec![TransportState {
            device_type: 4,
            status: 0x0f,
            driver_features: 1 << 32,
            device_features_sel: 0,
            driver_features_sel: 0,
            queue_sel: 0,
            config_generation: 0,
            interrupt_status: 0,
            queues: vec![QueueSnapshot {
                max_size: 256,
                size: 16,
                ready: true,
                desc_table: 0x1000,
                avail_ring: 0x2000,
                used_ring: 0x3000,
                next_avail: 0,
                next_used: 0,
                event_idx: false,
            }],
        }];
        state
    }

    fn sample_state() -> VmState {
        let regs = kvm_regs {
            rip: 0xffff_ffff_8100_0000,
            ..Default::default()
        };
        let vcpu = |id: u32| VcpuState {
            cpuid: vec![kvm_cpuid_entry2 {
                function: 0x4000_0001,
                eax: id,
                ..Default::default()
            }],
            mp_state: kvm_mp_state::default(),
            regs,
            sregs: kvm_sregs::default(),
            xsave: {
                let mut xsave = kvm_xsave::default();
                xsave.region[7] = 0xdead_beef;
                xsave
            },
            xcrs: kvm_xcrs::default(),
            debug_regs: kvm_debugregs::default(),
            lapic: kvm_lapic_state::default(),
            msrs: vec![kvm_msr_entry {
                index: 0x10,
                data: 12345,
                ..Default::default()
            }],
            events: kvm_vcpu_events::default(),
        };
        VmState {
            vcpus: vec![vcpu(0), vcpu(1)],
            machine: MachineState {
                pic_master: kvm_irqchip::default(),
                pic_slave: kvm_irqchip::default(),
                ioapic: kvm_irqchip::default(),
                pit: kvm_pit_state2::default(),
                clock: kvm_clock_data {
                    clock: 987654321,
                    ..Default::default()
                },
            },
            serial: SerialSnapshot {
                registers: [1, 2, 3, 4, 5, 6, 7, 8, 9],
                rx_fifo: b"typed".to_vec(),
            },
            virtio: Vec::new(),
        }
    }

    #[test]
    fn migration_state_round_trips_compactly_and_refuses_short_or_long_payloads() {
        let state = sample_state();
        let bytes = state.encode();
        // Raw bytes, not lists of numbers as in JSON.
        let json = serde_json::to_vec(&state).unwrap().len();
        assert!(
            bytes.len() * 2 < json,
            "{} bytes, {json} as JSON",
            bytes.len()
        );
        let back = VmState::decode(&bytes).unwrap();
        assert_eq!(back.encode(), bytes);
        assert_eq!(back.vcpus[1].regs.rip, 0xffff_ffff_8100_0000);
        assert_eq!(back.vcpus[1].xsave.region[7], 0xdead_beef);
        assert_eq!(back.vcpus[1].cpuid[0].eax, 1);
        assert_eq!(back.vcpus[0].msrs[0].data, 12345);
        assert_eq!(back.machine.clock.clock, 987654321);
        assert_eq!(back.serial.rx_fifo, b"typed");
        let mut long = bytes.clone();
        long.push(0);
        assert!(VmState::decode(&long)
            .err()
            .unwrap()
            .contains("after the end"));
        for cut in [0, 1, bytes.len() / 2, bytes.len() - 1] {
            assert!(VmState::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn migration_shape_mismatch_names_what_differs_and_the_flag() {
        let a = Shape {
            memory_bytes: 512 << 20,
            vcpus: 2,
            devices: vec!["block 1048576".into(), "net".into()],
            topology: None,
            vm_id: None,
            proof: None,
        };
        assert_eq!(a.mismatch(&a.clone()), None);
        let mut b = a.clone();
        b.memory_bytes = 256 << 20;
        assert!(a.mismatch(&b).unwrap().contains("--memory"));
        let mut b = a.clone();
        b.vcpus = 1;
        assert!(a.mismatch(&b).unwrap().contains("--cpus"));
        let mut b = a.clone();
        b.devices.pop();
        assert!(a.mismatch(&b).unwrap().contains("--net"));
        let mut b = a.clone();
        b.topology = Some(crate::config::CpuTopology {
            sockets: 1,
            cores: 1,
            threads: 2,
        });
        let why = a.mismatch(&b).unwrap();
        assert!(why.contains("--topology") && why.contains("1:1:2"), "{why}");
    }

    #[test]
    fn migration_destination_with_a_vm_id_takes_only_a_source_with_the_same() {
        let plain = Shape {
            memory_bytes: 512 << 20,
            vcpus: 2,
            devices: vec!["net".into()],
            topology: None,
            vm_id: None,
            proof: None,
        };
        let with = |id: &str| Shape {
            vm_id: Some(id.into()),
            ..plain.clone()
        };
        let dst = with("6a0f-uid-a");
        assert_eq!(dst.mismatch(&with("6a0f-uid-a")), None);
        let why = dst.mismatch(&with("77b2-uid-b")).unwrap();
        assert!(
            why.contains("77b2-uid-b") && why.contains("--migration-vm-id"),
            "{why}"
        );
        let why = dst.mismatch(&plain).unwrap();
        assert!(why.contains("without an ID"), "{why}");
        // A destination without an ID takes what it always took.
        assert_eq!(plain.mismatch(&with("6a0f-uid-a")), None);
    }

    #[test]
    fn migration_shape_without_topology_reads_and_writes_the_old_json() {
        let old = r#"{"memory_bytes":1048576,"vcpus":2,"devices":["net"]}"#;
        let shape: Shape = serde_json::from_str(old).unwrap();
        assert_eq!(shape.topology, None);
        assert_eq!(serde_json::to_string(&shape).unwrap(), old);
    }
}
