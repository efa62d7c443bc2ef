//! The ioctl request numbers the filters name. KVM's are computed here from the bindings'
//! structure sizes, as the kernel's headers compute them; vhost's come from the vhost crate
//! podvm drives vhost-net with, so the two cannot disagree.

#![allow(non_snake_case)]

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid2, kvm_debugregs, kvm_dirty_log, kvm_enable_cap, kvm_fpu,
    kvm_ioeventfd, kvm_irqchip, kvm_irqfd, kvm_lapic_state, kvm_mp_state, kvm_msr_list, kvm_msrs,
    kvm_pit_config, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_userspace_memory_region,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr, ioctl_iowr_nr};

const KVMIO: u32 = 0xae;
const TUNTAP: u32 = b'T' as u32;
const BLK: u32 = 0x12;

// vCPU ioctls.
ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
ioctl_iow_nr!(KVM_SET_REGS, KVMIO, 0x82, kvm_regs);
ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
ioctl_iow_nr!(KVM_SET_SREGS, KVMIO, 0x84, kvm_sregs);
ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_msrs);
ioctl_iow_nr!(KVM_SET_MSRS, KVMIO, 0x89, kvm_msrs);
ioctl_ior_nr!(KVM_GET_FPU, KVMIO, 0x8c, kvm_fpu);
ioctl_iow_nr!(KVM_SET_FPU, KVMIO, 0x8d, kvm_fpu);
ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_lapic_state);
ioctl_iow_nr!(KVM_SET_LAPIC, KVMIO, 0x8f, kvm_lapic_state);
ioctl_iow_nr!(KVM_SET_CPUID2, KVMIO, 0x90, kvm_cpuid2);
ioctl_iowr_nr!(KVM_GET_CPUID2, KVMIO, 0x91, kvm_cpuid2);
ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_mp_state);
ioctl_iow_nr!(KVM_SET_MP_STATE, KVMIO, 0x99, kvm_mp_state);
ioctl_ior_nr!(KVM_GET_VCPU_EVENTS, KVMIO, 0x9f, kvm_vcpu_events);
ioctl_iow_nr!(KVM_SET_VCPU_EVENTS, KVMIO, 0xa0, kvm_vcpu_events);
ioctl_ior_nr!(KVM_GET_DEBUGREGS, KVMIO, 0xa1, kvm_debugregs);
ioctl_iow_nr!(KVM_SET_DEBUGREGS, KVMIO, 0xa2, kvm_debugregs);
ioctl_ior_nr!(KVM_GET_XSAVE, KVMIO, 0xa4, kvm_xsave);
ioctl_iow_nr!(KVM_SET_XSAVE, KVMIO, 0xa5, kvm_xsave);
ioctl_ior_nr!(KVM_GET_XCRS, KVMIO, 0xa6, kvm_xcrs);
ioctl_iow_nr!(KVM_SET_XCRS, KVMIO, 0xa7, kvm_xcrs);

// VM ioctls.
ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);
ioctl_iow_nr!(
    KVM_SET_USER_MEMORY_REGION,
    KVMIO,
    0x46,
    kvm_userspace_memory_region
);
ioctl_iowr_nr!(KVM_GET_IRQCHIP, KVMIO, 0x62, kvm_irqchip);
// The kernel's header declares it _IOR, whatever the direction.
ioctl_ior_nr!(KVM_SET_IRQCHIP, KVMIO, 0x63, kvm_irqchip);
ioctl_iow_nr!(KVM_SET_CLOCK, KVMIO, 0x7b, kvm_clock_data);
ioctl_ior_nr!(KVM_GET_CLOCK, KVMIO, 0x7c, kvm_clock_data);
ioctl_ior_nr!(KVM_GET_PIT2, KVMIO, 0x9f, kvm_pit_state2);
ioctl_iow_nr!(KVM_SET_PIT2, KVMIO, 0xa0, kvm_pit_state2);

// Tap and block devices, as devices/ declares them.
ioctl_iow_nr!(TUNSETOFFLOAD, TUNTAP, 208, ::std::os::raw::c_uint);
ioctl_io_nr!(BLKDISCARD, BLK, 119);
ioctl_io_nr!(BLKZEROOUT, BLK, 127);

