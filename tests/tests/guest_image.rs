//! The container image under a real container runtime: the OCI image that
//! `resources/image/build.sh` builds (its `podvm` tag), unpacked with umoci and run by crun
//! with the runtime configuration the kubelet and containerd would give the pod template
//! `resources/kubernetes/vm-pod.yaml`: its args, uid/gid 107 with fsGroup 107, no
//! capabilities, `no_new_privs`, a read-only root, the Localhost seccomp profile
//! `resources/seccomp/podvm.json`, `/dev/kvm` and the block PVC as devices, the emptyDir and
//! the boot PVC mounted, the pod's network namespace, memory and CPU limits. The guest boots
//! in it; a call outside the profile is refused by crun's filter, not by podvm's.
//!
//! The image's OCI layout is named by `PODVM_IMAGE_OCI` (tests/run.sh builds it with
//! resources/image/build.sh); cargo-runner ships it, crun and umoci into the KVM sandbox.
//! Each field of the runtime configuration and where it comes from is in `runtime_config`
//! and docs/security.md, "Under a container runtime".

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use podvm_tests::netns::{PodNet, POD_IP};
use podvm_tests::{boot_timeout, guest, kvm_available, run_timeout, skip, wait_within};
use podvm_tests::{http_get_at, TempDir, HANG};
use serde_json::{json, Value};

/// The pod template whose container the tests run, and the node's seccomp profile for it.
const POD_TEMPLATE: &str = include_str!("../../resources/kubernetes/vm-pod.yaml");
const PROFILE: &str = include_str!("../../resources/seccomp/podvm.json");

/// The pod's user, group and fsGroup (`securityContext` of the pod template).
const POD_UID: u32 = 107;
const POD_GID: u32 = 107;
/// The pod's name (`metadata.name`), its hostname.
const POD_NAME: &str = "vm-example";
/// The container's memory limit (`resources.limits.memory: 1152Mi`) and CPU limit
/// (`cpu: "2"`): the pod is Guaranteed (requests equal limits).
const MEMORY_LIMIT: u64 = 1152 << 20;
const CPUS: u64 = 2;
/// The kubelet's `oom_score_adj` for a Guaranteed pod's containers.
const GUARANTEED_OOM_SCORE_ADJ: i64 = -997;
/// Where the pod template mounts its volumes.
const RUN_DIR: &str = "/var/run/podvm";
const BOOT_DIR: &str = "/var/run/podvm/boot";
const ROOT_DISK: &str = "/dev/rootdisk";

/// What the tests need besides a KVM: crun, umoci and the image.
struct Runtime {
    crun: PathBuf,
    umoci: PathBuf,
    /// The OCI image layout `resources/image/build.sh` wrote.
    layout: PathBuf,
}

fn in_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// crun, umoci and the image, or a skip (a failure under `PODVM_REQUIRE_KVM=1`) saying what
/// is missing.
fn runtime() -> Option<Runtime> {
    if !kvm_available() {
        return None;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        skip("the container tests need root: crun makes namespaces, cgroups and devices, as on a node");
        return None;
    }
    let Some(crun) = in_path("crun") else {
        skip("crun is missing (apt-get install crun)");
        return None;
    };
    let Some(umoci) = in_path("umoci") else {
        skip("umoci is missing (apt-get install umoci)");
        return None;
    };
    let layout = std::env::var_os("PODVM_IMAGE_OCI").map(PathBuf::from);
    let Some(layout) = layout.filter(|l| l.join("index.json").is_file()) else {
        skip(
            "PODVM_IMAGE_OCI does not name the image's OCI layout (tests/run.sh builds it with \
             resources/image/build.sh and sets it)",
        );
        return None;
    };
    Some(Runtime {
        crun,
        umoci,
        layout,
    })
}

