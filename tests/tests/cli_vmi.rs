//! `podvm validate --vmi` and `podvm run --vmi` on specs with problems: every problem is
//! reported with its field path, at once, and nothing starts. No guest boots here.

use std::process::Command;

use podvm_tests::{podvm_bin, run_command, Outcome, TempDir};

/// A valid VMI whose files live in `dir`: a kernel, a block-less filesystem PVC `data`,
/// a cloud-init volume and the pod network.
fn good_vmi(dir: &TempDir) -> String {
    dir.file("vmlinuz", b"\x7fELF\x02\x01\x01\x00");
    std::fs::create_dir_all(dir.0.join("pvcs/data")).unwrap();
    dir.file("pvcs/data/disk.img", &[0u8; 4096]);
    format!(
        r##"apiVersion: kubevirt.io/v1
kind: VirtualMachineInstance
metadata: {{name: web, namespace: shop}}
spec:
  domain:
    cpu: {{sockets: 1, cores: 2, threads: 1}}
    memory: {{guest: 512Mi}}
    firmware:
      kernelBoot:
        kernelArgs: console=ttyS0
        container: {{image: example/kernel, kernelPath: {dir}/vmlinuz}}
    devices:
      disks:
        - name: data
          disk: {{bus: virtio}}
        - name: cloudinit
          disk: {{bus: virtio}}
      interfaces:
        - name: default
          masquerade: {{}}
          ports: [{{port: 8080}}]
  networks:
    - name: default
      pod: {{}}
  volumes:
    - name: data
      persistentVolumeClaim: {{claimName: web-data}}
    - name: cloudinit
      cloudInitNoCloud: {{userData: "#cloud-config\n"}}
"##,
        dir = dir.0.display()
    )
}

fn podvm(dir: &TempDir, args: &[&str], vmi: &str) -> Outcome {
    let file = dir.file("vmi.yaml", vmi.as_bytes());
    let fs_dir = dir.0.join("pvcs");
    let run_dir = dir.0.join("run");
    let mut cmd = Command::new(podvm_bin());
    cmd.args(args)
        .args(["--vmi", &file, "--pvc-block-dir"])
        .arg(dir.0.join("no-block-pvcs"))
        .arg("--pvc-fs-dir")
        .arg(&fs_dir)
        .arg("--run-dir")
        .arg(&run_dir);
    run_command(cmd)
}

#[test]
fn vmi_validate_prints_the_vm_it_would_run() {
    let dir = TempDir::new("vmi-valid");
    let out = podvm(&dir, &["validate"], &good_vmi(&dir));
    assert!(out.status.success(), "{out}");
    for line in [
        "VirtualMachineInstance shop/web: valid",
        "vcpus:    2 (1 socket x 2 cores x 1 thread)",
        "memory:   512 MiB",
        "disk vda: \"data\": filesystem PVC:",
        "pvcs/data/disk.img (read-write)",
        "disk vdb: \"cloudinit\": cloudInitNoCloud seed",
        "nic eth0: \"default\": masquerade",
        "ports: 8080/tcp",
        "shutdown: the guest has 180 s",
    ] {
        assert!(out.stdout.contains(line), "{line:?} missing\n{out}");
    }
    assert!(
        !dir.0.join("run").exists(),
        "validate must not create anything\n{out}"
    );
}

#[test]
fn vmi_from_the_environment_is_validated_too() {
    let dir = TempDir::new("vmi-env");
    let vmi = good_vmi(&dir);
    let mut cmd = Command::new(podvm_bin());
    cmd.args(["validate", "--pvc-fs-dir"])
        .arg(dir.0.join("pvcs"))
        .env("PODVM_VMI", &vmi);
    let out = run_command(cmd);
    assert!(out.status.success(), "{out}");
    assert!(out.stdout.contains("shop/web: valid"), "{out}");
}

