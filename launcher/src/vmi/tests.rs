use super::*;

/// A host with the given block devices, files and directories.
#[derive(Default)]
struct FakeHost {
    block: Vec<&'static str>,
    files: Vec<&'static str>,
}

impl Host for FakeHost {
    fn probe(&self, path: &Path) -> Probe {
        let p = path.to_str().unwrap();
        if self.block.contains(&p) {
            Probe::Block
        } else if self.files.contains(&p) {
            Probe::File
        } else if self.files.iter().any(|f| f.starts_with(&format!("{p}/"))) {
            Probe::Dir
        } else {
            Probe::Missing
        }
    }

    fn probe_in_root(&self, root: &Path, rel: &Path) -> (PathBuf, Probe) {
        let path = root.join(rel);
        let found = self.probe(&path);
        (path, found)
    }

    fn files_in(&self, dir: &Path) -> Option<Vec<PathBuf>> {
        let prefix = format!("{}/", dir.display());
        let found: Vec<PathBuf> = self
            .files
            .iter()
            .filter(|f| {
                f.strip_prefix(&prefix)
                    .is_some_and(|rest| !rest.contains('/'))
            })
            .map(PathBuf::from)
            .collect();
        (!found.is_empty()).then_some(found)
    }
}

fn host() -> FakeHost {
    FakeHost {
        block: vec!["/dev/rootdisk"],
        files: vec![
            "/boot/vmlinuz",
            "/boot/initrd.img",
            "/var/run/kubevirt-private/vmi-disks/data/disk.img",
            "/var/run/kubevirt/container-disks/cd/disk/fedora.img",
        ],
    }
}

const FULL: &str = r#"
apiVersion: kubevirt.io/v1
kind: VirtualMachineInstance
metadata:
  name: testvm
  namespace: vms
  labels: {app: x}
spec:
  terminationGracePeriodSeconds: 40
  nodeSelector: {disk: ssd}
  domain:
    cpu: {sockets: 1, cores: 2, threads: 2}
    memory: {guest: 1Gi}
    resources:
      requests: {memory: 1200Mi, cpu: "2"}
      limits: {memory: 1300Mi}
    firmware:
      kernelBoot:
        kernelArgs: console=ttyS0 root=/dev/vda
        container:
          image: quay.io/me/kernel:1
          kernelPath: /boot/vmlinuz
          initrdPath: /boot/initrd.img
    devices:
      rng: {}
      disks:
        - name: data
          disk: {bus: virtio}
          serial: data-1
        - name: rootdisk
          bootOrder: 1
          cache: none
          disk: {bus: virtio}
        - name: cloudinit
          disk: {bus: virtio}
        - name: scratch
          disk: {}
        - name: cd
          disk: {readonly: true}
      interfaces:
        - name: default
          masquerade: {}
          macAddress: "02:00:00:00:00:01"
          ports:
            - {name: http, port: 80}
            - {port: 53, protocol: UDP}
  networks:
    - name: default
      pod: {}
  volumes:
    - name: rootdisk
      persistentVolumeClaim: {claimName: root-pvc}
    - name: data
      dataVolume: {name: data-dv}
    - name: cloudinit
      cloudInitNoCloud:
        userData: |
          #cloud-config
          password: hello
        networkDataBase64: dmVyc2lvbjogMgo=
    - name: scratch
      emptyDisk: {capacity: 2Gi}
    - name: cd
      containerDisk: {image: quay.io/containerdisks/fedora:40}
"#;

fn plan_text(text: &str) -> Result<Plan, Errors> {
    plan_with(text, &host())
}

fn plan_with(text: &str, host: &FakeHost) -> Result<Plan, Errors> {
    plan(&parse_document(text)?, &Paths::default(), host)
}

