//! `podvm run --vmi`: a KubeVirt VirtualMachineInstance runs as the VM, with its PVC disk,
//! its cloud-init NoCloud disk, an emptyDisk, the masquerade network and the console.

use std::io::{Read, Write};
use std::time::Duration;

use podvm_tests::{
    http_get, kvm_available, metric_sample as sample, pattern, pod, SocketVm, TempDir, VmiGuest,
};

const USER_DATA: &str =
    "#cloud-config\nhostname: vmi-test\nruncmd:\n  - echo hello from cloud-init\n";

/// The VMI of the test: a filesystem PVC `data`, a cloudInitNoCloud volume, an emptyDisk, the
/// pod network with masquerade and one forwarded port, and the serial console logged.
fn test_vmi(g: &VmiGuest) -> String {
    let user_data: String = USER_DATA
        .lines()
        .map(|l| format!("          {l}\n"))
        .collect();
    format!(
        r#"apiVersion: kubevirt.io/v1
kind: VirtualMachineInstance
metadata:
  name: testvm
  namespace: tests
  labels: {{app: podvm-test}}
spec:
  terminationGracePeriodSeconds: 30
  nodeSelector: {{kubernetes.io/os: linux}}
  domain:
    cpu: {{cores: 1}}
    memory: {{guest: 256Mi}}
    resources: {{limits: {{memory: 400Mi}}}}
    firmware:
      kernelBoot:
        kernelArgs: "{args}"
        container:
          image: podvm/test-guest:latest
          kernelPath: {kernel}
          initrdPath: {initrd}
    devices:
      logSerialConsole: true
      rng: {{}}
      disks:
        - name: data
          serial: data-pvc
          disk: {{bus: virtio}}
        - name: cloudinit
          disk: {{bus: virtio}}
        - name: scratch
          disk: {{bus: virtio}}
      interfaces:
        - name: default
          masquerade: {{}}
          ports:
            - {{name: http, port: 18080}}
  networks:
    - name: default
      pod: {{}}
  volumes:
    - name: data
      persistentVolumeClaim: {{claimName: data-pvc}}
    - name: cloudinit
      cloudInitNoCloud:
        userData: |
{user_data}    - name: scratch
      emptyDisk: {{capacity: 64Mi}}
"#,
        args = g.kernel_args,
        kernel = g.kernel,
        initrd = g.initrd,
    )
}

const SCRIPT: &str = r#"echo "RNG=$(cat /sys/class/misc/hw_random/rng_current)"
echo "SERIAL=$(cat /sys/block/vda/serial)"
echo "VDA-SHA=$(head -c 1048576 /dev/vda | sha256sum | cut -d' ' -f1)"
echo "VDC-SECTORS=$(cat /sys/block/vdc/size)"
echo "VDB-RO=$(cat /sys/block/vdb/ro)"
# The volume label in the boot sector of a FAT12/16 file system (busybox has no blkid).
echo "VDB-LABEL=$(dd if=/dev/vdb bs=1 skip=43 count=11 2>/dev/null)"
mkdir -p /mnt/seed
if mount -t vfat -o ro /dev/vdb /mnt/seed; then
  echo "USERDATA-SHA=$(sha256sum /mnt/seed/user-data | cut -d' ' -f1)"
  echo "META-ID=$(sed -n 's/^instance-id: //p' /mnt/seed/meta-data)"
  umount /mnt/seed
else
  echo SEED-MOUNT-FAILED
fi
ip link set lo up
ip link set eth0 up
cat > /tmp/dhcp.sh <<'EOS'
#!/bin/sh
case "$1" in bound|renew)
  ip addr add $ip/$mask dev $interface
  for r in $router; do ip route add default via $r; done
  echo "DHCP-IP=$ip/$mask"
  echo "DHCP-ROUTER=$router";;
