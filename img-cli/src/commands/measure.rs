//! `img measure`: the file size a new raw or qcow2 image needs, for a given virtual size or to
//! hold the content of an existing image, with qemu-img's options, checks and output.
//!
//! The checks run in qemu-img's order: the command line, then the source image (opened, and
//! its snapshot loaded), then the target format and its `-o` options, then the target
//! driver's own checks.

use super::create::{split_options, valid_option_list, Opts};
use crate::cvt;
use crate::getopt::{opt, parse, OptSpec};
use crate::open::{self, ImageSpec};
use crate::qjson::{to_json_pretty, QValue};
use crate::{CliError, CmdResult};
use img_core::ops::measure::{self, Measurement, Qcow2Target, Source};
use img_core::qcow2::measure::Layout;
use img_core::qcow2::SnapshotSelector;
use img_core::raw::Preallocation;
use img_core::Image;

const SPECS: &[OptSpec] = &[
    opt(Some('h'), Some("help"), false),
    opt(Some('f'), Some("format"), true),
    opt(Some('l'), Some("snapshot"), true),
    opt(Some('o'), Some("options"), true),
    opt(Some('O'), Some("target-format"), true),
    opt(Some('U'), Some("force-share"), false),
    opt(None, Some("object"), true),
    opt(None, Some("image-opts"), false),
    opt(None, Some("output"), true),
    opt(None, Some("size"), true),
];

const HELP: &str = "Usage:
Calculate file size requred for a new image.  Usage:

  img measure [-f FMT|--image-opts] [-o OPTIONS] [-O OUTPUT_FMT]
       [--output OFMT] [--object OBJDEF] [-l SNAPSHOT_PARAM]
       (--size SIZE | FILENAME)

Arguments:
  -h, --help
     print this help and exit
  -O, --target-format FMT
     desired target/output image format (default raw)
  -s, --size SIZE
     measure file size for given image size
  FILENAME
     measure file size required to convert from FILENAME
  -f, --format
     specify format of FILENAME explicitly
  --image-opts
     indicates that FILENAME is a complete image specification
     instead of a file name (incompatible with --format)
  -l, --snapshot SNAPSHOT
     use this snapshot in FILENAME as source
  --output human|json
     output format
  -U, --force-share
     open images in shared mode for concurrent access

";

/// Formats qemu knows that cannot create images.
const NO_CREATE: &[&str] = &[
    "blkdebug",
    "blklogwrites",
    "blkverify",
    "bochs",
    "cloop",
    "compress",
    "copy-before-write",
    "copy-on-read",
    "dmg",
    "null-aio",
    "null-co",
    "preallocate",
    "quorum",
    "replication",
    "snapshot-access",
    "throttle",
    "vvfat",
];

/// Formats qemu can create but not measure.
const NO_MEASURE: &[&str] = &[
    "file",
    "host_cdrom",
    "host_device",
    "nbd",
    "nvme",
    "parallels",
    "qcow",
    "qed",
    "vdi",
    "vhdx",
    "vmdk",
    "vpc",
];

/// The snapshot `-l` names.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
enum Snapshot {
    #[default]
    None,
    /// `-l ID_OR_NAME`: an ID, or else a name.
    IdOrName(String),
    /// `-l snapshot.id=ID,snapshot.name=NAME`: whichever are given must match.
    Keys {
        id: Option<String>,
        name: Option<String>,
    },
}

/// What the command line asks for.
#[derive(Debug)]
struct Args {
    format: Option<String>,
    image_opts: bool,
    snapshot: Snapshot,
    options: Option<String>,
    target: String,
    json: bool,
    size: Option<u64>,
    filename: Option<String>,
    force_share: bool,
}

/// Parses `-l snapshot.id=...,snapshot.name=...` as qemu does.
fn parse_snapshot_keys(v: &str) -> Result<Snapshot, CliError> {
    let (mut id, mut name) = (None, None);
    for (k, val) in split_options(v).0 {
        match k.as_str() {
            "snapshot.id" => id = Some(val),
            "snapshot.name" => name = Some(val),
            _ => {
                return Err(CliError::new(format!(
                    "Invalid parameter '{k}'\nimg: Failed in parsing snapshot param '{v}'"
                )))
            }
        }
    }
    Ok(Snapshot::Keys { id, name })
}

