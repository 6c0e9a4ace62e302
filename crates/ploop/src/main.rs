//! `ploop`: the command-line tool. Thin: parse, call the library, print.

#![forbid(unsafe_code)]

mod backup;
mod balloon;
mod cli;
mod copy;
mod mount;
mod resize;
mod serve;
mod size;

use std::process::ExitCode;

fn main() -> ExitCode {
    // A reader that goes away (`ploop info | head`) makes println! fail
    // with a broken pipe, which it reports by panicking: end quietly
    // instead, as a program killed by SIGPIPE would (status 141).
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let text = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if text.contains("failed printing to stdout") && text.contains("Broken pipe") {
            std::process::exit(141);
        }
        default_hook(info);
    }));
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PLOOP_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(|| EscapingWriter(std::io::stderr()))
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli::run() {
        Ok(code) => code,
        Err(e) => {
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&*e);
            while let Some(s) = src {
                msg.push_str(": ");
                msg.push_str(&s.to_string());
                src = s.source();
            }
            // Names in messages come from files a container's owner may
            // write: no control character reaches the terminal raw, not
            // even a line break.
            let msg = ploop_format::escape_control(&msg, false);
            eprintln!("ploop: error: {msg}");
            ExitCode::from(1)
        }
    }
}

/// Writes log events with their control characters escaped but for the
/// line break that ends each event: a name holding a newline (a `<File>`
/// with `&#10;`) cannot forge a line of the daemon's log. (The subscriber
/// escapes ANSI sequences in messages itself, since 0.3.20, so its own
/// colours on a terminal are the only ones left to keep.)
struct EscapingWriter<W>(W);

impl<W: std::io::Write> std::io::Write for EscapingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        let (body, end) = match text.strip_suffix('\n') {
            Some(body) => (body, "\n"),
            None => (&*text, ""),
        };
        let escaped: String = body
            .split('\u{1b}')
            .map(|part| ploop_format::escape_control(part, false))
            .collect::<Vec<_>>()
            .join("\u{1b}");
        self.0.write_all(escaped.as_bytes())?;
        self.0.write_all(end.as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}
