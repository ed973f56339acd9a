//! `img compare`: do two images have the same guest-visible content?
//!
//! Exit codes as qemu-img: 0 identical, 1 different, 2 an image could not be opened (or a bad
//! cache mode), 3 block status failed, 4 a read failed.

use crate::getopt::{opt, parse, OptSpec};
use crate::open::{self, ImageSpec};
use crate::progress::Progress;
use crate::{CliError, CmdResult};
use img_core::ops::compare::{compare, CompareError, Event, Outcome, Side};

const SPECS: &[OptSpec] = &[
    opt(Some('h'), Some("help"), false),
    opt(Some('f'), Some("a-format"), true),
    opt(Some('F'), Some("b-format"), true),
    opt(None, Some("image-opts"), false),
    opt(Some('s'), Some("strict"), false),
    opt(Some('T'), Some("cache"), true),
    opt(Some('U'), Some("force-share"), false),
    opt(Some('p'), Some("progress"), false),
    opt(Some('q'), Some("quiet"), false),
    opt(None, Some("object"), true),
];

const USAGE: &str = "\
Usage: img compare [-f FMT] [-F FMT] [--image-opts] [-s] [-T CACHE] [-U] [-p] [-q]
                   FILENAME1 FILENAME2

Checks whether two images have the same content. Exit status: 0 identical, 1 different,
2 an image could not be opened, 3 allocation status failed, 4 a read failed.

  -f, --a-format FMT    format of FILENAME1 (default: probed)
  -F, --b-format FMT    format of FILENAME2 (default: probed)
  --image-opts          the file names are option strings (driver=qcow2,file.filename=...)
  -s, --strict          also fail when sizes or allocation differ
  -T, --cache MODE      cache mode for reading (default: writeback)
  -U, --force-share     open the images in shared mode
  -p, --progress        show progress
  -q, --quiet           print nothing but errors
  -h, --help            show this help
";

/// Runs `img compare` with its arguments.
pub fn run(args: &[String]) -> CmdResult {
    let (opts, pos) = parse(args, SPECS)?;
    let mut fmt1: Option<String> = None;
    let mut fmt2: Option<String> = None;
    let mut image_opts = false;
    let mut strict = false;
    let mut cache = "writeback".to_string();
    let mut progress = false;
    let mut quiet = false;
    let mut force_share = false;
    for o in &opts {
        match o.name.as_str() {
            "help" => {
                print!("{USAGE}");
                return Ok(0);
            }
            "a-format" => fmt1 = o.value.clone(),
            "b-format" => fmt2 = o.value.clone(),
            "image-opts" => image_opts = true,
            "strict" => strict = true,
            "cache" => cache = o.value.clone().unwrap_or_default(),
            "progress" => progress = true,
            "quiet" => quiet = true,
            "force-share" => force_share = true,
            // --object: no secrets needed.
            _ => {}
        }
    }
    if quiet {
        progress = false;
    }
    if pos.len() != 2 {
        return Err(CliError::usage("Expecting two image file names"));
    }
    let mut bar = Progress::new(progress);
    let result = compare_files(
        &pos[0],
        &pos[1],
        fmt1.as_deref(),
        fmt2.as_deref(),
        image_opts,
        force_share,
        &cache,
        strict,
        quiet,
        &mut bar,
    );
    bar.end();
    result
}

#[allow(clippy::too_many_arguments)]
fn compare_files(
    name1: &str,
    name2: &str,
    fmt1: Option<&str>,
    fmt2: Option<&str>,
    image_opts: bool,
    force_share: bool,
    cache: &str,
    strict: bool,
    quiet: bool,
    bar: &mut Progress,
) -> CmdResult {
    let say = |m: &str| {
        if !quiet {
            println!("{m}");
        }
    };
    let cache = open::parse_cache(cache)
        .ok_or_else(|| CliError::with_code(format!("Invalid source cache option: {cache}"), 2))?;
    let open_one = |name: &str, fmt: Option<&str>| {
        if image_opts && fmt.is_some() {
            return Err(CliError::with_code(
                "--image-opts and --format are mutually exclusive",
                2,
            ));
        }
        let spec = ImageSpec::from_args(name, image_opts, fmt)
            .map_err(|e| with_code(e, 2))?
            .with_force_share(force_share);
        open::open(&spec, true, cache).map_err(|e| with_code(e, 2))
    };
    let a = open_one(name1, fmt1)?;
    let b = open_one(name2, fmt2)?;
    bar.advance(0.0);

    let mut on_event = |e: Event| match e {
        Event::Progress { bytes, total } => {
            // As qemu: the step as a share of the whole, in single precision.
            bar.advance((bytes as f32 / total as f32) * 100.0);
        }
        Event::SizeMismatch => say("Warning: Image size mismatch!"),
    };
    match compare(&a, &b, strict, &mut on_event) {
        Ok(Outcome::Identical) => {
            say("Images are identical.");
            Ok(0)
        }
        Ok(Outcome::ContentMismatch(offset)) => {
            say(&format!("Content mismatch at offset {offset}!"));
            Ok(1)
        }
        Ok(Outcome::SizeMismatch) => {
            say("Strict mode: Image size mismatch!");
            Ok(1)
        }
        Ok(Outcome::StatusMismatch(offset)) => {
            say(&format!(
                "Strict mode: Offset {offset} block status mismatch!"
            ));
            Ok(1)
        }
        Err(CompareError::BlockStatus { side, .. }) => Err(CliError::with_code(
            format!(
                "Sector allocation test failed for {}",
                pick(side, name1, name2)
            ),
            3,
        )),
        Err(CompareError::Read {
            side,
            offset,
            source,
        }) => Err(CliError::with_code(
            format!(
                "Error while reading offset {offset} of {}: {}",
                pick(side, name1, name2),
                crate::open::open_reason(&source)
            ),
            4,
        )),
    }
}

fn pick<'a>(side: Side, a: &'a str, b: &'a str) -> &'a str {
    match side {
        Side::First => a,
        Side::Second => b,
    }
}

fn with_code(mut e: CliError, code: u8) -> CliError {
    e.code = code;
    e
}
