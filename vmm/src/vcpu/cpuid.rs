//! CPUID for each vCPU: KVM's supported set, rewritten so that the guest sees the VM's
//! [`Topology`] (sockets of cores of threads) and this vCPU's place in it.
//!
//! Leaves rewritten (where KVM reports them):
//!
//! | leaf | what |
//! |---|---|
//! | 1 | EBX initial APIC ID and addressable IDs per package; HTT when a package has more than one logical processor; the hypervisor bit |
//! | 4 | cores per package; caches L1-L2 shared by the threads of a core, L3 by the socket |
//! | 0xb, 0x1f | the SMT level and the core level: shift widths, counts, x2APIC ID |
//! | 0x8000_0008 | ECX: APIC ID bits below the socket, logical processors per socket - 1 |
//! | 0x8000_001d | AMD cache topology: sharing as for leaf 4 |
//! | 0x8000_001e | AMD: extended APIC ID, core ID, threads per core, node (= socket) ID |
//!
//! With an explicit topology (`--topology`) podvm also makes sure the guest can read it:
//! leaf 0xb gets its SMT, core and terminating subleaves if KVM lists fewer, and on an AMD
//! CPU without topology extensions (a nested or emulated host) podvm offers them itself
//! (TOPOEXT, leaf 0x8000_001e, and 0x8000_001d built from the legacy cache leaves
//! 0x8000_0005/6): without them Linux on AMD sees no threads.

