//! Storage behind a virtio-blk device: a raw block device or a raw image file, opened by path.
//!
//! I/O is positional (`pread`/`pwrite`) on the one fd. Discard and write-zeroes map to
//! `BLKDISCARD`/`BLKZEROOUT` on block devices and to `fallocate` punch-hole / zero-range on
//! files. With `direct`, the fd is opened `O_DIRECT` (KubeVirt's cache=none) and callers pass
//! buffers aligned to [`DIRECT_IO_ALIGN`].

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr};

/// Buffer address alignment used for all I/O (enough for O_DIRECT on any logical block size
/// up to 4 KiB).
pub const DIRECT_IO_ALIGN: usize = 4096;

ioctl_ior_nr!(BLKGETSIZE64, 0x12, 114, u64);
ioctl_io_nr!(BLKSSZGET, 0x12, 104);
ioctl_io_nr!(BLKDISCARD, 0x12, 119);
ioctl_io_nr!(BLKZEROOUT, 0x12, 127);

/// How a disk is opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskOptions {
    pub path: PathBuf,
    pub read_only: bool,
    /// `None`: the default (direct for block devices, buffered for files).
    pub direct: Option<bool>,
    /// Open without the lock, to be taken later with [`Disk::lock`]: a migration
    /// destination opens the disk while the source still holds it, and writes only after
    /// the handover.
    pub defer_lock: bool,
}

/// Opening a disk failed; each message names the path and the fix.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("--disk {path}: no such file or device; give the path of a raw image file or a block device")]
    Missing { path: PathBuf },
    #[error("--disk {path}: is a directory; give the path of a raw image file or a block device")]
    Directory { path: PathBuf },
    #[error("--disk {path}: is neither a regular file nor a block device")]
    NotADisk { path: PathBuf },
    #[error("--disk {path}: permission denied opening it {mode}; give podvm's user access (in a pod: fsGroup or supplementalGroups for the volume's group){hint}")]
    Permission {
        path: PathBuf,
        mode: &'static str,
        hint: &'static str,
    },
    #[error("--disk {path}: its file system or device is read-only; add ,readonly")]
    ReadOnlyFs { path: PathBuf },
    #[error("--disk {path}: {size} bytes is not a multiple of 512; resize the image (truncate -s) to whole sectors")]
    NotSectorMultiple { path: PathBuf, size: u64 },
    #[error("--disk {path}: direct I/O (O_DIRECT) is not supported there; use direct=off")]
    DirectUnsupported { path: PathBuf },
    #[error("--disk {path}: in use by another process (its lock is held); stop that process or give another disk")]
    Locked { path: PathBuf },
    #[error("--disk {path}: cannot open: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What kind of object backs the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskKind {
    File,
    BlockDevice,
}

/// An open disk.
#[derive(Debug)]
pub struct Disk {
    file: File,
    path: PathBuf,
    kind: DiskKind,
    size: u64,
    logical_block_size: u32,
    read_only: bool,
    direct: bool,
}

fn open_error(path: &Path, e: io::Error, read_only: bool, direct: bool) -> OpenError {
    let path = path.to_path_buf();
    match e.raw_os_error() {
        Some(libc::ENOENT) => OpenError::Missing { path },
        Some(libc::EISDIR) => OpenError::Directory { path },
        Some(libc::EACCES) | Some(libc::EPERM) => OpenError::Permission {
            path,
            mode: if read_only { "read-only" } else { "read-write" },
            hint: if read_only {
                ""
            } else {
                ", or add ,readonly if the guest only reads it"
            },
        },
        Some(libc::EROFS) => OpenError::ReadOnlyFs { path },
        Some(libc::EINVAL) if direct => OpenError::DirectUnsupported { path },
        _ => OpenError::Open { path, source: e },
    }
}

/// Takes the disk's advisory lock: exclusive when writable, shared when read-only.
fn try_lock(file: &File, path: &Path, read_only: bool) -> Result<(), OpenError> {
    let lock = if read_only {
        libc::LOCK_SH
    } else {
        libc::LOCK_EX
    };
    // SAFETY: flock only reads the fd, which `file` keeps open.
    if unsafe { libc::flock(file.as_raw_fd(), lock | libc::LOCK_NB) } != 0 {
        let e = io::Error::last_os_error();
        return Err(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            OpenError::Locked { path: path.into() }
        } else {
            OpenError::Open {
                path: path.into(),
                source: e,
            }
        });
    }
    Ok(())
}

impl Disk {
    /// Takes the lock a disk opened with `defer_lock` skipped, waiting up to `patience`
    /// for another process (a migration source handing the disk over) to let it go.
    pub fn lock(&self, patience: std::time::Duration) -> Result<(), OpenError> {
        let deadline = std::time::Instant::now() + patience;
        loop {
            match try_lock(&self.file, &self.path, self.read_only) {
                Err(OpenError::Locked { .. }) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                other => return other,
            }
        }
    }

