//! Opening images named on the command line, with qemu-img's `-f`, `--image-opts`, `-T` and
//! `-U` handling and its error messages.

use crate::options::{parse_bool, parse_kv};
use crate::CliError;
use blockdev::{Aio, CacheMode};
use img_core::locking::{Locking, FORCE_SHARE_NEEDS_READ_ONLY};
use img_core::qcow2::CacheOptions;
use img_core::{open_image, BackingPolicy, DetectZeroes, DiscardMode, Image, OpenOptions, Usage};
use std::path::Path;

/// Formats qemu knows that this build cannot open; they get a clearer message than qemu's
/// "Unknown driver".
pub(crate) const UNSUPPORTED_FORMATS: &[&str] = &[
    "bochs",
    "cloop",
    "dmg",
    "luks",
    "parallels",
    "qcow",
    "qed",
    "vdi",
    "vhdx",
    "vpc",
    "vvfat",
];

/// Which image an argument names and how to open it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageSpec {
    /// The argument as the user wrote it, for "Could not open '...'" messages.
    pub arg: String,
    /// Path of the image file.
    pub path: String,
    /// The format driver (`None` probes).
    pub format: Option<String>,
    /// `driver=file` with `--image-opts`: the file itself, without a format layer.
    pub protocol_only: bool,
    /// The other `--image-opts` options, applied when the image is opened.
    pub options: ImageOptions,
    /// `-U`/`--force-share`: let other processes write the image while it is open.
    pub force_share: bool,
    /// How the command uses the image, which decides the lock bytes it takes (qemu-img's
    /// open flags): `metadata_only` for info, `no_share` for convert's sources.
    pub usage: Usage,
    /// What the image may open beneath it (qemu-img's `-u` opens no backing file).
    pub backing: BackingPolicy,
}

/// Options of an `--image-opts` string besides the file name and the driver. Values are
/// kept as written where qemu reports bad ones only once it opens the file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageOptions {
    /// `read-only=on`.
    pub read_only: bool,
    /// `cache.direct` (`file.cache.direct` wins for the file, which is what we open).
    pub cache_direct: Option<bool>,
    /// `cache.no-flush` (`file.cache.no-flush` likewise).
    pub cache_no_flush: Option<bool>,
    /// `file.aio` (`aio` with `driver=file`).
    pub aio: Option<String>,
    /// `discard`.
    pub discard: Option<String>,
    /// `detect-zeroes`.
    pub detect_zeroes: Option<String>,
    /// `file.locking` (`locking` with `driver=file`).
    pub locking: Option<String>,
    /// `force-share` of the format node.
    pub force_share: Option<bool>,
    /// `file.force-share`: the file node's own, which takes the format node's when absent.
    pub file_force_share: Option<bool>,
    /// Options for the format driver (the qcow2 cache options, or options no layer knows),
    /// in order of first appearance, the last value of a repeated option winning.
    pub format_options: Vec<(String, String)>,
    /// The first option the file layer does not know, as qemu names it in its message.
    pub unknown_file_option: Option<String>,
}

/// The qcow2 options this build implements, in the order qemu reports bad values.
const QCOW2_OPTIONS: &[&str] = &[
    "refcount-cache-size",
    "cache-size",
    "cache-clean-interval",
    "l2-cache-entry-size",
    "l2-cache-size",
];

/// Options every node takes: flags of the block layer (no-op here beyond validation where
/// they do not apply: `node-name`, `auto-read-only`).
const NODE_OPTIONS: &[&str] = &[
    "node-name",
    "read-only",
    "auto-read-only",
    "force-share",
    "discard",
    "detect-zeroes",
    "cache.direct",
    "cache.no-flush",
];

impl ImageSpec {
    /// An image named by a plain file name, with an optional `-f` format.
    pub fn file(arg: &str, format: Option<&str>) -> Self {
        ImageSpec {
            arg: arg.to_string(),
            path: arg.to_string(),
            format: format.map(str::to_string),
            protocol_only: false,
            options: ImageOptions::default(),
            force_share: false,
            usage: Usage::default(),
            backing: BackingPolicy::default(),
        }
    }

    /// The spec with `-U` given (or not).
    pub fn with_force_share(mut self, force_share: bool) -> Self {
        self.force_share = force_share;
        self
    }

    /// The spec with its own backing policy (e.g. no backing file, for `info` and `-u`).
    pub fn with_backing(mut self, backing: BackingPolicy) -> Self {
        self.backing = backing;
        self
    }

    /// The spec for a command that uses the image as `usage` says.
    pub fn with_usage(mut self, usage: Usage) -> Self {
        self.usage = usage;
        self
    }

    /// An image named by an `--image-opts` option string such as
    /// `driver=qcow2,file.filename=disk.qcow2,l2-cache-size=4M`. Structural errors and bad
    /// flag values are reported here; the rest when the image is opened, as qemu orders them.
    pub fn from_image_opts(arg: &str) -> Result<Self, CliError> {
        let mut pairs = parse_kv(arg)?;
        // A leading value without a key names the `file` option, as in qemu.
        if let Some(first) = arg.split(',').next() {
            if !first.contains('=') && !first.is_empty() {
                pairs[0] = ("file".to_string(), pairs[0].0.clone());
            }
        }
        Self::from_options(arg, pairs)
    }

