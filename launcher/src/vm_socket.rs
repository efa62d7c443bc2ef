//! Connecting to a socket a running VM serves (console, API), with an error that says what
//! is wrong in the user's terms.

use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

/// The VM's socket could not be reached. `what` names the socket, `flag` the `podvm run`
/// option that creates it.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{what} {path}: no such socket; is the VM running with {flag} {path}?")]
    Missing {
        what: &'static str,
        flag: &'static str,
        path: PathBuf,
    },
    #[error("{what} {path}: connection refused; the VM that created it has exited")]
    Refused { what: &'static str, path: PathBuf },
    #[error("{what} {path}: permission denied; connect as the user that runs the VM")]
    Permission { what: &'static str, path: PathBuf },
    #[error("{what} {path}: cannot connect: {source}")]
    Other {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Connects to the socket at `path`.
pub fn connect(
    path: &Path,
    what: &'static str,
    flag: &'static str,
) -> Result<UnixStream, ConnectError> {
    UnixStream::connect(path).map_err(|source| {
        let path = path.to_path_buf();
        match source.kind() {
            io::ErrorKind::NotFound => ConnectError::Missing { what, flag, path },
            io::ErrorKind::ConnectionRefused => ConnectError::Refused { what, path },
            io::ErrorKind::PermissionDenied => ConnectError::Permission { what, path },
            _ => ConnectError::Other { what, path, source },
        }
    })
}
