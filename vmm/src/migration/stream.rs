//! The migration stream's framing: a header (magic and version), then sections, each with
//! its kind, its length and a CRC-32 over both and the payload. A destination refuses a
//! stream whose magic, version, section kind, length or checksum it does not accept, before
//! anything of the guest runs.
//!
//! ```text
//! header:  "PODVMMIG" | version u32 LE | reserved u32 (0)
//! section: kind u32 LE | length u32 LE | payload (length bytes) | crc32 u32 LE
//! ```
//!
//! The conversation: source → header, `Shape`; destination → `Accept` (or `Error`);
//! source → `Pages`/`Zeroes`... and after each pass over memory `Sync`, destination →
//! `Synced` once it has stored everything before it; source → `State`, `End`; destination
//! → `Ready` (or `Error`); source → `Go`.

use std::io::{self, Read, Write};

/// First bytes of every stream.
pub const MAGIC: [u8; 8] = *b"PODVMMIG";
/// The stream version this podvm writes and reads. Bump it whenever a section's meaning
/// changes.
pub const VERSION: u32 = 2;
/// The largest section a reader accepts.
pub const MAX_SECTION: usize = 16 << 20;

/// What a section carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Source to destination: the VM's shape (JSON), checked against the destination's.
    Shape,
    /// Guest pages: guest-physical address u64 LE, then whole pages.
    Pages,
    /// Runs of all-zero pages: (address u64 LE, pages u32 LE) repeated.
    Zeroes,
    /// The devices' and vCPUs' state (postcard, see [`super::state::VmState::encode`]),
    /// sent once the guest is paused.
    State,
    /// The source has sent everything.
    End,
    /// Source to destination: answer `Synced` once everything before this is stored (the
    /// source measures the link by it, not by what its socket buffers took).
    Sync,
    /// Destination to source: the header and shape are acceptable; send the rest.
    Accept,
    /// Destination to source: restored, waiting for the go.
    Ready,
    /// Destination to source: refused, with a message (UTF-8).
    Error,
    /// Source to destination: the source has stopped for good; run the guest.
    Go,
    /// Destination to source: everything before the `Sync` is stored.
    Synced,
}

impl Kind {
    fn code(self) -> u32 {
        match self {
            Kind::Shape => 1,
            Kind::Pages => 2,
            Kind::Zeroes => 3,
            Kind::State => 4,
            Kind::End => 5,
            Kind::Sync => 6,
            Kind::Accept => 15,
            Kind::Ready => 16,
            Kind::Error => 17,
            Kind::Go => 18,
            Kind::Synced => 19,
        }
    }

    fn from_code(code: u32) -> Option<Self> {
        Some(match code {
            1 => Kind::Shape,
            2 => Kind::Pages,
            3 => Kind::Zeroes,
            4 => Kind::State,
            5 => Kind::End,
            6 => Kind::Sync,
            15 => Kind::Accept,
            16 => Kind::Ready,
            17 => Kind::Error,
            18 => Kind::Go,
            19 => Kind::Synced,
            _ => return None,
        })
    }
}

/// A stream this podvm does not accept.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("the peer closed the stream")]
    Closed,
    #[error("not a podvm migration stream (bad magic)")]
    Magic,
    #[error("migration stream version {theirs}, this podvm reads version {ours}: run the same podvm release on both sides")]
    Version { theirs: u32, ours: u32 },
    #[error("unknown section kind {0} in the migration stream")]
    Kind(u32),
    #[error("a {len}-byte section is longer than the {max} bytes allowed")]
    Length { len: usize, max: usize },
    #[error("section {kind:?} fails its checksum: the stream is corrupted")]
    Checksum { kind: Kind },
}

/// Writes the stream header.
pub fn write_header(w: &mut impl Write) -> io::Result<()> {
    let mut h = [0u8; 16];
    h[..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    w.write_all(&h)
}

/// Reads and checks the stream header.
pub fn read_header(r: &mut impl Read) -> Result<(), StreamError> {
    let mut h = [0u8; 16];
    read_exact(r, &mut h)?;
    if h[..8] != MAGIC {
        return Err(StreamError::Magic);
    }
    let theirs = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
    if theirs != VERSION {
        return Err(StreamError::Version {
            theirs,
            ours: VERSION,
        });
    }
    Ok(())
}

/// Writes one section whose payload is the concatenation of `parts`.
pub fn write_section(w: &mut impl Write, kind: Kind, parts: &[&[u8]]) -> io::Result<()> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let len = u32::try_from(len)
        .ok()
        .filter(|&l| l as usize <= MAX_SECTION)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "section too long"))?;
    let mut head = [0u8; 8];
    head[..4].copy_from_slice(&kind.code().to_le_bytes());
    head[4..].copy_from_slice(&len.to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&head);
    w.write_all(&head)?;
    for p in parts {
        crc.update(p);
        w.write_all(p)?;
    }
    w.write_all(&crc.finalize().to_le_bytes())
}

/// Reads one section into `payload` (replacing what it held); returns its kind.
pub fn read_section(r: &mut impl Read, payload: &mut Vec<u8>) -> Result<Kind, StreamError> {
    let mut head = [0u8; 8];
    read_exact(r, &mut head)?;
    let code = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
    let len = u32::from_le_bytes([head[4], head[5], head[6], head[7]]) as usize;
    let kind = Kind::from_code(code).ok_or(StreamError::Kind(code))?;
    if len > MAX_SECTION {
        return Err(StreamError::Length {
            len,
            max: MAX_SECTION,
        });
    }
    payload.clear();
    payload.resize(len, 0);
    read_exact(r, payload)?;
    let mut sum = [0u8; 4];
    read_exact(r, &mut sum)?;
    let mut crc = crc32fast::Hasher::new();
    crc.update(&head);
    crc.update(payload);
    if crc.finalize() != u32::from_le_bytes(sum) {
        return Err(StreamError::Checksum { kind });
    }
    Ok(kind)
}

