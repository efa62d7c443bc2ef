//! What a VMI needs on disk before the VM starts: the run directory, emptyDisks, NoCloud
//! seed disks and copies of writable containerDisks. Also the plan as `podvm validate`
//! prints it.

use std::fmt::Write as _;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use vmm::config::{ConsoleConfig, NetBackendConfig};

use super::{DiskSource, Plan};

/// Making a VMI's files failed.
#[derive(Debug, thiserror::Error)]
#[error("{what} {path}: {source}")]
pub struct PrepareError {
    what: &'static str,
    path: PathBuf,
    #[source]
    source: io::Error,
}

fn fail<'p>(what: &'static str, path: &'p Path) -> impl FnOnce(io::Error) -> PrepareError + 'p {
    move |source| PrepareError {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Creates the run directory and the disks podvm makes (each start, like KubeVirt's
/// ephemeral disks).
pub fn prepare(plan: &Plan, run_dir: &Path) -> Result<(), PrepareError> {
    std::fs::create_dir_all(run_dir).map_err(fail("cannot create the run directory", run_dir))?;
    let dir = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(run_dir)
        .map_err(fail("cannot open the run directory", run_dir))?;
    // The console log is vmm's to open (appending, by path); made here first, beneath the
    // run directory without following symlinks, so that a symlink planted in its place is
    // an error rather than the console appended to a file elsewhere.
    if let ConsoleConfig::Socket { log: Some(log), .. } = &plan.config.console {
        if let (Some(parent), Some(name)) = (log.parent(), log.file_name().and_then(|n| n.to_str()))
        {
            if parent == run_dir {
                super::beneath::append_beneath(&dir, name)
                    .map_err(fail("cannot create the console log", log))?;
            }
        }
    }
    for (disk, config) in plan.disks.iter().zip(&plan.config.disks) {
        let path = &config.path;
        let create = || create_file(&dir, run_dir, path);
        match &disk.source {
            DiskSource::BlockPvc | DiskSource::FilePvc => {}
            DiskSource::HostDisk { create: None, .. } => {}
            DiskSource::HostDisk {
                create: Some(capacity),
                ..
            } => {
                let file = create_new(path).map_err(fail("cannot create the hostDisk", path))?;
                file.set_len(*capacity)
                    .map_err(fail("cannot size the hostDisk", path))?;
                file.sync_all()
                    .map_err(fail("cannot sync the hostDisk", path))?;
            }
            DiskSource::ContainerDisk { copy: false, .. } => {}
            DiskSource::EmptyDisk { capacity } => {
                let file = create().map_err(fail("cannot create the emptyDisk", path))?;
                file.set_len(*capacity)
                    .map_err(fail("cannot size the emptyDisk", path))?;
            }
            DiskSource::CloudInit(seed) => {
                let file =
                    create().map_err(fail("cannot create the cloud-init seed disk", path))?;
                seed.write(file)
                    .map_err(fail("cannot write the cloud-init seed disk", path))?;
            }
            DiskSource::ContainerDisk { image, copy: true } => {
                let file = create().map_err(fail("cannot create the containerDisk copy", path))?;
                copy_sparse(image, file).map_err(fail("cannot copy the containerDisk to", path))?;
            }
        }
    }
    Ok(())
}

/// `path` created (mode 0600) or truncated, for reading and writing. A file of the run
/// directory `dir` (what a VMI's volume names) is made beneath it following no symlink, so a
/// symlink planted there cannot make podvm truncate a file elsewhere; a path the operator
/// chose with `--volume` is opened as given.
fn create_file(dir: &std::fs::File, run_dir: &Path, path: &Path) -> io::Result<std::fs::File> {
    match (path.parent(), path.file_name().and_then(|n| n.to_str())) {
        (Some(parent), Some(name)) if parent == run_dir => {
            super::beneath::create_beneath(dir, name)
        }
        _ => std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path),
    }
}

/// `path` made anew (mode 0600), in its directory without following a symlink: an existing
/// file or symlink there (one that appeared since the plan looked) is an error, never
/// truncated or written through.
fn create_new(path: &Path) -> io::Result<std::fs::File> {
    let (Some(parent), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str()))
    else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a file path",
        ));
    };
    let dir = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(parent)?;
    super::beneath::create_new_beneath(&dir, name)
}

/// Copies `from` into `dst` (empty), leaving holes where `from` has them
/// (SEEK_DATA/SEEK_HOLE), and syncs it.
pub fn copy_sparse(from: &Path, mut dst: std::fs::File) -> io::Result<()> {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut src = std::fs::File::open(from)?;
    let len = src.metadata()?.len();
    dst.set_len(len)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut offset = 0u64;
    while offset < len {
        let data = match seek(&src, offset, libc::SEEK_DATA) {
            Ok(d) => d,
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => break, // only a hole is left
            Err(e) => return Err(e),
        };
        let hole = seek(&src, data, libc::SEEK_HOLE)?.min(len);
        src.seek(SeekFrom::Start(data))?;
        dst.seek(SeekFrom::Start(data))?;
        let mut left = hole - data;
        while left > 0 {
            let n = (left as usize).min(buf.len());
            src.read_exact(&mut buf[..n])?;
            dst.write_all(&buf[..n])?;
            left -= n as u64;
        }
        offset = hole;
    }
    dst.sync_all()
}

fn seek(file: &std::fs::File, offset: u64, whence: i32) -> io::Result<u64> {
    use std::os::fd::AsRawFd;
    // SAFETY: lseek on a file descriptor this function borrows; no memory is passed.
    let r = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, whence) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as u64)
    }
}

