//! The virtio-net header (virtio 1.x §5.1.6) in front of every frame, and the one checksum
//! routine the device needs. Pure functions over byte slices, fuzzable.

/// Length of the header with VIRTIO_F_VERSION_1 (num_buffers is always present).
pub const HDR_LEN: usize = 12;
/// flags: the checksum from `csum_start` on is partial and must be completed.
pub const F_NEEDS_CSUM: u8 = 1;
/// flags (to the guest): the checksum was already checked.
pub const F_DATA_VALID: u8 = 2;
/// gso_type: no segmentation offload.
pub const GSO_NONE: u8 = 0;

/// Why a transmitted header or frame was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("shorter than the virtio-net header")]
    Short,
    #[error("segmentation offload (gso_type {0}) was not negotiated")]
    Gso(u8),
    #[error("checksum start {start} offset {offset} outside a {len}-byte frame")]
    ChecksumRange { start: u16, offset: u16, len: usize },
}

/// The fields of a header the driver wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TxHeader {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl TxHeader {
    /// Parses the header at the start of `bytes`.
    pub fn parse(bytes: &[u8]) -> Result<Self, HeaderError> {
        let b = bytes.get(..HDR_LEN).ok_or(HeaderError::Short)?;
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Ok(Self {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
        })
    }

    /// Makes `frame` what the guest meant: completes a partial checksum, refuses GSO.
    pub fn finish(&self, frame: &mut [u8]) -> Result<(), HeaderError> {
        if self.gso_type != GSO_NONE {
            return Err(HeaderError::Gso(self.gso_type));
        }
        if self.flags & F_NEEDS_CSUM != 0 {
            complete_checksum(frame, self.csum_start, self.csum_offset)?;
        }
        Ok(())
    }
}

/// A header for a frame going to the guest.
pub fn rx_header(flags: u8, num_buffers: u16) -> [u8; HDR_LEN] {
    let mut h = [0u8; HDR_LEN];
    h[0] = flags;
    h[10..12].copy_from_slice(&num_buffers.to_le_bytes());
    h
}

/// Completes a partial checksum: the field at `start + offset` holds the pseudo-header sum,
/// and the checksum covers `frame[start..]`.
pub fn complete_checksum(frame: &mut [u8], start: u16, offset: u16) -> Result<(), HeaderError> {
    let (s, o) = (start as usize, offset as usize);
    let field = s + o;
    if s >= frame.len() || field + 2 > frame.len() {
        return Err(HeaderError::ChecksumRange {
            start,
            offset,
            len: frame.len(),
        });
    }
    let sum = !fold(sum_be_words(&frame[s..], 0));
    frame[field..field + 2].copy_from_slice(&sum.to_be_bytes());
    Ok(())
}

/// Adds `data` as big-endian 16-bit words (odd length padded with zero) to `acc`.
pub fn sum_be_words(data: &[u8], mut acc: u64) -> u64 {
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let v = u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        // Four 16-bit words at once: add the high and low 32-bit halves separately so the
        // carries stay in the accumulator's spare bits.
        acc += v >> 32;
        acc += v & 0xffff_ffff;
    }
    let rest = chunks.remainder();
    let mut words = rest.chunks_exact(2);
    for w in &mut words {
        acc += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = words.remainder() {
        acc += u64::from(*last) << 8;
    }
    acc
}

/// Folds a sum of 16-bit words to 16 bits (one's complement addition).
pub fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(data: &[u8]) -> u16 {
        let mut sum: u32 = 0;
        for w in data.chunks(2) {
            let hi = u32::from(w[0]) << 8;
            let lo = w.get(1).copied().map_or(0, u32::from);
            sum += hi | lo;
            sum = (sum & 0xffff) + (sum >> 16);
        }
        sum as u16
    }

    #[test]
    fn net_checksum_matches_the_bytewise_definition() {
        for len in 0..64 {
            let data: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            assert_eq!(fold(sum_be_words(&data, 0)), reference(&data), "len {len}");
        }
        let big = vec![0xffu8; 70_000];
        assert_eq!(fold(sum_be_words(&big, 0)), reference(&big));
    }

    #[test]
    fn net_partial_checksum_is_completed_and_verifies() {
        // A UDP-like payload: the field at offset 6 holds a "pseudo-header" sum.
        let mut frame = vec![0u8; 40];
        for (i, b) in frame.iter_mut().enumerate().skip(14) {
            *b = i as u8;
        }
        frame[20..22].copy_from_slice(&0x1234u16.to_be_bytes());
        complete_checksum(&mut frame, 14, 6).unwrap();
        // Summing the region with the final checksum and without the pseudo sum gives ~0.
        let mut check = frame[14..].to_vec();
        let stored = u16::from_be_bytes([check[6], check[7]]);
        check[6..8].copy_from_slice(&[0, 0]);
        let total = fold(sum_be_words(&check, 0x1234) + u64::from(stored));
        assert_eq!(total, 0xffff);
    }

    #[test]
    fn net_header_out_of_range_checksum_and_gso_are_refused() {
        let mut frame = vec![0u8; 20];
        assert!(complete_checksum(&mut frame, 19, 1).is_err());
        assert!(complete_checksum(&mut frame, 20, 0).is_err());
        assert!(complete_checksum(&mut frame, u16::MAX, u16::MAX).is_err());
        let h = TxHeader {
            gso_type: 1,
            ..Default::default()
        };
        assert_eq!(h.finish(&mut frame), Err(HeaderError::Gso(1)));
        assert_eq!(TxHeader::parse(&[0; 11]), Err(HeaderError::Short));
    }
}
