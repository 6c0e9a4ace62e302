//! The format layer: virtual cluster → file offset.
//!
//! A format is handed an I/O backend ([`ploop_io::BlockIo`]) and never opens
//! files itself. This crate holds no `unsafe`.
#![forbid(unsafe_code)]

pub mod descriptor;
mod error;
pub mod ploop;
pub mod raw;

pub use error::{Error, Result};

pub use ploop_io::SECTOR;

/// `text` with its control characters written as escapes (`\n`, `\x1b`),
/// so that a name from a descriptor a container's owner wrote (`<File>`
/// may hold `&#10;`) cannot start a line of its own in a log or on a
/// terminal. With `keep_newlines`, line breaks stay (a message of several
/// lines whose names are already escaped).
pub fn escape_control(text: &str, keep_newlines: bool) -> std::borrow::Cow<'_, str> {
    let needs = |c: char| c.is_control() && !(keep_newlines && c == '\n');
    if !text.chars().any(needs) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            c if !needs(c) => out.push(c),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c => out.push_str(&format!("\\x{{{:x}}}", u32::from(c))),
        }
    }
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn control_characters_are_escaped() {
        use super::escape_control;
        assert_eq!(escape_control("root.hdd", false), "root.hdd");
        assert_eq!(escape_control("a\ntoor::0:0", false), "a\\ntoor::0:0");
        assert_eq!(escape_control("\u{1b}[2J", false), "\\x{1b}[2J");
        assert_eq!(escape_control("one\ntwo\u{7}", true), "one\ntwo\\x{7}");
    }
}
