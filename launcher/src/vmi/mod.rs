//! A KubeVirt `VirtualMachineInstance` (kubevirt.io/v1, YAML or JSON) mapped to the VM podvm
//! runs. Pure: the only contact with the host is the [`Host`] probe that finds the volumes,
//! so the whole mapping is unit-tested with a fake host.
//!
//! Every field is either used, refused with an error naming its path and the fix, or (for
//! fields that only matter to the cluster) accepted and reported in [`Plan::ignored`]. All
//! problems are collected and reported at once.

pub mod beneath;
pub mod fuzzing;
pub mod prepare;
pub mod quantity;
pub mod seed;

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};
use vmm::config::{
    ConsoleConfig, DiskConfig, IoEngine, NetBackendConfig, NicConfig, PortForward, Proto, VmConfig,
    MAX_MEMORY_MIB, MAX_SERIAL_LEN, MAX_VCPUS, MIN_MEMORY_MIB,
};

pub use seed::Seed;

/// The largest emptyDisk: the largest file size (`off_t`), in whole 512-byte sectors.
pub const MAX_EMPTY_DISK_BYTES: u64 = i64::MAX as u64 & !511;

/// KubeVirt's default `terminationGracePeriodSeconds` for a VMI.
pub const DEFAULT_GRACE_SECONDS: u64 = 180;

/// Where the volumes of a VMI are found, and where podvm writes what it makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    /// Block PVCs (`volumeDevices`) are `<block_dir>/<volume name>`.
    pub block_dir: PathBuf,
    /// Filesystem PVCs are mounted at `<fs_dir>/<volume name>/` and hold `disk.img`.
    pub fs_dir: PathBuf,
    /// A containerDisk's image is mounted (e.g. as an image volume) at
    /// `<container_disk_dir>/<volume name>/`.
    pub container_disk_dir: PathBuf,
    /// `kernelBoot.container.kernelPath` and `initrdPath` are looked up under this directory
    /// (where the kernel container's image is mounted; `/` for files in podvm's own image).
    pub kernel_boot_root: PathBuf,
    /// The VM's writable run directory (an emptyDir): sockets, emptyDisks, seed disks,
    /// container disk copies.
    pub run_dir: PathBuf,
    /// Per-volume paths that replace the defaults above.
    pub volume_paths: BTreeMap<String, PathBuf>,
}

impl Default for Paths {
    fn default() -> Self {
        Self {
            block_dir: "/dev".into(),
            fs_dir: "/var/run/kubevirt-private/vmi-disks".into(),
            container_disk_dir: "/var/run/kubevirt/container-disks".into(),
            kernel_boot_root: "/".into(),
            run_dir: "/var/run/podvm".into(),
            volume_paths: BTreeMap::new(),
        }
    }
}

/// What a path is on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    Missing,
    Block,
    File,
    Dir,
    Other,
    /// It resolves out of the root it was looked up in (only where openat2 is missing).
    Outside,
}

/// The host as the mapping sees it.
pub trait Host {
    /// What `path`, a path the operator gave (`--volume`), is.
    fn probe(&self, path: &Path) -> Probe;
    /// What `rel` (from [`beneath::relative`]) is under `root`, resolved as if `root` were
    /// `/`, so that neither `..` nor a symlink leads out of it; and where it is (the path
    /// to hand on: without symlinks left to follow when any was followed).
    fn probe_in_root(&self, root: &Path, rel: &Path) -> (PathBuf, Probe);
    /// The regular files directly in `dir` (sorted), or `None` if it cannot be read.
    fn files_in(&self, dir: &Path) -> Option<Vec<PathBuf>>;
}

fn probe_metadata(m: &std::fs::Metadata) -> Probe {
    use std::os::unix::fs::FileTypeExt;
    if m.file_type().is_block_device() {
        Probe::Block
    } else if m.is_file() {
        Probe::File
    } else if m.is_dir() {
        Probe::Dir
    } else {
        Probe::Other
    }
}

/// The real file system.
pub struct RealHost;

impl Host for RealHost {
    fn probe(&self, path: &Path) -> Probe {
        match std::fs::metadata(path) {
            Err(_) => Probe::Missing,
            Ok(m) => probe_metadata(&m),
        }
    }

    fn probe_in_root(&self, root: &Path, rel: &Path) -> (PathBuf, Probe) {
        match beneath::open_in_root(root, rel) {
            Ok(found) => (found.path, probe_metadata(&found.metadata)),
            Err(beneath::NotFound::Missing) => (root.join(rel), Probe::Missing),
            Err(beneath::NotFound::Escapes(to)) => (to, Probe::Outside),
            Err(beneath::NotFound::Other) => (root.join(rel), Probe::Other),
        }
    }

    fn files_in(&self, dir: &Path) -> Option<Vec<PathBuf>> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .ok()?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        Some(files)
    }
}

/// One problem in the spec, at a field path such as `spec.domain.devices.disks[1].disk.bus`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Every problem found in a spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Errors(pub Vec<FieldError>);

impl fmt::Display for Errors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        write!(
            f,
            "the VirtualMachineInstance has {n} problem{}:",
            if n == 1 { "" } else { "s" }
        )?;
        for e in &self.0 {
            write!(f, "\n  {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Errors {}

/// Where a disk's contents come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskSource {
    /// A `volumeMode: Block` PVC (or DataVolume): the device node itself.
    BlockPvc,
    /// A filesystem PVC's `disk.img`.
    FilePvc,
    /// A sparse file of `capacity` bytes, made fresh at each start (KubeVirt's emptyDisk is
    /// ephemeral too).
    EmptyDisk { capacity: u64 },
    /// A hostDisk's image (KubeVirt's node directory mounted in the pod), made sparse with
    /// `create` bytes at start when it is missing (`DiskOrCreate`), kept as it is otherwise.
    /// `shared`: the same image is reachable from other nodes, so the VM may migrate.
    HostDisk { create: Option<u64>, shared: bool },
    /// A NoCloud seed disk podvm writes at start.
    CloudInit(Seed),
    /// A containerDisk's image at `image`; copied (sparse) into the run directory at start,
    /// so the guest may write without touching the image, unless the disk is read-only.
    ContainerDisk { image: PathBuf, copy: bool },
}

/// A disk of the VM with where it comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedDisk {
    /// The disk's (and its volume's) name.
    pub name: String,
    pub source: DiskSource,
}

/// A NIC with the spec's names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedNic {
    pub interface: String,
    pub network: String,
}

/// The VM a VMI describes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub name: String,
    pub namespace: String,
    /// `metadata.uid`: the VM's identity for live migration (`--migration-vm-id`).
    pub uid: Option<String>,
    pub config: VmConfig,
    /// In the order of `config.disks`.
    pub disks: Vec<PlannedDisk>,
    /// In the order of `config.nics`.
    pub nics: Vec<PlannedNic>,
    /// sockets, cores, threads.
    pub topology: (u8, u8, u8),
    /// A virtio-rng device.
    pub rng: bool,
    /// `path: why` for each field accepted but without effect in podvm.
    pub ignored: Vec<String>,
}

/// The largest VMI document podvm reads. A VMI is a few KiB, cloud-init user-data included;
/// the API server's own limit for an object is about 1.5 MiB.
pub const MAX_DOCUMENT_BYTES: usize = 1 << 20;

/// The deepest nesting of mappings and lists in a YAML VMI (KubeVirt's go below 10). The
/// YAML loader and the conversion recurse per level.
pub const MAX_YAML_DEPTH: usize = 64;

fn document_error(message: String) -> Errors {
    Errors(vec![FieldError {
        path: "(document)".into(),
        message,
    }])
}

/// The error for a document of `len` bytes, more than [`MAX_DOCUMENT_BYTES`].
pub fn document_too_large(len: usize) -> Errors {
    // A file is read only up to one byte past the limit: its size is then unknown.
    let shown = if len > MAX_DOCUMENT_BYTES + 1 {
        format!(" ({len} bytes)")
    } else {
        String::new()
    };
    document_error(format!(
        "too large{shown}; a VirtualMachineInstance may have at most {MAX_DOCUMENT_BYTES} bytes (1 MiB): move large cloud-init data into the image or a PVC"
    ))
}

