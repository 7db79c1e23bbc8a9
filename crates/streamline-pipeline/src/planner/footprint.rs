//! What a run holds outside its planned IR calls, from shapes: the values the pipelines hand
//! from phase to phase and the CLIP encoders' activations (CLIP runs as candle ops, not
//! through the IR). Each figure follows the tensors the pipelines make (svd/pipeline.rs,
//! animatediff/pipeline.rs, run.rs), counted high where candle makes temporaries.

use candle_core::DType;

/// The shape of a run, as the pipelines see it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RunShape {
    pub frames: usize,
    /// Pixels and latents, `(height, width)`.
    pub pixels: (usize, usize),
    pub latent: (usize, usize),
    pub latent_channels: usize,
    /// Videos per call; classifier-free guidance doubles the UNet's batch on top.
    pub batch: usize,
    pub cfg: bool,
    pub dtype: DType,
}

impl RunShape {
    fn guided(&self) -> usize {
        self.batch * if self.cfg { 2 } else { 1 }
    }

    /// One video's latents, `(frames, C, h, w)`, in the model's dtype.
    fn video(&self) -> usize {
        self.frames
            * self.latent_channels
            * self.latent.0
            * self.latent.1
            * self.dtype.size_in_bytes()
    }

    fn latents(&self) -> usize {
        self.batch * self.video()
    }

    /// The denoising loop's own tensors besides the UNet call: per video the latents, the
    /// next ones and the guidance arithmetic (4 sets); per guided item the doubled input,
    /// its scaled copy, the image latents concatenated (2 sets), the prediction and its
    /// concatenation (6 sets).
    fn loop_bytes(&self) -> usize {
        self.video() * (4 * self.batch + 6 * self.guided())
    }

    /// The decode phase: the latents divided by the scaling factor (twice: before and after),
    /// the f32 video the frames are written into, and one frame's post-processing (its f32
    /// copy, the two affine steps and the clamp).
    pub fn decode_held(&self) -> usize {
        let (h, w) = self.pixels;
        let frame = 3 * h * w * 4;
        2 * self.latents() + (self.batch * self.frames + 4) * frame
    }

    /// SVD's inputs: the image and its noise in f32 at full size, the unit-noise latents in
    /// f32 (the pipeline scales them into the model's dtype).
    pub fn svd_encode_held(&self) -> usize {
        let (h, w) = self.pixels;
        2 * 3 * h * w * 4 + self.latents() / self.dtype.size_in_bytes() * 4
    }

    /// SVD's denoise phase: the image embedding per guided item, SVD's image latents repeated
    /// over the frames for both halves of CFG, and the loop's tensors.
    pub fn svd_denoise_held(&self, embedding: usize) -> usize {
        let d = self.dtype.size_in_bytes();
        self.guided() * (embedding * d + self.video()) + self.loop_bytes()
    }

    /// AnimateDiff's denoise phase: the prompt embeddings (positive and negative) and the
    /// loop's tensors.
    pub fn animatediff_denoise_held(&self, tokens: usize, hidden: usize) -> usize {
        self.guided() * tokens * hidden * self.dtype.size_in_bytes() + self.loop_bytes()
    }
}

/// The activation peak of one CLIP encoder call of `tokens` tokens (clip_encoder.rs): the
/// residual stream and the layer norm's output, then the larger of the attention (q, k, v in
/// the model's dtype and their head-major copies, the scores in the model's dtype, in f32
/// for the softmax, and the probabilities back in the model's dtype) and the MLP (its
/// intermediate and the activation's output).
pub(crate) fn clip_activations(
    tokens: usize,
    hidden: usize,
    intermediate: usize,
    heads: usize,
    dtype: DType,
) -> usize {
    let d = dtype.size_in_bytes();
    let stream = 3 * tokens * hidden * d;
    let attention = 7 * tokens * hidden * d + heads * tokens * tokens * (2 * d + 8);
    let mlp = 2 * tokens * intermediate * d;
    stream + attention.max(mlp)
}
