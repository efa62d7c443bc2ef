//! Bad user input: one clear error line naming the problem and a non-zero exit, never a panic.
//! These need no guest to boot, so they run directly on any host.

use std::process::Command;

use podvm_tests::{podvm_bin, run_command, run_podvm, Outcome, TempDir};

/// A file that passes the kernel format sniff (an ELF header), for tests that fail later.
fn elf_stub(dir: &TempDir) -> String {
    dir.file("vmlinux", b"\x7fELF\x02\x01\x01\x00")
}

fn assert_one_clear_error(out: &Outcome, expected: &str) {
    assert_eq!(out.status.code(), Some(1), "{out}");
    let errors: Vec<&str> = out.stderr.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(errors.len(), 1, "exactly one error line expected\n{out}");
    assert!(errors[0].starts_with("podvm: error: "), "{out}");
    assert!(errors[0].contains(expected), "expected {expected:?}\n{out}");
    assert!(!out.stderr.contains("panicked"), "{out}");
}

#[test]
fn missing_kernel_is_named_in_the_error() {
    let out = run_podvm(&["run", "--kernel", "/nonexistent/vmlinuz"]);
    assert_one_clear_error(&out, "--kernel: /nonexistent/vmlinuz does not exist");
}

#[test]
fn garbage_kernel_is_refused() {
    let dir = TempDir::new("garbage");
    let kernel = dir.file("vmlinuz", &[0x5a; 8192]);
    let out = run_podvm(&["run", "--kernel", &kernel]);
    assert_one_clear_error(&out, "is neither a bzImage nor an ELF kernel");
}

#[test]
fn zero_cpus_is_refused() {
    let dir = TempDir::new("cpus");
    let out = run_podvm(&["run", "--kernel", &elf_stub(&dir), "--cpus", "0"]);
    assert_one_clear_error(&out, "cpus: 0 is out of range; use a value from 1 to 254");
}

#[test]
fn one_mib_of_memory_is_refused() {
    let dir = TempDir::new("memory");
    let out = run_podvm(&["run", "--kernel", &elf_stub(&dir), "--memory", "1"]);
    assert_one_clear_error(&out, "memory: 1 MiB is out of range");
}

#[test]
fn initrd_larger_than_memory_is_refused() {
    let dir = TempDir::new("initrd");
    let initrd = dir.0.join("initrd");
    let f = std::fs::File::create(&initrd).unwrap();
    f.set_len(64 << 20).unwrap(); // sparse
    let out = run_podvm(&[
        "run",
        "--kernel",
        &elf_stub(&dir),
        "--initrd",
        initrd.to_str().unwrap(),
        "--memory",
        "32",
    ]);
    assert_one_clear_error(
        &out,
        "does not fit in the guest's 32 MiB of memory; raise --memory",
    );
}

