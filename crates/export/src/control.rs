//! The daemon's control socket: one JSON request per connection, one JSON
//! response back.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    Status,
    Flush,
    Snapshot {
        uuid: Option<String>,
    },
    /// Merge `guid` (default: the top) with its parent.
    Merge {
        guid: Option<String>,
    },
    Delete {
        guid: String,
    },
    Stop,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<serde_json::Value>,
}

impl Response {
    pub fn ok(value: Option<serde_json::Value>) -> Self {
        Self {
            ok: true,
            error: None,
            value,
        }
    }

    pub fn err(e: impl ToString) -> Self {
        Self {
            ok: false,
            error: Some(e.to_string()),
            value: None,
        }
    }
}

/// Send one request and wait for the answer.
pub fn call(socket: &Path, req: &Request, timeout: Duration) -> Result<Response, String> {
    let mut s = UnixStream::connect(socket)
        .map_err(|e| format!("cannot reach the daemon at {}: {e}", socket.display()))?;
    s.set_read_timeout(Some(timeout)).ok();
    let mut line = serde_json::to_string(req).map_err(|e| e.to_string())?;
    line.push('\n');
    s.write_all(line.as_bytes())
        .map_err(|e| format!("daemon socket: {e}"))?;
    let mut answer = String::new();
    BufReader::new(&s)
        .read_line(&mut answer)
        .map_err(|e| format!("daemon did not answer: {e}"))?;
    serde_json::from_str(&answer).map_err(|e| format!("bad answer from daemon: {e}: {answer:?}"))
}

/// Answer requests until the handler says to stop (its second result).
pub fn serve(listener: &UnixListener, mut handle: impl FnMut(Request) -> (Response, bool)) {
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        let mut line = String::new();
        if BufReader::new(&conn).read_line(&mut line).is_err() {
            continue;
        }
        let (resp, stop) = match serde_json::from_str::<Request>(&line) {
            Ok(req) => handle(req),
            Err(e) => (Response::err(format!("bad request: {e}")), false),
        };
        if let Ok(mut out) = serde_json::to_string(&resp) {
            out.push('\n');
            let _ = conn.write_all(out.as_bytes());
        }
        if stop {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_and_response_roundtrip_over_a_socket() {
        let dir = std::env::temp_dir().join(format!("ploop-ctl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("ctl.sock");
        let _ = std::fs::remove_file(&sock);
        let listener = UnixListener::bind(&sock).unwrap();
        let server = std::thread::spawn(move || {
            let mut seen = Vec::new();
            serve(&listener, |req| {
                let stop = matches!(req, Request::Stop);
                seen.push(format!("{req:?}"));
                match req {
                    Request::Snapshot { uuid } => {
                        (Response::ok(Some(serde_json::json!(uuid))), false)
                    }
                    Request::Stop => (Response::ok(None), stop),
                    _ => (Response::err("no"), false),
                }
            });
            seen
        });
        let t = Duration::from_secs(5);
        let r = call(
            &sock,
            &Request::Snapshot {
                uuid: Some("{x}".into()),
            },
            t,
        )
        .unwrap();
        assert!(r.ok);
        assert_eq!(r.value, Some(serde_json::json!("{x}")));
        let r = call(&sock, &Request::Flush, t).unwrap();
        assert!(!r.ok);
        assert_eq!(r.error.as_deref(), Some("no"));
        // A malformed request gets an error, not a dead daemon.
        {
            let mut s = UnixStream::connect(&sock).unwrap();
            s.write_all(b"{\"cmd\":\"bogus\"}\n").unwrap();
            let mut line = String::new();
            BufReader::new(&s).read_line(&mut line).unwrap();
            assert!(line.contains("bad request"), "{line}");
        }
        assert!(call(&sock, &Request::Stop, t).unwrap().ok);
        let seen = server.join().unwrap();
        assert_eq!(seen.len(), 3);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