/// Parses a VMI document: JSON, or YAML (one document), at most [`MAX_DOCUMENT_BYTES`].
/// YAML anchors and aliases are refused before any tree is built: a few hundred bytes of
/// nested aliases expand into gigabytes.
pub fn parse_document(text: &str) -> Result<Value, Errors> {
    let fail = document_error;
    if text.len() > MAX_DOCUMENT_BYTES {
        return Err(document_too_large(text.len()));
    }
    if text.trim_start().starts_with('{') {
        return serde_json::from_str(text).map_err(|e| fail(format!("invalid JSON: {e}")));
    }
    check_yaml_events(text).map_err(fail)?;
    let docs = yaml_rust2::YamlLoader::load_from_str(text)
        .map_err(|e| fail(format!("invalid YAML: {e}")))?;
    match docs.as_slice() {
        [doc] => yaml_to_json(doc).map_err(fail),
        [] => Err(fail("empty; give one VirtualMachineInstance object".into())),
        _ => Err(fail(format!(
            "{} YAML documents; give exactly one VirtualMachineInstance",
            docs.len()
        ))),
    }
}

/// Reads the YAML events of `text` without building anything: refuses an anchor or an alias
/// and nesting deeper than [`MAX_YAML_DEPTH`], so that loading `text` costs memory in
/// proportion to its size and stack in proportion to its depth.
fn check_yaml_events(text: &str) -> Result<(), String> {
    use yaml_rust2::parser::{Event, Parser};
    let mut parser = Parser::new_from_str(text);
    let mut depth = 0usize;
    loop {
        let (event, mark) = parser
            .next_token()
            .map_err(|e| format!("invalid YAML: {e}"))?;
        let at = format!("line {} column {}", mark.line(), mark.col() + 1);
        let anchor = match &event {
            Event::StreamEnd => return Ok(()),
            Event::Alias(_) => {
                return Err(format!(
                    "{at}: a YAML alias (*name); podvm does not expand anchors and aliases (a few of them can expand a small document into gigabytes): write the value out"
                ))
            }
            Event::SequenceStart(anchor, _) | Event::MappingStart(anchor, _) => {
                depth += 1;
                if depth > MAX_YAML_DEPTH {
                    return Err(format!(
                        "{at}: nested more than {MAX_YAML_DEPTH} levels deep; a VirtualMachineInstance needs far fewer"
                    ));
                }
                *anchor
            }
            Event::SequenceEnd | Event::MappingEnd => {
                depth = depth.saturating_sub(1);
                0
            }
            Event::Scalar(_, _, anchor, _) => *anchor,
            _ => 0,
        };
        if anchor != 0 {
            return Err(format!(
                "{at}: a YAML anchor (&name); podvm does not expand anchors and aliases (a few of them can expand a small document into gigabytes): write the values out"
            ));
        }
    }
}

fn yaml_to_json(y: &yaml_rust2::Yaml) -> Result<Value, String> {
    use yaml_rust2::Yaml;
    Ok(match y {
        Yaml::Null => Value::Null,
        Yaml::Boolean(b) => Value::Bool(*b),
        Yaml::Integer(i) => Value::from(*i),
        Yaml::Real(r) => r
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map(Value::Number)
            .ok_or_else(|| format!("invalid YAML number {r:?}"))?,
        Yaml::String(s) => Value::String(s.clone()),
        Yaml::Array(items) => {
            Value::Array(items.iter().map(yaml_to_json).collect::<Result<_, _>>()?)
        }
        Yaml::Hash(map) => {
            let mut out = Map::new();
            for (k, v) in map {
                let key = match k {
                    Yaml::String(s) => s.clone(),
                    Yaml::Integer(i) => i.to_string(),
                    Yaml::Boolean(b) => b.to_string(),
                    other => return Err(format!("a YAML mapping key {other:?} is not a string")),
                };
                out.insert(key, yaml_to_json(v)?);
            }
            Value::Object(out)
        }
        Yaml::Alias(_) | Yaml::BadValue => return Err("unsupported YAML value (alias?)".into()),
    })
}

/// Collects problems and ignored fields while walking the spec.
struct Walk<'h> {
    errors: Vec<FieldError>,
    ignored: Vec<String>,
    host: &'h dyn Host,
}

/// What to do with a key of an object.
enum Key {
    Use,
    Ignore(&'static str),
    Refuse(&'static str),
}

impl Walk<'_> {
    fn error(&mut self, path: &str, message: impl Into<String>) {
        self.errors.push(FieldError {
            path: path.to_string(),
            message: message.into(),
        });
    }

    /// Checks that `value` is an object whose keys `classify` knows; returns it.
    fn object<'v>(
        &mut self,
        path: &str,
        value: &'v Value,
        classify: impl Fn(&str) -> Option<Key>,
    ) -> Option<&'v Map<String, Value>> {
        let Some(map) = value.as_object() else {
            if !value.is_null() {
                self.error(path, "must be an object");
            }
            return None;
        };
        for (key, v) in map {
            if v.is_null() {
                continue;
            }
            let field = join(path, key);
            match classify(key) {
                Some(Key::Use) => {}
                Some(Key::Ignore(why)) => self.ignored.push(format!("{field}: ignored: {why}")),
                Some(Key::Refuse(msg)) => self.error(&field, msg),
                None => self.error(
                    &field,
                    "unknown field; check the spelling against kubevirt.io/v1",
                ),
            }
        }
        Some(map)
    }

    fn string<'v>(
        &mut self,
        map: &'v Map<String, Value>,
        path: &str,
        key: &str,
    ) -> Option<&'v str> {
        match map.get(key) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s),
            Some(_) => {
                self.error(&join(path, key), "must be a string");
                None
            }
        }
    }

    fn boolean(&mut self, map: &Map<String, Value>, path: &str, key: &str) -> Option<bool> {
        match map.get(key) {
            None | Some(Value::Null) => None,
            Some(Value::Bool(b)) => Some(*b),
            Some(_) => {
                self.error(&join(path, key), "must be true or false");
                None
            }
        }
    }

    fn unsigned(&mut self, map: &Map<String, Value>, path: &str, key: &str) -> Option<u64> {
        match map.get(key) {
            None | Some(Value::Null) => None,
            Some(v) => match v.as_u64() {
                Some(n) => Some(n),
                None => {
                    self.error(&join(path, key), format!("{v} is not a whole number >= 0"));
                    None
                }
            },
        }
    }

    fn array<'v>(&mut self, map: &'v Map<String, Value>, path: &str, key: &str) -> &'v [Value] {
        match map.get(key) {
            None | Some(Value::Null) => &[],
            Some(Value::Array(items)) => items,
            Some(_) => {
                self.error(&join(path, key), "must be a list");
                &[]
            }
        }
    }

    fn quantity(&mut self, map: &Map<String, Value>, path: &str, key: &str) -> Option<u64> {
        let field = join(path, key);
        let text = match map.get(key)? {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            Value::Null => return None,
            _ => {
                self.error(&field, "must be a quantity such as 512Mi or 1Gi");
                return None;
            }
        };
        match quantity::parse_bytes(&text) {
            Ok(n) => Some(n),
            Err(e) => {
                self.error(&field, e.to_string());
                None
            }
        }
    }

    /// The `name` of a list item, required, unique within `seen`.
    fn name<'v>(
        &mut self,
        map: &'v Map<String, Value>,
        path: &str,
        seen: &mut HashSet<String>,
    ) -> Option<&'v str> {
        let name = self.string(map, path, "name");
        match name {
            None => self.error(&join(path, "name"), "required"),
            Some("") => self.error(&join(path, "name"), "must not be empty"),
            Some(n) if !seen.insert(n.to_string()) => self.error(
                &join(path, "name"),
                format!("{n:?} is used twice; give each item its own name"),
            ),
            Some(_) => return name,
        }
        None
    }
}

