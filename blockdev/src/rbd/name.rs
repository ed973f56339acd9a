//! Parsing QEMU's legacy RBD file names: `rbd:pool[/namespace]/image[@snap][:key=value...]`.
//!
//! A backslash makes the next character literal, so `\:`, `\@`, `\=` and `\/` can appear in
//! names and values. `conf` names the ceph.conf to read and `id` the client to authenticate as;
//! every other `key=value` is handed to librados as a configuration option, as QEMU does.

use crate::{Error, Result};

/// A parsed `rbd:` name.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct RbdName {
    /// The RADOS pool.
    pub pool: String,
    /// The RADOS namespace inside the pool, if given.
    pub namespace: Option<String>,
    /// The image.
    pub image: String,
    /// The snapshot to open (read-only), if given.
    pub snapshot: Option<String>,
    /// The ceph.conf to read (`conf=`); `None` reads Ceph's default locations.
    pub conf: Option<String>,
    /// The client id to authenticate as (`id=`); `None` is Ceph's default (admin).
    pub id: Option<String>,
    /// Other `key=value` options, handed to librados in order.
    pub options: Vec<(String, String)>,
}

/// Whether a file name is meant for the RBD backend.
pub fn is_rbd_name(name: &str) -> bool {
    name.starts_with("rbd:")
}

/// Splits `s` at the first unescaped character in `delims`, removing escapes from the token.
/// Returns the token, the delimiter found (if any) and the rest after it.
fn next_token<'a>(s: &'a str, delims: &[char]) -> (String, Option<char>, &'a str) {
    let mut token = String::new();
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        if c == '\\' {
            // A trailing backslash escapes nothing and is kept as itself.
            match chars.next() {
                Some((_, e)) => token.push(e),
                None => token.push('\\'),
            }
        } else if delims.contains(&c) {
            return (token, Some(c), &s[i + c.len_utf8()..]);
        } else {
            token.push(c);
        }
    }
    (token, None, "")
}

fn invalid(message: impl Into<String>) -> Error {
    Error::InvalidOptions {
        message: message.into(),
    }
}

impl RbdName {
    /// Parses `rbd:pool[/namespace]/image[@snap][:key=value...]`.
    pub fn parse(name: &str) -> Result<RbdName> {
        let rest = name
            .strip_prefix("rbd:")
            .ok_or_else(|| invalid("File name must start with 'rbd:'"))?;
        let mut parsed = RbdName::default();

        let (pool, delim, rest) = next_token(rest, &['/']);
        if delim.is_none() || pool.is_empty() {
            return Err(invalid("Pool name is required"));
        }
        parsed.pool = pool;

        // Either `namespace/image` or `image`, each ending at '@' (snapshot) or ':' (options).
        let (first, delim, mut rest) = next_token(rest, &['/', '@', ':']);
        let mut delim = delim;
        if delim == Some('/') {
            parsed.namespace = Some(first);
            let (image, d, r) = next_token(rest, &['@', ':']);
            parsed.image = image;
            delim = d;
            rest = r;
        } else {
            parsed.image = first;
        }
        if parsed.image.is_empty() {
            return Err(invalid("Image name is required"));
        }
        if delim == Some('@') {
            let (snap, d, r) = next_token(rest, &[':']);
            parsed.snapshot = Some(snap);
            delim = d;
            rest = r;
        }

        while delim == Some(':') {
            let (key, d, r) = next_token(rest, &['=']);
            if d.is_none() {
                return Err(invalid(format!("conf option {key} has no value")));
            }
            let (value, d, r) = next_token(r, &[':']);
            match key.as_str() {
                "conf" => parsed.conf = Some(value),
                "id" => parsed.id = Some(value),
                _ => parsed.options.push((key, value)),
            }
            delim = d;
            rest = r;
        }
        Ok(parsed)
    }

    /// The name as `pool[/namespace]/image[@snap]`, for messages.
    pub fn display(&self) -> String {
        let mut s = self.pool.clone();
        if let Some(ns) = &self.namespace {
            s.push('/');
            s.push_str(ns);
        }
        s.push('/');
        s.push_str(&self.image);
        if let Some(snap) = &self.snapshot {
            s.push('@');
            s.push_str(snap);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_and_image() {
        let n = RbdName::parse("rbd:rbd/disk").unwrap();
        assert_eq!((n.pool.as_str(), n.image.as_str()), ("rbd", "disk"));
        assert_eq!(n.namespace, None);
        assert_eq!(n.snapshot, None);
        assert_eq!(n.conf, None);
    }

    #[test]
    fn namespace_snapshot_and_options() {
        let n =
            RbdName::parse("rbd:p/ns/img@s1:conf=/etc/c.conf:id=admin:rbd_cache=false").unwrap();
        assert_eq!(n.pool, "p");
        assert_eq!(n.namespace.as_deref(), Some("ns"));
        assert_eq!(n.image, "img");
        assert_eq!(n.snapshot.as_deref(), Some("s1"));
        assert_eq!(n.conf.as_deref(), Some("/etc/c.conf"));
        assert_eq!(n.id.as_deref(), Some("admin"));
        assert_eq!(n.options, vec![("rbd_cache".into(), "false".into())]);
        assert_eq!(n.display(), "p/ns/img@s1");
    }

    #[test]
    fn escapes() {
        let n =
            RbdName::parse(r"rbd:p/a\:b\@c:conf=/tmp/x\:y.conf:mon_host=1.2.3.4\:6789").unwrap();
        assert_eq!(n.image, "a:b@c");
        assert_eq!(n.conf.as_deref(), Some("/tmp/x:y.conf"));
        assert_eq!(n.options, vec![("mon_host".into(), "1.2.3.4:6789".into())]);
    }

    #[test]
    fn errors() {
        for bad in [
            "rbd:",
            "rbd:pool",
            "rbd:/img",
            "rbd:pool/",
            "rbd:p/i:conf",
            "nbd:x",
        ] {
            assert!(RbdName::parse(bad).is_err(), "{bad} should not parse");
        }
    }
}
