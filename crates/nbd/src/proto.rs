//! NBD wire format (NetworkBlockDevice/nbd `doc/proto.md`): constants,
//! the request header, reply encoders and the option payload parsers.
//! Pure functions on byte slices, so the fuzz targets reach all of them.

/// "NBDMAGIC": the first eight bytes a server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": newstyle negotiation, and the prefix of each option.
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

// Option replies.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
const REP_ERR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERR + 1;
pub const REP_ERR_POLICY: u32 = REP_ERR + 2;
pub const REP_ERR_INVALID: u32 = REP_ERR + 3;
pub const REP_ERR_PLATFORM: u32 = REP_ERR + 4;
pub const REP_ERR_TLS_REQD: u32 = REP_ERR + 5;
pub const REP_ERR_UNKNOWN: u32 = REP_ERR + 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_ERR + 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_ERR + 8;
pub const REP_ERR_TOO_BIG: u32 = REP_ERR + 9;
pub const REP_ERR_EXT_HEADER_REQD: u32 = REP_ERR + 10;

// Information types for INFO and GO.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
pub const TF_HAS_FLAGS: u16 = 1 << 0;
pub const TF_READ_ONLY: u16 = 1 << 1;
pub const TF_SEND_FLUSH: u16 = 1 << 2;
pub const TF_SEND_FUA: u16 = 1 << 3;
pub const TF_SEND_TRIM: u16 = 1 << 5;
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TF_SEND_DF: u16 = 1 << 7;
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TF_SEND_CACHE: u16 = 1 << 10;
pub const TF_SEND_FAST_ZERO: u16 = 1 << 11;

// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

// Structured reply chunks.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const CHUNK_NONE: u16 = 0;
pub const CHUNK_OFFSET_DATA: u16 = 1;
pub const CHUNK_OFFSET_HOLE: u16 = 2;
pub const CHUNK_BLOCK_STATUS: u16 = 5;
pub const CHUNK_BLOCK_STATUS_EXT: u16 = 6;
pub const CHUNK_ERROR: u16 = (1 << 15) + 1;

// base:allocation status flags.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

/// The one metadata context we offer.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// qemu's contexts of dirty bitmaps: this, then the bitmap's name.
pub const DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";
/// qemu:dirty-bitmap status: the range changed.
pub const STATE_DIRTY: u32 = 1;

// Errors carried in replies (fixed by the protocol, not the host's errno).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// Largest option payload we read; larger ones end the connection.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Longest export name or metadata query (the spec's limit).
pub const MAX_STRING: usize = 4096;

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// One transmission request, from either header form.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    /// Length of the effect (for WRITE, of the payload that follows).
    pub length: u64,
}

/// Size of a compact request header; extended ones are 32 bytes.
pub const REQUEST_LEN: usize = 28;
pub const EXTENDED_REQUEST_LEN: usize = 32;

impl Request {
    /// Parse a compact header; None on a bad magic (the connection must end).
    pub fn parse(b: &[u8; REQUEST_LEN]) -> Option<Self> {
        (be32(b, 0) == REQUEST_MAGIC).then(|| Self {
            flags: be16(b, 4),
            kind: be16(b, 6),
            cookie: be64(b, 8),
            offset: be64(b, 16),
            length: u64::from(be32(b, 24)),
        })
    }

    /// Parse an extended header; None on a bad magic.
    pub fn parse_extended(b: &[u8; EXTENDED_REQUEST_LEN]) -> Option<Self> {
        (be32(b, 0) == EXTENDED_REQUEST_MAGIC).then(|| Self {
            flags: be16(b, 4),
            kind: be16(b, 6),
            cookie: be64(b, 8),
            offset: be64(b, 16),
            length: be64(b, 24),
        })
    }

    /// Whether a payload follows the header. A WRITE always carries one,
    /// with or without PAYLOAD_LEN (qemu's extended WRITEs omit the flag).
    pub fn has_payload(&self, extended: bool) -> bool {
        self.kind == CMD_WRITE || (extended && self.flags & CMD_FLAG_PAYLOAD_LEN != 0)
    }
}

/// A simple reply header (16 bytes).
pub fn simple_reply(error: u32, cookie: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// A structured (20 bytes) or extended (32 bytes) reply chunk header.
pub fn chunk_header(
    extended: bool,
    flags: u16,
    kind: u16,
    cookie: u64,
    offset: u64,
    payload_len: u64,
) -> Vec<u8> {
    let mut b = Vec::with_capacity(32);
    if extended {
        b.extend_from_slice(&EXTENDED_REPLY_MAGIC.to_be_bytes());
    } else {
        b.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    }
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    if extended {
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&payload_len.to_be_bytes());
    } else {
        // Compact chunks carry a 32-bit length; callers keep payloads small.
        b.extend_from_slice(&(payload_len as u32).to_be_bytes());
    }
    b
}

/// An option reply header (20 bytes) followed by its payload.
pub fn option_reply(option: u32, reply: u32, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(20 + payload.len());
    b.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&reply.to_be_bytes());
    b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    b.extend_from_slice(payload);
    b
}

