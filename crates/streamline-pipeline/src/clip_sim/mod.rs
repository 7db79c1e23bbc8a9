//! CLIP-SIM, the text-to-video papers' measure of how well a video follows its prompt: the
//! mean over the video's frames of the cosine similarity between the frame's CLIP image
//! embedding and the prompt's CLIP text embedding, each L2-normalized.
//!
//! The score is the plain mean of cosines, in [-1, 1], as the papers report it (0.29 to 0.31
//! for AnimateDiff on MSR-VTT with ViT-B/32 or ViT-L/14): neither scaled by 100 nor clamped at
//! 0. torchmetrics' `CLIPScore` is `100 * max(cos, 0)` per image; for frames with positive
//! similarity it is this score times 100.
//!
//! Any Hub CLIP folder scores (transformers' `CLIPModel`: `config.json`, weights, tokenizer
//! files, `preprocessor_config.json`); frames go through [`ClipImageProcessor`], prompts
//! through CLIP's tokenizer padded and truncated to 77 tokens, as `CLIPProcessor` is called
//! with `padding="max_length", truncation=True`.

mod preprocess;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use streamline_models::clip_model::ClipModel;
use streamline_models::clip_text::ClipTokenizer;

pub use preprocess::ClipImageProcessor;

use crate::run::PipelineError;

/// Frames per image-encoder call: a long video's pixel values are never all in memory.
const FRAMES_PER_CALL: usize = 16;

/// A loaded CLIP scorer.
pub struct ClipSim {
    model: ClipModel,
    tokenizer: ClipTokenizer,
    processor: ClipImageProcessor,
    device: Device,
}

/// One video's CLIP-SIM and the similarity of each frame it is the mean of.
#[derive(Clone, Debug, PartialEq)]
pub struct VideoScore {
    pub frames: Vec<f64>,
    pub clip_sim: f64,
}

impl ClipSim {
    /// Loads a Hub CLIP folder in f32 on `device`.
    pub fn load(dir: &Path, device: &Device) -> Result<Self, PipelineError> {
        if !dir.is_dir() {
            return Err(PipelineError::Input(format!(
                "{}: no such CLIP folder (a transformers CLIPModel folder is expected)",
                dir.display()
            )));
        }
        Ok(ClipSim {
            processor: ClipImageProcessor::load(dir)?,
            tokenizer: ClipTokenizer::load(dir)?,
            model: ClipModel::load(dir, DType::F32, device)?,
            device: device.clone(),
        })
    }

    /// The unit text embedding `(1, D)` of `prompt` (truncated to the tokenizer's length, with
    /// a warning, as diffusers does).
    fn text_embedding(&self, prompt: &str) -> Result<Tensor, PipelineError> {
        let encoding = self.tokenizer.encode(prompt)?;
        let ids = Tensor::new(encoding.ids.as_slice(), &self.device)?.unsqueeze(0)?;
        Ok(unit(&self.model.text_features(&ids)?)?)
    }

    /// Scores `frames` against `prompt`.
    pub fn score(&self, frames: &[RgbImage], prompt: &str) -> Result<VideoScore, PipelineError> {
        if frames.is_empty() {
            return Err(PipelineError::Input(
                "a video with no frames has no CLIP-SIM".into(),
            ));
        }
        let text = self.text_embedding(prompt)?;
        let mut scores = Vec::with_capacity(frames.len());
        for chunk in frames.chunks(FRAMES_PER_CALL) {
            let pixels = self.processor.pixel_values(chunk, &self.device)?;
            let images = unit(&self.model.image_features(&pixels)?)?;
            let cosines = images.matmul(&text.t()?)?.flatten_all()?.to_vec1::<f32>()?;
            scores.extend(cosines.into_iter().map(f64::from));
        }
        let clip_sim = scores.iter().sum::<f64>() / scores.len() as f64;
        Ok(VideoScore {
            frames: scores,
            clip_sim,
        })
    }
}

/// Rows scaled to unit L2 norm.
fn unit(x: &Tensor) -> candle_core::Result<Tensor> {
    x.broadcast_div(&x.sqr()?.sum_keepdim(1)?.sqrt()?)
}
