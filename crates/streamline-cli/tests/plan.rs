//! `streamline plan` for the settings recorded in docs/memory.md, snapshotted.

use std::process::Command;

fn plan(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_streamline"))
        .arg("plan")
        .args(args)
        // Conv workspaces count one im2col tile per thread: pin the count so the snapshots
        // do not depend on the machine's cores.
        .env("RAYON_NUM_THREADS", "2")
        .output()
        .expect("the streamline binary runs");
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn snapshot(name: &str, args: &[&str]) {
    let (ok, stdout, stderr) = plan(args);
    assert!(ok, "streamline plan {args:?} failed: {stderr}");
    insta::assert_snapshot!(name, stdout);
}

#[test]
fn svd_576x1024x14_fp16_cfg() {
    let base = [
        "--model", "svd", "--height", "576", "--width", "1024", "--dtype", "f16",
    ];
    snapshot("svd_original", &base);
    snapshot(
        "svd_paper_7_7",
        &[
            &base[..],
            &["--temporal-chunks", "7", "--spatial-chunks", "7"],
        ]
        .concat(),
    );
    snapshot(
        "svd_budget_8gib",
        &[&base[..], &["--memory-budget", "8GiB"]].concat(),
    );
}

#[test]
fn svd_xt_576x1024x25_fp16_cfg() {
    let base = [
        "--model", "svd-xt", "--height", "576", "--width", "1024", "--dtype", "f16",
    ];
    snapshot("svd_xt_original", &base);
    snapshot(
        "svd_xt_paper_7_7",
        &[
            &base[..],
            &["--temporal-chunks", "7", "--spatial-chunks", "7"],
        ]
        .concat(),
    );
    snapshot(
        "svd_xt_budget_8gib",
        &[&base[..], &["--memory-budget", "8GiB"]].concat(),
    );
}

/// The paper's headline setting (AnimateDiff, 42 GB -> 11 GB) and SVD's frame size, 16 frames,
/// fp16, CFG; decode in one call of all 16 frames as diffusers' AnimateDiff pipeline does.
#[test]
fn animatediff_16_frames_fp16_cfg() {
    for (size, h, w) in [("512x512", "512", "512"), ("576x1024", "576", "1024")] {
        let base = [
            "--model",
            "animatediff",
            "--height",
            h,
            "--width",
            w,
            "--dtype",
            "f16",
            "--decode-chunk-size",
            "16",
        ];
        snapshot(&format!("animatediff_{size}_original"), &base);
        snapshot(
            &format!("animatediff_{size}_paper_7_7"),
            &[
                &base[..],
                &["--temporal-chunks", "7", "--spatial-chunks", "7"],
            ]
            .concat(),
        );
        snapshot(
            &format!("animatediff_{size}_budget_4gib"),
            &[&base[..], &["--memory-budget", "4GiB"]].concat(),
        );
    }
}

#[test]
fn bad_sizes_and_budgets_are_clear_errors() {
    let (ok, _, stderr) = plan(&["--height", "100"]);
    assert!(
        !ok && stderr.contains("--height 100") && stderr.contains("multiple of 64"),
        "{stderr}"
    );
    let (ok, _, stderr) = plan(&["--memory-budget", "1MiB"]);
    assert!(!ok && stderr.contains("smallest feasible"), "{stderr}");
    let (ok, _, stderr) = plan(&["--memory-budget", "lots"]);
    assert!(!ok && stderr.contains("lots"), "{stderr}");
    let (ok, _, stderr) = plan(&["--model", "/no/such/config.json"]);
    assert!(!ok && stderr.contains("/no/such/config.json"), "{stderr}");
}

fn plan_json(args: &[&str]) -> serde_json::Value {
    let (ok, stdout, stderr) = plan(&[args, &["--json"]].concat());
    assert!(ok, "streamline plan {args:?} failed: {stderr}");
    serde_json::from_str(&stdout).unwrap()
}

#[test]
fn rehash_plans_its_cache_point_and_the_loop_flops() {
    let svd = ["--model", "svd", "--dtype", "f16"];
    let off = plan_json(&svd);
    let at = |flag: &str| plan_json(&[&svd[..], &["--rehash", flag]].concat());
    let run = at("uniform:13@up_blocks.1");
    let rehash = &run["rehash"];
    assert_eq!(rehash["cache_point"], "up_blocks.1");
    let points = rehash["cache_points"].as_array().unwrap();
    assert_eq!(points.len(), 3, "SVD's UNet has three up-block boundaries");
    let u = |v: &serde_json::Value| v.as_u64().unwrap();
    // Deeper points cache smaller features and leave a partial step more to run.
    assert!(u(&points[0]["partial_flops"]) > u(&points[2]["partial_flops"]));
    assert_eq!(u(&points[1]["partial_flops"]), u(&rehash["partial_flops"]));
    let full = u(&run["calls"]["unet_step"]["flops"]);
    let denoise = &run["denoise_loop"];
    assert_eq!(u(&denoise["original_flops"]), 25 * full);
    assert_eq!(
        u(&denoise["flops"]),
        13 * full + 12 * u(&rehash["partial_flops"])
    );
    // The cache at up_blocks.1 is held through the denoise phase.
    let held = |r: &serde_json::Value| u(&r["phases"][1]["held"]);
    assert_eq!(held(&run) - held(&off), u(&points[1]["cache_bytes"]));
    let reuse = plan_json(&[&svd[..], &["--rehash", "uniform:13", "--reuse-guidance"]].concat());
    let partial = u(&reuse["rehash"]["partial_flops"]);
    assert_eq!(
        u(&reuse["denoise_loop"]["flops"]),
        13 * full + 12 * (partial / 2)
    );
    let (ok, _, stderr) = plan(&[&svd[..], &["--rehash", "auto:0.2@up_blocks.3"]].concat());
    assert!(
        !ok && stderr.contains("up_blocks.3") && stderr.contains("up_blocks.0 ..= up_blocks.2"),
        "{stderr}"
    );
}
