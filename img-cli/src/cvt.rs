//! Numbers on the command line, parsed with exactly the syntax qemu-img accepts: sizes such as
//! `1.5G`, ` +.5k` or `0x10`, and C-style integers for numeric options.

/// Why a number was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NumError {
    /// Not a number in the accepted syntax.
    Invalid,
    /// A number, but negative or too large.
    Range,
}

/// The multiplier a size suffix stands for.
fn suffix_mul(c: Option<u8>) -> Option<u64> {
    let shift = match c?.to_ascii_uppercase() {
        b'B' => 0,
        b'K' => 10,
        b'M' => 20,
        b'G' => 30,
        b'T' => 40,
        b'P' => 50,
        b'E' => 60,
        _ => return None,
    };
    Some(1u64 << shift)
}

/// What C's `strtoull` makes of the start of `s`: the value, where parsing stopped, and whether
/// it overflowed. `None` when no digits were found.
fn strtoull(s: &[u8], base: u32) -> Option<(u64, usize, bool)> {
    let mut i = 0;
    while i < s.len() && s[i].is_ascii_whitespace() {
        i += 1;
    }
    let mut negative = false;
    if i < s.len() && (s[i] == b'+' || s[i] == b'-') {
        negative = s[i] == b'-';
        i += 1;
    }
    let mut base = base;
    let hex_prefix = s.get(i) == Some(&b'0')
        && matches!(s.get(i + 1), Some(b'x' | b'X'))
        && s.get(i + 2).is_some_and(|c| c.is_ascii_hexdigit());
    if (base == 0 || base == 16) && hex_prefix {
        base = 16;
        i += 2;
    } else if base == 0 {
        base = if s.get(i) == Some(&b'0') { 8 } else { 10 };
    }
    let start = i;
    let mut value: u64 = 0;
    let mut overflow = false;
    while let Some(d) = s.get(i).and_then(|&c| (c as char).to_digit(base)) {
        match value
            .checked_mul(base as u64)
            .and_then(|v| v.checked_add(d as u64))
        {
            Some(v) => value = v,
            None => overflow = true,
        }
        i += 1;
    }
    if i == start {
        return None;
    }
    if negative {
        value = value.wrapping_neg();
    }
    Some((value, i, overflow))
}

/// Parses an unsigned number as qemu's numeric options do (`strtoull` with base 0, the whole
/// string): `16`, `0x10` and `020` are all sixteen, and a minus sign wraps around.
pub fn parse_u64(s: &str) -> Result<u64, NumError> {
    match strtoull(s.as_bytes(), 0) {
        None => Err(NumError::Invalid),
        Some((_, _, true)) => Err(NumError::Range),
        Some((v, end, false)) if end == s.len() => Ok(v),
        Some(_) => Err(NumError::Invalid),
    }
}

/// Parses a size option the way qemu-img's `cvtnum` reports it: `what` names the option in
/// the messages ("Invalid {what} specified: 'x'." / "... Must be between 0 and 2^63-1.").
pub fn cvtnum(what: &str, text: &str) -> Result<u64, crate::CliError> {
    match parse_size(text) {
        Ok(n) if n <= i64::MAX as u64 => Ok(n),
        Err(NumError::Invalid) => Err(crate::CliError::new(format!(
            "Invalid {what} specified: '{text}'."
        ))),
        _ => Err(crate::CliError::new(format!(
            "Invalid {what} specified. Must be between 0 and {}.",
            i64::MAX
        ))),
    }
}

