use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

use super::error::{ModelError, Result};
use super::finite;

/// The weights file of a diffusers component folder: `<stem>.safetensors`, else the
/// `<stem>.fp16.safetensors` variant (real checkpoints ship either).
pub fn weights_file(dir: &Path, stem: &str) -> Result<PathBuf> {
    let candidates = [
        dir.join(format!("{stem}.safetensors")),
        dir.join(format!("{stem}.fp16.safetensors")),
    ];
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| ModelError::Io {
            path: dir.to_path_buf(),
            reason: format!(
                "no weights: expected {} or {}",
                candidates[0].display(),
                candidates[1].display()
            ),
        })
}

/// Names and shapes of every tensor of a checkpoint, as written by the fixture scripts from
/// the full-size models on torch's meta device (JSON object: name -> shape).
pub type Manifest = BTreeMap<String, Vec<usize>>;

/// Which tensors a model asked for, to prove a loader uses a checkpoint exactly.
#[derive(Clone, Debug, Default)]
pub struct Usage {
    requested: Arc<Mutex<BTreeMap<String, Vec<usize>>>>,
}

impl Usage {
    fn record(&self, name: &str, shape: &Shape) {
        self.requested
            .lock()
            .expect("usage lock")
            .insert(name.to_string(), shape.dims().to_vec());
    }

    /// Bytes of every requested tensor in `dtype`: the weights a model built this way holds.
    pub fn bytes(&self, dtype: DType) -> usize {
        self.requested
            .lock()
            .expect("usage lock")
            .values()
            .map(|s| s.iter().product::<usize>() * dtype.size_in_bytes())
            .sum()
    }

    /// Every tensor requested so far, with the shape the model expected.
    pub fn requested(&self) -> BTreeMap<String, Vec<usize>> {
        self.requested.lock().expect("usage lock").clone()
    }
}

enum Store {
    Safetensors(MmapedSafetensors),
    /// No data and no list: every request is answered with zeros broadcast to the shape the
    /// model expects, so any config can be built and planned without its weights.
    Shapes,
    /// Deterministic random weights from a seed, for models made in Rust (benchmarks and
    /// memory tests on configs no checkpoint exists for).
    Random(u64),
    /// No data: requests are checked against the manifest and answered with zeros
    /// broadcast to the shape (a few bytes each), so full-size models can be built anywhere.
    Manifest(Manifest),
}

/// A `SimpleBackend` for candle's `VarBuilder` over one checkpoint file (or a manifest).
///
/// Missing tensors, wrong shapes and NaN or infinite values (or, loaded as f16, values past
/// f16's range) are errors that name the tensor ([`ModelError::Weights`] adds the file);
/// tensors are converted to the requested dtype, so fp16, bf16 and fp32 checkpoints all load.
pub struct WeightSource {
    path: PathBuf,
    store: Store,
    usage: Usage,
}

impl WeightSource {
    /// Memory-map a safetensors file. A truncated or corrupt file is an error naming it.
    pub fn open(path: &Path) -> Result<Self> {
        // SAFETY: the file is mapped read-only; like every safetensors loader we assume it is
        // not modified while the model is alive.
        let st = unsafe { MmapedSafetensors::new(path) }.map_err(|e| ModelError::Io {
            path: path.to_path_buf(),
            reason: format!("not a readable safetensors file: {e}"),
        })?;
        Ok(WeightSource {
            path: path.to_path_buf(),
            store: Store::Safetensors(st),
            usage: Usage::default(),
        })
    }

    /// Random weights for any requested tensor, the same for the same `seed`, name and shape:
    /// matrices and kernels uniform with standard deviation `1/sqrt(fan_in)`, norm weights
    /// near 1, biases and blend factors small.
    pub fn random(seed: u64) -> Self {
        WeightSource {
            path: PathBuf::from(format!("<random weights, seed {seed}>")),
            store: Store::Random(seed),
            usage: Usage::default(),
        }
    }

    /// A shape-only source that accepts whatever the model asks for (planning from a config
    /// alone; [`Usage::requested`] then lists the checkpoint the model would need).
    pub fn shapes_only() -> Self {
        WeightSource {
            path: PathBuf::from("<shapes only>"),
            store: Store::Shapes,
            usage: Usage::default(),
        }
    }

