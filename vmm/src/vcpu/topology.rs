//! The vCPUs' layout: sockets of cores of hardware threads, and the APIC ID each vCPU gets.
//!
//! APIC IDs are bit fields, as x2APIC hardware numbers them: the lowest `thread_bits`
//! number the threads of a core, the next `core_bits` the cores of a socket, the rest the
//! socket; each field is as wide as it takes to number its count (`threads = 3` takes 2
//! bits). With counts that are not powers of two the IDs therefore have gaps: 2 sockets of 3
//! cores of 2 threads are APIC IDs 0-5 and 8-13. vCPU `i` (the order of `--cpus`, the MADT
//! and KVM's vCPU list) is thread `i % threads` of core `(i / threads) % cores` of socket
//! `i / (threads * cores)`; vCPU 0 is APIC ID 0, the boot processor.

use crate::config::{CpuTopology, VmConfig};

/// Bits needed to number `n` things (0 for 1).
pub fn id_bits(n: u32) -> u32 {
    n.next_power_of_two().trailing_zeros()
}

/// Where a vCPU sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub socket: u32,
    /// The core within its socket.
    pub core: u32,
    /// The thread within its core.
    pub thread: u32,
}

/// A VM's vCPU layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Topology {
    pub sockets: u32,
    pub cores: u32,
    pub threads: u32,
    /// The user gave it (`--topology`): the guest is told about threads and sockets with
    /// every CPUID leaf that can carry them, even ones the host does not report (AMD's
    /// topology extensions). Otherwise podvm presents one socket of single-threaded cores,
    /// as it always has.
    pub explicit: bool,
}

impl Topology {
    /// `topology` if the user gave one, else one socket of `vcpus` single-threaded cores.
    pub fn new(vcpus: u8, topology: Option<&CpuTopology>) -> Self {
        match topology {
            Some(t) => Self {
                sockets: u32::from(t.sockets),
                cores: u32::from(t.cores),
                threads: u32::from(t.threads),
                explicit: true,
            },
            None => Self {
                sockets: 1,
                cores: u32::from(vcpus),
                threads: 1,
                explicit: false,
            },
        }
    }

    /// The layout of `config`'s vCPUs.
    pub fn of(config: &VmConfig) -> Self {
        Self::new(config.vcpus, config.topology.as_ref())
    }

    /// How many vCPUs the layout holds.
    pub fn vcpus(&self) -> u32 {
        self.sockets * self.cores * self.threads
    }

    /// APIC ID bits that number the threads of a core.
    pub fn thread_bits(&self) -> u32 {
        id_bits(self.threads)
    }

    /// APIC ID bits that number the cores of a socket.
    pub fn core_bits(&self) -> u32 {
        id_bits(self.cores)
    }

    /// APIC ID bits below the socket number (threads and cores together).
    pub fn socket_shift(&self) -> u32 {
        self.thread_bits() + self.core_bits()
    }

    /// Logical processors (threads) in one socket.
    pub fn threads_per_socket(&self) -> u32 {
        self.cores * self.threads
    }

    /// Where vCPU `index` sits.
    pub fn position(&self, index: u32) -> Position {
        Position {
            socket: index / self.threads_per_socket(),
            core: (index / self.threads) % self.cores,
            thread: index % self.threads,
        }
    }

    /// The APIC ID of vCPU `index`.
    pub fn apic_id(&self, index: u32) -> u32 {
        let p = self.position(index);
        (p.socket << self.socket_shift()) | (p.core << self.thread_bits()) | p.thread
    }

    /// Every vCPU's APIC ID, in vCPU order.
    pub fn apic_ids(&self) -> Vec<u32> {
        (0..self.vcpus()).map(|i| self.apic_id(i)).collect()
    }

    /// The highest APIC ID (the last vCPU's).
    pub fn max_apic_id(&self) -> u32 {
        self.apic_id(self.vcpus().saturating_sub(1))
    }
}

/// The layout of `sockets` x `cores` x `threads` vCPUs (for tests).
#[cfg(test)]
pub(super) fn topo(sockets: u8, cores: u8, threads: u8) -> Topology {
    Topology::new(
        sockets * cores * threads,
        Some(&CpuTopology {
            sockets,
            cores,
            threads,
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topology_default_is_one_socket_of_single_threaded_cores_numbered_in_order() {
        let t = Topology::new(5, None);
        assert_eq!(
            (t.sockets, t.cores, t.threads, t.explicit),
            (1, 5, 1, false)
        );
        assert_eq!(t.apic_ids(), vec![0, 1, 2, 3, 4]);
        assert_eq!((t.thread_bits(), t.core_bits()), (0, 3));
    }

    #[test]
    fn topology_2_sockets_3_cores_2_threads_leaves_gaps_in_the_apic_ids() {
        let t = topo(2, 3, 2);
        assert_eq!(
            (t.thread_bits(), t.core_bits(), t.socket_shift()),
            (1, 2, 3)
        );
        assert_eq!(t.apic_ids(), vec![0, 1, 2, 3, 4, 5, 8, 9, 10, 11, 12, 13]);
        assert_eq!(
            t.position(7),
            Position {
                socket: 1,
                core: 0,
                thread: 1
            }
        );
        assert_eq!(t.max_apic_id(), 13);
    }

    #[test]
    fn topology_powers_of_two_number_the_vcpus_without_gaps() {
        let t = topo(2, 2, 2);
        assert_eq!(t.apic_ids(), (0..8).collect::<Vec<_>>());
        // vCPU 5: socket 1, core 0, thread 1.
        assert_eq!(t.apic_id(5), 0b101);
    }

    #[test]
    fn topology_single_socket_threads_only() {
        let t = topo(1, 1, 4);
        assert_eq!(t.apic_ids(), vec![0, 1, 2, 3]);
        assert_eq!((t.thread_bits(), t.core_bits()), (2, 0));
    }

    #[test]
    fn id_bits_rounds_up() {
        assert_eq!([1, 2, 3, 4, 5, 8, 9].map(id_bits), [0, 1, 2, 2, 3, 3, 4]);
    }
}
