//! Paths from the spec, kept beneath their roots. A VMI is untrusted input: its volume names
//! become file names in the run directory and under the PVC and containerDisk directories,
//! its `kernelPath`, `initrdPath` and containerDisk `path` name files inside a mounted image.
//! [`relative`] is the one way spec text becomes such a path (no `..`, no NUL, a leading `/`
//! meaning the root); the file system is then walked with `openat2`, so that no symlink
//! leads out of the root either:
//!
//! - files podvm reads ([`open_in_root`]) resolve as if the root were `/`
//!   (`RESOLVE_IN_ROOT`): a mounted image's absolute symlinks stay inside the image, and a
//!   `..` in a symlink stops at the root;
//! - files podvm creates or truncates in the run directory ([`create_beneath`]) follow no
//!   symlink at all (`RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`).
//!
//! Where the kernel has no `openat2` (before 5.6) or a seccomp profile refuses it, the
//! same guarantees come from resolving the path and checking that it stays under the
//! root, and from `O_NOFOLLOW` on a single file name.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};

/// `text`, a path from the spec, as a relative path without `.` or empty components: a
/// leading `/` means the root. Refuses `..` and NUL, and a path naming the root itself.
pub fn relative(text: &str) -> Result<PathBuf, String> {
    if text.contains('\0') {
        return Err(format!("{text:?} holds a NUL byte"));
    }
    let mut out = PathBuf::new();
    for c in Path::new(text).components() {
        match c {
            Component::Normal(part) => out.push(part),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir => {
                return Err(format!(
                "{text:?} has a `..` component, which would leave the directory it is looked up in"
            ))
            }
            Component::Prefix(_) => return Err(format!("{text:?} is not a Unix path")),
        }
    }
    if out.as_os_str().is_empty() {
        return Err(format!("{text:?} names no file"));
    }
    Ok(out)
}

/// `text` (see [`relative`]) as a path under `root`.
pub fn beneath(root: &Path, text: &str) -> Result<PathBuf, String> {
    Ok(root.join(relative(text)?))
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

/// `openat2(dir, path, how)`: the descriptor it opens.
fn openat2(dir: &File, path: &Path, flags: i32, mode: u32, resolve: u64) -> io::Result<OwnedFd> {
    let path = c_path(path)?;
    // SAFETY: open_how is plain data; all-zero is its "no options" value.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.mode = u64::from(mode);
    how.resolve = resolve;
    // SAFETY: `path` is a NUL-terminated string and `how` an open_how, both alive for the
    // call, which reads them and passes their size; `dir` is an open descriptor this
    // function borrows. The kernel returns a new descriptor or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            path.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Whether `e` says openat2 cannot be used here at all (old kernel, a seccomp profile).
fn no_openat2(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::EPERM))
}

/// A file or device found in a root.
#[derive(Debug)]
pub struct Found {
    /// Where it is: `root/rel` when no symlink was followed, else the resolved path (which
    /// has none left to follow).
    pub path: PathBuf,
    pub metadata: std::fs::Metadata,
}

/// Why [`open_in_root`] found nothing.
#[derive(Debug)]
pub enum NotFound {
    /// Nothing there (or the root itself is missing).
    Missing,
    /// Only the fallback can say this: the path resolves out of the root.
    Escapes(PathBuf),
    /// Anything else: permission denied, an I/O error.
    Other,
}

fn missing_or(e: io::Error) -> NotFound {
    match e.raw_os_error() {
        Some(libc::ENOENT | libc::ENOTDIR) => NotFound::Missing,
        _ => NotFound::Other,
    }
}

/// What `rel` (from [`relative`]) is under `root`, resolved as if `root` were `/`.
pub fn open_in_root(root: &Path, rel: &Path) -> Result<Found, NotFound> {
    let dir = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
        .open(root)
        .map_err(missing_or)?;
    let joined = root.join(rel);
    let o_path = libc::O_PATH;
    // First without following any symlink: the common case keeps the path as given.
    let (fd, path) = match openat2(
        &dir,
        rel,
        o_path,
        0,
        libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_SYMLINKS,
    ) {
        Ok(fd) => (fd, joined),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            let fd = openat2(
                &dir,
                rel,
                o_path,
                0,
                libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS,
            )
            .map_err(missing_or)?;
            let resolved = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
                .map_err(|_| NotFound::Other)?;
            (fd, resolved)
        }
        Err(e) if no_openat2(&e) => return resolve_by_path(root, &joined),
        Err(e) => return Err(missing_or(e)),
    };
    let metadata = File::from(fd).metadata().map_err(|_| NotFound::Other)?;
    Ok(Found { path, metadata })
}

/// [`open_in_root`] without openat2: the canonical path, which must stay under the root's.
fn resolve_by_path(root: &Path, joined: &Path) -> Result<Found, NotFound> {
    let root = std::fs::canonicalize(root).map_err(missing_or)?;
    let path = std::fs::canonicalize(joined).map_err(missing_or)?;
    if !path.starts_with(&root) {
        return Err(NotFound::Escapes(path));
    }
    let metadata = std::fs::metadata(&path).map_err(missing_or)?;
    Ok(Found { path, metadata })
}

/// Creates `name` (one file name, no `/`) in the directory `dir` for reading and writing,
/// or truncates it, mode 0600, following no symlink: a symlink planted at `name` is an
/// error (ELOOP), not a file written elsewhere.
pub fn create_beneath(dir: &File, name: &str) -> io::Result<File> {
    create_in(dir, name, libc::O_TRUNC)
}

