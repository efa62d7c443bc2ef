//! Unix sockets podvm listens on (console, API): private to the pod's user, and never
//! stolen from another running podvm.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// A socket could not be set up; `flag` names the option that gave the path.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("{flag} {path}: another podvm is listening there; give another path")]
    InUse { flag: &'static str, path: PathBuf },
    #[error("{flag} {path}: exists and is not a socket; remove it or give another path")]
    NotASocket { flag: &'static str, path: PathBuf },
    #[error("{flag} {path}: cannot listen: {source}")]
    Bind {
        flag: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Binds a non-blocking listener at `path` with mode 0600, replacing a stale socket file
/// (one nobody listens on) but never a live one or a file of another kind.
pub fn bind_private(flag: &'static str, path: &Path) -> Result<UnixListener, SocketError> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(SocketError::NotASocket {
                flag,
                path: path.into(),
            });
        }
        if UnixStream::connect(path).is_ok() {
            return Err(SocketError::InUse {
                flag,
                path: path.into(),
            });
        }
        let _ = std::fs::remove_file(path);
    }
    let bind_err = |source| SocketError::Bind {
        flag,
        path: path.into(),
        source,
    };
    let listener = UnixListener::bind(path).map_err(bind_err)?;
    // Tightened before the VM runs, so before there is anything to see or ask.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
    listener.set_nonblocking(true).map_err(bind_err)?;
    Ok(listener)
}
