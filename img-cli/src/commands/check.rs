//! `img check`.

use crate::{CliError, CmdResult};

/// Runs `img check` with its arguments.
pub fn run(args: &[String]) -> CmdResult {
    let _ = args;
    Err(CliError::new("check: not implemented yet"))
}