/// The container's args in the pod template (`args:` of its only container).
fn template_args() -> Vec<String> {
    let mut lines = POD_TEMPLATE.lines().skip_while(|l| l.trim() != "args:");
    lines.next().expect("the pod template has args");
    let args: Vec<String> = lines
        .map_while(|l| l.trim().strip_prefix("- ").map(str::to_string))
        .collect();
    assert!(
        args.first().is_some_and(|a| a == "run"),
        "pod template args: {args:?}"
    );
    args
}

/// The image's configuration (`config` of the image config blob) for `tag`.
fn image_config(layout: &Path, tag: &str) -> Value {
    let read = |path: PathBuf| -> Value {
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    };
    let blob = |digest: &Value| {
        let digest = digest.as_str().expect("digest");
        let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
        read(layout.join("blobs/sha256").join(hex))
    };
    let index = read(layout.join("index.json"));
    let manifest = index["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .unwrap_or_else(|| panic!("no tag {tag} in {}", layout.display()));
    let manifest = blob(&manifest["digest"]);
    blob(&manifest["config"]["digest"])["config"].clone()
}

/// A loop block device over a file (the block PVC), detached on drop.
struct LoopDevice(PathBuf);

impl LoopDevice {
    fn attach(file: &str) -> Self {
        let free = Command::new("losetup").arg("-f").output().expect("losetup");
        let dev = String::from_utf8_lossy(&free.stdout).trim().to_string();
        assert!(
            free.status.success() && !dev.is_empty(),
            "losetup -f: {free:?}"
        );
        let ok = Command::new("losetup").args([&dev, file]).status();
        assert!(ok.is_ok_and(|s| s.success()), "losetup {dev} {file}");
        Self(PathBuf::from(dev))
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

/// A device node's type, major, minor and permission bits.
fn device(path: &Path) -> (&'static str, u64, u64, u32) {
    let meta = std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let kind = if meta.file_type().is_block_device() {
        "b"
    } else {
        assert!(meta.file_type().is_char_device(), "{}", path.display());
        "c"
    };
    let rdev = meta.rdev();
    (
        kind,
        libc::major(rdev) as u64,
        libc::minor(rdev) as u64,
        meta.mode() & 0o777,
    )
}

/// One pod of the pod template on this "node": the bundle, the kubelet's files and volumes
/// (under `dir`), and the block PVC.
struct Pod {
    dir: TempDir,
    crun: PathBuf,
    id: String,
    /// The emptyDir `run` as the node sees it.
    run: PathBuf,
    disk: LoopDevice,
}

impl Pod {
    /// Unpacks the image and lays out the volumes; `netns` is the pod's network namespace
    /// (a path), or None for one of crun's own. Writes `config.json` for `args` (the
    /// container's args; the image's entrypoint comes first).
    fn new(name: &str, rt: &Runtime, netns: Option<&str>, args: &[String]) -> Self {
        let dir = TempDir::new(name);
        let bundle = dir.0.join("bundle");
        // As containerd does: the image's layers become the container's root file system.
        let out = Command::new(&rt.umoci)
            .arg("unpack")
            .arg("--image")
            .arg(format!("{}:podvm", rt.layout.display()))
            .arg(&bundle)
            .output()
            .expect("run umoci");
        assert!(out.status.success(), "umoci unpack: {out:?}");
        // umoci wrote a config.json from the image; the kubelet's comes next, in full.
        std::fs::remove_file(bundle.join("config.json")).expect("remove umoci's config.json");

        // The emptyDir: made 0777 by the kubelet, then given to the fsGroup (group 107,
        // setgid so what podvm creates stays in the group).
        let run = dir.0.join("volumes/run");
        std::fs::create_dir_all(&run).unwrap();
        std::os::unix::fs::chown(&run, None, Some(POD_GID)).unwrap();
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o2777)).unwrap();
        // The boot PVC (read-only): the test guest's kernel and initramfs under the names
        // the pod template's args give them.
        let boot = dir.0.join("volumes/boot");
        std::fs::create_dir_all(&boot).unwrap();
        let g = guest();
        std::fs::copy(&g.kernel, boot.join("vmlinuz")).unwrap();
        std::fs::copy(&g.initrd, boot.join("initrd.img")).unwrap();
        // The block PVC: a 64 MiB loop device.
        let disk = LoopDevice::attach(&dir.sparse("rootdisk.img", 64 << 20));
        // The kubelet's files: the termination message (0666), hosts, hostname and a
        // ClusterFirst resolv.conf.
        let termination = dir.0.join("termination-log");
        std::fs::write(&termination, b"").unwrap();
        std::fs::set_permissions(&termination, std::fs::Permissions::from_mode(0o666)).unwrap();
        let hosts = dir.0.join("etc-hosts");
        std::fs::write(
            &hosts,
            format!("127.0.0.1\tlocalhost\n::1\tlocalhost\n{POD_IP}\t{POD_NAME}\n"),
        )
        .unwrap();
        let hostname = dir.0.join("hostname");
        std::fs::write(&hostname, format!("{POD_NAME}\n")).unwrap();
        let resolv = dir.0.join("resolv.conf");
        std::fs::write(
            &resolv,
            "search podvm-vms.svc.cluster.local svc.cluster.local cluster.local\n\
             nameserver 10.96.0.10\noptions ndots:5\n",
        )
        .unwrap();

        let pod = Self {
            id: format!("{name}-{}", std::process::id()),
            crun: rt.crun.clone(),
            run,
            disk,
            dir,
        };
        let files = PodFiles {
            run: &pod.run,
            boot: &boot,
            termination: &termination,
            hosts: &hosts,
            hostname: &hostname,
            resolv: &resolv,
        };
        let image = image_config(&rt.layout, "podvm");
        let config = runtime_config(&image, args, &files, &pod.disk.0, netns, &pod.id);
        pod.write_config(&config);
        pod
    }

    fn bundle(&self) -> PathBuf {
        self.dir.0.join("bundle")
    }

    fn config(&self) -> Value {
        let text = std::fs::read_to_string(self.bundle().join("config.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    fn write_config(&self, config: &Value) {
        let text = serde_json::to_string_pretty(config).unwrap();
        std::fs::write(self.bundle().join("config.json"), text).unwrap();
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.0.join(name)).unwrap_or_default()
    }

    /// `crun run` of the container, in the foreground (crun exits with the container's
    /// status), its output in `stdout.log` and `stderr.log`.
    fn spawn(&self) -> Child {
        let file = |name: &str| std::fs::File::create(self.dir.0.join(name)).unwrap();
        let mut cmd = Command::new(&self.crun);
        node_root(&mut cmd, &self.dir.0.join("node-root"));
        cmd.arg("run")
            .arg("--bundle")
            .arg(self.bundle())
            .arg("--pid-file")
            .arg(self.dir.0.join("pid"))
            .arg(&self.id)
            .stdin(Stdio::null())
            .stdout(file("stdout.log"))
            .stderr(file("stderr.log"))
            .spawn()
            .expect("spawn crun")
    }

    /// Runs the container to its end; returns its exit status as crun reports it.
    fn run(&self) -> i32 {
        let mut child = self.spawn();
        let status = wait_within(&mut child, "crun run");
        status
            .code()
            .unwrap_or_else(|| panic!("crun run: {status}"))
    }

    /// `crun kill ID SIGNAL`, as the kubelet's stop reaches the container.
    fn kill(&self, signal: &str) {
        let out = Command::new(&self.crun)
            .args(["kill", &self.id, signal])
            .output()
            .expect("crun kill");
        assert!(out.status.success(), "crun kill: {out:?}");
    }

    fn report(&self) -> String {
        format!(
            "crun/podvm stderr:\n{}\nstdout:\n{}",
            self.log("stderr.log"),
            self.log("stdout.log")
        )
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        // A container left running by a failed test.
        let _ = Command::new(&self.crun)
            .args(["delete", "--force", &self.id])
            .output();
        let _ = std::fs::remove_dir(format!("/sys/fs/cgroup/podvm-tests/{}", self.id));
    }
}

/// Makes `cmd` start in a mount namespace whose root is a bind mount of this root, at the
/// same paths, as a node's root is a real mount. Inside the KVM sandbox the root is the
/// initramfs, which pivot_root(2) refuses to move (EINVAL), and crun, like the runtimes of
/// a node, enters the container's root with pivot_root. `scratch` is an empty directory to
/// build the new root on.
fn node_root(cmd: &mut Command, scratch: &Path) {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::process::CommandExt;

    std::fs::create_dir_all(scratch).unwrap();
    let scratch = CString::new(scratch.as_os_str().as_bytes()).unwrap();
    // The closure runs in the child between fork and exec: only system calls, on strings
    // made before.
    // SAFETY: unshare, mount, chdir and chroot are async-signal-safe; every pointer passed is
    // a NUL-terminated string that outlives the call (captured by the closure) or null where
    // mount(2) allows it.
    unsafe {
        cmd.pre_exec(move || {
            let check = |rc: libc::c_int| {
                if rc == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            };
            let root = c"/".as_ptr();
            let here = c".".as_ptr();
            let none = std::ptr::null::<libc::c_char>();
            let no_data = std::ptr::null::<libc::c_void>();
            check(libc::unshare(libc::CLONE_NEWNS))?;
            check(libc::mount(
                none,
                root,
                none,
                libc::MS_REC | libc::MS_PRIVATE,
                no_data,
            ))?;
            check(libc::mount(
                root,
                scratch.as_ptr(),
                none,
                libc::MS_BIND | libc::MS_REC,
                no_data,
            ))?;
            check(libc::chdir(scratch.as_ptr()))?;
            check(libc::mount(here, root, none, libc::MS_MOVE, no_data))?;
            check(libc::chroot(here))?;
            check(libc::chdir(root))
        });
    }
}

/// The node's files and volumes the container mounts.
struct PodFiles<'a> {
    run: &'a Path,
    boot: &'a Path,
    termination: &'a Path,
    hosts: &'a Path,
    hostname: &'a Path,
    resolv: &'a Path,
}

fn bind(destination: &str, source: &Path, mode: &str) -> Value {
    json!({"destination": destination, "type": "bind", "source": source,
           "options": ["rbind", "rprivate", mode]})
}

/// The OCI runtime configuration containerd's CRI plugin makes for the pod template's
/// container (kubelet -> CRI -> containerd -> runc/crun), with `args` as the container's args.
fn runtime_config(
    image: &Value,
    args: &[String],
    files: &PodFiles,
    disk: &Path,
    netns: Option<&str>,
    id: &str,
) -> Value {
    // The image's entrypoint, then the pod's args (which replace the image's CMD).
    let mut argv: Vec<String> = image["Entrypoint"]
        .as_array()
        .expect("the image has an entrypoint")
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    argv.extend(args.iter().cloned());
    // The image's environment after HOSTNAME; enableServiceLinks: false adds nothing.
    let mut env = vec![format!("HOSTNAME={POD_NAME}")];
    env.extend(
        image["Env"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| e.as_str().unwrap().to_string()),
    );
    let cwd = image["WorkingDir"].as_str().unwrap_or("/");
    // /dev/kvm from the KVM device plugin (devices.kubevirt.io/kvm) and the block PVC
    // (volumeDevices): the node's nodes, re-made in the container with the node's mode and,
    // with device_ownership_from_security_context (which the pod template asks for), owned
    // by the pod's user and group.
    let kvm = device(Path::new("/dev/kvm"));
    let rootdisk = device(disk);
    let node = |path: &str, (kind, major, minor, mode): (&str, u64, u64, u32)| {
        json!({"path": path, "type": kind, "major": major, "minor": minor, "fileMode": mode,
               "uid": POD_UID, "gid": POD_GID})
    };
    let allow = |kind: &str, major: Value, minor: Value, access: &str| json!({"allow": true, "type": kind, "major": major, "minor": minor, "access": access});
    let mut namespaces = vec![
        json!({"type": "pid"}),
        json!({"type": "ipc"}),
        json!({"type": "uts"}),
        json!({"type": "mount"}),
        json!({"type": "cgroup"}),
    ];
    namespaces.push(match netns {
        Some(path) => json!({"type": "network", "path": path}),
        None => json!({"type": "network"}),
    });
    let profile: Value = serde_json::from_str(PROFILE).expect("resources/seccomp/podvm.json");
    let no_caps: Vec<String> = Vec::new();
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            // runAsUser, runAsGroup; fsGroup is a supplementary group.
            "user": {"uid": POD_UID, "gid": POD_GID, "additionalGids": [POD_GID]},
            "args": argv,
            "env": env,
            "cwd": cwd,
            // capabilities.drop: ["ALL"]
            "capabilities": {"bounding": no_caps, "effective": no_caps,
                             "inheritable": no_caps, "permitted": no_caps, "ambient": no_caps},
            // allowPrivilegeEscalation: false
            "noNewPrivileges": true,
            "oomScoreAdj": GUARANTEED_OOM_SCORE_ADJ,
        },
        // readOnlyRootFilesystem: true
        "root": {"path": "rootfs", "readonly": true},
        "hostname": POD_NAME,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
             "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            bind("/etc/hosts", files.hosts, "rw"),
            bind("/dev/termination-log", files.termination, "rw"),
            bind("/etc/hostname", files.hostname, "rw"),
            bind("/etc/resolv.conf", files.resolv, "rw"),
            // volumeMounts: the emptyDir `run`, the boot PVC read-only.
            bind(RUN_DIR, files.run, "rw"),
            bind(BOOT_DIR, files.boot, "ro"),
        ],
        "linux": {
            "namespaces": namespaces,
            "cgroupsPath": format!("/podvm-tests/{id}"),
            "resources": {
                "devices": [
                    {"allow": false, "access": "rwm"},
                    allow("c", Value::Null, Value::Null, "m"),
                    allow("b", Value::Null, Value::Null, "m"),
                    allow("c", json!(1), json!(3), "rwm"),
                    allow("c", json!(1), json!(5), "rwm"),
                    allow("c", json!(1), json!(7), "rwm"),
                    allow("c", json!(1), json!(8), "rwm"),
                    allow("c", json!(1), json!(9), "rwm"),
                    allow("c", json!(5), json!(0), "rwm"),
                    allow("c", json!(5), json!(2), "rwm"),
                    allow("c", json!(136), Value::Null, "rwm"),
                    allow(kvm.0, json!(kvm.1), json!(kvm.2), "rw"),
                    allow(rootdisk.0, json!(rootdisk.1), json!(rootdisk.2), "mrw"),
                ],
                "memory": {"limit": MEMORY_LIMIT},
                "cpu": {"shares": CPUS * 1024, "quota": CPUS * 100_000, "period": 100_000},
            },
            "devices": [node("/dev/kvm", kvm), node(ROOT_DISK, rootdisk)],
            // seccompProfile: Localhost profiles/podvm.json, as the node holds it.
            "seccomp": profile,
            "maskedPaths": ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys",
                            "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats",
                            "/proc/sched_debug", "/proc/scsi", "/sys/firmware",
                            "/sys/devices/virtual/powercap"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys",
                              "/proc/sysrq-trigger"],
        },
    })
}

