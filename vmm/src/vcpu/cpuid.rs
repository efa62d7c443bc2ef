//! CPUID for each vCPU: KVM's supported set, with the topology of one socket of `count`
//! single-threaded cores and this vCPU's APIC ID.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXT_TOPOLOGY: u32 = 0x1f;
const LEAF_AMD_SIZE_IDS: u32 = 0x8000_0008;
const LEAF_AMD_EXT_APIC_ID: u32 = 0x8000_001e;

const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;

const TOPOLOGY_LEVEL_SMT: u32 = 1;
const TOPOLOGY_LEVEL_CORE: u32 = 2;

/// Bits needed to number `n` things (0 for 1).
fn id_bits(n: u32) -> u32 {
    n.next_power_of_two().trailing_zeros()
}

/// Rewrites `cpuid` (KVM's supported set) for vCPU `id` of `count`.
pub fn patch(cpuid: &mut CpuId, id: u8, count: u8) {
    let apic_id = u32::from(id);
    let count = u32::from(count);
    let core_bits = id_bits(count);
    for entry in cpuid.as_mut_slice() {
        patch_entry(entry, apic_id, count, core_bits);
    }
}

fn patch_entry(entry: &mut kvm_cpuid_entry2, apic_id: u32, count: u32, core_bits: u32) {
    match entry.function {
        LEAF_FEATURES => {
            // EBX[31:24] initial APIC ID, EBX[23:16] addressable logical processor IDs.
            entry.ebx = (entry.ebx & 0xffff) | (apic_id << 24) | ((1 << core_bits) << 16);
            entry.ecx |= ECX_HYPERVISOR;
            if count > 1 {
                entry.edx |= EDX_HTT;
            } else {
                entry.edx &= !EDX_HTT;
            }
        }
        LEAF_CACHE_PARAMS => {
            // EAX[31:26] cores per package - 1; EAX[25:14] logical processors sharing this
            // cache - 1: private caches for levels 1-2, the last level shared by all.
            let level = (entry.eax >> 5) & 0x7;
            let sharing = if level >= 3 { count - 1 } else { 0 };
            entry.eax = (entry.eax & 0x3fff) | (((1 << core_bits) - 1) << 26) | (sharing << 14);
        }
        LEAF_EXT_TOPOLOGY | LEAF_V2_EXT_TOPOLOGY => {
            entry.flags |= KVM_CPUID_FLAG_SIGNIFCANT_INDEX;
            entry.edx = apic_id;
            match entry.index {
                0 => {
                    entry.eax = 0;
                    entry.ebx = 1;
                    entry.ecx = (TOPOLOGY_LEVEL_SMT << 8) | entry.index;
                }
                1 => {
                    entry.eax = core_bits;
                    entry.ebx = count;
                    entry.ecx = (TOPOLOGY_LEVEL_CORE << 8) | entry.index;
                }
                _ => {
                    entry.eax = 0;
                    entry.ebx = 0;
                    entry.ecx = entry.index;
                }
            }
        }
        LEAF_AMD_SIZE_IDS => {
            // ECX[15:12] APIC ID bits for cores, ECX[7:0] cores - 1.
            entry.ecx = (entry.ecx & !0xf0ff) | (core_bits << 12) | (count - 1);
        }
        LEAF_AMD_EXT_APIC_ID => {
            entry.eax = apic_id;
            // EBX[15:8] threads per core - 1 (0), EBX[7:0] core ID.
            entry.ebx = (entry.ebx & !0xffff) | (apic_id & 0xff);
            entry.ecx &= !0x7ff; // one node, node ID 0
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    #[test]
    fn cpuid_leaf1_carries_apic_id_and_hypervisor_bit() {
        let mut cpuid = CpuId::from_entries(&[entry(LEAF_FEATURES, 0)]).unwrap();
        patch(&mut cpuid, 3, 4);
        let e = cpuid.as_slice()[0];
        assert_eq!(e.ebx >> 24, 3);
        assert_eq!((e.ebx >> 16) & 0xff, 4);
        assert_ne!(e.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(e.edx & EDX_HTT, 0);
    }

    #[test]
    fn cpuid_leaf_b_describes_cores() {
        let mut cpuid = CpuId::from_entries(&[
            entry(LEAF_EXT_TOPOLOGY, 0),
            entry(LEAF_EXT_TOPOLOGY, 1),
            entry(LEAF_EXT_TOPOLOGY, 2),
        ])
        .unwrap();
        patch(&mut cpuid, 1, 3);
        let e = cpuid.as_slice();
        assert_eq!((e[0].ebx, e[0].ecx >> 8, e[0].edx), (1, 1, 1));
        assert_eq!((e[1].eax, e[1].ebx, e[1].ecx >> 8), (2, 3, 2));
        assert_eq!(e[2].ecx >> 8, 0);
    }

    #[test]
    fn id_bits_rounds_up() {
        assert_eq!([1, 2, 3, 4, 5].map(id_bits), [0, 1, 2, 2, 3]);
    }
}
