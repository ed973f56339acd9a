//! `-o key=value,...` option strings as qemu parses them (a doubled comma is a literal comma).

use crate::CliError;

/// Splits `a=b,c=d` into pairs; `key` alone means `key=on`, and `,,` escapes a comma.
pub fn parse_kv(s: &str) -> Result<Vec<(String, String)>, CliError> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut parts = Vec::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                parts.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    parts.push(cur);
    for p in parts {
        if p.is_empty() {
            continue;
        }
        match p.split_once('=') {
            Some((k, v)) => out.push((k.to_string(), v.to_string())),
            None => out.push((p, "on".to_string())),
        }
    }
    Ok(out)
}

/// Parses qemu's boolean spellings.
pub fn parse_bool(key: &str, v: &str) -> Result<bool, CliError> {
    match v {
        "on" | "yes" | "true" | "y" => Ok(true),
        "off" | "no" | "false" | "n" => Ok(false),
        _ => Err(CliError::new(format!(
            "Parameter '{key}' expects 'on' or 'off'"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_flags() {
        let kv = parse_kv("a=1,b,c=x,,y").unwrap();
        assert_eq!(
            kv,
            vec![
                ("a".into(), "1".into()),
                ("b".into(), "on".into()),
                ("c".into(), "x,y".into())
            ]
        );
    }
}
