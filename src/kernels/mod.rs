//! kdmcse's own CUDA kernels (`*.cu` beside this file: dropout masks, the fused training ops,
//! AdamW updates), compiled at run time with NVRTC to a cubin for the device's own architecture
//! (machine code: no PTX for the driver to JIT, so an NVRTC newer than the driver cannot produce
//! PTX it refuses), once per process, module and device. Each kernel does exactly what its CPU twin
//! does; the tests build the `.cu` files for the host (threads and a barrier standing in for a
//! block, [`host`]) and compare them with the CPU code, so the arithmetic is checked on machines
//! without a GPU. The ops that launch them live in `crate::ops`.

/// A kernel source: its module name and CUDA C++ text.
#[cfg(any(feature = "cuda", test))]
#[derive(Clone, Copy)]
pub(crate) struct Module {
    name: &'static str,
    source: &'static str,
}

#[cfg(any(feature = "cuda", test))]
pub(crate) const DROPOUT: Module = Module { name: "kdmcse_dropout", source: include_str!("dropout.cu") };
#[cfg(any(feature = "cuda", test))]
pub(crate) const OPS: Module = Module { name: "kdmcse_ops", source: include_str!("ops.cu") };
#[cfg(any(feature = "cuda", test))]
pub(crate) const ADAMW: Module = Module { name: "kdmcse_adamw", source: include_str!("adamw.cu") };

/// One kernel of a module, loaded on a device, with the device's stream to launch on.
#[cfg(feature = "cuda")]
pub(crate) struct Kernel {
    name: String,
    function: candle_core::cuda_backend::cudarc::driver::CudaFunction,
    stream: std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>,
}

#[cfg(feature = "cuda")]
impl Kernel {
    /// `kernel` of `module`, loaded on `device` (compiled on first use).
    pub(crate) fn load(
        device: &candle_core::CudaDevice,
        module: Module,
        kernel: &str,
    ) -> candle_core::Result<Self> {
        let stream = device.cuda_stream();
        let function = cuda::module(stream.context(), module)?
            .load_function(kernel)
            .map_err(|e| candle_core::Error::Cuda(format!("{}::{kernel}: {e}", module.name).into()))?;
        Ok(Self { name: format!("{}::{kernel}", module.name), function, stream })
    }

    /// An argument list to push the kernel's parameters onto, in its signature's order.
    pub(crate) fn args(&self) -> candle_core::cuda_backend::cudarc::driver::LaunchArgs<'_> {
        self.stream.launch_builder(&self.function)
    }

    /// Launches the kernel with `args` (from [`Self::args`]).
    ///
    /// # Safety
    /// `args` must match the kernel's signature in its `.cu` file, and every buffer must hold the
    /// elements the kernel touches under `config`.
    pub(crate) unsafe fn launch(
        &self,
        mut args: candle_core::cuda_backend::cudarc::driver::LaunchArgs<'_>,
        config: candle_core::cuda_backend::cudarc::driver::LaunchConfig,
    ) -> candle_core::Result<()> {
        unsafe { args.launch(config) }
            .map_err(|e| candle_core::Error::Cuda(format!("{}: {e}", self.name).into()))?;
        Ok(())
    }
}

/// Compiles and loads every module on `device`; on a GPU, says which NVRTC, driver and
/// architecture (`None` on the CPU: nothing to load).
pub(crate) fn load_all(device: &candle_core::Device) -> candle_core::Result<Option<String>> {
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(cuda) = device {
        let stream = cuda.cuda_stream();
        for module in [DROPOUT, OPS, ADAMW] {
            cuda::module(stream.context(), module)?;
        }
        return Ok(Some(cuda::versions(stream.context())?));
    }
    let _ = device;
    Ok(None)
}

