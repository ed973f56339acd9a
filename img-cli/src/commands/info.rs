//! `img info`: what an image is, printed as qemu-img prints it (human or JSON).
//!
//! qemu describes an image as a tree of nodes: the format node (qcow2, raw) with the file it
//! reads from as its child `file`. Both are shown, with sizes as qemu computes them: lengths
//! in whole 512-byte sectors and the disk size as the blocks the file occupies.

use crate::commands::snapshot;
use crate::getopt::{opt, parse, OptSpec};
use crate::human::size_to_str;
use crate::open::{self, ImageSpec};
use crate::qjson::{self, dump_human, to_json_pretty, QValue};
use crate::{CliError, CmdResult};
use blockdev::network::Protocol;
use img_core::{BackingPolicy, Usage};
use std::io::Write;
use std::os::unix::fs::MetadataExt;

const SPECS: &[OptSpec] = &[
    opt(Some('h'), Some("help"), false),
    opt(Some('f'), Some("format"), true),
    opt(None, Some("image-opts"), false),
    opt(Some('b'), Some("backing-chain"), false),
    opt(Some('U'), Some("force-share"), false),
    opt(None, Some("object"), true),
    opt(None, Some("output"), true),
];

const USAGE: &str = "\
Usage: img info [-f FMT | --image-opts] [-b] [-U] [--output human|json] FILENAME

Shows the format, sizes and format-specific facts of an image.

  -f, --format FMT       image format (default: probed)
  --image-opts           FILENAME is an option string (driver=qcow2,file.filename=...)
  -b, --backing-chain    show the whole backing chain
  -U, --force-share      open the image in shared mode
  --output human|json    output format (default: human)
  -h, --help             show this help
";

/// An image's backing file as `info` shows it.
#[derive(Clone, Debug)]
struct BackingInfo {
    /// The name recorded in the image.
    recorded: String,
    /// The name resolved against the image's directory.
    full: String,
    /// The recorded format, if any.
    format: Option<String>,
}

/// One node of the image graph, with the facts qemu-img shows.
#[derive(Clone, Debug)]
struct NodeInfo {
    filename: String,
    format: String,
    virtual_size: u64,
    actual_size: Option<u64>,
    cluster_size: Option<u64>,
    dirty: bool,
    /// The backing file: as recorded, resolved, and its recorded format.
    backing: Option<BackingInfo>,
    /// The internal snapshots (shown only when there are some, as qemu does).
    snapshots: Vec<img_core::qcow2::snapshot::Snapshot>,
    /// `format-specific`: the type and its data.
    specific: Option<(String, Vec<(String, QValue)>)>,
    children: Vec<(String, NodeInfo)>,
}

impl NodeInfo {
    /// The JSON object, with keys inserted in the order qemu's QAPI visitor inserts them.
    fn to_qvalue(&self) -> QValue {
        let mut d: Vec<(String, QValue)> = vec![
            ("filename".into(), self.filename.clone().into()),
            ("format".into(), self.format.clone().into()),
        ];
        // qemu's nbd driver reports no dirty flag, nor does raw over it (raw asks its file).
        let nbd = blockdev::nbd::is_nbd_name(&self.filename);
        if !(nbd && matches!(self.format.as_str(), "nbd" | "raw")) {
            d.push(("dirty-flag".into(), self.dirty.into()));
        }
        if let Some(a) = self.actual_size {
            d.push(("actual-size".into(), a.into()));
        }
        d.push(("virtual-size".into(), self.virtual_size.into()));
        if let Some(c) = self.cluster_size {
            d.push(("cluster-size".into(), c.into()));
        }
        if let Some(b) = &self.backing {
            d.push(("backing-filename".into(), b.recorded.clone().into()));
            d.push(("full-backing-filename".into(), b.full.clone().into()));
            if let Some(f) = &b.format {
                d.push(("backing-filename-format".into(), f.clone().into()));
            }
        }
        if !self.snapshots.is_empty() {
            d.push(("snapshots".into(), snapshot::to_qvalue(&self.snapshots)));
        }
        if let Some((kind, data)) = &self.specific {
            d.push((
                "format-specific".into(),
                QValue::Dict(vec![
                    ("type".into(), kind.clone().into()),
                    ("data".into(), QValue::Dict(data.clone())),
                ]),
            ));
        }
        let children = self
            .children
            .iter()
            .map(|(name, info)| {
                QValue::Dict(vec![
                    ("name".into(), name.clone().into()),
                    ("info".into(), info.to_qvalue()),
                ])
            })
            .collect();
        d.push(("children".into(), QValue::List(children)));
        QValue::Dict(d)
    }

