//! `img create`: make a new raw or qcow2 image, accepting qemu-img's options and printing its
//! messages.
//!
//! The steps follow qemu-img's order, because the order decides which message a command line
//! with several mistakes gets and whether the "Formatting ..." line is printed first:
//! command-line checks, then the `-o` option list (unknown names, malformed numbers and
//! booleans), sizes and backing files, the "Formatting" line, and last the format driver's own
//! checks (enumeration values, cluster size, compatibility level).

use crate::cvt::{self, NumError};
use crate::getopt::{opt, parse, OptSpec};
use crate::{CliError, CmdResult};
use blockdev::{FileOptions, FileStorage};
use img_core::qcow2::{self, CompressionType, Qcow2CreateOptions};
use img_core::raw::{self, Preallocation, RawCreateOptions};
use std::path::Path;

const SPECS: &[OptSpec] = &[
    opt(Some('h'), Some("help"), false),
    opt(Some('q'), Some("quiet"), false),
    opt(Some('f'), Some("format"), true),
    opt(Some('o'), Some("options"), true),
    opt(Some('b'), Some("backing"), true),
    opt(Some('F'), Some("backing-format"), true),
    opt(Some('u'), Some("backing-unsafe"), false),
    opt(None, Some("object"), true),
];

const USAGE: &str = "\
Usage: img create [-q] [-f FMT] [-o OPTIONS] [-b BACKING_FILE [-F BACKING_FMT]] [-u]
                  FILENAME [SIZE]

Creates a new disk image FILENAME of SIZE bytes (suffixes k, M, G, T, P, E multiply by
powers of 1024).

  -f, --format FMT         image format: raw (default) or qcow2
  -o, --options OPTIONS    format options, comma separated ('-o help' lists them)
  -q, --quiet              do not print the 'Formatting' line
  -b, --backing FILE       backing file
  -F, --backing-format FMT format of the backing file
  -u, --backing-unsafe     do not open the backing file
  -h, --help               show this help
";

/// The type of a creation option, which decides how its value is parsed and shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Str,
    Bool,
    Num,
    Size,
}

impl Kind {
    fn help_name(self) -> &'static str {
        match self {
            Kind::Str => "str",
            Kind::Bool => "bool (on/off)",
            Kind::Num => "num",
            Kind::Size => "size",
        }
    }
}

/// One creation option as qemu-img lists it.
#[derive(Clone, Copy, Debug)]
struct Desc {
    name: &'static str,
    kind: Kind,
    help: &'static str,
    /// Shown in the "Formatting" line when the option is not given.
    default: Option<&'static str>,
}

const fn d(
    name: &'static str,
    kind: Kind,
    help: &'static str,
    default: Option<&'static str>,
) -> Desc {
    Desc {
        name,
        kind,
        help,
        default,
    }
}

const SIZE: Desc = d("size", Kind::Size, "Virtual disk size", None);

/// qcow2's options, in the order qemu keeps them (the "Formatting" line follows it).
const QCOW2_OPTS: &[Desc] = &[
    d(
        "encryption",
        Kind::Bool,
        "Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)",
        None,
    ),
    d(
        "encrypt.format",
        Kind::Str,
        "Encrypt the image, format choices: 'aes', 'luks'",
        None,
    ),
    d(
        "encrypt.key-secret",
        Kind::Str,
        "ID of secret providing qcow AES key or LUKS passphrase",
        None,
    ),
    d(
        "encrypt.cipher-alg",
        Kind::Str,
        "Name of encryption cipher algorithm",
        None,
    ),
    d(
        "encrypt.cipher-mode",
        Kind::Str,
        "Name of encryption cipher mode",
        None,
    ),
    d(
        "encrypt.ivgen-alg",
        Kind::Str,
        "Name of IV generator algorithm",
        None,
    ),
    d(
        "encrypt.ivgen-hash-alg",
        Kind::Str,
        "Name of IV generator hash algorithm",
        None,
    ),
    d(
        "encrypt.hash-alg",
        Kind::Str,
        "Name of encryption hash algorithm",
        None,
    ),
    d(
        "encrypt.iter-time",
        Kind::Num,
        "Time to spend in PBKDF in milliseconds",
        None,
    ),
    d(
        "cluster_size",
        Kind::Size,
        "qcow2 cluster size",
        Some("65536"),
    ),
    d("extended_l2", Kind::Bool, "Extended L2 tables", Some("off")),
    d(
        "preallocation",
        Kind::Str,
        "Preallocation mode (allowed values: off, metadata, falloc, full)",
        None,
    ),
    d(
        "compression_type",
        Kind::Str,
        "Compression method used for image cluster compression",
        Some("zlib"),
    ),
    SIZE,
    d(
        "compat",
        Kind::Str,
        "Compatibility level (v2 [0.10] or v3 [1.1])",
        None,
    ),
    d("backing_file", Kind::Str, "File name of a base image", None),
    d(
        "backing_fmt",
        Kind::Str,
        "Image format of the base image",
        None,
    ),
    d(
        "data_file",
        Kind::Str,
        "File name of an external data file",
        None,
    ),
    d(
        "data_file_raw",
        Kind::Bool,
        "The external data file must stay valid as a raw image",
        None,
    ),
    d(
        "lazy_refcounts",
        Kind::Bool,
        "Postpone refcount updates",
        Some("off"),
    ),
    d(
        "refcount_bits",
        Kind::Num,
        "Width of a reference count entry in bits",
        Some("16"),
    ),
];