#[test]
fn vmi_full_example_maps_every_field() {
    let plan = plan_text(FULL).unwrap();
    assert_eq!(
        (plan.name.as_str(), plan.namespace.as_str()),
        ("testvm", "vms")
    );
    let c = &plan.config;
    assert_eq!(c.vcpus, 4);
    assert_eq!(plan.topology, (1, 2, 2));
    assert_eq!(
        c.topology,
        Some(vmm::config::CpuTopology {
            sockets: 1,
            cores: 2,
            threads: 2
        }),
        "the guest sees the VMI's topology"
    );
    assert_eq!(c.memory_mib, 1024, "memory.guest wins over requests.memory");
    assert_eq!(c.kernel, PathBuf::from("/boot/vmlinuz"));
    assert_eq!(c.initrd, Some(PathBuf::from("/boot/initrd.img")));
    assert_eq!(c.cmdline, "console=ttyS0 root=/dev/vda");
    assert_eq!(c.shutdown_timeout, std::time::Duration::from_secs(40));
    assert!(plan.rng);
    assert!(c.rng, "rng: {{}} gives the VM a virtio-rng device");
    // bootOrder 1 makes rootdisk vda; the rest keep the spec's order.
    let names: Vec<&str> = plan.disks.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["rootdisk", "data", "cloudinit", "scratch", "cd"]);
    assert_eq!(c.disks[0].path, PathBuf::from("/dev/rootdisk"));
    assert_eq!(c.disks[0].direct, Some(true));
    assert_eq!(plan.disks[0].source, DiskSource::BlockPvc);
    assert_eq!(
        c.disks[1].path,
        PathBuf::from("/var/run/kubevirt-private/vmi-disks/data/disk.img")
    );
    assert_eq!(c.disks[1].serial.as_deref(), Some("data-1"));
    assert_eq!(plan.disks[1].source, DiskSource::FilePvc);
    assert_eq!(
        c.disks[2].path,
        PathBuf::from("/var/run/podvm/cloudinit-cidata.img")
    );
    assert!(c.disks[2].read_only, "the seed disk is read-only");
    let DiskSource::CloudInit(seed) = &plan.disks[2].source else {
        panic!("{:?}", plan.disks[2]);
    };
    assert_eq!(seed.user_data, b"#cloud-config\npassword: hello\n");
    assert_eq!(seed.network_config.as_deref(), Some(&b"version: 2\n"[..]));
    assert_eq!(
        seed.meta_data,
        b"instance-id: testvm.vms\nlocal-hostname: testvm\n"
    );
    assert_eq!(c.disks[3].path, PathBuf::from("/var/run/podvm/scratch.img"));
    assert_eq!(
        plan.disks[3].source,
        DiskSource::EmptyDisk { capacity: 2 << 30 }
    );
    // A read-only containerDisk is used in place, not copied.
    assert_eq!(
        c.disks[4].path,
        PathBuf::from("/var/run/kubevirt/container-disks/cd/disk/fedora.img")
    );
    assert!(c.disks[4].read_only);
    assert_eq!(c.nics.len(), 1);
    assert_eq!(c.nics[0].mac, Some([2, 0, 0, 0, 0, 1]));
    let NetBackendConfig::User {
        forwards,
        forward_all,
        ..
    } = &c.nics[0].backend
    else {
        panic!("{:?}", c.nics[0]);
    };
    assert!(!forward_all);
    assert_eq!(
        forwards,
        &[
            PortForward {
                proto: Proto::Tcp,
                host: 80,
                guest: 80
            },
            PortForward {
                proto: Proto::Udp,
                host: 53,
                guest: 53
            },
        ]
    );
    assert!(
        matches!(&c.console, ConsoleConfig::Socket { path, log: None, .. } if path == Path::new("/var/run/podvm/console.sock"))
    );
    assert_eq!(c.api_socket, Some(PathBuf::from("/var/run/podvm/api.sock")));
    for field in [
        "metadata.labels",
        "spec.nodeSelector",
        "spec.domain.resources.limits",
        "spec.domain.resources.requests.cpu",
    ] {
        assert!(
            plan.ignored
                .iter()
                .any(|l| l.starts_with(&format!("{field}: ignored"))),
            "{field} not reported as ignored: {:?}",
            plan.ignored
        );
    }
}

#[test]
fn vmi_json_is_accepted_too() {
    let doc = parse_document(FULL).unwrap();
    let json = serde_json::to_string(&doc).unwrap();
    assert_eq!(plan_text(&json).unwrap(), plan_text(FULL).unwrap());
}

const MINIMAL: &str = r#"
apiVersion: kubevirt.io/v1
kind: VirtualMachineInstance
metadata: {name: tiny}
spec:
  domain:
    resources: {requests: {memory: 128M}}
    firmware: {kernelBoot: {container: {image: k, kernelPath: boot/vmlinuz}}}
"#;

#[test]
fn vmi_defaults_follow_kubevirt() {
    let plan = plan_text(MINIMAL).unwrap();
    assert_eq!(plan.namespace, "default");
    let c = &plan.config;
    assert_eq!(c.vcpus, 1);
    assert_eq!(c.topology, None);
    assert_eq!(c.memory_mib, 123, "128M = 122.07 MiB, rounded up");
    assert_eq!(c.cmdline, vmm::config::DEFAULT_CMDLINE);
    assert_eq!(c.initrd, None);
    assert_eq!(
        c.shutdown_timeout,
        std::time::Duration::from_secs(DEFAULT_GRACE_SECONDS)
    );
    assert!(c.disks.is_empty());
    assert!(!plan.rng && !c.rng);
    // No interfaces and no networks: KubeVirt's default pod interface, every port forwarded.
    assert_eq!(c.nics.len(), 1);
    assert!(matches!(
        c.nics[0].backend,
        NetBackendConfig::User {
            forward_all: true,
            ..
        }
    ));
    assert!(matches!(c.console, ConsoleConfig::Socket { .. }));
}

#[test]
fn vmi_uid_is_the_vms_migration_identity() {
    assert_eq!(plan_text(MINIMAL).unwrap().uid, None);
    let uid = "f4d2c8e6-1b3a-4c5d-9e8f-0a1b2c3d4e5f";
    let text = MINIMAL.replace("{name: tiny}", &format!("{{name: tiny, uid: {uid}}}"));
    assert_eq!(plan_text(&text).unwrap().uid.as_deref(), Some(uid));
    let text = MINIMAL.replace("{name: tiny}", "{name: tiny, uid: \"two words\"}");
    let Err(Errors(errors)) = plan_text(&text) else {
        panic!("a UID with a space was taken");
    };
    assert!(
        errors.iter().any(|e| e.path == "metadata.uid"),
        "{errors:#?}"
    );
}

#[test]
fn vmi_without_serial_console_or_network() {
    let text = MINIMAL.replace(
        "    firmware:",
        "    devices: {autoattachSerialConsole: false, autoattachPodInterface: false}\n    firmware:",
    );
    let plan = plan_text(&text).unwrap();
    assert_eq!(plan.config.console, ConsoleConfig::Off);
    assert!(plan.config.nics.is_empty());
}

