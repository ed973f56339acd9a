//! NBD (Network Block Device): the wire protocol shared by client and server ([`proto`]),
//! export names in the forms qemu accepts ([`NbdAddress`]), the socket both ends talk over
//! ([`Stream`]) and the client storage ([`NbdStorage`]).

pub mod client;
pub mod proto;

pub use client::NbdStorage;

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;

/// Where an NBD export lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Server {
    /// A TCP server.
    Tcp {
        /// Host name or address (IPv6 without brackets).
        host: String,
        /// Port.
        port: u16,
    },
    /// A unix socket.
    Unix {
        /// Socket path.
        path: String,
    },
}

impl std::fmt::Display for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Server::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            Server::Tcp { host, port } => write!(f, "{host}:{port}"),
            Server::Unix { path } => write!(f, "{path}"),
        }
    }
}

/// An export: the server and the export name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdAddress {
    /// The server.
    pub server: Server,
    /// The export name ("" is the default export).
    pub export: String,
}

/// Whether `name` is an NBD name (`nbd://`, `nbd+tcp://`, `nbd+unix://`, or qemu's legacy
/// `nbd:` syntax) rather than a file name.
pub fn is_nbd_name(name: &str) -> bool {
    name.starts_with("nbd:") || name.starts_with("nbd+tcp://") || name.starts_with("nbd+unix://")
}

/// Decodes %XX escapes of a URL component.
fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("invalid escape in '{s}'"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("'{s}' is not UTF-8"))
}

fn parse_port(p: &str) -> Result<u16, String> {
    p.parse::<u16>()
        .map_err(|_| format!("invalid port number '{p}'"))
}

/// Splits "host[:port]" (IPv6 in brackets).
fn parse_host_port(hp: &str) -> Result<(String, u16), String> {
    if let Some(rest) = hp.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("invalid address '{hp}'"))?;
        let port = match after.strip_prefix(':') {
            Some(p) => parse_port(p)?,
            None if after.is_empty() => proto::DEFAULT_PORT,
            None => return Err(format!("invalid address '{hp}'")),
        };
        return Ok((host.to_string(), port));
    }
    match hp.rsplit_once(':') {
        Some((h, p)) => Ok((h.to_string(), parse_port(p)?)),
        None => Ok((hp.to_string(), proto::DEFAULT_PORT)),
    }
}

impl NbdAddress {
    /// The name qemu shows for the export (`nbd://host:port[/export]`,
    /// `nbd+unix://[/export]?socket=path`).
    pub fn canonical(&self) -> String {
        match (&self.server, self.export.is_empty()) {
            (Server::Unix { path }, true) => format!("nbd+unix://?socket={path}"),
            (Server::Unix { path }, false) => format!("nbd+unix:///{}?socket={path}", self.export),
            (Server::Tcp { host, port }, true) => format!("nbd://{host}:{port}"),
            (Server::Tcp { host, port }, false) => {
                format!("nbd://{host}:{port}/{}", self.export)
            }
        }
    }

