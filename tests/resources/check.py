#!/usr/bin/env python3
"""Checks what resources/ ships, offline:

1. every manifest validates against the Kubernetes API schemas (kubernetes-validate,
   strict: unknown fields are errors);
2. every pod (and pod template) passes each control of the Pod Security Standards
   "restricted" profile, and the namespace enforces that profile;
3. resources/seccomp/podvm.json is what `podvm seccomp-profile` prints today (the two are
   made from the same lists and cannot drift) and is a valid OCI seccomp profile;
4. the OCI image that resources/image/build.sh wrote (if given) runs /podvm as 107:107,
   and its /podvm is a static executable.

usage: check.py PODVM [OCI_LAYOUT]
       check.py --self-test    (each restricted control broken alone is caught)
Exits non-zero with one line per problem.
"""

import hashlib
import io
import json
import os
import pathlib
import subprocess
import sys
import tarfile

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
RESOURCES = ROOT / "resources"
problems = []


def problem(where, what):
    problems.append(f"{where}: {what}")


def manifests():
    for path in sorted(RESOURCES.rglob("*.yaml")):
        for index, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc:
                yield path.relative_to(ROOT), index, doc


# --- 1. Kubernetes API schemas -------------------------------------------------------

def check_schemas():
    import kubernetes_validate

    version = kubernetes_validate.latest_version()
    count = 0
    for path, index, doc in manifests():
        if is_vmi(doc):
            continue  # a KubeVirt custom resource: check_vmis runs podvm validate on it
        count += 1
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            problem(f"{path}[{index}]", f"not a valid {doc.get('kind')} ({version}): {e.message}")
        except Exception as e:  # a kind the schemas do not know, a broken document
            problem(f"{path}[{index}]", f"cannot validate: {e}")
    print(f"schemas: {count} manifests checked against Kubernetes {version} (strict)")


# --- 2. Pod Security Standards, restricted ---------------------------------------------