/// raw's own options.
const RAW_OPTS: &[Desc] = &[SIZE];

/// vmdk's options, in the order qemu keeps them.
const VMDK_OPTS: &[Desc] = &[
    SIZE,
    d(
        "adapter_type",
        Kind::Str,
        "Virtual adapter type, can be one of ide (default), lsilogic, buslogic or legacyESX",
        None,
    ),
    d(
        "backing_file",
        Kind::Str,
        "File name of a base image",
        None,
    ),
    d(
        "backing_fmt",
        Kind::Str,
        "Must be 'vmdk' if present",
        None,
    ),
    d("compat6", Kind::Bool, "VMDK version 6 image", Some("off")),
    d(
        "hwversion",
        Kind::Str,
        "VMDK hardware version",
        Some("undefined"),
    ),
    d(
        "toolsversion",
        Kind::Str,
        "VMware guest tools version",
        None,
    ),
    d(
        "subformat",
        Kind::Str,
        "VMDK flat extent format, can be one of {monolithicSparse (default) | monolithicFlat | twoGbMaxExtentSparse | twoGbMaxExtentFlat | streamOptimized} ",
        None,
    ),
    d(
        "zeroed_grain",
        Kind::Bool,
        "Enable efficient zero writes using the zeroed-grain GTE feature",
        None,
    ),
];

/// The format's own options.
fn own_opts(fmt: &str) -> &'static [Desc] {
    match fmt {
        "qcow2" => QCOW2_OPTS,
        "vmdk" => VMDK_OPTS,
        _ => RAW_OPTS,
    }
}

/// The options of the file underneath (qemu's `file` protocol), in its order.
const FILE_OPTS: &[Desc] = &[
    SIZE,
    d(
        "nocow",
        Kind::Bool,
        "Turn off copy-on-write (valid only on btrfs)",
        None,
    ),
    d(
        "preallocation",
        Kind::Str,
        "Preallocation mode (allowed values: off, falloc, full)",
        None,
    ),
    d(
        "extent_size_hint",
        Kind::Size,
        "Extent size hint for the image file, 0 to disable",
        None,
    ),
];

/// qemu's block driver names: the values it accepts for `backing_fmt`.
pub(crate) const BLOCK_DRIVERS: &[&str] = &[
    "blkdebug",
    "blklogwrites",
    "blkreplay",
    "blkverify",
    "bochs",
    "cloop",
    "compress",
    "copy-before-write",
    "copy-on-read",
    "dmg",
    "file",
    "snapshot-access",
    "ftp",
    "ftps",
    "gluster",
    "host_cdrom",
    "host_device",
    "http",
    "https",
    "io_uring",
    "iscsi",
    "luks",
    "nbd",
    "nfs",
    "null-aio",
    "null-co",
    "nvme",
    "nvme-io_uring",
    "parallels",
    "preallocate",
    "qcow",
    "qcow2",
    "qed",
    "quorum",
    "raw",
    "rbd",
    "replication",
    "ssh",
    "throttle",
    "vdi",
    "vhdx",
    "virtio-blk-vfio-pci",
    "virtio-blk-vhost-user",
    "virtio-blk-vhost-vdpa",
    "vmdk",
    "vpc",
    "vvfat",
];