    /// An image named by qemu's `json:{...}` form (what `info` prints for an image on iSCSI
    /// or RBD): the same options as `--image-opts`, nested objects giving dotted keys.
    pub fn from_json_name(arg: &str, format: Option<&str>) -> Result<Self, CliError> {
        let fail = |m: String| CliError::new(format!("Could not open '{arg}': {m}"));
        let text = arg.strip_prefix("json:").unwrap_or(arg);
        let value: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| fail(format!("Could not parse the JSON options: {e}")))?;
        let mut pairs = Vec::new();
        flatten_json("", &value, &mut pairs).map_err(fail)?;
        if let Some(f) = format {
            if !pairs.iter().any(|(k, _)| k == "driver") {
                pairs.push(("driver".to_string(), f.to_string()));
            }
        }
        Self::from_options(arg, pairs)
    }

    /// An image named by options (`--image-opts` or `json:`).
    fn from_options(arg: &str, pairs: Vec<(String, String)>) -> Result<Self, CliError> {
        let fail = |m: String| CliError::new(format!("Could not open '{arg}': {m}"));
        // qemu keeps the last value of a repeated option.
        let mut opts: Vec<(String, String)> = Vec::new();
        for (k, v) in pairs {
            match opts.iter_mut().find(|(x, _)| *x == k) {
                Some(slot) => slot.1 = v,
                None => opts.push((k, v)),
            }
        }
        let get = |key: &str| opts.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
        let driver = get("driver").map(str::to_string);
        if let Some(v) = get("file") {
            return Err(fail(format!(
                "Cannot find device='{v}' nor node-name='{v}'"
            )));
        }
        if let Some(v) = get("file.driver").filter(|&v| v != "file" && !is_network_driver(v)) {
            return Err(fail(format!("Unknown protocol driver '{v}'")));
        }
        if let Some(d) = driver.as_deref().filter(|d| is_network_driver(d)) {
            return Self::network_protocol(arg, d, &opts);
        }
        let file_net = get("file.driver").filter(|d| is_network_driver(d));
        let protocol_only = driver.as_deref() == Some("file");
        // Flags are parsed before anything is opened, in qemu's order.
        let flag = |key: &str, shown: &str| -> Result<Option<bool>, CliError> {
            get(key)
                .map(|v| parse_bool(shown, v).map_err(|e| fail(e.message)))
                .transpose()
        };
        let no_flush = flag("cache.no-flush", "cache.no-flush")?;
        let read_only = flag("read-only", "read-only")?;
        let direct = flag("cache.direct", "cache.direct")?;
        flag("auto-read-only", "auto-read-only")?;
        let force_share = flag("force-share", "force-share")?;
        let mut options = ImageOptions {
            read_only: read_only == Some(true),
            force_share,
            cache_direct: direct,
            cache_no_flush: no_flush,
            discard: get("discard").map(str::to_string),
            detect_zeroes: get("detect-zeroes").map(str::to_string),
            ..Default::default()
        };
        if protocol_only {
            options.aio = get("aio").map(str::to_string);
            options.locking = get("locking").map(str::to_string);
            options.unknown_file_option = opts
                .iter()
                .map(|(k, _)| k.as_str())
                .find(|k| {
                    !NODE_OPTIONS.contains(k)
                        && !["driver", "filename", "aio", "locking"].contains(k)
                })
                .map(str::to_string);
            let path = get("filename")
                .ok_or_else(|| fail("The 'file' block driver requires a file name".into()))?;
            return Ok(ImageSpec {
                arg: arg.to_string(),
                path: path.to_string(),
                format: Some("raw".to_string()),
                protocol_only: true,
                options,
                force_share: false,
                usage: Usage::default(),
                backing: BackingPolicy::default(),
            });
        }
        // The file node inherits the format node's cache flags unless given its own.
        if let Some(d) = flag("file.cache.direct", "cache.direct")? {
            options.cache_direct = Some(d);
        }
        if let Some(n) = flag("file.cache.no-flush", "cache.no-flush")? {
            options.cache_no_flush = Some(n);
        }
        flag("file.read-only", "read-only")?;
        flag("file.auto-read-only", "auto-read-only")?;
        options.file_force_share = flag("file.force-share", "force-share")?;
        options.aio = get("file.aio").map(str::to_string);
        options.locking = get("file.locking").map(str::to_string);
        // The engine has one discard and one zero-detection setting per image; the file
        // node's apply when the format node names none (qemu passes a format's discards on to
        // the file only when the file allows them, which `discard=unmap` here implies).
        if options.discard.is_none() {
            options.discard = get("file.discard").map(str::to_string);
        }
        if options.detect_zeroes.is_none() {
            options.detect_zeroes = get("file.detect-zeroes").map(str::to_string);
        }
        for (k, v) in &opts {
            if let Some(child) = k.strip_prefix("file.") {
                if file_net.is_some_and(|d| network_options(d).contains(&child)) {
                    continue;
                }
                let known = [
                    "filename",
                    "driver",
                    "aio",
                    "locking",
                    "node-name",
                    "cache.direct",
                    "cache.no-flush",
                    "read-only",
                    "auto-read-only",
                    "force-share",
                    "discard",
                    "detect-zeroes",
                ];
                if !known.contains(&child) && options.unknown_file_option.is_none() {
                    options.unknown_file_option = Some(child.to_string());
                }
            } else if k == "filename" {
                return Err(fail(format!(
                    "Block format '{}' does not support the option 'filename'",
                    driver.as_deref().unwrap_or("raw")
                )));
            } else if k != "driver" && !NODE_OPTIONS.contains(&k.as_str()) {
                options.format_options.push((k.clone(), v.clone()));
            }
        }
        let net_name = match file_net {
            Some(d) => Some(network_name(d, &opts, "file.").map_err(fail)?),
            None => None,
        };
        let path = match &net_name {
            Some(u) => u.as_str(),
            None => get("file.filename")
                .ok_or_else(|| fail("A block device must be specified for \"file\"".into()))?,
        };
        Ok(ImageSpec {
            arg: arg.to_string(),
            path: path.to_string(),
            format: driver,
            protocol_only: false,
            options,
            force_share: false,
            usage: Usage::default(),
            backing: BackingPolicy::default(),
        })
    }

    /// `driver=nbd|iscsi|rbd,...`: network storage as a protocol node (its bytes, no format).
    fn network_protocol(
        arg: &str,
        driver: &str,
        opts: &[(String, String)],
    ) -> Result<Self, CliError> {
        let fail = |m: String| CliError::new(format!("Could not open '{arg}': {m}"));
        let get = |key: &str| opts.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
        let url = network_name(driver, opts, "").map_err(fail)?;
        let known = network_options(driver);
        let options = ImageOptions {
            read_only: get("read-only") == Some("on"),
            unknown_file_option: opts
                .iter()
                .map(|(k, _)| k.as_str())
                .find(|k| !NODE_OPTIONS.contains(k) && *k != "driver" && !known.contains(k))
                .map(str::to_string),
            ..Default::default()
        };
        Ok(ImageSpec {
            arg: arg.to_string(),
            path: url,
            format: Some("raw".to_string()),
            protocol_only: true,
            options,
            force_share: false,
            usage: Usage::default(),
            backing: BackingPolicy::default(),
        })
    }

    /// The image a command names, refusing `--image-opts` together with `--format` with
    /// qemu-img's message (what most commands check before opening their image).
    pub fn from_args_checked(
        arg: &str,
        image_opts: bool,
        format: Option<&str>,
    ) -> Result<Self, CliError> {
        if image_opts && format.is_some() {
            return Err(CliError::new(
                "--image-opts and --format are mutually exclusive",
            ));
        }
        Self::from_args(arg, image_opts, format)
    }

    /// The image a command names: an `--image-opts` string or a file name with an optional
    /// `-f` format (which `--image-opts` ignores; see [`ImageSpec::from_args_checked`]).
    pub fn from_args(arg: &str, image_opts: bool, format: Option<&str>) -> Result<Self, CliError> {
        if image_opts {
            Self::from_image_opts(arg)
        } else if arg.starts_with("json:") {
            Self::from_json_name(arg, format)
        } else {
            Ok(Self::file(arg, format))
        }
    }
}