use kvm_bindings::{kvm_cpuid_entry2, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

use super::topology::Topology;

const LEAF_VENDOR: u32 = 0x0;
const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXT_TOPOLOGY: u32 = 0x1f;
const LEAF_EXT_MAX: u32 = 0x8000_0000;
const LEAF_EXT_FEATURES: u32 = 0x8000_0001;
const LEAF_AMD_L1_CACHE: u32 = 0x8000_0005;
const LEAF_AMD_L2_L3_CACHE: u32 = 0x8000_0006;
const LEAF_AMD_SIZE_IDS: u32 = 0x8000_0008;
const LEAF_AMD_CACHE_TOPOLOGY: u32 = 0x8000_001d;
const LEAF_AMD_EXT_APIC_ID: u32 = 0x8000_001e;

const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
/// CPUID 0x8000_0001 ECX: TopologyExtensions (leaves 0x8000_001d and 0x8000_001e).
const ECX_TOPOEXT: u32 = 1 << 22;

const TOPOLOGY_LEVEL_SMT: u32 = 1;
const TOPOLOGY_LEVEL_CORE: u32 = 2;

/// Cache types in leaves 4 and 0x8000_001d (EAX[4:0]).
const CACHE_NULL: u32 = 0;
const CACHE_DATA: u32 = 1;
const CACHE_INSTRUCTION: u32 = 2;
const CACHE_UNIFIED: u32 = 3;

/// Rewrites `entries` (KVM's supported set) for vCPU `index` of `topo`.
pub fn patch(entries: &mut Vec<kvm_cpuid_entry2>, topo: &Topology, index: u32) {
    if topo.explicit {
        complete_ext_topology(entries);
        if is_amd(entries) {
            offer_topoext(entries);
        }
    }
    let apic_id = topo.apic_id(index);
    for entry in entries.iter_mut() {
        patch_entry(entry, topo, index, apic_id);
    }
}

fn find(entries: &[kvm_cpuid_entry2], function: u32, index: u32) -> Option<&kvm_cpuid_entry2> {
    entries
        .iter()
        .find(|e| e.function == function && e.index == index)
}

fn leaf(function: u32, index: u32) -> kvm_cpuid_entry2 {
    kvm_cpuid_entry2 {
        function,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        ..Default::default()
    }
}

/// "AuthenticAMD" or "HygonGenuine": the vendors whose topology Linux reads from the AMD
/// leaves.
fn is_amd(entries: &[kvm_cpuid_entry2]) -> bool {
    let Some(v) = find(entries, LEAF_VENDOR, 0) else {
        return false;
    };
    let vendor = [v.ebx, v.edx, v.ecx].map(u32::to_le_bytes).concat();
    vendor == b"AuthenticAMD" || vendor == b"HygonGenuine"
}

/// Adds leaf 0xb's SMT (0), core (1) and terminating (2) subleaves where KVM lists fewer
/// (KVM copies the host's, which a nested or emulated host may leave empty), if the basic
/// leaves reach 0xb at all.
fn complete_ext_topology(entries: &mut Vec<kvm_cpuid_entry2>) {
    let max_basic = find(entries, LEAF_VENDOR, 0).map_or(0, |e| e.eax);
    if max_basic < LEAF_EXT_TOPOLOGY {
        return;
    }
    for index in 0..3 {
        if find(entries, LEAF_EXT_TOPOLOGY, index).is_none() {
            entries.push(leaf(LEAF_EXT_TOPOLOGY, index));
        }
    }
}

/// On an AMD CPU whose KVM does not report TOPOEXT, offers it: raises the extended leaf
/// range to 0x8000_001e, adds that leaf, and describes the caches in 0x8000_001d from the
/// legacy leaves 0x8000_0005/6 (with TOPOEXT Linux reads its caches there). Needs leaf
/// 0x8000_0008 (address sizes), which the raised range would otherwise leave empty.
fn offer_topoext(entries: &mut Vec<kvm_cpuid_entry2>) {
    let has_topoext = find(entries, LEAF_EXT_FEATURES, 0).is_some_and(|e| e.ecx & ECX_TOPOEXT != 0)
        && find(entries, LEAF_AMD_EXT_APIC_ID, 0).is_some();
    if has_topoext || find(entries, LEAF_AMD_SIZE_IDS, 0).is_none() {
        return;
    }
    let Some(features) = entries
        .iter_mut()
        .find(|e| e.function == LEAF_EXT_FEATURES && e.index == 0)
    else {
        return;
    };
    features.ecx |= ECX_TOPOEXT;
    if let Some(max) = entries
        .iter_mut()
        .find(|e| e.function == LEAF_EXT_MAX && e.index == 0)
    {
        max.eax = max.eax.max(LEAF_AMD_EXT_APIC_ID);
    }
    if !entries
        .iter()
        .any(|e| e.function == LEAF_AMD_CACHE_TOPOLOGY)
    {
        let caches = legacy_caches(
            find(entries, LEAF_AMD_L1_CACHE, 0).copied(),
            find(entries, LEAF_AMD_L2_L3_CACHE, 0).copied(),
        );
        let count = caches.len() as u32;
        for (index, mut entry) in caches.into_iter().enumerate() {
            entry.index = index as u32;
            entries.push(entry);
        }
        // The list ends with a null cache.
        entries.push(leaf(LEAF_AMD_CACHE_TOPOLOGY, count));
    }
    entries.push(leaf(LEAF_AMD_EXT_APIC_ID, 0));
}

/// Ways of an L2/L3 associativity code of leaf 0x8000_0006 (`None`: disabled, or "see leaf
/// 0x8000_001d"); `u32::MAX` is fully associative.
fn ways_of_code(code: u32) -> Option<u32> {
    Some(match code {
        0x1 => 1,
        0x2 => 2,
        0x3 => 3,
        0x4 => 4,
        0x5 => 6,
        0x6 => 8,
        0x8 => 16,
        0xa => 32,
        0xb => 48,
        0xc => 64,
        0xd => 96,
        0xe => 128,
        0xf => u32::MAX,
        _ => return None,
    })
}

/// One 0x8000_001d entry (sharing left at 0; [`patch_entry`] sets it): `ways` of `u32::MAX`
/// means fully associative.
fn cache_entry(kind: u32, level: u32, size: u32, line: u32, ways: u32) -> Option<kvm_cpuid_entry2> {
    if size == 0 || line == 0 || ways == 0 {
        return None;
    }
    let fully = ways == u32::MAX;
    let ways = if fully { size / line } else { ways };
    let sets = size / (line * ways);
    if sets == 0 || ways > 1024 || line > 4096 {
        return None;
    }
    let mut e = leaf(LEAF_AMD_CACHE_TOPOLOGY, 0);
    // EAX: type, level, self-initializing, fully associative.
    e.eax = kind | level << 5 | 1 << 8 | u32::from(fully) << 9;
    // EBX: line size - 1, one line partition, ways - 1; ECX: sets - 1.
    e.ebx = (line - 1) | (ways - 1) << 22;
    e.ecx = sets - 1;
    Some(e)
}

/// The caches that leaves 0x8000_0005 (L1) and 0x8000_0006 (L2, L3) describe, as
/// 0x8000_001d entries.
fn legacy_caches(
    l1: Option<kvm_cpuid_entry2>,
    l2_l3: Option<kvm_cpuid_entry2>,
) -> Vec<kvm_cpuid_entry2> {
    let mut caches = Vec::new();
    if let Some(l1) = l1 {
        // ECX L1 data, EDX L1 instruction: size KiB [31:24], ways [23:16] (0xff fully),
        // line size [7:0].
        for (reg, kind) in [(l1.ecx, CACHE_DATA), (l1.edx, CACHE_INSTRUCTION)] {
            let ways = match (reg >> 16) & 0xff {
                0xff => u32::MAX,
                w => w,
            };
            caches.extend(cache_entry(kind, 1, (reg >> 24) * 1024, reg & 0xff, ways));
        }
    }
    if let Some(l) = l2_l3 {
        // ECX L2: size KiB [31:16]; EDX L3: size in 512 KiB units [31:18]; both with an
        // associativity code [15:12] and the line size [7:0].
        for (level, size) in [(2, (l.ecx >> 16) * 1024), (3, (l.edx >> 18) * 512 * 1024)] {
            let reg = if level == 2 { l.ecx } else { l.edx };
            if let Some(ways) = ways_of_code((reg >> 12) & 0xf) {
                caches.extend(cache_entry(CACHE_UNIFIED, level, size, reg & 0xff, ways));
            }
        }
    }
    caches
}

/// Logical processors sharing a cache of `level`: the threads of a core for L1 and L2, the
/// socket for L3 and beyond.
fn sharing(topo: &Topology, level: u32) -> u32 {
    if level >= 3 {
        topo.threads_per_socket()
    } else {
        topo.threads
    }
}

fn patch_entry(entry: &mut kvm_cpuid_entry2, topo: &Topology, index: u32, apic_id: u32) {
    let position = topo.position(index);
    // Addressable IDs (powers of two) of threads per core and of logical processors per
    // package, as the Intel leaves count them.
    let thread_ids = 1 << topo.thread_bits();
    let package_ids = 1 << topo.socket_shift();
    match entry.function {
        LEAF_FEATURES => {
            // EBX[31:24] initial APIC ID, EBX[23:16] addressable logical processor IDs.
            entry.ebx =
                (entry.ebx & 0xffff) | ((apic_id & 0xff) << 24) | ((package_ids & 0xff) << 16);
            entry.ecx |= ECX_HYPERVISOR;
            if topo.threads_per_socket() > 1 {
                entry.edx |= EDX_HTT;
            } else {
                entry.edx &= !EDX_HTT;
            }
        }
        LEAF_CACHE_PARAMS => {
            if entry.eax & 0x1f == CACHE_NULL {
                return;
            }
            // EAX[31:26] addressable core IDs per package - 1; EAX[25:14] addressable IDs
            // of logical processors sharing this cache - 1.
            let level = (entry.eax >> 5) & 0x7;
            let shared = if level >= 3 { package_ids } else { thread_ids };
            let cores = (1 << topo.core_bits()) - 1;
            entry.eax =
                (entry.eax & 0x3fff) | ((cores & 0x3f) << 26) | (((shared - 1) & 0xfff) << 14);
        }
        LEAF_EXT_TOPOLOGY | LEAF_V2_EXT_TOPOLOGY => {
            entry.flags |= KVM_CPUID_FLAG_SIGNIFCANT_INDEX;
            entry.edx = apic_id;
            match entry.index {
                0 => {
                    // Shift to the core ID, threads per core.
                    entry.eax = topo.thread_bits();
                    entry.ebx = topo.threads;
                    entry.ecx = (TOPOLOGY_LEVEL_SMT << 8) | entry.index;
                }
                1 => {
                    // Shift to the socket ID, logical processors per socket.
                    entry.eax = topo.socket_shift();
                    entry.ebx = topo.threads_per_socket();
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
            // ECX[15:12] APIC ID bits below the socket, ECX[7:0] logical processors per
            // socket - 1.
            entry.ecx = (entry.ecx & !0xf0ff)
                | ((topo.socket_shift() & 0xf) << 12)
                | ((topo.threads_per_socket() - 1) & 0xff);
        }
        LEAF_AMD_CACHE_TOPOLOGY => {
            if entry.eax & 0x1f == CACHE_NULL {
                return;
            }
            // EAX[25:14] logical processors sharing this cache - 1.
            let level = (entry.eax >> 5) & 0x7;
            let shared = sharing(topo, level);
            entry.eax = (entry.eax & !(0xfff << 14)) | (((shared - 1) & 0xfff) << 14);
        }
        LEAF_AMD_EXT_APIC_ID => {
            entry.eax = apic_id;
            // EBX[15:8] threads per core - 1, EBX[7:0] core ID (within the socket).
            entry.ebx =
                (entry.ebx & !0xffff) | (((topo.threads - 1) & 0xff) << 8) | (position.core & 0xff);
            // ECX[10:8] nodes per socket - 1 (one), ECX[7:0] node ID: the socket's.
            entry.ecx = (entry.ecx & !0x7ff) | (position.socket & 0xff);
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

    use super::super::topology::topo;

    fn get(entries: &[kvm_cpuid_entry2], function: u32, index: u32) -> kvm_cpuid_entry2 {
        *find(entries, function, index).unwrap_or_else(|| panic!("no leaf {function:#x}/{index}"))
    }

    /// A cache leaf (4 or 0x8000_001d) of `kind` at `level`.
    fn cache(function: u32, index: u32, kind: u32, level: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            eax: kind | level << 5,
            ..entry(function, index)
        }
    }

    fn vendor(name: &[u8; 12], max_basic: u32) -> kvm_cpuid_entry2 {
        let word = |i: usize| u32::from_le_bytes(name[i..i + 4].try_into().unwrap());
        kvm_cpuid_entry2 {
            eax: max_basic,
            ebx: word(0),
            edx: word(4),
            ecx: word(8),
            ..entry(LEAF_VENDOR, 0)
        }
    }

    /// Leaves as an Intel host's KVM lists them (abridged).
    fn intel() -> Vec<kvm_cpuid_entry2> {
        vec![
            vendor(b"GenuineIntel", 0x1f),
            entry(LEAF_FEATURES, 0),
            cache(LEAF_CACHE_PARAMS, 0, CACHE_DATA, 1),
            cache(LEAF_CACHE_PARAMS, 1, CACHE_INSTRUCTION, 1),
            cache(LEAF_CACHE_PARAMS, 2, CACHE_UNIFIED, 2),
            cache(LEAF_CACHE_PARAMS, 3, CACHE_UNIFIED, 3),
            entry(LEAF_CACHE_PARAMS, 4),
            entry(LEAF_EXT_TOPOLOGY, 0),
            entry(LEAF_EXT_TOPOLOGY, 1),
            entry(LEAF_EXT_TOPOLOGY, 2),
            entry(LEAF_V2_EXT_TOPOLOGY, 0),
            entry(LEAF_V2_EXT_TOPOLOGY, 1),
            entry(LEAF_V2_EXT_TOPOLOGY, 2),
        ]
    }

    /// What KVM listed in the KVM sandbox (QEMU TCG's AMD CPU): leaf 0xb with its first
    /// subleaf only, extended leaves up to 0x8000_000a, no TOPOEXT, L2 and L3 in
    /// 0x8000_0006, nothing in 0x8000_0005.
    fn amd_without_topoext() -> Vec<kvm_cpuid_entry2> {
        vec![
            vendor(b"AuthenticAMD", 0xd),
            entry(LEAF_FEATURES, 0),
            entry(LEAF_CACHE_PARAMS, 0),
            entry(LEAF_EXT_TOPOLOGY, 0),
            kvm_cpuid_entry2 {
                eax: 0x8000_000a,
                ..entry(LEAF_EXT_MAX, 0)
            },
            kvm_cpuid_entry2 {
                ecx: 0x77,
                ..entry(LEAF_EXT_FEATURES, 0)
            },
            entry(LEAF_AMD_L1_CACHE, 0),
            kvm_cpuid_entry2 {
                ecx: 0x0200_8140,
                edx: 0x0080_8140,
                ..entry(LEAF_AMD_L2_L3_CACHE, 0)
            },
            kvm_cpuid_entry2 {
                eax: 0x3928,
                ecx: 0x1001,
                ..entry(LEAF_AMD_SIZE_IDS, 0)
            },
        ]
    }

    /// The 2 x 3 x 2 layout of the topology tests: APIC IDs 0-5 and 8-13.
    const VCPU_S1_C2_T1: u32 = 11;

    #[test]
    fn cpuid_leaf1_carries_apic_id_logical_count_htt_and_hypervisor_bit() {
        let mut e = intel();
        patch(&mut e, &topo(2, 3, 2), VCPU_S1_C2_T1);
        let l1 = get(&e, LEAF_FEATURES, 0);
        assert_eq!(l1.ebx >> 24, 13, "APIC ID of socket 1, core 2, thread 1");
        assert_eq!((l1.ebx >> 16) & 0xff, 8, "IDs per package: 3 bits");
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(l1.edx & EDX_HTT, 0);

        // One single-threaded core per socket: no HTT.
        let mut e = intel();
        patch(&mut e, &topo(2, 1, 1), 1);
        let l1 = get(&e, LEAF_FEATURES, 0);
        assert_eq!(l1.edx & EDX_HTT, 0);
        assert_eq!((l1.ebx >> 24, (l1.ebx >> 16) & 0xff), (1, 1));
    }

    #[test]
    fn cpuid_leaf4_shares_l1_l2_within_a_core_and_l3_within_a_socket() {
        let mut e = intel();
        patch(&mut e, &topo(2, 3, 2), 0);
        let sharing = |i| (get(&e, LEAF_CACHE_PARAMS, i).eax >> 14) & 0xfff;
        let cores = |i| get(&e, LEAF_CACHE_PARAMS, i).eax >> 26;
        assert_eq!([0, 1, 2, 3].map(sharing), [1, 1, 1, 7]);
        assert_eq!(cores(0), 3, "4 addressable core IDs per package");
        // Type and level are kept; the null leaf ending the list stays null.
        assert_eq!(
            get(&e, LEAF_CACHE_PARAMS, 3).eax & 0xff,
            CACHE_UNIFIED | 3 << 5
        );
        assert_eq!(get(&e, LEAF_CACHE_PARAMS, 4).eax, 0);
    }

    #[test]
    fn cpuid_leaves_b_and_1f_give_smt_and_core_levels_with_shifts_and_counts() {
        let mut e = intel();
        patch(&mut e, &topo(2, 3, 2), VCPU_S1_C2_T1);
        for leaf in [LEAF_EXT_TOPOLOGY, LEAF_V2_EXT_TOPOLOGY] {
            let s = |i| {
                let x = get(&e, leaf, i);
                (x.eax, x.ebx, x.ecx, x.edx)
            };
            assert_eq!(s(0), (1, 2, TOPOLOGY_LEVEL_SMT << 8, 13), "{leaf:#x} SMT");
            assert_eq!(
                s(1),
                (3, 6, TOPOLOGY_LEVEL_CORE << 8 | 1, 13),
                "{leaf:#x} core"
            );
            assert_eq!(s(2), (0, 0, 2, 13), "{leaf:#x} end");
            assert_ne!(get(&e, leaf, 0).flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX, 0);
        }
    }

    #[test]
    fn cpuid_default_topology_is_one_socket_of_single_threaded_cores() {
        let mut e = intel();
        let t = Topology::new(3, None);
        patch(&mut e, &t, 1);
        let l1 = get(&e, LEAF_FEATURES, 0);
        assert_eq!((l1.ebx >> 24, (l1.ebx >> 16) & 0xff), (1, 4));
        assert_ne!(l1.edx & EDX_HTT, 0);
        let b = |i| {
            let x = get(&e, LEAF_EXT_TOPOLOGY, i);
            (x.eax, x.ebx, x.ecx >> 8, x.edx)
        };
        assert_eq!(b(0), (0, 1, 1, 1));
        assert_eq!(b(1), (2, 3, 2, 1));
        assert_eq!(b(2).2, 0);
    }

    #[test]
    fn cpuid_amd_leaves_give_threads_per_core_core_and_node_ids() {
        let mut e = amd_without_topoext();
        e.extend([
            entry(LEAF_AMD_EXT_APIC_ID, 0),
            cache(LEAF_AMD_CACHE_TOPOLOGY, 0, CACHE_DATA, 1),
            cache(LEAF_AMD_CACHE_TOPOLOGY, 1, CACHE_UNIFIED, 3),
        ]);
        e[5].ecx |= ECX_TOPOEXT;
        patch(&mut e, &topo(2, 3, 2), VCPU_S1_C2_T1);
        let x = get(&e, LEAF_AMD_EXT_APIC_ID, 0);
        assert_eq!(x.eax, 13);
        assert_eq!((x.ebx >> 8) & 0xff, 1, "threads per core - 1");
        assert_eq!(x.ebx & 0xff, 2, "core ID in the socket");
        assert_eq!(x.ecx & 0x7ff, 1, "node 1 of 1 per socket");
        let size = get(&e, LEAF_AMD_SIZE_IDS, 0);
        assert_eq!((size.ecx >> 12) & 0xf, 3, "APIC ID bits below the socket");
        assert_eq!(size.ecx & 0xff, 5, "6 threads per socket");
        assert_eq!(size.eax, 0x3928, "address sizes untouched");
        let sharing = |i| (get(&e, LEAF_AMD_CACHE_TOPOLOGY, i).eax >> 14) & 0xfff;
        assert_eq!([0, 1].map(sharing), [1, 5]);
        // KVM had it all: nothing was added.
        assert_eq!(e.len(), amd_without_topoext().len() + 3 + 2);
    }

    #[test]
    fn cpuid_explicit_topology_on_amd_without_topoext_offers_it() {
        let mut e = amd_without_topoext();
        patch(&mut e, &topo(2, 2, 2), 5);
        assert_ne!(get(&e, LEAF_EXT_FEATURES, 0).ecx & ECX_TOPOEXT, 0);
        assert_eq!(get(&e, LEAF_EXT_MAX, 0).eax, LEAF_AMD_EXT_APIC_ID);
        let x = get(&e, LEAF_AMD_EXT_APIC_ID, 0);
        assert_eq!(
            (x.eax, (x.ebx >> 8) & 0xff, x.ebx & 0xff, x.ecx),
            (5, 1, 0, 1)
        );
        // Leaf 0xb completed: SMT and core levels and the end.
        let b = |i| {
            let x = get(&e, LEAF_EXT_TOPOLOGY, i);
            (x.eax, x.ebx, x.ecx >> 8, x.edx)
        };
        assert_eq!([0, 1, 2].map(b), [(1, 2, 1, 5), (2, 4, 2, 5), (0, 0, 0, 5)]);
        // The caches of 0x8000_0006 (L2 512 KiB, L3 16 MiB, both 16-way with 64-byte
        // lines) in 0x8000_001d, then the null cache.
        let l2 = get(&e, LEAF_AMD_CACHE_TOPOLOGY, 0);
        assert_eq!(l2.eax & 0xff, CACHE_UNIFIED | 2 << 5);
        assert_eq!(
            (l2.eax >> 14) & 0xfff,
            1,
            "L2 shared by the 2 threads of a core"
        );
        assert_eq!((l2.ebx & 0xfff, l2.ebx >> 22, l2.ecx), (63, 15, 511));
        let l3 = get(&e, LEAF_AMD_CACHE_TOPOLOGY, 1);
        assert_eq!(l3.eax & 0xff, CACHE_UNIFIED | 3 << 5);
        assert_eq!(
            (l3.eax >> 14) & 0xfff,
            3,
            "L3 shared by the socket's 4 threads"
        );
        assert_eq!((l3.ebx >> 22, l3.ecx), (15, 16383));
        assert_eq!(get(&e, LEAF_AMD_CACHE_TOPOLOGY, 2).eax, 0);
        assert!(e
            .iter()
            .filter(|x| x.function == LEAF_AMD_CACHE_TOPOLOGY)
            .all(|x| x.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX != 0));
    }

    #[test]
    fn cpuid_default_topology_on_amd_adds_no_leaves() {
        let mut e = amd_without_topoext();
        patch(&mut e, &Topology::new(2, None), 1);
        assert_eq!(e.len(), amd_without_topoext().len());
        assert_eq!(get(&e, LEAF_EXT_FEATURES, 0).ecx & ECX_TOPOEXT, 0);
        let size = get(&e, LEAF_AMD_SIZE_IDS, 0);
        assert_eq!((size.ecx >> 12 & 0xf, size.ecx & 0xff), (1, 1));
    }

    #[test]
    fn cpuid_legacy_l1_caches_become_cache_topology_leaves() {
        // 32 KiB 8-way data and instruction caches, 64-byte lines.
        let l1 = kvm_cpuid_entry2 {
            ecx: 0x2008_0140,
            edx: 0x2008_0140,
            ..entry(LEAF_AMD_L1_CACHE, 0)
        };
        let caches = legacy_caches(Some(l1), None);
        assert_eq!(caches.len(), 2);
        assert_eq!(caches[0].eax & 0xff, CACHE_DATA | 1 << 5);
        assert_eq!(caches[1].eax & 0xff, CACHE_INSTRUCTION | 1 << 5);
        assert_eq!((caches[0].ebx >> 22, caches[0].ecx), (7, 63));
        // Disabled or "see 0x8000_001d" associativity codes describe nothing.
        let l2 = kvm_cpuid_entry2 {
            ecx: 0x0200_9140,
            edx: 0x0080_0140,
            ..entry(LEAF_AMD_L2_L3_CACHE, 0)
        };
        assert!(legacy_caches(None, Some(l2)).is_empty());
    }
}