/// The options of `fmt`, merged with those of the file underneath as qemu merges them (the
/// format's first; a name already present is not repeated).
fn merged_opts(fmt: &str) -> Vec<Desc> {
    let mut all: Vec<Desc> = own_opts(fmt).to_vec();
    for f in FILE_OPTS {
        if !all.iter().any(|d| d.name == f.name) {
            all.push(*f);
        }
    }
    all
}

/// `-o help`: the option list, exactly as qemu-img prints it.
fn option_help(fmt: &str, with_file: bool) -> String {
    let mut list = if with_file {
        merged_opts(fmt)
    } else {
        own_opts(fmt).to_vec()
    };
    list.sort_by(|a, b| a.name.cmp(b.name));
    let mut out = if with_file {
        "Supported options:\n".to_string()
    } else {
        format!("Supported {fmt} options:\n")
    };
    for desc in list {
        let head = format!("{}=<{}>", desc.name, desc.kind.help_name());
        out.push_str(&format!("  {head:<22} - {}\n", desc.help));
    }
    if !with_file {
        out.push_str(
            "\nThe protocol level may support further options.\n\
             Specify the target filename to include those options.\n",
        );
    }
    out
}

/// An option given with `-o` (or set from the command line), after qemu's type check.
#[derive(Clone, Debug)]
struct Given {
    name: String,
    /// The text as given (booleans and strings are shown this way).
    text: String,
    /// The parsed value of numbers and sizes.
    number: Option<u64>,
}

/// The option list of one `create` call (`measure` checks its `-o` list with it too).
pub(crate) struct Opts {
    descs: Vec<Desc>,
    given: Vec<Given>,
}

impl Opts {
    /// The options `fmt` and the file underneath accept, none given yet.
    pub(crate) fn for_format(fmt: &str) -> Self {
        Opts {
            descs: merged_opts(fmt),
            given: Vec::new(),
        }
    }

    /// The parsed value of the number or size given last for `name`.
    pub(crate) fn number(&self, name: &str) -> Option<u64> {
        self.get(name).and_then(|g| g.number)
    }

    /// The value given last for `name`, as qemu looks options up.
    fn get(&self, name: &str) -> Option<&Given> {
        self.given.iter().rev().find(|g| g.name == name)
    }

    pub(crate) fn text(&self, name: &str) -> Option<&str> {
        self.get(name).map(|g| g.text.as_str())
    }

    pub(crate) fn bool(&self, name: &str) -> bool {
        self.text(name)
            .and_then(|t| crate::options::parse_bool(name, t).ok())
            .unwrap_or(false)
    }

    /// Adds one `name=value`, checked against the option's type as qemu checks it.
    pub(crate) fn set(&mut self, name: &str, text: &str) -> Result<(), String> {
        let desc = self
            .descs
            .iter()
            .find(|d| d.name == name)
            .ok_or_else(|| format!("Invalid parameter '{name}'"))?;
        let number = match desc.kind {
            Kind::Str => None,
            Kind::Bool => {
                crate::options::parse_bool(name, text).map_err(|e| e.message)?;
                None
            }
            Kind::Num => Some(cvt::parse_u64(text).map_err(|e| match e {
                NumError::Range => format!("Value '{text}' is too large for parameter '{name}'"),
                NumError::Invalid => format!("Parameter '{name}' expects a number"),
            })?),
            Kind::Size => Some(cvt::parse_size(text).map_err(|e| match e {
                NumError::Range => {
                    format!("Value '{text}' is out of range for parameter '{name}'")
                }
                NumError::Invalid => format!(
                    "Parameter '{name}' expects a non-negative number below 2^64\n\
                     Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n\
                     and exabytes, respectively."
                ),
            })?),
        };
        self.given.push(Given {
            name: name.to_string(),
            text: text.to_string(),
            number,
        });
        Ok(())
    }

