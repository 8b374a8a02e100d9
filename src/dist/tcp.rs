//! The CPU collective backend: a full mesh of TCP connections between ranks.
//!
//! This backend is for development, tests and CPU boxes. Real runs on GPUs use NCCL (the `cuda`
//! feature), which implements the same [`Communicator`] trait.
//!
//! Every collective is an all-gather of byte buffers: each rank sends its buffer to every peer
//! (from scoped sender threads, so large messages cannot deadlock) while reading theirs. A sum is
//! then computed locally in rank order, so every rank gets bit-identical results, which keeps
//! replicated weights identical.

use std::cell::Cell;
use std::io::{BufWriter, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

use super::contract::RoundKeys;
use super::store::{Keep, Store};
use super::watchdog::Abort;
use super::{flight, Communicator};

pub struct TcpCommunicator {
    rank: usize,
    world_size: usize,
    /// `peers[r]`: the connection to rank `r` (`None` for this rank). A collective writes to a
    /// peer from one thread while reading from it on another (`&TcpStream` does both).
    peers: Vec<Option<TcpStream>>,
    busy: Cell<Duration>,
    abort: Arc<Abort>,
}

impl TcpCommunicator {
    /// Builds the mesh: listens on `bind_ip`, publishes `advertise_ip:port` as this rank's TCP
    /// address of `keys` in the store, connects to lower ranks and accepts the higher ones. `timeout` bounds the rendezvous
    /// and every later receive; `abort` closes the mesh (every blocked collective then fails with
    /// its verdict).
    pub fn connect(
        store: &mut dyn Store,
        rank: usize,
        world_size: usize,
        advertise_ip: &str,
        keys: &RoundKeys,
        timeout: Duration,
        abort: Arc<Abort>,
    ) -> Result<Self> {
        let listener = TcpListener::bind((advertise_ip, 0))
            .or_else(|_| TcpListener::bind(("0.0.0.0", 0)))
            .context("collectives: cannot open a listening socket")?;
        let port = listener.local_addr()?.port();
        store.set(&keys.tcp_address(rank), format!("{advertise_ip}:{port}").as_bytes(), Keep::WhileAlive)?;
        let keys: Vec<(usize, String)> = (0..world_size).map(|r| (r, keys.tcp_address(r))).collect();
        let addrs = store.wait_all("the collective addresses of every rank", &keys, timeout)?;
        let mut peers: Vec<Option<TcpStream>> = (0..world_size).map(|_| None).collect();
        let deadline = Instant::now() + timeout;
        for (peer, addr) in addrs.iter().enumerate().take(rank) {
            let addr = String::from_utf8_lossy(addr).into_owned();
            let mut stream = connect_peer(store, &keys[peer].1, &addr, deadline)
                .with_context(|| format!("collectives: cannot reach rank {peer} at {addr}"))?;
            stream.write_all(&(rank as u64).to_le_bytes())?;
            peers[peer] = Some(stream);
        }
        listener.set_nonblocking(false)?;
        for _ in rank + 1..world_size {
            let (mut stream, _) = listener.accept()?;
            stream.set_read_timeout(Some(timeout))?;
            let mut id = [0u8; 8];
            stream.read_exact(&mut id).context("collectives: a peer connected but did not say its rank")?;
            let peer = u64::from_le_bytes(id) as usize;
            if peer <= rank || peer >= world_size || peers[peer].is_some() {
                bail!("collectives: unexpected connection from rank {peer}");
            }
            peers[peer] = Some(stream);
        }
        for stream in peers.iter().flatten() {
            stream.set_nodelay(true)?;
            stream.set_read_timeout(Some(timeout))?;
        }
        let handles =
            peers.iter().flatten().map(TcpStream::try_clone).collect::<std::io::Result<Vec<_>>>()?;
        abort.on_abort(Box::new(move || {
            for stream in &handles {
                let _ = stream.shutdown(Shutdown::Both);
            }
        }));
        Ok(Self { rank, world_size, peers, busy: Cell::new(Duration::ZERO), abort })
    }

    /// Every rank's buffer, in rank order; recorded in the flight recorder as `name`. Once the
    /// mesh is aborted every collective fails with the abort's verdict.
    fn exchange(&self, name: &'static str, data: &[u8]) -> Result<Vec<Vec<u8>>> {
        flight::record(name, data.len(), &self.busy, || {
            let result = match self.abort.verdict() {
                Some(verdict) => Err(anyhow::anyhow!("{verdict}")),
                None => self.exchange_untimed(data),
            };
            result.map_err(|err| match self.abort.verdict() {
                Some(verdict) => anyhow::anyhow!("{verdict}; {name} at step {} aborted", flight::step()),
                None => err.context(format!("{name} at step {}", flight::step())),
            })
        })
    }

    fn exchange_untimed(&self, data: &[u8]) -> Result<Vec<Vec<u8>>> {
        let mut out: Vec<Vec<u8>> = vec![Vec::new(); self.world_size];
        std::thread::scope(|scope| -> Result<()> {
            let senders: Vec<_> = self
                .peers
                .iter()
                .enumerate()
                .filter_map(|(peer, s)| s.as_ref().map(|s| (peer, s)))
                .map(|(peer, stream)| {
                    scope.spawn(move || -> Result<()> {
                        let mut writer = BufWriter::with_capacity(1 << 20, stream);
                        writer
                            .write_all(&(data.len() as u64).to_le_bytes())
                            .and_then(|()| writer.write_all(data))
                            .and_then(|()| writer.flush())
                            .map_err(|e| lost(peer, e))
                    })
                })
                .collect();
            for (peer, stream) in self.peers.iter().enumerate() {
                let Some(stream) = stream else {
                    out[peer] = data.to_vec();
                    continue;
                };
                // No read-ahead buffer: bytes past this message belong to the next collective.
                let mut reader = stream;
                let mut len = [0u8; 8];
                reader.read_exact(&mut len).map_err(|e| lost(peer, e))?;
                let mut buf = vec![0u8; u64::from_le_bytes(len) as usize];
                reader.read_exact(&mut buf).map_err(|e| lost(peer, e))?;
                out[peer] = buf;
            }
            for sender in senders {
                sender.join().expect("sender thread")?;
            }
            Ok(())
        })?;
        Ok(out)
    }
}

/// A collective's connection to `peer` failed: what that says of the peer, then the I/O error.
fn lost(peer: usize, err: std::io::Error) -> anyhow::Error {
    use std::io::ErrorKind;
    let why = match err.kind() {
        ErrorKind::UnexpectedEof
        | ErrorKind::ConnectionReset
        | ErrorKind::ConnectionAborted
        | ErrorKind::BrokenPipe => "its connection closed: its process exited or its host went down",
        ErrorKind::WouldBlock | ErrorKind::TimedOut => "it sent nothing within the collective timeout",
        _ => "the connection to it failed",
    };
    anyhow::anyhow!("collectives: lost rank {peer}: {why} ({err})")
}

/// A tensor as raw little-endian f32 bytes (the wire format of the tensor collectives, which
/// carry embeddings, features and gradients: f32, or f16/bf16 widened losslessly).
fn to_bytes(tensor: &Tensor) -> Result<(Vec<u8>, Vec<usize>, DType)> {
    let dtype = tensor.dtype();
    if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
        bail!("the TCP collectives carry float tensors, got {dtype:?}");
    }
    let data = tensor.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let bytes = data.iter().flat_map(|x| x.to_le_bytes()).collect();
    Ok((bytes, tensor.dims().to_vec(), dtype))
}

