//! SVD's VAE (image encoder and temporal decoder) lowered to the IR matches diffusers.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use serde::Deserialize;
use streamline_ir::{Graph, Kernels};
use streamline_models::svd::{AutoencoderKLTemporalDecoder, LatentDist};

fn vae() -> AutoencoderKLTemporalDecoder {
    AutoencoderKLTemporalDecoder::load(
        &fixture_dir("svd_vae").join("vae"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap()
}

fn run(g: &Graph, input: Tensor) -> Vec<(Kernels, Tensor)> {
    run_each(g, vec![input])
}

#[derive(Deserialize)]
struct DecodeConfig {
    num_frames: usize,
}

#[test]
fn encoder_matches_diffusers() {
    let io = load_io("svd_vae");
    let vae = vae();
    let (n, _, h, w) = io["image"].dims4().unwrap();
    for (k, moments) in run(&vae.lower_encoder(n, h, w).unwrap(), io["image"].clone()) {
        let dist = LatentDist::from_moments(&moments).unwrap();
        for (name, ours) in [
            ("latent_mean", dist.mean.clone()),
            ("latent_mode", dist.mode().clone()),
            ("latent_std", dist.std().unwrap()),
            ("latent_sample", dist.sample(&io["noise"]).unwrap()),
        ] {
            let err = rel_l2(&ours, &io[name]);
            eprintln!("{k} {name}: relative L2 {err:.2e}");
            assert!(err <= 1e-4, "{k} {name}: relative L2 vs diffusers {err}");
        }
        assert_eq!(vae.scale_factor() * dist.mean.dim(2).unwrap(), h);
    }
}

#[test]
fn temporal_decoder_matches_diffusers() {
    let io = load_io("svd_vae");
    let cfg: DecodeConfig = serde_json::from_str(
        &std::fs::read_to_string(fixture_dir("svd_vae").join("config.json")).unwrap(),
    )
    .unwrap();
    let vae = vae();
    let (n, _, h, w) = io["latents"].dims4().unwrap();
    let g = vae
        .lower_decoder(n / cfg.num_frames, cfg.num_frames, h, w)
        .unwrap();
    for (k, decoded) in run(&g, io["latents"].clone()) {
        let err = rel_l2(&decoded, &io["decoded"]);
        eprintln!("{k} decoded: relative L2 {err:.2e}");
        assert!(
            err <= 1e-4,
            "{k} decoded frames: relative L2 vs diffusers {err}"
        );
    }
}

/// diffusers' `AutoencoderKLTemporalDecoder` takes no `norm_num_groups` or `act_fn`: it builds
/// 32-group SiLU blocks whatever a config.json says, and so does the loader.
#[test]
fn groups_and_activation_in_a_temporal_vae_config_change_nothing() {
    let src = fixture_dir("svd_vae").join("vae");
    let config = std::fs::read_to_string(src.join("config.json")).unwrap();
    let from = "\"in_channels\": 3,";
    assert!(config.contains(from), "{config}");
    let dir = temp_dir("svd-vae-groups");
    let to = format!("{from}\n  \"norm_num_groups\": 16,\n  \"act_fn\": \"gelu\",");
    std::fs::write(dir.join("config.json"), config.replace(from, &to)).unwrap();
    let weights = "diffusion_pytorch_model.safetensors";
    std::fs::copy(src.join(weights), dir.join(weights)).unwrap();
    let other = AutoencoderKLTemporalDecoder::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let io = load_io("svd_vae");
    let (n, _, h, w) = io["image"].dims4().unwrap();
    let encode = |vae: &AutoencoderKLTemporalDecoder| {
        run(&vae.lower_encoder(n, h, w).unwrap(), io["image"].clone())
    };
    for ((_, a), (_, b)) in encode(&other).iter().zip(&encode(&vae())) {
        assert_eq!(rel_l2(a, b), 0.0);
    }
}