    /// The options part of the "Formatting" line: every option that is set or has a default,
    /// in qemu's order; numbers as parsed (signed, as qemu prints them), strings with commas
    /// doubled.
    fn describe(&self) -> String {
        let mut parts = Vec::new();
        for desc in &self.descs {
            let given = self.get(desc.name);
            let Some(text) = given.map(|g| g.text.as_str()).or(desc.default) else {
                continue;
            };
            let shown = match (desc.kind, given.and_then(|g| g.number)) {
                (Kind::Str, _) => text.replace(',', ",,"),
                (Kind::Num | Kind::Size, Some(n)) => (n as i64).to_string(),
                _ => text.to_string(),
            };
            parts.push(format!("{}={shown}", desc.name));
        }
        parts.join(" ")
    }
}

/// Splits an option list the way qemu does: `name=value` with `,,` for a literal comma in
/// values, a bare `name` meaning `name=on` and a bare `noname` meaning `name=off`. Returns
/// the pairs and whether a bare `help` or `?` asked for the option list.
pub(crate) fn split_options(list: &str) -> (Vec<(String, String)>, bool) {
    let mut out = Vec::new();
    let mut help = false;
    let b = list.as_bytes();
    let mut p = 0;
    while p < b.len() {
        let len = b[p..]
            .iter()
            .position(|&c| c == b'=' || c == b',')
            .unwrap_or(b.len() - p);
        let name = &list[p..p + len];
        p += len;
        if b.get(p) == Some(&b'=') {
            p += 1;
            let mut value = String::new();
            let start = p;
            let mut seg = start;
            while p < b.len() {
                if b[p] == b',' {
                    if b.get(p + 1) == Some(&b',') {
                        value.push_str(&list[seg..=p]);
                        p += 2;
                        seg = p;
                        continue;
                    }
                    break;
                }
                p += 1;
            }
            value.push_str(&list[seg..p]);
            out.push((name.to_string(), value));
        } else if let Some(rest) = name.strip_prefix("no") {
            out.push((rest.to_string(), "off".to_string()));
        } else {
            help |= name == "help" || name == "?";
            out.push((name.to_string(), "on".to_string()));
        }
        if b.get(p) == Some(&b',') {
            p += 1;
        }
    }
    (out, help)
}

/// qemu's check of one `-o` argument: not empty, not starting with a comma, and not ending in
/// an odd number of commas.
pub(crate) fn valid_option_list(s: &str) -> bool {
    if s.is_empty() || s.starts_with(',') {
        return false;
    }
    let trailing = s.len() - s.trim_end_matches(',').len();
    trailing & 1 == 0
}

/// A failure of `img create` after the file name is known: qemu prefixes those with it.
pub(crate) fn named(filename: &str, message: impl std::fmt::Display) -> CliError {
    CliError::new(format!("{filename}: {message}"))
}

/// Runs `img create` with its arguments.
pub fn run(args: &[String]) -> CmdResult {
    let (opts, pos) = parse(args, SPECS)?;
    let mut quiet = false;
    let mut fmt = "raw".to_string();
    let mut options: Option<String> = None;
    let mut base: Option<String> = None;
    let mut base_fmt: Option<String> = None;
    let mut backing_unsafe = false;
    for o in &opts {
        let v = o.value.clone().unwrap_or_default();
        match o.name.as_str() {
            "help" => {
                print!("{USAGE}");
                return Ok(0);
            }
            "quiet" => quiet = true,
            "format" => fmt = v,
            "options" => {
                if !valid_option_list(&v) {
                    return Err(CliError::new(format!("Invalid option list: {v}")));
                }
                options = Some(match options {
                    Some(prev) => format!("{prev},{v}"),
                    None => v,
                });
            }
            "backing" => base = Some(v),
            "backing-format" => base_fmt = Some(v),
            "backing-unsafe" => backing_unsafe = true,
            // --object defines secrets for encryption, which is refused later.
            _ => {}
        }
    }
    let filename = pos.first().cloned();
    if let Some(list) = &options {
        let (_, help) = split_options(list);
        if help {
            return print_option_help(&fmt, filename.is_some());
        }
    }
    let Some(filename) = filename else {
        return Err(CliError::usage("Expecting image file name"));
    };
    let mut img_size: Option<u64> = None;
    if let Some(s) = pos.get(1) {
        img_size = Some(cvt::cvtnum("image size", s)?);
    }
    if let Some(extra) = pos.get(2) {
        return Err(CliError::usage(format!("Unexpected argument: {extra}")));
    }

    let plan = CreatePlan::new(
        &fmt,
        &filename,
        options.as_deref(),
        img_size,
        Backing {
            file: base.as_deref(),
            format: base_fmt.as_deref(),
            unsafe_open: backing_unsafe,
        },
    )?;
    if !quiet {
        println!("Formatting '{filename}', fmt={fmt} {}", plan.describe());
    }
    plan.execute()
}

