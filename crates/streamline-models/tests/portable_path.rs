//! What the portable path (the one GPUs run) must never do: make an f64 tensor (Metal has no
//! f64) or read a tensor back to the host inside a step (a device sync in every block).
//!
//! Two checks a CPU can make. Every value of every lowered model (full-size configs, in f32
//! and f16) is f32 or the model's dtype. And the portable kernels' sources
//! (crates/streamline-kernels/src/portable/) name no f64 dtype and no host read: the models'
//! ops hand those kernels all their work on the portable path, besides candle's own ops and
//! the per-batch ids `layout::batch_ids` uploads (a write to the device, not a read).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use streamline_ir::Graph;
use streamline_models::load::WeightSource;
use streamline_models::sd::{
    AutoencoderKL, MotionAdapterConfig, MotionUNetConfig, UNet2DConfig, UNetMotionModel,
};
use streamline_models::svd::{
    AutoencoderKLTemporalDecoder, UNetConfig, UNetShape, UNetSpatioTemporalConditionModel,
    VaeConfig,
};

/// Values of `g` whose dtype is f64.
fn f64_values(g: &Graph) -> Vec<String> {
    g.values()
        .iter()
        .filter(|v| v.info.dtype == DType::F64)
        .map(|v| v.name.clone())
        .collect()
}

fn shapes(dtype: DType) -> candle_nn::VarBuilder<'static> {
    WeightSource::shapes_only().var_builder(dtype, &Device::Cpu)
}

#[test]
fn no_lowered_value_is_f64() {
    let shape = UNetShape {
        batch: 2,
        frames: 3,
        height: 16,
        width: 16,
        context_len: 1,
    };
    let mut graphs: Vec<(&str, Graph)> = Vec::new();
    for dtype in [DType::F32, DType::F16] {
        let svd = UNetSpatioTemporalConditionModel::new(&UNetConfig::svd(14), shapes(dtype));
        graphs.push(("svd unet", svd.unwrap().lower(shape).unwrap()));
        let vae = AutoencoderKLTemporalDecoder::new(&VaeConfig::svd(), shapes(dtype)).unwrap();
        graphs.push(("svd vae decoder", vae.lower_decoder(1, 3, 8, 8).unwrap()));
        graphs.push(("svd vae encoder", vae.lower_encoder(1, 64, 64).unwrap()));
        let builtin = Path::new("<built-in config>");
        let config = MotionUNetConfig::new(
            UNet2DConfig::sd15(),
            builtin,
            MotionAdapterConfig::v1_5_2(),
            builtin,
        )
        .unwrap();
        let motion = UNetMotionModel::new(&config, shapes(dtype), shapes(dtype)).unwrap();
        let text = UNetShape {
            context_len: 77,
            ..shape
        };
        graphs.push(("animatediff unet", motion.lower(text).unwrap()));
        let sd = AutoencoderKL::new(&VaeConfig::sd(), shapes(dtype)).unwrap();
        graphs.push(("sd vae decoder", sd.lower_decoder(1, 3, 8, 8).unwrap()));
    }
    for (name, g) in &graphs {
        assert!(g.values().len() > 50, "{name} lowered to almost nothing");
        let bad = f64_values(g);
        assert!(bad.is_empty(), "{name}: f64 values {bad:?}");
    }
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn the_portable_path_names_no_f64_and_reads_nothing_back() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = Vec::new();
    sources(&root.join("streamline-kernels/src/portable"), &mut files);
    assert!(files.len() >= 5, "portable sources not found: {files:?}");
    // Reads of a tensor into host memory, moves to the CPU, and f64 dtypes.
    let forbidden = [
        ".to_vec0",
        ".to_vec1",
        ".to_vec2",
        ".to_vec3",
        "to_scalar",
        "to_device",
        "Device::Cpu",
        "DType::F64",
    ];
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            if let Some(word) = forbidden.iter().find(|w| code.contains(*w)) {
                panic!(
                    "{}:{}: `{word}` in the portable path: {line}",
                    file.display(),
                    n + 1
                );
            }
        }
    }
}
