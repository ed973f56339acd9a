//! `img create -f vmdk`: qemu-img's vmdk options, checked in its order with its messages.

use super::create::{named, Opts};
use crate::CmdResult;
use img_core::raw::Preallocation;
use img_core::vmdk::{self, Subformat, VmdkCreateOptions};
use std::path::Path;

/// The CID of the parent image `backing` (named as the new image `filename` records it),
/// which must be a vmdk image.
fn parent_cid(filename: &str, backing: &str) -> Result<u32, String> {
    let full = img_core::chain::resolve_backing_name(filename, backing);
    let opts = img_core::OpenOptions {
        read_only: true,
        force_share: true,
        backing: img_core::BackingPolicy::none(),
        ..Default::default()
    };
    let image =
        img_core::open_image(Path::new(&full), &opts).map_err(|e| crate::open::open_reason(&e))?;
    if image.format().driver() != "vmdk" {
        return Err("backing_file must be a vmdk image".into());
    }
    let cid = image
        .format()
        .info()
        .specific
        .and_then(|s| s.get("cid").and_then(|c| c.as_u64()))
        .unwrap_or(0);
    Ok(cid as u32)
}

/// Creates a vmdk image of `size` bytes at `path` with the options `o`.
pub fn create(path: &Path, filename: &str, size: u64, o: &Opts) -> CmdResult {
    let fail = |m: String| named(filename, m);
    let subformat = match o.text("subformat") {
        None => Subformat::MonolithicSparse,
        Some(s) => {
            Subformat::parse(s).ok_or_else(|| fail(format!("invalid parameter value: {s}")))?
        }
    };
    let preallocation = match o.text("preallocation") {
        None => Preallocation::Off,
        Some(p) => match Preallocation::parse(p) {
            Ok(Preallocation::Metadata) | Err(_) => {
                return Err(fail(format!("invalid parameter value: {p}")))
            }
            Ok(p) => p,
        },
    };
    let mut opts = VmdkCreateOptions {
        size: size.div_ceil(512).saturating_mul(512),
        subformat,
        adapter_type: o.text("adapter_type").map(str::to_string),
        backing_file: o.text("backing_file").map(str::to_string),
        parent_cid: None,
        compat6: o.bool("compat6"),
        hwversion: o.text("hwversion").map(str::to_string),
        toolsversion: o.text("toolsversion").map(str::to_string),
        zeroed_grain: o.bool("zeroed_grain"),
        preallocation,
        cid: None,
    };
    vmdk::create::validate(&opts).map_err(fail)?;
    if let Some(b) = &opts.backing_file {
        if let Some(f) = o.text("backing_fmt") {
            if f != "vmdk" {
                return Err(fail("backing_file must be a vmdk image".into()));
            }
        }
        opts.parent_cid = Some(parent_cid(filename, b).map_err(fail)?);
    }
    vmdk::create(path, &opts).map_err(|e| fail(crate::open::open_reason(&e)))?;
    Ok(0)
}
