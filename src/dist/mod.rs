//! Collectives between training processes: the [`Communicator`] interface the trainer uses to
//! gather embeddings and teacher features (global negatives) and to all-reduce gradients, and
//! [`init_from_env`], which joins a job from the launcher's environment (`RANK`, `WORLD_SIZE`,
//! `MASTER_ADDR`, `MASTER_PORT`, as torchrun sets them, and `KDMCSE_RUN_ID`/`KDMCSE_ROUND`
//! from `kdmcse-launch`) and starts the rank's [`watchdog`].
//!
//! Backends: [`SingleProcess`] (a world of one), [`tcp::TcpCommunicator`], a TCP mesh for
//! development, tests and CPU boxes, and `nccl::NcclCommunicator` (the `cuda` feature), the
//! engine for real GPU runs, chosen when the trainer's device is a GPU.

pub mod contract;
pub mod etcd;
pub mod flight;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod store;
pub mod tcp;
pub mod watchdog;

use std::net::{ToSocketAddrs, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use candle_core::Tensor;

use contract::env;

/// All-gather, all-reduce (sum), broadcast and barrier over the ranks of one training job.
/// Every rank calls each collective in the same order with tensors of the same shape.
pub trait Communicator {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Every rank's `local`, concatenated along dimension 0 in rank order.
    fn all_gather(&self, local: &Tensor) -> Result<Tensor>;
    /// The elementwise sum over ranks.
    fn all_reduce_sum(&self, tensor: &Tensor) -> Result<Tensor>;
    /// `root`'s tensor on every rank.
    fn broadcast(&self, tensor: &Tensor, root: usize) -> Result<Tensor>;
    fn barrier(&self) -> Result<()>;
    /// Every rank's bytes, in rank order (small control messages: states, flags).
    fn all_gather_bytes(&self, data: &[u8]) -> Result<Vec<Vec<u8>>>;
    /// Wall time spent in collectives so far (for the communication share in metrics).
    fn time_in_collectives(&self) -> Duration {
        Duration::ZERO
    }
}

/// One process: every collective is the identity.
pub struct SingleProcess;

impl Communicator for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_gather(&self, local: &Tensor) -> Result<Tensor> {
        Ok(local.clone())
    }
    fn all_reduce_sum(&self, tensor: &Tensor) -> Result<Tensor> {
        Ok(tensor.clone())
    }
    fn broadcast(&self, tensor: &Tensor, _root: usize) -> Result<Tensor> {
        Ok(tensor.clone())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn all_gather_bytes(&self, data: &[u8]) -> Result<Vec<Vec<u8>>> {
        Ok(vec![data.to_vec()])
    }
}

/// The elementwise sums over ranks of several tensors, in one all-reduce of their flattened
/// concatenation (one large message instead of one per tensor).
pub fn all_reduce_together(comm: &dyn Communicator, tensors: &[&Tensor]) -> Result<Vec<Tensor>> {
    let flat = tensors.iter().map(|t| t.flatten_all()).collect::<candle_core::Result<Vec<_>>>()?;
    let summed = comm.all_reduce_sum(&Tensor::cat(&flat, 0)?)?;
    let mut offset = 0;
    let mut out = Vec::with_capacity(tensors.len());
    for t in tensors {
        out.push(summed.narrow(0, offset, t.elem_count())?.reshape(t.shape())?);
        offset += t.elem_count();
    }
    Ok(out)
}

/// This rank's rows of the gradients with respect to a pool gathered from every rank (rank `r`
/// owning rows `r * rows .. (r + 1) * rows` of each tensor). Each rank's loss rows reach every
/// column of the pool, so the gradient of the global loss with respect to a column is the sum of
/// every rank's gradient; one all-reduce carries all the tensors.
pub fn own_rows_of_pool_grads(
    comm: &dyn Communicator,
    pool_grads: &[Tensor],
    rows: usize,
) -> Result<Vec<Tensor>> {
    let start = comm.rank() * rows;
    let summed = if comm.world_size() == 1 {
        pool_grads.to_vec()
    } else {
        all_reduce_together(comm, &pool_grads.iter().collect::<Vec<_>>())?
    };
    summed.iter().map(|g| Ok(g.narrow(0, start, rows)?)).collect()
}

/// Elements per all-reduce bucket (PyTorch DDP's 25 MB of f32).
const BUCKET_ELEMENTS: usize = 25 << 18;

/// Sums gradients over ranks, packed into buckets of about 25 MB so each collective moves a
/// large message. `None` (a parameter without gradient this step, the same on every rank) stays.
pub fn all_reduce_grads(comm: &dyn Communicator, grads: Vec<Option<Tensor>>) -> Result<Vec<Option<Tensor>>> {
    if comm.world_size() == 1 {
        return Ok(grads);
    }
    let mut out: Vec<Option<Tensor>> = vec![None; grads.len()];
    let present: Vec<(usize, &Tensor)> =
        grads.iter().enumerate().filter_map(|(i, g)| Some((i, g.as_ref()?))).collect();
    let mut start = 0;
    while start < present.len() {
        // A bucket closes with the tensor that takes it to BUCKET_ELEMENTS.
        let mut end = start;
        let mut size = 0;
        while end < present.len() && size < BUCKET_ELEMENTS {
            size += present[end].1.elem_count();
            end += 1;
        }
        let bucket = &present[start..end];
        let summed = all_reduce_together(comm, &bucket.iter().map(|(_, g)| *g).collect::<Vec<_>>())?;
        for ((i, _), sum) in bucket.iter().zip(summed) {
            out[*i] = Some(sum);
        }
        start = end;
    }
    Ok(out)
}

/// A joined job: the communicator, what aborts it, the launcher's round, the rank's watchdog,
/// and the rendezvous store rank 0 hosts when no launcher does. (Fields drop in this order: the
/// watchdog's last heartbeat still reaches the store.)
pub struct ProcessGroup {
    pub comm: Box<dyn Communicator>,
    pub abort: Arc<watchdog::Abort>,
    /// The launcher's rendezvous round (`KDMCSE_ROUND`), 0 without a launcher.
    pub round: u64,
    _watchdog: Option<watchdog::Watchdog>,
    /// This rank's rendezvous client, kept for the group's life: the keys it published (its
    /// collective address), which a slower peer may not have read yet, live as long as it does.
    _client: Option<Box<dyn store::Store>>,
    _store: Option<store::StoreServer>,
}

impl ProcessGroup {
    fn single() -> Self {
        Self {
            comm: Box::new(SingleProcess),
            abort: Arc::default(),
            round: 0,
            _watchdog: None,
            _client: None,
            _store: None,
        }
    }
}

fn env_usize(name: &str) -> Result<Option<usize>> {
    match std::env::var(name) {
        Ok(v) => v.trim().parse().map(Some).with_context(|| format!("{name}={v:?} is not a number")),
        Err(_) => Ok(None),
    }
}

/// How long rendezvous and every collective may wait (`KDMCSE_TIMEOUT` seconds, default 600).
pub fn timeout_from_env() -> Result<Duration> {
    let seconds = env_usize(env::TIMEOUT)?.map_or(contract::DEFAULT_TIMEOUT_S, |s| s as u64);
    Ok(Duration::from_secs(seconds))
}

/// When a GPU job builds an NCCL communicator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nccl {
    /// With more than one rank: a world of one has nothing to exchange (every collective is the
    /// identity), so it would only pay NCCL's start-up and its failure modes.
    WhenNeeded,
    /// Always, to test it (`kdmcse check`).
    Always,
}

