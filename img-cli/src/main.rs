//! `img`: a disk image tool that accepts qemu-img's command lines and prints its output.

mod commands;
mod getopt;
mod options;

use std::process::ExitCode;

/// A command's failure: a message for stderr and the exit code qemu-img would use.
#[derive(Debug)]
pub struct CliError {
    /// The message, printed as `img: <message>`.
    pub message: String,
    /// Process exit code.
    pub code: u8,
    /// Whether to suggest `img --help` (usage errors).
    pub usage: bool,
}

impl CliError {
    /// A runtime failure (exit code 1).
    pub fn new(message: impl Into<String>) -> Self {
        CliError {
            message: message.into(),
            code: 1,
            usage: false,
        }
    }

    /// A failure with a specific exit code.
    pub fn with_code(message: impl Into<String>, code: u8) -> Self {
        CliError {
            message: message.into(),
            code,
            usage: false,
        }
    }

    /// A usage error (exit code 1, with a hint).
    pub fn usage(message: impl Into<String>) -> Self {
        CliError {
            message: message.into(),
            code: 1,
            usage: true,
        }
    }
}

impl From<img_core::Error> for CliError {
    fn from(e: img_core::Error) -> Self {
        CliError::new(e.to_string())
    }
}

impl From<blockdev::Error> for CliError {
    fn from(e: blockdev::Error) -> Self {
        CliError::new(e.to_string())
    }
}

/// What a command returns: its exit code on success.
pub type CmdResult = Result<u8, CliError>;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let code = match commands::dispatch(&args[1..]) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("img: {}", e.message);
            if e.usage {
                eprintln!("Try 'img --help' for more information");
            }
            e.code
        }
    };
    ExitCode::from(code)
}
