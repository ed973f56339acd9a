//! `img snapshot`: list, create, apply and delete the internal snapshots of an image, with
//! qemu-img's output, messages and exit codes.
//!
//! Listing (the default) opens the image read-only; the other operations open it for writing,
//! backing chain included, as qemu-img does. The table printed here is also what `img info`
//! shows, and the `-l` parameter parsed here is also `img convert`'s.

use crate::commands::create::split_options;
use crate::getopt::{opt, parse, OptSpec};
use crate::human::size_to_str;
use crate::open::{self, ImageSpec};
use crate::qjson::QValue;
use crate::{CliError, CmdResult};
use blockdev::CacheMode;
use img_core::qcow2::snapshot::Snapshot;
use img_core::qcow2::snapshot_load::{c_str, find};
use img_core::qcow2::{Qcow2, SnapshotSelector};
use img_core::Image;
use std::io::Write;

const SPECS: &[OptSpec] = &[
    opt(Some('h'), Some("help"), false),
    opt(Some('q'), Some("quiet"), false),
    opt(Some('f'), Some("format"), true),
    opt(Some('l'), Some("list"), false),
    // qemu-img 10 declares the long forms of these without their argument (and crashes on
    // them); they take the argument their help documents here.
    opt(Some('a'), Some("apply"), true),
    opt(Some('c'), Some("create"), true),
    opt(Some('d'), Some("delete"), true),
    opt(Some('U'), Some("force-share"), false),
    opt(None, Some("image-opts"), false),
    opt(None, Some("object"), true),
];

const HELP: &str = "Usage:
List or manipulate snapshots within image.  Usage:

  img snapshot [-f FMT | --image-opts] [-l | -a|-c|-d SNAPSHOT]
        [-U] [--object OBJDEF] FILENAME

Arguments:
  -h, --help
     print this help and exit
  -q, --quiet
      quiet operations
  -f, --format FMT
      specify FILENAME format explicitly
  --image-opts
      indicates that FILENAME is a complete image specification
   instead of a file name (incompatible with --format)
  -U, --force-share
      open image in shared mode for concurrent access
  --object OBJDEF
      QEMU user-creatable object (eg encryption key)
  Operation, one of:
    -l, --list
       list snapshots in FILENAME (the default)
    -c, --create SNAPSHOT
       create named snapshot
    -a, --apply SNAPSHOT
       apply named snapshot to the base
    -d, --delete SNAPSHOT
       delete named snapshot
  FILENAME - image file name (or specification with --image-opts)
";

/// What the command does.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Action {
    List,
    Create(String),
    Apply(String),
    Delete(String),
}

/// The command line.
#[derive(Debug)]
struct Args {
    action: Action,
    format: Option<String>,
    image_opts: bool,
    force_share: bool,
    filename: String,
}

/// Parses the command line; `Ok(None)` means the help was printed.
fn parse_args(args: &[String]) -> Result<Option<Args>, CliError> {
    let (opts, pos) = parse(args, SPECS)?;
    let mut action = None;
    let mut format = None;
    let mut image_opts = false;
    let mut force_share = false;
    for o in opts {
        let v = o.value.unwrap_or_default();
        let chosen = match o.name.as_str() {
            "help" => {
                print!("{HELP}");
                return Ok(None);
            }
            "format" => {
                format = Some(v);
                None
            }
            "list" => Some(Action::List),
            "apply" => Some(Action::Apply(v)),
            "create" => Some(Action::Create(v)),
            "delete" => Some(Action::Delete(v)),
            "force-share" => {
                force_share = true;
                None
            }
            "image-opts" => {
                image_opts = true;
                None
            }
            // -q: the operations print nothing but errors, and the list is printed anyway (as
            // qemu-img does). --object defines secrets, which unencrypted images do not need.
            _ => None,
        };
        if let Some(a) = chosen {
            if action.is_some() {
                return Err(CliError::usage("Cannot mix '-l', '-a', '-c', '-d'"));
            }
            action = Some(a);
        }
    }
    if pos.len() != 1 {
        return Err(CliError::usage("Expecting one image file name"));
    }
    Ok(Some(Args {
        action: action.unwrap_or(Action::List),
        format,
        image_opts,
        force_share,
        filename: pos.into_iter().next().expect("one file name"),
    }))
}