/// Where the rendezvous store is and which keys belong to this worker group.
struct Rendezvous {
    keys: contract::RoundKeys,
    round: u64,
    /// Whether this process hosts the store: rank 0 when no launcher does.
    host_store: bool,
}

fn rendezvous_from_env(rank: usize) -> Result<Rendezvous> {
    match (std::env::var(env::RUN_ID), env_usize(env::ROUND)?) {
        (Ok(run), Some(round)) => {
            let round = round as u64;
            Ok(Rendezvous { keys: contract::RoundKeys::new(&run, round), round, host_store: false })
        }
        _ => Ok(Rendezvous { keys: contract::RoundKeys::unlaunched(), round: 0, host_store: rank == 0 }),
    }
}

/// Joins the job described by the environment: a single process without `WORLD_SIZE`, else the
/// TCP mesh (and NCCL on top of it when `device` is a GPU, as `nccl` says), rendezvousing through
/// the store at `MASTER_ADDR:MASTER_PORT`, with a watchdog on the other ranks' heartbeats when
/// there are any. A launched world of one joins too, as under torchrun, so it meets the same
/// rendezvous as eight.
pub fn init_from_env(
    device: &candle_core::Device,
    nccl: Nccl,
    liveness: watchdog::Liveness,
) -> Result<ProcessGroup> {
    let Some(world_size) = env_usize(env::WORLD_SIZE)? else {
        return Ok(ProcessGroup::single());
    };
    if world_size == 0 {
        anyhow::bail!("WORLD_SIZE=0: a job needs at least one rank");
    }
    let rank = env_usize(env::RANK)?.context("WORLD_SIZE is set but RANK is not")?;
    if rank >= world_size {
        anyhow::bail!("RANK={rank} is not below WORLD_SIZE={world_size}");
    }
    let address = store::StoreAddress::from_env()?;
    let timeout = timeout_from_env()?;
    let rdzv = rendezvous_from_env(rank)?;
    let server = match (&address, rdzv.host_store) {
        (store::StoreAddress::Tcp(addr), true) => {
            let port = addr.rsplit_once(':').map_or("", |(_, port)| port);
            Some(store::StoreServer::start(&format!("0.0.0.0:{port}"))?)
        }
        _ => None,
    };
    let mut client = address.connect(timeout).with_context(|| format!("rank {rank}: cannot join the job"))?;
    let ip = advertise_ip(address.route_target())?;
    let abort = Arc::new(watchdog::Abort::default());
    let tcp = tcp::TcpCommunicator::connect(
        client.as_mut(),
        rank,
        world_size,
        &ip,
        &rdzv.keys,
        timeout,
        abort.clone(),
    )
    .with_context(|| format!("rank {rank}: collectives setup failed"))?;
    let use_nccl = !device.is_cpu() && (world_size > 1 || nccl == Nccl::Always);
    let comm: Box<dyn Communicator> = if use_nccl {
        gpu_communicator(client.as_mut(), &rdzv.keys, tcp, device, timeout, &abort)?
    } else {
        Box::new(tcp)
    };
    let watchdog = (world_size > 1)
        .then(|| watchdog::Watchdog::start(&address, &rdzv.keys, rank, world_size, liveness, abort.clone()))
        .transpose()?;
    let backend = if use_nccl { "NCCL" } else { "TCP" };
    tracing::info!(rank, world_size, store = %address, backend, round = rdzv.round, "joined the job");
    crate::events::emit(
        "joined",
        serde_json::json!({
            "rank": rank, "world_size": world_size, "backend": backend, "round": rdzv.round,
            "pid": std::process::id(),
        }),
    );
    Ok(ProcessGroup {
        comm,
        abort,
        round: rdzv.round,
        _watchdog: watchdog,
        _client: Some(client),
        _store: server,
    })
}

