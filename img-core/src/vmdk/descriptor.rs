//! The text descriptor of a VMDK image: the header fields (CID, parent CID, create type,
//! parent file name hint), the extent lines and the disk database.
//!
//! It is either a file of its own (monolithicFlat, twoGbMaxExtent*) or embedded in the first
//! sectors of a hosted sparse extent (monolithicSparse, streamOptimized).

/// The most bytes of a descriptor that are read: a descriptor is a few hundred bytes; this
/// bounds what a hostile file can make us allocate (qemu reads at most 1 MiB too).
pub const MAX_DESCRIPTOR: u64 = (1 << 20) - 1;

/// What starts every text descriptor file.
pub const SIGNATURE: &str = "# Disk DescriptorFile";

/// One extent line: `ACCESS SECTORS TYPE ["FILE" [OFFSET]]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExtentLine {
    /// `RW`, `RDONLY` or `NOACCESS`.
    pub access: String,
    /// Length of the extent in sectors.
    pub sectors: u64,
    /// `SPARSE`, `FLAT`, `ZERO`, `VMFS`, ...
    pub kind: String,
    /// The extent file's name as written (relative to the descriptor's directory).
    pub file: Option<String>,
    /// For flat extents, where the extent starts in its file, in sectors.
    pub offset: Option<u64>,
}

/// A parsed descriptor.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Descriptor {
    /// Content ID of this image.
    pub cid: Option<u32>,
    /// Content ID of the parent (`0xffffffff`: no parent).
    pub parent_cid: Option<u32>,
    /// `createType`.
    pub create_type: Option<String>,
    /// `parentFileNameHint`: the backing file.
    pub parent_hint: Option<String>,
    /// The extent lines, in order.
    pub extents: Vec<ExtentLine>,
    /// Disk database entries (`ddb.key = "value"`), in order.
    pub ddb: Vec<(String, String)>,
}

/// Whether `head` (the first bytes of a file) is a text descriptor.
pub fn is_descriptor(head: &[u8]) -> bool {
    head.starts_with(SIGNATURE.as_bytes())
}

/// Strips one pair of surrounding double quotes.
fn unquote(v: &str) -> &str {
    let v = v.trim();
    v.strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .unwrap_or(v)
}

/// Parses an extent line; `Ok(None)` for a line that is not one.
fn parse_extent(line: &str) -> Result<Option<ExtentLine>, String> {
    let mut rest = line.trim();
    let mut word = || -> Option<String> {
        let t = rest.trim_start();
        let end = t.find(char::is_whitespace).unwrap_or(t.len());
        let (w, r) = t.split_at(end);
        rest = r;
        (!w.is_empty()).then(|| w.to_string())
    };
    let Some(access) = word() else {
        return Ok(None);
    };
    if !matches!(access.as_str(), "RW" | "RDONLY" | "NOACCESS") {
        return Ok(None);
    }
    let invalid = || format!("Invalid extent line: {}", line.trim_end());
    let sectors = word()
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or_else(invalid)?;
    let kind = word().ok_or_else(invalid)?;
    let t = rest.trim_start();
    let (file, offset) = if let Some(q) = t.strip_prefix('"') {
        let end = q.find('"').ok_or_else(invalid)?;
        let name = q[..end].to_string();
        let after = q[end + 1..].trim();
        let offset = if after.is_empty() {
            None
        } else {
            Some(after.parse::<u64>().map_err(|_| invalid())?)
        };
        (Some(name), offset)
    } else if t.is_empty() {
        (None, None)
    } else {
        return Err(invalid());
    };
    match kind.as_str() {
        "FLAT" if file.is_none() || offset.is_none() => return Err(invalid()),
        "SPARSE" | "VMFSSPARSE" | "SESPARSE" if file.is_none() || offset.is_some() => {
            return Err(invalid())
        }
        _ => {}
    }
    Ok(Some(ExtentLine {
        access,
        sectors,
        kind,
        file,
        offset,
    }))
}

