//! diffusers' `TemporalResnetBlock` and `SpatioTemporalResBlock`.

use std::sync::Arc;

use candle_nn::VarBuilder;
use streamline_ir::{Graph, Result, ValueId};

use super::config::SVD_GROUPS;
use crate::blocks::transformer::TemporalGroupNorm;
use crate::blocks::{node, At, ResnetBlock2D};
use crate::ops::{
    Add, AddBatchEmb, Blend, FrameLayout, FramesToPositions, Linear, PositionsToFrames, Silu,
    TemporalConv,
};

/// Position-wise residual block on `(B*H*W, T, C)`: temporal GroupNorm, SiLU, (3,1,1) conv,
/// + time embedding, twice.
#[derive(Debug)]
pub(crate) struct TemporalResnetBlock {
    norm1: TemporalGroupNorm,
    conv1: Arc<TemporalConv>,
    time_emb_proj: Option<Arc<Linear>>,
    norm2: TemporalGroupNorm,
    conv2: Arc<TemporalConv>,
}

impl TemporalResnetBlock {
    pub fn new(
        c: usize,
        temb: Option<usize>,
        eps: f64,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        Ok(TemporalResnetBlock {
            norm1: TemporalGroupNorm::new(c, SVD_GROUPS, eps, vb.pp("norm1"))?,
            conv1: Arc::new(TemporalConv::new(c, c, 3, vb.pp("conv1"))?),
            time_emb_proj: temb
                .map(|t| Linear::new(t, c, true, vb.pp("time_emb_proj")).map(Arc::new))
                .transpose()?,
            norm2: TemporalGroupNorm::new(c, SVD_GROUPS, eps, vb.pp("norm2"))?,
            conv2: Arc::new(TemporalConv::new(c, c, 3, vb.pp("conv2"))?),
        })
    }

    pub fn lower(&self, g: &mut Graph, p: &str, x: ValueId, at: At) -> Result<ValueId> {
        let h = self.norm1.lower(g, &format!("{p}.norm1"), x, at.dims)?;
        let h = node(g, p, "act1", Arc::new(Silu), &[h])?;
        let mut h = node(g, p, "conv1", self.conv1.clone(), &[h])?;
        if let (Some(proj), Some(emb)) = (&self.time_emb_proj, at.emb) {
            let e = node(g, p, "time_emb_proj", proj.clone(), &[emb])?;
            let add = AddBatchEmb {
                rows_per_batch: at.dims.hw(),
                channel_dim: 2,
            };
            h = node(g, p, "add_temb", Arc::new(add), &[h, e])?;
        }
        let h = self.norm2.lower(g, &format!("{p}.norm2"), h, at.dims)?;
        let h = node(g, p, "act2", Arc::new(Silu), &[h])?;
        let h = node(g, p, "conv2", self.conv2.clone(), &[h])?;
        node(g, p, "residual", Arc::new(Add), &[x, h])
    }
}

/// diffusers' `SpatioTemporalResBlock`: a frame-wise resnet, then a temporal resnet on its
/// output, blended with it.
#[derive(Debug)]
pub(crate) struct SpatioTemporalResBlock {
    spatial_res_block: ResnetBlock2D,
    temporal_res_block: TemporalResnetBlock,
    time_mixer: Arc<Blend>,
    out_c: usize,
}

/// Settings that differ between the UNet and the temporal VAE decoder.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ResBlockSettings {
    pub temb: Option<usize>,
    pub eps: f64,
    pub temporal_eps: f64,
    pub switch_spatial_to_temporal_mix: bool,
}

