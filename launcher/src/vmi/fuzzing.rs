//! The fuzz entry point for the VMI mapping (`launcher/fuzz`, target `vmi_parse`): YAML or
//! JSON text through [`parse_document`] and [`plan`] against a made-up host, so nothing
//! touches the file system, and the invariants any input must keep.

use std::path::{Path, PathBuf};

use super::{parse_document, plan, prepare, DiskSource, Errors, Host, Paths, Probe};

/// A host with a kernel, an initrd, a block PVC `rootdisk`, a filesystem PVC `data` and a
/// containerDisk `cd`, at the default paths: enough for specs to map fully.
pub struct FuzzHost;

const BLOCK: &[&str] = &["/dev/rootdisk"];
const FILES: &[&str] = &[
    "/boot/vmlinuz",
    "/boot/initrd.img",
    "/var/run/kubevirt-private/vmi-disks/data/disk.img",
    "/var/run/kubevirt/container-disks/cd/disk/fedora.img",
];

impl Host for FuzzHost {
    fn probe(&self, path: &Path) -> Probe {
        let Some(p) = path.to_str() else {
            return Probe::Missing;
        };
        if BLOCK.contains(&p) {
            Probe::Block
        } else if FILES.contains(&p) {
            Probe::File
        } else if FILES.iter().any(|f| f.starts_with(&format!("{p}/"))) {
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
        let prefix = format!("{}/", dir.to_str()?);
        let found: Vec<PathBuf> = FILES
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

/// Maps `data` (if it is UTF-8) and checks: no panic; every error names a field; a plan's
/// config validates, its kernel, initrd and disks stay beneath their roots, the files podvm
/// would make are distinct and directly in the run directory, and it describes itself.
pub fn fuzz_vmi(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let paths = Paths::default();
    let result = parse_document(text).and_then(|doc| plan(&doc, &paths, &FuzzHost));
    let plan = match result {
        Ok(plan) => plan,
        Err(Errors(errors)) => {
            assert!(!errors.is_empty());
            for e in &errors {
                assert!(!e.path.is_empty() && !e.message.is_empty(), "{e:?}");
            }
            let _ = Errors(errors).to_string();
            return;
        }
    };
    plan.config.validate().expect("a plan's config validates");
    assert!(plan.config.kernel.starts_with(&paths.kernel_boot_root));
    assert!(plan
        .config
        .initrd
        .as_ref()
        .is_none_or(|i| i.starts_with(&paths.kernel_boot_root)));
    assert_eq!(plan.disks.len(), plan.config.disks.len());
    let mut made = std::collections::BTreeSet::new();
    for (disk, config) in plan.disks.iter().zip(&plan.config.disks) {
        assert!(super::is_dns1123_label(&disk.name), "{:?}", disk.name);
        match &disk.source {
            DiskSource::EmptyDisk { .. }
            | DiskSource::CloudInit(_)
            | DiskSource::ContainerDisk { copy: true, .. } => {
                assert_eq!(config.path.parent(), Some(paths.run_dir.as_path()));
                assert!(made.insert(config.path.clone()), "{:?} twice", config.path);
            }
            DiskSource::HostDisk { create, .. } => {
                assert!(config.path.starts_with(&paths.fs_dir));
                assert!(create.is_none_or(|c| c > 0 && c % 512 == 0));
            }
            DiskSource::BlockPvc | DiskSource::FilePvc | DiskSource::ContainerDisk { .. } => {
                assert!(FILES
                    .iter()
                    .chain(BLOCK)
                    .any(|f| config.path == Path::new(f)));
            }
        }
        if let DiskSource::EmptyDisk { capacity } = disk.source {
            assert!(capacity > 0 && capacity % 512 == 0 && capacity <= super::MAX_EMPTY_DISK_BYTES);
        }
    }
    let _ = prepare::describe(&plan);
}

#[cfg(test)]
mod corpus {
    /// Replays the committed fuzz corpus, so every test run covers the seeds and past finds.
    #[test]
    fn vmi_fuzz_corpus_replays_cleanly() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/vmi_parse");
        devices::fuzz_replay::replay_dir(&dir, super::fuzz_vmi);
    }
}
