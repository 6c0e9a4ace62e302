//! Play one client's bytes against the server, all in memory: the
//! negotiation and then the requests, on a small ploop disk held in a
//! `MemIo`. The fuzz targets and the tests drive this; it must never
//! panic or hang, whatever the bytes.

use std::io::{self, BufReader, Read, Write};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use ploop_image::served::ServedDisk;

use super::handshake::{self, Agreed, Outcome, TlsPolicy};
use super::transmission::{self, Connection, Inline, ReplySink, Shared};
use super::{proto, Export};

/// Size of the replayed disk, and its cluster size.
pub const DISK_SIZE: u64 = 1 << 20;
const CLUSTER: u64 = 64 << 10;

/// The client's bytes in, the server's bytes out.
struct Pipe<'a> {
    input: &'a [u8],
    output: Arc<Mutex<Vec<u8>>>,
}

impl Read for Pipe<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Pipe<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.lock().expect("output").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().expect("output").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl ReplySink for Sink {}

/// A fresh export on an in-memory ploop delta.
pub fn memory_export(read_only: bool) -> Arc<Export> {
    Arc::new(Export {
        name: "replay".into(),
        description: String::new(),
        read_only,
        disk: Arc::new(ServedDisk::in_memory(DISK_SIZE, CLUSTER, read_only)),
    })
}

/// Run a session from the server's greeting to the end of `input`;
/// returns what the server sent.
pub fn session(export: &Arc<Export>, input: &[u8]) -> Vec<u8> {
    let output = Arc::new(Mutex::new(Vec::new()));
    let mut pipe = Pipe {
        input,
        output: output.clone(),
    };
    let transmit = (|| -> io::Result<Option<Agreed>> {
        let Some(flags) = handshake::greet(&mut pipe)? else {
            return Ok(None);
        };
        let agreed = Agreed {
            no_zeroes: flags & proto::FLAG_C_NO_ZEROES != 0,
            ..Agreed::default()
        };
        match handshake::negotiate(&mut pipe, export, TlsPolicy::Off, agreed)? {
            Outcome::Transmit(a) => Ok(Some(a)),
            Outcome::Close | Outcome::StartTls(_) => Ok(None),
        }
    })();
    if let Ok(Some(agreed)) = transmit {
        let shared = Shared::new(Box::new(Inline), false, Arc::new(AtomicBool::new(false)));
        let conn = Connection::new(
            export.clone(),
            agreed,
            Box::new(Sink(output.clone())),
            shared,
        );
        let mut requests = BufReader::new(pipe.input);
        transmission::serve_requests(&conn, &mut requests, None);
    }
    let out = output.lock().expect("output").clone();
    out
}

/// A session for a request stream alone: a client that negotiated
/// structured replies and base:allocation (when `structured`), then sent
/// `requests`.
pub fn requests_session(export: &Arc<Export>, structured: bool, requests: &[u8]) -> Vec<u8> {
    let mut input = Vec::new();
    input
        .extend_from_slice(&(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES).to_be_bytes());
    let option = |input: &mut Vec<u8>, opt: u32, data: &[u8]| {
        input.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
        input.extend_from_slice(&opt.to_be_bytes());
        input.extend_from_slice(&(data.len() as u32).to_be_bytes());
        input.extend_from_slice(data);
    };
    if structured {
        option(&mut input, proto::OPT_STRUCTURED_REPLY, &[]);
        let mut meta = 0u32.to_be_bytes().to_vec();
        meta.extend_from_slice(&1u32.to_be_bytes());
        meta.extend_from_slice(&(proto::BASE_ALLOCATION.len() as u32).to_be_bytes());
        meta.extend_from_slice(proto::BASE_ALLOCATION.as_bytes());
        option(&mut input, proto::OPT_SET_META_CONTEXT, &meta);
    }
    let mut go = 0u32.to_be_bytes().to_vec();
    go.extend_from_slice(&0u16.to_be_bytes());
    option(&mut input, proto::OPT_GO, &go);
    input.extend_from_slice(requests);
    session(export, &input)
}

/// A request header as a client sends it (simple, not extended).
#[cfg(test)]
pub(crate) fn request(kind: u16, flags: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut b = proto::REQUEST_MAGIC.to_be_bytes().to_vec();
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&offset.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The simple replies in a byte stream after the negotiation.
    fn simple_replies(out: &[u8]) -> Vec<(u32, u64)> {
        let magic = proto::SIMPLE_REPLY_MAGIC.to_be_bytes();
        out.windows(16)
            .filter(|w| w[..4] == magic)
            .map(|w| {
                (
                    u32::from_be_bytes(w[4..8].try_into().unwrap()),
                    u64::from_be_bytes(w[8..16].try_into().unwrap()),
                )
            })
            .collect()
    }

    #[test]
    fn write_then_read_back_in_one_session() {
        let export = memory_export(false);
        let mut reqs = request(proto::CMD_WRITE, 0, 1, 4096, 512);
        reqs.extend_from_slice(&[0xab; 512]);
        reqs.extend(request(proto::CMD_FLUSH, 0, 2, 0, 0));
        reqs.extend(request(proto::CMD_READ, 0, 3, 4096, 512));
        reqs.extend(request(proto::CMD_READ, 0, 4, DISK_SIZE, 1));
        reqs.extend(request(proto::CMD_DISC, 0, 5, 0, 0));
        let out = requests_session(&export, false, &reqs);
        let replies = simple_replies(&out);
        assert_eq!(
            replies,
            vec![(0, 1), (0, 2), (0, 3), (proto::EINVAL, 4)],
            "{out:02x?}"
        );
        assert!(out.windows(512).any(|w| w.iter().all(|&b| b == 0xab)));
    }

    /// Deterministic noise (the project's shared generator).
    fn noise(seed: u64, len: usize) -> Vec<u8> {
        ploop_test_support::data(seed, len)
    }

    /// Random bytes, and random requests with valid magic, never panic or
    /// hang the server (the fuzz targets do the same, for longer).
    #[test]
    fn random_sessions_end_cleanly() {
        let export = memory_export(false);
        for seed in 0..300u64 {
            let _ = session(&export, &noise(seed, (seed as usize * 37) % 2000));
            let mut reqs = Vec::new();
            let bytes = noise(seed ^ 0x5555, 64 * 40);
            for r in bytes.chunks(64) {
                let kind = u16::from(r[0] % 10);
                let flags = u16::from(r[1]) & 0x3f;
                let offset = u64::from_be_bytes(r[2..10].try_into().unwrap()) % (DISK_SIZE + 8192);
                let len = u32::from_be_bytes(r[10..14].try_into().unwrap()) % 200_000;
                reqs.extend(request(kind, flags, seed, offset, len));
                if kind == proto::CMD_WRITE {
                    reqs.extend(std::iter::repeat_n(r[14], len as usize));
                }
            }
            let _ = requests_session(&export, seed % 2 == 0, &reqs);
        }
    }
}
