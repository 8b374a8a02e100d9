//! The GPU collective backend: NCCL through cudarc (the `cuda` feature). Tensors move between
//! GPUs with NCCL on the trainer's own CUDA stream; small control messages (states, flags) go over
//! the TCP mesh built at rendezvous. Rank 0 makes the NCCL unique id and publishes it in the
//! rendezvous store.

use std::cell::Cell;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp};
use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};

use super::contract::RoundKeys;
use super::store::{Keep, Store};
use super::tcp::TcpCommunicator;
use super::watchdog::Abort;
use super::Communicator;

/// The NCCL communicator, which the watchdog's thread takes and drops (cudarc's `Comm` drops with
/// `ncclCommAbort`) to unblock a collective that waits for a lost peer; collectives find it gone.
struct SharedComm(Mutex<Option<Comm>>);

// SAFETY: every use of the communicator goes through the mutex, and the one use from another
// thread is its abort, which NCCL allows from any thread ("ncclCommAbort ... to recover from a
// hang": NCCL's fault-tolerance guide).
unsafe impl Send for SharedComm {}
unsafe impl Sync for SharedComm {}

pub struct NcclCommunicator {
    comm: Arc<SharedComm>,
    abort: Arc<Abort>,
    device: Device,
    control: TcpCommunicator,
    busy: Cell<Duration>,
}

fn nccl_error(e: impl std::fmt::Debug) -> candle_core::Error {
    candle_core::Error::Cuda(format!("nccl: {e:?}").into())
}

impl NcclCommunicator {
    /// Creates the NCCL communicator on `device` (the trainer's CUDA device, so that NCCL runs on
    /// its stream); `control` carries byte messages; `abort` aborts the communicator.
    pub fn connect(
        store: &mut dyn Store,
        keys: &RoundKeys,
        control: TcpCommunicator,
        device: &Device,
        timeout: Duration,
        abort: &Arc<Abort>,
    ) -> Result<Self> {
        let (rank, world_size) = (control.rank(), control.world_size());
        let cuda = device.as_cuda_device().context("the NCCL backend needs a CUDA device")?;
        let key = keys.nccl_id();
        let id = if rank == 0 {
            let id = Id::new().map_err(nccl_error)?;
            let bytes: Vec<u8> = id.internal().iter().map(|&c| c as u8).collect();
            store.set(&key, &bytes, Keep::WhileAlive)?;
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
        let comm = Arc::new(SharedComm(Mutex::new(Some(comm))));
        let shared = Arc::clone(&comm);
        abort.on_abort(Box::new(move || drop(shared.0.lock().expect("nccl lock").take())));
        Ok(Self {
            comm,
            abort: Arc::clone(abort),
            device: device.clone(),
            control,
            busy: Cell::new(Duration::ZERO),
        })
    }

    /// Runs `collective` on `tensor` as f32 on this communicator's GPU and returns the result on
    /// the tensor's own device and dtype. The lock is held while NCCL enqueues the collective, not
    /// while the stream waits for it, so an abort can always take the communicator.
    fn run(&self, name: &'static str, tensor: &Tensor, collective: Collective) -> Result<Tensor> {
        super::flight::record(name, tensor.elem_count() * 4, &self.busy, || {
            let input = tensor.to_device(&self.device)?.to_dtype(DType::F32)?.contiguous()?;
            let out = {
                let comm = self.comm.0.lock().expect("nccl lock");
                let Some(comm) = comm.as_ref() else {
                    let verdict = self.abort.verdict().unwrap_or("aborted");
                    anyhow::bail!("{verdict}; NCCL {name} at step {} refused", super::flight::step());
                };
                input.apply_op1_no_bwd(&NcclOp { comm, collective })?
            };
            Ok(out.to_dtype(tensor.dtype())?.to_device(tensor.device())?)
        })
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
        self.run("all_gather", local, Collective::AllGather)
    }

    fn all_reduce_sum(&self, tensor: &Tensor) -> Result<Tensor> {
        self.run("all_reduce_sum", tensor, Collective::AllReduce)
    }

    fn broadcast(&self, tensor: &Tensor, root: usize) -> Result<Tensor> {
        self.run("broadcast", tensor, Collective::Broadcast(root))
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