/// Options of qemu's nbd protocol driver that img understands.
const NBD_OPTIONS: &[&str] = &[
    "server.type",
    "server.path",
    "server.host",
    "server.port",
    "export",
    "path",
    "host",
    "port",
];

/// The NBD name for the nbd driver's options (`server.type=inet|unix`, `server.host`,
/// `server.port`, `server.path`, `export`, or the legacy `host`, `port`, `path`).
/// `prefix` is "file." for the file node's options.
fn nbd_url(opts: &[(String, String)], prefix: &str) -> Result<String, String> {
    let get = |key: &str| {
        opts.iter()
            .find(|(k, _)| k.strip_prefix(prefix) == Some(key))
            .map(|(_, v)| v.as_str())
    };
    // The export name goes in the URL path: escape what a URL would read otherwise.
    let export: String = get("export")
        .unwrap_or("")
        .chars()
        .map(|c| match c {
            '%' | '?' | '#' => format!("%{:02X}", c as u32),
            c => c.to_string(),
        })
        .collect();
    let path = get("server.path").or_else(|| get("path"));
    let kind = get("server.type").unwrap_or(if path.is_some() { "unix" } else { "inet" });
    match kind {
        "unix" => {
            let path = path.ok_or("Parameter 'server.path' is missing")?;
            Ok(if export.is_empty() {
                format!("nbd+unix://?socket={path}")
            } else {
                format!("nbd+unix:///{export}?socket={path}")
            })
        }
        "inet" => {
            let host = get("server.host")
                .or_else(|| get("host"))
                .ok_or("Parameter 'server.host' is missing")?;
            let host = if host.contains(':') {
                format!("[{host}]")
            } else {
                host.to_string()
            };
            let port = get("server.port")
                .or_else(|| get("port"))
                .unwrap_or("10809");
            Ok(format!("nbd://{host}:{port}/{export}"))
        }
        other => Err(format!(
            "Parameter 'server.type' does not accept value '{other}'"
        )),
    }
}

/// Options of qemu's iscsi protocol driver that img understands.
const ISCSI_OPTIONS: &[&str] = &["transport", "portal", "target", "lun", "user", "password"];

/// Options of qemu's rbd protocol driver that img understands.
const RBD_OPTIONS: &[&str] = &["pool", "namespace", "image", "snapshot", "conf", "user"];

/// Whether `driver` is one of the network protocol drivers img has.
fn is_network_driver(driver: &str) -> bool {
    matches!(driver, "nbd" | "iscsi" | "rbd")
}

/// The options img understands of a network protocol driver.
fn network_options(driver: &str) -> &'static [&'static str] {
    match driver {
        "nbd" => NBD_OPTIONS,
        "iscsi" => ISCSI_OPTIONS,
        "rbd" => RBD_OPTIONS,
        _ => &[],
    }
}

/// The name img opens for a network protocol node given by options (those under `prefix`):
/// an `nbd://` or `nbd+unix://` URL, an `iscsi://` URL, or an `rbd:` name.
fn network_name(driver: &str, opts: &[(String, String)], prefix: &str) -> Result<String, String> {
    let get = |key: &str| {
        opts.iter()
            .find(|(k, _)| k.strip_prefix(prefix) == Some(key))
            .map(|(_, v)| v.as_str())
    };
    let missing = |key: &str| format!("Parameter '{key}' is missing");
    match driver {
        "nbd" => nbd_url(opts, prefix),
        "iscsi" => {
            if let Some(t) = get("transport").filter(|&t| t != "tcp") {
                return Err(format!("Parameter 'transport' does not accept value '{t}'"));
            }
            let portal = get("portal").ok_or_else(|| missing("portal"))?;
            let target = get("target").ok_or_else(|| missing("target"))?;
            let auth = match (get("user"), get("password")) {
                (Some(u), Some(p)) => format!("{u}%{p}@"),
                (Some(u), None) => format!("{u}@"),
                (None, _) => String::new(),
            };
            Ok(format!(
                "iscsi://{auth}{portal}/{target}/{}",
                get("lun").unwrap_or("0")
            ))
        }
        "rbd" => {
            // The legacy name's separators are escaped with a backslash inside its parts.
            let esc = |s: &str| {
                s.chars().fold(String::new(), |mut out, c| {
                    if matches!(c, ':' | '@' | '/' | '\\' | '=') {
                        out.push('\\');
                    }
                    out.push(c);
                    out
                })
            };
            let mut name = format!("rbd:{}/", esc(get("pool").ok_or_else(|| missing("pool"))?));
            if let Some(ns) = get("namespace").filter(|ns| !ns.is_empty()) {
                name.push_str(&format!("{}/", esc(ns)));
            }
            name.push_str(&esc(get("image").ok_or_else(|| missing("image"))?));
            if let Some(snap) = get("snapshot") {
                name.push_str(&format!("@{}", esc(snap)));
            }
            if let Some(conf) = get("conf") {
                name.push_str(&format!(":conf={}", esc(conf)));
            }
            if let Some(user) = get("user") {
                name.push_str(&format!(":id={}", esc(user)));
            }
            Ok(name)
        }
        other => Err(format!("Unknown protocol driver '{other}'")),
    }
}