fn from_bytes(bytes: &[u8], dims: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
    let data: Vec<f32> =
        bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect();
    Ok(Tensor::from_vec(data, dims, device)?.to_dtype(dtype)?)
}

/// Connects to a lower rank's published address. A refused connection can mean a stale address:
/// a replacement joined the store of a group that is going away (its rank 0 no longer listens,
/// the store still answers). Retry while that store lives; once it is gone this attempt fails, and
/// the launcher's restart meets the new group instead of spending every restart on the old one.
fn connect_peer(store: &mut dyn Store, key: &str, addr: &str, deadline: Instant) -> Result<TcpStream> {
    const RETRY: Duration = Duration::from_millis(200);
    loop {
        match TcpStream::connect(addr) {
            Ok(stream) => return Ok(stream),
            Err(err) if Instant::now() + RETRY < deadline => {
                store.check(key).with_context(|| {
                    format!("{err}, and the rendezvous store went away: a group that was ending")
                })?;
                std::thread::sleep(RETRY);
            }
            Err(err) => return Err(err.into()),
        }
    }
}

impl Communicator for TcpCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_gather(&self, local: &Tensor) -> Result<Tensor> {
        let (bytes, dims, dtype) = to_bytes(local)?;
        let parts = self.exchange("all_gather", &bytes)?;
        let mut dims_out = dims.clone();
        dims_out[0] *= self.world_size;
        let mut all = Vec::with_capacity(bytes.len() * self.world_size);
        for (rank, part) in parts.iter().enumerate() {
            if part.len() != bytes.len() {
                bail!("all_gather: rank {rank} sent {} bytes, this rank {}", part.len(), bytes.len());
            }
            all.extend_from_slice(part);
        }
        from_bytes(&all, &dims_out, dtype, local.device())
    }

    fn all_reduce_sum(&self, tensor: &Tensor) -> Result<Tensor> {
        let (bytes, dims, dtype) = to_bytes(tensor)?;
        let parts = self.exchange("all_reduce_sum", &bytes)?;
        let mut sum = vec![0f32; bytes.len() / 4];
        for (rank, part) in parts.iter().enumerate() {
            if part.len() != bytes.len() {
                bail!("all_reduce: rank {rank} sent {} bytes, this rank {}", part.len(), bytes.len());
            }
            for (s, c) in sum.iter_mut().zip(part.chunks_exact(4)) {
                *s += f32::from_le_bytes(c.try_into().expect("4 bytes"));
            }
        }
        Ok(Tensor::from_vec(sum, dims, tensor.device())?.to_dtype(dtype)?)
    }

    fn broadcast(&self, tensor: &Tensor, root: usize) -> Result<Tensor> {
        let (bytes, dims, dtype) = to_bytes(tensor)?;
        let parts = self.exchange("broadcast", if self.rank == root { &bytes } else { &[] })?;
        from_bytes(&parts[root], &dims, dtype, tensor.device())
    }

    fn barrier(&self) -> Result<()> {
        self.exchange("barrier", &[]).map(|_| ())
    }

    fn all_gather_bytes(&self, data: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.exchange("all_gather_bytes", data)
    }

    fn time_in_collectives(&self) -> Duration {
        self.busy.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::store::{StoreAddress, StoreServer};

    /// Ranks 0 and 1 of a mesh that met on a store on loopback, each with its store client (the
    /// addresses live while it does).
    fn mesh(timeout: Duration) -> [(TcpCommunicator, Box<dyn Store>); 2] {
        let server = StoreServer::start("127.0.0.1:0").unwrap();
        let address = StoreAddress::Tcp(server.addr.to_string());
        let keys = RoundKeys::new("job", 0);
        let rank = |rank: usize| {
            let (address, keys) = (address.clone(), keys.clone());
            std::thread::spawn(move || {
                let mut store = address.connect(timeout).unwrap();
                let comm = TcpCommunicator::connect(
                    store.as_mut(),
                    rank,
                    2,
                    "127.0.0.1",
                    &keys,
                    timeout,
                    Arc::default(),
                )
                .unwrap();
                (comm, store)
            })
        };
        [rank(0), rank(1)].map(|rank| rank.join().unwrap())
    }

    #[test]
    fn a_peer_whose_process_exited_is_named_with_its_closed_connection() {
        let [(zero, _store), one] = mesh(Duration::from_secs(10));
        drop(one);
        let err = format!("{:#}", zero.all_gather_bytes(b"step").unwrap_err());
        assert!(err.contains("lost rank 1: its connection closed"), "{err}");
    }

    #[test]
    fn a_silent_peer_is_named_once_the_timeout_passed() {
        let [(zero, _store), _one] = mesh(Duration::from_secs(1));
        let err = format!("{:#}", zero.all_gather_bytes(b"step").unwrap_err());
        assert!(err.contains("lost rank 1: it sent nothing within the collective timeout"), "{err}");
    }
}
