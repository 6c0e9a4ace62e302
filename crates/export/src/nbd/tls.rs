//! STARTTLS: X.509 server credentials (rustls) and a pump that turns a
//! TLS session into a plain socket, so that negotiation and transmission
//! run unchanged on top of it.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, ServerConnection};
use tracing::debug;

use super::Stream;

/// How long a client may take over the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

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
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
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
    let config = builder
        .with_single_cert(chain, key)
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    Ok(Arc::new(config))
}

fn tls_err(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Run the TLS handshake on `sock`, then return the plain end of a socket
/// pair; two threads move bytes between it and the session.
pub fn start(config: Arc<ServerConfig>, mut sock: Stream) -> io::Result<UnixStream> {
    let mut session = ServerConnection::new(config).map_err(tls_err)?;
    sock.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    while session.is_handshaking() {
        session.complete_io(&mut sock)?;
    }
    sock.set_read_timeout(None)?;
    let (plain, pump_end) = UnixStream::pair()?;
    let session = Arc::new(Mutex::new(session));

    let (net_in, mut net_out) = (sock.try_clone()?, sock);
    let (mut to_plain, mut from_plain) = (pump_end.try_clone()?, pump_end);
    let s = session.clone();
    std::thread::Builder::new()
        .name("nbd-tls-in".into())
        .spawn(move || {
            if let Err(e) = pump_in(&s, net_in, &mut to_plain) {
                debug!("TLS input: {e}");
            }
            let _ = to_plain.shutdown(std::net::Shutdown::Write);
        })?;
    std::thread::Builder::new()
        .name("nbd-tls-out".into())
        .spawn(move || {
            if let Err(e) = pump_out(&session, &mut from_plain, &mut net_out) {
                debug!("TLS output: {e}");
            }
            if let Ok(mut s) = session.lock() {
                s.send_close_notify();
                while s.wants_write() && s.write_tls(&mut net_out).is_ok() {}
            }
            let _ = net_out.shutdown(std::net::Shutdown::Both);
        })?;
    Ok(plain)
}

/// Network to plain: decrypt what arrives and pass it on.
fn pump_in(
    session: &Mutex<ServerConnection>,
    mut net: Stream,
    plain: &mut UnixStream,
) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut clear = Vec::with_capacity(64 * 1024);
    let mut net_out = net.try_clone()?;
    // The handshake may already have read records past its end (the
    // client's first option): pass those on before waiting for more.
    let mut received = 0;
    loop {
        let closed = {
            let mut s = session.lock().expect("TLS session lock");
            let mut data = &buf[..received];
            let mut closed = false;
            loop {
                if !data.is_empty() {
                    s.read_tls(&mut data)?;
                }
                if let Err(e) = s.process_new_packets() {
                    // Send the alert, then give up on the session.
                    while s.wants_write() && s.write_tls(&mut net_out).is_ok() {}
                    return Err(tls_err(e));
                }
                closed |= drain_plaintext(&mut s, &mut clear)?;
                if data.is_empty() {
                    break;
                }
            }
            // Handshake messages after the start (key updates) need answers.
            while s.wants_write() {
                s.write_tls(&mut net_out)?;
            }
            closed
        };
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
fn pump_out(
    session: &Mutex<ServerConnection>,
    plain: &mut UnixStream,
    net: &mut Stream,
) -> io::Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = plain.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        let mut s = session.lock().expect("TLS session lock");
        // The session takes only so much plaintext before it must send.
        let mut data = &buf[..n];
        while !data.is_empty() {
            let took = s.writer().write(data)?;
            data = &data[took..];
            while s.wants_write() {
                s.write_tls(net)?;
            }
        }
    }
}