/// Like [`create_beneath`], but `name` must not exist yet (O_EXCL): nothing is truncated.
pub fn create_new_beneath(dir: &File, name: &str) -> io::Result<File> {
    create_in(dir, name, libc::O_EXCL)
}

/// Like [`create_beneath`], but an existing `name` is kept and written at its end.
pub fn append_beneath(dir: &File, name: &str) -> io::Result<File> {
    create_in(dir, name, libc::O_APPEND)
}

fn create_in(dir: &File, name: &str, extra: i32) -> io::Result<File> {
    if name.contains('/') || name == ".." || name == "." || name.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a file name"),
        ));
    }
    let flags = libc::O_RDWR | libc::O_CREAT | libc::O_NOFOLLOW | extra;
    match openat2(
        dir,
        Path::new(name),
        flags,
        0o600,
        libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS,
    ) {
        Ok(fd) => Ok(File::from(fd)),
        Err(e) if no_openat2(&e) => {
            // One component, O_NOFOLLOW: the same guarantee with openat.
            let c = c_path(Path::new(name))?;
            // SAFETY: `c` is NUL-terminated and alive for the call; `dir` is an open
            // descriptor this function borrows.
            let fd = unsafe {
                libc::openat(
                    dir.as_raw_fd(),
                    c.as_ptr(),
                    flags | libc::O_CLOEXEC,
                    0o600 as libc::c_uint,
                )
            };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: the kernel just returned this descriptor; nothing else owns it.
            Ok(unsafe { File::from_raw_fd(fd) })
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("podvm-beneath-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn relative_refuses_parent_components_and_nul() {
        assert_eq!(
            relative("/boot/vmlinuz").unwrap(),
            Path::new("boot/vmlinuz")
        );
        assert_eq!(relative("./a//b/./c").unwrap(), Path::new("a/b/c"));
        for bad in [
            "../x",
            "/boot/../../etc/passwd",
            "a/..",
            "..",
            "a\0b",
            "/",
            "",
            ".",
        ] {
            assert!(relative(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn open_in_root_keeps_symlinks_inside_the_root() {
        let base = temp("root");
        let root = base.join("root");
        std::fs::create_dir_all(root.join("boot")).unwrap();
        std::fs::write(root.join("boot/vmlinuz-6"), b"kernel").unwrap();
        std::fs::write(base.join("secret"), b"outside").unwrap();
        let link = |target: &str, name: &str| {
            std::os::unix::fs::symlink(target, root.join(name)).unwrap();
        };
        link("vmlinuz-6", "boot/relative");
        link("/boot/vmlinuz-6", "boot/absolute");
        link("../../secret", "boot/up");
        link(base.join("secret").to_str().unwrap(), "boot/out");

        let found = open_in_root(&root, Path::new("boot/vmlinuz-6")).unwrap();
        assert_eq!(
            found.path,
            root.join("boot/vmlinuz-6"),
            "no symlink: the path as given"
        );
        for name in ["boot/relative", "boot/absolute"] {
            let found = open_in_root(&root, Path::new(name)).unwrap();
            assert_eq!(
                std::fs::read(&found.path).unwrap(),
                b"kernel",
                "{name}: {found:?}"
            );
            assert!(found.path.starts_with(&root), "{found:?}");
        }
        // Symlinks that point out of the root resolve inside it, where nothing is.
        for name in ["boot/up", "boot/out"] {
            assert!(
                matches!(open_in_root(&root, Path::new(name)), Err(NotFound::Missing)),
                "{name} reached out of the root"
            );
        }
        assert!(matches!(
            open_in_root(&base.join("nothere"), Path::new("x")),
            Err(NotFound::Missing)
        ));
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn without_openat2_a_symlink_out_of_the_root_escapes() {
        let base = temp("fallback");
        let root = base.join("root");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(base.join("secret"), b"outside").unwrap();
        std::fs::write(root.join("inside"), b"inside").unwrap();
        std::os::unix::fs::symlink("../secret", root.join("up")).unwrap();
        std::os::unix::fs::symlink("inside", root.join("link")).unwrap();
        assert!(matches!(
            resolve_by_path(&root, &root.join("up")),
            Err(NotFound::Escapes(p)) if p == base.join("secret")
        ));
        let found = resolve_by_path(&root, &root.join("link")).unwrap();
        assert_eq!(found.path, root.join("inside"));
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn create_beneath_never_writes_through_a_symlink() {
        let base = temp("create");
        let run = base.join("run");
        std::fs::create_dir_all(&run).unwrap();
        std::fs::write(base.join("victim"), b"keep me").unwrap();
        std::os::unix::fs::symlink(base.join("victim"), run.join("disk.img")).unwrap();
        let dir = File::open(&run).unwrap();
        let e = create_beneath(&dir, "disk.img").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ELOOP), "{e}");
        assert_eq!(std::fs::read(base.join("victim")).unwrap(), b"keep me");
        assert!(create_beneath(&dir, "../victim").is_err());
        let mut f = create_beneath(&dir, "fresh.img").unwrap();
        std::io::Write::write_all(&mut f, b"new").unwrap();
        assert_eq!(std::fs::read(run.join("fresh.img")).unwrap(), b"new");
        std::fs::remove_dir_all(&base).unwrap();
    }
}
