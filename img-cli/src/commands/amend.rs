//! `img amend`: change format options of an existing image (qcow2's compatibility level,
//! refcount width and lazy refcounts), with qemu-img's checks, messages and exit codes.
//!
//! The order follows qemu-img, because it decides which message a command line with several
//! mistakes gets: command-line options, `-o` present, option help (with `-f`), one file name,
//! the cache mode, opening the image, option help (probed format), amend support, the `-o`
//! list against the format's amend options (with a hint when an option exists only for
//! creation), and then the driver's own checks and changes.

use crate::commands::create::{split_options, valid_option_list};
use crate::cvt::{self, NumError};
use crate::getopt::{opt, parse, OptSpec};
use crate::open::{self, ImageSpec};
use crate::options::parse_bool;
use crate::{CliError, CmdResult};
use img_core::qcow2::amend::{amend_image, AmendOptions};
use std::io::Write;

const SPECS: &[OptSpec] = &[
    opt(Some('h'), Some("help"), false),
    opt(Some('q'), Some("quiet"), false),
    opt(Some('p'), Some("progress"), false),
    opt(Some('o'), Some("options"), true),
    opt(Some('f'), Some("format"), true),
    opt(Some('t'), Some("cache"), true),
    opt(None, Some("image-opts"), false),
    opt(None, Some("object"), true),
    opt(None, Some("force"), false),
];

const HELP: &str = "Usage:
Update format-specific options of the image.  Usage:

  img amend [-f FMT | --image-opts] [-t CACHE] [--force] [-p] [-q]
        [--object OBJDEF] -o OPTIONS FILENAME

Arguments:
  -h, --help
     print this help and exit
  -q, --quiet
     quiet operation
  -p, --progress
     show progress
  -f, --format FMT
     specify FILENAME format explicitly
  --image-opts
     indicates that FILENAME is a complete image specification
   instead of a file name (incompatible with --format)
  -t, --cache CACHE
     cache mode for FILENAME (writeback)
  --force
     allow certain unsafe operations
  -o, --options OPTIONS
     the options to change ('-o help' lists them)
";

/// How an option's value is parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Str,
    Bool,
    Num,
    Size,
}

/// The amend options of qcow2, in the order qemu keeps (and checks) them, with their help.
const AMEND_OPTS: &[(&str, Kind, &str)] = &[
    (
        "encrypt.state",
        Kind::Str,
        "Select new state of affected keyslots (active/inactive)",
    ),
    (
        "encrypt.keyslot",
        Kind::Num,
        "Select a single keyslot to modify explicitly",
    ),
    (
        "encrypt.old-secret",
        Kind::Str,
        "Select all keyslots that match this password",
    ),
    (
        "encrypt.new-secret",
        Kind::Str,
        "New secret to set in the matching keyslots. Empty string to erase",
    ),
    (
        "encrypt.iter-time",
        Kind::Num,
        "Time to spend in PBKDF in milliseconds",
    ),
    ("size", Kind::Size, "Virtual disk size"),
    (
        "compat",
        Kind::Str,
        "Compatibility level (v2 [0.10] or v3 [1.1])",
    ),
    ("backing_file", Kind::Str, "File name of a base image"),
    ("backing_fmt", Kind::Str, "Image format of the base image"),
    ("data_file", Kind::Str, "File name of an external data file"),
    (
        "data_file_raw",
        Kind::Bool,
        "The external data file must stay valid as a raw image",
    ),
    ("lazy_refcounts", Kind::Bool, "Postpone refcount updates"),
    (
        "refcount_bits",
        Kind::Num,
        "Width of a reference count entry in bits",
    ),
];

/// qcow2 options that only image creation takes: naming one gets a hint.
const CREATE_ONLY_OPTS: &[(&str, Kind)] = &[
    ("encryption", Kind::Bool),
    ("encrypt.format", Kind::Str),
    ("encrypt.key-secret", Kind::Str),
    ("encrypt.cipher-alg", Kind::Str),
    ("encrypt.cipher-mode", Kind::Str),
    ("encrypt.ivgen-alg", Kind::Str),
    ("encrypt.ivgen-hash-alg", Kind::Str),
    ("encrypt.hash-alg", Kind::Str),
    ("cluster_size", Kind::Size),
    ("extended_l2", Kind::Bool),
    ("preallocation", Kind::Str),
    ("compression_type", Kind::Str),
];