/// The backing file of a new image, as `-b`, `-F` and `-u` give it.
#[derive(Clone, Copy, Debug, Default)]
pub struct Backing<'a> {
    /// `-b`: the name to record (relative names are relative to the new image's directory).
    pub file: Option<&'a str>,
    /// `-F`: its format.
    pub format: Option<&'a str>,
    /// `-u`: do not open it (so neither check it nor take the size from it).
    pub unsafe_open: bool,
}

/// A validated image creation: format, file, size and options, ready to run. `img convert`
/// creates its target through the same plan.
pub struct CreatePlan {
    fmt: String,
    filename: String,
    size: u64,
    opts: Opts,
}

impl CreatePlan {
    /// Checks the format and the option list (`-o`), in qemu's order and with its messages.
    pub fn new(
        fmt: &str,
        filename: &str,
        options: Option<&str>,
        img_size: Option<u64>,
        backing: Backing,
    ) -> Result<Self, CliError> {
        let (base, base_fmt) = (backing.file, backing.format);
        let filename = filename.to_string();
        let fmt = fmt.to_string();
        if fmt != "raw" && fmt != "qcow2" && fmt != "vmdk" {
            if crate::open::UNSUPPORTED_FORMATS.contains(&fmt.as_str()) {
                return Err(named(
                    &filename,
                    format!(
                        "Creating '{fmt}' images is not supported yet (supported formats: raw, qcow2)"
                    ),
                ));
            }
            return Err(named(&filename, format!("Unknown file format '{fmt}'")));
        }
        let mut o = Opts {
            descs: merged_opts(&fmt),
            given: Vec::new(),
        };
        if let Some(list) = options {
            for (k, v) in split_options(list).0 {
                o.set(&k, &v).map_err(|m| named(&filename, m))?;
            }
        }
        match (o.get("size").is_some(), img_size) {
            (true, Some(_)) => {
                return Err(named(
                    &filename,
                    "The image size must be specified only once",
                ))
            }
            (false, Some(n)) => o
                .set("size", &n.to_string())
                .map_err(|m| named(&filename, m))?,
            _ => {}
        }
        if let Some(b) = base {
            if fmt == "raw" {
                return Err(named(
                    &filename,
                    format!("Backing file not supported for file format '{fmt}'"),
                ));
            }
            o.set("backing_file", b).map_err(|m| named(&filename, m))?;
        }
        if let Some(bf) = base_fmt {
            if fmt == "raw" {
                return Err(named(
                    &filename,
                    format!("Backing file format not supported for file format '{fmt}'"),
                ));
            }
            o.set("backing_fmt", bf).map_err(|m| named(&filename, m))?;
        }
        if let Some(b) = o.text("backing_file") {
            if b == filename {
                return Err(named(
                    &filename,
                    "Error: Trying to create an image with the same filename as the backing file",
                ));
            }
            if b.is_empty() {
                return Err(named(
                    &filename,
                    "Expected backing file name, got empty string",
                ));
            }
            let b = b.to_string();
            check_backing(&filename, &b, backing.unsafe_open, &mut o)?;
        }
        // qemu's "no size" is the value -1, whichever way it was given.
        let size = match o.get("size").and_then(|g| g.number) {
            Some(n) if n != u64::MAX => n,
            _ => return Err(named(&filename, "Image creation needs a size parameter")),
        };
        Ok(CreatePlan {
            fmt,
            filename,
            size,
            opts: o,
        })
    }

    /// The options part of qemu-img's "Formatting" line.
    pub fn describe(&self) -> String {
        self.opts.describe()
    }

    /// Creates the image.
    pub fn execute(&self) -> CmdResult {
        let path = Path::new(&self.filename);
        match self.fmt.as_str() {
            "raw" => create_raw(path, &self.filename, self.size, &self.opts),
            "vmdk" => {
                crate::commands::create_vmdk::create(path, &self.filename, self.size, &self.opts)
            }
            _ => create_qcow2(path, &self.filename, self.size, &self.opts),
        }
    }
}

