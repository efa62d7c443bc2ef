//! Parsing a virtio-blk request out of a descriptor chain (virtio 1.x §5.2.6). Pure: it reads
//! the 16-byte header from guest memory and checks the chain's shape, nothing else, so it can
//! be fuzzed and unit-tested without a device.
//!
//! Shape accepted: a device-readable header descriptor (at least 16 bytes), data descriptors
//! whose direction matches the request type, and a device-writable status descriptor last.
//! Anything else is an error; when the chain still ends in a writable descriptor, the error
//! carries its address so the device can answer VIRTIO_BLK_S_IOERR there.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemory, Le32, Le64, Permissions};

/// Bytes in a sector, the unit of virtio-blk offsets.
pub const SECTOR_SIZE: u64 = 512;
/// Length of a discard / write-zeroes segment descriptor.
pub const DISCARD_SEGMENT_SIZE: u32 = 16;
/// Longest chain looked at; longer chains are refused (the queue size bounds them anyway).
pub const MAX_CHAIN_LEN: usize = 1024;

/// What the request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestType {
    In,
    Out,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
    Unsupported(u32),
}

impl From<u32> for RequestType {
    fn from(value: u32) -> Self {
        match value {
            VIRTIO_BLK_T_IN => RequestType::In,
            VIRTIO_BLK_T_OUT => RequestType::Out,
            VIRTIO_BLK_T_FLUSH => RequestType::Flush,
            VIRTIO_BLK_T_GET_ID => RequestType::GetId,
            VIRTIO_BLK_T_DISCARD => RequestType::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => RequestType::WriteZeroes,
            other => RequestType::Unsupported(other),
        }
    }
}

/// The device's limits a request is checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Disk size in sectors.
    pub capacity_sectors: u64,
    /// Most data descriptors in one request (SEG_MAX).
    pub seg_max: u32,
    /// Longest data descriptor (SIZE_MAX).
    pub size_max: u32,
}

/// A well-formed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub request_type: RequestType,
    /// First sector, for IN and OUT.
    pub sector: u64,
    /// Data descriptors, in order: (address, length).
    pub data: Vec<(GuestAddress, u32)>,
    /// Sum of the data descriptors' lengths.
    pub data_len: u64,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

/// Why a chain is not a valid request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseErrorKind {
    #[error("empty descriptor chain")]
    Empty,
    #[error("descriptor chain longer than {MAX_CHAIN_LEN}")]
    TooLong,
    #[error("the last descriptor is not a device-writable status byte")]
    NoStatus,
    #[error("the header descriptor is shorter than 16 bytes or device-writable")]
    BadHeader,
    #[error("the header lies outside guest memory")]
    HeaderOutsideMemory,
    #[error("a data descriptor has the wrong direction for the request type")]
    WrongDirection,
    #[error("more data descriptors than SEG_MAX or one longer than SIZE_MAX")]
    TooManySegments,
    #[error("data length is not a multiple of the sector or segment size")]
    BadLength,
    #[error("the request reaches past the end of the disk")]
    OutOfRange,
    #[error("a data or status descriptor lies outside guest memory")]
    OutsideMemory,
}

/// A rejected chain, with the status address when one can still be answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{kind}")]
pub struct ParseError {
    pub kind: ParseErrorKind,
    pub status: Option<GuestAddress>,
}

#[derive(Clone, Copy, Default)]
#[repr(C)]
struct Header {
    request_type: Le32,
    _reserved: Le32,
    sector: Le64,
}

// SAFETY: Header is plain old data of three little-endian integers, with no padding, for
// which any bit pattern is valid.
unsafe impl ByteValued for Header {}

fn within<M: GuestMemory>(mem: &M, addr: GuestAddress, len: u32) -> bool {
    len == 0 || mem.check_range(addr, len as usize, Permissions::ReadWrite)
}