#[test]
fn vmi_paths_can_be_overridden_per_volume() {
    let text = FULL.replace("claimName: root-pvc", "claimName: root-pvc, readOnly: true");
    let doc = parse_document(&text).unwrap();
    let mut paths = Paths::default();
    paths
        .volume_paths
        .insert("rootdisk".into(), "/elsewhere/root.img".into());
    let mut host = host();
    host.files.push("/elsewhere/root.img");
    let plan = plan(&doc, &paths, &host).unwrap();
    assert_eq!(
        plan.config.disks[0].path,
        PathBuf::from("/elsewhere/root.img")
    );
    assert!(
        plan.config.disks[0].read_only,
        "the PVC's readOnly makes the disk read-only"
    );
    assert_eq!(plan.disks[0].source, DiskSource::FilePvc);
}

#[test]
fn vmi_writable_container_disk_is_copied_to_the_run_dir() {
    let text = FULL.replace("disk: {readonly: true}", "disk: {}");
    let plan = plan_text(&text).unwrap();
    assert_eq!(
        plan.config.disks[4].path,
        PathBuf::from("/var/run/podvm/cd.img")
    );
    assert_eq!(
        plan.disks[4].source,
        DiskSource::ContainerDisk {
            image: "/var/run/kubevirt/container-disks/cd/disk/fedora.img".into(),
            copy: true
        }
    );
}

/// Applies `edit` to FULL and expects exactly the errors `want` (path, message part).
fn assert_refused(edit: (&str, &str), want: &[(&str, &str)]) {
    let (from, to) = edit;
    assert!(FULL.contains(from), "{from:?} not in FULL");
    let text = FULL.replacen(from, to, 1);
    let errors = match plan_text(&text) {
        Ok(_) => panic!("accepted after {from:?} -> {to:?}"),
        Err(Errors(e)) => e,
    };
    for (path, part) in want {
        assert!(
            errors
                .iter()
                .any(|e| e.path == *path && e.message.contains(part)),
            "no error {path}: ...{part}... in {errors:#?}"
        );
    }
    assert_eq!(errors.len(), want.len(), "{errors:#?}");
}

#[test]
fn vmi_broken_specs_are_refused_with_field_paths() {
    assert_refused(
        (
            "disk: {bus: virtio}\n          serial",
            "disk: {bus: sata}\n          serial",
        ),
        &[(
            "spec.domain.devices.disks[0].disk.bus",
            "sata is not supported; use virtio",
        )],
    );
    assert_refused(
        (
            "- name: scratch\n          disk: {}",
            "- name: nothere\n          disk: {}",
        ),
        &[
            (
                "spec.domain.devices.disks[3].name",
                "no volume named \"nothere\"",
            ),
            ("spec.volumes[3]", "\"scratch\" is not used by any disk"),
        ],
    );
    assert_refused(
        ("guest: 1Gi", "guest: 1Gb"),
        &[("spec.domain.memory.guest", "\"1Gb\" is not a quantity")],
    );
    assert_refused(
        ("- name: cd\n          disk", "- name: data\n          disk"),
        &[
            (
                "spec.domain.devices.disks[4].name",
                "\"data\" is used twice",
            ),
            ("spec.volumes[4]", "\"cd\" is not used by any disk"),
        ],
    );
    assert_refused(
        (
            "claimName: root-pvc",
            "claimName: root-pvc}\n    - {name: extra, persistentVolumeClaim: {claimName: x}",
        ),
        &[(
            "spec.volumes[1].persistentVolumeClaim",
            "the PVC is at neither /dev/extra",
        )],
    );
    assert_refused(
        ("      pod: {}", "      multus: {networkName: x}"),
        &[("spec.networks[0].multus", "is not supported")],
    );
    assert_refused(
        ("          masquerade: {}", "          bridge: {}"),
        &[("spec.domain.devices.interfaces[0].bridge", "use masquerade")],
    );
    assert_refused(
        ("threads: 2", "threads: 0"),
        &[("spec.domain.cpu.threads", "0 is out of range")],
    );
    assert_refused(
        ("kind: VirtualMachineInstance", "kind: Pod"),
        &[("kind", "use VirtualMachineInstance")],
    );
    assert_refused(
        ("      rng: {}", "      rng: {}\n      tpm: {}"),
        &[("spec.domain.devices.tpm", "not supported")],
    );
    assert_refused(
        ("      rng: {}", "      rgn: {}"),
        &[("spec.domain.devices.rgn", "unknown field")],
    );
    assert_refused(
        ("kernelPath: /boot/vmlinuz", "kernelPath: /boot/nothere"),
        &[(
            "spec.domain.firmware.kernelBoot.container.kernelPath",
            "/boot/nothere is missing",
        )],
    );
    assert_refused(
        (
            "    firmware:\n      kernelBoot:",
            "    firmware:\n      bootloader: {efi: {}}\n      kernelBoot:",
        ),
        &[("spec.domain.firmware.bootloader", "use kernelBoot")],
    );
    assert_refused(
        ("{port: 53, protocol: UDP}", "{port: 53, protocol: SCTP}"),
        &[(
            "spec.domain.devices.interfaces[0].ports[1].protocol",
            "SCTP is not supported",
        )],
    );
    assert_refused(
        ("cache: none", "cache: writethrough"),
        &[(
            "spec.domain.devices.disks[1].cache",
            "writethrough is not supported",
        )],
    );
    assert_refused(
        ("capacity: 2Gi", "capacity: 0"),
        &[("spec.volumes[3].emptyDisk.capacity", "more than 0")],
    );
    assert_refused(
        (
            "networkDataBase64: dmVyc2lvbjogMgo=",
            "networkDataBase64: '!!!'",
        ),
        &[(
            "spec.volumes[2].cloudInitNoCloud.networkDataBase64",
            "not valid base64",
        )],
    );
    assert_refused(
        (
            "macAddress: \"02:00:00:00:00:01\"",
            "macAddress: \"03:00:00:00:00:01\"",
        ),
        &[(
            "spec.domain.devices.interfaces[0].macAddress",
            "not a unicast address",
        )],
    );
}

