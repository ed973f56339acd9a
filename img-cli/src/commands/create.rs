//! `img create`.

use crate::{CliError, CmdResult};

/// Runs `img create` with its arguments.
pub fn run(args: &[String]) -> CmdResult {
    let _ = args;
    Err(CliError::new("create: not implemented yet"))
}