/// Runs `img snapshot` with its arguments.
pub fn run(args: &[String]) -> CmdResult {
    let Some(a) = parse_args(args)? else {
        return Ok(0);
    };
    let spec = ImageSpec::from_args_checked(&a.filename, a.image_opts, a.format.as_deref())?
        .with_force_share(a.force_share);
    let read_only = a.action == Action::List;
    let mut image = open::open(&spec, read_only, CacheMode::Writeback)?;
    let result = act(&mut image, &a.action, &spec);
    // The image is closed (and marked clean) whatever happened, as qemu-img does.
    let closed = image.close();
    result?;
    closed?;
    Ok(0)
}

/// Performs `action` on the open image.
fn act(image: &mut Image, action: &Action, spec: &ImageSpec) -> Result<(), CliError> {
    let arg = spec.arg.as_str();
    match action {
        Action::List => {
            let list = snapshots(image, arg)?;
            if !list.is_empty() {
                let mut out = b"Snapshot list:\n".to_vec();
                dump_table(&list, "", &mut out);
                std::io::stdout()
                    .write_all(&out)
                    .map_err(|e| CliError::new(format!("write error: {e}")))?;
            }
            Ok(())
        }
        Action::Create(name) => {
            let fail =
                |why: String| CliError::new(format!("Could not create snapshot '{name}': {why}"));
            let Some(qcow2) = qcow2_mut(image) else {
                return Err(fail("Operation not supported".into()));
            };
            qcow2
                .create_snapshot(table_name(name), now())
                .map_err(|e| fail(errno_text(&e)))
        }
        Action::Apply(name) => {
            let fail =
                |why: String| CliError::new(format!("Could not apply snapshot '{name}': {why}"));
            let list = snapshots(image, arg)?;
            let Some(qcow2) = qcow2_mut(image) else {
                // qemu closes the raw layer to ask the file underneath, and opens it again.
                if spec.format.is_none() && !spec.protocol_only {
                    open::warn_probed_raw(&spec.path);
                }
                return Err(fail("Block driver does not support snapshots".into()));
            };
            // As qemu: a snapshot that is not there is ENOENT, found by ID, then by name.
            if find(&list, &SnapshotSelector::IdOrName(name.clone())).is_none() {
                return Err(fail(
                    "Failed to load snapshot: No such file or directory".into(),
                ));
            }
            qcow2
                .apply_snapshot(name)
                .map_err(|e| fail(format!("Failed to load snapshot: {}", errno_text(&e))))
        }
        Action::Delete(name) => {
            let fail =
                |why: &str| CliError::new(format!("Could not delete snapshot '{name}': {why}"));
            // As qemu-img: the snapshot is looked up by name in the list first.
            let list = snapshots(image, arg)?;
            if !list
                .iter()
                .any(|sn| shown(&sn.name, NAME_MAX) == name.as_bytes())
            {
                return Err(fail("snapshot not found"));
            }
            let qcow2 = qcow2_mut(image).expect("only qcow2 images list snapshots");
            qcow2
                .delete_snapshot(name)
                .map_err(|e| fail(&errno_text(&e)))
        }
    }
}

/// The qcow2 driver of `image`, if it is one.
fn qcow2_mut(image: &mut Image) -> Option<&mut Qcow2> {
    img_core::qcow2::driver_of(image)
}

/// The internal snapshots of `image` (none for formats without them). A table qemu cannot read
/// makes it refuse to open the image, hence the wording.
pub(crate) fn snapshots(image: &mut Image, arg: &str) -> Result<Vec<Snapshot>, CliError> {
    match qcow2_mut(image) {
        Some(q) => q
            .snapshots()
            .map_err(|e| CliError::new(format!("Could not open '{arg}': {}", e.reason()))),
        None => Ok(Vec::new()),
    }
}

/// The longest ID qemu keeps in its snapshot list (its buffer holds 128 bytes with the NUL).
const ID_MAX: usize = 127;
/// The longest name qemu keeps in its snapshot list.
const NAME_MAX: usize = 255;

/// A table string as qemu lists it: up to a NUL, and no longer than its buffer.
fn shown(s: &[u8], max: usize) -> &[u8] {
    let s = c_str(s);
    &s[..s.len().min(max)]
}