#[test]
fn vmi_all_problems_are_reported_at_once() {
    let text = FULL
        .replacen("bus: virtio", "bus: scsi", 1)
        .replace("guest: 1Gi", "guest: lots")
        .replace("cores: 2", "cores: -1")
        .replace("apiVersion: kubevirt.io/v1", "apiVersion: kubevirt.io/v2");
    let Err(Errors(errors)) = plan_text(&text) else {
        panic!("accepted");
    };
    let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "apiVersion",
            "spec.domain.cpu.cores",
            "spec.domain.memory.guest",
            "spec.domain.devices.disks[0].disk.bus"
        ],
        "{errors:#?}"
    );
}

#[test]
fn vmi_memory_is_required_and_bounded() {
    let no_memory = MINIMAL.replace("    resources: {requests: {memory: 128M}}\n", "");
    let Err(Errors(e)) = plan_text(&no_memory) else {
        panic!("accepted")
    };
    assert_eq!(e[0].path, "spec.domain.memory.guest");
    assert!(e[0].message.contains("required"), "{e:?}");
    let tiny = MINIMAL.replace("128M", "16Mi");
    let Err(Errors(e)) = plan_text(&tiny) else {
        panic!("accepted")
    };
    assert_eq!(e[0].path, "spec.domain.resources.requests.memory");
    assert!(e[0].message.contains("16 MiB is out of range"), "{e:?}");
}

#[test]
fn vmi_document_errors_are_clear() {
    for (text, part) in [
        ("", "empty"),
        ("a: [", "invalid YAML"),
        ("{\"a\": ", "invalid JSON"),
        ("a: 1\n---\nb: 2\n", "2 YAML documents"),
    ] {
        let Err(Errors(e)) = parse_document(text) else {
            panic!("{text:?} parsed")
        };
        assert!(e[0].message.contains(part), "{text:?}: {e:?}");
    }
    let Err(Errors(e)) = plan_text("just a string") else {
        panic!("accepted")
    };
    assert_eq!(e[0].path, "(document)");
}

#[test]
fn vmi_mac_addresses_parse_with_colons_or_dashes() {
    assert_eq!(
        parse_mac("52:54:00:ab:cd:ef"),
        Some([0x52, 0x54, 0, 0xab, 0xcd, 0xef])
    );
    assert_eq!(
        parse_mac("52-54-00-AB-CD-EF"),
        Some([0x52, 0x54, 0, 0xab, 0xcd, 0xef])
    );
    assert_eq!(parse_mac("52:54:00:ab:cd"), None);
    assert_eq!(parse_mac("5254.00ab.cdef"), None);
}

/// FULL with its emptyDisk `scratch` replaced by a hostDisk.
fn with_host_disk(host_disk: &str) -> String {
    FULL.replacen(
        "emptyDisk: {capacity: 2Gi}",
        &format!("hostDisk: {host_disk}"),
        1,
    )
}