impl Request {
    /// Parses the descriptors of one chain.
    pub fn parse<M: GuestMemory>(
        descriptors: impl IntoIterator<Item = Descriptor>,
        mem: &M,
        limits: &Limits,
    ) -> Result<Request, ParseError> {
        let descs: Vec<Descriptor> = descriptors.into_iter().take(MAX_CHAIN_LEN + 1).collect();
        let fail = |kind, status| Err(ParseError { kind, status });
        let (Some(head), Some(last)) = (descs.first(), descs.last()) else {
            return fail(ParseErrorKind::Empty, None);
        };
        let status = (descs.len() >= 2
            && last.is_write_only()
            && last.len() >= 1
            && within(mem, last.addr(), last.len()))
        .then(|| last.addr().unchecked_add(u64::from(last.len()) - 1));
        if descs.len() > MAX_CHAIN_LEN {
            return fail(ParseErrorKind::TooLong, status);
        }
        let Some(status_addr) = status else {
            return fail(ParseErrorKind::NoStatus, None);
        };
        if head.is_write_only() || head.len() < 16 {
            return fail(ParseErrorKind::BadHeader, status);
        }
        let header: Header = mem.read_obj(head.addr()).map_err(|_| ParseError {
            kind: ParseErrorKind::HeaderOutsideMemory,
            status,
        })?;
        let request_type = RequestType::from(header.request_type.to_native());
        let data_descs = &descs[1..descs.len() - 1];

        let writable = match request_type {
            RequestType::In | RequestType::GetId => Some(true),
            RequestType::Out | RequestType::Discard | RequestType::WriteZeroes => Some(false),
            RequestType::Flush | RequestType::Unsupported(_) => None,
        };
        if let Some(writable) = writable {
            if data_descs.iter().any(|d| d.is_write_only() != writable) {
                return fail(ParseErrorKind::WrongDirection, status);
            }
        }
        if data_descs.len() > limits.seg_max as usize
            || data_descs.iter().any(|d| d.len() > limits.size_max)
        {
            return fail(ParseErrorKind::TooManySegments, status);
        }
        if data_descs.iter().any(|d| !within(mem, d.addr(), d.len())) {
            return fail(ParseErrorKind::OutsideMemory, status);
        }
        let data: Vec<(GuestAddress, u32)> =
            data_descs.iter().map(|d| (d.addr(), d.len())).collect();
        let data_len: u64 = data.iter().map(|&(_, len)| u64::from(len)).sum();
        let sector = header.sector.to_native();

        match request_type {
            RequestType::In | RequestType::Out => {
                if !data_len.is_multiple_of(SECTOR_SIZE) {
                    return fail(ParseErrorKind::BadLength, status);
                }
                let end = sector.checked_add(data_len / SECTOR_SIZE);
                if end.is_none_or(|end| end > limits.capacity_sectors) {
                    return fail(ParseErrorKind::OutOfRange, status);
                }
            }
            RequestType::Discard | RequestType::WriteZeroes => {
                if data_len == 0 || !data_len.is_multiple_of(u64::from(DISCARD_SEGMENT_SIZE)) {
                    return fail(ParseErrorKind::BadLength, status);
                }
            }
            RequestType::GetId => {
                if data.is_empty() {
                    return fail(ParseErrorKind::BadLength, status);
                }
            }
            RequestType::Flush | RequestType::Unsupported(_) => {}
        }
        Ok(Request {
            request_type,
            sector,
            data,
            data_len,
            status: status_addr,
        })
    }
}

/// One discard / write-zeroes segment (virtio 1.x §5.2.6, `virtio_blk_discard_write_zeroes`).
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct Segment {
    pub sector: Le64,
    pub num_sectors: Le32,
    pub flags: Le32,
}