impl SpatioTemporalResBlock {
    pub fn new(
        in_c: usize,
        out_c: usize,
        s: ResBlockSettings,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        Ok(SpatioTemporalResBlock {
            spatial_res_block: ResnetBlock2D::new(
                in_c,
                out_c,
                s.temb,
                SVD_GROUPS,
                s.eps,
                vb.pp("spatial_res_block"),
            )?,
            temporal_res_block: TemporalResnetBlock::new(
                out_c,
                s.temb,
                s.temporal_eps,
                vb.pp("temporal_res_block"),
            )?,
            time_mixer: Arc::new(Blend::learned(
                s.switch_spatial_to_temporal_mix,
                vb.pp("time_mixer"),
            )?),
            out_c,
        })
    }

    pub fn lower(&self, g: &mut Graph, p: &str, x: ValueId, at: At) -> Result<ValueId> {
        let h = self
            .spatial_res_block
            .lower(g, &format!("{p}.spatial_res_block"), x, at)?;
        let to_positions = FramesToPositions {
            dims: at.dims,
            channels: self.out_c,
            from: FrameLayout::ChannelsFirst,
        };
        let hp = node(g, p, "to_positions", Arc::new(to_positions), &[h])?;
        let t = self
            .temporal_res_block
            .lower(g, &format!("{p}.temporal_res_block"), hp, at)?;
        let mixed = node(g, p, "time_mixer", self.time_mixer.clone(), &[hp, t])?;
        let to_frames = PositionsToFrames {
            dims: at.dims,
            channels: self.out_c,
            to: FrameLayout::ChannelsFirst,
        };
        node(g, p, "to_frames", Arc::new(to_frames), &[mixed])
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use candle_core::{DType, Device};
    use streamline_ir::{Executor, Layout, Plan, Request, ValueInfo};

    use super::*;
    use crate::load::WeightSource;
    use crate::ops::VideoDims;
    use candle_core::Tensor;

    /// The 64-channel block fixture: with two channels per GroupNorm group, the time
    /// embedding survives the norms (the 32-channel UNet fixtures cannot show it).
    #[test]
    fn time_embedding_reaches_spatial_and_temporal_res_blocks() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/data/svd_resblock");
        let dev = Device::Cpu;
        let io = candle_core::safetensors::load(dir.join("io.safetensors"), &dev).unwrap();
        let vb = WeightSource::open(&dir.join("block.safetensors"))
            .unwrap()
            .var_builder(DType::F32, &dev);
        let settings = ResBlockSettings {
            temb: Some(32),
            eps: 1e-6,
            temporal_eps: 1e-6,
            switch_spatial_to_temporal_mix: false,
        };
        let block = SpatioTemporalResBlock::new(64, 64, settings, vb).unwrap();
        let mut g = Graph::new();
        let x = g
            .input(
                "x",
                ValueInfo::new((6, 64, 4, 5), DType::F32, Layout::IMAGES),
            )
            .unwrap();
        let temb = g
            .input("temb", ValueInfo::new((2, 32), DType::F32, Layout::WHOLE))
            .unwrap();
        let emb = node(&mut g, "temb", "act", Arc::new(Silu), &[temb]).unwrap();
        let at = At {
            dims: VideoDims {
                batch: 2,
                frames: 3,
                height: 4,
                width: 5,
            },
            emb: Some(emb),
            split_norms: false,
        };
        let out = block.lower(&mut g, "block", x, at).unwrap();
        g.set_outputs(&[out]);
        let plan = Plan::trivial(&g);
        let exec = Executor::new(&g, &plan, &dev).unwrap();
        let run = |temb: &Tensor| {
            exec.run(
                vec![io["hidden_states"].clone(), temb.clone()],
                &Request::default(),
            )
            .unwrap()
            .outputs
            .remove(0)
        };
        let ours = run(&io["temb"]);
        let err = streamline_ir::testing::rel_l2(&ours, &io["out"]);
        assert!(err <= 1e-4, "relative L2 vs diffusers: {err}");
        let without = run(&io["temb"].zeros_like().unwrap());
        assert!(
            streamline_ir::testing::rel_l2(&without, &io["out"]) > 1e-2,
            "the time embedding does not matter here"
        );
    }
}
