//! `img resize`: grow or shrink an image, with qemu-img's command line, checks and messages.
//!
//! The arguments are taken in order, as qemu-img's getopt loop takes them: the first
//! non-option is the file name, the second the size; a size right after the file name may
//! start with a minus sign (`img resize disk.qcow2 -1G`) without being read as an option.

use crate::cvt::{self, NumError};
use crate::getopt::{opt, parse, OptSpec};
use crate::open::{self, ImageSpec};
use crate::{CliError, CmdResult};
use blockdev::network::Protocol;
use img_core::raw::Preallocation;

const SPECS: &[OptSpec] = &[
    opt(Some('h'), Some("help"), false),
    opt(Some('f'), Some("format"), true),
    opt(Some('q'), Some("quiet"), false),
    opt(None, Some("object"), true),
    opt(None, Some("image-opts"), false),
    opt(None, Some("preallocation"), true),
    opt(None, Some("shrink"), false),
];

const HELP: &str = "Usage:
Resize the image to the new size.  Usage:

  img resize [-f FMT | --image-opts] [--preallocation PREALLOC] [--shrink]
        [--object OBJECTDEF] [-q] FILENAME [+-]SIZE[bkKMGTPE]

Arguments:
  -h, --help
     print this help and exit
  -q, --quiet
     quiet operation
  -f, --format FMT
     specify FILENAME format explicitly
  --image-opts
     indicates that FILENAME is a complete image specification
   instead of a file name (incompatible with --format)
  --shrink
     allow operation when new size is smaller than original
  --preallocation PREALLOC
     specify preallocation type for the new areas
  --object OBJDEF
     QEMU user-creatable object (eg encryption key)
  FILENAME
     image file (specification) to resize
  [+-]SIZE[bkKMGTPE]
     new image size or amount by which to shrink/grow,
     with optional suffix (1024-based multiplies)

";

/// qemu's warning after a refused shrink.
const SHRINK_WARNING: &str = "Shrinking an image will delete all data beyond the shrunken \
                              image's end. Before performing such an operation, make sure there \
                              is no important data there.";

/// What the command line asks for.
#[derive(Debug, Default)]
struct Args {
    format: Option<String>,
    quiet: bool,
    image_opts: bool,
    prealloc: Option<Preallocation>,
    shrink: bool,
    filename: Option<String>,
    size: Option<String>,
}

/// Walks the arguments in order. `Ok(None)` means the help was printed.
fn parse_args(args: &[String]) -> Result<Option<Args>, CliError> {
    let mut a = Args::default();
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        if arg == "--" {
            // What follows fills the file name and the size if they are still missing.
            let mut rest = args[i + 1..].iter();
            if a.filename.is_none() {
                a.filename = rest.next().cloned();
            }
            if a.size.is_none() {
                a.size = rest.next().cloned();
            }
            if rest.next().is_some() {
                a.size = None;
            }
            break;
        }
        if arg.len() > 1 && arg.starts_with('-') {
            // One option token, with its argument in the next token when it needs one.
            let (opts, used) = match parse(&args[i..i + 1], SPECS) {
                Ok((opts, _)) => (opts, 1),
                Err(e) if e.message.contains("requires an argument") && i + 1 < args.len() => {
                    (parse(&args[i..i + 2], SPECS)?.0, 2)
                }
                Err(e) => return Err(e),
            };
            for o in opts {
                let v = o.value.unwrap_or_default();
                match o.name.as_str() {
                    "help" => {
                        print!("{HELP}");
                        return Ok(None);
                    }
                    "format" => a.format = Some(v),
                    "quiet" => a.quiet = true,
                    "image-opts" => a.image_opts = true,
                    "preallocation" => {
                        a.prealloc = Some(Preallocation::parse(&v).map_err(|_| {
                            CliError::new(format!("Invalid preallocation mode '{v}'"))
                        })?)
                    }
                    "shrink" => a.shrink = true,
                    // --object defines secrets, which only encrypted images need.
                    _ => {}
                }
            }
            i += used;
            continue;
        }
        if a.filename.is_none() {
            a.filename = Some(arg.clone());
            // A negative size right after the file name is the size, not an option.
            if let Some(next) = args.get(i + 1) {
                let b = next.as_bytes();
                if b.len() >= 2 && b[0] == b'-' && b[1].is_ascii_digit() {
                    a.size = Some(next.clone());
                    i += 1;
                }
            }
        } else if a.size.is_none() {
            a.size = Some(arg.clone());
        } else {
            return Err(CliError::usage("Extra argument(s) in command line"));
        }
        i += 1;
    }
    if a.filename.is_none() || a.size.is_none() {
        return Err(CliError::usage("Expecting image file name and size"));
    }
    Ok(Some(a))
}

