//! qemu-img's progress line, shared by the commands that show one (`-p`).

use std::io::Write;

/// qemu-img's progress line: printed when it moved by more than two percent, and at 0 and
/// 100%. The arithmetic is single precision, as qemu's, so the same steps print the same
/// numbers.
pub struct Progress {
    enabled: bool,
    current: f32,
    last_print: f32,
}

impl Progress {
    const MIN_SKIP: f32 = 2.0;

    /// A progress line, printed only when `enabled`.
    pub fn new(enabled: bool) -> Self {
        Progress {
            enabled,
            current: 0.0,
            last_print: 0.0,
        }
    }

    /// Adds `delta` percent of the job.
    pub fn advance(&mut self, delta: f32) {
        let current = (self.current + delta / 100.0 * 100.0).min(100.0);
        self.current = current;
        if current > self.last_print + Self::MIN_SKIP || current == 100.0 || current == 0.0 {
            self.last_print = current;
            if self.enabled {
                print!("    ({:3.2}/100%)\r", current);
                let _ = std::io::stdout().flush();
            }
        }
    }

    /// Ends the line.
    pub fn end(&self) {
        if self.enabled {
            println!();
        }
    }

    /// Reports `done` of `total` bytes (as a share of the whole job).
    pub fn bytes(&mut self, done: u64, total: u64) {
        let target = if total == 0 {
            100.0
        } else {
            (done as f32 / total as f32) * 100.0
        };
        self.advance(target - self.current);
    }
}
