//! JSON output as qemu-img prints it.
//!
//! qemu builds its JSON from hash-table dictionaries, so the order of keys in its output is the
//! iteration order of that table: by bucket of a fixed string hash, and within a bucket the most
//! recently inserted key first. [`QValue::Dict`] keeps keys in the order they are inserted
//! (which is the order qemu's QAPI visitors insert them) and the renderer reproduces qemu's
//! iteration order from that, so any set of keys comes out as qemu-img prints it.

/// Number of buckets of qemu's dictionary hash table.
const BUCKETS: u32 = 512;

/// A JSON value in the shape qemu's QObject has.
#[derive(Clone, Debug, PartialEq)]
pub enum QValue {
    /// A string.
    Str(String),
    /// A signed integer.
    Int(i64),
    /// A boolean.
    Bool(bool),
    /// A list.
    List(Vec<QValue>),
    /// A dictionary, in insertion order.
    Dict(Vec<(String, QValue)>),
}

impl From<&str> for QValue {
    fn from(s: &str) -> Self {
        QValue::Str(s.to_string())
    }
}

impl From<String> for QValue {
    fn from(s: String) -> Self {
        QValue::Str(s)
    }
}

impl From<bool> for QValue {
    fn from(b: bool) -> Self {
        QValue::Bool(b)
    }
}

impl From<u64> for QValue {
    fn from(n: u64) -> Self {
        // QAPI sizes are int64 on the wire; a u64 above i64::MAX wraps exactly as qemu's does.
        QValue::Int(n as i64)
    }
}

impl From<i64> for QValue {
    fn from(n: i64) -> Self {
        QValue::Int(n)
    }
}

/// The string hash qemu's dictionaries use to pick a bucket (the TDB hash).
fn bucket(key: &str) -> u32 {
    let bytes = key.as_bytes();
    let mut value = 0x238F_13AFu32.wrapping_mul(bytes.len() as u32);
    for (i, &b) in bytes.iter().enumerate() {
        value = value.wrapping_add((b as u32) << ((i * 5) % 24));
    }
    1_103_515_243u32.wrapping_mul(value).wrapping_add(12345) % BUCKETS
}

/// The entries of a dictionary in the order qemu iterates them.
pub fn qdict_order(entries: &[(String, QValue)]) -> Vec<&(String, QValue)> {
    let mut v: Vec<(usize, &(String, QValue))> = entries.iter().enumerate().collect();
    // Later insertions sit at the head of their bucket's list.
    v.sort_by_key(|(i, e)| (bucket(&e.0), std::cmp::Reverse(*i)));
    v.into_iter().map(|(_, e)| e).collect()
}

/// Renders `v` as qemu's pretty JSON (four-space indentation), without a final newline.
pub fn to_json_pretty(v: &QValue) -> String {
    let mut out = String::new();
    write_json(v, 0, &mut out);
    out
}

/// Renders `v` on one line as qemu's compact JSON (`{"a": 1, "b": [2, 3]}`), the form of its
/// `json:` file names.
pub fn to_json_compact(v: &QValue) -> String {
    let mut out = String::new();
    write_compact(v, &mut out);
    out
}

fn write_compact(v: &QValue, out: &mut String) {
    match v {
        QValue::List(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_compact(item, out);
            }
            out.push(']');
        }
        QValue::Dict(entries) => {
            out.push('{');
            for (i, (k, val)) in qdict_order(entries).into_iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                quote(k, out);
                out.push_str(": ");
                write_compact(val, out);
            }
            out.push('}');
        }
        scalar => write_json(scalar, 0, out),
    }
}

/// qemu's name for an image on network storage that has no URL of its own (iSCSI, RBD):
/// `json:{...}` of the protocol driver's options, under `{"driver": FORMAT, "file": ...}` when
/// `format` names the format node above it. `None` when the plain name is what qemu shows.
pub fn json_filename(path: &str, format: Option<&str>) -> Option<String> {
    let options = blockdev::network::driver_options(path)?;
    let file = QValue::Dict(options.into_iter().map(|(k, v)| (k, v.into())).collect());
    let node = match format {
        Some(f) => QValue::Dict(vec![("driver".into(), f.into()), ("file".into(), file)]),
        None => file,
    };
    Some(format!("json:{}", to_json_compact(&node)))
}

fn newline(out: &mut String, indent: usize) {
    out.push('\n');
    out.push_str(&" ".repeat(indent * 4));
}