fn size(bytes: u64) -> String {
    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;
    if bytes.is_multiple_of(GIB) {
        format!("{} GiB", bytes / GIB)
    } else if bytes.is_multiple_of(MIB) {
        format!("{} MiB", bytes / MIB)
    } else {
        format!("{bytes} bytes")
    }
}

/// The VM a plan runs, for people: `podvm validate` prints this.
pub fn describe(plan: &Plan) -> String {
    let c = &plan.config;
    let mut out = String::new();
    let (s, co, t) = plan.topology;
    let _ = writeln!(
        out,
        "VirtualMachineInstance {}/{}: valid; podvm would run:",
        plan.namespace, plan.name
    );
    let _ = writeln!(
        out,
        "  vcpus:    {} ({s} socket{} x {co} core{} x {t} thread{})",
        c.vcpus,
        if s == 1 { "" } else { "s" },
        if co == 1 { "" } else { "s" },
        if t == 1 { "" } else { "s" }
    );
    let _ = writeln!(out, "  memory:   {} MiB", c.memory_mib);
    let _ = writeln!(out, "  kernel:   {}", c.kernel.display());
    if let Some(initrd) = &c.initrd {
        let _ = writeln!(out, "  initrd:   {}", initrd.display());
    }
    let _ = writeln!(out, "  cmdline:  {}", c.cmdline);
    for (i, (disk, config)) in plan.disks.iter().zip(&c.disks).enumerate() {
        let dev = format!("vd{}", (b'a' + i as u8) as char);
        let what = match &disk.source {
            DiskSource::BlockPvc => "block PVC".to_string(),
            DiskSource::FilePvc => "filesystem PVC".to_string(),
            DiskSource::HostDisk { create: None, .. } => "hostDisk".to_string(),
            DiskSource::HostDisk { create: Some(capacity), .. } => {
                format!("hostDisk, made at start ({}, sparse; kept from then on)", size(*capacity))
            }
            DiskSource::EmptyDisk { capacity } => format!("emptyDisk of {}, made at start", size(*capacity)),
            DiskSource::CloudInit(seed) => format!(
                "cloudInitNoCloud seed ({}, FAT, label CIDATA: user-data, meta-data{}), made at start",
                size(seed.image_size()),
                if seed.network_config.is_some() { ", network-config" } else { "" }
            ),
            DiskSource::ContainerDisk { image, copy: true } => {
                format!("containerDisk, copied at start from {}", image.display())
            }
            DiskSource::ContainerDisk { copy: false, .. } => "containerDisk, used in place".to_string(),
        };
        let mut mode = vec![if config.read_only {
            "read-only"
        } else {
            "read-write"
        }
        .to_string()];
        match config.direct {
            Some(true) => mode.push("cache none (O_DIRECT)".into()),
            Some(false) => mode.push("cache writeback".into()),
            None => {}
        }
        if let Some(serial) = &config.serial {
            mode.push(format!("serial {serial}"));
        }
        let _ = writeln!(
            out,
            "  disk {dev}: {:?}: {what}: {} ({})",
            disk.name,
            config.path.display(),
            mode.join(", ")
        );
    }
    for (i, (nic, config)) in plan.nics.iter().zip(&c.nics).enumerate() {
        let ports = match &config.backend {
            NetBackendConfig::User {
                forward_all: true, ..
            } => "every pod port forwarded".to_string(),
            NetBackendConfig::User { forwards, .. } => forwards
                .iter()
                .map(|f| format!("{}/{}", f.host, f.proto))
                .collect::<Vec<_>>()
                .join(", "),
            NetBackendConfig::Tap { name, .. } => format!("tap {name}"),
        };
        let _ = writeln!(
            out,
            "  nic eth{i}: {:?}: masquerade on the pod network (guest 10.0.2.2/24, gateway 10.0.2.1), mac {}, ports: {ports}",
            nic.interface,
            vmm::config::format_mac(c.nic_mac(i))
        );
    }
    if plan.rng {
        let _ = writeln!(out, "  rng:      virtio-rng");
    }
    match &c.console {
        ConsoleConfig::Socket { path, log, .. } => {
            let _ = write!(
                out,
                "  console:  {} (podvm console {})",
                path.display(),
                path.display()
            );
            if let Some(log) = log {
                let _ = write!(out, ", logged to {}", log.display());
            }
            out.push('\n');
        }
        ConsoleConfig::Off => out.push_str("  console:  none\n"),
        ConsoleConfig::Stdio => out.push_str("  console:  podvm's stdio\n"),
    }
    if let Some(api) = &c.api_socket {
        let _ = writeln!(out, "  api:      {}", api.display());
    }
    let _ = writeln!(
        out,
        "  shutdown: the guest has {} s to power off after SIGTERM",
        c.shutdown_timeout.as_secs()
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_copy_keeps_data_and_holes() {
        let dir = std::env::temp_dir().join(format!("podvm-copy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let from = dir.join("from");
        let to = dir.join("to");
        {
            use std::io::{Seek, SeekFrom, Write};
            let mut f = std::fs::File::create(&from).unwrap();
            f.set_len(64 << 20).unwrap();
            f.write_all(b"head").unwrap();
            f.seek(SeekFrom::Start(40 << 20)).unwrap();
            f.write_all(&[7u8; 8192]).unwrap();
        }
        copy_sparse(&from, std::fs::File::create(&to).unwrap()).unwrap();
        assert_eq!(std::fs::read(&from).unwrap(), std::fs::read(&to).unwrap());
        use std::os::unix::fs::MetadataExt;
        let blocks = std::fs::metadata(&to).unwrap().blocks();
        assert!(
            blocks * 512 < 4 << 20,
            "the copy is not sparse: {blocks} blocks"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
