//! `img bench`: qemu-img bench's request generator, with its options and output.
//!
//! `count` requests of `buffer size` bytes go out, `depth` at a time; each starts `step` bytes
//! after the previous one, wrapping around the image as qemu-img does. Requests run on
//! `depth` worker threads against one shared image, through the engine chosen with `-i`.

use crate::cvt::{self, NumError};
use crate::getopt::{opt, parse, OptSpec};
use crate::open::{open_with_aio, parse_cache, ImageSpec};
use crate::{CliError, CmdResult};
use blockdev::{Aio, AlignedBuf, CacheMode};
use img_core::Image;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

const SPECS: &[OptSpec] = &[
    opt(Some('h'), Some("help"), false),
    opt(Some('q'), Some("quiet"), false),
    opt(Some('f'), Some("format"), true),
    opt(None, Some("image-opts"), false),
    opt(Some('t'), Some("cache"), true),
    opt(Some('c'), Some("count"), true),
    opt(Some('s'), Some("buffer-size"), true),
    opt(Some('d'), Some("depth"), true),
    opt(Some('o'), Some("offset"), true),
    opt(Some('S'), Some("step-size"), true),
    opt(Some('i'), Some("aio"), true),
    opt(Some('n'), Some("native"), false),
    opt(Some('w'), Some("write"), false),
    opt(None, Some("pattern"), true),
    opt(None, Some("flush-interval"), true),
    opt(None, Some("no-drain"), false),
    opt(Some('U'), Some("force-share"), false),
];

const USAGE: &str = "Usage:
Run simple image benchmark.  Usage:

  img bench [-f FMT | --image-opts] [-t CACHE] [-c COUNT] [-d DEPTH]
        [-o OFFSET] [-s BUFFER_SIZE] [-S STEP_SIZE] [-i AIO] [-n]
        [-w [--pattern PATTERN] [--flush-interval INTERVAL [--no-drain]]]
";

/// What to run.
struct Bench {
    count: u64,
    depth: u64,
    bufsize: u64,
    offset: u64,
    step: Option<u64>,
    write: bool,
    pattern: u8,
    flush_interval: u64,
}

/// A number option in qemu's two error forms ("Invalid X specified: 'v'." and
/// "Invalid X specified. Must be between 1 and 2147483647.").
fn int_in_range(what: &str, v: &str, min: u64) -> Result<u64, CliError> {
    match cvt::parse_u64(v) {
        Ok(n) if (min..=i32::MAX as u64).contains(&n) => Ok(n),
        Ok(_) | Err(NumError::Range) => Err(CliError::new(format!(
            "Invalid {what} specified. Must be between {min} and 2147483647."
        ))),
        Err(NumError::Invalid) => Err(CliError::new(format!("Invalid {what} specified: '{v}'."))),
    }
}

fn size_in_range(what: &str, v: &str, min: u64, max: u64) -> Result<u64, CliError> {
    match cvt::parse_size(v) {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        Ok(_) | Err(NumError::Range) => Err(CliError::new(format!(
            "Invalid {what} specified. Must be between {min} and {max}."
        ))),
        Err(NumError::Invalid) => Err(CliError::new(format!("Invalid {what} specified: '{v}'."))),
    }
}