/// Parses the command line. `Ok(None)` means the help was printed.
fn parse_args(args: &[String]) -> Result<Option<Args>, CliError> {
    let (opts, pos) = parse(args, SPECS)?;
    let mut a = Args {
        format: None,
        image_opts: false,
        snapshot: Snapshot::None,
        options: None,
        target: "raw".to_string(),
        json: false,
        size: None,
        filename: None,
        force_share: false,
    };
    for o in opts {
        let v = o.value.unwrap_or_default();
        match o.name.as_str() {
            "help" => {
                print!("{HELP}");
                return Ok(None);
            }
            "format" => a.format = Some(v),
            "snapshot" => {
                a.snapshot = if v.starts_with("snapshot.") {
                    parse_snapshot_keys(&v)?
                } else {
                    Snapshot::IdOrName(v)
                }
            }
            "options" => {
                if !valid_option_list(&v) {
                    return Err(CliError::new(format!("Invalid option list: {v}")));
                }
                a.options = Some(match a.options.take() {
                    Some(prev) => format!("{prev},{v}"),
                    None => v,
                });
            }
            "target-format" => a.target = v,
            "image-opts" => a.image_opts = true,
            "output" => {
                a.json = match v.as_str() {
                    "human" => false,
                    "json" => true,
                    _ => {
                        return Err(CliError::usage(format!(
                            "--output expects 'human' or 'json' not '{v}'"
                        )))
                    }
                }
            }
            "size" => a.size = Some(cvt::cvtnum("image size", &v)?),
            "force-share" => a.force_share = true,
            // --object defines secrets, which only encryption needs.
            _ => {}
        }
    }
    if pos.len() > 1 {
        return Err(CliError::new("At most one filename argument is allowed."));
    }
    a.filename = pos.into_iter().next();
    let filename_needed = a.image_opts || a.format.is_some() || a.snapshot != Snapshot::None;
    match (&a.filename, a.size) {
        (None, _) if filename_needed => Err(CliError::new(
            "--image-opts, -f, and -l require a filename argument.",
        )),
        (Some(_), Some(_)) => Err(CliError::new(
            "--size N cannot be used together with a filename.",
        )),
        (None, None) => Err(CliError::new(
            "Either --size N or one filename must be specified.",
        )),
        _ => Ok(Some(a)),
    }
}

/// Runs `img measure` with its arguments.
pub fn run(args: &[String]) -> CmdResult {
    let Some(a) = parse_args(args)? else {
        return Ok(0);
    };
    let source = match &a.filename {
        Some(name) => Some(open_source(name, &a)?),
        None => None,
    };
    let target = a.target.as_str();
    if NO_CREATE.contains(&target) {
        return Err(CliError::new(format!(
            "Format driver '{target}' does not support image creation"
        )));
    }
    if NO_MEASURE.contains(&target) {
        return Err(CliError::new(format!(
            "Block driver '{target}' does not support size measurement"
        )));
    }
    if target == "luks" {
        let has_secret = a
            .options
            .as_deref()
            .is_some_and(|o| split_options(o).0.iter().any(|(k, _)| k == "key-secret"));
        return Err(CliError::new(if has_secret {
            "Measuring 'luks' images is not supported yet".to_string()
        } else {
            "Parameter 'key-secret' is required for cipher".to_string()
        }));
    }
    if target != "raw" && target != "qcow2" {
        return Err(CliError::new(format!("Unknown file format '{target}'")));
    }
    let mut opts = Opts::for_format(target);
    if let Some(list) = &a.options {
        for (k, v) in split_options(list).0 {
            opts.set(&k, &v).map_err(|m| {
                CliError::new(format!(
                    "{m}\nimg: Invalid options for file format '{target}'"
                ))
            })?;
        }
    }
    let image = source.as_ref();
    let m = if target == "raw" {
        measure::measure_raw(image, a.size.unwrap_or(0))
    } else {
        let t = qcow2_target(&opts, a.size)?;
        let source = source.as_ref().map(|image| Source { image });
        measure::measure_qcow2(&t, source)?
    };
    print_measurement(&m, a.json);
    Ok(0)
}

/// Opens the source read-only and, with `-l`, finds the snapshot to measure.
fn open_source(name: &str, a: &Args) -> Result<Image, CliError> {
    let spec = ImageSpec::from_args_checked(name, a.image_opts, a.format.as_deref())?
        .with_force_share(a.force_share);
    let cache = open::parse_cache("writeback").expect("writeback is a cache mode");
    let mut image = open::open(&spec, true, cache)?;
    let selector = match &a.snapshot {
        Snapshot::None => return Ok(image),
        Snapshot::IdOrName(s) => SnapshotSelector::IdOrName(s.clone()),
        Snapshot::Keys { id, name } => SnapshotSelector::Match {
            id: id.clone(),
            name: name.clone(),
        },
    };
    // The image then reads as the snapshot saw it, through its backing chain, as qemu's
    // temporarily loaded snapshot does.
    super::snapshot::load(&mut image, &selector)?;
    Ok(image)
}