    /// The human-readable form; `path` names the node in "Child node" headings.
    fn dump(&self, indent: usize, path: &str, out: &mut Vec<u8>) {
        let mut text = String::new();
        self.dump_head(indent, &mut text);
        out.extend_from_slice(text.as_bytes());
        let ind = " ".repeat(indent * 4);
        if !self.snapshots.is_empty() {
            // Names are bytes, printed as they are.
            out.extend_from_slice(format!("{ind}Snapshot list:\n").as_bytes());
            snapshot::dump_table(&self.snapshots, &ind, out);
        }
        let mut text = String::new();
        if let Some((_, data)) = &self.specific {
            if !data.is_empty() {
                text.push_str(&format!("{ind}Format specific information:\n"));
                dump_human(data, indent + 1, &mut text);
            }
        }
        out.extend_from_slice(text.as_bytes());
        for (name, child) in &self.children {
            out.extend_from_slice(format!("{ind}Child node '{path}{name}':\n").as_bytes());
            child.dump(indent + 1, &format!("{path}{name}/"), out);
        }
    }

    /// The lines before the snapshot list, in qemu's order.
    fn dump_head(&self, indent: usize, out: &mut String) {
        let ind = " ".repeat(indent * 4);
        let protocol = indent > 0;
        let dsize = self
            .actual_size
            .map(size_to_str)
            .unwrap_or_else(|| "unavailable".into());
        out.push_str(&format!(
            "{ind}{}: {}\n{ind}{}: {}\n{ind}{}: {} ({} bytes)\n{ind}disk size: {dsize}\n",
            if protocol { "filename" } else { "image" },
            self.filename,
            if protocol {
                "protocol type"
            } else {
                "file format"
            },
            self.format,
            if protocol {
                "file length"
            } else {
                "virtual size"
            },
            size_to_str(self.virtual_size),
            self.virtual_size,
        ));
        if let Some(cs) = self.cluster_size {
            out.push_str(&format!("{ind}cluster_size: {cs}\n"));
        }
        if self.dirty {
            out.push_str(&format!("{ind}cleanly shut down: no\n"));
        }
        if let Some(b) = &self.backing {
            out.push_str(&format!("{ind}backing file: {}", b.recorded));
            if b.full != b.recorded {
                out.push_str(&format!(" (actual path: {})", b.full));
            }
            out.push('\n');
            if let Some(f) = &b.format {
                out.push_str(&format!("{ind}backing file format: {f}\n"));
            }
        }
    }
}

/// Converts format-specific facts from the core into qemu's dictionary shape.
fn to_qvalue(v: &serde_json::Value) -> QValue {
    match v {
        serde_json::Value::Bool(b) => QValue::Bool(*b),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => QValue::Int(i),
            None => QValue::Int(n.as_u64().map(|u| u as i64).unwrap_or_default()),
        },
        serde_json::Value::String(s) => QValue::Str(s.clone()),
        serde_json::Value::Array(a) => QValue::List(a.iter().map(to_qvalue).collect()),
        serde_json::Value::Object(o) => {
            QValue::Dict(o.iter().map(|(k, v)| (k.clone(), to_qvalue(v))).collect())
        }
        serde_json::Value::Null => QValue::Dict(Vec::new()),
    }
}

/// The file node: what qemu's `file` protocol driver reports about the image file.
fn file_node(path: &str, length: u64) -> NodeInfo {
    NodeInfo {
        filename: path.to_string(),
        format: "file".to_string(),
        virtual_size: length.div_ceil(512) * 512,
        actual_size: allocated_bytes(path),
        cluster_size: None,
        dirty: false,
        backing: None,
        snapshots: Vec::new(),
        specific: Some(("file".to_string(), Vec::new())),
        children: Vec::new(),
    }
}

/// Bytes the file occupies on disk.
fn allocated_bytes(path: &str) -> Option<u64> {
    std::fs::metadata(path).ok().map(|m| m.blocks() * 512)
}