esac
EOS
chmod +x /tmp/dhcp.sh
udhcpc -i eth0 -f -q -n -t 10 -T 2 -s /tmp/dhcp.sh
ping -c 1 -W 5 10.0.2.1 >/dev/null && echo PING-GATEWAY=ok
printf 'written-by-the-guest' | dd of=/dev/vda bs=512 seek=4096 conv=fsync 2>/dev/null
echo WAITING-FOR-CONSOLE
read -r line
echo "GOT=[$line]"
"#;

#[test]
fn vmi_example_boots_with_pvc_cloud_init_empty_disk_network_and_console() {
    if !kvm_available() {
        return;
    }
    // The family's test with the container image's static podvm.
    podvm_tests::use_image_binary();
    // The filesystem PVC, where KubeVirt puts it (under --pvc-fs-dir).
    let pvcs = TempDir::new("vmi-pvcs");
    let claim = pvcs.0.join("data");
    std::fs::create_dir_all(&claim).unwrap();
    pod::give(&claim);
    let contents = pattern(1 << 20, 0x5eed);
    let mut image = contents.clone();
    image.resize(8 << 20, 0);
    let disk = claim.join("disk.img");
    std::fs::write(&disk, &image).unwrap();
    pod::give(&disk);
    let pvc_dir = pvcs.0.display().to_string();

    let mut vm = SocketVm::start_vmi(
        "vmi",
        SCRIPT,
        |_, g| test_vmi(g),
        &["--pvc-fs-dir", &pvc_dir, "--kernel-boot-root", "/"],
        &[],
    );
    // The console: a client that attaches gets the backlog, and what it types reaches the
    // guest's shell.
    vm.wait_log("WAITING-FOR-CONSOLE");
    let mut console = std::os::unix::net::UnixStream::connect(&vm.console).expect("console");
    console
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut backlog = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&backlog).contains("WAITING-FOR-CONSOLE") {
        let n = console.read(&mut buf).expect("console backlog");
        assert!(n > 0, "console closed");
        backlog.extend_from_slice(&buf[..n]);
    }
    console.write_all(b"typed-on-the-console\n").unwrap();
    let seed_disk = vm.dir.0.join("cloudinit-cidata.img");
    let scratch = vm.dir.0.join("scratch.img");
    assert!(
        seed_disk.exists() && scratch.exists(),
        "podvm made the disks in its run dir"
    );
    let out = vm.wait();
    assert!(out.status.success(), "{out}");
    assert_eq!(out.script_status(), Some(0), "{out}");
    assert_eq!(
        out.value("GOT").as_deref(),
        Some("[typed-on-the-console]"),
        "{out}"
    );

    assert_eq!(out.value("SERIAL").as_deref(), Some("data-pvc"), "{out}");
    assert!(
        out.value("RNG")
            .is_some_and(|r| r.starts_with("virtio_rng")),
        "rng: {{}} gives the guest a virtio-rng device\n{out}"
    );
    let want_sha = {
        let file = pvcs.0.join("contents");
        std::fs::write(&file, &contents).unwrap();
        podvm_tests::sha256_file(file.to_str().unwrap())
    };
    assert_eq!(
        out.value("VDA-SHA"),
        Some(want_sha),
        "the PVC's disk.img is vda\n{out}"
    );
    let image = std::fs::read(&disk).unwrap();
    assert_eq!(
        &image[4096 * 512..4096 * 512 + 20],
        b"written-by-the-guest",
        "the guest's write reached the PVC"
    );
    assert_eq!(
        out.value("VDC-SECTORS").as_deref(),
        Some("131072"),
        "the 64Mi emptyDisk is vdc\n{out}"
    );
    assert_eq!(out.value("VDB-RO").as_deref(), Some("1"), "{out}");
    assert_eq!(out.value("VDB-LABEL").as_deref(), Some("CIDATA"), "{out}");
    let user_data_sha = {
        let file = pvcs.0.join("user-data");
        std::fs::write(&file, USER_DATA).unwrap();
        podvm_tests::sha256_file(file.to_str().unwrap())
    };
    assert_eq!(
        out.value("USERDATA-SHA"),
        Some(user_data_sha),
        "the guest reads the user-data given in the VMI\n{out}"
    );
    assert_eq!(
        out.value("META-ID").as_deref(),
        Some("testvm.tests"),
        "{out}"
    );
    assert_eq!(
        out.value("DHCP-IP").as_deref(),
        Some("10.0.2.2/24"),
        "{out}"
    );
    assert_eq!(
        out.value("DHCP-ROUTER").as_deref(),
        Some("10.0.2.1"),
        "{out}"
    );
    assert_eq!(out.value("PING-GATEWAY").as_deref(), Some("ok"), "{out}");
    // The cluster-only fields were accepted and each said to be ignored.
    for field in [
        "metadata.labels",
        "spec.nodeSelector",
        "spec.domain.resources.limits",
    ] {
        assert!(
            out.stderr.contains(&format!("{field}: ignored")),
            "{field} not logged as ignored\n{out}"
        );
    }
}

