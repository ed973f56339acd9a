//! `iscsi://[user[%password]@]host[:port]/target-iqn/lun`, the form qemu and libiscsi accept.

use super::IscsiError;

/// The default iSCSI port.
pub const DEFAULT_PORT: u16 = 3260;

/// A parsed `iscsi://` URL.
#[derive(Clone, PartialEq, Eq)]
pub struct IscsiUrl {
    /// Host name or address (IPv6 without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Target name (IQN).
    pub target: String,
    /// Logical unit number.
    pub lun: u16,
    /// CHAP user name.
    pub user: Option<String>,
    /// CHAP password.
    pub password: Option<String>,
}

impl IscsiUrl {
    /// Parses `name`.
    pub fn parse(name: &str) -> Result<IscsiUrl, IscsiError> {
        let bad = |why: &str| IscsiError::Url(format!("{why} in '{}'", redact(name)));
        let rest = name
            .strip_prefix("iscsi://")
            .ok_or_else(|| bad("missing iscsi:// prefix"))?;
        let (authority, path) = rest.split_once('/').ok_or_else(|| bad("no target"))?;
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let (user, password) = match userinfo {
            None => (None, None),
            Some(u) => {
                // qemu's form separates the password with '%', not ':'.
                let (user, pw) = match u.split_once('%') {
                    Some((user, pw)) => (user, Some(pw.to_string())),
                    None => (u, None),
                };
                if user.is_empty() {
                    return Err(bad("empty user name"));
                }
                (Some(user.to_string()), pw)
            }
        };
        let (host, port) = split_host_port(hostport).map_err(|w| bad(&w))?;
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let (target, lun) = path.split_once('/').ok_or_else(|| bad("no LUN"))?;
        if target.is_empty() {
            return Err(bad("no target"));
        }
        let lun = lun
            .parse::<u16>()
            .map_err(|_| bad(&format!("invalid LUN '{lun}'")))?;
        Ok(IscsiUrl {
            host,
            port,
            target: target.to_string(),
            lun,
            user,
            password,
        })
    }

    /// `host:port` as libiscsi wants the portal (IPv6 in brackets).
    pub fn portal(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// The URL for messages: never shows the password.
impl std::fmt::Display for IscsiUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("iscsi://")?;
        if let Some(user) = &self.user {
            write!(f, "{user}@")?;
        }
        write!(f, "{}/{}/{}", self.portal(), self.target, self.lun)
    }
}

impl std::fmt::Debug for IscsiUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IscsiUrl({self})")
    }
}

fn split_host_port(s: &str) -> Result<(String, u16), String> {
    let parse_port = |p: &str| p.parse::<u16>().map_err(|_| format!("invalid port '{p}'"));
    if let Some(v6) = s.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or("unclosed '['")?;
        let port = match after.strip_prefix(':') {
            Some(p) => parse_port(p)?,
            None if after.is_empty() => DEFAULT_PORT,
            None => return Err(format!("junk '{after}' after the address")),
        };
        return Ok((host.to_string(), port));
    }
    match s.split_once(':') {
        Some((h, p)) => Ok((h.to_string(), parse_port(p)?)),
        None => Ok((s.to_string(), DEFAULT_PORT)),
    }
}

/// `name` with the password (between '%' and '@' of the authority) replaced, for messages.
fn redact(name: &str) -> String {
    let Some(rest) = name.strip_prefix("iscsi://") else {
        return name.to_string();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => match rest[..at].find('%') {
            Some(pct) => format!("iscsi://{}%***{}", &rest[..pct], &rest[at..]),
            None => name.to_string(),
        },
        None => name.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_form() {
        let u =
            IscsiUrl::parse("iscsi://bob%s3cret@10.0.0.1:3261/iqn.2026-11.test:disk/2").unwrap();
        assert_eq!(u.host, "10.0.0.1");
        assert_eq!(u.port, 3261);
        assert_eq!(u.target, "iqn.2026-11.test:disk");
        assert_eq!(u.lun, 2);
        assert_eq!(u.user.as_deref(), Some("bob"));
        assert_eq!(u.password.as_deref(), Some("s3cret"));
        assert_eq!(
            u.to_string(),
            "iscsi://bob@10.0.0.1:3261/iqn.2026-11.test:disk/2"
        );
    }

    #[test]
    fn defaults_and_ipv6() {
        let u = IscsiUrl::parse("iscsi://host/iqn.x:y/0").unwrap();
        assert_eq!((u.port, u.lun, u.user.clone()), (DEFAULT_PORT, 0, None));
        let u = IscsiUrl::parse("iscsi://[::1]:3300/iqn.x:y/1").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 3300));
        assert_eq!(u.portal(), "[::1]:3300");
    }

    #[test]
    fn bad_urls_are_refused_and_hide_the_password() {
        for bad in [
            "nbd://host/x",
            "iscsi://host",
            "iscsi://host/iqn.x:y",
            "iscsi://host/iqn.x:y/",
            "iscsi://host/iqn.x:y/lun",
            "iscsi://host//1",
            "iscsi://host:port/iqn.x:y/1",
            "iscsi:///iqn.x:y/1",
            "iscsi://%pw@host/iqn.x:y/1",
        ] {
            assert!(IscsiUrl::parse(bad).is_err(), "{bad} accepted");
        }
        let e = IscsiUrl::parse("iscsi://bob%hunter2@host/iqn.x:y/x").unwrap_err();
        assert!(!e.to_string().contains("hunter2"), "{e}");
        assert!(e.to_string().contains("invalid LUN"), "{e}");
    }
}
