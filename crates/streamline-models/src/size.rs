//! Which video sizes a model takes: one rule per model, for everyone who reads a size (the CLI,
//! `streamline plan`, the lowerings), so that a size is refused when the arguments are read and
//! the refusal states the rule, rather than as a shape error deep inside a run.
//!
//! diffusers' pipelines take heights and widths that are multiples of 8 pixels and make latents
//! of `pixels / vae_scale`. AnimateDiff's `UNetMotionModel` then takes any latent size: it
//! forwards its skip connections' sizes to its upsamplers when the latents are not multiples of
//! `2^levels`. SVD's `UNetSpatioTemporalConditionModel` does not, and fails on such latents with
//! a concat error, so SVD needs latents that are multiples of `2^levels`.

use thiserror::Error;

use crate::blocks::autoencoder::VaeConfig;
use crate::{sd, svd};

/// A size that breaks a model's [`SizeRule`]; it names the dimension and states the rule.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[error("{dimension} {value} must be a positive multiple of {multiple} for this model ({why})")]
pub struct SizeError {
    /// "height" or "width" (of the pixels), or "latent height" / "latent width".
    pub dimension: &'static str,
    pub value: usize,
    pub multiple: usize,
    /// Where the multiple comes from.
    pub why: String,
}

/// The sizes a model takes: positive multiples of [`SizeRule::multiple`], turned into latents by
/// the VAE's scale.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SizeRule {
    multiple: usize,
    vae_scale: usize,
    why: String,
    dimensions: [&'static str; 2],
}

/// The multiples of 8 pixels diffusers' pipelines check for (`check_inputs`).
const PIPELINE_MULTIPLE: usize = 8;

fn lcm(a: usize, b: usize) -> usize {
    let (mut x, mut y) = (a, b);
    while y != 0 {
        (x, y) = (y, x % y);
    }
    a / x * b
}

/// SVD's UNet halves latents once per block but the last.
fn svd_halvings(unet: &svd::UNetConfig) -> u32 {
    unet.block_out_channels.len().saturating_sub(1) as u32
}

fn svd_unet_why(unet: &svd::UNetConfig) -> String {
    format!(
        "the UNet halves latents {} times, without forwarding upsample sizes as diffusers' \
         UNetSpatioTemporalConditionModel does",
        svd_halvings(unet)
    )
}

impl SizeRule {
    /// SVD and SVD-XT: heights and widths whose latents the UNet can halve and double back to
    /// the same size, `vae_scale * 2^(levels - 1)` (64 for SVD), and multiples of 8 as
    /// `StableVideoDiffusionPipeline` checks.
    pub fn svd(unet: &svd::UNetConfig, vae: &VaeConfig) -> SizeRule {
        let scale = vae.scale_factor();
        let unet_multiple = scale << svd_halvings(unet);
        let mut why = format!("the VAE scales by {scale} and {}", svd_unet_why(unet));
        if unet_multiple % PIPELINE_MULTIPLE != 0 {
            why.push_str(&format!(
                "; diffusers' StableVideoDiffusionPipeline takes multiples of {PIPELINE_MULTIPLE}"
            ));
        }
        SizeRule {
            multiple: lcm(unet_multiple, PIPELINE_MULTIPLE),
            vae_scale: scale,
            why,
            dimensions: ["height", "width"],
        }
    }

    /// The latents SVD's UNet can take: multiples of `2^(levels - 1)`. Its lowering checks them,
    /// so a caller that skipped [`SizeRule::svd`] is refused before any node is made.
    pub(crate) fn svd_latents(unet: &svd::UNetConfig) -> SizeRule {
        SizeRule {
            multiple: 1 << svd_halvings(unet),
            vae_scale: 1,
            why: svd_unet_why(unet),
            dimensions: ["latent height", "latent width"],
        }
    }

    /// AnimateDiff: what `AnimateDiffPipeline.check_inputs` takes, multiples of 8 pixels (the
    /// UNet forwards upsample sizes, so the latents need not be multiples of `2^levels`); with a
    /// VAE that scales by more than 8, multiples of its scale, so that latents are whole.
    pub fn animatediff(unet: &sd::MotionUNetConfig, vae: &VaeConfig) -> SizeRule {
        let scale = vae.scale_factor();
        let levels = unet.unet.block_out_channels.len().saturating_sub(1);
        let why = if PIPELINE_MULTIPLE % scale == 0 {
            format!(
                "diffusers' AnimateDiffPipeline takes multiples of {PIPELINE_MULTIPLE}; the VAE \
                 scales by {scale}, and the UNet forwards upsample sizes, so latents need not be \
                 multiples of {}",
                1usize << levels
            )
        } else {
            format!(
                "diffusers' AnimateDiffPipeline takes multiples of {PIPELINE_MULTIPLE}, and the \
                 VAE scales by {scale}, so only multiples of {scale} make whole latents"
            )
        };
        SizeRule {
            multiple: lcm(scale, PIPELINE_MULTIPLE),
            vae_scale: scale,
            why,
            dimensions: ["height", "width"],
        }
    }