fn read_exact(r: &mut impl Read, buf: &mut [u8]) -> Result<(), StreamError> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => StreamError::Closed,
        _ => StreamError::Io(e),
    })
}

/// Feeds arbitrary bytes to the stream reader as a destination reads them, into a small
/// guest memory: never a panic, never a write outside guest memory, never more than
/// [`MAX_SECTION`] bytes for one section.
pub fn fuzz_read_stream(data: &[u8]) {
    thread_local! {
        static MEM: crate::memory::GuestMemory =
            crate::memory::create(2 << 20).expect("2 MiB of fuzz guest memory");
    }
    let mut r = data;
    if read_header(&mut r).is_err() {
        // Also parse the bytes as sections alone, so the fuzzer need not find the header.
        r = data;
    }
    let mut payload = Vec::new();
    MEM.with(|mem| {
        while let Ok(kind) = read_section(&mut r, &mut payload) {
            match kind {
                Kind::Pages => drop(super::memory::receive_pages(mem, &payload)),
                Kind::Zeroes => drop(super::memory::receive_zeroes(mem, &payload)),
                Kind::Shape => drop(serde_json::from_slice::<super::state::Shape>(&payload)),
                Kind::State => drop(super::state::VmState::decode(&payload)),
                _ => {}
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Replays the committed fuzz corpus, so every CI run covers the seeds and past finds.
    #[test]
    fn migration_stream_fuzz_corpus_replays_cleanly() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/migration_stream");
        devices::fuzz_replay::replay_dir(&dir, fuzz_read_stream);
        // The state seed holds a state this version parses, so the fuzzer starts from one.
        let seed = std::fs::read(dir.join("seed-state")).unwrap();
        let mut r = &seed[..];
        read_header(&mut r).unwrap();
        let mut payload = Vec::new();
        assert!(matches!(
            read_section(&mut r, &mut payload),
            Ok(Kind::State)
        ));
        super::super::state::VmState::decode(&payload).unwrap();
    }

    fn stream(sections: &[(Kind, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        write_header(&mut out).unwrap();
        for (kind, payload) in sections {
            write_section(&mut out, *kind, &[payload]).unwrap();
        }
        out
    }

    #[test]
    fn every_section_kind_has_its_own_code() {
        let all = [
            Kind::Shape,
            Kind::Pages,
            Kind::Zeroes,
            Kind::State,
            Kind::End,
            Kind::Sync,
            Kind::Accept,
            Kind::Ready,
            Kind::Error,
            Kind::Go,
            Kind::Synced,
        ];
        let codes: std::collections::BTreeSet<u32> = all.iter().map(|k| k.code()).collect();
        assert_eq!(codes.len(), all.len());
        for k in all {
            assert_eq!(Kind::from_code(k.code()), Some(k));
        }
        // The bytes of an empty `Synced`, as the tests' stand-in destination writes them.
        let mut synced = Vec::new();
        write_section(&mut synced, Kind::Synced, &[]).unwrap();
        assert_eq!(synced, [19, 0, 0, 0, 0, 0, 0, 0, 0xa1, 0xe9, 0x16, 0x97]);
    }

    #[test]
    fn migration_stream_round_trips_sections() {
        let bytes = stream(&[
            (Kind::Shape, b"{}"),
            (Kind::Pages, &[7u8; 4104]),
            (Kind::End, b""),
        ]);
        let mut r = &bytes[..];
        read_header(&mut r).unwrap();
        let mut p = Vec::new();
        assert_eq!(read_section(&mut r, &mut p).unwrap(), Kind::Shape);
        assert_eq!(p, b"{}");
        assert_eq!(read_section(&mut r, &mut p).unwrap(), Kind::Pages);
        assert_eq!(p.len(), 4104);
        assert_eq!(read_section(&mut r, &mut p).unwrap(), Kind::End);
        assert!(matches!(
            read_section(&mut r, &mut p),
            Err(StreamError::Closed)
        ));
    }

    #[test]
    fn migration_stream_refuses_bad_magic_version_kind_length_and_checksum() {
        let good = stream(&[(Kind::State, b"{\"x\":1}")]);

        let mut bad = good.clone();
        bad[0] = b'X';
        assert!(matches!(
            read_header(&mut &bad[..]),
            Err(StreamError::Magic)
        ));

        let mut bad = good.clone();
        bad[8..12].copy_from_slice(&1u32.to_le_bytes());
        let e = read_header(&mut &bad[..]).unwrap_err();
        assert!(matches!(e, StreamError::Version { theirs: 1, ours: 2 }));
        assert!(e.to_string().contains("version 1"), "{e}");

        let mut p = Vec::new();
        let mut bad = good.clone();
        bad[16..20].copy_from_slice(&99u32.to_le_bytes());
        assert!(matches!(
            read_section(&mut &bad[16..], &mut p),
            Err(StreamError::Kind(99))
        ));

        let mut bad = good.clone();
        bad[20..24].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            read_section(&mut &bad[16..], &mut p),
            Err(StreamError::Length { .. })
        ));

        // Every single flipped bit of the section is caught.
        for byte in 16..good.len() {
            let mut bad = good.clone();
            bad[byte] ^= 0x10;
            let r = read_section(&mut &bad[16..], &mut p);
            assert!(r.is_err(), "flip at byte {byte} went unnoticed");
        }

        // A stream cut short is "closed", not a partial section.
        for cut in 16..good.len() {
            let r = read_section(&mut &good[16..cut], &mut p);
            assert!(matches!(r, Err(StreamError::Closed)), "cut at {cut}: {r:?}");
        }
    }
}