/// Waits (within the boot timeout) until `cond` holds, failing if crun exits first.
fn until(child: &mut Child, pod: &Pod, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + boot_timeout();
    while !cond() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("crun exited ({status}) before {what}\n{}", pod.report());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "{HANG} {what}: not within the boot timeout\n{}",
                pod.report()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads the console socket, adding to `seen`, until `seen` holds `needle`.
fn read_until(console: &mut UnixStream, seen: &mut String, needle: &str, pod: &Pod) {
    let deadline = Instant::now() + run_timeout();
    let mut buf = [0u8; 4096];
    while !seen.contains(needle) {
        if Instant::now() > deadline {
            panic!(
                "{HANG} {needle:?} not on the console\n{seen}\n{}",
                pod.report()
            );
        }
        match console.read(&mut buf) {
            Ok(0) => panic!(
                "the console closed before {needle:?}\n{seen}\n{}",
                pod.report()
            ),
            Ok(n) => seen.push_str(&String::from_utf8_lossy(&buf[..n]).replace('\r', "")),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => panic!("console: {e}"),
        }
    }
}

/// The `Name:\tvalue` fields of /proc/PID/status.
fn proc_status(pid: &str) -> std::collections::HashMap<String, String> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect()
}

#[test]
fn pod_template_boots_its_guest_under_crun_configured_as_the_kubelet_would() {
    let Some(rt) = runtime() else { return };
    // The pod's network namespace (eth0 10.244.0.5, the node at 10.244.0.1), with what
    // containerd sets in every pod: unprivileged ports from 0 (the template forwards 22 and
    // 80 as uid 107) and ping sockets for all groups.
    let net = PodNet::new();
    std::fs::write("/proc/sys/net/ipv4/ip_unprivileged_port_start", "0")
        .expect("unprivileged ports in the pod");
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    let netns_path = format!("/proc/{}/task/{tid}/ns/net", std::process::id());
    let pod = Pod::new("crun-pod", &rt, Some(&netns_path), &template_args());

    let started = Instant::now();
    let mut crun = pod.spawn();
    let socket = pod.run.join("console.sock");
    until(&mut crun, &pod, "podvm's console socket", || {
        socket.exists()
    });
    let mut console = UnixStream::connect(&socket).expect("connect to the console socket");
    console
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut seen = String::new();
    read_until(&mut console, &mut seen, "starting a shell", &pod);
    let booted = started.elapsed();
    // The NAT in the pod's network: the guest's DHCP lease.
    read_until(&mut console, &mut seen, "eth0: 10.0.2.2/24", &pod);
    eprintln!(
        "guest_image: crun run to the guest's shell: {:.1} s (to its DHCP lease: {:.1} s)",
        booted.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );

    // From the node: the kubelet's readiness probe on the pod's address, and the ready file
    // in the emptyDir.
    let status_addr: SocketAddr = format!("{POD_IP}:9000").parse().unwrap();
    let (code, body) = net.in_peer(|| http_get_at(status_addr, "/readyz"));
    assert_eq!(
        code,
        200,
        "readiness from the node: {body}\n{}",
        pod.report()
    );
    assert!(
        pod.run.join("ready").exists(),
        "no ready file in the emptyDir"
    );

    // podvm as the runtime started it: the pod's user with fsGroup, no capability at all,
    // no_new_privs, seccomp filters (the runtime's below podvm's own), a read-only root, the
    // pod's cgroup and its memory limit.
    let pid = std::fs::read_to_string(pod.dir.0.join("pid")).unwrap();
    let pid = pid.trim();
    let status = proc_status(pid);
    assert_eq!(status["Uid"], "107\t107\t107\t107", "{status:?}");
    assert_eq!(status["Gid"], "107\t107\t107\t107", "{status:?}");
    assert_eq!(status["Groups"], "107", "{status:?}");
    for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(status[set], "0000000000000000", "{set}: {status:?}");
    }
    assert_eq!(status["NoNewPrivs"], "1", "{status:?}");
    assert_eq!(status["Seccomp"], "2", "{status:?}");
    // Every thread: two filters, the runtime's (inherited from exec) and podvm's own for
    // its kind of thread.
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().file_name();
        let task = task.to_string_lossy();
        let status = proc_status(&format!("{pid}/task/{task}"));
        assert_eq!(
            status["Seccomp_filters"], "2",
            "thread {}: the runtime's filter and podvm's: {status:?}",
            status["Name"]
        );
    }
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let root = mountinfo
        .lines()
        .map(|l| l.split(' ').collect::<Vec<_>>())
        .find(|f| f[4] == "/")
        .expect("a root mount");
    assert!(
        root[5].split(',').any(|o| o == "ro"),
        "root is not read-only: {root:?}"
    );
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let path = cgroup.trim().strip_prefix("0::").expect("cgroup v2");
    assert_eq!(path, format!("/podvm-tests/{}", pod.id));
    let memory_max = std::fs::read_to_string(format!("/sys/fs/cgroup{path}/memory.max")).unwrap();
    assert_eq!(memory_max.trim(), MEMORY_LIMIT.to_string());

    // The guest: its disk is the block PVC, and its shell answers.
    console
        .write_all(b"cat /sys/block/vda/serial; echo; echo IN-CRUN-$((6*7))\n")
        .unwrap();
    read_until(&mut console, &mut seen, "IN-CRUN-42", &pod);
    assert!(
        seen.lines().any(|l| l.trim() == "rootdisk"),
        "the guest's vda is not the rootdisk PVC:\n{seen}"
    );

    // The kubelet deletes the pod: SIGTERM to the container; podvm presses the guest's power
    // button, the guest powers off, podvm exits 0 and says why in the termination message.
    pod.kill("TERM");
    let status = wait_within(&mut crun, "crun run");
    assert_eq!(status.code(), Some(0), "{}", pod.report());
    let message = std::fs::read_to_string(pod.dir.0.join("termination-log")).unwrap();
    assert_eq!(message, "guest powered off\n", "{}", pod.report());
    assert!(
        !pod.run.join("ready").exists(),
        "the ready file outlived the VM"
    );
}