/// Polls until `check` holds (up to a minute; the status thread follows the state every
/// 200 ms).
fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !check() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not within 60 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn vmi_pod_lifecycle_readiness_liveness_metrics_json_logs_and_graceful_sigterm() {
    if !kvm_available() {
        return;
    }
    let port = 19_000 + (std::process::id() % 1000) as u16;
    let port_arg = format!("127.0.0.1:{port}");
    // The guest powers off when its power button is pressed (acpid), after writing to its
    // disk: SIGTERM's graceful path.
    let script = "dd if=/dev/zero of=/dev/vda bs=4096 count=64 2>/dev/null\necho LIFECYCLE-READY\nsleep 600\n";
    let vmi = |dir: &TempDir, g: &VmiGuest| {
        dir.sparse("disk.img", 16 << 20);
        // The termination message file, one per boot attempt (a retried boot's podvm
        // writes its own reason first).
        dir.file("termination-log", b"");
        format!(
            r#"apiVersion: kubevirt.io/v1
kind: VirtualMachineInstance
metadata: {{name: lifecycle, namespace: probes}}
spec:
  terminationGracePeriodSeconds: 45
  domain:
    memory: {{guest: 192Mi}}
    firmware:
      kernelBoot:
        kernelArgs: "{args}"
        container: {{image: test, kernelPath: {kernel}, initrdPath: {initrd}}}
    devices:
      logSerialConsole: true
      autoattachPodInterface: false
      disks:
        - name: data
          disk: {{bus: virtio}}
  volumes:
    - name: data
      persistentVolumeClaim: {{claimName: data}}
"#,
            args = g.kernel_args,
            kernel = g.kernel,
            initrd = g.initrd,
        )
    };
    // The PVC is the file the VMI builder made in the VM's directory.
    let mut vm = SocketVm::start_vmi(
        "vmi-lifecycle",
        script,
        vmi,
        &[
            "--status-listen",
            &port_arg,
            "--volume",
            "data={dir}/disk.img",
        ],
        &[("PODVM_TERMINATION_LOG", "{dir}/termination-log")],
    );
    vm.wait_log("LIFECYCLE-READY");
    let ready_file = vm.dir.0.join("ready");

    // Running: ready (endpoint and file), alive, and metrics that count.
    eventually("ready", || {
        http_get(port, "/readyz").0 == 200 && ready_file.exists()
    });
    let (code, body) = http_get(port, "/healthz");
    assert_eq!(code, 200, "{body}");
    let info = vm.api_json(&["info"]);
    assert_eq!(
        info["shutdown_timeout_s"], 45.0,
        "terminationGracePeriodSeconds"
    );
    let (code, metrics) = http_get(port, "/metrics");
    assert_eq!(code, 200);
    assert_eq!(sample(&metrics, "podvm_vm_state{state=\"running\"}"), 1.0);
    assert!(
        sample(&metrics, "podvm_vcpu_seconds_total{vcpu=\"0\"}") > 0.0,
        "{metrics}"
    );
    assert!(sample(&metrics, "podvm_vcpu_exits_total{vcpu=\"0\",kind=\"io\"}") > 0.0);
    assert!(
        sample(&metrics, "podvm_disk_write_bytes_total{disk=\"0\"}") >= 262_144.0,
        "the guest's 256 KiB write is counted\n{metrics}"
    );
    let exits_before = sample(&metrics, "podvm_vcpu_exits_total{vcpu=\"0\",kind=\"io\"}");

    // Paused: not ready (endpoint and file), still alive.
    vm.api_json(&["pause"]);
    eventually("not ready while paused", || {
        let (code, body) = http_get(port, "/readyz");
        code == 503 && body.contains("\"paused\"") && !ready_file.exists()
    });
    assert_eq!(http_get(port, "/healthz").0, 200);
    let (_, metrics) = http_get(port, "/metrics");
    assert_eq!(sample(&metrics, "podvm_vm_state{state=\"paused\"}"), 1.0);
    vm.api_json(&["resume"]);
    eventually("ready again", || {
        http_get(port, "/readyz").0 == 200 && ready_file.exists()
    });
    let (_, metrics) = http_get(port, "/metrics");
    assert!(sample(&metrics, "podvm_vcpu_exits_total{vcpu=\"0\",kind=\"io\"}") >= exits_before);
    assert!(
        sample(&metrics, "podvm_vm_pauses_total") >= 1.0,
        "{metrics}"
    );

    // SIGTERM: the guest powers off within the grace period; podvm exits 0 and says why.
    // SAFETY: kill(2) on podvm's pid, a child of this process.
    unsafe { libc::kill(vm.pid(), libc::SIGTERM) };
    // Opened now: the VM's directory goes with it once it has exited.
    let mut termination_log =
        std::fs::File::open(vm.dir.0.join("termination-log")).expect("termination log");
    let out = vm.wait();
    assert_eq!(out.status.code(), Some(0), "{out}");
    assert!(!ready_file.exists(), "the readiness file outlived the VM");
    let mut message = String::new();
    termination_log.read_to_string(&mut message).unwrap();
    assert_eq!(message, "guest powered off\n", "termination message");
    // stderr is not a terminal and the VM came from a VMI: JSON lines naming the VMI.
    let lines: Vec<serde_json::Value> = out
        .stderr
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(lines.len() >= 3, "{out}");
    for line in &lines {
        assert_eq!(line["namespace"], "probes", "{line}");
        assert_eq!(line["name"], "lifecycle", "{line}");
        assert!(
            line["ts"].as_str().is_some_and(|t| t.ends_with('Z')),
            "{line}"
        );
    }
    let last = lines.last().unwrap();
    assert_eq!(last["msg"], "guest powered off; podvm exits", "{last}");
    assert_eq!(last["exit_code"], 0);
    assert!(
        lines.iter().any(|l| l["msg"]
            .as_str()
            .is_some_and(|m| m.contains("power button"))),
        "the SIGTERM is logged\n{out}"
    );
}