fn host_with_dirs(files: &[&'static str]) -> FakeHost {
    let mut host = host();
    host.files.extend_from_slice(files);
    host
}

#[test]
fn vmi_host_disk_or_create_is_made_in_the_mounted_node_directory() {
    // KubeVirt's examples/vmi-host-disk.yaml: this panicked (unreachable!) before. The
    // node's /data is mounted at <fs_dir>/scratch/ (here holding some other file).
    let host = host_with_dirs(&["/var/run/kubevirt-private/vmi-disks/scratch/other"]);
    let text = with_host_disk("{path: /data/disk.img, type: DiskOrCreate, capacity: 1Gi}");
    let plan = plan_with(&text, &host).unwrap();
    let i = plan.disks.iter().position(|d| d.name == "scratch").unwrap();
    assert_eq!(
        plan.disks[i].source,
        DiskSource::HostDisk {
            create: Some(1 << 30),
            shared: false
        }
    );
    assert_eq!(
        plan.config.disks[i].path,
        Path::new("/var/run/kubevirt-private/vmi-disks/scratch/disk.img")
    );
    assert!(!plan.config.disks[i].read_only);
}

#[test]
fn vmi_host_disk_that_exists_is_used_as_it_is() {
    let host = host_with_dirs(&["/var/run/kubevirt-private/vmi-disks/scratch/disk.img"]);
    for kind in ["Disk", "DiskOrCreate"] {
        let text = with_host_disk(&format!(
            "{{path: /data/disk.img, type: {kind}, capacity: 1Gi, shared: true}}"
        ));
        let plan = plan_with(&text, &host).unwrap();
        let d = plan.disks.iter().find(|d| d.name == "scratch").unwrap();
        assert_eq!(
            d.source,
            DiskSource::HostDisk {
                create: None,
                shared: true
            },
            "{kind}"
        );
    }
}

#[test]
fn vmi_host_disk_problems_are_field_path_errors() {
    let mounted = host_with_dirs(&["/var/run/kubevirt-private/vmi-disks/scratch/other"]);
    for (spec, host, field, part) in [
        (
            "{path: /data/disk.img, type: Disk}",
            &mounted,
            "spec.volumes[3].hostDisk",
            "/var/run/kubevirt-private/vmi-disks/scratch/disk.img is missing; mount the node's directory of /data/disk.img at /var/run/kubevirt-private/vmi-disks/scratch",
        ),
        (
            "{path: /data/disk.img, type: DiskOrCreate, capacity: 1Gi}",
            &host(),
            "spec.volumes[3].hostDisk",
            "/var/run/kubevirt-private/vmi-disks/scratch is missing; mount the node's directory",
        ),
        (
            "{path: /data/disk.img, type: DiskOrCreate}",
            &mounted,
            "spec.volumes[3].hostDisk.capacity",
            "required with type DiskOrCreate",
        ),
        (
            "{path: /data/disk.img, type: DiskOrCreate, capacity: \"18446744073709551615\"}",
            &mounted,
            "spec.volumes[3].hostDisk.capacity",
            "is larger than a disk file can be",
        ),
        (
            "{path: /data/disk.img, type: Directory}",
            &mounted,
            "spec.volumes[3].hostDisk.type",
            "\"Directory\" is not a hostDisk type",
        ),
        (
            "{path: /data/.., type: Disk}",
            &mounted,
            "spec.volumes[3].hostDisk.path",
            "is not an absolute path to a file",
        ),
        (
            "{path: disk.img, type: Disk}",
            &mounted,
            "spec.volumes[3].hostDisk.path",
            "is not an absolute path to a file",
        ),
    ] {
        let Err(Errors(e)) = plan_with(&with_host_disk(spec), host) else {
            panic!("{spec}: accepted")
        };
        assert_eq!(e.len(), 1, "{spec}: {e:#?}");
        assert_eq!(e[0].path, field, "{spec}: {e:#?}");
        assert!(e[0].message.contains(part), "{spec}: {e:#?}");
    }
}

#[test]
fn vmi_every_refused_volume_source_is_an_error_not_a_panic() {
    for kind in [
        "ephemeral",
        "configMap",
        "secret",
        "serviceAccount",
        "downwardAPI",
        "downwardMetrics",
        "cloudInitConfigDrive",
        "sysprep",
        "memoryDump",
    ] {
        let text = FULL.replacen(
            "emptyDisk: {capacity: 2Gi}",
            &format!("{kind}: {{name: x}}"),
            1,
        );
        let Err(Errors(e)) = plan_text(&text) else {
            panic!("{kind}: accepted")
        };
        assert_eq!(e.len(), 1, "{kind}: {e:#?}");
        assert_eq!(e[0].path, format!("spec.volumes[3].{kind}"), "{e:#?}");
        assert!(e[0].message.contains("is not supported"), "{e:#?}");
    }
}

#[test]
fn vmi_empty_disk_capacity_near_u64_max_is_refused_not_overflowed() {
    for capacity in ["18446744073709551615", "18446744073709551104", "15Ei"] {
        assert_refused(
            ("capacity: 2Gi", &format!("capacity: \"{capacity}\"")),
            &[(
                "spec.volumes[3].emptyDisk.capacity",
                "is larger than a disk file can be",
            )],
        );
    }
    // The largest that fits is accepted, rounded up to whole sectors.
    let text = FULL.replacen("capacity: 2Gi", "capacity: \"9223372036854775295\"", 1);
    let plan = plan_text(&text).unwrap();
    let scratch = plan.disks.iter().find(|d| d.name == "scratch").unwrap();
    assert_eq!(
        scratch.source,
        DiskSource::EmptyDisk {
            capacity: MAX_EMPTY_DISK_BYTES
        }
    );
}

/// A billion laughs in YAML: nine aliases per level, nine levels, 9^9 strings once expanded.
pub(crate) const ALIAS_BOMB: &str = r#"apiVersion: kubevirt.io/v1
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

fn document_error_of(text: &str) -> String {
    match parse_document(text) {
        Ok(v) => panic!("{text:.60?} parsed: {v:.60}"),
        Err(Errors(e)) => {
            assert_eq!(e.len(), 1, "{e:#?}");
            assert_eq!(e[0].path, "(document)");
            e[0].message.clone()
        }
    }
}

#[test]
fn vmi_yaml_alias_bomb_is_refused_before_expansion() {
    let message = document_error_of(ALIAS_BOMB);
    assert!(
        message.starts_with("line 3 column 7: a YAML anchor"),
        "{message}"
    );
    assert!(message.contains("write the value"), "{message}");
}

#[test]
fn vmi_yaml_aliases_and_anchors_are_refused() {
    // An alias needs an anchor before it (the parser refuses one without), so the anchor is
    // what is reported.
    let alias = document_error_of("a: *x\n");
    assert!(alias.contains("unknown anchor"), "{alias}");
    let both = document_error_of("a: &x 1\nb: *x\n");
    assert!(both.starts_with("line 1 column 7: a YAML anchor"), "{both}");
    let anchored_scalar = document_error_of("a: &x 1\nb: 2\n");
    assert!(
        anchored_scalar.contains("a YAML anchor (&name)"),
        "{anchored_scalar}"
    );
    let anchored_map = document_error_of("spec: &s\n  a: 1\n");
    assert!(
        anchored_map.contains("a YAML anchor (&name)"),
        "{anchored_map}"
    );
}

#[test]
fn vmi_yaml_nested_too_deep_is_refused() {
    let deep = format!("a: {}{}\n", "[".repeat(100), "]".repeat(100));
    let message = document_error_of(&deep);
    assert!(message.contains("nested more than 64 levels"), "{message}");
    let block = (0..100).fold(String::new(), |s, i| format!("{s}{}k:\n", " ".repeat(i)));
    let message = document_error_of(&block);
    assert!(message.contains("nested more than 64 levels"), "{message}");
    // Far deeper: the parser's own limit answers first, still an error, not a stack overflow.
    let deeper = format!("a: {}{}\n", "[".repeat(100_000), "]".repeat(100_000));
    document_error_of(&deeper);
    // 64 levels are fine.
    let ok = format!("a: {}{}\n", "[".repeat(63), "]".repeat(63));
    parse_document(&ok).unwrap();
}

#[test]
fn vmi_document_larger_than_1_mib_is_refused() {
    let big = format!("{FULL}\n# {}\n", "x".repeat(MAX_DOCUMENT_BYTES));
    let message = document_error_of(&big);
    assert!(
        message.contains("at most 1048576 bytes (1 MiB)"),
        "{message}"
    );
    // Just under the limit is parsed.
    let padding = MAX_DOCUMENT_BYTES - FULL.len() - 4;
    let fits = format!("{FULL}\n# {}\n", "x".repeat(padding));
    assert_eq!(fits.len(), MAX_DOCUMENT_BYTES);
    plan_text(&fits).unwrap();
}

#[test]
fn vmi_volume_names_must_be_dns1123_labels() {
    for bad in ["../x", "a/b", "Data", "-a", "a-", "a.b", "x\\u0000y"] {
        // The disk still finds the volume by its name: one error, at the volume's name.
        let text = FULL
            .replacen(
                "- name: scratch\n          disk",
                &format!("- name: \"{bad}\"\n          disk"),
                1,
            )
            .replacen(
                "- name: scratch\n      emptyDisk",
                &format!("- name: \"{bad}\"\n      emptyDisk"),
                1,
            );
        let Err(Errors(e)) = plan_text(&text) else {
            panic!("{bad:?} accepted")
        };
        assert_eq!(e.len(), 1, "{bad:?}: {e:#?}");
        assert_eq!(e[0].path, "spec.volumes[3].name");
        assert!(
            e[0].message.ends_with("is not a valid volume name (DNS-1123 label: lower-case letters, digits and '-', at most 63 characters); rename the volume"),
            "{e:#?}"
        );
    }
    assert!(is_dns1123_label(&"a".repeat(63)));
    assert!(!is_dns1123_label(&"a".repeat(64)));
    assert!(is_dns1123_label("my-disk-0"));
    assert!(!is_dns1123_label(""));
}

#[test]
fn vmi_spec_paths_with_parent_components_are_refused() {
    assert_refused(
        ("kernelPath: /boot/vmlinuz", "kernelPath: /boot/../../etc/shadow"),
        &[(
            "spec.domain.firmware.kernelBoot.container.kernelPath",
            "\"/boot/../../etc/shadow\" has a `..` component, which would leave the directory it is looked up in; give the file's path inside the kernel image",
        )],
    );
    assert_refused(
        ("initrdPath: /boot/initrd.img", "initrdPath: ../initrd.img"),
        &[(
            "spec.domain.firmware.kernelBoot.container.initrdPath",
            "has a `..` component",
        )],
    );
    assert_refused(
        (
            "containerDisk: {image: quay.io/containerdisks/fedora:40}",
            "containerDisk: {image: x, path: /disk/../../../../../dev/sda}",
        ),
        &[(
            "spec.volumes[4].containerDisk.path",
            "has a `..` component, which would leave the directory it is looked up in; give the disk's path inside the containerDisk image",
        )],
    );
}

#[test]
fn vmi_volumes_never_share_a_run_directory_file() {
    // "cloudinit"'s seed is cloudinit-cidata.img, which an emptyDisk named
    // "cloudinit-cidata" would be too.
    let text = FULL
        .replacen(
            "- name: scratch\n          disk",
            "- name: cloudinit-cidata\n          disk",
            1,
        )
        .replacen(
            "- name: scratch\n      emptyDisk",
            "- name: cloudinit-cidata\n      emptyDisk",
            1,
        );
    let Err(Errors(e)) = plan_text(&text) else {
        panic!("accepted")
    };
    assert_eq!(e.len(), 1, "{e:#?}");
    assert_eq!(e[0].path, "spec.volumes[3].name");
    assert!(
        e[0].message.contains("would share the run directory's file /var/run/podvm/cloudinit-cidata.img with spec.volumes[2]; rename one of them"),
        "{e:#?}"
    );
}

/// A tree on the real file system with a symlink out of each root, for [`RealHost`].
struct Tree(PathBuf);

impl Tree {
    fn new(name: &str) -> Self {
        let base = std::env::temp_dir().join(format!("podvm-vmi-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        for dir in ["kernel/boot", "pvcs/data", "cds/cd/disk", "run", "dev"] {
            std::fs::create_dir_all(base.join(dir)).unwrap();
        }
        std::fs::write(base.join("kernel/boot/vmlinuz"), b"\x7fELF").unwrap();
        std::fs::write(base.join("secret.img"), vec![7u8; 4096]).unwrap();
        Tree(base)
    }

    fn paths(&self) -> Paths {
        Paths {
            block_dir: self.0.join("dev"),
            fs_dir: self.0.join("pvcs"),
            container_disk_dir: self.0.join("cds"),
            kernel_boot_root: self.0.join("kernel"),
            run_dir: self.0.join("run"),
            volume_paths: BTreeMap::new(),
        }
    }

    fn symlink_out(&self, at: &str) {
        std::os::unix::fs::symlink(self.0.join("secret.img"), self.0.join(at)).unwrap();
    }

    fn plan(&self, text: &str) -> Result<Plan, Errors> {
        plan(&parse_document(text)?, &self.paths(), &RealHost)
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const ON_DISK: &str = r#"
apiVersion: kubevirt.io/v1
kind: VirtualMachineInstance
metadata: {name: vm}
spec:
  domain:
    memory: {guest: 128Mi}
    firmware:
      kernelBoot:
        container: {image: k, kernelPath: /boot/vmlinuz}
    devices:
      disks: [{name: data}, {name: cd}, {name: scratch}]
  volumes:
    - {name: data, persistentVolumeClaim: {claimName: data}}
    - {name: cd, containerDisk: {image: cd}}
    - {name: scratch, emptyDisk: {capacity: 1Mi}}
"#;

#[test]
fn vmi_symlinks_out_of_a_root_are_not_followed() {
    let tree = Tree::new("symlinks");
    tree.symlink_out("pvcs/data/disk.img");
    tree.symlink_out("cds/cd/disk/image.raw");
    std::os::unix::fs::symlink("../../secret.img", tree.0.join("kernel/boot/up")).unwrap();
    let text = ON_DISK.replace("kernelPath: /boot/vmlinuz", "kernelPath: /boot/up");
    let Err(Errors(e)) = tree.plan(&text) else {
        panic!("accepted")
    };
    let paths: Vec<&str> = e.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "spec.domain.firmware.kernelBoot.container.kernelPath",
            "spec.volumes[0].persistentVolumeClaim",
            "spec.volumes[1].containerDisk",
        ],
        "{e:#?}"
    );
    // Each resolves inside its root, where nothing is.
    assert!(
        e[0].message.contains("kernel/boot/up is missing"),
        "{}",
        e[0]
    );
    assert!(e[1].message.contains("the PVC is at neither"), "{}", e[1]);
    assert!(
        e[2].message.contains("disk/image.raw is missing"),
        "{}",
        e[2]
    );
}

#[test]
fn vmi_symlinks_inside_a_root_resolve_inside_it() {
    let tree = Tree::new("inside");
    std::fs::write(tree.0.join("pvcs/data/real.img"), [0u8; 4096]).unwrap();
    std::os::unix::fs::symlink("real.img", tree.0.join("pvcs/data/disk.img")).unwrap();
    std::fs::write(tree.0.join("cds/cd/disk/image.raw"), [0u8; 4096]).unwrap();
    // An image's absolute symlink means the image's own root.
    std::os::unix::fs::symlink("/boot/vmlinuz", tree.0.join("kernel/boot/current")).unwrap();
    let text = ON_DISK.replace("kernelPath: /boot/vmlinuz", "kernelPath: /boot/current");
    let plan = tree.plan(&text).unwrap();
    assert_eq!(plan.config.kernel, tree.0.join("kernel/boot/vmlinuz"));
    assert_eq!(plan.config.disks[0].path, tree.0.join("pvcs/data/real.img"));
    assert_eq!(
        plan.disks[1].source,
        DiskSource::ContainerDisk {
            image: tree.0.join("cds/cd/disk/image.raw"),
            copy: true
        }
    );
}

#[test]
fn vmi_prepare_does_not_write_through_a_symlink_in_the_run_dir() {
    let tree = Tree::new("prepare");
    std::fs::write(tree.0.join("pvcs/data/disk.img"), [0u8; 4096]).unwrap();
    std::fs::write(tree.0.join("cds/cd/disk/image.raw"), [1u8; 4096]).unwrap();
    let plan = tree.plan(ON_DISK).unwrap();
    // Planted after the check, as another container sharing the emptyDir could.
    tree.symlink_out("run/scratch.img");
    let e = prepare::prepare(&plan, &tree.0.join("run")).unwrap_err();
    assert!(e.to_string().contains("scratch.img"), "{e}");
    assert_eq!(
        std::fs::read(tree.0.join("secret.img")).unwrap(),
        vec![7u8; 4096],
        "the file outside was truncated"
    );
    std::fs::remove_file(tree.0.join("run/scratch.img")).unwrap();
    // The console log, which vmm appends to, neither.
    let logged = tree
        .plan(&ON_DISK.replace("devices:\n", "devices:\n      logSerialConsole: true\n"))
        .unwrap();
    tree.symlink_out("run/console.log");
    let e = prepare::prepare(&logged, &tree.0.join("run")).unwrap_err();
    assert!(
        e.to_string().contains("cannot create the console log"),
        "{e}"
    );
    std::fs::remove_file(tree.0.join("run/console.log")).unwrap();
    prepare::prepare(&logged, &tree.0.join("run")).unwrap();
    assert!(tree.0.join("run/console.log").is_file());
    prepare::prepare(&plan, &tree.0.join("run")).unwrap();
    assert_eq!(
        std::fs::metadata(tree.0.join("run/scratch.img"))
            .unwrap()
            .len(),
        1 << 20
    );
    assert_eq!(
        std::fs::read(tree.0.join("run/cd.img")).unwrap(),
        vec![1u8; 4096]
    );
}

#[test]
fn vmi_host_disk_or_create_is_made_sparse_once_and_kept() {
    let tree = Tree::new("hostdisk");
    std::fs::write(tree.0.join("pvcs/data/disk.img"), [0u8; 4096]).unwrap();
    std::fs::write(tree.0.join("cds/cd/disk/image.raw"), [1u8; 4096]).unwrap();
    std::fs::create_dir_all(tree.0.join("pvcs/scratch")).unwrap();
    let text = ON_DISK.replace(
        "emptyDisk: {capacity: 1Mi}",
        "hostDisk: {path: /data/disk.img, type: DiskOrCreate, capacity: 64Mi}",
    );
    let image = tree.0.join("pvcs/scratch/disk.img");
    // A symlink planted after the plan looked is not written through.
    let plan = tree.plan(&text).unwrap();
    tree.symlink_out("pvcs/scratch/disk.img");
    let e = prepare::prepare(&plan, &tree.0.join("run")).unwrap_err();
    assert!(e.to_string().contains("cannot create the hostDisk"), "{e}");
    assert_eq!(
        std::fs::read(tree.0.join("secret.img")).unwrap(),
        vec![7u8; 4096]
    );
    std::fs::remove_file(&image).unwrap();

    prepare::prepare(&plan, &tree.0.join("run")).unwrap();
    let meta = std::fs::metadata(&image).unwrap();
    assert_eq!(meta.len(), 64 << 20);
    use std::os::unix::fs::MetadataExt;
    assert!(
        meta.blocks() * 512 < 1 << 20,
        "not sparse: {} blocks",
        meta.blocks()
    );
    // The guest wrote to it; the next start keeps it.
    std::fs::write(&image, b"guest data").unwrap();
    let plan = tree.plan(&text).unwrap();
    let d = plan.disks.iter().find(|d| d.name == "scratch").unwrap();
    assert_eq!(
        d.source,
        DiskSource::HostDisk {
            create: None,
            shared: false
        }
    );
    prepare::prepare(&plan, &tree.0.join("run")).unwrap();
    assert_eq!(std::fs::read(&image).unwrap(), b"guest data");
}

#[test]
fn vmi_null_firmware_kernel_boot_or_container_is_an_error_not_a_panic() {
    // Found by the fuzzer: `kernelBoot:` with nothing after it (null) was given up on
    // without an error, and plan() panicked on "a plan without errors".
    for (from, to, field) in [
        (
            "    firmware: {kernelBoot: {container: {image: k, kernelPath: boot/vmlinuz}}}",
            "    firmware:",
            "spec.domain.firmware.kernelBoot",
        ),
        (
            "    firmware: {kernelBoot: {container: {image: k, kernelPath: boot/vmlinuz}}}",
            "    firmware: {kernelBoot: null}",
            "spec.domain.firmware.kernelBoot",
        ),
        (
            "    firmware: {kernelBoot: {container: {image: k, kernelPath: boot/vmlinuz}}}",
            "    firmware: {kernelBoot: {container: null}}",
            "spec.domain.firmware.kernelBoot.container",
        ),
    ] {
        let text = MINIMAL.replacen(from, to, 1);
        assert_ne!(text, MINIMAL);
        let Err(Errors(e)) = plan_text(&text) else {
            panic!("{to}: accepted")
        };
        assert_eq!(e.len(), 1, "{to}: {e:#?}");
        assert_eq!(e[0].path, field, "{to}: {e:#?}");
        assert!(e[0].message.starts_with("required"), "{to}: {e:#?}");
    }
}

#[test]
fn vmi_null_kernel_path_is_required() {
    // Found by the fuzzer: `kernelPath:` with nothing after it (null) had no error.
    assert_refused(
        ("kernelPath: /boot/vmlinuz", "kernelPath:"),
        &[(
            "spec.domain.firmware.kernelBoot.container.kernelPath",
            "required",
        )],
    );
}

#[test]
fn vmi_network_with_a_null_source_is_refused() {
    // `multus:` with nothing after it is no source at all, not a refused multus network
    // whose interface then silently joined the pod network.
    assert_refused(
        ("      pod: {}", "      multus:"),
        &[("spec.networks[0]", "give the network's source: pod: {}")],
    );
}

#[test]
fn vmi_empty_key_is_named_in_its_error() {
    // Found by the fuzzer: an empty key's error had an empty field path (": unknown field").
    assert_refused(
        ("  nodeSelector: {disk: ssd}", "  \"\": 1"),
        &[("spec.\"\"", "unknown field")],
    );
    let Err(Errors(e)) = plan_text(&format!("{FULL}\n\"\": x\n")) else {
        panic!("accepted")
    };
    assert_eq!(e[0].path, "\"\"", "{e:#?}");
}