fn write_json(v: &QValue, indent: usize, out: &mut String) {
    match v {
        QValue::Str(s) => quote(s, out),
        QValue::Int(n) => out.push_str(&n.to_string()),
        QValue::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        QValue::List(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                newline(out, indent + 1);
                write_json(item, indent + 1, out);
            }
            newline(out, indent);
            out.push(']');
        }
        QValue::Dict(entries) => {
            out.push('{');
            for (i, (k, val)) in qdict_order(entries).into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                newline(out, indent + 1);
                quote(k, out);
                out.push_str(": ");
                write_json(val, indent + 1, out);
            }
            newline(out, indent);
            out.push('}');
        }
    }
}

/// Quotes a string as qemu does: ASCII control and non-ASCII characters become `\uXXXX`.
pub(crate) fn quote(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || (c as u32) >= 0x7f => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{:04X}", u));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Prints a dictionary the way `img info` shows format-specific facts: one `key: value` line
/// per entry, dashes in keys shown as spaces, nested values indented by four more spaces.
pub fn dump_human(entries: &[(String, QValue)], indent: usize, out: &mut String) {
    for (k, v) in qdict_order(entries) {
        let key = k.replace('-', " ");
        let composite = matches!(v, QValue::Dict(_) | QValue::List(_));
        out.push_str(&format!("{:w$}{key}:", "", w = indent * 4));
        out.push(if composite { '\n' } else { ' ' });
        dump_value(v, indent + 1, out);
    }
}

fn dump_value(v: &QValue, indent: usize, out: &mut String) {
    match v {
        QValue::Str(s) => out.push_str(&format!("{s}\n")),
        QValue::Int(n) => out.push_str(&format!("{n}\n")),
        QValue::Bool(b) => out.push_str(&format!("{b}\n")),
        QValue::Dict(entries) => dump_human(entries, indent, out),
        QValue::List(items) => {
            for (i, item) in items.iter().enumerate() {
                let composite = matches!(item, QValue::Dict(_) | QValue::List(_));
                out.push_str(&format!("{:w$}[{i}]:", "", w = indent * 4));
                out.push(if composite { '\n' } else { ' ' });
                dump_value(item, indent + 1, out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dict(keys: &[&str]) -> Vec<(String, QValue)> {
        keys.iter()
            .map(|k| (k.to_string(), QValue::Bool(false)))
            .collect()
    }

    #[test]
    fn keys_come_out_in_qemus_order() {
        // Insertion order of qemu's ImageInfo visitor; output order as qemu-img prints it.
        let d = dict(&[
            "filename",
            "format",
            "dirty-flag",
            "actual-size",
            "virtual-size",
            "cluster-size",
            "format-specific",
            "children",
        ]);
        let order: Vec<&str> = qdict_order(&d).iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            order,
            [
                "children",
                "virtual-size",
                "filename",
                "cluster-size",
                "format",
                "actual-size",
                "format-specific",
                "dirty-flag"
            ]
        );
        let d = dict(&[
            "compat",
            "lazy-refcounts",
            "corrupt",
            "refcount-bits",
            "compression-type",
            "extended-l2",
        ]);
        let order: Vec<&str> = qdict_order(&d).iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            order,
            [
                "compat",
                "compression-type",
                "lazy-refcounts",
                "refcount-bits",
                "corrupt",
                "extended-l2"
            ]
        );
    }

    #[test]
    fn same_bucket_latest_first() {
        // "children" and "backing-filename-format" share a bucket.
        assert_eq!(bucket("children"), bucket("backing-filename-format"));
        let d = dict(&["backing-filename-format", "children"]);
        assert_eq!(qdict_order(&d)[0].0, "children");
    }

    #[test]
    fn pretty_printing() {
        let v = QValue::Dict(vec![
            ("children".into(), QValue::List(vec![])),
            ("filename".into(), "a\"b\u{e9}".into()),
            (
                "format-specific".into(),
                QValue::Dict(vec![("data".into(), QValue::Dict(vec![]))]),
            ),
        ]);
        assert_eq!(
            to_json_pretty(&v),
            "{\n    \"children\": [\n    ],\n    \"filename\": \"a\\\"b\\u00E9\",\n    \
             \"format-specific\": {\n        \"data\": {\n        }\n    }\n}"
        );
    }
}
