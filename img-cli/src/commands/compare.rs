//! `img compare`.

use crate::{CliError, CmdResult};

/// Runs `img compare` with its arguments.
pub fn run(args: &[String]) -> CmdResult {
    let _ = args;
    Err(CliError::new("compare: not implemented yet"))
}