/// A new snapshot's name as qemu records it: cut to fit its buffer (at a character boundary
/// here, where qemu may cut a character in two).
fn table_name(name: &str) -> &str {
    let mut end = name.len().min(NAME_MAX);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    &name[..end]
}

/// The current time as qemu stamps snapshots: seconds, and microseconds as nanoseconds.
fn now() -> (u32, u32) {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (t.as_secs() as u32, t.subsec_micros() * 1000)
}

/// What qemu prints for a failed snapshot operation: the text of its errno.
fn errno_text(e: &img_core::Error) -> String {
    use img_core::Error as E;
    match e {
        E::SnapshotNotFound { .. } => "No such file or directory".into(),
        E::Unsupported { .. } => "Operation not supported".into(),
        E::ReadOnly { .. } => "Permission denied".into(),
        E::Storage(blockdev::Error::Io { source, .. }) => blockdev::os_message(source),
        other => other.reason(),
    }
}

/// `s` padded with spaces to `width` bytes, on the left (`right`) or the right, as printf
/// pads (by bytes, not characters).
fn pad(out: &mut Vec<u8>, s: &[u8], width: usize, right: bool) {
    let fill = width.saturating_sub(s.len());
    if right {
        out.extend(std::iter::repeat_n(b' ', fill));
    }
    out.extend_from_slice(s);
    if !right {
        out.extend(std::iter::repeat_n(b' ', fill));
    }
}

/// One line of qemu's snapshot table: the columns, widths and alignment of its header.
fn table_line(out: &mut Vec<u8>, cells: [&[u8]; 6]) {
    const COLUMNS: [(usize, bool); 6] = [
        (7, false),
        (16, false),
        (8, true),
        (19, true),
        (15, true),
        (10, true),
    ];
    for (i, (cell, (width, right))) in cells.iter().zip(COLUMNS).enumerate() {
        if i > 0 {
            out.push(b' ');
        }
        pad(out, cell, width, right);
    }
    out.push(b'\n');
}

