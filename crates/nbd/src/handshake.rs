//! Fixed newstyle negotiation: the greeting, then options until the
//! client picks an export (GO or EXPORT_NAME), aborts, or asks for TLS.

use std::io::{self, Read, Write};

use tracing::debug;

use super::proto::*;
use super::Export;
use ploop_format::ploop::cbt::Cbt;
use std::sync::Arc;

/// What the client and server agreed on, carried into transmission.
#[derive(Clone, Debug, Default)]
pub struct Agreed {
    /// The client sent NBD_FLAG_C_NO_ZEROES.
    pub no_zeroes: bool,
    pub tls_done: bool,
    pub structured: bool,
    pub extended: bool,
    /// Context id of base:allocation, when the client selected it.
    pub allocation: Option<u32>,
    /// The dirty bitmap the client selected (qemu:dirty-bitmap:UUID).
    pub bitmap: Option<Arc<Cbt>>,
}

/// How negotiation ended.
#[derive(Debug)]
pub enum Outcome {
    /// Enter transmission with these terms.
    Transmit(Agreed),
    /// STARTTLS was acknowledged: wrap the stream, then call
    /// [`negotiate`] again with `tls_done` set.
    StartTls(Agreed),
    /// The client aborted or went away, or broke the protocol.
    Close,
}

/// The server's side of the TLS policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsPolicy {
    /// No TLS offered: STARTTLS gets NBD_REP_ERR_POLICY.
    Off,
    /// TLS offered and required before anything but ABORT.
    Required,
}

/// Options one client may send before it must choose an export.
const MAX_OPTIONS: usize = 1024;

/// The id we give base:allocation.
pub const ALLOCATION_ID: u32 = 1;
/// The id we give the dirty bitmap's context.
pub const BITMAP_ID: u32 = 2;

/// Send the greeting and read the client flags. Returns the flags, or
/// None when the client sent flags we do not know (the spec says close).
pub fn greet<S: Read + Write>(s: &mut S) -> io::Result<Option<u32>> {
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBD_MAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&hello)?;
    s.flush()?;
    let mut flags = [0u8; 4];
    s.read_exact(&mut flags)?;
    let flags = u32::from_be_bytes(flags);
    let known = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;
    Ok((flags & !known == 0).then_some(flags))
}

fn reply<S: Write>(s: &mut S, option: u32, kind: u32, payload: &[u8]) -> io::Result<()> {
    s.write_all(&option_reply(option, kind, payload))
}

fn error<S: Write>(s: &mut S, option: u32, kind: u32, why: &str) -> io::Result<()> {
    debug!("option {option}: error {kind:#x}: {why}");
    reply(s, option, kind, why.as_bytes())
}

/// The transmission flags an export advertises.
pub fn transmission_flags(export: &Export, agreed: &Agreed) -> u16 {
    let mut f = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_CAN_MULTI_CONN | TF_SEND_CACHE;
    if export.read_only {
        f |= TF_READ_ONLY;
    } else {
        f |= TF_SEND_FUA | TF_SEND_TRIM | TF_SEND_WRITE_ZEROES | TF_SEND_FAST_ZERO;
    }
    if agreed.structured || agreed.extended {
        f |= TF_SEND_DF;
    }
    f
}