# https://kubernetes.io/docs/concepts/security/pod-security-standards/ (baseline + restricted)
RESTRICTED_VOLUMES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
    "projected", "secret",
}
BASELINE_SYSCTLS = {
    "kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}
BASELINE_CAPS = {
    "AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
    "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT",
}


def pod_specs(doc):
    kind = doc.get("kind")
    spec = doc.get("spec") or {}
    if kind == "Pod":
        yield spec
    elif kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        yield spec["template"]["spec"]
    elif kind == "CronJob":
        yield spec["jobTemplate"]["spec"]["template"]["spec"]


def check_pss_pod(where, pod, meta):
    sc = pod.get("securityContext") or {}
    containers = [("containers", c) for c in pod.get("containers", [])]
    containers += [("initContainers", c) for c in pod.get("initContainers", [])]
    containers += [("ephemeralContainers", c) for c in pod.get("ephemeralContainers", [])]

    # Baseline controls (restricted includes them).
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(field):
            problem(where, f"spec.{field} must be false (host namespaces)")
    for name, c in containers:
        csc = c.get("securityContext") or {}
        at = f"spec.{name}[{c.get('name')}]"
        if csc.get("privileged"):
            problem(where, f"{at}.securityContext.privileged must be false")
        for cap in (csc.get("capabilities") or {}).get("add") or []:
            if cap not in BASELINE_CAPS:
                problem(where, f"{at} adds capability {cap}")
        for port in c.get("ports") or []:
            if port.get("hostPort"):
                problem(where, f"{at} uses hostPort {port['hostPort']}")
        for opt in ("seLinuxOptions",):
            o = csc.get(opt) or {}
            if o.get("type") not in (None, "", "container_t", "container_init_t", "container_kvm_t", "container_engine_t") or o.get("user") or o.get("role"):
                problem(where, f"{at}.securityContext.seLinuxOptions not allowed")
        if csc.get("procMount") not in (None, "Default"):
            problem(where, f"{at}.securityContext.procMount must be Default")
        for key in ("appArmorProfile",):
            t = (csc.get(key) or {}).get("type")
            if t not in (None, "RuntimeDefault", "Localhost"):
                problem(where, f"{at}.securityContext.appArmorProfile.type {t} not allowed")
        if ((csc.get("windowsOptions") or {}).get("hostProcess")):
            problem(where, f"{at} is a Windows HostProcess container")
    for v in pod.get("volumes") or []:
        if "hostPath" in v:
            problem(where, f"volume {v.get('name')} is a hostPath")
    for s in (sc.get("sysctls") or []):
        if s.get("name") not in BASELINE_SYSCTLS:
            problem(where, f"sysctl {s.get('name')} not allowed")
    annotations = (meta.get("annotations") or {})
    for key, value in annotations.items():
        if key.startswith("container.apparmor.security.beta.kubernetes.io/") and not (
            value == "runtime/default" or value.startswith("localhost/")
        ):
            problem(where, f"annotation {key}={value} not allowed")

    # Restricted controls.
    for v in pod.get("volumes") or []:
        kinds = set(v) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            problem(where, f"volume {v.get('name')} has type {sorted(kinds - RESTRICTED_VOLUMES)}; restricted allows {sorted(RESTRICTED_VOLUMES)}")
    pod_seccomp = (sc.get("seccompProfile") or {}).get("type")
    for name, c in containers:
        csc = c.get("securityContext") or {}
        at = f"spec.{name}[{c.get('name')}]"
        if csc.get("allowPrivilegeEscalation") is not False:
            problem(where, f"{at}.securityContext.allowPrivilegeEscalation must be false")
        non_root = csc.get("runAsNonRoot", sc.get("runAsNonRoot"))
        if non_root is not True:
            problem(where, f"{at}: runAsNonRoot must be true (pod or container)")
        if csc.get("runAsUser", sc.get("runAsUser")) == 0:
            problem(where, f"{at}: runAsUser must not be 0")
        seccomp = (csc.get("seccompProfile") or {}).get("type", pod_seccomp)
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problem(where, f"{at}: seccompProfile.type must be RuntimeDefault or Localhost (pod or container), not {seccomp}")
        caps = csc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            problem(where, f"{at}.securityContext.capabilities.drop must contain ALL")
        for cap in caps.get("add") or []:
            if cap != "NET_BIND_SERVICE":
                problem(where, f"{at} adds {cap}; restricted allows only NET_BIND_SERVICE")
    if sc.get("runAsUser") == 0:
        problem(where, "spec.securityContext.runAsUser must not be 0")


def check_pss():
    pods = 0
    restricted_namespaces = set()
    for path, index, doc in manifests():
        if doc.get("kind") == "Namespace":
            labels = (doc.get("metadata") or {}).get("labels") or {}
            if labels.get("pod-security.kubernetes.io/enforce") == "restricted":
                restricted_namespaces.add(doc["metadata"]["name"])
            else:
                problem(f"{path}[{index}]", "the namespace does not enforce pod-security restricted")
    for path, index, doc in manifests():
        meta = doc.get("metadata") or {}
        for pod in pod_specs(doc):
            pods += 1
            where = f"{path}[{index}] {doc['kind']} {meta.get('name')}"
            check_pss_pod(where, pod, meta)
            if meta.get("namespace") not in restricted_namespaces:
                problem(where, f"namespace {meta.get('namespace')} is not one that enforces restricted")
            for c in pod.get("containers", []):
                csc = c.get("securityContext") or {}
                if csc.get("readOnlyRootFilesystem") is not True:
                    problem(where, f"container {c.get('name')}: podvm needs no writable root filesystem; set readOnlyRootFilesystem")
                limits = (c.get("resources") or {}).get("limits") or {}
                if "devices.kubevirt.io/kvm" not in limits:
                    problem(where, f"container {c.get('name')}: /dev/kvm comes from the devices.kubevirt.io/kvm resource; it is missing")
    if pods == 0:
        problem("resources", "no pod found to check")
    print(f"pod security: {pods} pods checked against every restricted control")


# --- 3. the seccomp profile ------------------------------------------------------------

OCI_ACTIONS = {
    "SCMP_ACT_KILL", "SCMP_ACT_KILL_PROCESS", "SCMP_ACT_KILL_THREAD", "SCMP_ACT_TRAP",
    "SCMP_ACT_ERRNO", "SCMP_ACT_TRACE", "SCMP_ACT_ALLOW", "SCMP_ACT_LOG", "SCMP_ACT_NOTIFY",
}
OCI_OPS = {
    "SCMP_CMP_NE", "SCMP_CMP_LT", "SCMP_CMP_LE", "SCMP_CMP_EQ", "SCMP_CMP_GE", "SCMP_CMP_GT",
    "SCMP_CMP_MASKED_EQ",
}


def check_profile(podvm):
    path = RESOURCES / "seccomp" / "podvm.json"
    generated = subprocess.run([podvm, "seccomp-profile"], check=True, capture_output=True).stdout
    shipped = path.read_bytes()
    if json.loads(shipped) != json.loads(generated):
        problem(path.relative_to(ROOT), f"differs from `podvm seccomp-profile`; regenerate it: podvm seccomp-profile > {path.relative_to(ROOT)}")
    profile = json.loads(shipped)
    if profile.get("defaultAction") != "SCMP_ACT_ERRNO":
        problem(path.name, "defaultAction must be SCMP_ACT_ERRNO")
    if profile.get("architectures") != ["SCMP_ARCH_X86_64"]:
        problem(path.name, f"architectures {profile.get('architectures')}")
    names = set()
    for i, rule in enumerate(profile.get("syscalls", [])):
        if rule.get("action") not in OCI_ACTIONS:
            problem(path.name, f"syscalls[{i}].action {rule.get('action')}")
        if not rule.get("names") or not all(isinstance(n, str) and n for n in rule["names"]):
            problem(path.name, f"syscalls[{i}].names")
        names.update(rule.get("names", []))
        for a in rule.get("args", []):
            if set(a) - {"index", "value", "valueTwo", "op"} or a.get("op") not in OCI_OPS or not 0 <= a.get("index", -1) <= 5:
                problem(path.name, f"syscalls[{i}].args {a}")
    for needed in ("execve", "ioctl", "read", "write", "exit_group", "rt_sigreturn"):
        if needed not in names:
            problem(path.name, f"does not allow {needed}")
    for never in ("ptrace", "mount", "kexec_load", "init_module", "bpf", "setuid", "unshare"):
        if never in names:
            problem(path.name, f"allows {never}")
    print(f"seccomp profile: {len(names)} calls, same as `podvm seccomp-profile`")


# --- 3b. KubeVirt VirtualMachineInstances --------------------------------------------

def is_vmi(doc):
    return isinstance(doc, dict) and str(doc.get("apiVersion", "")).startswith("kubevirt.io/")


def vmi_docs():
    """The VMIs of resources/: files of their own, and ConfigMap entries holding one."""
    for path, index, doc in manifests():
        if is_vmi(doc):
            yield f"{path}[{index}]", doc, None
        if doc.get("kind") == "ConfigMap":
            for key, text in (doc.get("data") or {}).items():
                inner = yaml.safe_load(text)
                if is_vmi(inner):
                    name = doc.get("metadata", {}).get("name")
                    yield f"{path}[{index}] ConfigMap {name} data.{key}", inner, text


def check_vmis(podvm):
    import tempfile

    demo = RESOURCES / "examples" / "demo-vmi.yaml"
    demo_text = demo.read_text()
    demo_body = demo_text[demo_text.index("apiVersion:"):]
    count = 0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        for where, doc, text in vmi_docs():
            count += 1
            # podvm validate checks that the files exist: stand-ins for the kernel, the
            # initrd and the PVCs, which only a pod has.
            root = tmp / f"root{count}"
            container = doc["spec"]["domain"].get("firmware", {}).get("kernelBoot", {}).get("container", {})
            for key in ("kernelPath", "initrdPath"):
                if key in container:
                    f = root / container[key].lstrip("/")
                    f.parent.mkdir(parents=True, exist_ok=True)
                    f.write_bytes(b"\x7fELF\x02\x01\x01\x00")
            args = [podvm, "validate", "--kernel-boot-root", str(root), "--run-dir", str(tmp / "run")]
            for v in doc["spec"].get("volumes", []):
                if "persistentVolumeClaim" in v or "dataVolume" in v:
                    img = tmp / f"pvc-{count}-{v['name']}.img"
                    img.write_bytes(b"\0" * 4096)
                    args += ["--volume", f"{v['name']}={img}"]
            env = dict(os.environ, PODVM_VMI=json.dumps(doc))
            run = subprocess.run(args, env=env, capture_output=True, text=True)
            if run.returncode != 0:
                problem(where, f"podvm validate refuses it:\n{run.stderr}")
            if text is not None and text != demo_body:
                problem(where, f"differs from {demo.relative_to(ROOT)} (from its apiVersion line on); keep the two identical")
    print(f"VMIs: {count} accepted by podvm validate")


# --- 4. the image ----------------------------------------------------------------------

def blob(layout, digest):
    algo, hexa = digest.split(":")
    data = (layout / "blobs" / algo / hexa).read_bytes()
    if hashlib.sha256(data).hexdigest() != hexa:
        problem(layout, f"blob {digest} does not match its digest")
    return data


def check_image(layout):
    layout = pathlib.Path(layout)
    index = json.loads((layout / "index.json").read_text())
    tags = {m["annotations"]["org.opencontainers.image.ref.name"]: m for m in index["manifests"]}
    if "podvm" not in tags:
        problem(layout, f"no tag podvm (has {sorted(tags)})")
        return
    for tag, desc in sorted(tags.items()):
        manifest = json.loads(blob(layout, desc["digest"]))
        config = json.loads(blob(layout, manifest["config"]["digest"]))
        c = config.get("config", {})
        where = f"image {tag}"
        if c.get("User") != "107:107":
            problem(where, f"User is {c.get('User')!r}, not 107:107")
        if c.get("Entrypoint") != ["/podvm"]:
            problem(where, f"Entrypoint is {c.get('Entrypoint')}")
        if c.get("WorkingDir") != "/var/run/podvm":
            problem(where, f"WorkingDir is {c.get('WorkingDir')!r}")
        if config.get("architecture") != "amd64" or config.get("os") != "linux":
            problem(where, "not linux/amd64")
        files = {}
        for layer in manifest["layers"]:
            data = blob(layout, layer["digest"])
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                for member in tar.getmembers():
                    files[member.name.lstrip("./")] = (member, tar.extractfile(member).read() if member.isfile() else None)
        if "podvm" not in files:
            problem(where, "no /podvm")
            continue
        member, data = files["podvm"]
        if not member.mode & 0o111:
            problem(where, "/podvm is not executable")
        if data[:4] != b"\x7fELF" or elf_has_interpreter(data):
            problem(where, "/podvm is not a static ELF executable")
        run = files.get("var/run/podvm")
        if run is None or not run[0].isdir() or run[0].uid != 107:
            problem(where, "/var/run/podvm is not a directory owned by 107")
        if any(name in files for name in ("bin/sh", "usr/bin/sh")):
            problem(where, "has a shell")
        if tag == "demo" and "usr/share/podvm/guest/vmlinuz" not in files:
            problem(where, "no demo guest kernel")
        print(f"image {tag}: {len(manifest['layers'])} layers, user 107:107, static /podvm ({len(data) >> 20} MiB)")


def elf_has_interpreter(data):
    import struct

    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        p_type, = struct.unpack_from("<I", data, phoff + i * phentsize)
        if p_type == 3:  # PT_INTERP
            return True
    return False


def self_test():
    """Each restricted control, broken on its own in a copy of the demo pod, is caught."""
    import copy

    docs = [d for _, _, d in manifests() if d.get("kind") == "Pod"]
    base = docs[0]
    breakages = {
        "privileged": lambda p: p["containers"][0]["securityContext"].update(privileged=True),
        "escalation": lambda p: p["containers"][0]["securityContext"].update(allowPrivilegeEscalation=True),
        "escalation unset": lambda p: p["containers"][0]["securityContext"].pop("allowPrivilegeEscalation"),
        "root": lambda p: (p["securityContext"].update(runAsUser=0)),
        "non-root unset": lambda p: (p["securityContext"].pop("runAsNonRoot"), p["containers"][0]["securityContext"].pop("runAsNonRoot")),
        "capability": lambda p: p["containers"][0]["securityContext"]["capabilities"].update(add=["NET_ADMIN"]),
        "no drop": lambda p: p["containers"][0]["securityContext"].pop("capabilities"),
        "seccomp unconfined": lambda p: (p["securityContext"].update(seccompProfile={"type": "Unconfined"}), p["containers"][0]["securityContext"].pop("seccompProfile", None)),
        "hostPath": lambda p: p["volumes"].append({"name": "h", "hostPath": {"path": "/"}}),
        "hostNetwork": lambda p: p.update(hostNetwork=True),
        "hostPID": lambda p: p.update(hostPID=True),
        "hostIPC": lambda p: p.update(hostIPC=True),
        "hostPort": lambda p: p["containers"][0].setdefault("ports", []).append({"containerPort": 1, "hostPort": 1}),
        "volume type": lambda p: p["volumes"].append({"name": "n", "nfs": {"server": "x", "path": "/"}}),
        "sysctl": lambda p: p["securityContext"].update(sysctls=[{"name": "kernel.msgmax", "value": "1"}]),
        "procMount": lambda p: p["containers"][0]["securityContext"].update(procMount="Unmasked"),
    }
    for name, breaking in breakages.items():
        before = len(problems)
        doc = copy.deepcopy(base)
        breaking(doc["spec"])
        check_pss_pod(name, doc["spec"], doc["metadata"])
        if len(problems) == before:
            sys.exit(f"self-test: the pod with {name} passed the restricted checks")
        del problems[before:]
    print(f"self-test: {len(breakages)} broken pods each refused")


def main():
    if len(sys.argv) == 2 and sys.argv[1] == "--self-test":
        self_test()
        return
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    check_schemas()
    check_pss()
    check_profile(sys.argv[1])
    check_vmis(sys.argv[1])
    if len(sys.argv) == 3:
        check_image(sys.argv[2])
    if problems:
        print("\n".join(["resources: problems:"] + problems), file=sys.stderr)
        sys.exit(1)
    print("resources: all checks passed")


if __name__ == "__main__":
    main()