/// A VMI whose disks are two containerDisks, KubeVirt's way (the image's one file under
/// `disk/`): `root` writable, `tools` read-only.
fn container_disk_vmi(g: &VmiGuest) -> String {
    format!(
        r#"apiVersion: kubevirt.io/v1
kind: VirtualMachineInstance
metadata:
  name: cdvm
spec:
  domain:
    memory: {{guest: 256Mi}}
    firmware:
      kernelBoot:
        kernelArgs: "{args}"
        container:
          image: podvm/test-guest:latest
          kernelPath: {kernel}
          initrdPath: {initrd}
    devices:
      logSerialConsole: true
      # No network: the subject is the disks (KubeVirt's default interface forwards every
      # port, issue 18 item 5).
      autoattachPodInterface: false
      disks:
        - name: root
          disk: {{bus: virtio}}
        - name: tools
          disk: {{bus: virtio, readonly: true}}
  volumes:
    - name: root
      containerDisk: {{image: registry.example/root-disk:1}}
    - name: tools
      containerDisk: {{image: registry.example/tools-disk:1}}
"#,
        args = g.kernel_args,
        kernel = g.kernel,
        initrd = g.initrd,
    )
}

#[test]
fn vmi_container_disks_boot_with_the_writable_one_copied_and_the_images_untouched() {
    if !kvm_available() {
        return;
    }
    // The images as the containerDisk containers give them: --container-disk-dir/<volume>/.
    let images = TempDir::new("vmi-container-disks");
    let image = |volume: &str, file: &str, bytes: &[u8]| {
        let dir = images.0.join(volume).join("disk");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(file);
        std::fs::write(&path, bytes).unwrap();
        pod::give(&path);
        path.display().to_string()
    };
    let root = pattern(4 << 20, 0xc0de);
    let tools = pattern(2 << 20, 0x7001);
    let root_image = image("root", "root.img", &root);
    let tools_image = image("tools", "tools.img", &tools);
    let (root_sha, tools_sha) = (
        podvm_tests::sha256_file(&root_image),
        podvm_tests::sha256_file(&tools_image),
    );
    let script = "echo \"VDA-SHA=$(sha256sum </dev/vda | cut -d' ' -f1)\"\n\
        echo \"VDB-SHA=$(sha256sum </dev/vdb | cut -d' ' -f1)\"\n\
        echo \"VDA-RO=$(cat /sys/block/vda/ro)\"\n\
        echo \"VDB-RO=$(cat /sys/block/vdb/ro)\"\n\
        printf 'written-by-the-guest' | dd of=/dev/vda bs=512 seek=16 conv=fsync 2>/dev/null\n\
        echo CD-WRITTEN\n\
        read -r line\n";
    let images_dir = images.0.display().to_string();
    let mut vm = SocketVm::start_vmi(
        "vmi-cd",
        script,
        |_, g| container_disk_vmi(g),
        &[
            "--container-disk-dir",
            &images_dir,
            "--kernel-boot-root",
            "/",
        ],
        &[],
    );
    vm.wait_log("CD-WRITTEN");
    // The guest's write went to its copy in the run directory, not to the image.
    let copy = std::fs::read(vm.dir.0.join("root.img")).expect("the writable copy");
    assert_eq!(copy.len(), root.len());
    assert_eq!(&copy[16 * 512..16 * 512 + 20], b"written-by-the-guest");
    assert!(copy[..16 * 512] == root[..16 * 512] && copy[16 * 512 + 20..] == root[16 * 512 + 20..]);
    assert!(
        !vm.dir.0.join("tools.img").exists(),
        "the read-only containerDisk was copied"
    );
    let typist = std::os::unix::net::UnixStream::connect(&vm.console).unwrap();
    (&typist).write_all(b"done\n").unwrap();
    let out = vm.wait();
    assert!(out.status.success(), "{}", out.stderr);
    assert_eq!(out.script_status(), Some(0), "{}", out.stdout);
    let value = |k: &str| {
        out.value(k)
            .unwrap_or_else(|| panic!("no {k}= in\n{}", out.stdout))
    };
    // The guest booted on both images, saw them whole, and the read-only one as read-only.
    assert_eq!(value("VDA-SHA"), root_sha);
    assert_eq!(value("VDB-SHA"), tools_sha);
    assert_eq!(value("VDA-RO"), "0");
    assert_eq!(value("VDB-RO"), "1");
    // The images are as they were.
    assert_eq!(podvm_tests::sha256_file(&root_image), root_sha);
    assert_eq!(podvm_tests::sha256_file(&tools_image), tools_sha);
}