/// `path.key`; an empty key shows as `""`, so that every error names a field.
fn join(path: &str, key: &str) -> String {
    let key = if key.is_empty() { "\"\"" } else { key };
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

const CLUSTER: &str = "only the cluster uses it";

/// Maps a parsed VMI to the VM podvm would run.
pub fn plan(doc: &Value, paths: &Paths, host: &dyn Host) -> Result<Plan, Errors> {
    let mut w = Walk {
        errors: Vec::new(),
        ignored: Vec::new(),
        host,
    };
    match (plan_inner(&mut w, doc, paths), w.errors.is_empty()) {
        (Some(mut plan), true) => {
            plan.ignored = w.ignored;
            Ok(plan)
        }
        (None, true) => {
            // A field given up on without saying why: a bug (tests and fuzzing stop here),
            // still an error for a user, never a panic.
            debug_assert!(false, "the VMI was refused without an error");
            Err(Errors(vec![FieldError {
                path: "(document)".into(),
                message: "cannot be mapped (podvm found no error to name; please report it with the spec)".into(),
            }]))
        }
        (_, false) => Err(Errors(w.errors)),
    }
}

fn plan_inner(w: &mut Walk, doc: &Value, paths: &Paths) -> Option<Plan> {
    if !doc.is_object() {
        w.error("(document)", "must be a VirtualMachineInstance object");
        return None;
    }
    let top = w.object("", doc, |k| match k {
        "apiVersion" | "kind" | "metadata" | "spec" => Some(Key::Use),
        "status" => Some(Key::Ignore("the cluster writes the status")),
        _ => None,
    });
    let top = top?;
    match w.string(top, "", "apiVersion") {
        Some("kubevirt.io/v1" | "kubevirt.io/v1alpha3") => {}
        Some(other) => w.error(
            "apiVersion",
            format!("{other:?} is not supported; use kubevirt.io/v1"),
        ),
        None => w.error("apiVersion", "required; use kubevirt.io/v1"),
    }
    match w.string(top, "", "kind") {
        Some("VirtualMachineInstance") => {}
        Some("VirtualMachine") => w.error(
            "kind",
            "VirtualMachine is not supported; give its spec.template as a VirtualMachineInstance",
        ),
        Some(other) => w.error(
            "kind",
            format!("{other:?} is not supported; use VirtualMachineInstance"),
        ),
        None => w.error("kind", "required; use VirtualMachineInstance"),
    }
    let (name, namespace, uid) = metadata(w, top.get("metadata").unwrap_or(&Value::Null));
    let spec = top.get("spec").unwrap_or(&Value::Null);
    if spec.is_null() {
        w.error("spec", "required");
        return None;
    }
    let spec = w.object("spec", spec, |k| match k {
        "domain" | "volumes" | "networks" | "terminationGracePeriodSeconds" | "hostname"
        | "architecture" => Some(Key::Use),
        "nodeSelector" | "affinity" | "tolerations" | "schedulerName" | "priorityClassName"
        | "topologySpreadConstraints" | "evictionStrategy" | "dnsPolicy" | "subdomain" => {
            Some(Key::Ignore(CLUSTER))
        }
        "dnsConfig" => Some(Key::Ignore(
            "the pod's resolv.conf already carries it, and podvm's DHCP hands that out",
        )),
        "readinessProbe" | "livenessProbe" => Some(Key::Ignore(
            "KubeVirt's virt-handler runs guest probes; podvm's pod reports the VM's own readiness and liveness",
        )),
        "startStrategy" => Some(Key::Refuse("is not supported; podvm starts the guest at once (pause it with `podvm api SOCKET pause`)")),
        "accessCredentials" => Some(Key::Refuse("is not supported (it needs the guest agent); put SSH keys in a cloudInitNoCloud volume's user-data")),
        _ => None,
    })?;
    if let Some(arch) = w.string(spec, "spec", "architecture") {
        if arch != "amd64" {
            w.error(
                "spec.architecture",
                format!("{arch:?} is not supported; podvm runs amd64 guests"),
            );
        }
    }
    let grace = w
        .unsigned(spec, "spec", "terminationGracePeriodSeconds")
        .unwrap_or(DEFAULT_GRACE_SECONDS);
    let hostname = w.string(spec, "spec", "hostname").map(str::to_string);

    let domain_value = spec.get("domain").unwrap_or(&Value::Null);
    if domain_value.is_null() {
        w.error("spec.domain", "required");
        return None;
    }
    let domain = w.object("spec.domain", domain_value, |k| match k {
        "cpu" | "memory" | "resources" | "devices" | "firmware" | "features" | "clock" => {
            Some(Key::Use)
        }
        "machine" => Some(Key::Ignore(
            "podvm has one machine type (a microvm with ACPI)",
        )),
        "ioThreadsPolicy" | "ioThreads" => Some(Key::Ignore(
            "podvm serves every disk from its event loop (io_uring)",
        )),
        "chassis" => Some(Key::Ignore("podvm writes no SMBIOS tables")),
        "launchSecurity" => Some(Key::Refuse("is not supported (no SEV/TDX in podvm)")),
        _ => None,
    })?;

    let (vcpus, topology) = cpu(w, domain);
    let memory_mib = memory(w, domain);
    let devices = domain.get("devices").cloned().unwrap_or(Value::Null);
    let devices = w
        .object("spec.domain.devices", &devices, devices_key)
        .cloned()
        .unwrap_or_default();
    features_and_clock(w, domain);
    let kernel = kernel_boot(w, domain, paths);

    let volumes = volumes(w, spec, paths, &name, &namespace, hostname.as_deref());
    let (disk_configs, planned_disks) = disks(w, &devices, volumes);
    let (nics, planned_nics) = interfaces(w, &devices, spec);

    let rng = match devices.get("rng") {
        None | Some(Value::Null) => false,
        Some(v) => {
            w.object("spec.domain.devices.rng", v, |_| None);
            true
        }
    };
    let serial_console = w
        .boolean(&devices, "spec.domain.devices", "autoattachSerialConsole")
        .unwrap_or(true);
    let log_console = w
        .boolean(&devices, "spec.domain.devices", "logSerialConsole")
        .unwrap_or(false);
    for (key, why) in [
        (
            "autoattachGraphicsDevice",
            "podvm has no graphics device; use the serial console",
        ),
        ("autoattachMemBalloon", "podvm has no memory balloon"),
    ] {
        if w.boolean(&devices, "spec.domain.devices", key) == Some(true) {
            w.ignored
                .push(format!("spec.domain.devices.{key}: ignored: {why}"));
        }
    }
    if w.boolean(&devices, "spec.domain.devices", "autoattachVSOCK") == Some(true) {
        w.error(
            "spec.domain.devices.autoattachVSOCK",
            "true is not supported (podvm has no vsock device); remove it",
        );
    }
    if !w.errors.is_empty() {
        return None;
    }
    let (kernel, initrd, cmdline) = kernel?;
    let mut config = VmConfig::new(kernel);
    config.vcpus = vcpus?;
    let (sockets, cores, threads) = topology;
    // The guest sees the VMI's sockets, cores and threads (CPUID, APIC IDs, MADT) when it
    // names any; otherwise podvm's default, one socket of single-threaded cores.
    config.topology = domain
        .get("cpu")
        .filter(|c| {
            ["sockets", "cores", "threads"]
                .iter()
                .any(|k| c.get(k).is_some_and(|v| !v.is_null()))
        })
        .map(|_| vmm::config::CpuTopology {
            sockets,
            cores,
            threads,
        });
    config.memory_mib = memory_mib?;
    config.initrd = initrd;
    if let Some(cmdline) = cmdline {
        config.cmdline = cmdline;
    }
    config.console = if serial_console {
        ConsoleConfig::Socket {
            path: paths.run_dir.join("console.sock"),
            history: vmm::console::DEFAULT_HISTORY,
            log: log_console.then(|| paths.run_dir.join("console.log")),
        }
    } else {
        if log_console {
            w.error(
                "spec.domain.devices.logSerialConsole",
                "needs the serial console; drop autoattachSerialConsole: false",
            );
            return None;
        }
        ConsoleConfig::Off
    };
    config.disks = disk_configs;
    config.nics = nics;
    config.rng = rng;
    config.shutdown_timeout = std::time::Duration::from_secs(grace);
    config.api_socket = Some(paths.run_dir.join("api.sock"));
    if let Err(e) = config.validate() {
        w.error("spec", e.to_string());
        return None;
    }
    Some(Plan {
        name,
        namespace,
        uid,
        config,
        disks: planned_disks,
        nics: planned_nics,
        topology,
        rng,
        ignored: Vec::new(),
    })
}

/// The VMI's name, namespace and UID.
fn metadata(w: &mut Walk, value: &Value) -> (String, String, Option<String>) {
    if value.is_null() {
        w.error(
            "metadata",
            "required (metadata.name names the VM in logs and metrics)",
        );
        return (String::new(), "default".into(), None);
    }
    let Some(meta) = w.object("metadata", value, |k| match k {
        "name" | "namespace" | "uid" => Some(Key::Use),
        "labels"
        | "annotations"
        | "generateName"
        | "resourceVersion"
        | "creationTimestamp"
        | "generation"
        | "finalizers"
        | "ownerReferences"
        | "managedFields"
        | "deletionTimestamp"
        | "deletionGracePeriodSeconds"
        | "selfLink" => Some(Key::Ignore(CLUSTER)),
        _ => None,
    }) else {
        return (String::new(), "default".into(), None);
    };
    // The UID binds the VM's live migrations to it: a destination takes only a source
    // that carries the same one (see docs/migration.md).
    let uid = w.string(meta, "metadata", "uid").and_then(|uid| {
        if uid.is_empty() || uid.len() > 253 || !uid.bytes().all(|b| b.is_ascii_graphic()) {
            w.error(
                "metadata.uid",
                "must be 1 to 253 printable ASCII characters without spaces, as the API server assigns it (a UUID)",
            );
            None
        } else {
            Some(uid.to_string())
        }
    });
    let name = match w.string(meta, "metadata", "name") {
        Some(n) if !n.is_empty() => n.to_string(),
        _ => {
            w.error("metadata.name", "required");
            String::new()
        }
    };
    let namespace = w
        .string(meta, "metadata", "namespace")
        .unwrap_or("default")
        .to_string();
    (name, namespace, uid)
}

fn cpu(w: &mut Walk, domain: &Map<String, Value>) -> (Option<u8>, (u8, u8, u8)) {
    let path = "spec.domain.cpu";
    let value = domain.get("cpu").cloned().unwrap_or(Value::Null);
    let Some(cpu) = w.object(path, &value, |k| match k {
        "cores" | "sockets" | "threads" | "model" => Some(Key::Use),
        "dedicatedCpuPlacement" | "isolateEmulatorThread" => Some(Key::Ignore(
            "CPU pinning is the kubelet's (static CPU manager policy with a Guaranteed pod)",
        )),
        "maxSockets" => Some(Key::Ignore(
            "podvm has no CPU hotplug; the VM has the sockets it starts with",
        )),
        "features" => Some(Key::Refuse(
            "is not supported; podvm passes the host's CPU features (host-passthrough)",
        )),
        "numa" => Some(Key::Refuse(
            "is not supported; podvm's guests have one NUMA node",
        )),
        "realtime" => Some(Key::Refuse("is not supported")),
        _ => None,
    }) else {
        return (Some(1), (1, 1, 1));
    };
    if let Some(model) = w.string(cpu, path, "model") {
        if !matches!(model, "host-passthrough" | "host-model") {
            w.error(
                &join(path, "model"),
                format!("{model:?} is not supported; podvm gives the guest the host's CPU model: use host-passthrough or drop the field"),
            );
        }
    }
    let mut count = |key: &str| -> Option<u8> {
        match w.unsigned(cpu, path, key) {
            None => Some(1),
            Some(n @ 1..=254) => Some(n as u8),
            Some(n) => {
                w.error(
                    &join(path, key),
                    format!("{n} is out of range; use 1 to {MAX_VCPUS}"),
                );
                None
            }
        }
    };
    let (sockets, cores, threads) = (count("sockets"), count("cores"), count("threads"));
    let (Some(sockets), Some(cores), Some(threads)) = (sockets, cores, threads) else {
        return (None, (1, 1, 1));
    };
    let total = u64::from(sockets) * u64::from(cores) * u64::from(threads);
    if total > u64::from(MAX_VCPUS) {
        w.error(
            path,
            format!("sockets x cores x threads = {total} vCPUs; podvm runs at most {MAX_VCPUS}"),
        );
        return (None, (sockets, cores, threads));
    }
    (Some(total as u8), (sockets, cores, threads))
}

fn memory(w: &mut Walk, domain: &Map<String, Value>) -> Option<u64> {
    let mem_value = domain.get("memory").cloned().unwrap_or(Value::Null);
    let guest = match w.object("spec.domain.memory", &mem_value, |k| match k {
        "guest" => Some(Key::Use),
        "hugepages" => Some(Key::Refuse(
            "is not supported; podvm backs guest memory with normal pages",
        )),
        "maxGuest" => Some(Key::Refuse("is not supported; podvm has no memory hotplug")),
        _ => None,
    }) {
        Some(m) => w
            .quantity(m, "spec.domain.memory", "guest")
            .map(|b| (b, "spec.domain.memory.guest")),
        None => None,
    };
    let res_value = domain.get("resources").cloned().unwrap_or(Value::Null);
    let requested = match w.object("spec.domain.resources", &res_value, |k| match k {
        "requests" => Some(Key::Use),
        "limits" | "overcommitGuestOverhead" => Some(Key::Ignore(CLUSTER)),
        _ => None,
    }) {
        Some(r) => {
            let req = r.get("requests").cloned().unwrap_or(Value::Null);
            match w.object("spec.domain.resources.requests", &req, |k| match k {
                "memory" => Some(Key::Use),
                _ => Some(Key::Ignore(CLUSTER)),
            }) {
                Some(req) => w
                    .quantity(req, "spec.domain.resources.requests", "memory")
                    .map(|b| (b, "spec.domain.resources.requests.memory")),
                None => None,
            }
        }
        None => None,
    };
    let (bytes, field) = match guest.or(requested) {
        Some(found) => found,
        None => {
            if w.errors.iter().any(|e| e.path.contains("memory")) {
                return None;
            }
            w.error(
                "spec.domain.memory.guest",
                "required (or spec.domain.resources.requests.memory); give the guest's memory, e.g. 512Mi",
            );
            return None;
        }
    };
    let mib = bytes.div_ceil(1 << 20);
    if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&mib) {
        w.error(
            field,
            format!(
                "{mib} MiB is out of range; give {MIN_MEMORY_MIB}Mi to {}Ti",
                MAX_MEMORY_MIB >> 20
            ),
        );
        return None;
    }
    Some(mib)
}