/// Opens the backing file of a new image, as qemu does unless `-u` is given: it must open,
/// its format must be recorded, and the new image's size defaults to its size.
fn check_backing(
    filename: &str,
    backing: &str,
    unsafe_open: bool,
    o: &mut Opts,
) -> Result<(), CliError> {
    let recorded_format = o.text("backing_fmt").map(str::to_string);
    if unsafe_open {
        if recorded_format.is_none() {
            return Err(named(
                filename,
                "Backing file specified without backing format",
            ));
        }
        return Ok(());
    }
    let full = img_core::chain::resolve_backing_name(filename, backing);
    let opts = img_core::OpenOptions {
        format: recorded_format.clone(),
        read_only: true,
        force_share: true,
        ..Default::default()
    };
    let image = img_core::open_image(Path::new(&full), &opts).map_err(|e| {
        named(
            filename,
            format!(
                "{}\nCould not open backing image.",
                crate::open::open_reason(&e)
            ),
        )
    })?;
    if recorded_format.is_none() {
        return Err(named(
            filename,
            format!(
                "Backing file specified without backing format\nDetected format of {}.",
                image.format().driver()
            ),
        ));
    }
    let sized = o
        .get("size")
        .and_then(|g| g.number)
        .is_some_and(|n| n != u64::MAX);
    if !sized {
        o.set("size", &image.size().to_string())
            .map_err(|m| named(filename, m))?;
    }
    Ok(())
}

pub(crate) fn print_option_help(fmt: &str, with_file: bool) -> CmdResult {
    if fmt != "raw" && fmt != "qcow2" && fmt != "vmdk" {
        return Err(CliError::new(format!("Unknown file format '{fmt}'")));
    }
    print!("{}", option_help(fmt, with_file));
    Ok(0)
}

/// Creates (or truncates) the file, with qemu's message when that fails. As qemu, an existing
/// file is truncated only once QEMU's lock bytes show that no other process uses it in a way
/// that excludes this (a QEMU that writes a qcow2 image, say). With `nocow`, the new (empty)
/// file gets the No_COW attribute, which Btrfs only honours on empty files; as in qemu, a
/// filesystem without the attribute is no error.
fn create_file(path: &Path, filename: &str, nocow: bool) -> Result<(), CliError> {
    // Network storage is created (RBD) or opened (an iSCSI LUN) by the format's create.
    if blockdev::network::Protocol::of(filename).is_network() {
        return Ok(());
    }
    let opts = FileOptions {
        create: true,
        ..Default::default()
    };
    match FileStorage::open(path, opts) {
        Ok(f) => {
            if nocow {
                set_nocow(f.file());
            }
            Ok(())
        }
        Err(blockdev::Error::Open { source, .. }) => Err(named(
            filename,
            format!(
                "Could not create '{filename}': {}",
                blockdev::os_message(&source)
            ),
        )),
        Err(e) => Err(named(filename, e)),
    }
}

/// Sets FS_NOCOW_FL, ignoring filesystems that do not support it.
fn set_nocow(file: &std::fs::File) {
    use std::os::unix::io::AsRawFd;
    const FS_NOCOW_FL: libc::c_int = 0x0080_0000;
    let mut flags: libc::c_int = 0;
    // SAFETY: FS_IOC_GETFLAGS/SETFLAGS read and write one int through the pointer, which
    // points at a live local; the descriptor is open for the duration of the calls.
    unsafe {
        if libc::ioctl(file.as_raw_fd(), libc::FS_IOC_GETFLAGS, &mut flags) == 0 {
            flags |= FS_NOCOW_FL;
            libc::ioctl(file.as_raw_fd(), libc::FS_IOC_SETFLAGS, &flags);
        }
    }
}

