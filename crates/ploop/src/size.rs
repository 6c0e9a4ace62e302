//! Size arguments, OpenVZ style: a plain number counts 512-byte sectors,
//! K/M/G/T suffixes are powers of 1024 bytes.

/// Parse a size in bytes. `plain_unit` is what a bare number counts
/// (512 for OpenVZ's `-s`, 1 for byte offsets).
pub fn parse_size(s: &str, plain_unit: u64) -> Result<u64, String> {
    let s = s.trim();
    let (digits, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("unknown size suffix in {s:?} (use K, M, G or T)")),
            };
            (&s[..i], m)
        }
        _ => (s, plain_unit),
    };
    let n: u64 = digits.parse().map_err(|_| format!("invalid size {s:?}"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suffixes_and_sectors() {
        assert_eq!(parse_size("2048", 512), Ok(1 << 20));
        assert_eq!(parse_size("10G", 512), Ok(10 << 30));
        assert_eq!(parse_size("1k", 512), Ok(1024));
        assert_eq!(parse_size("100", 1), Ok(100));
        assert!(parse_size("10X", 512).is_err());
        assert!(parse_size("", 512).is_err());
        assert!(parse_size("99999999999T", 512).is_err());
    }
}