fn devices_key(k: &str) -> Option<Key> {
    match k {
        "disks" | "interfaces" | "rng" | "autoattachSerialConsole" | "logSerialConsole"
        | "autoattachGraphicsDevice" | "autoattachMemBalloon" | "autoattachPodInterface"
        | "autoattachVSOCK" => Some(Key::Use),
        "blockMultiQueue" | "networkInterfaceMultiqueue" => {
            Some(Key::Ignore("podvm's virtio devices have one queue (pair) each"))
        }
        "useVirtioTransitional" => Some(Key::Ignore(
            "podvm's virtio devices are virtio 1.0 over MMIO; guests need virtio 1.0 drivers (Linux 4.0 and later)",
        )),
        "disableHotplug" => Some(Key::Ignore("podvm has no hotplug")),
        "autoattachInputDevice" => Some(Key::Ignore("podvm has no input devices")),
        "inputs" | "watchdog" | "gpus" | "hostDevices" | "filesystems" | "sound" | "tpm"
        | "clientPassthrough" | "downwardMetrics" => {
            Some(Key::Refuse("is not supported by podvm; remove it"))
        }
        _ => None,
    }
}

fn features_and_clock(w: &mut Walk, domain: &Map<String, Value>) {
    if let Some(v) = domain.get("features") {
        if let Some(f) = w.object("spec.domain.features", v, |k| match k {
            "acpi" | "apic" => Some(Key::Use),
            "smm" | "hyperv" | "hypervPassthrough" | "kvm" | "pvspinlock" => {
                Some(Key::Refuse("is not supported by podvm; remove it"))
            }
            _ => None,
        }) {
            for key in ["acpi", "apic"] {
                if let Some(feature) = f.get(key) {
                    let path = format!("spec.domain.features.{key}");
                    if let Some(obj) = w.object(&path, feature, |k| match k {
                        "enabled" => Some(Key::Use),
                        "endOfInterrupt" => Some(Key::Ignore("podvm's APIC is KVM's")),
                        _ => None,
                    }) {
                        if w.boolean(obj, &path, "enabled") == Some(false) {
                            w.error(
                                &join(&path, "enabled"),
                                format!(
                                    "false is not supported; podvm's guests always have {}",
                                    key.to_uppercase()
                                ),
                            );
                        }
                    }
                }
            }
        }
    }
    if let Some(v) = domain.get("clock") {
        if let Some(clock) = w.object("spec.domain.clock", v, |k| match k {
            "utc" => Some(Key::Use),
            "timer" => Some(Key::Ignore(
                "podvm's guests have KVM's clock and timers (kvmclock, PIT, LAPIC timer)",
            )),
            "timezone" => Some(Key::Refuse(
                "is not supported; podvm's RTC keeps UTC: use utc: {}",
            )),
            _ => None,
        }) {
            if let Some(utc) = clock.get("utc") {
                if let Some(utc) = w.object("spec.domain.clock.utc", utc, |k| {
                    (k == "offsetSeconds").then_some(Key::Use)
                }) {
                    if w.unsigned(utc, "spec.domain.clock.utc", "offsetSeconds")
                        .unwrap_or(0)
                        != 0
                    {
                        w.error(
                            "spec.domain.clock.utc.offsetSeconds",
                            "is not supported; drop it (the guest's clock is the host's)",
                        );
                    }
                }
            }
        }
    }
}

type KernelFiles = (PathBuf, Option<PathBuf>, Option<String>);

