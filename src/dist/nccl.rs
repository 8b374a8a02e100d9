//! The GPU collective backend: NCCL through cudarc (the `cuda` feature). Tensors move between
//! GPUs with NCCL on the trainer's own CUDA stream; small control messages (states, flags) go over
//! the TCP mesh built at rendezvous. Rank 0 makes the NCCL unique id and publishes it in the
//! rendezvous store.

use std::cell::Cell;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp};
use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};

use super::store::StoreClient;
use super::tcp::TcpCommunicator;
use super::Communicator;

pub struct NcclCommunicator {
    comm: Comm,
    device: Device,
    control: TcpCommunicator,
    busy: Cell<Duration>,
}

fn nccl_error(e: impl std::fmt::Debug) -> candle_core::Error {
    candle_core::Error::Cuda(format!("nccl: {e:?}").into())
}

impl NcclCommunicator {
    /// Creates the NCCL communicator on `device` (the trainer's CUDA device, so that NCCL runs on
    /// its stream); `control` carries byte messages.
    pub fn connect(
        store: &mut StoreClient,
        control: TcpCommunicator,
        device: &Device,
        timeout: Duration,
    ) -> Result<Self> {
        let (rank, world_size) = (control.rank(), control.world_size());
        let cuda = device.as_cuda_device().context("the NCCL backend needs a CUDA device")?;
        let key = "kdmcse/nccl-id".to_owned();
        let id = if rank == 0 {
            let id = Id::new().map_err(nccl_error)?;
            let bytes: Vec<u8> = id.internal().iter().map(|&c| c as u8).collect();
            store.set(&key, &bytes)?;
            id
        } else {
            let bytes = store.wait_all("the NCCL id from rank 0", &[(0, key)], timeout)?.remove(0);
            let mut internal = [0 as std::ffi::c_char; 128];
            for (dst, src) in internal.iter_mut().zip(&bytes) {
                *dst = *src as std::ffi::c_char;
            }
            Id::uninit(internal)
        };
        let comm = Comm::from_rank(cuda.cuda_stream(), rank, world_size, id).map_err(nccl_error)?;
        Ok(Self { comm, device: device.clone(), control, busy: Cell::new(Duration::ZERO) })
    }

    /// Runs `op` on `tensor` as f32 on this communicator's GPU and returns the result on the
    /// tensor's own device and dtype.
    fn run(&self, tensor: &Tensor, op: &dyn Fn(&Tensor) -> candle_core::Result<Tensor>) -> Result<Tensor> {
        let started = Instant::now();
        let input = tensor.to_device(&self.device)?.to_dtype(DType::F32)?.contiguous()?;
        let out = op(&input)?.to_dtype(tensor.dtype())?.to_device(tensor.device())?;
        self.busy.set(self.busy.get() + started.elapsed());
        Ok(out)
    }
}

enum Collective {
    AllReduce,
    AllGather,
    Broadcast(usize),
}

/// One NCCL collective as a candle op, so it can read and write CUDA storage.
struct NcclOp<'a> {
    comm: &'a Comm,
    collective: Collective,
}

impl CustomOp1 for NcclOp<'_> {
    fn name(&self) -> &'static str {
        "nccl"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("NCCL collectives run on CUDA tensors")
    }

    fn cuda_fwd(&self, storage: &CudaStorage, layout: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("nccl: input must be contiguous".into()))?;
        let src = storage.as_cuda_slice::<f32>()?.slice(start..end);
        let device = storage.device().clone();
        let n = end - start;
        let world = self.comm.world_size();
        let (len, shape) = match self.collective {
            Collective::AllGather => {
                let mut dims = layout.dims().to_vec();
                dims[0] *= world;
                (n * world, Shape::from(dims))
            }
            _ => (n, layout.shape().clone()),
        };
        let mut dst = device.alloc_zeros::<f32>(len)?;
        match self.collective {
            Collective::AllReduce => self.comm.all_reduce(&src, &mut dst, &ReduceOp::Sum).map(|_| ()),
            Collective::AllGather => self.comm.all_gather(&src, &mut dst).map(|_| ()),
            Collective::Broadcast(root) => self.comm.broadcast(Some(&src), &mut dst, root as i32).map(|_| ()),
        }
        .map_err(nccl_error)?;
        Ok((CudaStorage::wrap_cuda_slice(dst, device), shape))
    }
}

impl Communicator for NcclCommunicator {
    fn rank(&self) -> usize {
        self.control.rank()
    }

    fn world_size(&self) -> usize {
        self.control.world_size()
    }

    fn all_gather(&self, local: &Tensor) -> Result<Tensor> {
        let op = NcclOp { comm: &self.comm, collective: Collective::AllGather };
        self.run(local, &|t| t.apply_op1_no_bwd(&op))
    }

    fn all_reduce_sum(&self, tensor: &Tensor) -> Result<Tensor> {
        let op = NcclOp { comm: &self.comm, collective: Collective::AllReduce };
        self.run(tensor, &|t| t.apply_op1_no_bwd(&op))
    }

    fn broadcast(&self, tensor: &Tensor, root: usize) -> Result<Tensor> {
        let op = NcclOp { comm: &self.comm, collective: Collective::Broadcast(root) };
        self.run(tensor, &|t| t.apply_op1_no_bwd(&op))
    }

    fn barrier(&self) -> Result<()> {
        self.device.synchronize()?;
        self.control.barrier()
    }

    fn all_gather_bytes(&self, data: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.control.all_gather_bytes(data)
    }

    fn time_in_collectives(&self) -> Duration {
        self.busy.get() + self.control.time_in_collectives()
    }
}
