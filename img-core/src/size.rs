//! Sizes as users write them: `10G`, `512k`, `1.5M`, as qemu-img accepts them.

/// Parses a size with an optional k/M/G/T/P/E suffix (powers of 1024; `b` or no suffix means
/// bytes). Fractions are allowed with a suffix, as in qemu (`1.5G`). Returns `None` when the
/// text is not a size or overflows 64 bits.
pub fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (num, suffix) = text.split_at(split);
    if num.is_empty() {
        return None;
    }
    let shift = match suffix {
        "" | "b" | "B" => 0,
        "k" | "K" => 10,
        "m" | "M" => 20,
        "g" | "G" => 30,
        "t" | "T" => 40,
        "p" | "P" => 50,
        "e" | "E" => 60,
        _ => return None,
    };
    if let Some((int, frac)) = num.split_once('.') {
        if shift == 0 || frac.contains('.') {
            return None;
        }
        let int: u64 = if int.is_empty() { 0 } else { int.parse().ok()? };
        let mult = 1u128 << shift;
        let frac_val: f64 = format!("0.{frac}").parse().ok()?;
        let total = (int as u128) * mult + (frac_val * mult as f64) as u128;
        u64::try_from(total).ok()
    } else {
        let n: u64 = num.parse().ok()?;
        n.checked_mul(1u64 << shift)
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn suffixes() {
        assert_eq!(parse_size("512"), Some(512));
        assert_eq!(parse_size("1k"), Some(1024));
        assert_eq!(parse_size("10G"), Some(10 << 30));
        assert_eq!(parse_size("1.5M"), Some(3 << 19));
        assert_eq!(parse_size("16E"), None);
        assert_eq!(parse_size("x"), None);
        assert_eq!(parse_size("1Q"), None);
    }
}