#[cfg(feature = "cuda")]
fn gpu_communicator(
    client: &mut dyn store::Store,
    keys: &contract::RoundKeys,
    tcp: tcp::TcpCommunicator,
    device: &candle_core::Device,
    timeout: Duration,
    abort: &Arc<watchdog::Abort>,
) -> Result<Box<dyn Communicator>> {
    Ok(Box::new(nccl::NcclCommunicator::connect(client, keys, tcp, device, timeout, abort)?))
}

#[cfg(not(feature = "cuda"))]
fn gpu_communicator(
    _: &mut dyn store::Store,
    _: &contract::RoundKeys,
    _: tcp::TcpCommunicator,
    device: &candle_core::Device,
    _: Duration,
    _: &Arc<watchdog::Abort>,
) -> Result<Box<dyn Communicator>> {
    anyhow::bail!("{device:?}: GPU collectives need a build with the `cuda` feature")
}

/// The local address other ranks reach this one at: the interface that routes to the master.
fn advertise_ip(master_addr: &str) -> Result<String> {
    let target = master_addr
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve {master_addr}"))?
        .next()
        .with_context(|| format!("{master_addr} has no address"))?;
    if target.ip().is_loopback() {
        return Ok(target.ip().to_string());
    }
    let socket = UdpSocket::bind(("0.0.0.0", 0))?;
    socket.connect(target)?; // no packet is sent: this only picks the route
    Ok(socket.local_addr()?.ip().to_string())
}