/// Each broken spec: the edit to the good VMI and the field-path errors expected.
const BROKEN: &[(&str, &str, &str, &[&str])] = &[
    (
        "unknown bus",
        "        - name: cloudinit\n          disk: {bus: virtio}",
        "        - name: cloudinit\n          disk: {bus: sata}",
        &["spec.domain.devices.disks[1].disk.bus: sata is not supported; use virtio"],
    ),
    (
        "missing volume for a disk",
        "        - name: cloudinit\n          disk",
        "        - name: cloud-init\n          disk",
        &[
            "spec.domain.devices.disks[1].name: no volume named \"cloud-init\" in spec.volumes",
            "spec.volumes[1]: \"cloudinit\" is not used by any disk",
        ],
    ),
    (
        "bad quantity",
        "guest: 512Mi",
        "guest: 512MB",
        &["spec.domain.memory.guest: \"512MB\" is not a quantity"],
    ),
    (
        "duplicate names",
        "    - name: cloudinit\n      cloudInit",
        "    - name: data\n      cloudInit",
        &[
            "spec.volumes[1].name: \"data\" is used twice",
            "spec.domain.devices.disks[1].name: no volume named \"cloudinit\"",
        ],
    ),
    (
        "PVC path missing",
        "claimName: web-data",
        "claimName: web-data}\n    - {name: logs, persistentVolumeClaim: {claimName: web-logs}",
        &["spec.volumes[1].persistentVolumeClaim: the PVC is at neither", "--volume logs=PATH"],
    ),
    (
        "unsupported network",
        "      pod: {}",
        "      multus: {networkName: storage}",
        &["spec.networks[0].multus: is not supported"],
    ),
    (
        "unsupported binding",
        "          masquerade: {}",
        "          bridge: {}",
        &["spec.domain.devices.interfaces[0].bridge: is not supported; podvm's binding is masquerade"],
    ),
    (
        "hostDisk volume whose image is not there",
        "      cloudInitNoCloud: {userData: \"#cloud-config\\n\"}",
        "      hostDisk: {path: /data/disk.img, type: Disk}",
        &["spec.volumes[1].hostDisk: ", "pvcs/cloudinit/disk.img is missing; mount the node's directory of /data/disk.img at "],
    ),
    (
        "emptyDisk capacity near u64::MAX",
        "      cloudInitNoCloud: {userData: \"#cloud-config\\n\"}",
        "      emptyDisk: {capacity: \"18446744073709551615\"}",
        &["spec.volumes[1].emptyDisk.capacity: 18446744073709551615 bytes is larger than a disk file can be"],
    ),
    (
        "volume name that is a path",
        "    - name: cloudinit\n      cloudInit",
        "    - name: ../../x\n      cloudInit",
        &["spec.volumes[1].name: \"../../x\" is not a valid volume name (DNS-1123 label: lower-case letters, digits and '-', at most 63 characters); rename the volume"],
    ),
    (
        "kernelPath out of its root",
        "container: {image: example/kernel, kernelPath: ",
        "container: {image: example/kernel, kernelPath: /../../etc/passwd, initrdPath: ",
        &["spec.domain.firmware.kernelBoot.container.kernelPath: \"/../../etc/passwd\" has a `..` component"],
    ),
    (
        "several problems at once",
        "cores: 2, threads: 1",
        "cores: 2, threads: 1, model: Skylake}\n    clock: {timezone: Europe/Paris",
        &[
            "spec.domain.cpu.model: \"Skylake\" is not supported",
            "spec.domain.clock.timezone: is not supported",
        ],
    ),
];

#[test]
fn vmi_broken_specs_are_refused_with_field_paths_and_nothing_starts() {
    let dir = TempDir::new("vmi-broken");
    let good = good_vmi(&dir);
    for (what, from, to, errors) in BROKEN {
        assert!(good.contains(from), "{what}: {from:?} not in the VMI");
        let vmi = good.replacen(from, to, 1);
        for command in [&["validate"][..], &["run", "--allow-pvm"]] {
            let out = podvm(&dir, command, &vmi);
            assert_eq!(out.status.code(), Some(1), "{what}: {command:?}\n{out}");
            assert!(!out.stderr.contains("panicked"), "{what}\n{out}");
            assert!(
                out.stderr
                    .contains("podvm: error: the VirtualMachineInstance has"),
                "{what}\n{out}"
            );
            for error in *errors {
                assert!(
                    out.stderr.contains(error),
                    "{what}: {error:?} missing\n{out}"
                );
            }
            assert!(
                out.stdout.is_empty(),
                "{what}: nothing is printed as valid\n{out}"
            );
            assert!(
                !dir.0.join("run").exists(),
                "{what}: {command:?} created its run directory\n{out}"
            );
        }
    }
}

#[test]
fn vmi_and_vm_flags_conflict() {
    let dir = TempDir::new("vmi-flags");
    let vmi = good_vmi(&dir);
    let out = podvm(&dir, &["run", "--memory", "512"], &vmi);
    assert_eq!(out.status.code(), Some(2), "{out}");
    assert!(out.stderr.contains("--memory"), "{out}");
    let out = run_command({
        let mut cmd = Command::new(podvm_bin());
        cmd.args(["run"]);
        cmd
    });
    assert_eq!(out.status.code(), Some(1), "{out}");
    assert!(out.stderr.contains("give the VM: --kernel PATH"), "{out}");
}

