//! The subcommands, one module each, and the dispatcher.

mod amend;
mod bench;
mod check;
pub(crate) mod check_vmdk;
mod commit;
mod compare;
mod convert;
pub(crate) mod create;
pub(crate) mod create_vmdk;
mod info;
mod map;
mod measure;
mod mount;
mod nbd;
mod partitions;
mod rebase;
mod resize;
mod serve;
pub(crate) mod snapshot;

use crate::{CliError, CmdResult};

/// The subcommands, as they are named on the command line.
const COMMANDS: &[&str] = &[
    "amend", "check", "commit", "compare", "convert", "create", "info", "map", "measure", "rebase",
    "resize", "snapshot",
];

/// The commands that serve or export images, and the partition lister.
const EXPORT_COMMANDS: &[&str] = &["mount", "unmount", "partitions", "serve", "nbd"];

/// Whether `name` is a subcommand (error hints then name it).
pub fn is_command(name: &str) -> bool {
    COMMANDS.contains(&name) || EXPORT_COMMANDS.contains(&name)
}

/// Runs the subcommand named by `args[0]`.
pub fn dispatch(args: &[String]) -> CmdResult {
    let Some(cmd) = args.first() else {
        return Err(CliError::usage("Not enough arguments"));
    };
    let rest = &args[1..];
    match cmd.as_str() {
        "amend" => amend::run(rest),
        "create" => create::run(rest),
        "info" => info::run(rest),
        "bench" => bench::run(rest),
        "check" => check::run(rest),
        "convert" => convert::run(rest),
        "compare" => compare::run(rest),
        "map" => map::run(rest),
        "commit" => commit::run(rest),
        "rebase" => rebase::run(rest),
        "measure" => measure::run(rest),
        "nbd" => nbd::run(rest),
        "resize" => resize::run(rest),
        "serve" => serve::run(rest),
        "snapshot" => snapshot::run(rest),
        "mount" => mount::run(rest),
        "unmount" => mount::run_unmount(rest),
        "partitions" => partitions::run(rest),
        "-h" | "--help" | "help" => {
            print_help();
            Ok(0)
        }
        "-V" | "--version" => {
            println!("img version {}", env!("CARGO_PKG_VERSION"));
            Ok(0)
        }
        other => Err(CliError::usage(format!("Command not found: {other}"))),
    }
}

fn print_help() {
    println!(
        "img version {} - a qemu-img compatible disk image utility\n\
         usage: img [standard options] command [command options]\n\n\
         Command syntax:\n  \
         amend [--object objectdef] [--image-opts] [-p] [-q] [-f fmt] [-t cache] [--force] -o options filename\n  \
         check [-q] [-f fmt] [--output=ofmt] [-r [leaks | all]] [-U] filename\n  \
         commit [-q] [-f fmt] [-t cache] [-b base] [-r rate_limit] [-d] [-p] filename\n  \
         compare [-f fmt] [-F fmt] [-T src_cache] [-p] [-q] [-s] [-U] filename1 filename2\n  \
         convert [-c] [-p] [-q] [-n] [-f fmt] [-t cache] [-T src_cache] [-O output_fmt] [-o options] [-S sparse_size] [-U] filename [filename2 [...]] output_filename\n  \
         create [-q] [-f fmt] [-o options] filename [size]\n  \
         info [-f fmt] [--output=ofmt] [-U] [--backing-chain] filename\n  \
         nbd [-p port] [-b addr] [-k socket] [-x name] [-e shared] [-t] [-r] [-f fmt] [--fork] [--pid-file=file] filename
  \
         rebase [-f fmt] [-t cache] [-T src_cache] [-p] [-u] [-c] -b backing_file [-F backing_fmt] filename\n  \
         map [-f fmt] [--output=ofmt] [--start-offset=offset] [--max-length=len] [-U] filename\n  \
         measure [--output=ofmt] [-O output_fmt] [-o options] [--size N | [--object objectdef] [--image-opts] [-f fmt] [-l snapshot_param] filename]\n  \
         resize [--object objectdef] [--image-opts] [-f fmt] [--preallocation=prealloc] [-q] [--shrink] filename [+ | -]size\n  \
         snapshot [--object objectdef] [--image-opts] [-U] [-q] [-l | -a snapshot | -c snapshot | -d snapshot] [-f fmt] filename\n  \
         mount [--image-opts | -f fmt] [-r] [--foreground] [-t cache] [-o options] filename mountpoint\n  \
         unmount mountpoint\n  \
         partitions [-f fmt] [--image-opts] [--output=ofmt] [-U] filename\n  \
         serve --vhost-user-blk socket [--image-opts] [-f fmt] [--readonly] [--num-queues N] [-t cache] [--aio aio] [--pidfile file] [--daemonize] filename\n",
        env!("CARGO_PKG_VERSION")
    );
}
