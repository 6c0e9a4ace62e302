//! `ploop`: the command-line tool. Thin: parse, call the library, print.

mod cli;
mod mount;
mod serve;
mod size;

use std::process::ExitCode;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PLOOP_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
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
            eprintln!("ploop: error: {msg}");
            ExitCode::from(1)
        }
    }
}
