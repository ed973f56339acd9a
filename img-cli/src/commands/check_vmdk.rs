//! `img check` of a vmdk image, as qemu-img checks it: every allocated grain must start
//! inside its extent file; repairs are not supported.

use super::check::json_string;
use crate::{CliError, CmdResult};
use blockdev::Storage;
use img_core::vmdk::{CheckResult, Vmdk};
use std::sync::Arc;

/// Checks the vmdk image on `storage`. The error is either a finished `CliError` (`Ok`) or
/// the reason an open failed (`Err`), which the caller words as "Could not open".
pub fn run(
    storage: Arc<dyn Storage>,
    repair: bool,
    json: bool,
    quiet: bool,
    display: &str,
) -> Result<u8, Result<CliError, String>> {
    let opts = img_core::OpenOptions {
        read_only: !repair,
        ..Default::default()
    };
    let vmdk = Vmdk::open(storage, &opts).map_err(|e| Err(crate::open::open_reason(&e)))?;
    if repair {
        // qemu's vmdk check refuses to fix anything.
        return Err(Ok(CliError::with_code(
            "This image format does not support checks",
            63,
        )));
    }
    let result = vmdk
        .check()
        .map_err(|e| Ok(CliError::new(format!("Check failed: {e}"))))?;
    let failed = |line: String, reason: &str| -> CmdResult {
        eprintln!("{line}");
        Err(CliError::new(format!("Check failed: {reason}")))
    };
    match result {
        CheckResult::Clean => {}
        CheckResult::PastEof { sector } => {
            return failed(
                format!("ERROR: cluster offset for sector {sector} points after EOF"),
                "Invalid argument",
            )
            .map_err(Ok)
        }
        CheckResult::Unreadable { sector } => {
            return failed(
                format!("ERROR: could not get cluster_offset for sector {sector}"),
                "Operation not permitted",
            )
            .map_err(Ok)
        }
    }
    if !quiet {
        if json {
            println!(
                "{{\n    \"check-errors\": 0,\n    \"filename\": {},\n    \"format\": \"vmdk\"\n}}",
                json_string(display)
            );
        } else {
            println!("No errors were found on the image.");
        }
    }
    Ok(0)
}
