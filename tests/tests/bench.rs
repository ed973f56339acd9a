//! `img bench` takes qemu-img bench's command lines and prints its output.

mod common;

use common::{img, qemu_img, run};

/// The output with the measured time blanked out.
fn normalise(out: &[u8]) -> String {
    String::from_utf8_lossy(out)
        .lines()
        .map(|l| {
            if l.starts_with("Run completed in ") {
                "Run completed in N seconds.".to_string()
            } else {
                l.replace("qemu-img: ", "img: ")
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn output_and_errors_match_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("b.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        image.to_str().unwrap(),
        "16M",
    ]);
    let p = image.to_str().unwrap();
    let lines: &[&[&str]] = &[
        &["-c", "1000", "-d", "4"],
        &["-c", "100", "-s", "3000", "-o", "100"],
        &["-c", "100", "-d", "2", "-s", "1M", "-S", "40M"],
        &["-w", "-c", "500", "-d", "8", "--flush-interval=100"],
        &["-w", "-c", "500", "--pattern=7", "-S", "8k", "-o", "4k"],
        &["-w", "-c", "200", "--flush-interval=50", "--no-drain"],
        &[
            "-w",
            "-c",
            "200",
            "-d",
            "2",
            "--flush-interval=50",
            "--no-drain",
        ],
        &["-c", "100", "-t", "none"],
        &["-w", "-c", "100", "-t", "directsync", "-d", "1"],
        &["-c", "3", "-s", "0"],
        &["-c", "3", "-s", "x"],
        &["-c", "3", "-S", "x"],
        &["-c", "3", "-o", "x"],
        &["-c", "3", "-d", "x"],
        &["-c", "0"],
        &["-c", "x"],
        &["-d", "0", "-c", "3"],
        &["-w", "--pattern=300", "-c", "3"],
        &["-w", "--pattern=x", "-c", "3"],
        &["-w", "--flush-interval=x", "-c", "3"],
        &["--flush-interval=10", "-c", "3"],
        &["-t", "foo", "-c", "3"],
        &["-i", "foo", "-c", "3"],
        &["-n", "-c", "3"],
        &["-i", "native", "-c", "3"],
        &["-i", "native", "-t", "none", "-c", "30"],
        &["-i", "io_uring", "-c", "300", "-d", "8"],
    ];
    for args in lines {
        let mut a = vec!["bench"];
        a.extend(*args);
        a.push(p);
        let ours = img(&a);
        let theirs = run("qemu-img", &a);
        assert_eq!(
            ours.status.code(),
            theirs.status.code(),
            "exit code of {a:?}"
        );
        assert_eq!(
            normalise(&ours.stdout),
            normalise(&theirs.stdout),
            "stdout of {a:?}"
        );
        assert_eq!(
            normalise(&ours.stderr),
            normalise(&theirs.stderr),
            "stderr of {a:?}"
        );
    }
    // --image-opts, with cache options.
    let spec = format!("driver=qcow2,file.filename={p},l2-cache-size=64k,file.aio=threads");
    for extra in [&[][..], &["-w", "-c", "100"][..]] {
        let mut a = vec!["bench", "-c", "100", "--image-opts"];
        a.extend(extra);
        a.push(&spec);
        let ours = img(&a);
        let theirs = run("qemu-img", &a);
        assert_eq!(
            ours.status.code(),
            theirs.status.code(),
            "exit code of {a:?}"
        );
        assert_eq!(
            normalise(&ours.stdout),
            normalise(&theirs.stdout),
            "stdout of {a:?}"
        );
    }
    common::assert_qemu_check_clean(&image);
}

#[test]
fn writes_land_where_qemu_img_bench_puts_them() {
    // The same write pattern through both tools gives the same disk content.
    let dir = tempfile::tempdir().unwrap();
    let ours = dir.path().join("ours.qcow2");
    let theirs = dir.path().join("theirs.qcow2");
    for p in [&ours, &theirs] {
        qemu_img(&["create", "-q", "-f", "qcow2", p.to_str().unwrap(), "4M"]);
    }
    // 300 requests stay below the end: qemu 10.0 wraps modulo the image size (and can overrun
    // the end), qemu 10.1 and img modulo the size minus the request size.
    let args = [
        "-w",
        "-c",
        "300",
        "-d",
        "16",
        "-s",
        "4096",
        "-S",
        "12288",
        "-o",
        "8192",
        "--pattern=9",
    ];
    let mut a = vec!["bench"];
    a.extend(args);
    a.push(ours.to_str().unwrap());
    assert!(img(&a).status.success());
    let mut b = vec!["bench"];
    b.extend(args);
    b.push(theirs.to_str().unwrap());
    qemu_img(&b);
    common::assert_qemu_check_clean(&ours);
    common::assert_qemu_compare_identical(&ours, "qcow2", &theirs, "qcow2");
}
