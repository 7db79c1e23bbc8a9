//! SVD's image encoder against transformers' `CLIPVisionModelWithProjection` (the tiny fixture
//! of fixtures/scripts/svd_clip.py), the full-size ViT-H/14 checkpoint layout (manifest), and
//! the errors a broken checkpoint or config gives.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor};
use serde::Deserialize;
use streamline_ir::testing::rel_l2;
use streamline_models::clip::{ClipVisionConfig, ClipVisionModelWithProjection, HiddenAct};
use streamline_models::load::{Manifest, ModelError, WeightSource};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/data")
}

fn encoder_dir() -> PathBuf {
    fixtures().join("svd_clip/image_encoder")
}

/// `(pixel_values, image_embeds)` as transformers computed them in f32.
fn io() -> candle_core::Result<(Tensor, Tensor)> {
    let mut t =
        candle_core::safetensors::load(fixtures().join("svd_clip/io.safetensors"), &Device::Cpu)?;
    let mut take = |name: &str| {
        t.remove(name)
            .ok_or_else(|| candle_core::Error::Msg(format!("io.safetensors has no `{name}`")))
    };
    Ok((take("pixel_values")?, take("image_embeds")?))
}

fn embeds(dir: &Path, dtype: DType) -> Result<f64, Box<dyn std::error::Error>> {
    let (pixel_values, expected) = io()?;
    let model = ClipVisionModelWithProjection::load(dir, dtype, &Device::Cpu)?;
    let got = model.forward(&pixel_values)?;
    assert_eq!(got.dims(), expected.dims());
    assert_eq!(got.dtype(), dtype);
    Ok(rel_l2(&got, &expected))
}

#[test]
fn matches_transformers_in_f32() -> TestResult {
    let err = embeds(&encoder_dir(), DType::F32)?;
    eprintln!("image_embeds relative L2 vs transformers (f32): {err:e}");
    assert!(err <= 1e-4, "relative L2 {err:e} > 1e-4");
    Ok(())
}

/// Only `gelu` is in the fixture; the other names CLIP checkpoints use are checked here against
/// transformers' `ACT2FN` (values printed by torch in f64).
#[test]
fn activations_match_transformers() -> TestResult {
    let x = Tensor::new(&[-3.0f32, -1.0, -0.25, 0.5, 2.0], &Device::Cpu)?;
    let erf = [
        -0.0040496941,
        -0.1586552539,
        -0.1003234186,
        0.3457312306,
        1.9544997361,
    ];
    let tanh = [
        -0.0036373921,
        -0.1588080094,
        -0.1003246493,
        0.3457140098,
        1.9545976941,
    ];
    let quick = [
        -0.0180713097,
        -0.1542042341,
        -0.0988003501,
        0.3503884366,
        1.9356586231,
    ];
    for (name, want) in [
        ("gelu", erf),
        ("gelu_new", tanh),
        ("gelu_pytorch_tanh", tanh),
        ("quick_gelu", quick),
    ] {
        let act = HiddenAct::from_name(name).ok_or(name)?;
        let got = act.forward(&x)?.to_vec1::<f32>()?;
        for (g, w) in got.iter().zip(want) {
            assert!(
                (f64::from(*g) - w).abs() < 1e-6,
                "{name}: {got:?} vs {want:?}"
            );
        }
    }
    assert_eq!(HiddenAct::from_name("relu"), None);
    Ok(())
}

/// f16 compute, with the attention softmax in f32. (bf16 takes the same path, but candle's CPU
/// matmul has no bf16 kernel, so it can only run on CUDA or Metal.)
#[test]
fn f16_compute_stays_close() -> TestResult {
    let err = embeds(&encoder_dir(), DType::F16)?;
    eprintln!("image_embeds relative L2 vs transformers (f16 compute): {err:e}");
    assert!(err <= 5e-3, "relative L2 {err:e} > 5e-3");
    Ok(())
}

#[test]
fn fp16_variant_loads_as_f32() -> TestResult {
    let dir = fixtures().join("svd_clip/image_encoder_fp16");
    assert!(dir.join("model.fp16.safetensors").is_file());
    assert!(!dir.join("model.safetensors").exists());
    let err = embeds(&dir, DType::F32)?;
    eprintln!("image_embeds relative L2, fp16 weights in f32 vs transformers: {err:e}");
    assert!(err <= 1e-2, "relative L2 {err:e} > 1e-2");
    Ok(())
}

#[test]
fn fixture_checkpoint_is_used_exactly() -> TestResult {
    let config = ClipVisionConfig::load(&encoder_dir().join("config.json"))?;
    let source = WeightSource::open(&encoder_dir().join("model.safetensors"))?;
    let held = source.tensors()?;
    let usage = source.usage();
    ClipVisionModelWithProjection::new(&config, source.var_builder(DType::F32, &Device::Cpu))?;
    assert_eq!(usage.requested(), held);
    Ok(())
}

/// fixtures/data/manifests/svd_image_encoder.json, written from the full-size model on torch's
/// meta device.
#[derive(Deserialize)]
struct ManifestFile {
    config: ClipVisionConfig,
    tensors: Manifest,
}

