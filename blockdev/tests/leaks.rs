//! Opening and dropping many files leaves no threads or descriptors behind. Alone in its test
//! binary, so that no other test's threads come and go meanwhile.

mod common;

use blockdev::{Aio, CacheMode, Storage};

#[test]
fn no_thread_or_descriptor_leaks() {
    let dir = common::tempdir();
    let path = common::file(&dir, "leak.img");
    std::fs::write(&path, vec![1u8; 8192]).unwrap();
    // Warm up whatever the process sets up once.
    drop(common::open(&path, Aio::IoUring, CacheMode::None, None));
    let threads = common::thread_count();
    let fds = common::fd_count();
    for i in 0..200u64 {
        let aio = [Aio::Threads, Aio::IoUring, Aio::Native][i as usize % 3];
        let cache = if i % 2 == 0 {
            CacheMode::None
        } else {
            CacheMode::Directsync
        };
        let engine = blockdev::EngineOptions {
            queue_depth: 1 + i as u32 % 64,
            // Every fifth io_uring also has a kernel thread polling its queue.
            sqpoll: i % 5 == 1,
        };
        let s = common::open_engine(&path, aio, cache, engine);
        if i % 4 != 0 {
            // Requests from other threads too: io_uring's worker threads belong to the
            // submitting threads and must go when the ring does.
            std::thread::scope(|scope| {
                for t in 0..2u64 {
                    let s = &s;
                    scope.spawn(move || {
                        let mut b = blockdev::AlignedBuf::zeroed(4096, 4096);
                        s.read_at(&mut b, 4096 * t).unwrap();
                        s.write_at(&b[..100], 4096 * t + 7).unwrap();
                        s.flush().unwrap();
                    });
                }
            });
        }
        drop(s);
    }
    // io_uring worker and SQPOLL threads exit asynchronously after their ring is gone; give them a moment.
    let mut now = common::thread_count();
    for _ in 0..200 {
        if now <= threads {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
        now = common::thread_count();
    }
    assert_eq!(now, threads, "threads before and after");
    assert_eq!(common::fd_count(), fds, "descriptors before and after");
}
