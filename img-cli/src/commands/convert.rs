//! `img convert`: copy images into a new (or, with -n, existing) image of any format.

use super::{create, snapshot};
use crate::getopt::{opt, parse};
use crate::open::{open, ImageSpec};
use crate::{CliError, CmdResult};
use blockdev::CacheMode;
use img_core::convert::{convert, ConvertOptions};
use img_core::qcow2::SnapshotSelector;
use img_core::size::parse_size;
use img_core::{Image, Usage};
use std::io::Write;

const SPECS: &[crate::getopt::OptSpec] = &[
    opt(Some('f'), None, true),
    opt(Some('O'), None, true),
    opt(Some('o'), None, true),
    opt(Some('c'), None, false),
    opt(Some('S'), None, true),
    opt(Some('n'), None, false),
    opt(Some('p'), None, false),
    opt(Some('q'), None, false),
    opt(Some('t'), None, true),
    opt(Some('T'), None, true),
    opt(Some('U'), Some("force-share"), false),
    opt(Some('m'), None, true),
    opt(Some('W'), None, false),
    opt(Some('B'), None, true),
    opt(Some('F'), None, true),
    opt(Some('l'), None, true),
    opt(Some('C'), None, false),
    opt(None, Some("target-is-zero"), false),
    opt(None, Some("image-opts"), false),
    opt(None, Some("target-image-opts"), false),
    opt(None, Some("object"), true),
    opt(None, Some("salvage"), false),
    opt(None, Some("bitmaps"), false),
    opt(None, Some("skip-broken-bitmaps"), false),
];

struct Args {
    src_fmt: Option<String>,
    out_fmt: String,
    options: Option<String>,
    image_opts: bool,
    force_share: bool,
    compress: bool,
    min_sparse: u64,
    no_create: bool,
    progress: bool,
    quiet: bool,
    dst_cache: CacheMode,
    src_cache: CacheMode,
    target_is_zero: bool,
    parallel: usize,
    out_of_order: bool,
    copy_offload: bool,
    /// `-B`: the target's backing file (only what the source's top image holds is copied).
    backing: Option<String>,
    /// `-F`: its format.
    backing_fmt: Option<String>,
    /// `-l`: the internal snapshot of the source to copy.
    snapshot: Option<SnapshotSelector>,
    files: Vec<String>,
}

fn parse_cache(v: &str) -> Result<CacheMode, CliError> {
    CacheMode::parse(v).ok_or_else(|| CliError::new(format!("Invalid cache option: {v}")))
}

fn parse_args(args: &[String]) -> Result<Args, CliError> {
    let (opts, files) = parse(args, SPECS)?;
    let mut a = Args {
        src_fmt: None,
        out_fmt: "raw".into(),
        options: None,
        image_opts: false,
        force_share: false,
        compress: false,
        min_sparse: 4096,
        no_create: false,
        progress: false,
        quiet: false,
        dst_cache: CacheMode::Unsafe,
        src_cache: CacheMode::Writeback,
        target_is_zero: false,
        parallel: 8,
        out_of_order: false,
        copy_offload: false,
        backing: None,
        backing_fmt: None,
        snapshot: None,
        files,
    };
    for o in opts {
        let v = o.value.clone().unwrap_or_default();
        match o.name.as_str() {
            "f" => a.src_fmt = Some(v),
            "O" => a.out_fmt = v,
            "o" => {
                if !create::valid_option_list(&v) {
                    return Err(CliError::new(format!("Invalid option list: {v}")));
                }
                a.options = Some(match a.options.take() {
                    Some(prev) => format!("{prev},{v}"),
                    None => v,
                });
            }
            "c" => a.compress = true,
            "S" => {
                let n = parse_size(&v).filter(|n| n % 512 == 0 || *n == 0).ok_or_else(|| {
                    CliError::new("Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to 2147483136.".to_string())
                })?;
                a.min_sparse = n;
            }
            "n" => a.no_create = true,
            "p" => a.progress = true,
            "q" => a.quiet = true,
            "t" => a.dst_cache = parse_cache(&v)?,
            "T" => a.src_cache = parse_cache(&v)?,
            "m" => match v.parse::<usize>() {
                Ok(n @ 1..=16) => a.parallel = n,
                _ => {
                    return Err(CliError::new(
                        "Invalid number of coroutines specified. Must be between 1 and 16.",
                    ))
                }
            },
            "image-opts" => a.image_opts = true,
            "W" => a.out_of_order = true,
            "C" => a.copy_offload = true,
            "force-share" => a.force_share = true,
            "target-is-zero" => a.target_is_zero = true,
            "B" => a.backing = Some(v),
            "F" => a.backing_fmt = Some(v),
            // (qemu-img 10 no longer has the deprecated -s.)
            "l" => a.snapshot = Some(snapshot::parse_snapshot_param(&v)?),
            other => {
                return Err(CliError::new(format!(
                    "option --{other} is not supported yet"
                )))
            }
        }
    }
    if let Some(list) = &a.options {
        if create::split_options(list).1 {
            return Ok(a);
        }
    }
    if a.files.len() < 2 {
        return Err(CliError::usage("Expecting image file name"));
    }
    // A backing file given as a creation option counts as -B, as in qemu.
    if let Some(list) = &a.options {
        for (k, v) in create::split_options(list).0 {
            match k.as_str() {
                "backing_file" => a.backing = Some(v),
                "backing_fmt" => a.backing_fmt = Some(v),
                _ => {}
            }
        }
    }
    if a.backing.is_some() && a.backing_fmt.is_none() {
        return Err(CliError::new(
            "Use of backing file requires explicit backing format",
        ));
    }
    if a.backing.is_some() && a.out_fmt == "raw" {
        return Err(CliError::new(
            "Backing file not supported for file format 'raw'",
        ));
    }
    if a.compress && !matches!(a.out_fmt.as_str(), "qcow2" | "vmdk") {
        return Err(CliError::new(format!(
            "Operation or feature not supported for output format '{}' with compression",
            a.out_fmt
        )));
    }
    if a.target_is_zero && !a.no_create {
        return Err(CliError::new("--target-is-zero requires use of -n flag"));
    }
    Ok(a)
}