/// Flattens a `json:` name's object into qemu's dotted option keys (`{"file": {"driver":
/// "rbd"}}` gives `file.driver=rbd`); booleans become on/off.
fn flatten_json(
    prefix: &str,
    value: &serde_json::Value,
    out: &mut Vec<(String, String)>,
) -> Result<(), String> {
    use serde_json::Value;
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten_json(&key, v, out)?;
            }
        }
        Value::String(s) => out.push((prefix.to_string(), s.clone())),
        Value::Number(n) => out.push((prefix.to_string(), n.to_string())),
        Value::Bool(b) => out.push((prefix.to_string(), if *b { "on" } else { "off" }.into())),
        Value::Null | Value::Array(_) => {
            return Err(format!("Invalid parameter type for '{prefix}'"));
        }
    }
    Ok(())
}

/// Parses a `-t`/`-T` cache mode.
pub fn parse_cache(mode: &str) -> Option<CacheMode> {
    CacheMode::parse(mode)
}

/// The cache mode of the file once `cache.direct` and `cache.no-flush` override the command's
/// mode (whose synchronous writes, qemu's `write-cache=off`, they leave alone). O_DIRECT
/// without flushes has no mode of its own; it keeps the flushes.
fn combine_cache(base: CacheMode, direct: Option<bool>, no_flush: Option<bool>) -> CacheMode {
    let direct = direct.unwrap_or(base.direct());
    let no_flush = no_flush.unwrap_or(base.ignores_flush());
    match (direct, no_flush, base.sync_writes()) {
        (false, true, _) => CacheMode::Unsafe,
        (false, false, false) => CacheMode::Writeback,
        (false, false, true) => CacheMode::Writethrough,
        (true, _, false) => CacheMode::None,
        (true, _, true) => CacheMode::Directsync,
    }
}

/// The cache mode of the spec's file: `base` (the command's `-t`/`-T`) with the
/// `--image-opts` cache flags applied.
pub fn file_cache_mode(spec: &ImageSpec, base: CacheMode) -> CacheMode {
    combine_cache(base, spec.options.cache_direct, spec.options.cache_no_flush)
}

/// Opens the image read-only (or read-write) with `cache`, applying the spec's
/// `--image-opts` options, and maps failures to qemu-img's "Could not open 'name': reason"
/// messages, reporting bad options in the order qemu does.
pub fn open(spec: &ImageSpec, read_only: bool, cache: CacheMode) -> Result<Image, CliError> {
    open_with_aio(spec, read_only, cache, Aio::default())
}