#[test]
fn unknown_flag_is_a_usage_error() {
    let out = run_podvm(&["run", "--kernel", "/k", "--cpuz", "2"]);
    assert_eq!(out.status.code(), Some(2), "{out}");
    assert!(out.stderr.contains("--cpuz"), "{out}");
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Skips (fails under `PODVM_REQUIRE_KVM=1`) unless the tests run as root and have
/// `tools` (util-linux's setpriv and unshare: .ci/run installs them); true if so.
fn root_with(tools: &[&str], to: &str) -> bool {
    let missing: Vec<&str> = tools.iter().copied().filter(|t| !have(t)).collect();
    if !is_root() || !missing.is_empty() {
        podvm_tests::skip(&format!(
            "needs root and {} to {to} (not root: {}; missing: {missing:?})",
            tools.join(" and "),
            !is_root()
        ));
        return false;
    }
    true
}

#[test]
fn kvm_without_permission_says_how_to_get_it() {
    if !root_with(&["unshare", "setpriv"], "drop to a user without access") {
        return;
    }
    let dir = TempDir::new("kvmperm");
    let kernel = elf_stub(&dir);
    // World-readable so the unprivileged user can pass preflight.
    std::fs::set_permissions(&dir.0, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    // A /dev/kvm of its own, root's only (the host's may be missing or, as udev makes it on
    // most distributions, open to everyone), in a private /dev.
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--", "sh", "-c"])
        .arg(
            "mount -t tmpfs none /dev && mknod -m 600 /dev/kvm c 10 232 && \
             exec setpriv --reuid=65534 --regid=65534 --clear-groups -- \
             \"$0\" run --kernel \"$1\" --allow-pvm",
        )
        .arg(podvm_bin())
        .arg(&kernel);
    let out = run_command(cmd);
    assert_one_clear_error(&out, "permission denied opening /dev/kvm");
}

#[test]
fn missing_kvm_device_is_explained() {
    if !root_with(&["unshare"], "hide /dev/kvm in a mount namespace") {
        return;
    }
    let dir = TempDir::new("nokvm");
    let kernel = elf_stub(&dir);
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--", "sh", "-c"])
        .arg("mount -t tmpfs none /dev && exec \"$0\" run --kernel \"$1\" --allow-pvm")
        .arg(podvm_bin())
        .arg(&kernel);
    let out = run_command(cmd);
    assert_one_clear_error(&out, "/dev/kvm does not exist");
}

#[test]
fn missing_disk_is_named_in_the_error() {
    let dir = TempDir::new("nodisk");
    let out = run_podvm(&[
        "run",
        "--kernel",
        &elf_stub(&dir),
        "--disk",
        "/nonexistent/disk.img",
        "--allow-pvm",
    ]);
    assert_one_clear_error(&out, "--disk /nonexistent/disk.img: no such file or device");
}

#[test]
fn directory_as_disk_is_refused() {
    let dir = TempDir::new("dirdisk");
    let path = dir.0.to_str().unwrap().to_string();
    let out = run_podvm(&[
        "run",
        "--kernel",
        &elf_stub(&dir),
        "--disk",
        &path,
        "--allow-pvm",
    ]);
    assert_one_clear_error(&out, "is a directory");
}

#[test]
fn disk_not_a_multiple_of_512_is_refused() {
    let dir = TempDir::new("odddisk");
    let disk = dir.file("odd.img", &[0u8; 1000]);
    let out = run_podvm(&[
        "run",
        "--kernel",
        &elf_stub(&dir),
        "--disk",
        &disk,
        "--allow-pvm",
    ]);
    assert_one_clear_error(&out, "1000 bytes is not a multiple of 512");
}

#[test]
fn disk_on_read_only_mount_asks_for_readonly() {
    if !root_with(&["unshare"], "make a read-only bind mount") {
        return;
    }
    let dir = TempDir::new("rodisk");
    let disk = dir.sparse("disk.img", 1 << 20);
    let kernel = elf_stub(&dir);
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--", "sh", "-c"])
        .arg("mount --bind \"$1\" \"$1\" && mount -o remount,bind,ro \"$1\" && exec \"$0\" run --kernel \"$2\" --disk \"$3\" --allow-pvm")
        .arg(podvm_bin())
        .arg(dir.0.to_str().unwrap())
        .arg(&kernel)
        .arg(&disk);
    let out = run_command(cmd);
    assert_one_clear_error(&out, "read-only; add ,readonly");
}

#[test]
fn disk_without_permission_says_how_to_grant_it() {
    if !root_with(&["setpriv"], "drop to a user without access") {
        return;
    }
    let dir = TempDir::new("permdisk");
    let disk = dir.sparse("disk.img", 1 << 20);
    std::fs::set_permissions(&disk, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    std::fs::set_permissions(&dir.0, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let kernel = elf_stub(&dir);
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(podvm_bin())
        .args(["run", "--kernel", &kernel, "--disk", &disk, "--allow-pvm"]);
    let out = run_command(cmd);
    assert_one_clear_error(&out, "permission denied opening it read-write");
}

#[test]
fn console_attach_to_missing_socket_says_so() {
    let out = run_podvm(&["console", "/nonexistent/console.sock"]);
    assert_one_clear_error(&out, "no such socket; is the VM running");
}

#[test]
fn console_attach_to_dead_socket_says_the_vm_exited() {
    let dir = TempDir::new("deadsock");
    let path = dir.0.join("dead.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let out = run_podvm(&["console", path.to_str().unwrap()]);
    assert_one_clear_error(
        &out,
        "connection refused; the VM that created it has exited",
    );
}

#[test]
fn console_path_that_is_a_regular_file_is_refused() {
    let dir = TempDir::new("notsock");
    let path = dir.file("console", b"not a socket");
    let out = run_podvm(&[
        "run",
        "--kernel",
        &elf_stub(&dir),
        "--console",
        &path,
        "--allow-pvm",
    ]);
    assert_one_clear_error(&out, "exists and is not a socket");
}

#[test]
fn api_call_to_missing_socket_says_so() {
    let out = run_podvm(&["api", "/nonexistent/api.sock", "info"]);
    assert_one_clear_error(&out, "no such socket; is the VM running with --api-socket");
}

#[test]
fn api_call_to_dead_socket_says_the_vm_exited() {
    let dir = TempDir::new("deadapi");
    let path = dir.0.join("api.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let out = run_podvm(&["api", path.to_str().unwrap(), "pause"]);
    assert_one_clear_error(
        &out,
        "connection refused; the VM that created it has exited",
    );
}

#[test]
fn api_socket_that_is_a_regular_file_is_refused() {
    let dir = TempDir::new("apinotsock");
    let path = dir.file("api", b"not a socket");
    let out = run_podvm(&[
        "run",
        "--kernel",
        &elf_stub(&dir),
        "--console",
        "off",
        "--api-socket",
        &path,
        "--allow-pvm",
    ]);
    assert_one_clear_error(&out, "--api-socket");
    assert!(out.stderr.contains("exists and is not a socket"), "{out}");
}

#[test]
fn api_socket_equal_to_console_socket_is_refused() {
    let dir = TempDir::new("apiclash");
    let path = dir.0.join("vm.sock");
    let path = path.to_str().unwrap();
    let out = run_podvm(&[
        "run",
        "--kernel",
        &elf_stub(&dir),
        "--console",
        path,
        "--api-socket",
        path,
    ]);
    assert_one_clear_error(&out, "is also the --console socket");
}

#[test]
fn bad_seccomp_mode_names_the_choices() {
    let out = run_podvm(&["run", "--kernel", "/k", "--seccomp", "on"]);
    assert_eq!(out.status.code(), Some(2), "{out}");
    assert!(out.stderr.contains("--seccomp"), "{out}");
    for choice in ["kill", "log", "off"] {
        assert!(out.stderr.contains(choice), "{out}");
    }
    assert!(!out.stderr.contains("panicked"), "{out}");
}

#[test]
fn seccomp_profile_is_an_oci_profile_with_kvm_run_allowed() {
    let out = run_podvm(&["seccomp-profile"]);
    assert!(out.status.success(), "{out}");
    let profile: serde_json::Value = serde_json::from_str(&out.stdout).expect("JSON");
    assert_eq!(profile["defaultAction"], "SCMP_ACT_ERRNO");
    let syscalls = profile["syscalls"].as_array().unwrap();
    assert!(syscalls
        .iter()
        .any(|e| e["names"] == serde_json::json!(["ioctl"])
            && e["args"][0]["value"] == serde_json::json!(0xae80u64)));
    let unconditional = syscalls[0]["names"].as_array().unwrap();
    for name in ["read", "write", "futex", "exit_group", "execve"] {
        assert!(unconditional.contains(&serde_json::json!(name)), "{name}");
    }
}
