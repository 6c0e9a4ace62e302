//! STARTTLS: X.509 server credentials (rustls) and a pump that turns a
//! TLS session into a plain socket, so that negotiation and transmission
//! run unchanged on top of it.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, ServerConnection};
use tracing::debug;

use super::Stream;

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate in it", path.display()));
    }
    Ok(certs)
}

/// Server credentials: a certificate chain and its key (PEM); with a CA,
/// clients must present a certificate that it signed.
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<Arc<ServerConfig>, String> {
    let chain = certs(cert)?;
    let key_path = key;
    let key =
        PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key_path.display()))?;
    // aws-lc, not ring: ring takes only some RSA sizes (a 2432-bit key,
    // as the NBD project's own tests use, was refused).
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    // The key on its own first, so that a key it cannot use is named.
    let signing = provider
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| format!("{}: {e}", key_path.display()))?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match client_ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in certs(ca)? {
                roots.add(c).map_err(|e| format!("{}: {e}", ca.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("{}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let certified = rustls::sign::CertifiedKey::new(chain, signing);
    certified
        .keys_match()
        .map_err(|e| format!("{} and {}: {e}", cert.display(), key_path.display()))?;
    let config = builder
        .with_single_cert(certified.cert, key)
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    Ok(Arc::new(config))
}

fn tls_err(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// One TLS session shared by the two pump threads. Records are made under
/// `session` and sent under `net_out`, taken before `session` is let go so
/// that they leave in order; no socket I/O happens under `session`, so a
/// client that is slow to read does not stop its requests being decrypted.
struct Tls {
    session: Mutex<ServerConnection>,
    net_out: Mutex<Stream>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Tls {
    /// Send whatever records the session has made.
    fn send(&self, mut session: MutexGuard<'_, ServerConnection>) -> io::Result<()> {
        let mut records = Vec::new();
        while session.wants_write() {
            session.write_tls(&mut records)?;
        }
        if records.is_empty() {
            return Ok(());
        }
        let mut net = lock(&self.net_out);
        drop(session);
        net.write_all(&records)
    }
}

/// Run the TLS handshake on `sock` (by `until`), then return the plain end
/// of a socket pair; two threads move bytes between it and the session.
pub fn start(
    config: Arc<ServerConfig>,
    mut sock: Stream,
    until: Instant,
    send_timeout: Duration,
) -> io::Result<UnixStream> {
    let mut session = ServerConnection::new(config).map_err(tls_err)?;
    while session.is_handshaking() {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        sock.set_read_timeout(Some(left))?;
        session.complete_io(&mut sock)?;
    }
    sock.set_read_timeout(None)?;
    // A client that stops reading cuts its own connection.
    sock.set_write_timeout(Some(send_timeout))?;
    // Bounded by what one read from the plain side brings.
    session.set_buffer_limit(None);
    let (plain, pump_end) = UnixStream::pair()?;
    let tls = Arc::new(Tls {
        session: Mutex::new(session),
        net_out: Mutex::new(sock.try_clone()?),
    });
    let net_in = sock;
    let (mut to_plain, mut from_plain) = (pump_end.try_clone()?, pump_end);
    let t = tls.clone();
    std::thread::Builder::new()
        .name("nbd-tls-in".into())
        .spawn(move || {
            if let Err(e) = pump_in(&t, net_in, &mut to_plain) {
                debug!("TLS input: {e}");
            }
            let _ = to_plain.shutdown(std::net::Shutdown::Write);
        })?;
    std::thread::Builder::new()
        .name("nbd-tls-out".into())
        .spawn(move || {
            if let Err(e) = pump_out(&tls, &mut from_plain) {
                debug!("TLS output: {e}");
            }
            let mut session = lock(&tls.session);
            session.send_close_notify();
            let _ = tls.send(session);
            let _ = lock(&tls.net_out).shutdown(std::net::Shutdown::Both);
            // Wakes the input side if the client is still sending.
            let _ = from_plain.shutdown(std::net::Shutdown::Both);
        })?;
    Ok(plain)
}

/// Network to plain: decrypt what arrives and pass it on.
fn pump_in(tls: &Tls, mut net: Stream, plain: &mut UnixStream) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut clear = Vec::with_capacity(64 * 1024);
    // The handshake may already have read records past its end (the
    // client's first option): pass those on before waiting for more.
    let mut received = 0;
    loop {
        let mut session = lock(&tls.session);
        let mut data = &buf[..received];
        let mut closed = false;
        loop {
            if !data.is_empty() && session.read_tls(&mut data)? == 0 {
                closed = true; // close_notify seen: the rest is ignored
                break;
            }
            if let Err(e) = session.process_new_packets() {
                // Send the alert, then give up on the session.
                let _ = tls.send(session);
                return Err(tls_err(e));
            }
            closed |= drain_plaintext(&mut session, &mut clear)?;
            if data.is_empty() || closed {
                break;
            }
        }
        // Handshake messages after the start (key updates) need answers.
        tls.send(session)?;
        plain.write_all(&clear)?;
        clear.clear();
        if closed {
            return Ok(());
        }
        received = net.read(&mut buf)?;
        if received == 0 {
            return Ok(());
        }
    }
}

/// Move the session's decrypted bytes to `clear`; true once the peer has
/// closed the session.
fn drain_plaintext(s: &mut ServerConnection, clear: &mut Vec<u8>) -> io::Result<bool> {
    loop {
        let at = clear.len();
        clear.resize(at + 64 * 1024, 0);
        let r = s.reader().read(&mut clear[at..]);
        match r {
            Ok(0) => {
                clear.truncate(at);
                return Ok(true);
            }
            Ok(got) => clear.truncate(at + got),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                clear.truncate(at);
                return Ok(false);
            }
            Err(e) => {
                clear.truncate(at);
                return Err(e);
            }
        }
    }
}

/// Plain to network: encrypt what the server writes.
fn pump_out(tls: &Tls, plain: &mut UnixStream) -> io::Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = plain.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        let mut session = lock(&tls.session);
        session.writer().write_all(&buf[..n])?;
        tls.send(session)?;
    }
}