/// Runs `img resize` with its arguments.
pub fn run(args: &[String]) -> CmdResult {
    let Some(a) = parse_args(args)? else {
        return Ok(0);
    };
    let filename = a.filename.as_deref().unwrap_or_default();
    let size_arg = a.size.as_deref().unwrap_or_default();
    let (sign, text) = match size_arg.as_bytes().first() {
        Some(b'+') => (1i64, &size_arg[1..]),
        Some(b'-') => (-1, &size_arg[1..]),
        _ => (0, size_arg),
    };
    let n = match cvt::parse_size(text) {
        Ok(n) => n,
        Err(NumError::Range) => {
            return Err(CliError::new(format!(
                "Value '{text}' is out of range for parameter 'size'"
            )))
        }
        Err(NumError::Invalid) => {
            return Err(CliError::new(
                "Parameter 'size' expects a non-negative number below 2^64\n\
                 Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n\
                 and exabytes, respectively.",
            ))
        }
    };
    let mut spec = ImageSpec::from_args_checked(filename, a.image_opts, a.format.as_deref())?;
    if spec.options.discard.is_none() {
        // qemu-img opens the image without unmap: clusters freed by a shrink keep their
        // blocks in the file (only the cut tail goes), unless the options ask for discards.
        spec.options.discard = Some("ignore".to_string());
    }
    if spec.options.read_only {
        return Err(CliError::new(format!(
            "Could not open '{}': Block node is read-only",
            spec.arg
        )));
    }
    refuse_bitmaps(&spec)?;
    let cache = open::parse_cache("writeback").expect("writeback is a cache mode");
    // The open prints qemu's warning when it probed a raw image for writing.
    let mut image = open::open(&spec, false, cache)?;

    // qemu's arithmetic is signed 64-bit, so huge sizes come out negative and are refused.
    let current = img_core::ops::status::qemu_length(&image) as i64;
    let total = match sign {
        0 => n as i64,
        1 => current.wrapping_add(n as i64),
        _ => current.wrapping_sub(n as i64),
    };
    if total <= 0 {
        return Err(CliError::new("New image size must be positive"));
    }
    let prealloc = a.prealloc.unwrap_or_default();
    if total <= current && prealloc != Preallocation::Off {
        return Err(CliError::new(
            "Preallocation can only be used for growing images",
        ));
    }
    if total < current && !a.shrink {
        return Err(CliError::new(format!(
            "Use the --shrink option to perform a shrink operation.\nimg: warning: {SHRINK_WARNING}"
        )));
    }
    // An export's or a LUN's size is its server's to change: qemu refuses every exact resize.
    if image.format().driver() == "raw" {
        match blockdev::network::Protocol::of(&spec.path) {
            Protocol::Iscsi => return Err(CliError::new("Cannot resize iSCSI devices")),
            Protocol::Nbd => return Err(CliError::new("Cannot resize NBD nodes")),
            _ => {}
        }
    }
    image.resize(total as u64, prealloc)?;
    image.close()?;
    if !a.quiet {
        println!("Image resized.");
    }
    Ok(0)
}

/// Persistent dirty bitmaps would have to be resized with the image, which this build does
/// not do; opening the image for writing would also declare them stale. Refuse before that.
fn refuse_bitmaps(spec: &ImageSpec) -> Result<(), CliError> {
    if spec.protocol_only || !matches!(spec.format.as_deref(), None | Some("qcow2")) {
        return Ok(());
    }
    let Ok(file) = blockdev::FileStorage::open_read_only(&spec.path) else {
        // Let the real open report it.
        return Ok(());
    };
    let is_qcow2 = img_core::probe_format(&file).is_ok_and(|f| f == "qcow2");
    if is_qcow2 && crate::qcow2_bitmaps::bitmaps(&file).is_some() {
        return Err(CliError::new(format!(
            "Could not resize '{}': resizing images with persistent dirty bitmaps is not \
             supported yet",
            spec.arg
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    fn names(v: &[&str]) -> (Option<String>, Option<String>) {
        let a = parse_args(&s(v)).unwrap().unwrap();
        (a.filename, a.size)
    }

    #[test]
    fn arguments_in_order() {
        let pair = |f: &str, z: &str| (Some(f.to_string()), Some(z.to_string()));
        assert_eq!(names(&["a", "-1G"]), pair("a", "-1G"));
        assert_eq!(names(&["-q", "a", "+1G"]), pair("a", "+1G"));
        assert_eq!(names(&["a", "-q", "1G"]), pair("a", "1G"));
        assert_eq!(names(&["a", "--", "-2G"]), pair("a", "-2G"));
        assert_eq!(names(&["--", "a", "-2G"]), pair("a", "-2G"));
        assert_eq!(names(&["-f", "raw", "a", "1G"]), pair("a", "1G"));
        let a = parse_args(&s(&["--preallocation", "full", "--shr", "a", "1G"]))
            .unwrap()
            .unwrap();
        assert_eq!(a.prealloc, Some(Preallocation::Full));
        assert!(a.shrink);
        let msg = |v: &[&str]| parse_args(&s(v)).unwrap_err().message;
        assert_eq!(msg(&["a", "b", "c"]), "Extra argument(s) in command line");
        assert_eq!(msg(&["a"]), "Expecting image file name and size");
        assert_eq!(
            msg(&["a", "b", "--", "c"]),
            "Expecting image file name and size"
        );
        assert_eq!(msg(&["-q", "1G"]), "Expecting image file name and size");
        assert_eq!(
            msg(&["--preallocation=x", "a", "1G"]),
            "Invalid preallocation mode 'x'"
        );
        assert_eq!(msg(&["-U", "a", "1G"]), "invalid option -- 'U'");
        assert_eq!(msg(&["-f"]), "option requires an argument -- 'f'");
    }
}
