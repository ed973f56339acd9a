//! `img check`: the consistency check of qemu-img, with its output, exit codes and repairs.
//!
//! Exit codes: 0 clean, 1 the check failed (or could not complete), 2 corruptions remain,
//! 3 only leaks remain, 63 the format has no check.

use crate::getopt::{self, opt};
use crate::{CliError, CmdResult};
use blockdev::{FileOptions, FileStorage, Storage};
use img_core::locking::{file_permissions, Locking, FORCE_SHARE_NEEDS_READ_ONLY};
use img_core::qcow2::check::{self, CheckReport, Fix};
use std::io::Write;
use std::sync::Arc;

const HELP: &str = "Usage:
Check basic image integrity.  Usage:

  img check [-f FMT | --image-opts] [-T CACHE_MODE] [-r] [-u]
        [--output human|json] [--object OBJDEF] FILENAME

Arguments:
  -h, --help
     print this help and exit
  -q, --quiet
     quiet operations
  -f, --format FMT
     specifies format of the image explicitly
  --image-opts
     indicates that FILENAME is a complete image specification
     instead of a file name (incompatible with --format)
  -T, --cache CACHE_MODE
     image cache mode (writeback)
  -U, --force-share
     open image in shared mode for concurrent access
  --output human|json
     output format
  -r, --repair leaks|all
     repair particular aspect of the image
     (image will be open in read-write mode, incompatible with --force-share)
  --object OBJDEF
     QEMU user-creatable object (eg encryption key)
  FILENAME
     the image file (or image specification) to operate on
";

/// A usage error of `check`, worded and hinted as qemu-img does.
fn usage(msg: impl Into<String>) -> CliError {
    CliError::new(format!(
        "{}\nTry 'img check --help' for more info",
        msg.into()
    ))
}

/// Where the image is and how to open it.
struct Target {
    /// The name as given (printed in JSON output).
    display: String,
    /// The file to open.
    path: String,
    format: Option<String>,
    /// The `--image-opts` options (only the cache, locking and force-share ones matter).
    options: crate::open::ImageOptions,
}

/// Parses an `--image-opts` specification (`driver=qcow2,file.filename=x.qcow2,...`) with the
/// parser the other commands use. Of its options only the cache, locking and force-share
/// flags matter to a check, which reads the metadata directly rather than through the
/// driver's caches.
fn parse_image_opts(spec: &str, cache: &mut blockdev::CacheMode) -> Result<Target, CliError> {
    let s = crate::open::ImageSpec::from_image_opts(spec)?;
    Ok(target_of(s, cache))
}

/// The target of an image named by options, and the cache mode they ask for.
fn target_of(s: crate::open::ImageSpec, cache: &mut blockdev::CacheMode) -> Target {
    *cache = crate::open::file_cache_mode(&s, *cache);
    Target {
        display: s.arg,
        path: s.path,
        format: s.format,
        options: s.options,
    }
}