/// A static x86-64 Linux program that makes one system call, `nr(arg0, 0, 0, 0)`, and exits
/// with its errno (0 when the call succeeded): a probe that needs nothing from the image.
fn probe_program(nr: i64, arg0: u32) -> Vec<u8> {
    const BASE: u64 = 0x40_0000;
    const HEADERS: u64 = 64 + 56;
    let mut code = Vec::new();
    code.push(0xb8); // mov eax, nr
    code.extend_from_slice(&(nr as u32).to_le_bytes());
    code.push(0xbf); // mov edi, arg0
    code.extend_from_slice(&arg0.to_le_bytes());
    code.extend_from_slice(&[0x31, 0xf6]); // xor esi, esi
    code.extend_from_slice(&[0x31, 0xd2]); // xor edx, edx
    code.extend_from_slice(&[0x4d, 0x31, 0xd2]); // xor r10, r10
    code.extend_from_slice(&[0x0f, 0x05]); // syscall
    code.extend_from_slice(&[0x31, 0xff]); // xor edi, edi
    code.extend_from_slice(&[0x48, 0x85, 0xc0]); // test rax, rax
    code.extend_from_slice(&[0x79, 0x06]); // jns exit (over the next 6 bytes)
    code.extend_from_slice(&[0x48, 0x89, 0xc7]); // mov rdi, rax
    code.extend_from_slice(&[0x48, 0xf7, 0xdf]); // neg rdi: the errno
    code.push(0xb8); // exit: mov eax, exit_group
    code.extend_from_slice(&(libc::SYS_exit_group as u32).to_le_bytes());
    code.extend_from_slice(&[0x0f, 0x05]); // syscall
    let size = HEADERS + code.len() as u64;

    let mut elf = Vec::new();
    // ELF header: 64-bit, little-endian, version 1, System V; an executable for x86-64.
    elf.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    elf.extend_from_slice(&2u16.to_le_bytes()); // e_type: ET_EXEC
    elf.extend_from_slice(&0x3eu16.to_le_bytes()); // e_machine: x86-64
    elf.extend_from_slice(&1u32.to_le_bytes()); // e_version
    elf.extend_from_slice(&(BASE + HEADERS).to_le_bytes()); // e_entry: the code
    elf.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff: no sections
    elf.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    elf.extend_from_slice(&64u16.to_le_bytes()); // e_ehsize
    elf.extend_from_slice(&56u16.to_le_bytes()); // e_phentsize
    elf.extend_from_slice(&1u16.to_le_bytes()); // e_phnum
    elf.extend_from_slice(&[0; 6]); // e_shentsize, e_shnum, e_shstrndx
                                    // One loadable segment, readable and executable: the whole file at BASE.
    elf.extend_from_slice(&1u32.to_le_bytes()); // p_type: PT_LOAD
    elf.extend_from_slice(&5u32.to_le_bytes()); // p_flags: R + X
    elf.extend_from_slice(&0u64.to_le_bytes()); // p_offset
    elf.extend_from_slice(&BASE.to_le_bytes()); // p_vaddr
    elf.extend_from_slice(&BASE.to_le_bytes()); // p_paddr
    elf.extend_from_slice(&size.to_le_bytes()); // p_filesz
    elf.extend_from_slice(&size.to_le_bytes()); // p_memsz
    elf.extend_from_slice(&0x1000u64.to_le_bytes()); // p_align
    assert_eq!(elf.len() as u64, HEADERS);
    elf.extend_from_slice(&code);
    elf
}