/// The date and time of `sec` seconds since the epoch in the local time zone, as
/// `YYYY-MM-DD HH:MM:SS`.
fn local_date(sec: u32) -> String {
    let t = sec as libc::time_t;
    // SAFETY: tm is a plain C struct for which all zeros is a valid value.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: localtime_r reads the time and writes the struct, both live locals; it reads
    // the time zone (TZ) on its first use.
    let ok = !unsafe { libc::localtime_r(&t, &mut tm) }.is_null();
    if !ok {
        return String::new();
    }
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        tm.tm_year as i64 + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

/// The guest clock as qemu shows it: hours (at least four digits), minutes, seconds and
/// milliseconds.
fn clock(nsec: u64) -> String {
    let secs = nsec / 1_000_000_000;
    format!(
        "{:04}:{:02}:{:02}.{:03}",
        (secs / 3600) as i32,
        (secs / 60) % 60,
        secs % 60,
        (nsec / 1_000_000) % 1000
    )
}

/// The table qemu prints under "Snapshot list:" (header and one line per snapshot), each
/// line after `indent`.
pub(crate) fn dump_table(list: &[Snapshot], indent: &str, out: &mut Vec<u8>) {
    out.extend_from_slice(indent.as_bytes());
    table_line(
        out,
        [b"ID", b"TAG", b"VM_SIZE", b"DATE", b"VM_CLOCK", b"ICOUNT"],
    );
    for sn in list {
        let icount = if sn.icount == u64::MAX {
            "--".to_string()
        } else {
            (sn.icount as i64).to_string()
        };
        out.extend_from_slice(indent.as_bytes());
        table_line(
            out,
            [
                shown(&sn.id, ID_MAX),
                shown(&sn.name, NAME_MAX),
                size_to_str(sn.vm_state_size).as_bytes(),
                local_date(sn.date_sec).as_bytes(),
                clock(sn.vm_clock_nsec).as_bytes(),
                icount.as_bytes(),
            ],
        );
    }
}

/// The `snapshots` list of `img info --output=json`, keys in the order qemu inserts them.
pub(crate) fn to_qvalue(list: &[Snapshot]) -> QValue {
    let text = |s: &[u8], max| String::from_utf8_lossy(shown(s, max)).into_owned();
    QValue::List(
        list.iter()
            .map(|sn| {
                let mut d: Vec<(String, QValue)> = vec![
                    ("id".into(), text(&sn.id, ID_MAX).into()),
                    ("name".into(), text(&sn.name, NAME_MAX).into()),
                    ("vm-state-size".into(), sn.vm_state_size.into()),
                    ("date-sec".into(), u64::from(sn.date_sec).into()),
                    ("date-nsec".into(), u64::from(sn.date_nsec).into()),
                    (
                        "vm-clock-sec".into(),
                        (sn.vm_clock_nsec / 1_000_000_000).into(),
                    ),
                    (
                        "vm-clock-nsec".into(),
                        (sn.vm_clock_nsec % 1_000_000_000).into(),
                    ),
                ];
                if sn.icount != u64::MAX {
                    d.push(("icount".into(), sn.icount.into()));
                }
                QValue::Dict(d)
            })
            .collect(),
    )
}

/// Makes the read-only `image` read as the snapshot `selector` names (`convert -l`,
/// `measure -l`), with qemu-img's messages.
pub(crate) fn load(image: &mut Image, selector: &SnapshotSelector) -> Result<(), CliError> {
    img_core::qcow2::snapshot_load::load_snapshot(image, selector).map_err(|e| {
        let why = match e {
            img_core::Error::SnapshotNotFound { .. } => "Can't find snapshot".to_string(),
            other => other.reason(),
        };
        CliError::new(format!("Failed to load snapshot: {why}"))
    })
}

/// Parses a `-l` snapshot parameter as qemu-img does: `snapshot.id=ID,snapshot.name=NAME`
/// (either or both), or else an ID or name.
pub(crate) fn parse_snapshot_param(v: &str) -> Result<SnapshotSelector, CliError> {
    if !v.starts_with("snapshot.") {
        return Ok(SnapshotSelector::IdOrName(v.to_string()));
    }
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
    Ok(SnapshotSelector::Match { id, name })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn actions() {
        let a = parse_args(&s(&["x.qcow2"])).unwrap().unwrap();
        assert_eq!(a.action, Action::List);
        let a = parse_args(&s(&["-c", "n", "x"])).unwrap().unwrap();
        assert_eq!(a.action, Action::Create("n".into()));
        let a = parse_args(&s(&["--delete=n", "x"])).unwrap().unwrap();
        assert_eq!(a.action, Action::Delete("n".into()));
        for bad in [&["-l", "-l", "x"][..], &["-c", "a", "-d", "b", "x"]] {
            let e = parse_args(&s(bad)).unwrap_err();
            assert_eq!(e.message, "Cannot mix '-l', '-a', '-c', '-d'");
            assert!(e.usage);
        }
        let e = parse_args(&s(&["a", "b"])).unwrap_err();
        assert_eq!(e.message, "Expecting one image file name");
    }

    #[test]
    fn columns() {
        assert_eq!(clock(0), "0000:00:00.000");
        assert_eq!(clock(123_456_789_012_345), "0034:17:36.789");
        assert_eq!(clock(u64::MAX), "5124095:34:33.709");
        let mut row = Vec::new();
        table_line(&mut row, [b"1", "é".as_bytes(), b"0 B", b"d", b"c", b"--"]);
        let mut header = Vec::new();
        table_line(
            &mut header,
            [b"ID", b"TAG", b"VM_SIZE", b"DATE", b"VM_CLOCK", b"ICOUNT"],
        );
        // Widths count bytes, as printf's do: a name of two-byte characters is padded less.
        assert_eq!(row.len(), header.len());
        assert!(row.starts_with("1       é              ".as_bytes()));
        assert!(row.ends_with(b"c         --\n"));
        assert_eq!(table_name(&"x".repeat(300)).len(), 255);
        assert_eq!(shown(b"ab\0cd", 255), b"ab");
    }

    #[test]
    fn snapshot_params() {
        assert_eq!(
            parse_snapshot_param("1").unwrap(),
            SnapshotSelector::IdOrName("1".into())
        );
        assert_eq!(
            parse_snapshot_param("snapshot.name=a,,b").unwrap(),
            SnapshotSelector::Match {
                id: None,
                name: Some("a,b".into())
            }
        );
        let e = parse_snapshot_param("snapshot.foo=1").unwrap_err();
        assert_eq!(
            e.message,
            "Invalid parameter 'snapshot.foo'\nimg: Failed in parsing snapshot param 'snapshot.foo=1'"
        );
    }
}