fn kernel_boot(w: &mut Walk, domain: &Map<String, Value>, paths: &Paths) -> Option<KernelFiles> {
    let need = "podvm boots the guest's kernel directly: give spec.domain.firmware.kernelBoot with container.kernelPath (and initrdPath, kernelArgs)";
    let Some(firmware) = domain.get("firmware").filter(|v| !v.is_null()) else {
        w.error(
            "spec.domain.firmware.kernelBoot",
            format!("required; {need}"),
        );
        return None;
    };
    let path = "spec.domain.firmware";
    let firmware = w.object(path, firmware, |k| match k {
        "kernelBoot" => Some(Key::Use),
        "uuid" | "serial" => Some(Key::Ignore("podvm writes no SMBIOS tables")),
        "bootloader" => Some(Key::Refuse(
            "is not supported; podvm has no firmware: use kernelBoot (the kernel and initrd from the image, with kernelArgs)",
        )),
        "acpi" => Some(Key::Refuse("is not supported; podvm writes its own ACPI tables")),
        _ => None,
    })?;
    let Some(kb) = firmware.get("kernelBoot").filter(|v| !v.is_null()) else {
        w.error(
            "spec.domain.firmware.kernelBoot",
            format!("required; {need}"),
        );
        return None;
    };
    let path = "spec.domain.firmware.kernelBoot";
    let kb = w.object(path, kb, |k| match k {
        "kernelArgs" | "container" => Some(Key::Use),
        _ => None,
    })?;
    let cmdline = w.string(kb, path, "kernelArgs").map(str::to_string);
    let Some(container) = kb.get("container").filter(|v| !v.is_null()) else {
        w.error(&join(path, "container"), format!("required; {need}"));
        return None;
    };
    let path = "spec.domain.firmware.kernelBoot.container";
    let container = w.object(path, container, |k| match k {
        "image" | "kernelPath" | "initrdPath" => Some(Key::Use),
        "imagePullPolicy" | "imagePullSecret" => Some(Key::Ignore(
            "the kubelet pulls images; podvm reads the files where the image is mounted",
        )),
        _ => None,
    })?;
    if w.string(container, path, "image").is_none() {
        w.error(
            &join(path, "image"),
            "required (the image whose files are mounted for podvm)",
        );
    }
    let mut file = |key: &str| -> Option<PathBuf> {
        let text = w.string(container, path, key)?;
        let rel = match beneath::relative(text) {
            Ok(rel) => rel,
            Err(e) => {
                w.error(
                    &join(path, key),
                    format!("{e}; give the file's path inside the kernel image"),
                );
                return None;
            }
        };
        let (full, found) = w.host.probe_in_root(&paths.kernel_boot_root, &rel);
        match found {
            Probe::File => Some(full),
            found => {
                w.error(
                    &join(path, key),
                    format!(
                        "{} is {}; mount the kernel image's files under {} (podvm's --kernel-boot-root; symlinks resolve inside it)",
                        full.display(),
                        describe(found),
                        paths.kernel_boot_root.display()
                    ),
                );
                None
            }
        }
    };
    let kernel = file("kernelPath");
    let initrd = file("initrdPath");
    match kernel {
        Some(k) => Some((k, initrd, cmdline)),
        None => {
            if container.get("kernelPath").is_none_or(Value::is_null) {
                w.error(&join(path, "kernelPath"), format!("required; {need}"));
            }
            None
        }
    }
}

fn describe(p: Probe) -> &'static str {
    match p {
        Probe::Missing => "missing",
        Probe::Block => "a block device, not a file",
        Probe::File => "a file",
        Probe::Dir => "a directory, not a file",
        Probe::Other => "neither a file nor a block device (or unreadable)",
        Probe::Outside => "outside the directory it is looked up in (a symlink leads out)",
    }
}

/// Whether `name` is a DNS-1123 label, as Kubernetes requires of a volume's name: lower-case
/// letters, digits and '-', starting and ending with a letter or digit, at most 63
/// characters. Such a name is one safe path component.
pub fn is_dns1123_label(name: &str) -> bool {
    let b = name.as_bytes();
    let inner = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    (1..=63).contains(&b.len())
        && b.iter().all(|c| inner(c) || *c == b'-')
        && inner(&b[0])
        && inner(&b[b.len() - 1])
}

/// A volume, resolved to where its disk will be.
#[derive(Debug, Clone)]
struct Volume {
    index: usize,
    path: PathBuf,
    source: DiskSource,
    read_only: bool,
    used: bool,
}

fn volumes(
    w: &mut Walk,
    spec: &Map<String, Value>,
    paths: &Paths,
    name: &str,
    namespace: &str,
    hostname: Option<&str>,
) -> BTreeMap<String, Volume> {
    let mut out = BTreeMap::new();
    let mut seen = HashSet::new();
    // The files podvm makes in the run directory: each volume its own.
    let mut run_files: BTreeMap<PathBuf, usize> = BTreeMap::new();
    for (index, v) in w.array(spec, "spec", "volumes").to_vec().iter().enumerate() {
        let path = format!("spec.volumes[{index}]");
        let Some(vol) = w.object(&path, v, |k| match k {
            "name" | "persistentVolumeClaim" | "dataVolume" | "emptyDisk" | "cloudInitNoCloud"
            | "containerDisk" | "hostDisk" => Some(Key::Use),
            "ephemeral" | "configMap" | "secret" | "serviceAccount" | "downwardAPI"
            | "downwardMetrics" | "cloudInitConfigDrive" | "sysprep" | "memoryDump" => Some(Key::Refuse(
                "is not supported; use persistentVolumeClaim, dataVolume, emptyDisk, containerDisk, hostDisk or cloudInitNoCloud",
            )),
            _ => None,
        }) else {
            continue;
        };
        let Some(vol_name) = w.name(vol, &path, &mut seen) else {
            continue;
        };
        let placeholder = Volume {
            index,
            path: PathBuf::new(),
            source: DiskSource::FilePvc,
            read_only: true,
            used: false,
        };
        if !is_dns1123_label(vol_name) {
            w.error(
                &join(&path, "name"),
                format!("{vol_name:?} is not a valid volume name (DNS-1123 label: lower-case letters, digits and '-', at most 63 characters); rename the volume"),
            );
            // Known, so the disk that uses it does not fail as "no volume" too.
            out.insert(vol_name.to_string(), placeholder);
            continue;
        }
        let sources: Vec<&String> = vol
            .keys()
            .filter(|k| *k != "name" && !vol[*k].is_null())
            .collect();
        if sources.len() != 1 {
            w.error(
                &path,
                format!(
                    "give exactly one volume source (persistentVolumeClaim, dataVolume, emptyDisk, containerDisk, hostDisk or cloudInitNoCloud), not {}",
                    sources.len()
                ),
            );
            continue;
        }
        let kind = sources[0].as_str();
        let kind_path = join(&path, kind);
        let overridden = paths.volume_paths.get(vol_name).cloned();
        // A file podvm makes in the run directory (the name is a DNS-1123 label, so this is
        // one component beneath it), unless --volume put the disk elsewhere.
        let run_file = |suffix: &str| match &overridden {
            Some(p) => Ok(p.clone()),
            None => beneath::beneath(&paths.run_dir, &format!("{vol_name}{suffix}")),
        };
        let resolved = match kind {
            "persistentVolumeClaim" | "dataVolume" => {
                let src = w.object(&kind_path, &vol[kind], |k| match k {
                    "claimName" | "name" | "readOnly" => Some(Key::Use),
                    "hotpluggable" => Some(Key::Refuse("is not supported; podvm has no hotplug")),
                    _ => None,
                });
                let read_only = src
                    .and_then(|s| w.boolean(s, &kind_path, "readOnly"))
                    .unwrap_or(false);
                let required = if kind == "dataVolume" {
                    "name"
                } else {
                    "claimName"
                };
                if src
                    .and_then(|s| w.string(s, &kind_path, required))
                    .is_none()
                {
                    w.error(&join(&kind_path, required), "required");
                }
                pvc(w, &kind_path, vol_name, paths, overridden.as_deref())
                    .map(|(p, source)| (Ok(p), source, read_only))
            }
            "emptyDisk" => {
                let src = w.object(&kind_path, &vol[kind], |k| {
                    (k == "capacity").then_some(Key::Use)
                });
                match src.and_then(|s| capacity(w, s, &kind_path)) {
                    Some(capacity) => {
                        Some((run_file(".img"), DiskSource::EmptyDisk { capacity }, false))
                    }
                    None => {
                        if !w.errors.iter().any(|e| e.path.starts_with(&kind_path)) {
                            w.error(&join(&kind_path, "capacity"), "required, e.g. 2Gi");
                        }
                        None
                    }
                }
            }
            "cloudInitNoCloud" => cloud_init(w, &kind_path, &vol[kind], name, namespace, hostname)
                .map(|seed| (run_file("-cidata.img"), DiskSource::CloudInit(seed), true)),
            "hostDisk" => host_disk(
                w,
                &kind_path,
                &vol[kind],
                vol_name,
                paths,
                overridden.as_deref(),
            )
            .map(|(p, source)| (Ok(p), source, false)),
            "containerDisk" => container_disk(
                w,
                &kind_path,
                &vol[kind],
                vol_name,
                paths,
                overridden.as_deref(),
            )
            .map(|image| {
                (
                    run_file(".img"),
                    DiskSource::ContainerDisk { image, copy: true },
                    false,
                )
            }),
            // A refused source: its error, naming the field, is already recorded.
            _ => None,
        };
        let resolved = match resolved {
            Some((Ok(file), source, read_only)) => Some((file, source, read_only)),
            Some((Err(e), ..)) => {
                w.error(&join(&path, "name"), format!("{e}; rename the volume"));
                None
            }
            None => None,
        };
        if let Some((file, _, _)) = &resolved {
            if overridden.is_none() {
                if let Some(other) = run_files.insert(file.clone(), index) {
                    w.error(
                        &join(&path, "name"),
                        format!("{vol_name:?} would share the run directory's file {} with spec.volumes[{other}]; rename one of them", file.display()),
                    );
                }
            }
        }
        if let Some((path, source, read_only)) = resolved {
            out.insert(
                vol_name.to_string(),
                Volume {
                    index,
                    path,
                    source,
                    read_only,
                    used: false,
                },
            );
        } else {
            // Keep the name known so disks that use it do not also fail as "no volume".
            out.insert(vol_name.to_string(), placeholder);
        }
    }
    out
}

