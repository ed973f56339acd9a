//! `img map`: which image of the chain holds each range, and where, as qemu-img prints it.

use crate::cvt::cvtnum;
use crate::getopt::{opt, parse, OptSpec};
use crate::open::{self, ImageSpec};
use crate::{CliError, CmdResult};
use img_core::ops::map::{MapEntry, MapWalk};
use std::io::Write;

const SPECS: &[OptSpec] = &[
    opt(Some('h'), Some("help"), false),
    opt(Some('f'), Some("format"), true),
    opt(None, Some("image-opts"), false),
    opt(None, Some("output"), true),
    opt(Some('s'), Some("start-offset"), true),
    opt(Some('l'), Some("max-length"), true),
    opt(Some('U'), Some("force-share"), false),
    opt(None, Some("object"), true),
];

const USAGE: &str = "\
Usage: img map [-f FMT | --image-opts] [--output human|json] [--start-offset OFFSET]
               [--max-length LENGTH] [-U] FILENAME

Shows, for each range of the disk, which image of the backing chain holds it and where.

  -f, --format FMT        image format (default: probed)
  --image-opts            FILENAME is an option string (driver=qcow2,file.filename=...)
  --output human|json     output format (default: human)
  --start-offset OFFSET   start at this guest offset
  --max-length LENGTH     map at most this many bytes
  -U, --force-share       open the image in shared mode
  -h, --help              show this help
";

/// Runs `img map` with its arguments.
pub fn run(args: &[String]) -> CmdResult {
    let (opts, pos) = parse(args, SPECS)?;
    let mut fmt: Option<String> = None;
    let mut image_opts = false;
    let mut json = false;
    let mut force_share = false;
    let mut start = 0u64;
    let mut max_length: Option<u64> = None;
    for o in &opts {
        let v = o.value.clone().unwrap_or_default();
        match o.name.as_str() {
            "help" => {
                print!("{USAGE}");
                return Ok(0);
            }
            "format" => fmt = Some(v),
            "image-opts" => image_opts = true,
            "output" => match v.as_str() {
                "json" => json = true,
                "human" => json = false,
                _ => {
                    return Err(CliError::usage(format!(
                        "--output expects 'human' or 'json' not '{v}'"
                    )))
                }
            },
            "start-offset" => start = cvtnum("start offset", &v)?,
            "max-length" => max_length = Some(cvtnum("max length", &v)?),
            "force-share" => force_share = true,
            // --object defines secrets, which unencrypted images do not need.
            _ => {}
        }
    }
    if pos.len() != 1 {
        return Err(CliError::usage("Expecting one image file name"));
    }
    let spec = ImageSpec::from_args_checked(&pos[0], image_opts, fmt.as_deref())?
        .with_force_share(force_share);
    let image = open::open(&spec, true, Default::default())?;

    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let result = print_map(&mut out, MapWalk::new(&image, start, max_length), json);
    // What was printed stays printed, before any error message.
    let flushed = out.flush();
    result?;
    flushed.map_err(|e| CliError::new(format!("Could not write the map: {e}")))?;
    Ok(0)
}

fn print_map(out: &mut impl Write, walk: MapWalk, json: bool) -> Result<(), CliError> {
    let io = |e: std::io::Error| CliError::new(format!("Could not write the map: {e}"));
    if json {
        write!(out, "[").map_err(io)?;
    } else {
        writeln!(
            out,
            "{:<16}{:<16}{:<16}File",
            "Offset", "Length", "Mapped to"
        )
        .map_err(io)?;
    }
    let mut first = true;
    for entry in walk {
        let e = entry.map_err(|e| CliError::new(e.to_string()))?;
        if json {
            if !first {
                writeln!(out, ",").map_err(io)?;
            }
            write!(out, "{}", json_entry(&e)).map_err(io)?;
        } else {
            if e.data && e.offset.is_none() {
                return Err(CliError::new(
                    "File contains external, encrypted or compressed clusters.",
                ));
            }
            if e.data && !e.zero {
                let file = e.filename.as_deref().unwrap_or("");
                // An iSCSI LUN or RBD image is shown by its driver's options, as qemu does.
                let file = crate::qjson::json_filename(file, None).unwrap_or(file.to_string());
                writeln!(
                    out,
                    "{:<16}{:<16}{:<16}{}",
                    hex(e.start),
                    hex(e.length),
                    hex(e.offset.unwrap_or(0)),
                    file
                )
                .map_err(io)?;
            }
        }
        first = false;
    }
    if json {
        writeln!(out, "]").map_err(io)?;
    }
    Ok(())
}

/// C's `%#x`: a `0x` prefix, except for zero.
fn hex(n: u64) -> String {
    if n == 0 {
        "0".into()
    } else {
        format!("{n:#x}")
    }
}

/// One entry as qemu-img writes it in JSON (one line, its key order).
fn json_entry(e: &MapEntry) -> String {
    let mut s = format!(
        "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \
         \"data\": {}, \"compressed\": {}",
        e.start, e.length, e.depth, e.present, e.zero, e.data, e.compressed
    );
    if let Some(o) = e.offset {
        s.push_str(&format!(", \"offset\": {o}"));
    }
    s.push('}');
    s
}
