//! Images this version cannot handle fail with a clear error, never with wrong data.

mod common;

use common::{img, qemu_img};
use img_core::{open_image, OpenOptions};
use std::path::Path;

fn stderr_of(args: &[&str]) -> (Option<i32>, String) {
    let out = img(args);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Every command that reads the image refuses it with `says` in the message.
fn refused_everywhere(image: &Path, says: &str) {
    let p = image.to_str().unwrap();
    let out = image.with_extension("out");
    for args in [
        vec!["info", p],
        vec!["convert", "-O", "raw", p, out.to_str().unwrap()],
        vec!["compare", p, p],
    ] {
        let (code, err) = stderr_of(&args);
        assert_ne!(code, Some(0), "{args:?} succeeded");
        assert!(err.starts_with("img: "), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: expected '{says}' in: {err}");
        assert!(
            err.contains(image.file_name().unwrap().to_str().unwrap()),
            "{args:?}: {err}"
        );
    }
    for read_only in [true, false] {
        let e = open_image(
            image,
            &OpenOptions {
                read_only,
                ..Default::default()
            },
        )
        .expect_err("opened an image it cannot read");
        assert!(e.to_string().contains(says), "{e}");
    }
}

#[test]
fn extended_l2_and_encryption_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let x = d.join("extl2.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on",
        x.to_str().unwrap(),
        "64M",
    ]);
    refused_everywhere(&x, "extended L2 entries");

    let e = d.join("luks.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        "secret,id=sec0,data=123456",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
        e.to_str().unwrap(),
        "64M",
    ]);
    refused_everywhere(&e, "encrypted images");
}

#[test]
fn corrupt_images_are_readable_but_never_written() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("c.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        image.to_str().unwrap(),
        "16M",
    ]);
    common::qemu_io("qcow2", &image, &["write -P 5 0 64k".to_string()]);
    // Set the corrupt bit (incompatible feature bit 1).
    let mut b = std::fs::read(&image).unwrap();
    b[79] |= 2;
    std::fs::write(&image, &b).unwrap();

    let e =
        open_image(&image, &OpenOptions::default()).expect_err("opened a corrupt image read-write");
    assert!(e.to_string().contains("corrupt"), "{e}");
    let ro = open_image(
        &image,
        &OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    let mut buf = vec![0u8; 65536];
    ro.read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&x| x == 5));
    drop(ro);
    assert_eq!(
        std::fs::read(&image).unwrap(),
        b,
        "a read-only open changed the file"
    );

    // Converting from it works; converting into it (-n) is refused.
    let out = dir.path().join("out.raw");
    let (code, err) = stderr_of(&[
        "convert",
        "-O",
        "raw",
        image.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{err}");
    let src = dir.path().join("src.raw");
    std::fs::write(&src, vec![1u8; 16 << 20]).unwrap();
    let (code, err) = stderr_of(&[
        "convert",
        "-n",
        "-O",
        "qcow2",
        src.to_str().unwrap(),
        image.to_str().unwrap(),
    ]);
    assert_ne!(code, Some(0));
    assert!(err.contains("corrupt"), "{err}");
    assert_eq!(
        std::fs::read(&image).unwrap(),
        b,
        "a refused open changed the file"
    );
}

#[test]
fn metadata_found_corrupt_while_writing_marks_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("m.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        image.to_str().unwrap(),
        "16M",
    ]);
    common::qemu_io("qcow2", &image, &["write -P 5 0 64k".to_string()]);
    // Make the first L1 entry unaligned (L1 at 0x30000 in a fresh 64k-cluster image).
    let mut b = std::fs::read(&image).unwrap();
    b[0x30000 + 6] |= 0x02;
    std::fs::write(&image, &b).unwrap();
    let img_rw = open_image(&image, &OpenOptions::default()).unwrap();
    let e = img_rw
        .write_at(&[1u8; 512], 0)
        .expect_err("wrote through a broken L1 entry");
    assert!(e.to_string().contains("not cluster aligned"), "{e}");
    drop(img_rw);
    let after = std::fs::read(&image).unwrap();
    assert_ne!(after[79] & 2, 0, "the corrupt bit was not set");
    let info = qemu_img(&["info", image.to_str().unwrap()]);
    assert!(info.contains("corrupt: true"), "{info}");
}