    /// A shape-only source standing for a checkpoint described by `manifest`.
    pub fn manifest(path: &Path, manifest: Manifest) -> Self {
        WeightSource {
            path: path.to_path_buf(),
            store: Store::Manifest(manifest),
            usage: Usage::default(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A handle on what the model requests, to read after building it.
    pub fn usage(&self) -> Usage {
        self.usage.clone()
    }

    /// Names and shapes of every tensor the source holds.
    pub fn tensors(&self) -> Result<Manifest> {
        match &self.store {
            Store::Manifest(m) => Ok(m.clone()),
            Store::Random(_) | Store::Shapes => Ok(self.usage.requested()),
            Store::Safetensors(st) => Ok(st
                .tensors()
                .into_iter()
                .map(|(name, view)| (name, view.shape().to_vec()))
                .collect()),
        }
    }

    /// Names the source holds that were never requested.
    pub fn unused(&self) -> Result<BTreeSet<String>> {
        let requested = self.usage.requested();
        Ok(self
            .tensors()?
            .into_keys()
            .filter(|n| !requested.contains_key(n))
            .collect())
    }

    /// A `VarBuilder` reading from this source in `dtype` on `device`.
    pub fn var_builder(self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self), dtype, device.clone())
    }

    fn missing(&self, name: &str) -> candle_core::Error {
        candle_core::Error::Msg(format!("tensor `{name}` is missing"))
    }

    fn load(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        match &self.store {
            Store::Safetensors(st) => {
                if let Some(reason) = st
                    .get(name)
                    .ok()
                    .and_then(|view| finite::problem(name, &view, dtype))
                {
                    return Err(candle_core::Error::Msg(reason));
                }
                let t = st.load(name, dev).map_err(|e| match st.get(name) {
                    Err(_) => self.missing(name),
                    Ok(_) => {
                        candle_core::Error::Msg(format!("tensor `{name}` cannot be read: {e}"))
                    }
                })?;
                t.to_dtype(dtype)
            }
            Store::Manifest(m) => {
                let shape = m.get(name).ok_or_else(|| self.missing(name))?;
                Tensor::zeros((), dtype, dev)?.broadcast_as(shape.as_slice())
            }
            Store::Random(_) | Store::Shapes => Err(candle_core::Error::Msg(format!(
                "tensor `{name}`: generated weights need the shape the model expects"
            ))),
        }
    }

    /// Uniform values in [-1, 1) from a splitmix64 stream seeded by the source seed and `name`.
    fn random_tensor(
        seed: u64,
        name: &str,
        shape: &Shape,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut state = name.bytes().fold(seed ^ 0xcbf2_9ce4_8422_2325, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        let mut next = move || {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        };
        let dims = shape.dims();
        let fan_in: usize = dims.iter().skip(1).product();
        let values: Vec<f32> = (0..shape.elem_count()).map(|_| next()).collect();
        let (scale, offset) = if dims.len() >= 2 {
            ((3.0 / fan_in.max(1) as f32).sqrt(), 0.0)
        } else if name.ends_with("mix_factor") {
            (1.0, 0.0)
        } else if name.ends_with("weight") {
            (0.1, 1.0)
        } else {
            (0.1, 0.0)
        };
        let values = values
            .into_iter()
            .map(|v| v * scale + offset)
            .collect::<Vec<_>>();
        Tensor::from_vec(values, shape.clone(), dev)?.to_dtype(dtype)
    }
}

impl SimpleBackend for WeightSource {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.usage.record(name, &s);
        match self.store {
            Store::Random(seed) => return Self::random_tensor(seed, name, &s, dtype, dev),
            Store::Shapes => return Tensor::zeros((), dtype, dev)?.broadcast_as(s),
            _ => {}
        }
        let t = self.load(name, dtype, dev)?;
        if t.shape() != &s {
            return Err(candle_core::Error::Msg(format!(
                "tensor `{name}` has shape {:?}, the model expects {:?}",
                t.dims(),
                s.dims()
            )));
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = self.load(name, dtype, dev)?;
        self.usage.record(name, t.shape());
        Ok(t)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        match &self.store {
            Store::Safetensors(st) => st.get(name).is_ok(),
            Store::Manifest(m) => m.contains_key(name),
            Store::Random(_) | Store::Shapes => true,
        }
    }
}
