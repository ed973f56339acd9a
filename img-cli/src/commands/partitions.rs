//! `img partitions`: the MBR or GPT partition table of an image of any format, with the byte
//! offsets `mount -o loop,offset=N` needs.

use crate::getopt::{opt, parse, OptSpec};
use crate::open::{self, ImageSpec};
use crate::{CliError, CmdResult};
use img_core::ops::partitions::{read_partitions, PartitionTable, Role, TableKind};
use std::io::Write;

const SPECS: &[OptSpec] = &[
    opt(Some('h'), Some("help"), false),
    opt(Some('f'), Some("format"), true),
    opt(None, Some("image-opts"), false),
    opt(None, Some("output"), true),
    opt(Some('U'), Some("force-share"), false),
    opt(None, Some("object"), true),
];

const USAGE: &str = "\
Usage: img partitions [-f FMT | --image-opts] [--output human|json] [-U] FILENAME

Lists the partitions of the disk in FILENAME (any format, read through its backing
chain): an MBR with its primary, extended and logical partitions (the EBR chain), or a
GPT (CRC32-checked; when the primary header or entries are damaged, the backup at the
end of the disk is used, with a warning). A protective MBR leads to the GPT.

For each partition: its number (as Linux numbers it: MBR logical partitions from 5),
its first byte (Start), last byte (End) and size in bytes, its type and, with GPT, its
name and attributes. Start and Size are what `mount -o loop,offset=START,sizelimit=SIZE`
takes to mount the partition from the raw disk, such as the file `img mount` exports.

  -f, --format FMT        image format (default: probed)
  --image-opts            FILENAME is an option string (driver=qcow2,file.filename=...)
  --output human|json     output format (default: human); JSON has the fields label,
                          id, sector-size, partitions (number, start, end, size, type,
                          type-name, role, bootable, name, uuid, attributes), warnings
  -U, --force-share       open the image in shared mode
  -h, --help              show this help
";

/// Runs `img partitions` with its arguments.
pub fn run(args: &[String]) -> CmdResult {
    let (opts, pos) = parse(args, SPECS)?;
    let mut fmt: Option<String> = None;
    let mut image_opts = false;
    let mut json = false;
    let mut force_share = false;
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
    let table = read_partitions(&image).map_err(|e| CliError::new(e.to_string()))?;
    let text = if json {
        let mut s = serde_json::to_string_pretty(&table)
            .map_err(|e| CliError::new(format!("Could not format the table: {e}")))?;
        s.push('\n');
        s
    } else {
        for w in &table.warnings {
            eprintln!("img: warning: {w}");
        }
        human(&pos[0], image.size(), &table)
    };
    std::io::stdout()
        .write_all(text.as_bytes())
        .map_err(|e| CliError::new(format!("Could not write the table: {e}")))?;
    Ok(0)
}

/// The table as a person reads it.
fn human(file: &str, size: u64, t: &PartitionTable) -> String {
    let label = match t.label {
        TableKind::Dos => "dos (MBR)",
        TableKind::Gpt => "gpt",
    };
    let mut out = format!(
        "Disk {file}: {size} bytes, {label} partition table, sector size {}, disk identifier {}\n",
        t.sector_size, t.id
    );
    if t.partitions.is_empty() {
        out.push_str("No partitions.\n");
        return out;
    }
    let gpt = t.label == TableKind::Gpt;
    out.push_str(&format!(
        "{:>6} {:>4} {:>15} {:>15} {:>15}  {}\n",
        "Number",
        if gpt { "" } else { "Boot" },
        "Start",
        "End",
        "Size",
        if gpt {
            "Type / Name / Attributes"
        } else {
            "Type"
        }
    ));
    for p in &t.partitions {
        let type_text = match (gpt, p.type_name) {
            (true, Some(n)) => n.to_string(),
            (true, None) => p.type_id.clone(),
            (false, Some(n)) => format!("{} {n}", p.type_id),
            (false, None) => p.type_id.clone(),
        };
        let mut line = format!(
            "{:>6} {:>4} {:>15} {:>15} {:>15}  {type_text}",
            p.number,
            if p.bootable { "*" } else { "" },
            p.start,
            p.end,
            p.size
        );
        if p.role == Role::Extended {
            line.push_str(" (extended: holds the logical partitions)");
        }
        if let Some(n) = p.name.as_deref().filter(|n| !n.is_empty()) {
            line.push_str(&format!(" / \"{n}\""));
        }
        if let Some(a) = &p.attributes {
            line.push_str(&format!(" / {a}"));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    let mut hint = String::from(
        "\nMount a partition of the raw disk (such as the file `img mount` exports) with:\n",
    );
    let mut any = false;
    for p in t.partitions.iter().filter(|p| p.role != Role::Extended) {
        hint.push_str(&format!(
            "  partition {}: mount -o loop,offset={},sizelimit={} FILE DIR\n",
            p.number, p.start, p.size
        ));
        any = true;
    }
    if any {
        out.push_str(&hint);
    }
    out
}
