//! `img`: a disk image tool that accepts qemu-img's command lines and prints its output.

mod commands;
mod cvt;
mod daemon;
mod getopt;
mod human;
mod open;
mod options;
mod progress;
mod qcow2_bitmaps;
mod qjson;

use std::process::ExitCode;

/// A command's failure: a message for stderr and the exit code qemu-img would use.
#[derive(Debug)]
pub struct CliError {
    /// The message, printed as `img: <message>`.
    pub message: String,
    /// Process exit code.
    pub code: u8,
    /// Whether to suggest `img <command> --help` (usage errors).
    pub usage: bool,
    /// An option-parsing error, printed as `img <command>: <message>` the way getopt reports
    /// bad options.
    pub option: bool,
}

impl CliError {
    /// A runtime failure (exit code 1).
    pub fn new(message: impl Into<String>) -> Self {
        CliError {
            message: message.into(),
            code: 1,
            usage: false,
            option: false,
        }
    }

    /// A failure with a specific exit code.
    pub fn with_code(message: impl Into<String>, code: u8) -> Self {
        CliError {
            message: message.into(),
            code,
            usage: false,
            option: false,
        }
    }

    /// A usage error (exit code 1, with a hint).
    pub fn usage(message: impl Into<String>) -> Self {
        CliError {
            message: message.into(),
            code: 1,
            usage: true,
            option: false,
        }
    }

    /// A bad option or option argument found while parsing the command line (exit code 1,
    /// with a hint).
    pub fn option(message: impl Into<String>) -> Self {
        CliError {
            message: message.into(),
            code: 1,
            usage: true,
            option: true,
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

/// Raises the soft limit on open files to the hard limit: each image of a backing chain holds
/// one file open, and a deep chain would otherwise stop at the common soft limit of 1024.
fn raise_open_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct we pass, which lives for
    // both calls.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

fn main() -> ExitCode {
    raise_open_file_limit();
    let args: Vec<String> = std::env::args().collect();
    let code = match commands::dispatch(&args[1..]) {
        Ok(code) => code,
        Err(e) => {
            // As qemu-img: hints name the subcommand when there is one.
            let prog = match args.get(1).filter(|c| commands::is_command(c)) {
                Some(cmd) => format!("img {cmd}"),
                None => "img".to_string(),
            };
            if e.option {
                eprintln!("{prog}: {}", e.message);
            } else {
                eprintln!("img: {}", e.message);
            }
            if e.usage {
                eprintln!("Try '{prog} --help' for more info");
            }
            e.code
        }
    };
    ExitCode::from(code)
}