/// What the profile makes of a call it does not allow, as crun reports the container's end:
/// the exit status of a probe that got `defaultErrnoRet`, or 128 + SIGSYS for a kill.
fn refused_status(profile: &Value) -> i32 {
    match profile["defaultAction"].as_str() {
        Some("SCMP_ACT_ERRNO") => profile["defaultErrnoRet"].as_i64().unwrap_or(1) as i32,
        Some(a) if a.starts_with("SCMP_ACT_KILL") => 128 + libc::SIGSYS,
        other => panic!("the profile's defaultAction {other:?} refuses nothing"),
    }
}

#[test]
fn a_call_outside_the_profile_is_refused_by_the_runtimes_filter() {
    let Some(rt) = runtime() else { return };
    let profile: Value = serde_json::from_str(PROFILE).unwrap();
    let allowed = |name: &str| {
        profile["syscalls"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["names"].as_array().unwrap().iter().any(|n| n == name))
    };
    // Two calls podvm never makes: one any process may make, and the first step of a
    // debugger escape. PTRACE_TRACEME is request 0.
    let outside = [("getppid", libc::SYS_getppid), ("ptrace", libc::SYS_ptrace)];
    for (name, _) in outside {
        assert!(
            !allowed(name),
            "{name} is in the profile now: pick another call"
        );
    }
    assert!(allowed("getpid"));
    // The container runs the probe from its emptyDir instead of podvm; everything else is
    // the pod template's container.
    let probe = format!("{RUN_DIR}/probe");
    let pod = Pod::new("crun-probe", &rt, None, &[]);
    let mut config = pod.config();
    config["process"]["args"] = json!([probe]);
    let run_probe = |config: &Value, nr: i64| {
        let file = pod.run.join("probe");
        std::fs::write(&file, probe_program(nr, 0)).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o755)).unwrap();
        pod.write_config(config);
        pod.run()
    };

    // The probe works under the profile: a call it allows succeeds.
    assert_eq!(
        run_probe(&config, libc::SYS_getpid),
        0,
        "getpid under the profile\n{}",
        pod.report()
    );
    // The same container without linux.seccomp (as an Unconfined pod): the calls succeed,
    // so nothing else in the configuration refuses them.
    let mut unconfined = config.clone();
    unconfined["linux"]
        .as_object_mut()
        .unwrap()
        .remove("seccomp");
    for (name, nr) in outside {
        assert_eq!(
            run_probe(&unconfined, nr),
            0,
            "{name} without the profile\n{}",
            pod.report()
        );
    }
    // With the Localhost profile, crun's filter refuses them as the profile says.
    let want = refused_status(&profile);
    for (name, nr) in outside {
        assert_eq!(
            run_probe(&config, nr),
            want,
            "{name} under the profile\n{}",
            pod.report()
        );
    }
}