// SAFETY: Segment is plain old data of three little-endian integers, with no padding, for
// which any bit pattern is valid.
unsafe impl ByteValued for Segment {}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use virtio_queue::desc::split::Descriptor;
    use vm_memory::GuestMemoryMmap;

    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;

    pub(crate) fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn limits() -> Limits {
        Limits {
            capacity_sectors: 100,
            seg_max: 4,
            size_max: 4096,
        }
    }

    fn header(mem: &GuestMemoryMmap<()>, at: u64, request_type: u32, sector: u64) {
        let h = Header {
            request_type: request_type.into(),
            _reserved: 0.into(),
            sector: sector.into(),
        };
        mem.write_obj(h, GuestAddress(at)).unwrap();
    }

    fn desc(addr: u64, len: u32, flags: u16) -> Descriptor {
        Descriptor::new(addr, len, flags, 0)
    }

    fn read_chain(data_len: u32) -> Vec<Descriptor> {
        vec![
            desc(0x1000, 16, F_NEXT),
            desc(0x2000, data_len, F_NEXT | F_WRITE),
            desc(0x3000, 1, F_WRITE),
        ]
    }

    #[test]
    fn blk_parse_accepts_well_formed_read() {
        let m = mem();
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 8);
        let req = Request::parse(read_chain(1024), &m, &limits()).unwrap();
        assert_eq!(req.request_type, RequestType::In);
        assert_eq!(req.sector, 8);
        assert_eq!(req.data, vec![(GuestAddress(0x2000), 1024)]);
        assert_eq!(req.status, GuestAddress(0x3000));
    }

    #[test]
    fn blk_parse_refuses_read_past_end_of_disk_with_status() {
        let m = mem();
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 99);
        let err = Request::parse(read_chain(1024), &m, &limits()).unwrap_err();
        assert_eq!(err.kind, ParseErrorKind::OutOfRange);
        assert_eq!(err.status, Some(GuestAddress(0x3000)));
        header(&m, 0x1000, VIRTIO_BLK_T_IN, u64::MAX);
        let err = Request::parse(read_chain(512), &m, &limits()).unwrap_err();
        assert_eq!(err.kind, ParseErrorKind::OutOfRange);
    }

    #[test]
    fn blk_parse_refuses_wrong_direction_and_missing_status() {
        let m = mem();
        header(&m, 0x1000, VIRTIO_BLK_T_OUT, 0);
        let err = Request::parse(read_chain(512), &m, &limits()).unwrap_err();
        assert_eq!(err.kind, ParseErrorKind::WrongDirection);
        let no_status = vec![desc(0x1000, 16, F_NEXT), desc(0x2000, 512, 0)];
        let err = Request::parse(no_status, &m, &limits()).unwrap_err();
        assert_eq!((err.kind, err.status), (ParseErrorKind::NoStatus, None));
    }

    #[test]
    fn blk_parse_refuses_descriptors_outside_memory() {
        let m = mem();
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 0);
        let chain = vec![
            desc(0x1000, 16, F_NEXT),
            desc(0xff_f800, 0x1000, F_NEXT | F_WRITE),
            desc(0x3000, 1, F_WRITE),
        ];
        let err = Request::parse(chain, &m, &limits()).unwrap_err();
        assert_eq!(err.kind, ParseErrorKind::OutsideMemory);
        let chain = vec![desc(0x2000_0000, 16, F_NEXT), desc(0x3000, 1, F_WRITE)];
        let err = Request::parse(chain, &m, &limits()).unwrap_err();
        assert_eq!(err.kind, ParseErrorKind::HeaderOutsideMemory);
    }

    #[test]
    fn blk_parse_refuses_too_many_or_too_long_segments() {
        let m = mem();
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 0);
        let mut chain = vec![desc(0x1000, 16, F_NEXT)];
        chain.extend((0..5).map(|i| desc(0x4000 + i * 0x200, 512, F_NEXT | F_WRITE)));
        chain.push(desc(0x3000, 1, F_WRITE));
        let err = Request::parse(chain, &m, &limits()).unwrap_err();
        assert_eq!(err.kind, ParseErrorKind::TooManySegments);
        let err = Request::parse(read_chain(8192), &m, &limits()).unwrap_err();
        assert_eq!(err.kind, ParseErrorKind::TooManySegments);
    }

    #[test]
    fn blk_parse_refuses_partial_sector() {
        let m = mem();
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 0);
        let err = Request::parse(read_chain(100), &m, &limits()).unwrap_err();
        assert_eq!(err.kind, ParseErrorKind::BadLength);
    }

    #[test]
    fn blk_parse_passes_unknown_types_through_for_unsupp() {
        let m = mem();
        header(&m, 0x1000, 0x77, 0);
        let req = Request::parse(read_chain(512), &m, &limits()).unwrap();
        assert_eq!(req.request_type, RequestType::Unsupported(0x77));
    }
}