fn pvc(
    w: &mut Walk,
    path: &str,
    name: &str,
    paths: &Paths,
    overridden: Option<&Path>,
) -> Option<(PathBuf, DiskSource)> {
    if let Some(p) = overridden {
        return match w.host.probe(p) {
            Probe::Block => Some((p.to_path_buf(), DiskSource::BlockPvc)),
            Probe::File => Some((p.to_path_buf(), DiskSource::FilePvc)),
            found => {
                w.error(path, format!("{} (given with --volume {name}=...) is {}; give a block device or a disk image file", p.display(), describe(found)));
                None
            }
        };
    }
    // `name` is a DNS-1123 label (checked before): one component.
    let (block, block_found) = w.host.probe_in_root(&paths.block_dir, Path::new(name));
    let (file, file_found) = w
        .host
        .probe_in_root(&paths.fs_dir, &Path::new(name).join("disk.img"));
    match (block_found, file_found) {
        (Probe::Block, _) => Some((block, DiskSource::BlockPvc)),
        (_, Probe::File) => Some((file, DiskSource::FilePvc)),
        _ => {
            let (block, file) = (
                paths.block_dir.join(name),
                paths.fs_dir.join(name).join("disk.img"),
            );
            w.error(
                path,
                format!(
                    "the PVC is at neither {} (volumeMode: Block: add it to the pod's volumeDevices with that devicePath) nor {} (volumeMode: Filesystem: mount it at {} with a disk.img in it); or give podvm --volume {name}=PATH",
                    block.display(),
                    file.display(),
                    paths.fs_dir.join(name).display()
                ),
            );
            None
        }
    }
}

/// A disk's `capacity`: more than 0, rounded up to whole sectors, at most
/// [`MAX_EMPTY_DISK_BYTES`]. `None` (with an error when it was given) otherwise.
fn capacity(w: &mut Walk, src: &Map<String, Value>, path: &str) -> Option<u64> {
    let field = join(path, "capacity");
    match w.quantity(src, path, "capacity")? {
        0 => {
            w.error(&field, "must be more than 0");
            None
        }
        bytes => match bytes
            .checked_next_multiple_of(512)
            .filter(|c| *c <= MAX_EMPTY_DISK_BYTES)
        {
            Some(rounded) => Some(rounded),
            None => {
                w.error(
                    &field,
                    format!("{bytes} bytes is larger than a disk file can be ({MAX_EMPTY_DISK_BYTES} bytes, about 8Ei); give a size such as 10Gi"),
                );
                None
            }
        },
    }
}

/// A hostDisk, as KubeVirt runs one: the node's directory of `path` is mounted in the pod
/// at `<fs_dir>/<volume name>/` (a hostPath volume) and the disk is the file of `path`'s
/// base name there; `DiskOrCreate` makes it, sparse, of `capacity`, when it is missing.
fn host_disk(
    w: &mut Walk,
    path: &str,
    value: &Value,
    name: &str,
    paths: &Paths,
    overridden: Option<&Path>,
) -> Option<(PathBuf, DiskSource)> {
    let src = w.object(path, value, |k| match k {
        "path" | "type" | "capacity" | "shared" => Some(Key::Use),
        _ => None,
    })?;
    let text = w.string(src, path, "path");
    let create = match w.string(src, path, "type") {
        Some("Disk") => false,
        Some("DiskOrCreate") => true,
        Some(other) => {
            w.error(
                &join(path, "type"),
                format!("{other:?} is not a hostDisk type; use Disk (the image exists) or DiskOrCreate (podvm makes it when it is missing)"),
            );
            return None;
        }
        None => {
            w.error(&join(path, "type"), "required: Disk or DiskOrCreate");
            return None;
        }
    };
    let shared = w.boolean(src, path, "shared").unwrap_or(false);
    let capacity = if src.get("capacity").is_some_and(|c| !c.is_null()) {
        Some(capacity(w, src, path)?)
    } else {
        None
    };
    let Some(text) = text else {
        w.error(
            &join(path, "path"),
            "required: the image's path on the node",
        );
        return None;
    };
    // Only the base name counts: the node's directory is what is mounted.
    let base = match Path::new(text).components().next_back() {
        Some(std::path::Component::Normal(base))
            if text.starts_with('/') && !text.ends_with('/') =>
        {
            PathBuf::from(base)
        }
        _ => {
            w.error(
                &join(path, "path"),
                format!("{text:?} is not an absolute path to a file; give the image's path on the node, such as /data/disk.img"),
            );
            return None;
        }
    };
    let dir = paths.fs_dir.join(name);
    let (image, found) = match overridden {
        Some(p) => (p.to_path_buf(), w.host.probe(p)),
        None => w
            .host
            .probe_in_root(&paths.fs_dir, &Path::new(name).join(&base)),
    };
    let dir_found = match overridden {
        Some(p) => p.parent().map_or(Probe::Missing, |d| w.host.probe(d)),
        None => w.host.probe_in_root(&paths.fs_dir, Path::new(name)).1,
    };
    let mount = format!("mount the node's directory of {text} at {} (a hostPath volume, as KubeVirt's virt-launcher has it) or give podvm --volume {name}=PATH", dir.display());
    match (found, create, capacity) {
        (Probe::File | Probe::Block, ..) => Some((
            image,
            DiskSource::HostDisk {
                create: None,
                shared,
            },
        )),
        (Probe::Missing, true, Some(capacity)) if dir_found == Probe::Dir => Some((
            image,
            DiskSource::HostDisk {
                create: Some(capacity),
                shared,
            },
        )),
        (Probe::Missing, true, None) => {
            w.error(
                &join(path, "capacity"),
                "required with type DiskOrCreate: the size of the image podvm makes, e.g. 10Gi",
            );
            None
        }
        (Probe::Missing, true, Some(_)) => {
            w.error(
                path,
                format!("{} is {}; {mount}", dir.display(), describe(dir_found)),
            );
            None
        }
        (found, ..) => {
            w.error(
                path,
                format!("{} is {}; {mount}", image.display(), describe(found)),
            );
            None
        }
    }
}

fn container_disk(
    w: &mut Walk,
    path: &str,
    value: &Value,
    name: &str,
    paths: &Paths,
    overridden: Option<&Path>,
) -> Option<PathBuf> {
    let src = w.object(path, value, |k| match k {
        "image" | "path" => Some(Key::Use),
        "imagePullPolicy" | "imagePullSecret" => Some(Key::Ignore(
            "the kubelet pulls images; podvm reads the disk where the image is mounted",
        )),
        _ => None,
    })?;
    if w.string(src, path, "image").is_none() {
        w.error(&join(path, "image"), "required");
    }
    let inner = w.string(src, path, "path").map(str::to_string);
    // `name` is a DNS-1123 label (checked before): one component.
    let mount = paths.container_disk_dir.join(name);
    if let Some(p) = overridden {
        return match w.host.probe(p) {
            Probe::File | Probe::Block => Some(p.to_path_buf()),
            found => {
                w.error(
                    path,
                    format!("the disk image {} is {}", p.display(), describe(found)),
                );
                None
            }
        };
    }
    let rel = match inner {
        Some(inner) => match beneath::relative(&inner) {
            Ok(rel) => rel,
            Err(e) => {
                w.error(
                    &join(path, "path"),
                    format!("{e}; give the disk's path inside the containerDisk image"),
                );
                return None;
            }
        },
        None => {
            // KubeVirt's containerDisk convention: the image's one file under /disk.
            let dir = mount.join("disk");
            match w.host.files_in(&dir).as_deref() {
                Some([one]) => match one.file_name() {
                    Some(file) => Path::new("disk").join(file),
                    None => return None,
                },
                Some(files) => {
                    w.error(
                        path,
                        format!(
                            "{} holds {} files; a containerDisk image holds one disk under /disk (or name it with path:)",
                            dir.display(),
                            files.len()
                        ),
                    );
                    return None;
                }
                None => {
                    w.error(
                        path,
                        format!(
                            "{} is missing; mount the containerDisk's image at {} (e.g. an image volume) or give podvm --volume {name}=PATH",
                            dir.display(),
                            mount.display()
                        ),
                    );
                    return None;
                }
            }
        }
    };
    match w.host.probe_in_root(&mount, &rel) {
        (image, Probe::File | Probe::Block) => Some(image),
        (image, found) => {
            w.error(
                path,
                format!(
                    "the disk image {} is {} (symlinks resolve inside {})",
                    image.display(),
                    describe(found),
                    mount.display()
                ),
            );
            None
        }
    }
}

