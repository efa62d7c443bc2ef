//! Unix sockets podvm listens on (console, API): private to the pod's user, and never
//! stolen from another running podvm.

use std::io;
use std::os::fd::OwnedFd;
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
    let listener = listen_with_mode(path, 0o600).map_err(bind_err)?;
    listener.set_nonblocking(true).map_err(bind_err)?;
    Ok(listener)
}

/// The longest path a unix socket address holds (sun_path less its NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Creates the socket, gives it `mode` while it is still unbound, binds it under a
/// temporary name next to `path`, listens, and only then renames it to `path`. So the path
/// never shows a wider mode (Linux creates a unix socket's file with the socket's own mode,
/// less the umask; a chmod after bind would leave a window for a client with a permissive
/// umask), and a client that sees the path can connect at once (between bind and listen a
/// connect is refused).
fn listen_with_mode(path: &Path, mode: u32) -> io::Result<UnixListener> {
    let socket = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)?;
    // `File::set_permissions` is fchmod(2), which works on any descriptor, sockets included.
    let file = std::fs::File::from(OwnedFd::from(socket));
    file.set_permissions(std::fs::Permissions::from_mode(mode))?;
    let socket = socket2::Socket::from(OwnedFd::from(file));
    let staging = path.file_name().map(|name| {
        let mut staged = std::ffi::OsString::from(format!(".podvm-{}-", std::process::id()));
        staged.push(name);
        path.with_file_name(staged)
    });
    match staging.filter(|s| s.as_os_str().len() <= MAX_SOCKET_PATH) {
        Some(staging) => {
            let _ = std::fs::remove_file(&staging);
            let bound = socket
                .bind(&socket2::SockAddr::unix(&staging)?)
                .and_then(|()| socket.listen(128))
                .and_then(|()| std::fs::rename(&staging, path));
            if let Err(e) = bound {
                let _ = std::fs::remove_file(&staging);
                return Err(e);
            }
        }
        // No room for a longer name: bind in place (the window stays).
        None => {
            socket.bind(&socket2::SockAddr::unix(path)?)?;
            socket.listen(128)?;
        }
    }
    Ok(UnixListener::from(OwnedFd::from(socket)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_is_private_whatever_the_umask() {
        let dir = std::env::temp_dir().join(format!("podvm-sock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s");
        let listener = bind_private("--console", &path).unwrap();
        // Nothing is left under the temporary name.
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(std::fs::metadata(&path).unwrap().file_type().is_socket());
        // A live listener is not stolen.
        let err = bind_private("--console", &path).unwrap_err();
        assert!(matches!(err, SocketError::InUse { .. }), "{err}");
        // A stale one is replaced.
        drop(listener);
        let listener = bind_private("--console", &path).unwrap();
        assert!(UnixStream::connect(&path).is_ok());
        drop(listener);
        // A file of another kind is refused.
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"x").unwrap();
        let err = bind_private("--api-socket", &path).unwrap_err();
        assert!(err.to_string().contains("--api-socket"), "{err}");
        assert!(matches!(err, SocketError::NotASocket { .. }));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