/// Parses a size as qemu does: a decimal integer or fraction with an optional binary suffix
/// (`B`, `k`, `M`, `G`, `T`, `P`, `E`, any case), or a hexadecimal integer without one.
/// Fractions need a suffix and are rounded to the nearest byte.
pub fn parse_size(text: &str) -> Result<u64, NumError> {
    let s = text.as_bytes();
    let int = strtoull(s, 10);
    // An overflowing or negative number is out of range, unless more text follows it: the
    // text is then malformed, which qemu reports first.
    let range_or_trailing = |e: usize| {
        if e < s.len() {
            NumError::Invalid
        } else {
            NumError::Range
        }
    };
    let (mut val, mut end, int_ok) = match int {
        Some((_, e, true)) => return Err(range_or_trailing(e)),
        Some((v, e, false)) => {
            let signed_negative = s[..e].contains(&b'-');
            if signed_negative {
                return Err(range_or_trailing(e));
            }
            (v, e, true)
        }
        None => (0, 0, false),
    };
    let mut frac: u64 = 0;
    if int_ok && val == 0 && matches!(s.get(end), Some(b'x' | b'X')) {
        // Hexadecimal: no fraction and no suffix.
        match strtoull(s, 16) {
            Some((v, e, false)) => {
                val = v;
                end = e;
            }
            Some((_, e, true)) => return Err(range_or_trailing(e)),
            None => return Err(NumError::Invalid),
        }
        if s.get(end) == Some(&b'.') || suffix_mul(s.get(end).copied()).is_some() {
            return Err(NumError::Invalid);
        }
    } else if s.get(end) == Some(&b'.') || (!int_ok && s.contains(&b'.')) {
        if int_ok && !s.get(end + 1).is_some_and(u8::is_ascii_digit) {
            // "1." and "1.k": no fractional digits.
            end += 1;
        } else {
            // The fraction runs over digits only: an `e` is a suffix here, not an exponent.
            let mut j = end;
            while j < s.len() && s[j].is_ascii_whitespace() {
                j += 1;
            }
            let num_start = j;
            if j < s.len() && (s[j] == b'+' || s[j] == b'-') {
                j += 1;
            }
            let digits_start = j;
            while j < s.len() && s[j].is_ascii_digit() {
                j += 1;
            }
            if s.get(j) == Some(&b'.') {
                j += 1;
                while j < s.len() && s[j].is_ascii_digit() {
                    j += 1;
                }
            }
            if j == digits_start || &s[digits_start..j] == b"." {
                return Err(NumError::Invalid);
            }
            let fraction: f64 = text[num_start..j].parse().map_err(|_| NumError::Invalid)?;
            if !(0.0..=1.0).contains(&fraction) {
                return Err(NumError::Invalid);
            }
            // A 64-bit fixed-point fraction (saturating at 1.0, as qemu's conversion does).
            frac = (fraction * 18_446_744_073_709_551_616.0) as u64;
            end = j;
        }
    } else if !int_ok {
        return Err(NumError::Invalid);
    }
    let mul = match suffix_mul(s.get(end).copied()) {
        Some(m) => {
            end += 1;
            m
        }
        None => 1,
    };
    if end != s.len() {
        return Err(NumError::Invalid);
    }
    if mul == 1 {
        if frac != 0 {
            return Err(NumError::Invalid);
        }
        return Ok(val);
    }
    // Exact 64.64 fixed-point product, rounded to the nearest byte.
    let whole = val as u128 * mul as u128;
    let part = frac as u128 * mul as u128;
    let total = whole + (part >> 64) + ((part >> 63) & 1);
    u64::try_from(total).map_err(|_| NumError::Range)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_like_qemu() {
        let ok = [
            ("1.5k", 1536),
            ("0x10", 16),
            (" 5", 5),
            ("1K", 1024),
            ("1b", 1),
            ("0", 0),
            ("+5", 5),
            ("0.5k", 512),
            (".5k", 512),
            ("5.", 5),
            ("5.k", 5120),
            ("1.0000000001k", 1024),
            ("010", 10),
            (" .5k", 512),
            ("+.5k", 512),
            ("0X1F", 31),
            ("\t7", 7),
            ("1.99999999999999999999k", 2048),
            ("0.0005k", 1),
            ("0.00049k", 1),
            ("1.5e", 1729382256910270464),
            ("15.9999E", 18446628781559090944),
            ("9223372036854775807", 9223372036854775807),
        ];
        for (s, v) in ok {
            assert_eq!(parse_size(s), Ok(v), "{s:?}");
        }
        let invalid = [
            "", "abc", "1.5", "1.5b", "0x10k", "1e3", "5 ", "1kB", "1KiB", "1M5", "1 k", "k", ".k",
            ".", ".5", "1.5.5k", "0x10.5", "1.5ek", "1.5e-3k", "0xk", "0x", "00x10", "1.5e3k",
            "1 ",
        ];
        for s in invalid {
            assert_eq!(parse_size(s), Err(NumError::Invalid), "{s:?}");
        }
        for s in [
            "-5",
            " -5",
            "-0",
            "16E",
            "18446744073709551616",
            "0x10000000000000000",
        ] {
            assert_eq!(parse_size(s), Err(NumError::Range), "{s:?}");
        }
        // Trailing text makes a negative or overflowing number malformed rather than too big.
        for s in [
            "-1M",
            "-1.5k",
            "99999999999999999999k",
            "0x10000000000000000k",
        ] {
            assert_eq!(parse_size(s), Err(NumError::Invalid), "{s:?}");
        }
    }

    #[test]
    fn numbers_like_strtoull() {
        assert_eq!(parse_u64("16"), Ok(16));
        assert_eq!(parse_u64("0x10"), Ok(16));
        assert_eq!(parse_u64("020"), Ok(16));
        assert_eq!(parse_u64("-1"), Ok(u64::MAX));
        assert_eq!(parse_u64(""), Err(NumError::Invalid));
        assert_eq!(parse_u64("x"), Err(NumError::Invalid));
        assert_eq!(parse_u64("0x"), Err(NumError::Invalid));
        assert_eq!(parse_u64("99999999999999999999"), Err(NumError::Range));
    }
}
