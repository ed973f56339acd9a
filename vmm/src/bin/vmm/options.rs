//! QEMU-style `key=value,...` option strings: splitting (with `,,` standing for a comma in a
//! value, as in QEMU), and typed values with QEMU's spellings.

use crate::Fail;

/// An option string split into its keys and values, each key looked at once at most.
pub struct OptionList {
    /// What the user wrote (for messages).
    spec: String,
    /// The option's name (`-drive`, `-device`, ...), for messages.
    opt: &'static str,
    pairs: Vec<(String, String)>,
}

impl OptionList {
    /// Splits `spec`. A leading part without `=` is taken as the value of `implied` (QEMU's
    /// `-device scsi-hd,...` names the driver that way); elsewhere every part needs a `=`.
    pub fn parse(opt: &'static str, spec: &str, implied: Option<&str>) -> Result<Self, Fail> {
        let mut pairs = Vec::new();
        for (i, part) in split_commas(spec).into_iter().enumerate() {
            match part.split_once('=') {
                Some((k, v)) => pairs.push((k.to_string(), v.to_string())),
                None => match implied {
                    Some(key) if i == 0 => pairs.push((key.to_string(), part)),
                    // QEMU's short forms of booleans: `server` for `server=on`.
                    _ if !part.is_empty() => pairs.push((part, "on".to_string())),
                    _ => return Err(Fail(format!("{opt} {spec}: empty option"))),
                },
            }
        }
        Ok(Self {
            spec: spec.to_string(),
            opt,
            pairs,
        })
    }

    /// The error for this option string.
    pub fn fail(&self, msg: impl std::fmt::Display) -> Fail {
        Fail(format!("{} {}: {msg}", self.opt, self.spec))
    }

    /// Takes the value of `key` (the last one if repeated, as QEMU does).
    pub fn take(&mut self, key: &str) -> Option<String> {
        let mut found = None;
        self.pairs.retain(|(k, v)| {
            if k == key {
                found = Some(v.clone());
                false
            } else {
                true
            }
        });
        found
    }

    /// Takes a boolean (`on`/`off`, `yes`/`no`, `true`/`false`).
    pub fn take_bool(&mut self, key: &str) -> Result<Option<bool>, Fail> {
        self.take(key)
            .map(|v| match v.as_str() {
                "on" | "yes" | "true" => Ok(true),
                "off" | "no" | "false" => Ok(false),
                _ => Err(self.fail(format!("Parameter '{key}' expects 'on' or 'off'"))),
            })
            .transpose()
    }

    /// Takes a number.
    pub fn take_num<T: std::str::FromStr>(&mut self, key: &str) -> Result<Option<T>, Fail> {
        self.take(key)
            .map(|v| {
                v.parse()
                    .map_err(|_| self.fail(format!("Parameter '{key}' expects a number")))
            })
            .transpose()
    }

    /// Takes a size in bytes (a number with an optional K, M, G, T suffix).
    pub fn take_size(&mut self, key: &str) -> Result<Option<u64>, Fail> {
        self.take(key)
            .map(|v| parse_size(&v, 0).map_err(|e| self.fail(format!("Parameter '{key}' {e}"))))
            .transpose()
    }

    /// Takes a value that `parse` must accept; `what` lists the accepted values.
    pub fn take_with<T>(
        &mut self,
        key: &str,
        what: &str,
        parse: impl Fn(&str) -> Option<T>,
    ) -> Result<Option<T>, Fail> {
        self.take(key)
            .map(|v| {
                parse(&v).ok_or_else(|| {
                    self.fail(format!("invalid {key} option '{v}' (expected {what})"))
                })
            })
            .transpose()
    }

    /// Fails on the first key nobody took.
    pub fn finish(self) -> Result<(), Fail> {
        match self.pairs.first() {
            Some((k, _)) => Err(self.fail(format!("unsupported option '{k}'"))),
            None => Ok(()),
        }
    }
}

/// Splits at commas, where `,,` is a literal comma.
fn split_commas(s: &str) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            ',' if chars.peek() == Some(&',') => {
                chars.next();
                parts.last_mut().unwrap().push(',');
            }
            ',' => parts.push(String::new()),
            c => parts.last_mut().unwrap().push(c),
        }
    }
    parts
}

/// A size as QEMU takes it (`img_core::size::parse_size`: an optional K, M, G, T, P, E
/// suffix, fractions with one); a bare number is shifted by `default_shift` (QEMU's `-m`
/// counts MiB, its block options bytes).
pub fn parse_size(s: &str, default_shift: u32) -> Result<u64, String> {
    let bad = || format!("expects a non-negative number below 2^64 (got '{s}')");
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        let n: u64 = s.parse().map_err(|_| bad())?;
        return n.checked_mul(1 << default_shift).ok_or_else(bad);
    }
    img_core::size::parse_size(s).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubled_commas_are_literal_and_short_booleans_mean_on() {
        let mut o =
            OptionList::parse("-qmp", "unix:/a,,b.sock,server,wait=off", Some("path")).unwrap();
        assert_eq!(o.take("path").as_deref(), Some("unix:/a,b.sock"));
        assert_eq!(o.take_bool("server").ok().flatten(), Some(true));
        assert_eq!(o.take_bool("wait").ok().flatten(), Some(false));
        assert!(o.finish().is_ok());
    }

    #[test]
    fn typed_values_and_leftovers_fail_with_the_option_named() {
        let mut o = OptionList::parse("-drive", "x=1,y=maybe,z=2k,w=1", None).unwrap();
        assert_eq!(o.take_num::<u8>("x").ok().flatten(), Some(1));
        let e = o.take_bool("y").err().unwrap();
        assert!(e.0.contains("-drive x=1,y=maybe"), "{}", e.0);
        assert_eq!(o.take_size("z").ok().flatten(), Some(2048));
        assert_eq!(o.take("gone"), None);
        assert!(o.finish().err().unwrap().0.contains("'w'"));
        assert_eq!(parse_size("64", 20), Ok(64 << 20));
        assert!(parse_size("1Q", 0).is_err());
        assert!(parse_size("99999999999T", 0).is_err());
    }
}