/// [`open`] for commands with an I/O engine option of their own (`-i`): `aio` applies unless
/// the spec names one (`file.aio`).
pub fn open_with_aio(
    spec: &ImageSpec,
    read_only: bool,
    cache: CacheMode,
    aio: Aio,
) -> Result<Image, CliError> {
    let fail = |m: String| CliError::new(format!("Could not open '{}': {m}", spec.arg));
    let o = &spec.options;
    // -U adds force-share=on to the options, which must not say otherwise.
    if spec.force_share && o.force_share == Some(false) {
        return Err(CliError::new(
            "--force-share/-U conflicts with image options",
        ));
    }
    let read_only = read_only || o.read_only;
    let force_share = spec.force_share || o.force_share == Some(true);
    // The file node inherits the format node's flag unless it has its own; only the file's
    // matters to the locks, but either refuses a writable image, before anything is opened.
    let file_force_share = o.file_force_share.unwrap_or(force_share);
    if (force_share || file_force_share) && !read_only {
        return Err(fail(FORCE_SHARE_NEEDS_READ_ONLY.into()));
    }
    if let Some(f) = spec.format.as_deref() {
        if UNSUPPORTED_FORMATS.contains(&f) {
            return Err(fail(format!("The '{f}' format is not supported by img")));
        }
    }
    // The file layer's options.
    let cache = file_cache_mode(spec, cache);
    let aio = match o.aio.as_deref() {
        None => aio,
        Some(a) => Aio::parse(a).ok_or_else(|| fail(format!("invalid parameter value: {a}")))?,
    };
    let locking = match o.locking.as_deref() {
        None => Locking::Auto,
        Some(l) => {
            Locking::parse(l).ok_or_else(|| fail(format!("invalid parameter value: {l}")))?
        }
    };
    if locking == Locking::On && !blockdev::ofd_locks_available() {
        eprintln!(
            "img: warning: File lock requested but OFD locking syscall is unavailable, \
             falling back to POSIX file locks\n\
             Due to the implementation, locks can be lost unexpectedly."
        );
    }
    if aio == Aio::Native && !cache.direct() {
        return Err(fail(
            "aio=native was specified, but it requires cache.direct=on, which was not specified."
                .into(),
        ));
    }
    let path = Path::new(&spec.path);
    let meta = std::fs::metadata(path);
    if meta.as_ref().is_ok_and(|m| m.is_dir()) {
        // Opening a directory for writing fails in the open call itself (EISDIR); only a
        // read-only open gets as far as qemu's check of the file type.
        if !(read_only || o.read_only) {
            return Err(fail(format!(
                "Could not open '{}': Is a directory",
                spec.path
            )));
        }
        return Err(fail(format!(
            "'file' driver requires '{}' to be a regular file",
            spec.path
        )));
    }
    let mut opts = OpenOptions {
        format: spec.format.clone(),
        read_only,
        cache,
        aio,
        force_share: file_force_share,
        locking,
        usage: spec.usage,
        backing: spec.backing.clone(),
        ..Default::default()
    };
    // What follows is checked once the file opened; a file that cannot be opened is reported
    // by open_image below, first, as qemu does.
    // Network names (NBD, iSCSI, RBD) have no file to look at first.
    let protocol = blockdev::network::Protocol::of(&spec.path);
    if meta.is_ok() || protocol.is_network() {
        if let Some(k) = &o.unknown_file_option {
            let proto = protocol.driver();
            return Err(fail(format!(
                "Block protocol '{proto}' doesn't support the option '{k}'"
            )));
        }
        if let Some(d) = o.discard.as_deref() {
            opts.discard =
                DiscardMode::parse(d).ok_or_else(|| fail("Invalid discard option".into()))?;
        }
        if let Some(d) = o.detect_zeroes.as_deref() {
            opts.detect_zeroes = DetectZeroes::parse(d)
                .ok_or_else(|| fail(format!("invalid parameter value: {d}")))?;
        }
        // qemu-img opens images without unmap unless the option asks for it, whatever the
        // library's default.
        let unmap_asked = o.discard.is_some() && opts.discard == DiscardMode::Unmap;
        if opts.detect_zeroes == DetectZeroes::Unmap && !unmap_asked {
            return Err(fail(
                "setting detect-zeroes to unmap is not allowed without setting discard \
                 operation to unmap"
                    .into(),
            ));
        }
        if !o.format_options.is_empty() && !spec.protocol_only {
            if opts.format.is_none() {
                // The options belong to the format, so it must be known to parse them.
                opts.format = blockdev::FileStorage::open_read_only(path)
                    .ok()
                    .and_then(|f| img_core::probe_format(&f).ok())
                    .map(str::to_string);
            }
            if opts.format.as_deref() == Some("qcow2") {
                opts.qcow2_cache = qcow2_cache_options(&o.format_options).map_err(fail)?;
            }
        }
    }
    let image = open_image(path, &opts).map_err(|e| match e {
        // A network connection failure is worded once, as qemu words it.
        img_core::Error::Storage(blockdev::Error::Open { source, .. }) if protocol.is_network() => {
            fail(blockdev::os_message(&source))
        }
        e => fail(open_reason(&e)),
    })?;
    if !read_only && opts.format.is_none() && image.format().driver() == "raw" {
        warn_probed_raw(&spec.path);
    }
    // Options no layer took are refused once the image opened, as qemu does.
    let qcow2 = image.format().driver() == "qcow2" && !spec.protocol_only;
    if let Some((k, _)) = o
        .format_options
        .iter()
        .find(|(k, _)| !(qcow2 && QCOW2_OPTIONS.contains(&k.as_str())))
    {
        let what = if spec.protocol_only {
            let protocol = protocol.driver();
            format!("Block protocol '{protocol}' doesn't support the option '{k}'")
        } else {
            format!(
                "Block format '{}' does not support the option '{k}'",
                image.format().driver()
            )
        };
        return Err(fail(what));
    }
    Ok(image)
}

/// qemu's warning when it opens an image it probed as raw for writing (again whenever it
/// reopens the image).
pub fn warn_probed_raw(path: &str) {
    eprintln!(
        "WARNING: Image format was not specified for '{path}' and probing guessed raw.\n         \
         Automatically detecting the format is dangerous for raw images, write operations \
         on block 0 will be restricted.\n         \
         Specify the 'raw' format explicitly to remove the restrictions."
    );
}

/// qemu's text after a size option it cannot parse.
const SIZE_HINT: &str = "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, \
                         peta-\nand exabytes, respectively.";

/// Parses the qcow2 cache options among `options`, in the order qemu reports bad values.
fn qcow2_cache_options(options: &[(String, String)]) -> Result<CacheOptions, String> {
    let mut c = CacheOptions::default();
    for &name in QCOW2_OPTIONS {
        let Some((_, v)) = options.iter().find(|(k, _)| k == name) else {
            continue;
        };
        let value = if name == "cache-clean-interval" {
            qemu_strtou64(v, 0).map_err(|_| format!("Parameter '{name}' expects a number"))?
        } else {
            match qemu_strtosz(v) {
                Ok(n) => n,
                Err(NumError::Range) => {
                    return Err(format!(
                        "Value '{v}' is out of range for parameter '{name}'"
                    ))
                }
                Err(NumError::Invalid) => {
                    return Err(format!(
                        "Parameter '{name}' expects a non-negative number below 2^64\n{SIZE_HINT}"
                    ))
                }
            }
        };
        let slot = match name {
            "refcount-cache-size" => &mut c.refcount_cache_size,
            "cache-size" => &mut c.cache_size,
            "cache-clean-interval" => &mut c.cache_clean_interval,
            "l2-cache-entry-size" => &mut c.l2_cache_entry_size,
            _ => &mut c.l2_cache_size,
        };
        *slot = Some(value);
    }
    Ok(c)
}

/// Why a number was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NumError {
    /// Not a number of the expected form.
    Invalid,
    /// A number, but negative or too large.
    Range,
}

/// C's `isspace` in the C locale.
fn is_c_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

