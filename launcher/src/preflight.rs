//! Checks made before building the VM, each with an error that says how to fix it.

use std::io::Read;
use std::path::{Path, PathBuf};

/// A precondition that does not hold.
#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error("{flag}: {path} does not exist; give the path of a file")]
    Missing { flag: &'static str, path: PathBuf },
    #[error("{flag}: {path} is not a regular file; give the path of a file")]
    NotAFile { flag: &'static str, path: PathBuf },
    #[error("{flag}: cannot read {path}: {source}")]
    Unreadable {
        flag: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--kernel: {path} is neither a bzImage nor an ELF kernel; give a Linux kernel image (e.g. /boot/vmlinuz-*)")]
    NotAKernel { path: PathBuf },
    #[error(
        "--initrd: {path} is {size_mib} MiB, which does not fit in the guest's {memory_mib} MiB \
         of memory; raise --memory or use a smaller initrd"
    )]
    InitrdTooLarge {
        path: PathBuf,
        size_mib: u64,
        memory_mib: u64,
    },
    #[error(
        "this host's /dev/kvm is PVM (kvm_pvm), which runs only PVM-enabled guest kernels: \
         a stock distribution kernel crawls for about a minute and then dies with a KVM internal \
         error. Run podvm on a host with hardware KVM (kvm_intel or kvm_amd), or inside the KVM \
         sandbox (tests/sandbox/run); pass --allow-pvm to run anyway"
    )]
    PvmHost,
}

/// `path` (given with `flag`) must be a readable regular file.
pub fn check_file(flag: &'static str, path: &Path) -> Result<(), PreflightError> {
    let meta = std::fs::metadata(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            PreflightError::Missing {
                flag,
                path: path.into(),
            }
        } else {
            PreflightError::Unreadable {
                flag,
                path: path.into(),
                source,
            }
        }
    })?;
    if !meta.is_file() {
        return Err(PreflightError::NotAFile {
            flag,
            path: path.into(),
        });
    }
    std::fs::File::open(path).map_err(|source| PreflightError::Unreadable {
        flag,
        path: path.into(),
        source,
    })?;
    Ok(())
}

/// The kernel image must look like a bzImage ("HdrS" at 0x202) or an ELF file.
pub fn check_kernel_format(path: &Path) -> Result<(), PreflightError> {
    const HDRS_OFFSET: usize = 0x202;
    let mut head = Vec::with_capacity(HDRS_OFFSET + 4);
    let file = std::fs::File::open(path).map_err(|source| PreflightError::Unreadable {
        flag: "--kernel",
        path: path.into(),
        source,
    })?;
    std::io::Read::take(file, (HDRS_OFFSET + 4) as u64)
        .read_to_end(&mut head)
        .map_err(|source| PreflightError::Unreadable {
            flag: "--kernel",
            path: path.into(),
            source,
        })?;
    let elf = head.starts_with(b"\x7fELF");
    let bzimage = head.get(HDRS_OFFSET..HDRS_OFFSET + 4) == Some(b"HdrS".as_slice());
    if elf || bzimage {
        Ok(())
    } else {
        Err(PreflightError::NotAKernel { path: path.into() })
    }
}

/// An initrd as large as guest memory cannot fit next to the kernel.
pub fn check_initrd_fits(path: &Path, memory_mib: u64) -> Result<(), PreflightError> {
    let size = std::fs::metadata(path)
        .map_err(|source| PreflightError::Unreadable {
            flag: "--initrd",
            path: path.into(),
            source,
        })?
        .len();
    if size >= memory_mib << 20 {
        return Err(PreflightError::InitrdTooLarge {
            path: path.into(),
            size_mib: size.div_ceil(1 << 20),
            memory_mib,
        });
    }
    Ok(())
}

/// Whether this host's KVM is PVM, the software backend that cannot run stock kernels.
pub fn host_kvm_is_pvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preflight_rejects_missing_path_and_directory() {
        let err = check_file("--kernel", Path::new("/nonexistent/vmlinuz")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--kernel: /nonexistent/vmlinuz does not exist; give the path of a file"
        );
        let err = check_file("--initrd", Path::new("/")).unwrap_err();
        assert!(matches!(err, PreflightError::NotAFile { .. }), "{err}");
    }

    #[test]
    fn preflight_rejects_garbage_kernel_and_accepts_elf_and_bzimage() {
        let dir = std::env::temp_dir().join(format!("podvm-preflight-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let garbage = dir.join("garbage");
        std::fs::write(&garbage, vec![0x5a; 4096]).unwrap();
        assert!(matches!(
            check_kernel_format(&garbage),
            Err(PreflightError::NotAKernel { .. })
        ));
        let elf = dir.join("elf");
        std::fs::write(&elf, b"\x7fELF\x02\x01\x01").unwrap();
        assert!(check_kernel_format(&elf).is_ok());
        let mut bz = vec![0u8; 0x300];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        let bzimage = dir.join("bzimage");
        std::fs::write(&bzimage, bz).unwrap();
        assert!(check_kernel_format(&bzimage).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
