//! Checks made before building the VM, each with an error that says how to fix it.

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
}
