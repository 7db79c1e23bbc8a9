//! SD's VAE (`AutoencoderKL`, AnimateDiff's decoder) lowered to the IR matches diffusers, and
//! configs it cannot build are refused with the file and field named.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use streamline_ir::{Graph, Kernels};
use streamline_models::sd::AutoencoderKL;

fn vae() -> AutoencoderKL {
    AutoencoderKL::load(&fixture_dir("sd_vae").join("vae"), DType::F32, &Device::Cpu).unwrap()
}

fn run(g: &Graph, input: Tensor) -> Vec<(Kernels, Tensor)> {
    run_each(g, vec![input])
}

#[test]
fn encoder_matches_diffusers() {
    let io = load_io("sd_vae");
    let (n, _, h, w) = io["image"].dims4().unwrap();
    for (k, moments) in run(&vae().lower_encoder(n, h, w).unwrap(), io["image"].clone()) {
        let err = rel_l2(&moments, &io["moments"]);
        assert!(err <= 1e-4, "{k} moments: relative L2 vs diffusers {err}");
    }
}

#[test]
fn decoder_matches_diffusers() {
    let io = load_io("sd_vae");
    let vae = vae();
    let (n, _, h, w) = io["latents"].dims4().unwrap();
    let g = vae.lower_decoder(2, n / 2, h, w).unwrap();
    for (k, decoded) in run(&g, io["latents"].clone()) {
        assert_eq!(decoded.dims()[2], vae.scale_factor() * h);
        let err = rel_l2(&decoded, &io["decoded"]);
        assert!(err <= 1e-4, "{k} decoded: relative L2 vs diffusers {err}");
    }
}

#[test]
fn unsupported_configs_name_file_and_field() {
    let src = fixture_dir("sd_vae").join("vae");
    let config = std::fs::read_to_string(src.join("config.json")).unwrap();
    for (from, to, field) in [
        (
            "\"UpDecoderBlock2D\",\n    \"UpDecoderBlock2D\"",
            "\"UpDecoderBlock2D\",\n    \"AttnUpDecoderBlock2D\"",
            "up_block_types[1]",
        ),
        (
            "\"norm_num_groups\": 32",
            "\"norm_num_groups\": 12",
            "norm_num_groups",
        ),
        ("\"act_fn\": \"silu\"", "\"act_fn\": \"gelu\"", "act_fn"),
    ] {
        assert!(config.contains(from), "fixture config lacks {from}");
        let dir = temp_dir(&format!("sd-vae-{}", field.replace(['[', ']'], "")));
        std::fs::write(dir.join("config.json"), config.replace(from, to)).unwrap();
        std::fs::copy(
            src.join("diffusion_pytorch_model.safetensors"),
            dir.join("diffusion_pytorch_model.safetensors"),
        )
        .unwrap();
        let err = AutoencoderKL::load(&dir, DType::F32, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("config.json") && err.contains(field),
            "{field}: {err}"
        );
    }
}