fn cloud_init(
    w: &mut Walk,
    path: &str,
    value: &Value,
    name: &str,
    namespace: &str,
    hostname: Option<&str>,
) -> Option<Seed> {
    let src = w.object(path, value, |k| match k {
        "userData" | "userDataBase64" | "networkData" | "networkDataBase64" => Some(Key::Use),
        "secretRef" | "networkDataSecretRef" => Some(Key::Refuse(
            "is not supported; give userData/networkData (or their Base64 forms) inline",
        )),
        _ => None,
    })?;
    let mut data = |plain: &str, encoded: &str| -> Option<Vec<u8>> {
        let text = w.string(src, path, plain).map(|s| s.as_bytes().to_vec());
        let b64 = w.string(src, path, encoded).map(str::to_string);
        match (text, b64) {
            (Some(_), Some(_)) => {
                w.error(path, format!("give {plain} or {encoded}, not both"));
                None
            }
            (Some(t), None) => Some(t),
            (None, Some(b)) => {
                use base64::Engine;
                let cleaned: String = b.split_whitespace().collect();
                match base64::engine::general_purpose::STANDARD.decode(cleaned) {
                    Ok(bytes) => Some(bytes),
                    Err(e) => {
                        w.error(&join(path, encoded), format!("is not valid base64: {e}"));
                        None
                    }
                }
            }
            (None, None) => None,
        }
    };
    let user = data("userData", "userDataBase64");
    let network = data("networkData", "networkDataBase64");
    let Some(user_data) = user else {
        if !w.errors.iter().any(|e| e.path.starts_with(path)) {
            w.error(
                path,
                "give userData or userDataBase64 (the guest's cloud-init user-data)",
            );
        }
        return None;
    };
    let meta_data = format!(
        "instance-id: {name}.{namespace}\nlocal-hostname: {}\n",
        hostname.unwrap_or(name)
    )
    .into_bytes();
    Some(Seed {
        user_data,
        meta_data,
        network_config: network,
    })
}

fn disks(
    w: &mut Walk,
    devices: &Map<String, Value>,
    mut volumes: BTreeMap<String, Volume>,
) -> (Vec<DiskConfig>, Vec<PlannedDisk>) {
    let base = "spec.domain.devices.disks";
    let mut seen = HashSet::new();
    let mut boot_orders: BTreeMap<u64, usize> = BTreeMap::new();
    let mut out: Vec<(Option<u64>, DiskConfig, PlannedDisk)> = Vec::new();
    for (i, d) in w
        .array(devices, "spec.domain.devices", "disks")
        .to_vec()
        .iter()
        .enumerate()
    {
        let path = format!("{base}[{i}]");
        let Some(disk) = w.object(&path, d, |k| match k {
            "name" | "disk" | "serial" | "bootOrder" | "cache" | "io" => Some(Key::Use),
            "dedicatedIOThread" => Some(Key::Ignore(
                "podvm serves every disk from its event loop (io_uring)",
            )),
            "tag" => Some(Key::Ignore("podvm has no guest agent to report it")),
            "errorPolicy" => Some(Key::Ignore(
                "podvm reports I/O errors to the guest (KubeVirt's \"report\")",
            )),
            "cdrom" | "lun" | "floppy" => {
                Some(Key::Refuse("is not supported; use disk: {bus: virtio}"))
            }
            "blockSize" => Some(Key::Refuse(
                "is not supported; podvm's disks have 512-byte logical sectors",
            )),
            "shareable" => Some(Key::Refuse("is not supported; a disk belongs to one VM")),
            _ => None,
        }) else {
            continue;
        };
        let Some(name) = w.name(disk, &path, &mut seen) else {
            continue;
        };
        let mut read_only = false;
        if let Some(target) = disk.get("disk") {
            let tp = join(&path, "disk");
            if let Some(target) = w.object(&tp, target, |k| match k {
                "bus" | "readonly" => Some(Key::Use),
                "pciAddress" => Some(Key::Refuse(
                    "is not supported; podvm's disks are virtio-mmio devices",
                )),
                _ => None,
            }) {
                match w.string(target, &tp, "bus") {
                    None | Some("virtio") => {}
                    Some(bus) => w.error(
                        &join(&tp, "bus"),
                        format!("{bus} is not supported; use virtio"),
                    ),
                }
                read_only = w.boolean(target, &tp, "readonly").unwrap_or(false);
            }
        }
        let serial = w.string(disk, &path, "serial").map(str::to_string);
        if let Some(s) = &serial {
            let printable = s.bytes().all(|b| (0x21..0x7f).contains(&b) && b != b',');
            if s.len() > MAX_SERIAL_LEN || !printable {
                w.error(
                    &join(&path, "serial"),
                    format!("{s:?}: use at most {MAX_SERIAL_LEN} printable ASCII characters without spaces or commas"),
                );
            }
        }
        let boot_order = w.unsigned(disk, &path, "bootOrder");
        if let Some(order) = boot_order {
            if order == 0 {
                w.error(&join(&path, "bootOrder"), "must be 1 or more");
            } else if let Some(other) = boot_orders.insert(order, i) {
                w.error(
                    &join(&path, "bootOrder"),
                    format!(
                        "{order} is also the bootOrder of {base}[{other}]; give each disk its own"
                    ),
                );
            }
        }
        let direct = match w.string(disk, &path, "cache") {
            None => None,
            Some("none") => Some(true),
            Some("writeback") => Some(false),
            Some(other) => {
                w.error(&join(&path, "cache"), format!("{other} is not supported; use none (O_DIRECT) or writeback (the page cache), both honour the guest's flushes"));
                None
            }
        };
        let io_engine = match w.string(disk, &path, "io") {
            None | Some("default") | Some("native") => IoEngine::default(),
            Some("threads") => IoEngine::Sync,
            Some(other) => {
                w.error(
                    &join(&path, "io"),
                    format!("{other} is not supported; use native (io_uring) or threads"),
                );
                IoEngine::default()
            }
        };
        let Some(volume) = volumes.get_mut(name) else {
            w.error(
                &join(&path, "name"),
                format!("no volume named {name:?} in spec.volumes; a disk uses the volume of the same name"),
            );
            continue;
        };
        if volume.used {
            continue; // names are unique, so this cannot happen twice
        }
        volume.used = true;
        let read_only = read_only || volume.read_only;
        let source = match (&volume.source, read_only) {
            (DiskSource::ContainerDisk { image, .. }, true) => DiskSource::ContainerDisk {
                image: image.clone(),
                copy: false,
            },
            (s, _) => s.clone(),
        };
        let path_on_host = match &source {
            DiskSource::ContainerDisk { image, copy: false } => image.clone(),
            _ => volume.path.clone(),
        };
        out.push((
            boot_order,
            DiskConfig {
                path: path_on_host,
                read_only,
                direct,
                serial,
                io_engine,
            },
            PlannedDisk {
                name: name.to_string(),
                source,
            },
        ));
    }
    for (name, volume) in &volumes {
        if !volume.used && !volume.path.as_os_str().is_empty() {
            w.error(
                &format!("spec.volumes[{}]", volume.index),
                format!("{name:?} is not used by any disk; add a disk named {name:?} to spec.domain.devices.disks or remove the volume"),
            );
        }
    }
    // Disks with a boot order first (lowest first, so it is vda), then the rest in spec order.
    out.sort_by_key(|(order, ..)| order.unwrap_or(u64::MAX));
    out.into_iter().map(|(_, c, p)| (c, p)).unzip()
}