    /// Parses `nbd://host[:port]/export`, `nbd+unix:///export?socket=/path`, and qemu's
    /// legacy `nbd:host:port[:exportname=NAME]` and `nbd:unix:/path[:exportname=NAME]`.
    pub fn parse(name: &str) -> Result<NbdAddress, String> {
        let url = name
            .strip_prefix("nbd://")
            .map(|r| (false, r))
            .or_else(|| name.strip_prefix("nbd+tcp://").map(|r| (false, r)))
            .or_else(|| name.strip_prefix("nbd+unix://").map(|r| (true, r)));
        if let Some((unix, rest)) = url {
            let (rest, query) = match rest.split_once('?') {
                Some((r, q)) => (r, Some(q)),
                None => (rest, None),
            };
            let (authority, path) = match rest.find('/') {
                Some(i) => (&rest[..i], &rest[i + 1..]),
                None => (rest, ""),
            };
            let export = percent_decode(path)?;
            let mut socket = None;
            for param in query.into_iter().flat_map(|q| q.split('&')) {
                match param.split_once('=') {
                    Some(("socket", v)) if unix => socket = Some(percent_decode(v)?),
                    _ => return Err(format!("unknown or bad URI parameter '{param}'")),
                }
            }
            let server = if unix {
                if !authority.is_empty() {
                    return Err("nbd+unix:// takes no host name".into());
                }
                Server::Unix {
                    path: socket.ok_or("nbd+unix:// needs ?socket=PATH")?,
                }
            } else {
                if authority.is_empty() {
                    return Err("nbd:// needs a host name".into());
                }
                let (host, port) = parse_host_port(authority)?;
                Server::Tcp { host, port }
            };
            return Ok(NbdAddress { server, export });
        }
        let legacy = name
            .strip_prefix("nbd:")
            .ok_or_else(|| format!("'{name}' is not an NBD name"))?;
        let (spec, export) = match legacy.find(":exportname=") {
            Some(i) => (&legacy[..i], legacy[i + ":exportname=".len()..].to_string()),
            None => (legacy, String::new()),
        };
        let server = if let Some(path) = spec.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("nbd:unix: needs a socket path".into());
            }
            Server::Unix {
                path: path.to_string(),
            }
        } else {
            if spec.is_empty() {
                return Err("nbd: needs a host name".into());
            }
            let (host, port) = parse_host_port(spec)?;
            Server::Tcp { host, port }
        };
        Ok(NbdAddress { server, export })
    }
}

/// A connected socket, TCP or unix.
#[derive(Debug)]
pub enum Stream {
    /// TCP.
    Tcp(TcpStream),
    /// Unix domain.
    Unix(UnixStream),
}

impl Stream {
    /// Connects to `server`.
    pub fn connect(server: &Server) -> io::Result<Stream> {
        match server {
            Server::Tcp { host, port } => {
                let s = TcpStream::connect((host.as_str(), *port))?;
                // Requests and replies are small messages that must not wait for Nagle.
                s.set_nodelay(true)?;
                Ok(Stream::Tcp(s))
            }
            Server::Unix { path } => Ok(Stream::Unix(UnixStream::connect(path)?)),
        }
    }

    /// A second handle on the same socket (one thread reads while others write).
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }

    /// Sets (or with `None` clears) the timeout of reads from the socket.
    pub fn set_read_timeout(&self, t: Option<std::time::Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Unix(s) => s.set_read_timeout(t),
        }
    }

    /// Shuts the socket down in both directions, waking a thread blocked reading it.
    pub fn shutdown(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write_vectored(bufs),
            Stream::Unix(s) => s.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, port: u16, export: &str) -> NbdAddress {
        NbdAddress {
            server: Server::Tcp {
                host: host.into(),
                port,
            },
            export: export.into(),
        }
    }

    #[test]
    fn names() {
        let p = |s: &str| NbdAddress::parse(s).unwrap();
        assert_eq!(p("nbd://localhost/disk"), tcp("localhost", 10809, "disk"));
        assert_eq!(p("nbd://localhost:1234"), tcp("localhost", 1234, ""));
        assert_eq!(p("nbd://localhost:1234/"), tcp("localhost", 1234, ""));
        assert_eq!(p("nbd://[::1]:99/a%20b"), tcp("::1", 99, "a b"));
        assert_eq!(p("nbd:127.0.0.1:5"), tcp("127.0.0.1", 5, ""));
        assert_eq!(p("nbd:h:5:exportname=x:y"), tcp("h", 5, "x:y"));
        let u = p("nbd+unix:///e?socket=/tmp/s");
        assert_eq!(
            u.server,
            Server::Unix {
                path: "/tmp/s".into()
            }
        );
        assert_eq!(u.export, "e");
        let u = p("nbd:unix:/tmp/s:exportname=e");
        assert_eq!(
            u.server,
            Server::Unix {
                path: "/tmp/s".into()
            }
        );
        assert_eq!(u.export, "e");
        assert!(NbdAddress::parse("nbd+unix:///e").is_err());
        assert!(NbdAddress::parse("nbd://").is_err());
        assert!(NbdAddress::parse("nbd://h:x/").is_err());
        assert!(NbdAddress::parse("nbd://h/?foo=1").is_err());
        assert!(is_nbd_name("nbd:unix:/x") && !is_nbd_name("disk.img"));
    }
}
