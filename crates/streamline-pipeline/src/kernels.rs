//! Which implementation of the ops a run uses (`--kernels`), for which device.
//!
//! The CPU kernels serve the CPU; every other device runs the portable path (candle ops,
//! tiled so that nothing exceeds the plan), with attention through flash-attn on CUDA when the
//! build has it. The portable path can be asked for on the CPU too, so that what a GPU runs is
//! tested here. A plan is made for the kernels that will run, so planning needs the choice
//! even without the device (`streamline plan --device cuda`).

use candle_core::Device;
use streamline_ir::Kernels;

/// The kind of device a run is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    Cpu,
    Cuda,
    Metal,
}

impl DeviceKind {
    pub fn of(device: &Device) -> DeviceKind {
        match device {
            Device::Cpu => DeviceKind::Cpu,
            Device::Cuda(_) => DeviceKind::Cuda,
            Device::Metal(_) => DeviceKind::Metal,
        }
    }
}

/// `--device cpu | cuda[:N] | metal[:N]`: the device kind and its ordinal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceSpec {
    pub kind: DeviceKind,
    pub ordinal: usize,
}

impl std::str::FromStr for DeviceSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (name, ordinal) = match s.split_once(':') {
            Some((name, n)) => {
                let ordinal = n
                    .parse()
                    .map_err(|_| format!("`{n}` is not a device number (e.g. cuda:0)"))?;
                (name, ordinal)
            }
            None => (s, 0),
        };
        let kind = match name {
            "cpu" if ordinal == 0 => DeviceKind::Cpu,
            "cuda" => DeviceKind::Cuda,
            "metal" => DeviceKind::Metal,
            _ => {
                return Err(format!(
                    "`{s}`: expected cpu, cuda, cuda:N, metal or metal:N"
                ))
            }
        };
        Ok(DeviceSpec { kind, ordinal })
    }
}

impl DeviceSpec {
    /// The device, or why this build cannot open it.
    pub fn device(self) -> Result<Device, String> {
        let n = self.ordinal;
        let (name, feature) = match self.kind {
            DeviceKind::Cpu => return Ok(Device::Cpu),
            DeviceKind::Cuda => ("cuda", "cuda"),
            DeviceKind::Metal => ("metal", "metal"),
        };
        let opened = match self.kind {
            DeviceKind::Cuda => Device::new_cuda(n),
            _ => Device::new_metal(n),
        };
        opened.map_err(|e| {
            format!(
                "--device {name}:{n}: {e} (a build for it takes `--features {feature}`; README, \"GPUs\")"
            )
        })
    }
}

impl std::str::FromStr for KernelChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(KernelChoice::Auto),
            "cpu" => Ok(KernelChoice::Cpu),
            "portable" => Ok(KernelChoice::Portable),
            _ => Err(format!("`{s}`: expected auto, cpu or portable")),
        }
    }
}

/// What `--kernels` asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KernelChoice {
    /// The CPU kernels on the CPU, the portable path elsewhere (flash-attn on CUDA when built
    /// with the `flash-attn` feature).
    #[default]
    Auto,
    /// The CPU kernels; the CPU only.
    Cpu,
    /// The portable path, on any device.
    Portable,
}

/// The kernels `choice` means on `device`, or why it cannot run there.
pub fn kernels_for(device: DeviceKind, choice: KernelChoice) -> Result<Kernels, String> {
    Ok(match (choice, device) {
        (KernelChoice::Cpu, DeviceKind::Cpu) | (KernelChoice::Auto, DeviceKind::Cpu) => {
            Kernels::Cpu
        }
        (KernelChoice::Cpu, other) => {
            return Err(format!(
                "--kernels cpu runs on the CPU only, not on {other:?}; use auto or portable"
            ))
        }
        (KernelChoice::Auto, DeviceKind::Cuda) if cfg!(feature = "flash-attn") => {
            Kernels::FlashAttn
        }
        (KernelChoice::Portable, DeviceKind::Cpu) => Kernels::Portable { gpu: false },
        (KernelChoice::Auto, _) | (KernelChoice::Portable, _) => Kernels::Portable { gpu: true },
    })
}