/// Runs `img check` with its arguments.
pub fn run(args: &[String]) -> CmdResult {
    let specs = [
        opt(Some('h'), Some("help"), false),
        opt(Some('q'), Some("quiet"), false),
        opt(Some('f'), Some("format"), true),
        opt(None, Some("image-opts"), false),
        opt(Some('T'), Some("cache"), true),
        opt(Some('U'), Some("force-share"), false),
        opt(None, Some("output"), true),
        opt(Some('r'), Some("repair"), true),
        opt(None, Some("object"), true),
    ];
    let (opts, pos) = getopt::parse(args, &specs).map_err(|e| usage(e.message))?;
    let mut format = None;
    let mut quiet = false;
    let mut json = false;
    let mut fix = Fix::NONE;
    let mut force_share = false;
    let mut image_opts = false;
    let mut cache = "writeback".to_string();
    for o in opts {
        let v = o.value.unwrap_or_default();
        match o.name.as_str() {
            "help" => {
                print!("{HELP}");
                return Ok(0);
            }
            "quiet" => quiet = true,
            "format" => format = Some(v),
            "image-opts" => image_opts = true,
            "cache" => cache = v,
            "force-share" => force_share = true,
            "output" => match v.as_str() {
                "human" => json = false,
                "json" => json = true,
                _ => {
                    return Err(usage(format!(
                        "--output expects 'human' or 'json' not '{v}'"
                    )))
                }
            },
            "repair" => {
                fix = match v.as_str() {
                    "leaks" => Fix::LEAKS,
                    "all" => Fix::ALL,
                    _ => {
                        return Err(usage(format!(
                            "--repair (-r) expects 'leaks' or 'all' not '{v}'"
                        )))
                    }
                }
            }
            // Secrets and other objects are only needed by formats this build does not have.
            _ => {}
        }
    }
    if pos.len() != 1 {
        return Err(usage("Expecting one image file name"));
    }
    // Unaligned metadata reads under O_DIRECT go through the storage's bounce buffers.
    let Some(mut cache_mode) = blockdev::CacheMode::parse(&cache) else {
        return Err(CliError::new(format!(
            "Invalid source cache option: {cache}"
        )));
    };
    let target = if image_opts {
        if format.is_some() {
            return Err(CliError::new(
                "--image-opts and --format are mutually exclusive",
            ));
        }
        parse_image_opts(&pos[0], &mut cache_mode)?
    } else if pos[0].starts_with("json:") {
        let s = crate::open::ImageSpec::from_json_name(&pos[0], format.as_deref())?;
        target_of(s, &mut cache_mode)
    } else {
        Target {
            display: pos[0].clone(),
            path: pos[0].clone(),
            format,
            options: Default::default(),
        }
    };
    let repair = fix != Fix::NONE;
    let could_not_open =
        |reason: String| CliError::new(format!("Could not open '{}': {reason}", target.display));
    let o = &target.options;
    if force_share && o.force_share == Some(false) {
        return Err(CliError::new(
            "--force-share/-U conflicts with image options",
        ));
    }
    // As in `open`: only the file node's flag matters to the locks, either refuses repairs.
    let root_share = force_share || o.force_share == Some(true);
    let file_share = o.file_force_share.unwrap_or(root_share);
    if repair && (root_share || file_share) {
        return Err(could_not_open(FORCE_SHARE_NEEDS_READ_ONLY.into()));
    }
    let locking = match o.locking.as_deref() {
        None => Locking::Auto,
        Some(l) => Locking::parse(l)
            .ok_or_else(|| could_not_open(format!("invalid parameter value: {l}")))?,
    };
    if let Some(f) = &target.format {
        if !img_core::open::FORMATS.contains(&f.as_str()) {
            return Err(could_not_open(format!("Unknown driver '{f}'")));
        }
    }
    if let Some(storage) = blockdev::network::open(&target.path, !repair, cache_mode) {
        // Network storage: no file locks; the format is looked at over the network.
        let storage = storage.map_err(|e| {
            could_not_open(match &e {
                blockdev::Error::Open { source, .. } => blockdev::os_message(source),
                e => e.to_string(),
            })
        })?;
        let driver = match &target.format {
            Some(f) => f.clone(),
            None => img_core::probe_format(storage.as_ref())
                .map_err(|e| could_not_open(e.to_string()))?
                .to_string(),
        };
        return check_storage(storage, &driver, &target, fix, json, quiet, &could_not_open);
    }
    let storage = match FileStorage::open(
        &target.path,
        FileOptions {
            read_only: !repair,
            cache: cache_mode,
            aio: blockdev::Aio::Threads,
            create: false,
            locking,
            ..Default::default()
        },
    ) {
        Ok(s) => s,
        Err(e) => {
            let reason = match e.io_error() {
                Some(io) => format!(
                    "Could not open '{}': {}",
                    target.path,
                    blockdev::os_message(io)
                ),
                None => e.to_string(),
            };
            return Err(could_not_open(reason));
        }
    };
    let driver = match &target.format {
        Some(f) => f.clone(),
        None => img_core::probe_format(&storage)
            .map_err(|e| could_not_open(e.to_string()))?
            .to_string(),
    };
    // The lock bytes qemu-img takes for a check (a repair writes), before the format is looked
    // at.
    let access = img_core::OpenOptions {
        read_only: !repair,
        force_share: file_share,
        ..Default::default()
    };
    storage
        .set_permissions(file_permissions(&driver, &access))
        .map_err(|e| could_not_open(e.to_string()))?;
    let storage: Arc<dyn Storage> = Arc::new(storage);
    check_storage(storage, &driver, &target, fix, json, quiet, &could_not_open)
}