// Building the VM, opening taps and disks: before any thread filters itself.
ioctl_io_nr!(KVM_GET_API_VERSION, KVMIO, 0x00);
ioctl_io_nr!(KVM_CREATE_VM, KVMIO, 0x01);
ioctl_iowr_nr!(KVM_GET_MSR_INDEX_LIST, KVMIO, 0x02, kvm_msr_list);
ioctl_io_nr!(KVM_CHECK_EXTENSION, KVMIO, 0x03);
ioctl_io_nr!(KVM_GET_VCPU_MMAP_SIZE, KVMIO, 0x04);
ioctl_iowr_nr!(KVM_GET_SUPPORTED_CPUID, KVMIO, 0x05, kvm_cpuid2);
ioctl_io_nr!(KVM_CREATE_VCPU, KVMIO, 0x41);
ioctl_io_nr!(KVM_SET_TSS_ADDR, KVMIO, 0x47);
ioctl_iow_nr!(KVM_SET_IDENTITY_MAP_ADDR, KVMIO, 0x48, u64);
ioctl_io_nr!(KVM_CREATE_IRQCHIP, KVMIO, 0x60);
ioctl_iow_nr!(KVM_IRQFD, KVMIO, 0x76, kvm_irqfd);
ioctl_iow_nr!(KVM_CREATE_PIT2, KVMIO, 0x77, kvm_pit_config);
ioctl_iow_nr!(KVM_IOEVENTFD, KVMIO, 0x79, kvm_ioeventfd);
ioctl_iow_nr!(KVM_ENABLE_CAP, KVMIO, 0xa3, kvm_enable_cap);
ioctl_iow_nr!(TUNSETIFF, TUNTAP, 202, ::std::os::raw::c_int);
ioctl_iow_nr!(TUNSETVNETHDRSZ, TUNTAP, 216, ::std::os::raw::c_int);
ioctl_ior_nr!(TUNGETIFF, TUNTAP, 210, ::std::os::raw::c_uint);
ioctl_ior_nr!(BLKGETSIZE64, BLK, 114, u64);
ioctl_io_nr!(BLKSSZGET, BLK, 104);

/// What the process asks before its threads filter themselves (the OCI profile's part).
pub fn startup() -> Vec<u64> {
    let mut list: Vec<u64> = [
        KVM_GET_API_VERSION(),
        KVM_CREATE_VM(),
        KVM_GET_MSR_INDEX_LIST(),
        KVM_CHECK_EXTENSION(),
        KVM_GET_VCPU_MMAP_SIZE(),
        KVM_GET_SUPPORTED_CPUID(),
        KVM_CREATE_VCPU(),
        KVM_SET_TSS_ADDR(),
        KVM_SET_IDENTITY_MAP_ADDR(),
        KVM_CREATE_IRQCHIP(),
        KVM_IRQFD(),
        KVM_CREATE_PIT2(),
        KVM_IOEVENTFD(),
        KVM_ENABLE_CAP(),
        TUNSETIFF(),
        TUNSETVNETHDRSZ(),
        TUNGETIFF(),
        BLKGETSIZE64(),
        BLKSSZGET(),
    ]
    .map(u64::from)
    .to_vec();
    // A tap's index (does it exist?), MTU and address, asked on a UDP socket.
    list.extend([libc::SIOCGIFINDEX, libc::SIOCGIFMTU, libc::SIOCGIFHWADDR]);
    // --seccomp log's supervisor (an unfiltered thread): receiving and answering the
    // notifications of calls outside a thread's list.
    list.extend([
        libc::SECCOMP_IOCTL_NOTIF_RECV,
        libc::SECCOMP_IOCTL_NOTIF_SEND,
    ]);
    list
}

/// Terminal ioctls (the console on stdio: raw mode and back).
pub const TCGETS: u64 = libc::TCGETS;
pub const TCSETS: u64 = libc::TCSETS;
pub const TCSETSW: u64 = libc::TCSETSW;
pub const TCSETSF: u64 = libc::TCSETSF;
/// Rust's `set_nonblocking` on sockets.
pub const FIONBIO: u64 = libc::FIONBIO;
/// What a vCPU thread asks of its own vCPU: run it, and save its state for a migration.
pub fn vcpu_run() -> Vec<u64> {
    [
        KVM_RUN(),
        KVM_GET_REGS(),
        KVM_GET_SREGS(),
        KVM_GET_MSRS(),
        KVM_GET_FPU(),
        KVM_GET_LAPIC(),
        KVM_GET_CPUID2(),
        KVM_GET_MP_STATE(),
        KVM_GET_VCPU_EVENTS(),
        KVM_GET_DEBUGREGS(),
        KVM_GET_XSAVE(),
        KVM_GET_XCRS(),
    ]
    .map(u64::from)
    .to_vec()
}

