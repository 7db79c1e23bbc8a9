//! `cargo xtask train-default`: retrain the built-in default model and check it.
//!
//! The committed model in models/default is the output of training/train.py as committed.
//! Training is deterministic (two quick-scale runs gave identical files), so a retrain on the
//! same CPU and torch build should reproduce it byte for byte; elsewhere float rounding may
//! differ, which is why the verdict that matters is the motion test run on the result.

use std::fs;
use std::process::Command;

use anyhow::Result;

use crate::{compare_trees, files, python_cmd, root, run, venv};

pub fn train_default(quick: bool, install: bool) -> Result<()> {
    let root = root();
    let py = venv(&root)?;
    let out = root.join("target/default-model");
    if out.exists() {
        fs::remove_dir_all(&out)?;
    }
    let mut train = python_cmd(&py, &root.join("training/train.py"));
    train.arg(&out);
    if quick {
        train.args(["--scale", "quick"]);
    }
    run(&mut train)?;
    run(python_cmd(&py, &root.join("training/examples.py")).arg(out.join("examples")))?;
    let model = out.join("model");
    if quick {
        eprintln!(
            "xtask: smoke run written to {} (not trained enough for the motion test)",
            model.display()
        );
        return Ok(());
    }
    eprintln!("xtask: motion test on the retrained model");
    run(Command::new(env!("CARGO"))
        .current_dir(&root)
        .args([
            "test",
            "-p",
            "streamline-pipeline",
            "--test",
            "default_model",
            "--",
            "--include-ignored",
            "--nocapture",
        ])
        .env("STREAMLINE_DEFAULT_MODEL", &model))?;
    let committed = root.join("models/default");
    if committed.exists() {
        let differ = compare_trees(&model, &committed)?;
        if differ.is_empty() {
            eprintln!("xtask: the retrained model equals models/default byte for byte");
        } else {
            eprintln!(
                "xtask: the retrained model passes the test but differs from models/default:\n  {}",
                differ.join("\n  ")
            );
        }
    }
    if install {
        for (from, to) in [
            (model, committed),
            (out.join("examples"), root.join("examples")),
        ] {
            if to.exists() {
                fs::remove_dir_all(&to)?;
            }
            for f in files(&from)? {
                fs::create_dir_all(to.join(&f).parent().expect("a file has a parent"))?;
                fs::copy(from.join(&f), to.join(&f))?;
            }
            eprintln!("xtask: installed {}", to.display());
        }
    }
    Ok(())
}
