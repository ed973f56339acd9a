//! `img commit`: write an image's data into its backing file (or a base further down), then
//! empty the image.

use crate::cvt::cvtnum;
use crate::getopt::{opt, parse, OptSpec};
use crate::open::{self, parse_cache, ImageSpec};
use crate::progress::Progress;
use crate::{CliError, CmdResult};
use img_core::ops::commit::commit_into_base;
use img_core::{BackingPolicy, Image};
use std::time::{Duration, Instant};

const SPECS: &[OptSpec] = &[
    opt(Some('h'), Some("help"), false),
    opt(Some('f'), Some("format"), true),
    opt(None, Some("image-opts"), false),
    opt(Some('t'), Some("cache"), true),
    opt(Some('b'), Some("base"), true),
    opt(Some('d'), Some("drop"), false),
    opt(Some('r'), Some("rate-limit"), true),
    opt(Some('p'), Some("progress"), false),
    opt(Some('q'), Some("quiet"), false),
    opt(None, Some("object"), true),
];

const USAGE: &str = "\
Usage: img commit [-f FMT | --image-opts] [-t CACHE_MODE] [-b BASE_IMG] [-d] [-r RATE] [-p] [-q]
                  FILENAME

Writes the data FILENAME holds into its backing file, or into BASE_IMG further down its
backing chain, then empties FILENAME (unless -d or -b is given).

  -f, --format FMT        format of FILENAME (default: probed)
  --image-opts            FILENAME is an option string (driver=qcow2,file.filename=...)
  -t, --cache MODE        cache mode (default: writeback)
  -b, --base BASE_IMG     the image of the backing chain to commit into (implies -d)
  -d, --drop              do not empty FILENAME afterwards
  -r, --rate-limit RATE   copy at most RATE bytes per second
  -p, --progress          show progress
  -q, --quiet             print nothing but errors
  -h, --help              show this help
";

/// Runs `img commit` with its arguments.
pub fn run(args: &[String]) -> CmdResult {
    let (opts, pos) = parse(args, SPECS)?;
    let mut fmt: Option<String> = None;
    let mut image_opts = false;
    let mut cache = "writeback".to_string();
    let mut base: Option<String> = None;
    let mut drop = false;
    let mut rate: Option<u64> = None;
    let mut show_progress = false;
    let mut quiet = false;
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
            // As qemu: committing into a base further down leaves the images above it
            // invalid, so the top image is kept as it is (-b implies -d).
            "base" => {
                base = Some(v);
                drop = true;
            }
            "drop" => drop = true,
            "rate-limit" => rate = Some(cvtnum("rate limit", &v)?),
            "progress" => show_progress = true,
            "quiet" => quiet = true,
            _ => {}
        }
    }
    if pos.len() != 1 {
        return Err(CliError::usage("Expecting one image file name"));
    }
    if image_opts && fmt.is_some() {
        return Err(CliError::new(
            "--image-opts and --format are mutually exclusive",
        ));
    }
    let cache = parse_cache(&cache)
        .ok_or_else(|| CliError::new(format!("Invalid cache option: {cache}")))?;
    let spec = ImageSpec::from_args(&pos[0], image_opts, fmt.as_deref())?;

    // Find the base in the chain, then open the chain again with the base writable.
    let depth = {
        let chain = open::open(&spec, true, cache)?;
        base_depth(&chain, base.as_deref(), &spec.arg)?
    };
    let spec = spec.with_backing(BackingPolicy {
        writable_depth: Some(depth),
        ..Default::default()
    });
    let mut top = open::open(&spec, false, cache)?;
    let failed = |e: img_core::Error| CliError::new(format!("Could not commit image: {e}"));
    // As qemu: a base smaller than the top image grows to its size (a larger one is kept).
    let size = top.size();
    let base_image = top
        .at_depth_mut(depth)
        .expect("the base was found in this chain");
    if base_image.size() < size {
        base_image
            .resize(size, img_core::raw::Preallocation::Off)
            .map_err(failed)?;
    }

    let mut bar = Progress::new(show_progress && !quiet);
    bar.advance(0.0);
    let started = Instant::now();
    commit_into_base(&top, depth, &mut |done, total| {
        bar.bytes(done, total);
        throttle(rate, started, done);
    })
    .map_err(failed)?;
    if !drop {
        top.make_empty().map_err(failed)?;
    }
    close(top).map_err(failed)?;
    bar.bytes(1, 1);
    bar.end();
    if !quiet {
        println!("Image committed.");
    }
    Ok(0)
}

/// The depth of the base: the one named by `-b` (by the name the chain records or by the
/// file it resolves to), else the image's backing file.
fn base_depth(chain: &Image, base: Option<&str>, arg: &str) -> Result<usize, CliError> {
    if chain.backing().is_none() {
        return Err(CliError::new("Image does not have a backing file"));
    }
    let Some(base) = base else {
        return Ok(1);
    };
    let wanted = std::fs::canonicalize(base).ok();
    let images: Vec<&Image> = chain.chain().collect();
    for (depth, pair) in images.windows(2).enumerate() {
        let (above, image) = (pair[0], pair[1]);
        let recorded = above.format().info().backing_file;
        let same_file = wanted.is_some() && std::fs::canonicalize(image.file_name()).ok() == wanted;
        if recorded.as_deref() == Some(base) || image.file_name() == base || same_file {
            return Ok(depth + 1);
        }
    }
    Err(CliError::new(format!(
        "Did not find '{base}' in the backing chain of '{arg}'"
    )))
}

/// Sleeps as long as `done` bytes are ahead of `rate` bytes per second.
fn throttle(rate: Option<u64>, started: Instant, done: u64) {
    if let Some(rate) = rate.filter(|&r| r > 0) {
        let due = Duration::from_secs_f64(done as f64 / rate as f64);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            std::thread::sleep(wait);
        }
    }
}

fn close(image: Image) -> img_core::Result<()> {
    image.close()
}