/// Collects the facts qemu-img shows for the image `spec` names.
fn collect(spec: &ImageSpec) -> Result<NodeInfo, CliError> {
    let mut image = open::open(spec, true, Default::default())?;
    let snapshots = if spec.protocol_only {
        Vec::new()
    } else {
        snapshot::snapshots(&mut image, &spec.arg)?
    };
    let fmt = image.format();
    let file_len = fmt
        .file()
        .size()
        .map_err(|e| CliError::new(format!("Could not open '{}': {e}", spec.arg)))?;
    let mut file = file_node(&spec.path, file_len);
    let protocol = Protocol::of(&spec.path);
    if protocol.is_network() {
        // Network storage has no file facts. qemu names an NBD export canonically and an
        // iSCSI LUN or RBD image by its driver's options (a CHAP password among them, as
        // qemu shows it).
        file.filename =
            qjson::json_filename(&spec.path, None).unwrap_or_else(|| fmt.file().name().to_string());
        file.format = protocol.driver().to_string();
        file.actual_size = None;
        file.specific = None;
        file.cluster_size = fmt.file().cluster_size();
    }
    if spec.protocol_only {
        return Ok(file);
    }
    let info = fmt.info();
    let virtual_size = match fmt.driver() {
        // raw counts whole sectors, rounding up; qcow2 keeps whole sectors of its header size.
        "raw" => image.size().div_ceil(512) * 512,
        _ => image.size() / 512 * 512,
    };
    let specific = info.specific.as_ref().map(|s| {
        let mut data = match to_qvalue(s) {
            QValue::Dict(d) => d,
            _ => Vec::new(),
        };
        if fmt.driver() == "qcow2" {
            if let Some(list) = crate::qcow2_bitmaps::bitmaps(fmt.file().as_ref()) {
                data.push(("bitmaps".into(), QValue::List(list)));
            }
        }
        (fmt.driver().to_string(), data)
    });
    let backing = info.backing_file.as_ref().map(|recorded| BackingInfo {
        recorded: recorded.clone(),
        full: img_core::chain::resolve_backing_name(&spec.path, recorded),
        format: info.backing_format.clone(),
    });
    // Extent files of the format (VMDK) are child nodes of their own, before "file", and
    // count towards the disk size.
    let mut children = Vec::new();
    let mut actual_size = file.actual_size;
    // qemu lists the children newest first: the last extent first, the file last.
    for (name, path) in fmt.child_files().into_iter().rev() {
        let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        let node = file_node(&path, len);
        if let (Some(a), Some(b)) = (actual_size, node.actual_size) {
            actual_size = Some(a + b);
        }
        children.push((name, node));
    }
    children.push(("file".to_string(), file));
    Ok(NodeInfo {
        filename: match protocol {
            Protocol::File => spec.path.clone(),
            _ => qjson::json_filename(&spec.path, Some(fmt.driver()))
                .unwrap_or_else(|| fmt.file().name().to_string()),
        },
        format: fmt.driver().to_string(),
        virtual_size,
        actual_size,
        // raw asks its file, so raw over RBD shows the object size as qemu does.
        cluster_size: info.cluster_size.or_else(|| match fmt.driver() {
            "raw" => fmt.file().cluster_size(),
            _ => None,
        }),
        dirty: info.dirty,
        backing,
        snapshots,
        specific,
        children,
    })
}

/// Runs `img info` with its arguments.
pub fn run(args: &[String]) -> CmdResult {
    let (opts, pos) = parse(args, SPECS)?;
    let mut fmt: Option<String> = None;
    let mut image_opts = false;
    let mut chain = false;
    let mut json = false;
    let mut force_share = false;
    for o in &opts {
        match o.name.as_str() {
            "help" => {
                print!("{USAGE}");
                return Ok(0);
            }
            "format" => fmt = o.value.clone(),
            "image-opts" => image_opts = true,
            "backing-chain" => chain = true,
            "output" => match o.value.as_deref() {
                Some("json") => json = true,
                Some("human") => json = false,
                v => {
                    return Err(CliError::usage(format!(
                        "--output expects 'human' or 'json' not '{}'",
                        v.unwrap_or_default()
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
    // As qemu-img: the data is not read, so no "consistent read" lock is taken.
    let spec = ImageSpec::from_args_checked(&pos[0], image_opts, fmt.as_deref())?
        .with_force_share(force_share)
        .with_usage(Usage {
            metadata_only: true,
            ..Default::default()
        });
    let spec = spec.with_backing(BackingPolicy::none());
    let infos = if chain {
        collect_chain(spec)?
    } else {
        vec![collect(&spec)?]
    };
    if json {
        let v = if chain {
            QValue::List(infos.iter().map(NodeInfo::to_qvalue).collect())
        } else {
            infos[0].to_qvalue()
        };
        println!("{}", to_json_pretty(&v));
    } else {
        let mut out = Vec::new();
        for (i, info) in infos.iter().enumerate() {
            if i > 0 {
                out.push(b'\n');
            }
            info.dump(0, "/", &mut out);
        }
        std::io::stdout()
            .write_all(&out)
            .map_err(|e| CliError::new(format!("write error: {e}")))?;
    }
    Ok(0)
}

/// The facts of every image of the chain, top first. Each image is opened on its own, with
/// its backing file closed, as qemu-img does; a name met twice is a loop.
fn collect_chain(top: ImageSpec) -> Result<Vec<NodeInfo>, CliError> {
    let mut seen = std::collections::HashSet::new();
    let mut infos = Vec::new();
    let mut spec = top;
    loop {
        if !seen.insert(spec.path.clone()) {
            return Err(CliError::new(format!(
                "Backing file '{}' creates an infinite loop.",
                spec.path
            )));
        }
        let info = collect(&spec)?;
        let next = info.backing.clone();
        infos.push(info);
        let Some(b) = next else {
            return Ok(infos);
        };
        if infos.len() > img_core::chain::DEFAULT_MAX_DEPTH {
            return Err(CliError::new(format!(
                "The backing chain of '{}' is deeper than {} images",
                infos[0].filename,
                img_core::chain::DEFAULT_MAX_DEPTH
            )));
        }
        spec = ImageSpec::file(&b.full, b.format.as_deref())
            .with_force_share(spec.force_share)
            .with_usage(spec.usage)
            .with_backing(BackingPolicy::none());
    }
}