/// Checks the image of `driver` on opened storage and prints the report.
fn check_storage(
    storage: Arc<dyn Storage>,
    driver: &str,
    target: &Target,
    fix: Fix,
    json: bool,
    quiet: bool,
    could_not_open: &dyn Fn(String) -> CliError,
) -> CmdResult {
    let repair = fix != Fix::NONE;
    if driver == "vmdk" {
        return crate::commands::check_vmdk::run(storage, repair, json, quiet, &target.display)
            .map_err(|m| m.unwrap_or_else(&could_not_open));
    }
    if driver != "qcow2" {
        return Err(CliError::with_code(
            "This image format does not support checks",
            63,
        ));
    }

    check_backing_opens(&storage, &target.path).map_err(could_not_open)?;
    let first = run_check(&storage, fix, &could_not_open)?;
    let report = if first.corruptions_fixed > 0 || first.leaks_fixed > 0 {
        if !json && !quiet {
            print!(
                "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n\nDouble checking the fixed image now...\n",
                first.leaks_fixed, first.corruptions_fixed
            );
            let _ = std::io::stdout().flush();
        }
        let mut second = run_check(&storage, Fix::NONE, &could_not_open)?;
        second.leaks_fixed = first.leaks_fixed;
        second.corruptions_fixed = first.corruptions_fixed;
        second
    } else {
        first
    };
    if !quiet {
        if json {
            println!("{}", json_report(&report, &target.display));
        } else {
            print!("{}", human_report(&report));
        }
    }
    if report.check_errors > 0 {
        return Err(CliError::new("Check failed"));
    }
    Ok(if report.corruptions > 0 {
        2
    } else if report.leaks > 0 {
        3
    } else {
        0
    })
}

/// One check run: prints its messages (stderr), and fails as qemu-img does when the check
/// could not complete.
fn run_check(
    storage: &Arc<dyn Storage>,
    fix: Fix,
    could_not_open: &dyn Fn(String) -> CliError,
) -> Result<CheckReport, CliError> {
    let report = match check::check(storage, fix) {
        Ok(r) => r,
        Err(img_core::Error::Invalid { reason, .. }) => return Err(could_not_open(reason)),
        Err(img_core::Error::Unsupported { what, .. }) => return Err(could_not_open(what)),
        Err(e) => return Err(could_not_open(e.to_string())),
    };
    let _ = std::io::stdout().flush();
    let mut err = std::io::stderr().lock();
    for m in &report.messages {
        let _ = writeln!(err, "{m}");
    }
    if let Some(reason) = &report.failed {
        return Err(CliError::new(format!("Check failed: {reason}")));
    }
    Ok(report)
}

/// qemu-img's human-readable summary.
pub fn human_report(r: &CheckReport) -> String {
    let mut s = String::new();
    if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 {
        s.push_str("No errors were found on the image.\n");
    } else {
        if r.corruptions > 0 {
            s.push_str(&format!(
                "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n",
                r.corruptions
            ));
        }
        if r.leaks > 0 {
            s.push_str(&format!(
                "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n",
                r.leaks
            ));
        }
        if r.check_errors > 0 {
            s.push_str(&format!(
                "\n{} internal errors have occurred during the check.\n",
                r.check_errors
            ));
        }
    }
    if r.total_clusters != 0 && r.allocated_clusters != 0 {
        let alloc = r.allocated_clusters as f64;
        s.push_str(&format!(
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters\n",
            r.allocated_clusters,
            r.total_clusters,
            alloc * 100.0 / r.total_clusters as f64,
            r.fragmented_clusters as f64 * 100.0 / alloc,
            r.compressed_clusters as f64 * 100.0 / alloc
        ));
    }
    if r.image_end_offset != 0 {
        s.push_str(&format!("Image end offset: {}\n", r.image_end_offset));
    }
    s
}

