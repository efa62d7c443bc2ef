//! virtio-blk with the stock guest kernel: data written and read through the guest's
//! /dev/vdX reaches the backing file or block device, and the device's options hold.

use std::os::unix::fs::MetadataExt;
use std::process::Command;

use podvm_tests::{kvm_available, pattern, run_guest_script, sha256_file, TempDir};

const MIB: usize = 1 << 20;

/// What the guest's 1 MiB pattern block is: "podvm-pattern\n" repeated, cut to 1 MiB.
fn guest_pattern_block() -> Vec<u8> {
    b"podvm-pattern\n"
        .iter()
        .copied()
        .cycle()
        .take(MIB)
        .collect()
}

/// A guest script that writes `mib` MiB of the pattern to `dev` with dd and syncs.
fn write_pattern_script(dev: &str, mib: usize) -> String {
    format!(
        "yes podvm-pattern | head -c 1048576 > /tmp/block\n\
         t0=$(cut -d' ' -f1 /proc/uptime)\n\
         for i in $(seq {mib}); do cat /tmp/block; done | dd of={dev} bs=1M conv=fsync 2>&1\n\
         sync\n\
         echo \"DD-TIME {dev}: uptime $t0 to $(cut -d' ' -f1 /proc/uptime) s\"\n"
    )
}

fn assert_pattern(bytes: &[u8], mib: usize) {
    let block = guest_pattern_block();
    for i in 0..mib {
        assert!(
            bytes[i * MIB..(i + 1) * MIB] == block[..],
            "MiB {i} of the disk does not hold the pattern"
        );
    }
}

/// A loop block device over a file, detached on drop.
struct LoopDevice(String);

impl LoopDevice {
    fn attach(file: &str) -> Option<Self> {
        let free = Command::new("losetup").arg("-f").output().ok()?;
        let dev = String::from_utf8_lossy(&free.stdout).trim().to_string();
        if !free.status.success() || dev.is_empty() {
            return None;
        }
        let ok = Command::new("losetup")
            .args([&dev, file])
            .status()
            .ok()?
            .success();
        // The container runtime gives a block PVC's device to the pod's user.
        ok.then(|| {
            podvm_tests::pod::give(&dev);
            Self(dev)
        })
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

#[test]
fn blk_guest_dd_pattern_reaches_file_and_loop_device() {
    if !kvm_available() {
        return;
    }
    // The family's test with the container image's static podvm.
    podvm_tests::use_image_binary();
    let dir = TempDir::new("blk-pattern");
    let file_disk = dir.sparse("file.img", 72 << 20);
    let loop_file = dir.sparse("loop.img", 72 << 20);
    let Some(loopdev) = LoopDevice::attach(&loop_file) else {
        panic!("losetup failed: the test needs root and the loop module");
    };
    let script = format!(
        "{}{}",
        write_pattern_script("/dev/vda", 64),
        write_pattern_script("/dev/vdb", 64)
    );
    let out = run_guest_script(
        &script,
        &[
            "--memory", "384", "--disk", &file_disk, "--disk", &loopdev.0,
        ],
    );
    assert!(out.status.success(), "{out}");
    assert_eq!(out.script_status(), Some(0), "{out}");
    // How long each disk took in the guest: reported, not asserted (a CI run once saw this
    // test pass 600 s, where it usually takes under a minute).
    for line in out.stdout.lines().filter(|l| l.starts_with("DD-TIME ")) {
        eprintln!("{line}");
    }
    assert!(
        !out.stderr.contains("io_uring is unavailable"),
        "the default engine fell back to synchronous I/O\n{out}"
    );
    assert_pattern(&std::fs::read(&file_disk).unwrap(), 64);
    drop(loopdev);
    assert_pattern(&std::fs::read(&loop_file).unwrap(), 64);
}

#[test]
fn blk_guest_reads_prefilled_disk_with_matching_checksum() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("blk-read");
    let disk = dir.file("disk.img", &pattern(16 * MIB, 42));
    let expected = sha256_file(&disk);
    let out = run_guest_script(
        "echo SUM=$(sha256sum /dev/vda | cut -d' ' -f1)\n",
        &["--disk", &format!("{disk},readonly")],
    );
    assert!(out.status.success(), "{out}");
    assert_eq!(out.value("SUM"), Some(expected), "{out}");
    assert_eq!(out.script_status(), Some(0), "{out}");
}

#[test]
fn blk_readonly_disk_refuses_guest_write() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("blk-ro");
    let content = pattern(4 * MIB, 7);
    let disk = dir.file("disk.img", &content);
    // The write is meant to fail: its status is kept instead of ending the script.
    let script = "echo RO=$(cat /sys/block/vda/ro)\n\
                  dd=0\n\
                  dd if=/dev/zero of=/dev/vda bs=4096 count=16 conv=fsync 2>/dev/null || dd=$?\n\
                  echo DD=$dd\n";
    let out = run_guest_script(script, &["--disk", &format!("{disk},readonly")]);
    assert!(out.status.success(), "{out}");
    assert_eq!(out.script_status(), Some(0), "{out}");
    assert_eq!(out.value("RO").as_deref(), Some("1"), "{out}");
    let dd = out.value("DD");
    assert!(
        dd.as_deref().is_some_and(|status| status != "0"),
        "the write did not fail (dd's status: {dd:?})\n{out}"
    );
    assert!(
        std::fs::read(&disk).unwrap() == content,
        "the host file changed"
    );
}