/// The qcow2 options measuring depends on, checked in qemu's order with its messages.
fn qcow2_target(o: &Opts, size: Option<u64>) -> Result<Qcow2Target, CliError> {
    let err = |m: &str| CliError::new(m);
    let extended_l2 = o.bool("extended_l2");
    let cluster_size = o.number("cluster_size").unwrap_or(65536);
    if !cluster_size.is_power_of_two() || !(512..=2 << 20).contains(&cluster_size) {
        return Err(err(
            "Cluster size must be a power of two between 512 and 2048k",
        ));
    }
    if extended_l2 && cluster_size < 16384 {
        return Err(err(
            "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
        ));
    }
    let version = match o.text("compat") {
        None | Some("1.1") => 3,
        Some("0.10") => 2,
        Some(v) => return Err(CliError::new(format!("Invalid compatibility level: '{v}'"))),
    };
    let refcount_bits = o.number("refcount_bits").unwrap_or(16);
    if refcount_bits > 64 || !refcount_bits.is_power_of_two() {
        return Err(err(
            "Refcount width must be a power of two and may not exceed 64 bits",
        ));
    }
    if version < 3 && refcount_bits != 16 {
        return Err(err(
            "Different refcount widths than 16 bits require compatibility level 1.1 or above \
             (use compat=1.1 or greater)",
        ));
    }
    let prealloc = match o.text("preallocation") {
        None => Preallocation::Off,
        Some(p) => Preallocation::parse(p)
            .map_err(|_| CliError::new(format!("invalid parameter value: {p}")))?,
    };
    let has_backing_file = o.text("backing_file").is_some();
    if o.text("encrypt.format") == Some("luks") {
        return Err(if o.text("encrypt.key-secret").is_none() {
            err("Parameter 'encrypt.key-secret' is required for cipher")
        } else {
            err("Encrypted images are not supported yet")
        });
    }
    Ok(Qcow2Target {
        layout: Layout {
            cluster_size,
            refcount_order: refcount_bits.trailing_zeros(),
            extended_l2,
        },
        version,
        prealloc,
        has_backing_file,
        // --size replaces any size given with -o.
        size: size.or_else(|| o.number("size")).unwrap_or(0),
    })
}

/// Prints the result as qemu-img does, human-readable or as JSON.
fn print_measurement(m: &Measurement, json: bool) {
    if json {
        let mut fields = vec![
            ("required".to_string(), QValue::from(m.required)),
            (
                "fully-allocated".to_string(),
                QValue::from(m.fully_allocated),
            ),
        ];
        if let Some(b) = m.bitmaps {
            fields.push(("bitmaps".to_string(), QValue::from(b)));
        }
        println!("{}", to_json_pretty(&QValue::Dict(fields)));
    } else {
        println!("required size: {}", m.required);
        println!("fully allocated size: {}", m.fully_allocated);
        if let Some(b) = m.bitmaps {
            println!("bitmaps size: {b}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    fn err(v: &[&str]) -> String {
        parse_args(&s(v)).unwrap_err().message
    }

    #[test]
    fn command_line_checks_in_qemu_order() {
        assert_eq!(
            err(&[]),
            "Either --size N or one filename must be specified."
        );
        assert_eq!(
            err(&["--size", "1G", "a"]),
            "--size N cannot be used together with a filename."
        );
        assert_eq!(
            err(&["a", "b"]),
            "At most one filename argument is allowed."
        );
        assert_eq!(
            err(&["-f", "qcow2"]),
            "--image-opts, -f, and -l require a filename argument."
        );
        assert_eq!(err(&["-o", ","]), "Invalid option list: ,");
        assert_eq!(
            err(&["-l", "snapshot.foo=bar"]),
            "Invalid parameter 'snapshot.foo'\nimg: Failed in parsing snapshot param 'snapshot.foo=bar'"
        );
        assert_eq!(
            err(&["--size", "-1"]),
            "Invalid image size specified. Must be between 0 and 9223372036854775807."
        );
        assert_eq!(
            err(&["--output", "foo"]),
            "--output expects 'human' or 'json' not 'foo'"
        );
        let a = parse_args(&s(&["-l", "snapshot.id=1,snapshot.name=x", "f"]))
            .unwrap()
            .unwrap();
        assert_eq!(
            a.snapshot,
            Snapshot::Keys {
                id: Some("1".into()),
                name: Some("x".into())
            }
        );
    }
}
