//! `img rebase`: give an image a new backing file (or none).
//!
//! The safe mode first copies into the image every cluster that would read differently under
//! the new backing file (`img_core::ops::rebase`), then records the new name; `-u` only
//! records it.

use crate::getopt::{opt, parse, OptSpec};
use crate::open::{self, parse_cache, ImageSpec};
use crate::progress::Progress;
use crate::{CliError, CmdResult};
use img_core::chain::resolve_backing_name;
use img_core::ops::rebase::{copy_differences, RebaseOptions};
use img_core::{BackingPolicy, Image};

const SPECS: &[OptSpec] = &[
    opt(Some('h'), Some("help"), false),
    opt(Some('f'), Some("format"), true),
    opt(None, Some("image-opts"), false),
    opt(Some('t'), Some("cache"), true),
    opt(Some('q'), Some("quiet"), false),
    opt(Some('U'), Some("force-share"), false),
    opt(Some('p'), Some("progress"), false),
    opt(Some('b'), Some("backing"), true),
    opt(Some('F'), Some("backing-format"), true),
    opt(Some('B'), Some("backing-cache"), true),
    opt(Some('T'), None, true),
    opt(Some('u'), Some("backing-unsafe"), false),
    opt(None, Some("object"), true),
    opt(Some('c'), Some("compress"), false),
];

const USAGE: &str = "\
Usage: img rebase [-f FMT | --image-opts] [-t CACHE] [-q] [-U] [-p]
                  [-b BACKING_FILENAME [-F BACKING_FMT] [-T BACKING_CACHE]] [-u] [-c] FILENAME

Changes the backing file of FILENAME. Unless -u is given, every cluster that would read
differently under the new backing file is first copied into FILENAME.

  -f, --format FMT           format of FILENAME (default: probed)
  --image-opts               FILENAME is an option string (driver=qcow2,file.filename=...)
  -t, --cache MODE           cache mode of FILENAME (default: writeback)
  -b, --backing FILE         the new backing file (\"\" for none)
  -F, --backing-format FMT   its format
  -T, --backing-cache MODE   cache mode of the backing files (default: writeback)
  -u, --backing-unsafe       only record the new name; copy nothing
  -c, --compress             write copied clusters compressed
  -p, --progress             show progress
  -q, --quiet                print nothing but errors
  -U, --force-share          open the backing files in shared mode
  -h, --help                 show this help
";

/// Runs `img rebase` with its arguments.
pub fn run(args: &[String]) -> CmdResult {
    let (opts, pos) = parse(args, SPECS)?;
    let mut fmt: Option<String> = None;
    let mut image_opts = false;
    let mut cache = "writeback".to_string();
    let mut src_cache = "writeback".to_string();
    let mut quiet = false;
    let mut show_progress = false;
    let mut force_share = false;
    let mut backing: Option<String> = None;
    let mut backing_fmt: Option<String> = None;
    let mut unsafe_mode = false;
    let mut compress = false;
    for o in &opts {
        let v = o.value.clone().unwrap_or_default();
        match o.name.as_str() {
            "help" => {
                print!("{USAGE}");
                return Ok(0);
            }
            "format" => fmt = Some(v),
            "image-opts" => image_opts = true,
            "cache" => cache = v,
            "backing-cache" | "T" => src_cache = v,
            "quiet" => quiet = true,
            "progress" => show_progress = true,
            "force-share" => force_share = true,
            "backing" => backing = Some(v),
            "backing-format" => backing_fmt = Some(v),
            "backing-unsafe" => unsafe_mode = true,
            "compress" => compress = true,
            _ => {}
        }
    }
    if pos.len() != 1 {
        return Err(CliError::usage("Expecting one image file name"));
    }
    if backing.is_none() && !unsafe_mode {
        return Err(CliError::usage(
            "Must specify backing file (-b) or use unsafe mode (-u)",
        ));
    }
    // -u without -b removes the backing file, as -b "" does.
    let backing = backing.unwrap_or_default();
    if image_opts && fmt.is_some() {
        return Err(CliError::new(
            "--image-opts and --format are mutually exclusive",
        ));
    }
    let cache = parse_cache(&cache)
        .ok_or_else(|| CliError::new(format!("Invalid cache option: {cache}")))?;
    let src_cache = parse_cache(&src_cache)
        .ok_or_else(|| CliError::new(format!("Invalid source cache option: {src_cache}")))?;

    // The image, with its old chain unless -u.
    let mut spec = ImageSpec::from_args(&pos[0], image_opts, fmt.as_deref())?;
    if unsafe_mode {
        spec = spec.with_backing(BackingPolicy::none());
    }
    let mut image = open::open(&spec, false, cache)?;

    let new_name = (!backing.is_empty()).then_some(backing.as_str());
    let mut bar = Progress::new(show_progress && !quiet);
    bar.advance(0.0);
    if !unsafe_mode {
        let new_backing = match new_name {
            Some(name) => Some(open_new_backing(
                &spec.path,
                name,
                backing_fmt.as_deref(),
                force_share,
                src_cache,
            )?),
            None => None,
        };
        copy_differences(
            &image,
            new_backing.as_ref(),
            RebaseOptions { compress },
            &mut |done, total| bar.bytes(done, total),
        )
        .map_err(|e| CliError::new(format!("Could not rebase '{}': {e}", spec.path)))?;
    }
    if new_name.is_some() && backing_fmt.is_none() {
        return Err(CliError::new(format!(
            "Could not change the backing file to '{backing}': backing format must be specified"
        )));
    }
    image
        .set_backing_file(new_name, backing_fmt.as_deref())
        .map_err(|e| {
            let why = match &e {
                img_core::Error::Unsupported { .. } => "Operation not supported".to_string(),
                other => open::open_reason(other),
            };
            CliError::new(format!(
                "Could not change the backing file to '{backing}': {why}"
            ))
        })?;
    image
        .close()
        .map_err(|e| CliError::new(format!("Could not rebase '{}': {e}", spec.path)))?;
    bar.bytes(1, 1);
    bar.end();
    Ok(0)
}

/// Opens the new backing file (named relative to the image, as it will be recorded).
fn open_new_backing(
    image_path: &str,
    name: &str,
    format: Option<&str>,
    force_share: bool,
    cache: blockdev::CacheMode,
) -> Result<Image, CliError> {
    let full = resolve_backing_name(image_path, name);
    let spec = ImageSpec::file(&full, format).with_force_share(force_share);
    open::open(&spec, true, cache).map_err(|e| {
        // `open` words it as "Could not open 'FULL': REASON"; qemu names the new backing file.
        let reason = e
            .message
            .split_once(": ")
            .map(|(_, r)| r.to_string())
            .unwrap_or(e.message.clone());
        CliError::new(format!(
            "Could not open new backing file '{name}': {reason}"
        ))
    })
}