/// Runs `img bench` with its arguments.
pub fn run(args: &[String]) -> CmdResult {
    let (opts, pos) = parse(args, SPECS)?;
    let mut b = Bench {
        count: 75000,
        depth: 64,
        bufsize: 4096,
        offset: 0,
        step: None,
        write: false,
        pattern: 0,
        flush_interval: 0,
    };
    let mut format: Option<String> = None;
    let mut image_opts = false;
    let mut cache = CacheMode::Writeback;
    let mut aio = Aio::Threads;
    let mut pattern_given = false;
    let mut drain = true;
    let mut force_share = false;
    for o in &opts {
        let v = o.value.clone().unwrap_or_default();
        match o.name.as_str() {
            "help" => {
                print!("{USAGE}");
                return Ok(0);
            }
            "format" => format = Some(v),
            "image-opts" => image_opts = true,
            "cache" => {
                cache = parse_cache(&v).ok_or_else(|| CliError::new("Invalid cache mode"))?
            }
            "count" => b.count = int_in_range("request count", &v, 1)?,
            "depth" => b.depth = int_in_range("queue depth", &v, 1)?,
            "buffer-size" => b.bufsize = size_in_range("buffer size", &v, 1, i32::MAX as u64)?,
            "step-size" => b.step = Some(size_in_range("step size", &v, 0, i64::MAX as u64)?),
            "offset" => b.offset = size_in_range("offset", &v, 0, i64::MAX as u64)?,
            "aio" => {
                aio = Aio::parse(&v)
                    .ok_or_else(|| CliError::new(format!("Invalid aio option: {v}")))?
            }
            "native" => aio = Aio::Native,
            "write" => b.write = true,
            "pattern" => {
                pattern_given = true;
                b.pattern = match cvt::parse_u64(&v) {
                    Ok(n) if n <= 255 => n as u8,
                    Ok(_) | Err(NumError::Range) => {
                        return Err(CliError::new(
                            "Invalid pattern byte specified. Must be between 0 and 255.",
                        ))
                    }
                    Err(NumError::Invalid) => {
                        return Err(CliError::new(format!(
                            "Invalid pattern byte specified: '{v}'."
                        )))
                    }
                }
            }
            "flush-interval" => b.flush_interval = int_in_range("flush interval", &v, 0)?,
            "no-drain" => drain = false,
            "force-share" => force_share = true,
            // -q changes nothing here: the lines above are all bench prints, as qemu.
            _ => {}
        }
    }
    let _ = (pattern_given, drain);
    if b.flush_interval > 0 && !b.write {
        return Err(CliError::new(
            "--flush-interval is only available in write tests",
        ));
    }
    if b.flush_interval > 0 && b.flush_interval < b.depth {
        return Err(CliError::new("Flush interval can't be smaller than depth"));
    }
    let Some(filename) = pos.first() else {
        return Err(CliError::usage("Expecting one image file name"));
    };
    if let Some(extra) = pos.get(1) {
        return Err(CliError::usage(format!("Unexpected argument: {extra}")));
    }
    let spec = ImageSpec::from_args(filename, image_opts, format.as_deref())?
        .with_force_share(force_share);
    let img = open_with_aio(&spec, !b.write, cache, aio)?;
    let step = b.step.unwrap_or(b.bufsize);
    println!(
        "Sending {} {} requests, {} bytes each, {} in parallel (starting at offset {}, step size {})",
        b.count,
        if b.write { "write" } else { "read" },
        b.bufsize,
        b.depth,
        b.offset,
        step
    );
    if b.flush_interval > 0 {
        println!("Sending flush every {} requests", b.flush_interval);
    }
    let start = Instant::now();
    let result = b.run(&img, step);
    let elapsed = start.elapsed().as_secs_f64();
    if let Err(e) = result {
        let _ = img.close();
        return Err(CliError::new(format!("Failed request: {e}")));
    }
    img.close()?;
    println!("Run completed in {elapsed:.3} seconds.");
    Ok(0)
}

impl Bench {
    /// The offset of request `i`: each starts `step` after the previous one and wraps around
    /// the end of the image. The wrap is qemu 10.1's (modulo the size minus the request
    /// size), which never runs past the end; qemu 10.0 wraps modulo the whole size and fails
    /// requests that overrun.
    fn offset_of(&self, i: u64, step: u64, image_size: u64) -> u64 {
        // The first request uses the offset as given; each later one adds the step to the
        // previous offset and reduces it modulo `span`, which is the same as reducing
        // `offset + i * step` once.
        if i == 0 {
            return self.offset;
        }
        if image_size <= self.bufsize {
            return 0;
        }
        let span = (image_size - self.bufsize) as u128;
        ((self.offset as u128 + i as u128 * step as u128) % span) as u64
    }

    fn run(&self, img: &Image, step: u64) -> img_core::Result<()> {
        let next = AtomicU64::new(0);
        let failed = AtomicBool::new(false);
        let error: Mutex<Option<img_core::Error>> = Mutex::new(None);
        let size = img.size();
        let workers = self.depth.min(self.count);
        std::thread::scope(|scope| {
            for _ in 0..workers {
                scope.spawn(|| {
                    // Aligned buffers: with cache=none requests then need no bounce buffer.
                    let mut buf = AlignedBuf::zeroed(self.bufsize as usize, 4096);
                    buf.fill(self.pattern);
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= self.count || failed.load(Ordering::Relaxed) {
                            return;
                        }
                        let off = self.offset_of(i, step, size);
                        let r = if self.write {
                            img.write_at(&buf, off)
                        } else {
                            img.read_at(&mut buf, off)
                        }
                        .and_then(|_| {
                            // Flush after every `flush_interval` requests; the image's flush
                            // waits for the requests in flight (qemu's drain).
                            if self.flush_interval > 0
                                && (i + 1).is_multiple_of(self.flush_interval)
                            {
                                img.flush()
                            } else {
                                Ok(())
                            }
                        });
                        if let Err(e) = r {
                            failed.store(true, Ordering::Relaxed);
                            error
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .get_or_insert(e);
                            return;
                        }
                    }
                });
            }
        });
        match error.into_inner().unwrap_or_else(|e| e.into_inner()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}
