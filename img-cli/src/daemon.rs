//! The `daemon` crate's helpers, with its errors as the CLI reports them.

use crate::CliError;
pub use daemon::{block_stop_signals, detach_stdio, on_stop_signal, PidFile, Readiness};

/// [`daemon::fork_when_ready`].
pub fn fork_when_ready(background: bool) -> Result<Readiness, CliError> {
    daemon::fork_when_ready(background).map_err(|e| CliError::new(e.to_string()))
}

/// [`PidFile::create`]: a pid file at `path`, removed when dropped.
pub fn pid_file(path: &str) -> Result<PidFile, CliError> {
    PidFile::create(path).map_err(|e| CliError::new(e.to_string()))
}
