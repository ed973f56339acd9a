//! `img info`.

use crate::{CliError, CmdResult};

/// Runs `img info` with its arguments.
pub fn run(args: &[String]) -> CmdResult {
    let _ = args;
    Err(CliError::new("info: not implemented yet"))
}
