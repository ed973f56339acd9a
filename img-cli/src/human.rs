//! Numbers for people, formatted exactly as qemu-img formats them.

/// Formats a byte count the way qemu-img's `info` shows sizes: three significant digits and a
/// binary unit, switching to the next unit once the number would reach 1000
/// (`196 KiB`, `12.5 KiB`, `1 GiB`, `0.977 MiB`).
pub fn size_to_str(val: u64) -> String {
    const SUFFIXES: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    // The unit is the largest power of 1024 not above val * 1024 / 1000: that keeps the
    // number below 1000 in its unit.
    let scaled = val as f64 / (1000.0 / 1024.0);
    let mut i = 0usize;
    while i + 1 < SUFFIXES.len() && scaled >= (1u128 << (10 * (i + 1))) as f64 {
        i += 1;
    }
    let div = (1u64 << (10 * i)) as f64;
    format!("{} {}B", format_g(val as f64 / div, 3), SUFFIXES[i])
}

/// C's `%.<precision>g`: `precision` significant digits, trailing zeros removed, exponent
/// notation for very large or small magnitudes.
pub fn format_g(v: f64, precision: usize) -> String {
    let p = precision.max(1);
    if v == 0.0 {
        return "0".to_string();
    }
    if !v.is_finite() {
        return v.to_string();
    }
    // Round to `p` significant digits first: the exponent after rounding decides the style.
    let sci = format!("{:.*e}", p - 1, v);
    let (mantissa, exp) = sci.split_once('e').expect("exponent format has an 'e'");
    let exp: i32 = exp.parse().expect("exponent is an integer");
    if exp < -4 || exp >= p as i32 {
        let m = strip_zeros(mantissa);
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{m}e{sign}{:02}", exp.abs())
    } else {
        let decimals = (p as i32 - 1 - exp).max(0) as usize;
        strip_zeros(&format!("{v:.decimals$}")).to_string()
    }
}

fn strip_zeros(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_as_qemu_prints_them() {
        assert_eq!(size_to_str(0), "0 B");
        assert_eq!(size_to_str(999), "999 B");
        assert_eq!(size_to_str(1000), "0.977 KiB");
        assert_eq!(size_to_str(1024), "1 KiB");
        assert_eq!(size_to_str(12800), "12.5 KiB");
        assert_eq!(size_to_str(200704), "196 KiB");
        assert_eq!(size_to_str(197120), "192 KiB");
        assert_eq!(size_to_str(1 << 30), "1 GiB");
        assert_eq!(size_to_str(1023 << 10), "0.999 MiB");
        assert_eq!(size_to_str(u64::MAX), "16 EiB");
    }

    #[test]
    fn g_format() {
        assert_eq!(format_g(999.6, 3), "1e+03");
        assert_eq!(format_g(1.125, 3), "1.12");
        assert_eq!(format_g(0.5, 3), "0.5");
        assert_eq!(format_g(0.0001234, 3), "0.000123");
        assert_eq!(format_g(0.00001234, 3), "1.23e-05");
        assert_eq!(format_g(25.4, 3), "25.4");
    }
}