fn create_raw(path: &Path, filename: &str, size: u64, o: &Opts) -> CmdResult {
    let prealloc = match o.text("preallocation") {
        None => Preallocation::Off,
        Some(p) => Preallocation::parse(p)
            .map_err(|_| named(filename, format!("invalid parameter value: {p}")))?,
    };
    // The file driver counts whole sectors.
    let size = size.div_ceil(512).saturating_mul(512);
    create_file(path, filename, o.bool("nocow"))?;
    if prealloc == Preallocation::Metadata {
        return Err(named(filename, "Unsupported preallocation mode: metadata"));
    }
    if size > i64::MAX as u64 {
        return Err(named(filename, "Could not resize file: Invalid argument"));
    }
    raw::create(
        path,
        &RawCreateOptions {
            size,
            preallocation: prealloc,
        },
    )
    .map_err(|e| match storage_errno(&e) {
        Some(libc::EFBIG) => named(
            filename,
            "The image size is too large for file format 'raw'",
        ),
        _ => named(filename, e),
    })?;
    Ok(0)
}

/// The OS error number behind a core error, if there is one.
fn storage_errno(e: &img_core::Error) -> Option<i32> {
    match e {
        img_core::Error::Storage(s) => s.io_error().and_then(|io| io.raw_os_error()),
        _ => None,
    }
}

/// The qcow2 options after qemu's driver-level checks.
struct Qcow2Plan {
    opts: Qcow2CreateOptions,
    /// A feature qemu would create but this tool cannot yet.
    unsupported: Option<String>,
}

/// qemu's qcow2 checks, in qemu's order, with its messages.
fn plan_qcow2(size: u64, o: &Opts) -> Result<Qcow2Plan, String> {
    let enum_err =
        |param: &str, v: &str| format!("Parameter '{param}' does not accept value '{v}'");
    // The values are checked in the order of qemu's creation options structure.
    let mut unsupported: Option<String> = None;
    let mut note = |m: &str| {
        if unsupported.is_none() {
            unsupported = Some(m.to_string());
        }
    };
    if o.get("data_file").is_some() {
        note("External data files (data_file) are not supported yet");
    }
    let data_file_raw = o.bool("data_file_raw");
    let extended_l2 = o.bool("extended_l2");
    let version = match o.text("compat") {
        None => 3,
        Some("0.10" | "v2") => 2,
        Some("1.1" | "v3") => 3,
        Some(v) => return Err(enum_err("version", v)),
    };
    if let Some(bf) = o.text("backing_fmt") {
        if !BLOCK_DRIVERS.contains(&bf) {
            return Err(enum_err("backing-fmt", bf));
        }
    }
    let encrypt = o.text("encryption").is_some_and(|_| o.bool("encryption"))
        || o.given.iter().any(|g| g.name.starts_with("encrypt."));
    if encrypt {
        note("Encrypted images are not supported yet");
    }
    let cluster_size = o
        .get("cluster_size")
        .and_then(|g| g.number)
        .unwrap_or(65536);
    let prealloc = match o.text("preallocation") {
        None => Preallocation::Off,
        Some(p) => Preallocation::parse(p).map_err(|_| enum_err("preallocation", p))?,
    };
    let lazy_refcounts = o.bool("lazy_refcounts");
    let refcount_bits = o.get("refcount_bits").and_then(|g| g.number).unwrap_or(16);
    let compression_type = match o.text("compression_type") {
        None => CompressionType::Zlib,
        Some(c) => CompressionType::parse(c).ok_or_else(|| enum_err("compression-type", c))?,
    };
    // Silently rounded up to whole sectors.
    let size = size.div_ceil(512).wrapping_mul(512);

    if extended_l2 && version < 3 {
        return Err(
            "Extended L2 entries are only supported with compatibility level 1.1 and \
                    above (use version=v3 or greater)"
                .into(),
        );
    }
    if !cluster_size.is_power_of_two() || !(512..=2 << 20).contains(&cluster_size) {
        return Err("Cluster size must be a power of two between 512 and 2048k".into());
    }
    if extended_l2 && cluster_size < 16384 {
        return Err(
            "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"
                .into(),
        );
    }
    if o.get("backing_fmt").is_some() && o.get("backing_file").is_none() {
        return Err("Backing format cannot be used without backing file".into());
    }
    if version < 3 && lazy_refcounts {
        return Err(
            "Lazy refcounts only supported with compatibility level 1.1 and above \
                    (use version=v3 or greater)"
                .into(),
        );
    }
    // qemu reads the width as a signed 64-bit number.
    let bits = refcount_bits as i64;
    if bits > 64 || bits <= 0 || !(bits as u64).is_power_of_two() {
        return Err("Refcount width must be a power of two and may not exceed 64 bits".into());
    }
    if version < 3 && bits != 16 {
        return Err(
            "Different refcount widths than 16 bits require compatibility level 1.1 \
                    or above (use version=v3 or greater)"
                .into(),
        );
    }
    if data_file_raw && o.get("data_file").is_none() {
        return Err("data-file-raw requires data-file".into());
    }
    if compression_type != CompressionType::Zlib && version < 3 {
        return Err(
            "Non-zlib compression type is only supported with compatibility level \
                    1.1 and above (use version=v3 or greater)"
                .into(),
        );
    }
    if size as i64 >= 0 {
        let l1 = qcow2::create::size_to_l1(size, cluster_size.trailing_zeros());
        if l1 > MAX_L1_ENTRIES {
            return Err("The image size is too large for file format 'qcow2' \
                        (try using a larger cluster size)"
                .into());
        }
    } else {
        return Err("Could not resize image: Image size cannot be negative".into());
    }
    if extended_l2 {
        note("Extended L2 entries (extended_l2=on) are not supported yet");
    }
    if prealloc != Preallocation::Off {
        note(&format!(
            "Preallocation mode '{}' is not supported for qcow2 images yet",
            prealloc.as_str()
        ));
    }
    Ok(Qcow2Plan {
        opts: Qcow2CreateOptions {
            size,
            cluster_size,
            version,
            refcount_bits: bits as u32,
            lazy_refcounts,
            compression_type,
            extended_l2: false,
            backing_file: o.text("backing_file").map(str::to_string),
            backing_format: o.text("backing_fmt").map(str::to_string),
        },
        unsupported,
    })
}