/// NVRTC compilation to cubins and the per-device module cache.
#[cfg(feature = "cuda")]
mod cuda {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex, OnceLock};

    use candle_core::cuda_backend::cudarc::driver::{self, CudaContext, CudaModule};
    use candle_core::cuda_backend::cudarc::nvrtc;
    use candle_core::{Error, Result};

    use super::Module;

    fn cuda_error(what: impl std::fmt::Display) -> Error {
        Error::Cuda(what.to_string().into())
    }

    /// `module` on the device of `context`, compiled for its architecture on first use and kept
    /// for the process.
    pub(super) fn module(context: &Arc<CudaContext>, module: Module) -> Result<Arc<CudaModule>> {
        /// Loaded modules by (device ordinal, module name).
        type Loaded = HashMap<(usize, &'static str), Arc<CudaModule>>;
        static LOADED: OnceLock<Mutex<Loaded>> = OnceLock::new();
        let key = (context.ordinal(), module.name);
        let mut loaded = LOADED.get_or_init(Default::default).lock().expect("module cache lock");
        if let Some(m) = loaded.get(&key) {
            return Ok(m.clone());
        }
        let (major, minor) = context.compute_capability().map_err(cuda_error)?;
        let cubin = compile_cubin(module, &format!("sm_{major}{minor}"))?;
        let loaded_module = context
            .load_module(nvrtc::Ptx::from_binary(cubin))
            .map_err(|e| cuda_error(format!("loading {} (sm_{major}{minor}): {e}", module.name)))?;
        tracing::debug!(module = module.name, arch = %format!("sm_{major}{minor}"), "CUDA kernels loaded");
        loaded.insert(key, loaded_module.clone());
        Ok(loaded_module)
    }

    /// The cubin of `module` for `arch` (`sm_90`), from NVRTC.
    fn compile_cubin(module: Module, arch: &str) -> Result<Vec<u8>> {
        let fail = |step: &str, e: nvrtc::result::NvrtcError| {
            cuda_error(format!("NVRTC {step} {}: {e:?}", module.name))
        };
        let source = std::ffi::CString::new(module.source).expect("kernel sources hold no NUL");
        let name = std::ffi::CString::new(module.name).expect("module names hold no NUL");
        let program = nvrtc::result::create_program(&source, Some(&name)).map_err(|e| fail("create", e))?;
        let options = [format!("--gpu-architecture={arch}")];
        // SAFETY: `program` was just created and is destroyed below, once.
        let compiled = unsafe { nvrtc::result::compile_program(program, &options) };
        let cubin = compiled.map_err(|e| {
            // SAFETY: as above; the log is read before the program is destroyed.
            let log = unsafe { nvrtc::result::get_program_log(program) }.unwrap_or_default();
            let log: String = log.iter().map(|&c| c as u8 as char).collect();
            cuda_error(format!("NVRTC compiling {} for {arch}: {e:?}\n{log}", module.name))
        });
        let cubin = cubin.and_then(|()| {
            let mut size = 0usize;
            // SAFETY: a compiled program; `data` holds the `size` bytes NVRTC reports.
            unsafe { nvrtc::sys::nvrtcGetCUBINSize(program, &mut size) }
                .result()
                .map_err(|e| fail("cubin size", e))?;
            let mut data = vec![0u8; size];
            unsafe { nvrtc::sys::nvrtcGetCUBIN(program, data.as_mut_ptr().cast()) }
                .result()
                .map_err(|e| fail("cubin", e))?;
            Ok(data)
        });
        // SAFETY: created above and not yet destroyed.
        let _ = unsafe { nvrtc::result::destroy_program(program) };
        cubin
    }

    /// "NVRTC 13.0, driver CUDA 13.0, sm_90", read from the libraries actually loaded.
    pub(super) fn versions(context: &Arc<CudaContext>) -> Result<String> {
        let (mut major, mut minor, mut driver) = (0, 0, 0);
        // SAFETY: plain out-parameters.
        unsafe { nvrtc::sys::nvrtcVersion(&mut major, &mut minor) }
            .result()
            .map_err(|e| cuda_error(format!("nvrtcVersion: {e:?}")))?;
        unsafe { driver::sys::cuDriverGetVersion(&mut driver) }
            .result()
            .map_err(|e| cuda_error(format!("cuDriverGetVersion: {e:?}")))?;
        let (cc_major, cc_minor) = context.compute_capability().map_err(cuda_error)?;
        Ok(format!(
            "NVRTC {major}.{minor}, driver CUDA {}.{}, sm_{cc_major}{cc_minor}; modules compiled to cubins",
            driver / 1000,
            driver % 1000 / 10
        ))
    }
}

