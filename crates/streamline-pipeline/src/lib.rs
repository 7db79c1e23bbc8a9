//! # streamline-pipeline
//!
//! **Will own** the end-to-end jobs (design.md): SVD / SVD-XT image-to-video and AnimateDiff
//! text-to-video, their schedulers (Euler discrete, DDIM), classifier-free guidance, VAE decode
//! in chunks and video IO (GIF, PNG frames, safetensors), each UNet call running through the IR
//! with the chosen optimization.
//!
//! **Promises:** the same math as diffusers' pipelines, so frames match diffusers' on the same
//! latents.
//!
//! **Tests:** `cargo test -p streamline-pipeline`. Arrives with the pipeline issue.