    /// Lets go of the disk's lock: a migration source hands the disk to the destination
    /// (and writes nothing more).
    pub fn unlock(&self) {
        // SAFETY: flock only reads the fd, which `self.file` keeps open.
        unsafe { libc::flock(self.file.as_raw_fd(), libc::LOCK_UN) };
    }

    /// Opens the disk, checks it, and takes an advisory lock (exclusive when writable, shared
    /// when read-only) so two VMs never write one disk.
    pub fn open(options: &DiskOptions) -> Result<Disk, OpenError> {
        let path = options.path.as_path();
        let meta =
            std::fs::metadata(path).map_err(|e| open_error(path, e, options.read_only, false))?;
        let kind = if meta.is_dir() {
            return Err(OpenError::Directory { path: path.into() });
        } else if meta.file_type().is_block_device() {
            DiskKind::BlockDevice
        } else if meta.is_file() {
            DiskKind::File
        } else {
            return Err(OpenError::NotADisk { path: path.into() });
        };
        let direct = options.direct.unwrap_or(kind == DiskKind::BlockDevice);
        let mut open = OpenOptions::new();
        open.read(true).write(!options.read_only);
        if direct {
            open.custom_flags(libc::O_DIRECT);
        }
        let file = open
            .open(path)
            .map_err(|e| open_error(path, e, options.read_only, direct))?;

        if !options.defer_lock {
            try_lock(&file, path, options.read_only)?;
        }

        let (size, logical_block_size) = match kind {
            DiskKind::File => (meta.len(), 512),
            DiskKind::BlockDevice => {
                block_device_geometry(&file).map_err(|source| OpenError::Open {
                    path: path.into(),
                    source,
                })?
            }
        };
        if size % 512 != 0 {
            return Err(OpenError::NotSectorMultiple {
                path: path.into(),
                size,
            });
        }
        Ok(Disk {
            file,
            path: path.into(),
            kind,
            size,
            logical_block_size,
            read_only: options.read_only,
            direct,
        })
    }