#[test]
fn full_size_checkpoint_layout_matches_manifest() -> TestResult {
    let path = fixtures().join("manifests/svd_image_encoder.json");
    let text = std::fs::read_to_string(&path).map_err(|e| {
        format!(
            "{}: {e} (made by fixtures/scripts/svd_manifests.py)",
            path.display()
        )
    })?;
    let ManifestFile { config, tensors } = serde_json::from_str(&text)?;
    assert_eq!(
        (
            config.hidden_size,
            config.num_hidden_layers,
            config.num_attention_heads,
            config.intermediate_size,
            config.projection_dim,
            config.patch_size,
            config.image_size,
            config.hidden_act.as_str(),
        ),
        (1280, 32, 16, 5120, 1024, 14, 224, "gelu"),
        "not SVD's ViT-H/14"
    );
    let source = WeightSource::manifest(&path, tensors.clone());
    let usage = source.usage();
    ClipVisionModelWithProjection::new(&config, source.var_builder(DType::F16, &Device::Cpu))?;
    let requested = usage.requested();
    let missing: Vec<_> = requested
        .keys()
        .filter(|n| !tensors.contains_key(*n))
        .collect();
    let unused: Vec<_> = tensors
        .keys()
        .filter(|n| !requested.contains_key(*n))
        .collect();
    assert!(
        missing.is_empty(),
        "requested, not in the checkpoint: {missing:?}"
    );
    assert!(
        unused.is_empty(),
        "in the checkpoint, never requested: {unused:?}"
    );
    assert_eq!(requested, tensors);
    Ok(())
}

/// A scratch copy of the fixture's image_encoder folder, unique to this test and process.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> std::io::Result<Self> {
        let dir =
            std::env::temp_dir().join(format!("streamline-clip-{}-{name}", std::process::id()));
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        std::fs::create_dir_all(&dir)?;
        std::fs::copy(encoder_dir().join("config.json"), dir.join("config.json"))?;
        std::fs::copy(
            encoder_dir().join("model.safetensors"),
            dir.join("model.safetensors"),
        )?;
        Ok(Self(dir))
    }

    fn weights(&self) -> PathBuf {
        self.0.join("model.safetensors")
    }

    /// Rewrite the weights with `edit` applied to the fixture's tensors.
    fn edit_weights(
        &self,
        edit: impl FnOnce(&mut HashMap<String, Tensor>) -> candle_core::Result<()>,
    ) -> candle_core::Result<()> {
        let mut tensors =
            candle_core::safetensors::load(encoder_dir().join("model.safetensors"), &Device::Cpu)?;
        edit(&mut tensors)?;
        candle_core::safetensors::save(&tensors, self.weights())
    }

    fn load_err(&self) -> Result<ModelError, String> {
        match ClipVisionModelWithProjection::load(&self.0, DType::F32, &Device::Cpu) {
            Ok(_) => Err(format!("{} loaded", self.0.display())),
            Err(e) => Ok(e),
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn missing_tensor_names_file_and_tensor() -> TestResult {
    let scratch = Scratch::new("missing")?;
    let name = "vision_model.encoder.layers.1.mlp.fc2.bias";
    scratch.edit_weights(|t| {
        t.remove(name);
        Ok(())
    })?;
    let err = scratch.load_err()?;
    let msg = err.to_string();
    assert!(matches!(err, ModelError::Weights { .. }), "{msg}");
    assert!(
        msg.contains(&scratch.weights().display().to_string()),
        "{msg}"
    );
    assert!(msg.contains(name) && msg.contains("missing"), "{msg}");
    Ok(())
}

#[test]
fn wrong_shape_names_tensor() -> TestResult {
    let scratch = Scratch::new("shape")?;
    let name = "visual_projection.weight";
    scratch.edit_weights(|t| {
        if let Some(w) = t.get_mut(name) {
            *w = w.t()?.contiguous()?;
        }
        Ok(())
    })?;
    let msg = scratch.load_err()?.to_string();
    assert!(msg.contains(name) && msg.contains("[32, 16]"), "{msg}");
    Ok(())
}

#[test]
fn truncated_weights_name_file() -> TestResult {
    let scratch = Scratch::new("truncated")?;
    let bytes = std::fs::read(scratch.weights())?;
    std::fs::write(scratch.weights(), &bytes[..bytes.len() / 2])?;
    let err = scratch.load_err()?;
    let msg = err.to_string();
    assert!(matches!(err, ModelError::Io { .. }), "{msg}");
    assert!(
        msg.contains(&scratch.weights().display().to_string()),
        "{msg}"
    );
    Ok(())
}

#[test]
fn unsupported_activation_names_field() -> TestResult {
    let scratch = Scratch::new("act")?;
    let path = scratch.0.join("config.json");
    let text = std::fs::read_to_string(&path)?.replace("\"gelu\"", "\"relu\"");
    std::fs::write(&path, text)?;
    let err = scratch.load_err()?;
    let msg = err.to_string();
    assert!(
        matches!(&err, ModelError::Unsupported { field, .. } if field == "hidden_act"),
        "{msg}"
    );
    assert!(
        msg.contains(&path.display().to_string()) && msg.contains("relu"),
        "{msg}"
    );

    // Building from a config directly fails the same way, before any weight is read.
    let config: ClipVisionConfig = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    let source = WeightSource::open(&scratch.weights())?;
    let usage = source.usage();
    let err =
        ClipVisionModelWithProjection::new(&config, source.var_builder(DType::F32, &Device::Cpu))
            .err()
            .ok_or("built with hidden_act relu")?;
    assert!(err.to_string().contains("hidden_act"), "{err}");
    assert!(usage.requested().is_empty());
    Ok(())
}

#[test]
fn wrong_image_size_is_an_error() -> TestResult {
    let model = ClipVisionModelWithProjection::load(&encoder_dir(), DType::F32, &Device::Cpu)?;
    let s = model.config().image_size;
    let pixel_values = Tensor::zeros((1, 3, s + 6, s + 6), DType::F32, &Device::Cpu)?;
    let err = model
        .forward(&pixel_values)
        .err()
        .ok_or("ran on a wrong-size image")?;
    assert!(err.to_string().contains("pixel_values"), "{err}");
    Ok(())
}