#[test]
fn blk_discard_leaves_holes_in_the_file() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("blk-discard");
    let disk = dir.file("disk.img", &pattern(32 * MIB, 9));
    let before = std::fs::metadata(&disk).unwrap().blocks() * 512;
    let out = run_guest_script("blkdiscard /dev/vda\n", &["--disk", &disk]);
    assert!(out.status.success(), "{out}");
    assert_eq!(out.script_status(), Some(0), "blkdiscard failed\n{out}");
    let after = std::fs::metadata(&disk).unwrap().blocks() * 512;
    assert!(
        before >= 32 * MIB as u64,
        "the file was not allocated to begin with"
    );
    assert!(
        after < MIB as u64,
        "{after} bytes still allocated after discard\n{out}"
    );
    assert_eq!(std::fs::metadata(&disk).unwrap().len(), 32 * MIB as u64);
    assert!(std::fs::read(&disk).unwrap().iter().all(|&b| b == 0));
}

/// What the guest learns of its disk's discard and write-zeroes support, then the command,
/// then whether write-zeroes is still on (Linux turns it off for a disk that failed one).
fn range_script(command: &str) -> String {
    format!(
        "echo \"DISCARD-MAX=$(cat /sys/block/vda/queue/discard_max_bytes)\"\n\
         echo \"ZEROES-MAX=$(cat /sys/block/vda/queue/write_zeroes_max_bytes)\"\n\
         {command}\n\
         echo \"ZEROES-MAX-AFTER=$(cat /sys/block/vda/queue/write_zeroes_max_bytes)\"\n\
         echo \"READ-BACK=$(dd if=/dev/vda bs=1M skip=4 count=4 2>/dev/null | md5sum | cut -d' ' -f1)\"\n"
    )
}

/// The md5 (hex) of `n` zero bytes, as the guest's md5sum prints it.
fn zeros_md5(n: usize) -> String {
    let out = Command::new("md5sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(&vec![0u8; n])?;
            c.wait_with_output()
        })
        .expect("md5sum on the host");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// `bytes` holds zeros in [4 MiB, 8 MiB) and `original` everywhere else.
fn assert_zeroed_4_to_8_mib(what: &str, bytes: &[u8], original: &[u8]) {
    assert_eq!(bytes.len(), original.len(), "{what}: size changed");
    assert!(
        bytes[4 * MIB..8 * MIB].iter().all(|&b| b == 0),
        "{what}: MiB 4-8 not zero"
    );
    assert!(
        bytes[..4 * MIB] == original[..4 * MIB] && bytes[8 * MIB..] == original[8 * MIB..],
        "{what}: data outside MiB 4-8 changed"
    );
}

#[test]
fn blk_write_zeroes_from_the_guest_reads_back_as_zeros_in_guest_and_file() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("blk-zeroes");
    let original = pattern(16 * MIB, 21);
    let disk = dir.file("disk.img", &original);
    // util-linux's blkdiscard -z: BLKZEROOUT, which Linux sends as WRITE_ZEROES requests
    // when the disk offers them (and writes zero pages itself when it does not).
    let out = run_guest_script(
        &range_script("/sbin/blkdiscard -z -o 4194304 -l 4194304 /dev/vda"),
        &["--disk", &disk],
    );
    assert!(out.status.success(), "{out}");
    assert_eq!(out.script_status(), Some(0), "{out}");
    let max: u64 = out
        .value("ZEROES-MAX")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(max > 0, "the disk offers no write-zeroes\n{out}");
    assert_eq!(
        out.value("ZEROES-MAX-AFTER"),
        out.value("ZEROES-MAX"),
        "a write-zeroes request failed (Linux turned them off)\n{out}"
    );
    assert_eq!(
        out.value("READ-BACK"),
        Some(zeros_md5(4 * MIB)),
        "the guest read back something else than zeros\n{out}"
    );
    assert_zeroed_4_to_8_mib("the file", &std::fs::read(&disk).unwrap(), &original);
}