/// qemu-img words a failure to create the target "name: error while converting fmt: reason",
/// where `img create` says "name: reason".
fn creating(e: CliError, out: &str, fmt: &str) -> CliError {
    let reason = e
        .message
        .strip_prefix(&format!("{out}: "))
        .unwrap_or(&e.message);
    CliError {
        message: format!("{out}: error while converting {fmt}: {reason}"),
        ..e
    }
}

/// Runs `img convert` with its arguments.
pub fn run(args: &[String]) -> CmdResult {
    let a = parse_args(args)?;
    if let Some(list) = &a.options {
        if create::split_options(list).1 {
            return create::print_option_help(&a.out_fmt, a.files.len() >= 2);
        }
    }
    let (out, inputs) = a.files.split_last().expect("checked: at least two files");
    let mut sources: Vec<Image> = Vec::new();
    for name in inputs {
        // As qemu-img: nobody may write a source while it is copied, unless -U.
        let spec = ImageSpec::from_args(name, a.image_opts, a.src_fmt.as_deref())?
            .with_force_share(a.force_share)
            .with_usage(Usage {
                no_share: true,
                ..Default::default()
            });
        sources.push(open(&spec, true, a.src_cache)?);
    }
    if let Some(selector) = &a.snapshot {
        if sources.len() > 1 {
            return Err(CliError::new(
                "No support for concatenating multiple snapshot",
            ));
        }
        snapshot::load(&mut sources[0], selector)?;
    }
    let total: u64 = sources.iter().map(|s| s.size()).sum();
    // An NBD export or an iSCSI LUN is not created: the format is written over it (raw
    // checks it is big enough), and it does not read as zeros beforehand.
    let reads_zero_when_new =
        !blockdev::network::Protocol::of(out).is_network() || blockdev::rbd::is_rbd_name(out);
    if !a.no_create {
        create::CreatePlan::new(
            &a.out_fmt,
            out,
            a.options.as_deref(),
            Some(total),
            create::Backing {
                file: a.backing.as_deref(),
                format: a.backing_fmt.as_deref(),
                // As qemu-img convert: the backing file is opened with the target, not
                // before it is created.
                unsafe_open: true,
            },
        )?
        .execute()
        .map_err(|e| creating(e, out, &a.out_fmt))?;
    }
    let target = open(&ImageSpec::file(out, Some(&a.out_fmt)), false, a.dst_cache)?;
    if a.no_create && target.size() < total {
        return Err(CliError::new("output file is smaller than input file"));
    }
    let opts = ConvertOptions {
        min_sparse: a.min_sparse,
        // A streamOptimized vmdk holds nothing but compressed grains.
        compress: a.compress || writes_only_compressed(&target),
        // A target with a backing file reads what its backing file holds, not zeros.
        target_is_zero: ((!a.no_create && reads_zero_when_new) || a.target_is_zero)
            && a.backing.is_none(),
        parallel: a.parallel,
        out_of_order: a.out_of_order,
        copy_offload: a.copy_offload,
        target_has_backing: a.backing.is_some(),
        ..Default::default()
    };
    let show = a.progress && !a.quiet;
    let mut last = -1.0f64;
    let mut progress = |done: u64, total: u64| {
        if !show {
            return;
        }
        let pct = if total == 0 {
            100.0
        } else {
            done as f64 * 100.0 / total as f64
        };
        // qemu prints only when the value moves by at least 1% (and at the ends).
        if pct - last >= 1.0 || pct >= 100.0 || last < 0.0 {
            print!("    ({pct:.2}/100%)\r");
            let _ = std::io::stdout().flush();
            last = pct;
        }
    };
    let srcs: Vec<&Image> = sources.iter().collect();
    convert(&srcs, &target, &opts, &mut progress).map_err(|e| match e {
        // Already worded as qemu-img words it ("error while reading at byte N: ...").
        e @ img_core::Error::ConvertIo { .. } => CliError::new(e.to_string()),
        e => CliError::new(format!("error while converting {}: {e}", a.out_fmt)),
    })?;
    target.close()?;
    if show {
        println!();
    }
    Ok(0)
}

/// Whether the target stores every cluster compressed (a streamOptimized vmdk).
fn writes_only_compressed(target: &Image) -> bool {
    let info = target.format().info();
    target.format().driver() == "vmdk"
        && info
            .specific
            .as_ref()
            .and_then(|s| s.get("create-type"))
            .and_then(|t| t.as_str())
            == Some("streamOptimized")
}