    /// The open file descriptor, for asynchronous I/O.
    pub fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.file.as_raw_fd()
    }

    /// The path it was opened by.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// File or block device.
    pub fn kind(&self) -> DiskKind {
        self.kind
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Logical block size in bytes (512 for files; what the kernel reports for devices).
    pub fn logical_block_size(&self) -> u32 {
        self.logical_block_size
    }

    /// Whether the disk was opened read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Whether I/O bypasses the host page cache.
    pub fn direct(&self) -> bool {
        self.direct
    }

    /// Reads exactly `buf.len()` bytes at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    /// Writes all of `buf` at `offset`.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    /// Makes every completed write durable (fdatasync).
    pub fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Deallocates `len` bytes at `offset`; they read as zeroes afterwards.
    pub fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        match self.kind {
            DiskKind::BlockDevice => self.block_range_ioctl(BLKDISCARD(), offset, len),
            DiskKind::File => self.fallocate(
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            ),
        }
    }

    /// Zeroes `len` bytes at `offset`, deallocating them when `unmap` allows it.
    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        match self.kind {
            DiskKind::BlockDevice => self.block_range_ioctl(BLKZEROOUT(), offset, len),
            DiskKind::File if unmap => self.fallocate(
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            ),
            DiskKind::File => self
                .fallocate(
                    libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                    offset,
                    len,
                )
                .or_else(|e| {
                    // Not every file system zeroes ranges (tmpfs, memfd): a hole punched
                    // and allocated again reads as zeroes and stays allocated, in metadata
                    // operations only. Writing zeroes (the whole range through the event
                    // loop) is the last resort, for file systems that punch no holes.
                    if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
                        return Err(e);
                    }
                    match self.fallocate(
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        offset,
                        len,
                    ) {
                        Ok(()) => self.fallocate(0, offset, len).or_else(|e| {
                            // A file system that cannot preallocate: the hole reads as
                            // zeroes, which is what the guest asked for.
                            if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
                                Ok(())
                            } else {
                                Err(e)
                            }
                        }),
                        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                            self.write_zero_blocks(offset, len)
                        }
                        Err(e) => Err(e),
                    }
                }),
        }
    }

    fn write_zero_blocks(&self, mut offset: u64, len: u64) -> io::Result<()> {
        let chunk = AlignedBuf::new(1 << 20);
        let end = offset + len;
        while offset < end {
            let n = (end - offset).min(chunk.len() as u64) as usize;
            self.write_at(&chunk.as_slice()[..n], offset)?;
            offset += n as u64;
        }
        Ok(())
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        // SAFETY: fallocate only acts on the fd, which `self.file` keeps open; no memory is
        // passed.
        if unsafe { libc::fallocate(self.file.as_raw_fd(), mode, offset, len) } == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn block_range_ioctl(&self, request: libc::c_ulong, offset: u64, len: u64) -> io::Result<()> {
        let range: [u64; 2] = [offset, len];
        // SAFETY: BLKDISCARD and BLKZEROOUT read a `u64[2]` through the pointer, which points
        // at `range`, alive for the call; the fd is open.
        let ret = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(&self.file, request, &range) };
        if ret == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

fn block_device_geometry(file: &File) -> io::Result<(u64, u32)> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points at `size`.
    if unsafe { vmm_sys_util::ioctl::ioctl_with_mut_ref(file, BLKGETSIZE64(), &mut size) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut block_size: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which points at `block_size`.
    if unsafe { vmm_sys_util::ioctl::ioctl_with_mut_ref(file, BLKSSZGET(), &mut block_size) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((size, u32::try_from(block_size).unwrap_or(512).max(512)))
}

/// A heap buffer whose usable part starts at a [`DIRECT_IO_ALIGN`] boundary, in safe code:
/// it over-allocates and slices from the first aligned byte.
pub struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes.
    pub fn new(len: usize) -> Self {
        let storage = vec![0u8; len + DIRECT_IO_ALIGN];
        let start = storage.as_ptr().align_offset(DIRECT_IO_ALIGN);
        Self {
            storage,
            start,
            len,
        }
    }

    /// Usable length.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The aligned bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }

    /// The aligned bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Scratch(PathBuf);
    impl Scratch {
        fn new(name: &str, size: u64) -> Self {
            let path =
                std::env::temp_dir().join(format!("podvm-disk-{name}-{}", std::process::id()));
            let f = File::create(&path).unwrap();
            f.set_len(size).unwrap();
            Self(path)
        }
        fn options(&self, read_only: bool) -> DiskOptions {
            DiskOptions {
                path: self.0.clone(),
                read_only,
                direct: Some(false),
                defer_lock: false,
            }
        }
    }
    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn disk_write_zeroes_without_unmap_on_a_file_system_without_zero_range_stays_allocated() {
        // A memfd (shmem, like tmpfs) has no FALLOC_FL_ZERO_RANGE: the fallback runs.
        let disk = crate::virtio::block::fuzzing::scratch_disk(false);
        let len = 256 * 1024;
        disk.write_at(&vec![0xa5; len], 0).unwrap();
        disk.write_zeroes(4096, 128 * 1024, false).unwrap();
        let mut back = vec![0xffu8; len];
        disk.read_at(&mut back, 0).unwrap();
        assert!(back[..4096].iter().all(|&b| b == 0xa5));
        assert!(back[4096..4096 + 128 * 1024].iter().all(|&b| b == 0));
        assert!(back[4096 + 128 * 1024..].iter().all(|&b| b == 0xa5));
        // Still allocated: the guest did not allow unmapping.
        use std::os::unix::fs::MetadataExt;
        let blocks = disk.file.metadata().unwrap().blocks();
        assert!(blocks * 512 >= len as u64, "{blocks} blocks");
    }

    #[test]
    fn disk_open_rejects_size_not_multiple_of_512() {
        let s = Scratch::new("odd", 1000);
        let err = Disk::open(&s.options(false)).unwrap_err();
        assert!(
            matches!(err, OpenError::NotSectorMultiple { size: 1000, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("not a multiple of 512"));
    }

    #[test]
    fn disk_open_rejects_directory_and_missing_path() {
        let err = Disk::open(&DiskOptions {
            path: std::env::temp_dir(),
            read_only: false,
            direct: None,
            defer_lock: false,
        })
        .unwrap_err();
        assert!(matches!(err, OpenError::Directory { .. }), "{err}");
        let err = Disk::open(&DiskOptions {
            path: "/nonexistent/disk.img".into(),
            read_only: true,
            direct: None,
            defer_lock: false,
        })
        .unwrap_err();
        assert!(matches!(err, OpenError::Missing { .. }), "{err}");
    }

    #[test]
    fn disk_second_writer_is_refused_by_lock() {
        let s = Scratch::new("lock", 4096);
        let _first = Disk::open(&s.options(false)).unwrap();
        let err = Disk::open(&s.options(false)).unwrap_err();
        assert!(matches!(err, OpenError::Locked { .. }), "{err}");
    }

    #[test]
    fn disk_file_discard_punches_hole_and_reads_zero() {
        let s = Scratch::new("discard", 1 << 20);
        let disk = Disk::open(&s.options(false)).unwrap();
        disk.write_at(&[0xab; 65536], 0).unwrap();
        disk.flush().unwrap();
        disk.discard(0, 65536).unwrap();
        let mut buf = vec![1u8; 65536];
        disk.read_at(&mut buf, 0).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
    }

    #[test]
    fn aligned_buf_is_aligned() {
        let mut b = AlignedBuf::new(8192);
        assert_eq!(b.as_mut_slice().as_ptr() as usize % DIRECT_IO_ALIGN, 0);
        assert_eq!(b.len(), 8192);
    }
}