/// qemu's limit on the L1 table: 32 MiB of 8-byte entries.
const MAX_L1_ENTRIES: u64 = (32 << 20) / 8;

fn create_qcow2(path: &Path, filename: &str, size: u64, o: &Opts) -> CmdResult {
    match plan_qcow2(size, o) {
        Err(message) => {
            // qemu creates the file before these checks and deletes it when one fails; doing
            // the same leaves the file system as qemu-img leaves it.
            create_file(path, filename, false)?;
            let _ = std::fs::remove_file(path);
            Err(named(filename, message))
        }
        Ok(Qcow2Plan {
            unsupported: Some(m),
            ..
        }) => Err(named(filename, m)),
        Ok(plan) => {
            create_file(path, filename, o.bool("nocow"))?;
            qcow2::create(path, &plan.opts).map_err(|e| {
                let _ = std::fs::remove_file(path);
                named(filename, crate::open::open_reason(&e))
            })?;
            Ok(0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn option_lists() {
        let (kv, help) = split_options("a=1,,2,b,nolazy,help");
        assert!(help);
        assert_eq!(
            kv,
            vec![
                ("a".to_string(), "1,2".to_string()),
                ("b".to_string(), "on".to_string()),
                ("lazy".to_string(), "off".to_string()),
                ("help".to_string(), "on".to_string()),
            ]
        );
        assert!(!split_options("help=on").1);
        assert!(valid_option_list("a=1,,"));
        assert!(!valid_option_list("a=1,"));
        assert!(!valid_option_list(",a"));
        assert!(!valid_option_list(""));
    }

    #[test]
    fn formatting_line() {
        let mut o = Opts {
            descs: merged_opts("qcow2"),
            given: Vec::new(),
        };
        o.set("size", "1G").unwrap();
        o.set("compat", "0.10").unwrap();
        o.set("nocow", "on").unwrap();
        o.set("refcount_bits", "-1").unwrap();
        assert_eq!(
            o.describe(),
            "cluster_size=65536 extended_l2=off compression_type=zlib size=1073741824 \
             compat=0.10 lazy_refcounts=off refcount_bits=-1 nocow=on"
        );
        assert_eq!(o.set("foo", "1").unwrap_err(), "Invalid parameter 'foo'");
    }

    #[test]
    fn help_alignment() {
        let h = option_help("raw", true);
        assert!(h.contains("  extent_size_hint=<size> - Extent size hint"));
        assert!(h.contains("  size=<size>            - Virtual disk size\n"));
    }
}