/// `strtoull` on the start of `s`: the value (wrapped when negative, as C does), whether it
/// overflowed, and how many bytes it used (0: no number).
fn strtoull(s: &[u8], base: u32) -> (u64, bool, usize) {
    let mut i = 0;
    while i < s.len() && is_c_space(s[i]) {
        i += 1;
    }
    let neg = match s.get(i) {
        Some(b'-') => {
            i += 1;
            true
        }
        Some(b'+') => {
            i += 1;
            false
        }
        _ => false,
    };
    let hex_digit_at = |j: usize| s.get(j).is_some_and(|c| c.is_ascii_hexdigit());
    let mut base = base;
    let has_prefix =
        s.get(i) == Some(&b'0') && matches!(s.get(i + 1), Some(b'x' | b'X')) && hex_digit_at(i + 2);
    if (base == 0 || base == 16) && has_prefix {
        i += 2;
        base = 16;
    } else if base == 0 {
        base = if s.get(i) == Some(&b'0') { 8 } else { 10 };
    }
    let start = i;
    let (mut value, mut overflow) = (0u64, false);
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
        return (0, false, 0);
    }
    let value = if overflow {
        u64::MAX
    } else if neg {
        value.wrapping_neg()
    } else {
        value
    };
    (value, overflow, i)
}

/// qemu's `qemu_strtou64(s, NULL, base)`: the whole string must be the number; negative
/// numbers wrap around, as `strtoull` makes them.
fn qemu_strtou64(s: &str, base: u32) -> Result<u64, NumError> {
    let (v, overflow, used) = strtoull(s.as_bytes(), base);
    if used == 0 || used < s.len() {
        return Err(NumError::Invalid);
    }
    if overflow {
        return Err(NumError::Range);
    }
    Ok(v)
}

/// qemu's size syntax (`qemu_strtosz`): a decimal number with an optional fraction, or a hex
/// number, then an optional suffix b, k, M, G, T, P or E (powers of 1024, either case).
/// Fractions need a suffix other than b; the result is rounded to the nearest byte.
fn qemu_strtosz(text: &str) -> Result<u64, NumError> {
    let s = text.as_bytes();
    // The integral part, in decimal; a sign makes it out of range (after the trailing
    // characters check, which wins).
    let (mut val, overflow, used) = strtoull(s, 10);
    let mut ws = 0;
    while ws < s.len() && is_c_space(s[ws]) {
        ws += 1;
    }
    let negative = used > 0 && s[ws] == b'-';
    let mut end = used;
    let range_or_trailing = |end: usize| {
        if end < s.len() {
            Err(NumError::Invalid)
        } else {
            Err(NumError::Range)
        }
    };
    if used > 0 && (overflow || negative) {
        return range_or_trailing(end);
    }
    let suffix_mul = |c: Option<&u8>| -> Option<u32> {
        Some(match c?.to_ascii_uppercase() {
            b'B' => 0,
            b'K' => 10,
            b'M' => 20,
            b'G' => 30,
            b'T' => 40,
            b'P' => 50,
            b'E' => 60,
            _ => return None,
        })
    };
    let mut frac: u64 = 0;
    if used > 0 && val == 0 && matches!(s.get(end), Some(b'x' | b'X')) {
        // Hex: no fraction and no suffix.
        let (v, overflow, used) = strtoull(s, 16);
        if overflow {
            return range_or_trailing(used);
        }
        end = used;
        if s.get(end) == Some(&b'.') || suffix_mul(s.get(end)).is_some_and(|m| m > 0) {
            return Err(NumError::Invalid);
        }
        val = v;
    } else if s.get(end) == Some(&b'.') || (used == 0 && s.contains(&b'.')) {
        if used > 0 && !s.get(end + 1).is_some_and(u8::is_ascii_digit) {
            // "1." and "1.k": no fractional digits.
            end += 1;
        } else {
            // The fraction, where e/E is a suffix and never an exponent.
            let rest = &s[end..];
            let cut = rest
                .iter()
                .position(|&c| c == b'e' || c == b'E')
                .unwrap_or(rest.len());
            let part = &rest[..cut];
            let mut i = 0;
            while i < part.len() && is_c_space(part[i]) {
                i += 1;
            }
            let sign_neg = match part.get(i) {
                Some(b'-') => {
                    i += 1;
                    true
                }
                Some(b'+') => {
                    i += 1;
                    false
                }
                _ => false,
            };
            if part.get(i) != Some(&b'.') || !part.get(i + 1).is_some_and(u8::is_ascii_digit) {
                return Err(NumError::Invalid);
            }
            let digits_start = i + 1;
            let mut j = digits_start;
            while j < part.len() && part[j].is_ascii_digit() {
                j += 1;
            }
            end += j;
            if sign_neg {
                return range_or_trailing(end);
            }
            let digits = std::str::from_utf8(&part[digits_start..j]).expect("ASCII digits");
            let fraction: f64 = format!("0.{digits}").parse().expect("a decimal fraction");
            if fraction >= 1.0 {
                val = val.checked_add(1).ok_or(NumError::Range)?;
            } else {
                frac = (fraction * 18_446_744_073_709_551_616.0) as u64;
                if frac == 0 && digits.bytes().any(|d| d != b'0') {
                    frac = 1;
                }
            }
        }
    } else if used == 0 {
        return Err(NumError::Invalid);
    }
    let shift = match suffix_mul(s.get(end)) {
        Some(m) => {
            end += 1;
            m
        }
        None => 0,
    };
    if end < s.len() {
        return Err(NumError::Invalid);
    }
    if shift == 0 {
        // Fractional bytes are refused.
        return if frac != 0 {
            Err(NumError::Invalid)
        } else {
            Ok(val)
        };
    }
    // 64.64 fixed point times 2^shift, rounded to the nearest byte.
    let mul = 1u128 << shift;
    let f = frac as u128 * mul;
    let total = val as u128 * mul + (f >> 64) + ((f as u64) >> 63) as u128;
    u64::try_from(total).map_err(|_| NumError::Range)
}