fn no_amend(fmt: &str) -> CliError {
    CliError::new(format!(
        "Format driver '{fmt}' does not support option amendment"
    ))
}

/// `-o help`: the amend options of `fmt`, as qemu-img lists them.
fn print_amend_help(fmt: &str) -> CmdResult {
    if fmt == "luks" {
        return Err(CliError::new("The 'luks' format is not supported by img"));
    }
    if fmt != "qcow2" {
        // Drivers qemu knows say they cannot amend; others are unknown.
        if crate::commands::create::BLOCK_DRIVERS.contains(&fmt) {
            return Err(no_amend(fmt));
        }
        return Err(CliError::new(format!("Unknown file format '{fmt}'")));
    }
    let mut list: Vec<_> = AMEND_OPTS.to_vec();
    list.sort_by(|a, b| a.0.cmp(b.0));
    let mut out = format!("Amend options for '{fmt}':\n");
    for (name, kind, help) in list {
        let kind = match kind {
            Kind::Str => "str",
            Kind::Bool => "bool (on/off)",
            Kind::Num => "num",
            Kind::Size => "size",
        };
        let head = format!("{name}=<{kind}>");
        out.push_str(&format!("  {head:<22} - {help}\n"));
    }
    print!("{out}");
    Ok(0)
}

/// A value after qemu's type check.
enum Value {
    Str(String),
    Bool(bool),
    Num(u64),
}

/// Checks `value` against the option's type, with qemu's messages.
fn typed(name: &str, kind: Kind, value: &str) -> Result<Value, String> {
    Ok(match kind {
        Kind::Str => Value::Str(value.to_string()),
        Kind::Bool => Value::Bool(parse_bool(name, value).map_err(|e| e.message)?),
        Kind::Num => Value::Num(cvt::parse_u64(value).map_err(|e| match e {
            NumError::Range => format!("Value '{value}' is too large for parameter '{name}'"),
            NumError::Invalid => format!("Parameter '{name}' expects a number"),
        })?),
        Kind::Size => Value::Num(cvt::parse_size(value).map_err(|e| match e {
            NumError::Range => format!("Value '{value}' is out of range for parameter '{name}'"),
            NumError::Invalid => format!(
                "Parameter '{name}' expects a non-negative number below 2^64\n\
                 Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n\
                 and exabytes, respectively."
            ),
        })?),
    })
}

/// Parses the `-o` list against qcow2's amend options. On failure, a list that creation would
/// have accepted gets qemu's hint.
fn parse_amend_options(list: &str) -> Result<AmendOptions, CliError> {
    let (pairs, _) = split_options(list);
    let find = |name: &str| AMEND_OPTS.iter().find(|d| d.0 == name).map(|d| d.1);
    let mut opts = AmendOptions::default();
    for (name, value) in &pairs {
        let result = match find(name) {
            Some(kind) => typed(name, kind, value),
            None => Err(format!("Invalid parameter '{name}'")),
        };
        let v = match result {
            Ok(v) => v,
            Err(message) => {
                let creation_ok = pairs.iter().all(|(n, v)| {
                    find(n)
                        .or_else(|| {
                            CREATE_ONLY_OPTS
                                .iter()
                                .find(|d| d.0 == n.as_str())
                                .map(|d| d.1)
                        })
                        .is_some_and(|k| typed(n, k, v).is_ok())
                });
                let hint = if creation_ok {
                    "\nThis option is only supported for image creation"
                } else {
                    ""
                };
                return Err(CliError::new(format!("{message}{hint}")));
            }
        };
        // The last value given wins, as qemu looks options up.
        match (name.as_str(), v) {
            (n, _) if n.starts_with("encrypt.") => opts.encrypt = true,
            ("size", Value::Num(n)) => opts.size = Some(n),
            ("compat", Value::Str(s)) => opts.compat = Some(s),
            ("backing_file", Value::Str(s)) => opts.backing_file = Some(s),
            ("backing_fmt", Value::Str(s)) => opts.backing_fmt = Some(s),
            ("data_file", Value::Str(s)) => opts.data_file = Some(s),
            ("data_file_raw", Value::Bool(b)) => opts.data_file_raw = Some(b),
            ("lazy_refcounts", Value::Bool(b)) => opts.lazy_refcounts = Some(b),
            ("refcount_bits", Value::Num(n)) => opts.refcount_bits = Some(n),
            _ => {}
        }
    }
    Ok(opts)
}

