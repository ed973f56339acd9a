//! `img convert`.

use crate::{CliError, CmdResult};

/// Runs `img convert` with its arguments.
pub fn run(args: &[String]) -> CmdResult {
    let _ = args;
    Err(CliError::new("convert: not implemented yet"))
}