/// A JSON string as qemu writes it.
pub(crate) fn json_string(s: &str) -> String {
    let mut out = String::new();
    crate::qjson::quote(s, &mut out);
    out
}

/// qemu-img's JSON report. Members appear in the order of qemu's dictionary hash buckets;
/// optional counters only when they are not zero.
pub fn json_report(r: &CheckReport, filename: &str) -> String {
    let opt = |v: u64| (v != 0).then(|| v.to_string());
    let members: [(&str, Option<String>); 12] = [
        ("image-end-offset", opt(r.image_end_offset)),
        ("compressed-clusters", opt(r.compressed_clusters)),
        ("total-clusters", opt(r.total_clusters)),
        ("corruptions", opt(r.corruptions)),
        ("corruptions-fixed", opt(r.corruptions_fixed)),
        ("check-errors", Some(r.check_errors.to_string())),
        ("leaks", opt(r.leaks)),
        ("leaks-fixed", opt(r.leaks_fixed)),
        ("allocated-clusters", opt(r.allocated_clusters)),
        ("filename", Some(json_string(filename))),
        ("format", Some(json_string("qcow2"))),
        ("fragmented-clusters", opt(r.fragmented_clusters)),
    ];
    let body: Vec<String> = members
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("    \"{k}\": {v}")))
        .collect();
    format!("{{\n{}\n}}", body.join(",\n"))
}

/// As qemu-img, which opens the image with its backing chain before checking it: a backing
/// file that cannot be opened fails the check. Only the header is read here, so a damaged
/// image is still checked.
fn check_backing_opens(storage: &Arc<dyn Storage>, path: &str) -> Result<(), String> {
    let size = storage.size().map_err(|e| e.to_string())?;
    let mut first = vec![0u8; size.min(2 << 20) as usize];
    if storage.read_at(&mut first, 0).is_err() {
        return Ok(());
    }
    let Ok(header) = img_core::qcow2::Header::parse(path, &first, size) else {
        return Ok(());
    };
    let Some(backing) = header.backing_file else {
        return Ok(());
    };
    let name = img_core::chain::resolve_backing_name(path, &backing);
    let opts = img_core::OpenOptions {
        format: header.backing_format,
        read_only: true,
        locking: img_core::locking::Locking::Off,
        ..Default::default()
    };
    img_core::open_image(std::path::Path::new(&name), &opts)
        .map(drop)
        .map_err(|e| format!("Could not open backing file: {}", e.reason()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_members_and_escapes() {
        let r = CheckReport {
            image_end_offset: 655360,
            total_clusters: 1024,
            allocated_clusters: 5,
            leaks: 2,
            ..Default::default()
        };
        assert_eq!(
            json_report(&r, "ü\"x\\.qcow2"),
            "{\n    \"image-end-offset\": 655360,\n    \"total-clusters\": 1024,\n    \"check-errors\": 0,\n    \"leaks\": 2,\n    \"allocated-clusters\": 5,\n    \"filename\": \"\\u00FC\\\"x\\\\.qcow2\",\n    \"format\": \"qcow2\"\n}"
        );
    }

    #[test]
    fn human_summary() {
        let r = CheckReport {
            image_end_offset: 720896,
            total_clusters: 1024,
            allocated_clusters: 5,
            corruptions: 1,
            leaks: 2,
            ..Default::default()
        };
        assert_eq!(
            human_report(&r),
            "\n1 errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n\n2 leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n5/1024 = 0.49% allocated, 0.00% fragmented, 0.00% compressed clusters\nImage end offset: 720896\n"
        );
        let clean = CheckReport {
            image_end_offset: 262144,
            total_clusters: 16,
            ..Default::default()
        };
        assert_eq!(
            human_report(&clean),
            "No errors were found on the image.\nImage end offset: 262144\n"
        );
    }
}