/// The reason part of an open failure, without the file name the core error already carries
/// (qemu names the file once in front).
pub fn open_reason(e: &img_core::Error) -> String {
    e.reason()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_options_become_names() {
        let s = ImageSpec::from_image_opts(
            "driver=qcow2,file.driver=iscsi,file.portal=h:3261,file.target=iqn.x:y,file.lun=2,\
             file.user=u,file.password=p",
        )
        .unwrap();
        assert_eq!(s.path, "iscsi://u%p@h:3261/iqn.x:y/2");
        assert_eq!(s.format.as_deref(), Some("qcow2"));
        let s = ImageSpec::from_image_opts(
            "driver=rbd,pool=p,namespace=n,image=a:b@c,snapshot=s,conf=/e/c.conf,user=admin",
        )
        .unwrap();
        assert_eq!(s.path, "rbd:p/n/a\\:b\\@c@s:conf=\\/e\\/c.conf:id=admin");
        assert!(s.protocol_only);
        // The name parses back to the same parts.
        let n = blockdev::rbd::RbdName::parse(&s.path).unwrap();
        assert_eq!(
            (n.image.as_str(), n.conf.as_deref()),
            ("a:b@c", Some("/e/c.conf"))
        );
        let e = ImageSpec::from_image_opts("driver=iscsi,portal=h,target=t,timeout=3").unwrap();
        assert_eq!(e.options.unknown_file_option.as_deref(), Some("timeout"));
        assert!(ImageSpec::from_image_opts("driver=rbd,image=x").is_err());
    }

    #[test]
    fn json_names() {
        let s = ImageSpec::from_json_name(
            r#"json:{"driver": "raw", "file": {"pool": "rbd", "image": "i", "driver": "rbd", "namespace": ""}}"#,
            None,
        )
        .unwrap();
        assert_eq!(s.path, "rbd:rbd/i");
        assert_eq!(s.format.as_deref(), Some("raw"));
        let s = ImageSpec::from_json_name(
            r#"json:{"file": {"driver": "file", "filename": "d.img"}, "read-only": true}"#,
            Some("qcow2"),
        )
        .unwrap();
        assert_eq!(
            (s.path.as_str(), s.format.as_deref()),
            ("d.img", Some("qcow2"))
        );
        assert!(s.options.read_only);
        let e = ImageSpec::from_json_name("json:{\"driver\": ", None).unwrap_err();
        assert!(
            e.message.contains("Could not parse the JSON options"),
            "{}",
            e.message
        );
        assert!(ImageSpec::from_json_name(r#"json:{"driver": ["x"]}"#, None).is_err());
    }

    #[test]
    fn image_opts() {
        let s = ImageSpec::from_image_opts("driver=qcow2,file.filename=a,,b.qcow2").unwrap();
        assert_eq!(s.path, "a,b.qcow2");
        assert_eq!(s.format.as_deref(), Some("qcow2"));
        let s = ImageSpec::from_image_opts("file.filename=x").unwrap();
        assert_eq!(s.format, None);
        let s = ImageSpec::from_image_opts("driver=file,filename=x").unwrap();
        assert!(s.protocol_only);
        let e = ImageSpec::from_image_opts("x.qcow2").unwrap_err();
        assert_eq!(
            e.message,
            "Could not open 'x.qcow2': Cannot find device='x.qcow2' nor node-name='x.qcow2'"
        );
        let e = ImageSpec::from_image_opts("driver=qcow2").unwrap_err();
        assert!(e
            .message
            .ends_with("A block device must be specified for \"file\""));
        // Unknown options are reported once the image is open, as qemu does.
        let s =
            ImageSpec::from_image_opts("driver=qcow2,file.filename=a,foo=bar,file.x=1").unwrap();
        assert_eq!(s.options.format_options, vec![("foo".into(), "bar".into())]);
        assert_eq!(s.options.unknown_file_option.as_deref(), Some("x"));
    }

    #[test]
    fn image_opts_options() {
        let s = ImageSpec::from_image_opts(
            "driver=qcow2,file.filename=a,l2-cache-size=1M,l2-cache-size=4M,file.aio=native,\
             cache.direct=on,file.cache.no-flush=on,read-only=on,discard=unmap,detect-zeroes=on,\
             cache-clean-interval=1",
        )
        .unwrap();
        let o = &s.options;
        assert!(o.read_only);
        assert_eq!((o.cache_direct, o.cache_no_flush), (Some(true), Some(true)));
        assert_eq!(o.aio.as_deref(), Some("native"));
        assert_eq!(o.discard.as_deref(), Some("unmap"));
        assert_eq!(o.detect_zeroes.as_deref(), Some("on"));
        assert_eq!(
            o.format_options,
            vec![
                ("l2-cache-size".into(), "4M".into()),
                ("cache-clean-interval".into(), "1".into())
            ]
        );
        let c = qcow2_cache_options(&o.format_options).unwrap();
        assert_eq!(
            (c.l2_cache_size, c.cache_clean_interval),
            (Some(4 << 20), Some(1))
        );
        // Flags are checked at once, the file's under their own name.
        let e = ImageSpec::from_image_opts("driver=qcow2,file.filename=a,file.cache.direct=x")
            .unwrap_err();
        assert!(e
            .message
            .ends_with("Parameter 'cache.direct' expects 'on' or 'off'"));
        let e =
            ImageSpec::from_image_opts("driver=qcow2,file.filename=a,read-only=x,cache.no-flush=x")
                .unwrap_err();
        assert!(e
            .message
            .ends_with("Parameter 'cache.no-flush' expects 'on' or 'off'"));
        // With driver=file the options are the file's own.
        let s =
            ImageSpec::from_image_opts("driver=file,filename=a,aio=io_uring,file.aio=x").unwrap();
        assert_eq!(s.options.aio.as_deref(), Some("io_uring"));
        assert_eq!(s.options.unknown_file_option.as_deref(), Some("file.aio"));
    }

    #[test]
    fn force_share_and_locking_options() {
        let s = ImageSpec::from_image_opts(
            "driver=qcow2,file.filename=a,force-share=on,file.force-share=off,file.locking=off",
        )
        .unwrap();
        assert_eq!(s.options.force_share, Some(true));
        assert_eq!(s.options.file_force_share, Some(false));
        assert_eq!(s.options.locking.as_deref(), Some("off"));
        let e =
            ImageSpec::from_image_opts("driver=qcow2,file.filename=a,force-share=x").unwrap_err();
        assert!(e
            .message
            .ends_with("Parameter 'force-share' expects 'on' or 'off'"));
        // Refusals come before the file is opened (it does not exist here).
        let spec = ImageSpec::file("/nonexistent/a.qcow2", None).with_force_share(true);
        let e = open(&spec, false, CacheMode::Writeback).unwrap_err();
        assert_eq!(
            e.message,
            "Could not open '/nonexistent/a.qcow2': force-share=on can only be used with \
             read-only images"
        );
        let spec = ImageSpec::from_image_opts("driver=qcow2,file.filename=/x,force-share=off")
            .unwrap()
            .with_force_share(true);
        let e = open(&spec, true, CacheMode::Writeback).unwrap_err();
        assert_eq!(e.message, "--force-share/-U conflicts with image options");
    }

    #[test]
    fn cache_option_values() {
        let e = |v: &str| qcow2_cache_options(&[("l2-cache-size".into(), v.into())]).unwrap_err();
        assert_eq!(
            e("abc"),
            format!(
                "Parameter 'l2-cache-size' expects a non-negative number below 2^64\n{SIZE_HINT}"
            )
        );
        assert_eq!(
            e("-1"),
            "Value '-1' is out of range for parameter 'l2-cache-size'"
        );
        let e = qcow2_cache_options(&[("cache-clean-interval".into(), "1k".into())]).unwrap_err();
        assert_eq!(e, "Parameter 'cache-clean-interval' expects a number");
        // Later options are not looked at once one is bad, in qemu's order.
        let e = qcow2_cache_options(&[
            ("l2-cache-size".into(), "x".into()),
            ("cache-size".into(), "y".into()),
        ])
        .unwrap_err();
        assert!(e.starts_with("Parameter 'cache-size'"));
    }

    #[test]
    fn sizes_as_qemu_parses_them() {
        use NumError::{Invalid, Range};
        let ok = [
            ("0", 0),
            ("512", 512),
            ("1k", 1024),
            ("1K", 1024),
            ("1m", 1 << 20),
            ("1b", 1),
            ("1B", 1),
            ("1.5M", 3 << 19),
            (".5k", 512),
            ("+1k", 1024),
            ("1.k", 1024),
            ("1.", 1),
            ("1.0", 1),
            ("0.0", 0),
            ("1.5e", 3 << 59),
            ("0x100000", 1 << 20),
            ("0X10", 16),
            ("00010", 10),
            (" 1M", 1 << 20),
            ("\t1M", 1 << 20),
            ("0xffffffffffffffff", u64::MAX),
            ("18446744073709551615", u64::MAX),
            ("15E", 15 << 60),
            ("1.0000000001k", 1024),
            ("12.345M", 12944671),
        ];
        for (text, want) in ok {
            assert_eq!(qemu_strtosz(text), Ok(want), "{text:?}");
        }
        let bad = [
            ("", Invalid),
            ("abc", Invalid),
            ("1x", Invalid),
            ("1M ", Invalid),
            ("1 k", Invalid),
            ("1kB", Invalid),
            ("1.5", Invalid),
            ("0.5", Invalid),
            ("1.5b", Invalid),
            ("1e3", Invalid),
            ("0x10k", Invalid),
            ("0x1.8", Invalid),
            ("0x", Invalid),
            ("0x-1", Invalid),
            ("1..5k", Invalid),
            ("1.5.k", Invalid),
            ("1.-5k", Invalid),
            ("1.5kk", Invalid),
            ("-1k", Invalid),
            ("- 1", Invalid),
            ("-1", Range),
            ("-0", Range),
            ("16E", Range),
            ("18446744073709551616", Range),
            ("0x10000000000000000", Range),
        ];
        for (text, want) in bad {
            assert_eq!(qemu_strtosz(text), Err(want), "{text:?}");
        }
        assert_eq!(qemu_strtou64("-1", 0), Ok(u64::MAX));
        assert_eq!(qemu_strtou64("0x10", 0), Ok(16));
        assert_eq!(qemu_strtou64("010", 0), Ok(8));
        assert_eq!(qemu_strtou64(" 5", 0), Ok(5));
        assert_eq!(qemu_strtou64("08", 0), Err(NumError::Invalid));
        assert_eq!(qemu_strtou64("", 0), Err(NumError::Invalid));
        assert_eq!(
            qemu_strtou64("99999999999999999999", 0),
            Err(NumError::Range)
        );
    }

    #[test]
    fn cache_flags_combine_with_the_command_mode() {
        use CacheMode as M;
        assert_eq!(combine_cache(M::Writeback, None, None), M::Writeback);
        assert_eq!(combine_cache(M::Writeback, Some(true), None), M::None);
        assert_eq!(combine_cache(M::None, Some(false), None), M::Writeback);
        assert_eq!(combine_cache(M::Writeback, None, Some(true)), M::Unsafe);
        assert_eq!(
            combine_cache(M::Writethrough, Some(true), None),
            M::Directsync
        );
        assert_eq!(combine_cache(M::Unsafe, None, Some(false)), M::Writeback);
    }
}
