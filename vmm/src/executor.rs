//! Worker threads that run device requests, so that many are in flight at once.
//!
//! The engine's calls block until their I/O completes (on the io_uring or thread-pool file
//! engine underneath), so concurrency comes from running requests on several threads. Queues
//! hand requests over and return at once; completions are published by the worker.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

type Job = Box<dyn FnOnce() + Send + 'static>;

/// A fixed pool of worker threads.
pub struct Executor {
    sender: Mutex<Option<Sender<Job>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for Executor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executor").finish_non_exhaustive()
    }
}

impl Executor {
    /// Starts `workers` threads (at least one), named after `name`.
    pub fn new(name: &str, workers: usize) -> std::io::Result<Self> {
        let (sender, receiver) = channel::<Job>();
        let receiver = Arc::new(Mutex::new(receiver));
        let mut threads = Vec::new();
        for i in 0..workers.max(1) {
            let receiver = Arc::clone(&receiver);
            threads.push(
                std::thread::Builder::new()
                    .name(format!("{name}-{i}"))
                    .spawn(move || work(&receiver))?,
            );
        }
        Ok(Executor {
            sender: Mutex::new(Some(sender)),
            threads: Mutex::new(threads),
        })
    }

    /// Runs `job` on a worker. After [`Executor::shutdown`] the job runs on the caller's
    /// thread, so that nothing submitted is ever lost.
    pub fn submit(&self, job: impl FnOnce() + Send + 'static) {
        let job: Job = Box::new(job);
        let rejected = match self
            .sender
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            Some(s) => s.send(job).err().map(|e| e.0),
            None => Some(job),
        };
        if let Some(job) = rejected {
            job();
        }
    }

    /// Lets the workers finish what was submitted, then joins them.
    pub fn shutdown(&self) {
        self.sender.lock().unwrap_or_else(|e| e.into_inner()).take();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        for t in threads {
            let _ = t.join();
        }
    }
}

impl Drop for Executor {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn work(receiver: &Mutex<Receiver<Job>>) {
    loop {
        let job = receiver.lock().unwrap_or_else(|e| e.into_inner()).recv();
        match job {
            Ok(job) => job(),
            Err(_) => return,
        }
    }
}

/// Counts the requests of one queue still in flight, so that stopping the queue can wait
/// until the last one has been published.
#[derive(Debug, Default)]
pub struct InFlight {
    count: Mutex<usize>,
    idle: Condvar,
}

impl InFlight {
    /// One more request in flight.
    pub fn start(&self) {
        *self.count.lock().unwrap_or_else(|e| e.into_inner()) += 1;
    }

    /// One request done.
    pub fn finish(&self) {
        let mut c = self.count.lock().unwrap_or_else(|e| e.into_inner());
        *c = c.saturating_sub(1);
        if *c == 0 {
            self.idle.notify_all();
        }
    }

    /// Blocks until no request is in flight.
    pub fn wait_idle(&self) {
        let mut c = self.count.lock().unwrap_or_else(|e| e.into_inner());
        while *c > 0 {
            c = self.idle.wait(c).unwrap_or_else(|e| e.into_inner());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn every_job_runs_and_waiting_sees_them_done() {
        let ex = Executor::new("t", 4).unwrap();
        let done = Arc::new(AtomicUsize::new(0));
        let inflight = Arc::new(InFlight::default());
        for _ in 0..200 {
            let (d, f) = (Arc::clone(&done), Arc::clone(&inflight));
            f.start();
            ex.submit(move || {
                std::thread::yield_now();
                d.fetch_add(1, Ordering::SeqCst);
                f.finish();
            });
        }
        inflight.wait_idle();
        assert_eq!(done.load(Ordering::SeqCst), 200);
        ex.shutdown();
        let d = Arc::clone(&done);
        ex.submit(move || {
            d.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(
            done.load(Ordering::SeqCst),
            201,
            "a job after shutdown runs inline"
        );
    }
}