/// Why an option's payload could not be used.
#[derive(Debug, PartialEq, Eq)]
pub enum OptionError {
    /// Malformed: reply NBD_REP_ERR_INVALID.
    Invalid(&'static str),
    /// Well formed but over our limits: reply NBD_REP_ERR_TOO_BIG.
    TooBig(&'static str),
}

/// A little reader over an option payload that never reads past its end.
struct Cursor<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], OptionError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or(OptionError::Invalid(
                "option payload is shorter than its fields say",
            ))?;
        let out = &self.data[self.at..end];
        self.at = end;
        Ok(out)
    }
    fn u16(&mut self) -> Result<u16, OptionError> {
        self.take(2).map(|b| be16(b, 0))
    }
    fn u32(&mut self) -> Result<u32, OptionError> {
        self.take(4).map(|b| be32(b, 0))
    }
    fn string(&mut self) -> Result<String, OptionError> {
        let len = self.u32()? as usize;
        if len > MAX_STRING {
            return Err(OptionError::TooBig("string longer than 4096 bytes"));
        }
        let b = self.take(len)?;
        String::from_utf8(b.to_vec()).map_err(|_| OptionError::Invalid("string is not UTF-8"))
    }
    fn done(&self) -> Result<(), OptionError> {
        if self.at == self.data.len() {
            Ok(())
        } else {
            Err(OptionError::Invalid(
                "option payload is longer than its fields say",
            ))
        }
    }
}

/// The payload of NBD_OPT_INFO and NBD_OPT_GO.
#[derive(Debug, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub requests: Vec<u16>,
}

pub fn parse_info_request(data: &[u8]) -> Result<InfoRequest, OptionError> {
    let mut c = Cursor { data, at: 0 };
    let name = c.string()?;
    let n = c.u16()?;
    let requests = (0..n).map(|_| c.u16()).collect::<Result<Vec<_>, _>>()?;
    c.done()?;
    Ok(InfoRequest { name, requests })
}

/// The payload of NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT.
#[derive(Debug, PartialEq, Eq)]
pub struct MetaRequest {
    pub export: String,
    pub queries: Vec<String>,
}

pub fn parse_meta_request(data: &[u8]) -> Result<MetaRequest, OptionError> {
    let mut c = Cursor { data, at: 0 };
    let export = c.string()?;
    let n = c.u32()?;
    // Each query takes at least 4 bytes: a count past that is a lie.
    if n as usize > data.len() / 4 {
        return Err(OptionError::Invalid("more queries than the payload holds"));
    }
    let queries = (0..n).map(|_| c.string()).collect::<Result<Vec<_>, _>>()?;
    c.done()?;
    Ok(MetaRequest { export, queries })
}

/// Whether `query` selects base:allocation (`base:` lists the namespace).
pub fn query_selects_allocation(query: &str, listing: bool) -> bool {
    query == BASE_ALLOCATION || (listing && query == "base:")
}

/// The NBD_INFO_EXPORT payload.
pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut b = Vec::with_capacity(12);
    b.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    b.extend_from_slice(&size.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    b
}

/// The NBD_INFO_BLOCK_SIZE payload.
pub fn info_block_size(min: u32, preferred: u32, max: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(14);
    b.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    b.extend_from_slice(&min.to_be_bytes());
    b.extend_from_slice(&preferred.to_be_bytes());
    b.extend_from_slice(&max.to_be_bytes());
    b
}

/// An NBD_INFO_NAME or NBD_INFO_DESCRIPTION payload.
pub fn info_text(kind: u16, text: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(2 + text.len());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(text.as_bytes());
    b
}

/// An NBD_REP_META_CONTEXT payload.
pub fn meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + name.len());
    b.extend_from_slice(&id.to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn string(s: &str) -> Vec<u8> {
        let mut b = (s.len() as u32).to_be_bytes().to_vec();
        b.extend_from_slice(s.as_bytes());
        b
    }

    #[test]
    fn request_header_roundtrip() {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&CMD_FLAG_FUA.to_be_bytes());
        b[6..8].copy_from_slice(&CMD_WRITE.to_be_bytes());
        b[8..16].copy_from_slice(&7u64.to_be_bytes());
        b[16..24].copy_from_slice(&4096u64.to_be_bytes());
        b[24..28].copy_from_slice(&512u32.to_be_bytes());
        let r = Request::parse(&b).unwrap();
        assert_eq!(
            r,
            Request {
                flags: CMD_FLAG_FUA,
                kind: CMD_WRITE,
                cookie: 7,
                offset: 4096,
                length: 512
            }
        );
        assert!(r.has_payload(false));
        b[0] ^= 1;
        assert_eq!(Request::parse(&b), None);
    }

    #[test]
    fn info_request_parses_and_rejects_lies() {
        let mut p = string("disk");
        p.extend_from_slice(&2u16.to_be_bytes());
        p.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        p.extend_from_slice(&INFO_NAME.to_be_bytes());
        let r = parse_info_request(&p).unwrap();
        assert_eq!(r.name, "disk");
        assert_eq!(r.requests, vec![INFO_BLOCK_SIZE, INFO_NAME]);
        assert!(matches!(
            parse_info_request(&p[..p.len() - 1]),
            Err(OptionError::Invalid(_))
        ));
        let mut longer = p.clone();
        longer.push(0);
        assert!(parse_info_request(&longer).is_err());
        let huge = u32::MAX.to_be_bytes();
        assert!(parse_info_request(&huge).is_err());
    }

    #[test]
    fn meta_request_parses_and_bounds_counts() {
        let mut p = string("");
        p.extend_from_slice(&2u32.to_be_bytes());
        p.extend(string("base:allocation"));
        p.extend(string("qemu:dirty-bitmap:x"));
        let r = parse_meta_request(&p).unwrap();
        assert_eq!(r.queries.len(), 2);
        let mut lie = string("");
        lie.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_meta_request(&lie).is_err());
        assert!(query_selects_allocation("base:", true));
        assert!(!query_selects_allocation("base:", false));
    }
}