/// qemu-img's progress line for amend: absolute percentages, printed when they moved by more
/// than one percent (or are 0 or 100), in single precision as qemu computes them.
struct Progress {
    enabled: bool,
    last_print: f32,
}

impl Progress {
    const MIN_SKIP: f32 = 1.0;

    fn print(&mut self, value: f32) {
        let current = value.min(100.0);
        if current > self.last_print + Self::MIN_SKIP
            || current < self.last_print - Self::MIN_SKIP
            || current == 0.0
            || current == 100.0
        {
            self.last_print = current;
            if self.enabled {
                print!("    ({current:3.2}/100%)\r");
                let _ = std::io::stdout().flush();
            }
        }
    }

    fn end(&self) {
        if self.enabled {
            println!();
        }
    }
}

/// Runs `img amend` with its arguments.
pub fn run(args: &[String]) -> CmdResult {
    let (parsed, pos) = parse(args, SPECS)?;
    let mut quiet = false;
    let mut progress = false;
    let mut fmt: Option<String> = None;
    let mut cache = "writeback".to_string();
    let mut image_opts = false;
    let mut options: Option<String> = None;
    for o in &parsed {
        let v = o.value.clone().unwrap_or_default();
        match o.name.as_str() {
            "help" => {
                print!("{HELP}");
                return Ok(0);
            }
            "quiet" => quiet = true,
            "progress" => progress = true,
            "format" => fmt = Some(v),
            "cache" => cache = v,
            "image-opts" => image_opts = true,
            "options" => {
                if !valid_option_list(&v) {
                    return Err(CliError::new(format!("Invalid option list: {v}")));
                }
                options = Some(match options {
                    Some(prev) => format!("{prev},{v}"),
                    None => v,
                });
            }
            // --object defines secrets, which only encryption needs (refused); --force only
            // matters for encryption keyslots.
            _ => {}
        }
    }
    let Some(options) = options else {
        return Err(CliError::usage("Must specify options (-o)"));
    };
    if quiet {
        progress = false;
    }
    let mut bar = Progress {
        enabled: progress,
        last_print: 0.0,
    };
    let result = amend(&options, fmt.as_deref(), image_opts, &cache, &pos, &mut bar);
    bar.end();
    result
}

fn amend(
    options: &str,
    fmt: Option<&str>,
    image_opts: bool,
    cache: &str,
    pos: &[String],
    bar: &mut Progress,
) -> CmdResult {
    let help = split_options(options).1;
    if let (Some(f), true) = (fmt, help) {
        return print_amend_help(f);
    }
    let [filename] = pos else {
        return Err(CliError::new("Expecting one image file name"));
    };
    let cache_mode = open::parse_cache(cache)
        .ok_or_else(|| CliError::new(format!("Invalid cache option: {cache}")))?;
    let spec = ImageSpec::from_args_checked(filename, image_opts, fmt)?;
    let mut image = open::open(&spec, false, cache_mode)?;
    // (`open` warns about a probed raw image opened for writing, as qemu-img does.)
    let driver = image.format().driver();
    if help {
        return print_amend_help(driver);
    }
    if driver != "qcow2" {
        return Err(no_amend(driver));
    }
    let opts = parse_amend_options(options)?;
    bar.print(0.0);
    let result = amend_image(&mut image, &opts, &mut |p| bar.print(p));
    bar.print(100.0);
    result.map_err(|e| CliError::new(e.to_string()))?;
    image.close()?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_and_hints() {
        let o = parse_amend_options("compat=1.1,refcount_bits=8,lazy_refcounts=off").unwrap();
        assert_eq!(o.compat.as_deref(), Some("1.1"));
        assert_eq!(o.refcount_bits, Some(8));
        assert_eq!(o.lazy_refcounts, Some(false));
        let e = parse_amend_options("cluster_size=4k").unwrap_err();
        assert_eq!(
            e.message,
            "Invalid parameter 'cluster_size'\nThis option is only supported for image creation"
        );
        let e = parse_amend_options("cluster_size=4k,foo=1").unwrap_err();
        assert_eq!(e.message, "Invalid parameter 'cluster_size'");
        let e = parse_amend_options("lazy_refcounts=maybe").unwrap_err();
        assert_eq!(
            e.message,
            "Parameter 'lazy_refcounts' expects 'on' or 'off'"
        );
        let o = parse_amend_options("compat=0.10,compat=1.1").unwrap();
        assert_eq!(o.compat.as_deref(), Some("1.1"));
    }
}