    /// The latent size of `height x width`, or the first dimension that breaks the rule.
    pub fn check(&self, height: usize, width: usize) -> Result<(usize, usize), SizeError> {
        for (dimension, value) in self.dimensions.into_iter().zip([height, width]) {
            if value == 0 || value % self.multiple != 0 {
                return Err(SizeError {
                    dimension,
                    value,
                    multiple: self.multiple,
                    why: self.why.clone(),
                });
            }
        }
        Ok((height / self.vae_scale, width / self.vae_scale))
    }

    /// Every height and width must be a positive multiple of this.
    pub fn multiple(&self) -> usize {
        self.multiple
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::sd::{MotionAdapterConfig, MotionUNetConfig, UNet2DConfig};

    /// A VAE that scales by `scale` (a power of two).
    fn vae(scale: usize) -> VaeConfig {
        let blocks = scale.trailing_zeros() as usize + 1;
        VaeConfig {
            block_out_channels: vec![128; blocks],
            down_block_types: vec!["DownEncoderBlock2D".into(); blocks],
            ..VaeConfig::sd()
        }
    }

    fn svd_unet(blocks: usize) -> svd::UNetConfig {
        let mut unet = svd::UNetConfig::svd(14);
        unet.block_out_channels.truncate(blocks);
        unet
    }

    fn motion_unet(blocks: usize) -> MotionUNetConfig {
        let mut unet = UNet2DConfig::sd15();
        let mut adapter = MotionAdapterConfig::v1_5_2();
        unet.block_out_channels.truncate(blocks);
        unet.down_block_types.truncate(blocks);
        unet.up_block_types = unet.up_block_types.split_off(4 - blocks);
        adapter.block_out_channels.truncate(blocks);
        let path = Path::new("config.json");
        MotionUNetConfig::new(unet, path, adapter, path).unwrap()
    }

    fn why_refused(rule: &SizeRule, height: usize, width: usize) -> String {
        rule.check(height, width).unwrap_err().why
    }

    #[test]
    fn svd_takes_multiples_of_64_and_says_why() {
        let rule = SizeRule::svd(&svd::UNetConfig::svd(25), &VaeConfig::svd());
        assert_eq!(rule.multiple(), 64);
        assert_eq!(rule.check(576, 1024), Ok((72, 128)));
        let err = rule.check(72, 64).unwrap_err();
        assert_eq!(
            err.to_string(),
            "height 72 must be a positive multiple of 64 for this model (the VAE scales by 8 and \
             the UNet halves latents 3 times, without forwarding upsample sizes as diffusers' \
             UNetSpatioTemporalConditionModel does)"
        );
        assert_eq!(rule.check(64, 72).unwrap_err().dimension, "width");
    }

    #[test]
    fn svd_multiples_follow_the_vae_and_the_unet_levels() {
        // The built-in default model: a scale-4 VAE and three UNet levels.
        assert_eq!(SizeRule::svd(&svd_unet(3), &vae(4)).multiple(), 16);
        let small = SizeRule::svd(&svd_unet(2), &vae(2));
        assert_eq!(small.multiple(), 8, "the pipeline's multiples of 8 win");
        assert!(why_refused(&small, 12, 16).contains("multiples of 8"));
        assert_eq!(small.check(16, 24), Ok((8, 12)));
    }

    #[test]
    fn svd_latents_name_the_latent_dimension() {
        let err = SizeRule::svd_latents(&svd_unet(3)).check(8, 9).unwrap_err();
        assert_eq!(
            (err.dimension, err.value, err.multiple),
            ("latent width", 9, 4)
        );
        assert!(err.why.contains("halves latents 2 times"), "{err}");
    }

    #[test]
    fn animatediff_takes_multiples_of_8_whatever_the_unet_levels() {
        let rule = SizeRule::animatediff(&motion_unet(4), &VaeConfig::sd());
        assert_eq!(rule.multiple(), 8);
        assert_eq!(rule.check(480, 720), Ok((60, 90)));
        let scale4 = SizeRule::animatediff(&motion_unet(3), &vae(4));
        assert_eq!(scale4.check(72, 40), Ok((18, 10)));
        let err = scale4.check(72, 20).unwrap_err();
        assert_eq!((err.dimension, err.value, err.multiple), ("width", 20, 8));
        assert!(err.why.contains("need not be multiples of 4"), "{err}");
    }

    #[test]
    fn a_vae_scaling_by_more_than_8_needs_whole_latents() {
        let rule = SizeRule::animatediff(&motion_unet(2), &vae(16));
        assert_eq!(rule.multiple(), 16);
        assert!(why_refused(&rule, 72, 64).contains("whole latents"));
        assert_eq!(rule.check(64, 32), Ok((4, 2)));
    }

    #[test]
    fn zero_is_refused() {
        let rules = [
            SizeRule::svd(&svd::UNetConfig::svd(14), &VaeConfig::svd()),
            SizeRule::animatediff(&motion_unet(4), &VaeConfig::sd()),
        ];
        for rule in rules {
            assert_eq!(rule.check(0, 64).unwrap_err().dimension, "height");
            assert_eq!(rule.check(64, 0).unwrap_err().dimension, "width");
        }
    }
}
