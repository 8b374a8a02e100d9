//! Which device a process computes on, as `train.device` and every `--device` spell it: `cpu`,
//! `cuda` (this worker's GPU) or `cuda:N`.

use std::fmt;
use std::str::FromStr;

use anyhow::Result;
use candle_core::Device;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    #[default]
    Cpu,
    /// This worker's GPU: the one the launcher left visible, else the `LOCAL_RANK`-th.
    Cuda,
    /// GPU number N of those visible.
    CudaOrdinal(usize),
}

impl DeviceSpec {
    /// Opens the device.
    pub fn device(self) -> Result<Device> {
        let ordinal = match self {
            DeviceSpec::Cpu => return Ok(Device::Cpu),
            DeviceSpec::Cuda => {
                // The launcher pins each worker to one GPU through CUDA_VISIBLE_DEVICES; otherwise
                // the worker's GPU is its LOCAL_RANK.
                let pinned = std::env::var("CUDA_VISIBLE_DEVICES").is_ok_and(|v| !v.contains(','));
                let local_rank = std::env::var("LOCAL_RANK").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
                if pinned {
                    0
                } else {
                    local_rank
                }
            }
            DeviceSpec::CudaOrdinal(ordinal) => ordinal,
        };
        let device = Device::new_cuda(ordinal)?;
        #[cfg(feature = "cuda")]
        one_stream_settings(&device)?;
        Ok(device)
    }

    pub fn is_gpu(self) -> bool {
        self != DeviceSpec::Cpu
    }
}

/// Settings for a device whose every kernel and collective runs on one stream (candle's, which
/// NCCL shares): no per-allocation event tracking (it orders uses across streams, and costs an
/// event record per use), and a memory pool that keeps what it has instead of returning it to
/// the driver at every synchronisation.
#[cfg(feature = "cuda")]
fn one_stream_settings(device: &Device) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let stream = device.as_cuda_device()?.cuda_stream();
    let context = stream.context();
    // SAFETY: one stream per device (above), so no allocation is ever used on another stream.
    unsafe { context.disable_event_tracking() };
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut keep_all = u64::MAX;
    // SAFETY: out-parameter and attribute value of the sizes the driver API documents.
    unsafe {
        sys::cuDeviceGetDefaultMemPool(&mut pool, context.cu_device()).result()?;
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut keep_all as *mut u64).cast(),
        )
        .result()?;
    }
    Ok(())
}

impl FromStr for DeviceSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda),
            _ => match s.strip_prefix("cuda:").map(str::parse) {
                Some(Ok(ordinal)) => Ok(DeviceSpec::CudaOrdinal(ordinal)),
                _ => Err(format!("unknown device {s:?}: expected cpu, cuda or cuda:N")),
            },
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda => f.write_str("cuda"),
            DeviceSpec::CudaOrdinal(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl serde::Serialize for DeviceSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for DeviceSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_every_form() {
        for (text, spec) in
            [("cpu", DeviceSpec::Cpu), ("cuda", DeviceSpec::Cuda), ("cuda:3", DeviceSpec::CudaOrdinal(3))]
        {
            assert_eq!(text.parse::<DeviceSpec>().unwrap(), spec);
            assert_eq!(spec.to_string(), text);
        }
        for bad in ["gpu", "cuda:", "cuda:x", "CPU"] {
            assert!(bad.parse::<DeviceSpec>().unwrap_err().contains("cpu, cuda or cuda:N"), "{bad}");
        }
    }
}