fn interfaces(
    w: &mut Walk,
    devices: &Map<String, Value>,
    spec: &Map<String, Value>,
) -> (Vec<NicConfig>, Vec<PlannedNic>) {
    // Networks first: name -> pod network.
    let mut networks: BTreeMap<String, (usize, bool)> = BTreeMap::new();
    // Networks already reported as wrong: their interfaces need no second error.
    let mut refused = HashSet::new();
    let mut seen = HashSet::new();
    for (i, n) in w
        .array(spec, "spec", "networks")
        .to_vec()
        .iter()
        .enumerate()
    {
        let path = format!("spec.networks[{i}]");
        let Some(net) = w.object(&path, n, |k| match k {
            "name" | "pod" => Some(Key::Use),
            "multus" => Some(Key::Refuse(
                "is not supported; podvm's NIC is on the pod network: use pod: {}",
            )),
            _ => None,
        }) else {
            continue;
        };
        let Some(name) = w.name(net, &path, &mut seen) else {
            continue;
        };
        match net.get("pod") {
            Some(pod) => {
                let pp = join(&path, "pod");
                if let Some(pod) = w.object(&pp, pod, |k| match k {
                    "vmNetworkCIDR" | "vmIPv6NetworkCIDR" => Some(Key::Use),
                    _ => None,
                }) {
                    for (key, want) in [
                        ("vmNetworkCIDR", "10.0.2.0/24"),
                        ("vmIPv6NetworkCIDR", "fd10:0:2::/120"),
                    ] {
                        if let Some(cidr) = w.string(pod, &pp, key) {
                            if cidr != want {
                                w.error(&join(&pp, key), format!("{cidr} is not supported; podvm's masquerade network is {want} (KubeVirt's default): drop the field"));
                            }
                        }
                    }
                }
                networks.insert(name.to_string(), (i, false));
            }
            None => {
                if net.get("multus").is_none_or(Value::is_null) {
                    w.error(&path, "give the network's source: pod: {}");
                }
                refused.insert(name.to_string());
            }
        }
    }
    if networks.len() > 1 {
        w.error(
            "spec.networks",
            "more than one pod network; a VM has one pod network (KubeVirt allows one too)",
        );
    }
    let base = "spec.domain.devices.interfaces";
    let items = w
        .array(devices, "spec.domain.devices", "interfaces")
        .to_vec();
    let autoattach = w
        .boolean(devices, "spec.domain.devices", "autoattachPodInterface")
        .unwrap_or(true);
    let mut nics = Vec::new();
    let mut planned = Vec::new();
    if items.is_empty() && networks.is_empty() && autoattach && !spec.contains_key("networks") {
        // KubeVirt's default: one interface on the pod network, every port forwarded.
        let mut nic = NicConfig::user();
        if let NetBackendConfig::User { forward_all, .. } = &mut nic.backend {
            *forward_all = true;
        }
        nics.push(nic);
        planned.push(PlannedNic {
            interface: "default".into(),
            network: "default".into(),
        });
        return (nics, planned);
    }
    let mut seen = HashSet::new();
    let mut macs: BTreeMap<[u8; 6], usize> = BTreeMap::new();
    for (i, item) in items.iter().enumerate() {
        let path = format!("{base}[{i}]");
        let Some(iface) = w.object(&path, item, |k| match k {
            "name" | "masquerade" | "ports" | "macAddress" | "model" => Some(Key::Use),
            "tag" => Some(Key::Ignore("podvm has no guest agent to report it")),
            "bridge" | "slirp" | "sriov" | "passt" | "macvtap" | "binding" => Some(Key::Refuse(
                "is not supported; podvm's binding is masquerade: use masquerade: {}",
            )),
            "bootOrder" => Some(Key::Refuse("is not supported; podvm boots the kernel directly, not from the network")),
            "pciAddress" | "acpiIndex" => Some(Key::Refuse("is not supported; podvm's NICs are virtio-mmio devices")),
            "dhcpOptions" => Some(Key::Refuse("is not supported; podvm's DHCP hands out the address, router, MTU and the pod's DNS")),
            "state" => Some(Key::Refuse("is not supported; podvm has no NIC hotplug")),
            _ => None,
        }) else {
            continue;
        };
        let Some(name) = w.name(iface, &path, &mut seen) else {
            continue;
        };
        let binding_refused = ["bridge", "slirp", "sriov", "passt", "macvtap", "binding"]
            .iter()
            .any(|k| iface.get(*k).is_some_and(|v| !v.is_null()));
        match iface.get("masquerade") {
            Some(m) if !m.is_null() => {
                w.object(&join(&path, "masquerade"), m, |_| None);
            }
            _ if binding_refused => {}
            _ => w.error(
                &path,
                "give the binding: masquerade: {} (podvm's only binding)",
            ),
        }
        match w.string(iface, &path, "model") {
            None | Some("virtio") => {}
            Some(model) => w.error(
                &join(&path, "model"),
                format!("{model} is not supported; use virtio"),
            ),
        }
        let mut nic = NicConfig::user();
        if let Some(mac) = w.string(iface, &path, "macAddress") {
            match parse_mac(mac) {
                Some(m) if m[0] & 1 == 0 && m != [0; 6] => {
                    if let Some(other) = macs.insert(m, i) {
                        w.error(&join(&path, "macAddress"), format!("{mac} is also the MAC of {base}[{other}]"));
                    }
                    nic.mac = Some(m);
                }
                Some(_) => w.error(&join(&path, "macAddress"), format!("{mac} is not a unicast address; use one whose first byte is even, such as 52:54:00:xx:xx:xx")),
                None => w.error(&join(&path, "macAddress"), format!("{mac:?} is not a MAC address; write six hex bytes such as 52:54:00:12:34:56")),
            }
        }
        let forwards = ports(w, iface, &path);
        if let NetBackendConfig::User {
            forwards: f,
            forward_all,
            ..
        } = &mut nic.backend
        {
            match forwards {
                Some(list) if !list.is_empty() => *f = list,
                // KubeVirt forwards every port when an interface lists none.
                _ => *forward_all = true,
            }
        }
        match networks.get_mut(name) {
            Some((_, used)) => *used = true,
            None if refused.contains(name) => {}
            None => {
                if !networks.is_empty() || !spec.contains_key("networks") {
                    w.error(&join(&path, "name"), format!("no network named {name:?} in spec.networks; an interface uses the network of the same name (add {{name: {name}, pod: {{}}}})"));
                } else {
                    w.error(
                        &join(&path, "name"),
                        format!("no network named {name:?} in spec.networks"),
                    );
                }
            }
        }
        nics.push(nic);
        planned.push(PlannedNic {
            interface: name.to_string(),
            network: name.to_string(),
        });
    }
    for (name, (i, used)) in &networks {
        if !used {
            w.error(&format!("spec.networks[{i}]"), format!("{name:?} has no interface; add an interface named {name:?} with masquerade: {{}} or remove the network"));
        }
    }
    (nics, planned)
}

fn ports(w: &mut Walk, iface: &Map<String, Value>, path: &str) -> Option<Vec<PortForward>> {
    let list = w.array(iface, path, "ports").to_vec();
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for (i, p) in list.iter().enumerate() {
        let pp = format!("{path}.ports[{i}]");
        let Some(port) = w.object(&pp, p, |k| match k {
            "name" | "protocol" | "port" => Some(Key::Use),
            _ => None,
        }) else {
            continue;
        };
        w.string(port, &pp, "name");
        let proto = match w.string(port, &pp, "protocol") {
            None | Some("TCP") => Proto::Tcp,
            Some("UDP") => Proto::Udp,
            Some(other) => {
                w.error(
                    &join(&pp, "protocol"),
                    format!("{other} is not supported; use TCP or UDP"),
                );
                continue;
            }
        };
        let number = match w.unsigned(port, &pp, "port") {
            Some(n @ 1..=65535) => n as u16,
            Some(n) => {
                w.error(
                    &join(&pp, "port"),
                    format!("{n} is not a port; use 1 to 65535"),
                );
                continue;
            }
            None => {
                w.error(&join(&pp, "port"), "required");
                continue;
            }
        };
        if !seen.insert((proto, number)) {
            w.error(
                &join(&pp, "port"),
                format!("{number}/{proto} is listed twice"),
            );
            continue;
        }
        out.push(PortForward {
            proto,
            host: number,
            guest: number,
        });
    }
    Some(out)
}

fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let sep = if text.contains('-') { '-' } else { ':' };
    let bytes: Vec<u8> = text
        .split(sep)
        .map(|b| {
            (b.len() == 2)
                .then(|| u8::from_str_radix(b, 16).ok())
                .flatten()
        })
        .collect::<Option<_>>()?;
    bytes.try_into().ok()
}

#[cfg(test)]
mod tests;