#[cfg(test)]
pub(crate) mod host {
    //! The kernels built for the host, run as on a GPU: `launch(grid, block, kernel)` runs the
    //! blocks one after another and the `block` threads of each at once, on real threads, so
    //! `__syncthreads()` is a barrier they all wait at and `__shared__` memory is the block's.
    //! Block reductions, grid-stride loops and the block sizes the launches choose are exercised.

    use std::path::{Path, PathBuf};

    const SHIM: &str = r#"#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>
#define __global__
#define __device__
#define __forceinline__ inline
// One block runs at a time, so a function-local static is exactly the running block's memory.
#define __shared__ static
struct Dim { unsigned int x; };
static thread_local Dim threadIdx{0}, blockIdx{0};
static Dim blockDim{1}, gridDim{1};
static std::barrier<> *block_barrier = nullptr;
#define __syncthreads() block_barrier->arrive_and_wait()
template <class Kernel> static void launch(unsigned grid, unsigned block, Kernel kernel) {
    gridDim.x = grid;
    blockDim.x = block;
    for (unsigned b = 0; b < grid; b++) {
        std::barrier<> barrier(block);
        block_barrier = &barrier;
        std::vector<std::thread> threads;
        for (unsigned t = 0; t < block; t++)
            threads.emplace_back([&kernel, b, t] { blockIdx.x = b; threadIdx.x = t; kernel(); });
        for (auto &thread : threads) thread.join();
    }
}
// `n` floats from standard input, and floats to standard output, as the bits of each in decimal
// (what `run` sends and reads).
static std::vector<float> read(size_t n) {
    std::vector<float> v(n);
    for (size_t i = 0; i < n; i++) { unsigned u; if (scanf("%u", &u) != 1) exit(3); memcpy(&v[i], &u, 4); }
    return v;
}
static void print(const std::vector<float> &xs) {
    for (float f : xs) { unsigned u; memcpy(&u, &f, 4); printf("%u\n", u); }
}
// CUDA's bit-cast intrinsic.
static inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
// The grid of a one-thread-per-element launch of n elements in blocks of `block`.
static unsigned blocks_for(size_t n, unsigned block) { return (unsigned)((n + block - 1) / block); }
"#;

    /// Compiles `main` (C++ launching the kernels of `module` with `launch`) into an executable
    /// in `dir`.
    pub(crate) fn compile(dir: &Path, module: super::Module, main: &str) -> PathBuf {
        let source = dir.join("harness.cpp");
        let threads = format!("#define ELEMENTWISE_THREADS {}\n", crate::ops::launch::ELEMENTWISE_THREADS);
        std::fs::write(&source, format!("{SHIM}{threads}{}\n{main}", module.source)).unwrap();
        let exe = dir.join("harness");
        let status = std::process::Command::new("c++")
            .args(["-O1", "-std=c++20", "-pthread", "-o"])
            .arg(&exe)
            .arg(&source)
            .status()
            .expect("a C++ compiler (c++) on PATH");
        assert!(status.success(), "compiling {} for the host", module.name);
        exe
    }

    /// Asserts that a harness's outputs equal the CPU op's to 1e-5 (relative above 1): block
    /// reductions sum in tree order, the CPU in row or lane order, so they agree to rounding.
    pub(crate) fn assert_close(host: &[f32], cpu: &candle_core::Tensor, what: &str) {
        let cpu = cpu.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(host.len(), cpu.len(), "{what}: length");
        for (i, (h, c)) in host.iter().zip(&cpu).enumerate() {
            assert!((h - c).abs() <= 1e-5 * c.abs().max(1.0), "{what}[{i}]: host {h} vs cpu {c}");
        }
    }

    /// Runs a harness from [`compile`] with `args` and `input` on its standard input, and reads
    /// what it prints: every value travels as the decimal bit pattern of an f32, one a line.
    pub(crate) fn run(exe: &Path, args: &[String], input: &[f32]) -> Vec<f32> {
        use std::io::Write;
        let mut child = std::process::Command::new(exe)
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let text: String = input.iter().map(|x| format!("{}\n", x.to_bits())).collect();
        child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{} {args:?} failed", exe.display());
        String::from_utf8(out.stdout).unwrap().lines().map(|l| f32::from_bits(l.parse().unwrap())).collect()
    }
}