/// Run options until the client chooses. `agreed` carries the state of an
/// earlier round (before STARTTLS, or the client flags from [`greet`]).
pub fn negotiate<S: Read + Write>(
    s: &mut S,
    export: &Export,
    tls: TlsPolicy,
    mut agreed: Agreed,
) -> io::Result<Outcome> {
    for _ in 0..MAX_OPTIONS {
        let mut head = [0u8; 16];
        match s.read_exact(&mut head) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(Outcome::Close),
            Err(e) => return Err(e),
        }
        let magic = u64::from_be_bytes(head[0..8].try_into().expect("8 bytes"));
        let option = u32::from_be_bytes(head[8..12].try_into().expect("4 bytes"));
        let len = u32::from_be_bytes(head[12..16].try_into().expect("4 bytes"));
        if magic != IHAVEOPT {
            debug!("bad option magic {magic:#x}: closing");
            return Ok(Outcome::Close);
        }
        if len > MAX_OPTION_LEN {
            // Not worth reading: the spec lets a server drop such a client.
            debug!("option {option} with a {len}-byte payload: closing");
            return Ok(Outcome::Close);
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data)?;

        let tls_missing = tls == TlsPolicy::Required && !agreed.tls_done;
        if tls_missing && option != OPT_STARTTLS && option != OPT_ABORT {
            if option == OPT_EXPORT_NAME {
                return Ok(Outcome::Close); // no way to send an error
            }
            error(
                s,
                option,
                REP_ERR_TLS_REQD,
                "TLS is required: send STARTTLS first",
            )?;
            s.flush()?;
            continue;
        }
        match option {
            OPT_EXPORT_NAME => {
                if agreed.extended {
                    return Ok(Outcome::Close); // the spec forbids it: GO only
                }
                let Ok(name) = String::from_utf8(data) else {
                    return Ok(Outcome::Close);
                };
                if !export.answers_to(&name) {
                    debug!("EXPORT_NAME {name:?}: no such export, closing");
                    return Ok(Outcome::Close);
                }
                let mut b = Vec::with_capacity(134);
                b.extend_from_slice(&export.size().to_be_bytes());
                b.extend_from_slice(&transmission_flags(export, &agreed).to_be_bytes());
                if !agreed.no_zeroes {
                    b.extend_from_slice(&[0u8; 124]);
                }
                s.write_all(&b)?;
                s.flush()?;
                return Ok(Outcome::Transmit(agreed));
            }
            OPT_ABORT => {
                // Best effort: the client may already be gone.
                let _ = reply(s, option, REP_ACK, &[]).and_then(|_| s.flush());
                return Ok(Outcome::Close);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    error(s, option, REP_ERR_INVALID, "LIST takes no payload")?;
                } else {
                    let mut p = (export.name.len() as u32).to_be_bytes().to_vec();
                    p.extend_from_slice(export.name.as_bytes());
                    p.extend_from_slice(export.description.as_bytes());
                    reply(s, option, REP_SERVER, &p)?;
                    reply(s, option, REP_ACK, &[])?;
                }
            }
            OPT_STARTTLS => {
                if !data.is_empty() {
                    error(s, option, REP_ERR_INVALID, "STARTTLS takes no payload")?;
                } else if agreed.tls_done {
                    error(s, option, REP_ERR_INVALID, "TLS is already on")?;
                } else if tls == TlsPolicy::Off {
                    error(
                        s,
                        option,
                        REP_ERR_POLICY,
                        "this server has no TLS configured",
                    )?;
                } else {
                    reply(s, option, REP_ACK, &[])?;
                    s.flush()?;
                    // What was agreed in the clear does not carry over.
                    return Ok(Outcome::StartTls(Agreed {
                        no_zeroes: agreed.no_zeroes,
                        ..Agreed::default()
                    }));
                }
            }
            OPT_INFO | OPT_GO => {
                let req = match parse_info_request(&data) {
                    Ok(r) => r,
                    Err(e) => {
                        option_error(s, option, e)?;
                        s.flush()?;
                        continue;
                    }
                };
                if !export.answers_to(&req.name) {
                    error(s, option, REP_ERR_UNKNOWN, "no export of that name")?;
                    s.flush()?;
                    continue;
                }
                let flags = transmission_flags(export, &agreed);
                reply(s, option, REP_INFO, &info_export(export.size(), flags))?;
                for r in &req.requests {
                    match *r {
                        INFO_NAME => {
                            reply(s, option, REP_INFO, &info_text(INFO_NAME, &export.name))?
                        }
                        INFO_DESCRIPTION if !export.description.is_empty() => reply(
                            s,
                            option,
                            REP_INFO,
                            &info_text(INFO_DESCRIPTION, &export.description),
                        )?,
                        _ => {}
                    }
                }
                let (min, preferred, max) = export.block_sizes();
                reply(s, option, REP_INFO, &info_block_size(min, preferred, max))?;
                reply(s, option, REP_ACK, &[])?;
                s.flush()?;
                if option == OPT_GO {
                    return Ok(Outcome::Transmit(agreed));
                }
                continue;
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    error(
                        s,
                        option,
                        REP_ERR_INVALID,
                        "STRUCTURED_REPLY takes no payload",
                    )?;
                } else if agreed.extended {
                    error(
                        s,
                        option,
                        REP_ERR_EXT_HEADER_REQD,
                        "extended headers are on",
                    )?;
                } else {
                    agreed.structured = true;
                    reply(s, option, REP_ACK, &[])?;
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let set = option == OPT_SET_META_CONTEXT;
                if set {
                    // A SET replaces the selection even when it fails.
                    agreed.allocation = None;
                    agreed.bitmap = None;
                }
                let req = match parse_meta_request(&data) {
                    Ok(r) => r,
                    Err(e) => {
                        option_error(s, option, e)?;
                        s.flush()?;
                        continue;
                    }
                };
                if !agreed.structured && !agreed.extended {
                    error(
                        s,
                        option,
                        REP_ERR_INVALID,
                        "negotiate structured replies first",
                    )?;
                } else if !export.answers_to(&req.export) {
                    error(s, option, REP_ERR_UNKNOWN, "no export of that name")?;
                } else {
                    // A SET replaces the earlier selection, even with no match.
                    let listing = !set;
                    let wanted = if req.queries.is_empty() {
                        listing
                    } else {
                        req.queries
                            .iter()
                            .any(|q| query_selects_allocation(q, listing))
                    };
                    let bitmap = export.dirty_bitmap();
                    let bitmap_name = bitmap.as_deref().map(crate::bitmap_context);
                    let bitmap_wanted = bitmap_name.as_deref().is_some_and(|name| {
                        if req.queries.is_empty() {
                            listing
                        } else {
                            req.queries.iter().any(|q| {
                                q == name || (listing && (q == "qemu:" || q == DIRTY_BITMAP_PREFIX))
                            })
                        }
                    });
                    if set {
                        agreed.allocation = wanted.then_some(ALLOCATION_ID);
                        agreed.bitmap = if bitmap_wanted { bitmap.clone() } else { None };
                    }
                    // Ids in a LIST answer mean nothing: the spec asks for 0.
                    if wanted {
                        let id = if set { ALLOCATION_ID } else { 0 };
                        let p = meta_context(id, BASE_ALLOCATION);
                        reply(s, option, REP_META_CONTEXT, &p)?;
                    }
                    if let (true, Some(name)) = (bitmap_wanted, &bitmap_name) {
                        let id = if set { BITMAP_ID } else { 0 };
                        reply(s, option, REP_META_CONTEXT, &meta_context(id, name))?;
                    }
                    reply(s, option, REP_ACK, &[])?;
                }
            }
            OPT_EXTENDED_HEADERS => {
                if !data.is_empty() {
                    error(
                        s,
                        option,
                        REP_ERR_INVALID,
                        "EXTENDED_HEADERS takes no payload",
                    )?;
                } else {
                    agreed.extended = true;
                    reply(s, option, REP_ACK, &[])?;
                }
            }
            other => {
                error(s, other, REP_ERR_UNSUP, "option not supported")?;
            }
        }
        s.flush()?;
    }
    debug!("more than {MAX_OPTIONS} options: closing");
    Ok(Outcome::Close)
}

fn option_error<S: Write>(s: &mut S, option: u32, e: OptionError) -> io::Result<()> {
    match e {
        OptionError::Invalid(why) => error(s, option, REP_ERR_INVALID, why),
        OptionError::TooBig(why) => error(s, option, REP_ERR_TOO_BIG, why),
    }
}