/// Parses descriptor text. Unknown lines are ignored, as VMware and qemu do.
pub fn parse(text: &str) -> Result<Descriptor, String> {
    let mut d = Descriptor::default();
    for line in text.split('\n') {
        let line = line.trim_end_matches(['\r', '\0']);
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        if let Some(e) = parse_extent(trimmed)? {
            d.extents.push(e);
            continue;
        }
        let Some((key, value)) = trimmed.split_once('=') else {
            continue;
        };
        let key = key.trim();
        let value = unquote(value);
        match key {
            "CID" => d.cid = u32::from_str_radix(value, 16).ok(),
            "parentCID" => d.parent_cid = u32::from_str_radix(value, 16).ok(),
            "createType" => d.create_type = Some(value.to_string()),
            "parentFileNameHint" => d.parent_hint = Some(value.to_string()),
            k if k.starts_with("ddb.") => d.ddb.push((k.to_string(), value.to_string())),
            _ => {}
        }
    }
    Ok(d)
}

impl Descriptor {
    /// The descriptor text, laid out as qemu-img writes it.
    pub fn render(&self) -> String {
        let mut s = String::new();
        s.push_str(SIGNATURE);
        s.push('\n');
        s.push_str("version=1\n");
        s.push_str(&format!("CID={:x}\n", self.cid.unwrap_or(0)));
        s.push_str(&format!(
            "parentCID={:x}\n",
            self.parent_cid.unwrap_or(u32::MAX)
        ));
        s.push_str(&format!(
            "createType=\"{}\"\n",
            self.create_type.as_deref().unwrap_or("monolithicSparse")
        ));
        // qemu puts the hint where an empty line is otherwise.
        match &self.parent_hint {
            Some(p) => s.push_str(&format!("parentFileNameHint=\"{p}\"\n")),
            None => s.push('\n'),
        }
        s.push_str("# Extent description\n");
        for e in &self.extents {
            s.push_str(&format!("{} {} {}", e.access, e.sectors, e.kind));
            if let Some(f) = &e.file {
                s.push_str(&format!(" \"{f}\""));
            }
            if let Some(o) = e.offset {
                s.push_str(&format!(" {o}"));
            }
            s.push('\n');
        }
        s.push_str("\n# The Disk Data Base\n#DDB\n\n");
        for (k, v) in &self.ddb {
            s.push_str(&format!("{k} = \"{v}\"\n"));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLAT: &str = "# Disk DescriptorFile\nversion=1\nCID=b31c314\nparentCID=ffffffff\n\
        createType=\"monolithicFlat\"\n\n# Extent description\nRW 6144 FLAT \"a-flat.vmdk\" 0\n\
        RW 100 ZERO\n\n# The Disk Data Base\n#DDB\n\nddb.virtualHWVersion = \"4\"\n";

    #[test]
    fn parses_what_qemu_writes() {
        let d = parse(FLAT).unwrap();
        assert_eq!(d.cid, Some(0xb31c314));
        assert_eq!(d.parent_cid, Some(u32::MAX));
        assert_eq!(d.create_type.as_deref(), Some("monolithicFlat"));
        assert_eq!(d.extents.len(), 2);
        assert_eq!(d.extents[0].file.as_deref(), Some("a-flat.vmdk"));
        assert_eq!(d.extents[0].offset, Some(0));
        assert_eq!(d.extents[1].kind, "ZERO");
        assert_eq!(d.ddb[0].1, "4");
        // Rendering and parsing again gives the same descriptor.
        assert_eq!(parse(&d.render()).unwrap(), d);
    }

    #[test]
    fn bad_extent_lines_are_errors() {
        assert!(parse("RW 12 FLAT \"x\"\n").is_err());
        assert!(parse("RW x SPARSE \"x\"\n").is_err());
        assert!(parse("RW 12 SPARSE \"x\" 5\n").is_err());
        assert!(parse("RW 12 SPARSE \"x\n").is_err());
    }
}