/// Pausing and resuming the VM: the KVM clock is read when it stops and set when it goes on.
pub fn clock() -> Vec<u64> {
    [KVM_GET_CLOCK(), KVM_SET_CLOCK()].map(u64::from).to_vec()
}

/// What the migration thread asks of KVM: dirty logging, and the machine's and vCPUs'
/// state (saved at the source, restored at the destination).
pub fn migration() -> Vec<u64> {
    [
        KVM_GET_DIRTY_LOG(),
        KVM_SET_USER_MEMORY_REGION(),
        KVM_GET_IRQCHIP(),
        KVM_SET_IRQCHIP(),
        KVM_GET_CLOCK(),
        KVM_SET_CLOCK(),
        KVM_GET_PIT2(),
        KVM_SET_PIT2(),
        KVM_SET_REGS(),
        KVM_SET_SREGS(),
        KVM_SET_MSRS(),
        KVM_SET_FPU(),
        KVM_SET_LAPIC(),
        KVM_SET_CPUID2(),
        KVM_GET_CPUID2(),
        KVM_SET_MP_STATE(),
        KVM_SET_VCPU_EVENTS(),
        KVM_SET_DEBUGREGS(),
        KVM_SET_XSAVE(),
        KVM_SET_XCRS(),
    ]
    .map(u64::from)
    .to_vec()
}

/// vhost-net, driven by the event loop (start, and the hand-over around a migration).
pub fn vhost() -> Vec<u64> {
    use vhost::vhost_kern::vhost_binding as v;
    [
        v::VHOST_GET_FEATURES(),
        v::VHOST_SET_FEATURES(),
        v::VHOST_SET_OWNER(),
        v::VHOST_RESET_OWNER(),
        v::VHOST_SET_MEM_TABLE(),
        v::VHOST_SET_VRING_NUM(),
        v::VHOST_SET_VRING_ADDR(),
        v::VHOST_SET_VRING_BASE(),
        v::VHOST_GET_VRING_BASE(),
        v::VHOST_SET_VRING_KICK(),
        v::VHOST_SET_VRING_CALL(),
        v::VHOST_SET_VRING_ERR(),
        v::VHOST_NET_SET_BACKEND(),
        v::VHOST_SET_BACKEND_FEATURES(),
        v::VHOST_GET_BACKEND_FEATURES(),
    ]
    .map(u64::from)
    .to_vec()
}

/// A tap's offloads, set when the driver acknowledges its features.
/// A driver's reset of a NIC served by vhost-net detaches the tap from the instance, on the
/// vCPU thread whose MMIO write reset it.
pub fn vhost_detach() -> Vec<u64> {
    vec![vhost::vhost_kern::vhost_binding::VHOST_NET_SET_BACKEND()]
}

pub fn tap() -> Vec<u64> {
    vec![TUNSETOFFLOAD()]
}

/// The devices' own ioctls on the event loop: tap offloads, discard and write-zeroes on
/// block devices.
pub fn devices() -> Vec<u64> {
    [TUNSETOFFLOAD(), BLKDISCARD(), BLKZEROOUT()]
        .map(u64::from)
        .to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seccomp_ioctl_numbers_are_the_kernels() {
        // Values from the kernel's headers on x86_64.
        assert_eq!(KVM_RUN(), 0xae80);
        assert_eq!(KVM_GET_REGS(), 0x8090_ae81);
        assert_eq!(KVM_GET_MSRS(), 0xc008_ae88);
        assert_eq!(KVM_GET_DIRTY_LOG(), 0x4010_ae42);
        assert_eq!(KVM_SET_USER_MEMORY_REGION(), 0x4020_ae46);
        assert_eq!(KVM_GET_IRQCHIP(), 0xc208_ae62);
        assert_eq!(KVM_SET_IRQCHIP(), 0x8208_ae63);
        assert_eq!(KVM_GET_CLOCK(), 0x8030_ae7c);
        assert_eq!(KVM_GET_XSAVE(), 0x9000_aea4);
        assert_eq!(TUNSETOFFLOAD(), 0x4004_54d0);
        assert_eq!(BLKDISCARD(), 0x1277);
        use vhost::vhost_kern::vhost_binding as v;
        assert_eq!(v::VHOST_GET_VRING_BASE(), 0xc008_af12);
        assert_eq!(v::VHOST_NET_SET_BACKEND(), 0x4008_af30);
        assert_eq!(libc::SECCOMP_IOCTL_NOTIF_RECV, 0xc050_2100);
        assert_eq!(libc::SECCOMP_IOCTL_NOTIF_SEND, 0xc018_2101);
    }
}
