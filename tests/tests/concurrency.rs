//! Many requests in flight against one image: threads that write disjoint bytes of the same
//! clusters race to allocate them; nothing may be lost, and the image must stay consistent.

mod common;

use img_core::qcow2::{self, Qcow2CreateOptions};
use img_core::{open_image, Image, OpenOptions};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use std::sync::Mutex;

const STRIPE: u64 = 1024;

/// Thread `t` of `n` owns the bytes of every stripe `s` with `s % n == t`; its writes stay
/// inside one of its stripes, so the result is deterministic while clusters are shared.
fn hammer(img: &Image, model: &Mutex<Vec<u8>>, threads: u64, ops: usize, seed: u64) {
    let size = img.size();
    std::thread::scope(|scope| {
        for t in 0..threads {
            scope.spawn(move || {
                let mut rng = StdRng::seed_from_u64(seed * 1000 + t);
                let stripes = size / STRIPE;
                for i in 0..ops {
                    let stripe = rng.random_range(0..stripes / threads) * threads + t;
                    let start = stripe * STRIPE + rng.random_range(0..STRIPE - 1);
                    let len = rng.random_range(1..=(stripe + 1) * STRIPE - start);
                    let mut data = vec![0u8; len as usize];
                    if i % 7 == 3 {
                        img.write_zeroes(start, len, i % 2 == 0).unwrap();
                    } else {
                        rng.fill_bytes(&mut data);
                        img.write_at(&data, start).unwrap();
                    }
                    model.lock().unwrap()[start as usize..(start + len) as usize]
                        .copy_from_slice(&data);
                    if i % 50 == 49 {
                        img.flush().unwrap();
                    }
                    // Reads of our own bytes see our writes.
                    let mut back = vec![0u8; len as usize];
                    img.read_at(&mut back, start).unwrap();
                    assert!(
                        back == data,
                        "thread {t}: read-back mismatch at {start}+{len}"
                    );
                }
            });
        }
    });
}

#[test]
fn racing_allocations_lose_nothing() {
    for (cluster_size, refcount_bits, version) in
        [(65536, 16, 3), (4096, 1, 3), (512, 64, 3), (65536, 16, 2)]
    {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.qcow2");
        let size = 8u64 << 20;
        qcow2::create(
            &path,
            &Qcow2CreateOptions {
                size,
                cluster_size,
                refcount_bits,
                version,
                ..Default::default()
            },
        )
        .unwrap();
        let img = open_image(&path, &OpenOptions::default()).unwrap();
        let model = Mutex::new(vec![0u8; size as usize]);
        hammer(&img, &model, 8, 300, cluster_size);
        img.close().unwrap();
        common::assert_qemu_check_clean(&path);
        let raw = dir.path().join("model.raw");
        std::fs::write(&raw, &*model.lock().unwrap()).unwrap();
        common::assert_qemu_compare_identical(&raw, "raw", &path, "qcow2");
    }
}

#[test]
fn raw_images_take_concurrent_writes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.raw");
    let size = 4u64 << 20;
    img_core::raw::create(
        &path,
        &img_core::raw::RawCreateOptions {
            size,
            ..Default::default()
        },
    )
    .unwrap();
    let img = open_image(&path, &OpenOptions::default()).unwrap();
    let model = Mutex::new(vec![0u8; size as usize]);
    hammer(&img, &model, 8, 300, 7);
    img.close().unwrap();
    assert!(std::fs::read(&path).unwrap() == *model.lock().unwrap());
}
