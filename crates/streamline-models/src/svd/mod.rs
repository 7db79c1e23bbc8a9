//! Stable Video Diffusion: the spatio-temporal UNet and the temporal VAE, lowered to the IR.

mod config;
mod embedding;
mod resnet;
mod transformer;
mod unet;
mod vae;

pub use config::UNetConfig;
pub use unet::{UNetShape, UNetSpatioTemporalConditionModel};
pub use vae::{AutoencoderKLTemporalDecoder, LatentDist, VaeConfig};

use std::sync::Arc;

use streamline_ir::{Graph, Op, ValueId};

/// Push a node named `prefix.name` (or `prefix` alone when `name` is empty).
pub(crate) fn node(
    g: &mut Graph,
    prefix: &str,
    name: &str,
    op: Arc<dyn Op>,
    inputs: &[ValueId],
) -> streamline_ir::Result<ValueId> {
    let full = match (prefix.is_empty(), name.is_empty()) {
        (_, true) => prefix.to_string(),
        (true, false) => name.to_string(),
        (false, false) => format!("{prefix}.{name}"),
    };
    g.push_arc(&full, op, inputs)
}
