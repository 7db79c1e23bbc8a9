//! Device memory read from the driver: the high-water mark of a run on a GPU, beside the
//! planned peak, as design.md asks ("device memory from the driver on a GPU").
//!
//! A thread polls the driver's used memory (`cuMemGetInfo`) while the run goes on; the peak
//! is reported above what was in use when polling began (weights, inputs and the context are
//! already there). On the CPU, and in builds without CUDA, there is nothing to read.

use anyhow::Result;
use candle_core::Device;

/// Polling of one device's used memory, from [`DevicePeak::start`] to [`DevicePeak::finish`].
pub struct DevicePeak {
    #[cfg(feature = "cuda")]
    poll: cuda::Poll,
}

impl DevicePeak {
    /// Start polling `device`; `None` where the driver has nothing to say (the CPU).
    pub fn start(device: &Device) -> Result<Option<DevicePeak>> {
        match device {
            #[cfg(feature = "cuda")]
            Device::Cuda(_) => Ok(Some(DevicePeak {
                poll: cuda::Poll::start(device)?,
            })),
            _ => Ok(None),
        }
    }

    /// Bytes of the device's memory in use at the peak, above what was in use at the start.
    pub fn finish(self) -> Result<u64> {
        #[cfg(feature = "cuda")]
        return self.poll.finish();
        #[cfg(not(feature = "cuda"))]
        unreachable!("DevicePeak::start makes none without CUDA")
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::thread::JoinHandle;
    use std::time::Duration;

    use anyhow::{Context, Result};
    use candle_core::Device;

    pub struct Poll {
        stop: Arc<AtomicBool>,
        thread: JoinHandle<usize>,
        base: usize,
        device: Device,
    }

    impl Poll {
        pub fn start(device: &Device) -> Result<Poll> {
            device.synchronize()?;
            let context = device.as_cuda_device()?.cuda_stream().context().clone();
            let used = move || -> Option<usize> {
                let (free, total) = context.mem_get_info().ok()?;
                Some(total - free)
            };
            let base = used().context("cuMemGetInfo failed")?;
            let stop = Arc::new(AtomicBool::new(false));
            let running = stop.clone();
            let thread = std::thread::spawn(move || {
                let mut peak = base;
                while !running.load(Ordering::Relaxed) {
                    peak = peak.max(used().unwrap_or(0));
                    std::thread::sleep(Duration::from_millis(1));
                }
                peak.max(used().unwrap_or(0))
            });
            Ok(Poll {
                stop,
                thread,
                base,
                device: device.clone(),
            })
        }

        pub fn finish(self) -> Result<u64> {
            self.device.synchronize()?;
            self.stop.store(true, Ordering::Relaxed);
            let peak = self
                .thread
                .join()
                .map_err(|_| anyhow::anyhow!("the memory poller panicked"))?;
            Ok(peak.saturating_sub(self.base) as u64)
        }
    }
}