#[test]
fn blk_discard_and_write_zeroes_on_a_block_device_reach_it() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("blk-dev-ranges");
    let original = pattern(16 * MIB, 33);
    for (what, command) in [
        // busybox's blkdiscard: BLKDISCARD, sent as DISCARD requests; a loop device
        // discards by punching its file, which then reads as zeros.
        ("discard", "blkdiscard -o 4194304 -l 4194304 /dev/vda"),
        (
            "write-zeroes",
            "/sbin/blkdiscard -z -o 4194304 -l 4194304 /dev/vda",
        ),
    ] {
        let file = dir.file(&format!("{what}.img"), &original);
        let Some(loopdev) = LoopDevice::attach(&file) else {
            panic!("losetup failed: the test needs root and the loop module");
        };
        let out = run_guest_script(&range_script(command), &["--disk", &loopdev.0]);
        assert!(out.status.success(), "{what}: {out}");
        assert_eq!(out.script_status(), Some(0), "{what}: {out}");
        let offered = |key| {
            out.value(key)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        assert!(
            offered("DISCARD-MAX") > 0,
            "{what}: no discard offered\n{out}"
        );
        assert!(
            offered("ZEROES-MAX") > 0,
            "{what}: no write-zeroes offered\n{out}"
        );
        assert_eq!(
            out.value("ZEROES-MAX-AFTER"),
            out.value("ZEROES-MAX"),
            "{what}: a write-zeroes request failed\n{out}"
        );
        assert_eq!(
            out.value("READ-BACK"),
            Some(zeros_md5(4 * MIB)),
            "{what}: the guest read back something else than zeros\n{out}"
        );
        let device = std::fs::read(&loopdev.0).unwrap();
        assert_zeroed_4_to_8_mib(&format!("{what}: {}", loopdev.0), &device, &original);
        drop(loopdev);
        assert_zeroed_4_to_8_mib(
            &format!("{what}: its file"),
            &std::fs::read(&file).unwrap(),
            &original,
        );
    }
}

#[test]
fn blk_serial_is_visible_in_sysfs() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("blk-serial");
    let disk = dir.sparse("disk.img", MIB as u64);
    let out = run_guest_script(
        "echo SERIAL=$(cat /sys/block/vda/serial)\n",
        &["--disk", &format!("{disk},serial=pvc-0a1b2c")],
    );
    assert!(out.status.success(), "{out}");
    assert_eq!(out.value("SERIAL").as_deref(), Some("pvc-0a1b2c"), "{out}");
    assert_eq!(out.script_status(), Some(0), "{out}");
}

#[test]
fn blk_two_disks_appear_in_the_order_given() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("blk-order");
    let first = dir.sparse("first.img", 8 * MIB as u64);
    let second = dir.sparse("second.img", 16 * MIB as u64);
    let out = run_guest_script(
        "echo VDA=$(cat /sys/block/vda/size)\necho VDB=$(cat /sys/block/vdb/size)\n",
        &["--disk", &first, "--disk", &second],
    );
    assert!(out.status.success(), "{out}");
    assert_eq!(out.value("VDA").as_deref(), Some("16384"), "{out}");
    assert_eq!(out.value("VDB").as_deref(), Some("32768"), "{out}");
    assert_eq!(out.script_status(), Some(0), "{out}");
}

#[test]
fn blk_sync_engine_writes_reach_the_file() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("blk-sync");
    let disk = dir.sparse("disk.img", 24 << 20);
    let out = run_guest_script(
        &write_pattern_script("/dev/vda", 16),
        &["--disk", &format!("{disk},aio=sync")],
    );
    assert!(out.status.success(), "{out}");
    assert_eq!(out.script_status(), Some(0), "{out}");
    assert_pattern(&std::fs::read(&disk).unwrap(), 16);
}