#[test]
fn vmi_error_reaches_the_termination_log() {
    let dir = TempDir::new("vmi-termlog");
    let vmi = good_vmi(&dir).replace(
        "bus: virtio}\n        - name: cloudinit",
        "bus: sata}\n        - name: cloudinit",
    );
    let file = dir.file("vmi.yaml", vmi.as_bytes());
    let log = dir.file("termination-log", b"");
    for command in ["validate", "run"] {
        std::fs::write(&log, b"").unwrap();
        let mut cmd = Command::new(podvm_bin());
        cmd.args([command, "--vmi", &file, "--pvc-fs-dir"])
            .arg(dir.0.join("pvcs"))
            .arg("--run-dir")
            .arg(dir.0.join("run"))
            .env("PODVM_TERMINATION_LOG", &log);
        let out = run_command(cmd);
        assert_eq!(out.status.code(), Some(1), "{command}\n{out}");
        let message = std::fs::read_to_string(&log).unwrap();
        assert!(
            message.starts_with("podvm: error: the VirtualMachineInstance has 1 problem:")
                && message.contains("spec.domain.devices.disks[0].disk.bus: sata is not supported"),
            "{command}: termination message {message:?}\n{out}"
        );
    }
}

/// A billion laughs: a few hundred bytes of nested YAML aliases, 9^9 strings once expanded.
const ALIAS_BOMB: &str = r#"apiVersion: kubevirt.io/v1
kind: VirtualMachineInstance
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
"#;

/// `podvm` under an address-space limit of `limit` bytes (RLIMIT_AS), so a document that
/// expands without bound ends in an allocation failure here, not by filling the machine.
fn podvm_limited(limit: u64, args: &[&str]) -> Outcome {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(podvm_bin());
    cmd.args(args);
    // SAFETY: the closure runs in the child between fork and exec and calls only setrlimit,
    // which is async-signal-safe, on a limit struct that lives on its own stack.
    unsafe {
        cmd.pre_exec(move || {
            let rlim = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &rlim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    run_command(cmd)
}

#[test]
fn vmi_yaml_alias_bomb_is_refused_not_expanded() {
    let dir = TempDir::new("vmi-bomb");
    let file = dir.file("bomb.yaml", ALIAS_BOMB.as_bytes());
    assert!(ALIAS_BOMB.len() < 600);
    for command in ["validate", "run"] {
        let out = podvm_limited(256 << 20, &[command, "--vmi", &file]);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{command}: not a clean error\n{out}"
        );
        assert!(
            out.stderr.contains("(document): line 3 column 7: a YAML anchor (&name); podvm does not expand anchors and aliases"),
            "{command}\n{out}"
        );
    }
}

#[test]
fn vmi_larger_than_1_mib_is_refused_without_reading_it_all() {
    let dir = TempDir::new("vmi-huge");
    let huge = dir.sparse("huge.yaml", 64 << 30);
    let out = podvm_limited(256 << 20, &["validate", "--vmi", &huge]);
    assert_eq!(out.status.code(), Some(1), "{out}");
    assert!(
        out.stderr.contains(
            "(document): too large; a VirtualMachineInstance may have at most 1048576 bytes (1 MiB)"
        ),
        "{out}"
    );
}

#[test]
fn vmi_host_disk_of_kubevirts_example_is_validated() {
    // KubeVirt's examples/vmi-host-disk.yaml's volume (validate panicked on it before): the
    // node's /data mounted at <pvc-fs-dir>/cloudinit/, the image made at start.
    let dir = TempDir::new("vmi-hostdisk");
    let vmi = good_vmi(&dir).replace(
        "      cloudInitNoCloud: {userData: \"#cloud-config\\n\"}",
        "      hostDisk: {path: /data/disk.img, type: DiskOrCreate, capacity: 1Gi}",
    );
    std::fs::create_dir_all(dir.0.join("pvcs/cloudinit")).unwrap();
    let out = podvm(&dir, &["validate"], &vmi);
    assert!(out.status.success(), "{out}");
    assert!(
        out.stdout.contains(
            "disk vdb: \"cloudinit\": hostDisk, made at start (1 GiB, sparse; kept from then on): "
        ) && out.stdout.contains("pvcs/cloudinit/disk.img (read-write)"),
        "{out}"
    );
    assert!(
        !dir.0.join("pvcs/cloudinit/disk.img").exists(),
        "validate made the image"
    );
}

#[test]
fn vmi_host_disk_not_shared_is_refused_at_a_migration_destination() {
    let dir = TempDir::new("vmi-hostdisk-mig");
    let vmi = good_vmi(&dir).replace(
        "      cloudInitNoCloud: {userData: \"#cloud-config\\n\"}",
        "      hostDisk: {path: /data/disk.img, type: Disk}",
    );
    std::fs::create_dir_all(dir.0.join("pvcs/cloudinit")).unwrap();
    dir.file("pvcs/cloudinit/disk.img", &[0u8; 4096]);
    let incoming = [
        "run",
        "--allow-pvm",
        "--incoming",
        "tcp:127.0.0.1:0",
        "--migration-insecure",
    ];
    let out = podvm(&dir, &incoming, &vmi);
    assert_eq!(out.status.code(), Some(1), "{out}");
    assert!(
        out.stderr.contains(
            "--incoming: the VMI's disk \"cloudinit\" is a hostDisk without shared: true"
        ),
        "{out}"
    );
}
