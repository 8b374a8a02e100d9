//! The rendezvous store: what launchers and workers need of a key-value store ([`Store`]), where
//! one is ([`StoreAddress`]), and the `static` backend, a small TCP key-value store at
//! `MASTER_ADDR:MASTER_PORT` (the role of PyTorch's `TCPStore`) hosted by the node-0 launcher
//! (which outlives worker groups) or, for workers started without `kdmcse-launch`, by rank 0.
//! The `etcd` backend ([`super::etcd`]) needs no host: no node is special. Launchers agree on
//! rounds in the store; ranks publish their collective addresses (and, on GPUs, rank 0 the NCCL
//! unique id) and heartbeats, and wait for each other's keys; every wait has a deadline and its
//! error says which ranks never arrived.
//!
//! Wire format, both ways: `op: u8, key_len: u32, key, value_len: u32, value` (little endian).
//! Ops: SET stores a value; GET answers once the key exists (the server parks the request);
//! CHECK answers at once whether the key exists; CREATE stores a value unless the key exists and
//! answers the key's value (the first writer's); SET_WHILE_ALIVE stores a value that the server
//! deletes when the connection that wrote it closes (a dead process's sockets close), as etcd
//! revokes a lease: [`Keep`] means the same on both backends.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;

use super::contract::env;

const SET: u8 = 1;
const GET: u8 = 2;
const CHECK: u8 = 3;
const CREATE: u8 = 4;
const SET_WHILE_ALIVE: u8 = 5;

/// How long a key lives: on etcd by a lease, on the static store by the writer's connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// Until the writer is gone: its client dropped or its process dead (etcd: the lease revoked
    /// or expired; static: the connection closed). Liveness, addresses: keep the client while
    /// others may still read them.
    WhileAlive,
    /// For the rest of the job: what other processes read after the writer exits.
    Always,
}

/// What rendezvous needs of a key-value store. Every call has a deadline; an error means the
/// store did not answer in time (or is gone).
pub trait Store: Send {
    fn set(&mut self, key: &str, value: &[u8], keep: Keep) -> Result<()>;

    /// Sets `key` to `value` unless it is set, and returns its value: the first writer's, for
    /// the rest of the job. Every caller gets the same answer, which is how launchers agree.
    fn create(&mut self, key: &str, value: &[u8]) -> Result<Vec<u8>>;

    /// The value of `key` if it is set now.
    fn check(&mut self, key: &str) -> Result<Option<Vec<u8>>>;

    /// Waits for the key of every rank in `keys` and returns their values in order. On timeout
    /// the error lists the ranks whose key never appeared.
    fn wait_all(&mut self, what: &str, keys: &[(usize, String)], timeout: Duration) -> Result<Vec<Vec<u8>>> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut values = Vec::with_capacity(keys.len());
            let mut missing = Vec::new();
            for (rank, key) in keys {
                match self.check(key)? {
                    Some(value) => values.push(value),
                    None => missing.push(*rank),
                }
            }
            if missing.is_empty() {
                return Ok(values);
            }
            if Instant::now() >= deadline {
                bail!("rendezvous timed out after {timeout:?} waiting for {what}: rank(s) {missing:?} never arrived");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Where the rendezvous store is (`kdmcse-launch --rdzv-backend`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreAddress {
    /// The static store at `host:port`.
    Tcp(String),
    /// An etcd cluster's client endpoints (`host:port` each).
    Etcd(Vec<String>),
}

impl StoreAddress {
    /// Connects, retrying until `timeout` (the store may still be starting).
    pub fn connect(&self, timeout: Duration) -> Result<Box<dyn Store>> {
        Ok(match self {
            StoreAddress::Tcp(addr) => Box::new(StoreClient::connect(addr, timeout)?),
            StoreAddress::Etcd(endpoints) => Box::new(super::etcd::EtcdStore::connect(endpoints, timeout)?),
        })
    }

    /// Where a launcher's workers find the store: the environment it gives them.
    pub fn to_env(&self) -> Vec<(&'static str, String)> {
        match self {
            StoreAddress::Tcp(addr) => {
                let (host, port) = addr.rsplit_once(':').unwrap_or((addr, ""));
                vec![(env::MASTER_ADDR, host.to_owned()), (env::MASTER_PORT, port.to_owned())]
            }
            StoreAddress::Etcd(endpoints) => {
                vec![(env::RDZV_BACKEND, "etcd".to_owned()), (env::RDZV_ENDPOINT, endpoints.join(","))]
            }
        }
    }

    /// The store a worker's environment names ([`Self::to_env`]).
    pub fn from_env() -> Result<Self> {
        let var =
            |name: &str| std::env::var(name).with_context(|| format!("WORLD_SIZE is set but {name} is not"));
        match std::env::var(env::RDZV_BACKEND).as_deref() {
            Ok("etcd") => Ok(StoreAddress::Etcd(parse_endpoints(&var(env::RDZV_ENDPOINT)?)?)),
            Ok("static") | Err(_) => {
                Ok(StoreAddress::Tcp(format!("{}:{}", var(env::MASTER_ADDR)?, var(env::MASTER_PORT)?)))
            }
            Ok(other) => {
                bail!("{}={other:?}: the rendezvous backends are static and etcd", env::RDZV_BACKEND)
            }
        }
    }

    /// An address on the route to the store: the interface that reaches it is the one other
    /// ranks reach this one at.
    pub fn route_target(&self) -> &str {
        match self {
            StoreAddress::Tcp(addr) => addr,
            StoreAddress::Etcd(endpoints) => &endpoints[0],
        }
    }
}

/// `host:port[,host:port...]`, as `--rdzv-endpoint` takes them.
pub fn parse_endpoints(list: &str) -> Result<Vec<String>> {
    let endpoints: Vec<String> =
        list.split(',').map(str::trim).filter(|e| !e.is_empty()).map(str::to_owned).collect();
    if endpoints.is_empty() {
        bail!("no etcd endpoint in {list:?}: give HOST:PORT[,HOST:PORT...]");
    }
    for endpoint in &endpoints {
        let port = endpoint.rsplit_once(':').map(|(_, p)| p.parse::<u16>());
        if !matches!(port, Some(Ok(_))) {
            bail!("etcd endpoint {endpoint:?} is not HOST:PORT");
        }
    }
    Ok(endpoints)
}

impl std::fmt::Display for StoreAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreAddress::Tcp(addr) => write!(f, "the static store at {addr}"),
            StoreAddress::Etcd(endpoints) => write!(f, "etcd at {}", endpoints.join(",")),
        }
    }
}

/// The static store's keys, and for each [`Keep::WhileAlive`] one the connection that wrote it.
#[derive(Default)]
struct Keys {
    values: HashMap<String, Vec<u8>>,
    owners: HashMap<String, u64>,
}

impl Keys {
    fn set(&mut self, key: String, value: Vec<u8>, owner: Option<u64>) {
        match owner {
            Some(connection) => self.owners.insert(key.clone(), connection),
            None => self.owners.remove(&key),
        };
        self.values.insert(key, value);
    }

    /// Deletes the keys `connection` wrote last with [`Keep::WhileAlive`].
    fn drop_owned_by(&mut self, connection: u64) {
        let Self { values, owners } = self;
        owners.retain(|key, owner| {
            let owned = *owner == connection;
            if owned {
                values.remove(key);
            }
            !owned
        });
    }
}

#[derive(Default)]
struct Shared {
    keys: Mutex<Keys>,
    changed: Notify,
}

/// The server; it runs on a background thread until dropped.
pub struct StoreServer {
    pub addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StoreServer {
    /// Listens on `addr` (all interfaces with `0.0.0.0:PORT`).
    pub fn start(addr: &str) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(addr))
            .with_context(|| format!("rendezvous: cannot listen on {addr}"))?;
        let local = listener.local_addr()?;
        let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
        let shared = Arc::new(Shared::default());
        let thread = std::thread::Builder::new().name("kdmcse-store".into()).spawn(move || {
            runtime.block_on(async move {
                let mut connections = 0;
                loop {
                    tokio::select! {
                        _ = &mut rx => break,
                        accepted = listener.accept() => {
                            let Ok((socket, _)) = accepted else { continue };
                            let _ = socket.set_nodelay(true);
                            connections += 1;
                            tokio::spawn(serve(socket, connections, shared.clone()));
                        }
                    }
                }
            })
        })?;
        Ok(Self { addr: local, shutdown: Some(tx), thread: Some(thread) })
    }
}

impl Drop for StoreServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn read_frame(socket: &mut tokio::net::TcpStream) -> std::io::Result<(u8, String, Vec<u8>)> {
    let op = socket.read_u8().await?;
    let key_len = socket.read_u32_le().await? as usize;
    let mut key = vec![0; key_len];
    socket.read_exact(&mut key).await?;
    let value_len = socket.read_u32_le().await? as usize;
    let mut value = vec![0; value_len];
    socket.read_exact(&mut value).await?;
    Ok((op, String::from_utf8_lossy(&key).into_owned(), value))
}

/// Answers the requests of connection number `connection` until it closes, then deletes the
/// keys it holds [`Keep::WhileAlive`].
async fn serve(mut socket: tokio::net::TcpStream, connection: u64, shared: Arc<Shared>) {
    let keys = || shared.keys.lock().expect("store lock");
    'requests: while let Ok((op, key, value)) = read_frame(&mut socket).await {
        let reply: (u8, Vec<u8>) = match op {
            SET | SET_WHILE_ALIVE => {
                keys().set(key, value, (op == SET_WHILE_ALIVE).then_some(connection));
                shared.changed.notify_waiters();
                (0, Vec::new())
            }
            GET => loop {
                // Register for a wake-up before looking, so a SET in between is not missed.
                let notified = shared.changed.notified();
                if let Some(v) = keys().values.get(&key) {
                    break (0, v.clone());
                }
                // A client sends nothing while it waits: anything readable is it giving up (the
                // connection closed), whose keys must not outlive it.
                tokio::select! {
                    _ = notified => {}
                    _ = socket.read_u8() => break 'requests,
                }
            },
            CHECK => match keys().values.get(&key) {
                Some(v) => (0, v.clone()),
                None => (1, Vec::new()),
            },
            CREATE => {
                let first = keys().values.entry(key).or_insert(value).clone();
                shared.changed.notify_waiters();
                (0, first)
            }
            _ => break,
        };
        let mut out = Vec::with_capacity(5 + reply.1.len());
        out.push(reply.0);
        out.extend_from_slice(&(reply.1.len() as u32).to_le_bytes());
        out.extend_from_slice(&reply.1);
        if socket.write_all(&out).await.is_err() {
            break;
        }
    }
    keys().drop_owned_by(connection);
}

/// How long a SET or CHECK may wait for its reply: a store that does not answer by then is
/// frozen or gone (the connection is then unusable: its reply would come mid-stream).
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// A blocking client of the store.
pub struct StoreClient {
    stream: TcpStream,
    addr: String,
}

impl StoreClient {
    /// Connects to `addr`, retrying until `timeout` (the master may still be starting).
    pub fn connect(addr: &str, timeout: Duration) -> Result<Self> {
        let deadline = Instant::now() + timeout;
        loop {
            let attempt = addr
                .to_socket_addrs()
                .with_context(|| format!("rendezvous: cannot resolve {addr}"))
                .and_then(|mut addrs| {
                    let target =
                        addrs.next().with_context(|| format!("rendezvous: {addr} has no address"))?;
                    Ok(TcpStream::connect_timeout(&target, Duration::from_secs(2))?)
                });
            match attempt {
                Ok(stream) => {
                    stream.set_nodelay(true)?;
                    return Ok(Self { stream, addr: addr.to_owned() });
                }
                Err(err) if Instant::now() >= deadline => {
                    return Err(err.context(format!(
                        "rendezvous: cannot reach the master's store at {addr} within {timeout:?}"
                    )))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    fn request(
        &mut self,
        op: u8,
        key: &str,
        value: &[u8],
        timeout: Option<Duration>,
    ) -> Result<(u8, Vec<u8>)> {
        let mut frame = Vec::with_capacity(9 + key.len() + value.len());
        frame.push(op);
        frame.extend_from_slice(&(key.len() as u32).to_le_bytes());
        frame.extend_from_slice(key.as_bytes());
        frame.extend_from_slice(&(value.len() as u32).to_le_bytes());
        frame.extend_from_slice(value);
        self.stream.set_read_timeout(timeout)?;
        self.stream.set_write_timeout(Some(REPLY_TIMEOUT))?;
        self.stream
            .write_all(&frame)
            .with_context(|| format!("rendezvous: lost the store at {}", self.addr))?;
        let mut head = [0u8; 5];
        self.stream
            .read_exact(&mut head)
            .with_context(|| format!("rendezvous: no answer from the store at {}", self.addr))?;
        let mut reply = vec![0; u32::from_le_bytes(head[1..5].try_into().expect("4 bytes")) as usize];
        self.stream.read_exact(&mut reply)?;
        Ok((head[0], reply))
    }
}

impl Store for StoreClient {
    fn set(&mut self, key: &str, value: &[u8], keep: Keep) -> Result<()> {
        let op = match keep {
            Keep::WhileAlive => SET_WHILE_ALIVE,
            Keep::Always => SET,
        };
        self.request(op, key, value, Some(REPLY_TIMEOUT)).map(|_| ())
    }

    fn create(&mut self, key: &str, value: &[u8]) -> Result<Vec<u8>> {
        Ok(self.request(CREATE, key, value, Some(REPLY_TIMEOUT))?.1)
    }

    fn check(&mut self, key: &str) -> Result<Option<Vec<u8>>> {
        let (status, value) = self.request(CHECK, key, &[], Some(REPLY_TIMEOUT))?;
        Ok((status == 0).then_some(value))
    }

    /// Parks a GET per key on the server instead of polling.
    fn wait_all(&mut self, what: &str, keys: &[(usize, String)], timeout: Duration) -> Result<Vec<Vec<u8>>> {
        let deadline = Instant::now() + timeout;
        let mut values = Vec::with_capacity(keys.len());
        for (rank, key) in keys {
            let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
            match self.request(GET, key, &[], Some(left)) {
                Ok((_, value)) => values.push(value),
                Err(_) => {
                    // The parked GET timed out: this connection is unusable, ask on a fresh one.
                    let mut probe = StoreClient::connect(&self.addr, Duration::from_secs(5))?;
                    let mut missing = Vec::new();
                    for (r, k) in keys {
                        if probe.check(k)?.is_none() {
                            missing.push(*r);
                        }
                    }
                    if missing.is_empty() {
                        missing.push(*rank);
                    }
                    bail!(
                        "rendezvous timed out after {timeout:?} waiting for {what}: rank(s) {missing:?} never arrived"
                    );
                }
            }
        }
        Ok(values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_get_and_timeouts_name_the_missing_ranks() {
        let server = StoreServer::start("127.0.0.1:0").unwrap();
        let addr = server.addr.to_string();
        let mut a = StoreClient::connect(&addr, Duration::from_secs(5)).unwrap();
        let waiter = {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let mut b = StoreClient::connect(&addr, Duration::from_secs(5)).unwrap();
                b.wait_all("addresses", &[(0, "addr/0".into())], Duration::from_secs(10)).unwrap()
            })
        };
        std::thread::sleep(Duration::from_millis(100));
        a.set("addr/0", b"10.0.0.1:4000", Keep::WhileAlive).unwrap();
        assert_eq!(waiter.join().unwrap(), vec![b"10.0.0.1:4000".to_vec()]);
        assert_eq!(a.check("nope").unwrap(), None);
        a.set("addr/2", b"x", Keep::Always).unwrap();
        assert_eq!(a.create("first", b"a").unwrap(), b"a");
        assert_eq!(a.create("first", b"b").unwrap(), b"a", "the first writer's value stays");
        let keys: Vec<(usize, String)> = (0..4).map(|r| (r, format!("addr/{r}"))).collect();
        let err = a.wait_all("addresses", &keys, Duration::from_millis(300)).unwrap_err().to_string();
        assert!(err.contains("[1, 3]"), "{err}");
    }

    /// As on etcd: a writer's [`Keep::WhileAlive`] keys go when its connection closes (though a
    /// wait of its was parked), unless another writer set the key since; [`Keep::Always`] keys
    /// and created ones stay.
    #[test]
    fn while_alive_keys_go_with_the_connection_that_wrote_them() {
        let server = StoreServer::start("127.0.0.1:0").unwrap();
        let addr = server.addr.to_string();
        let connect = || StoreClient::connect(&addr, Duration::from_secs(5)).unwrap();
        let (mut reader, mut writer, mut successor) = (connect(), connect(), connect());
        writer.set("hb/0", b"1", Keep::WhileAlive).unwrap();
        writer.set("taken", b"old", Keep::WhileAlive).unwrap();
        writer.set("kept", b"k", Keep::Always).unwrap();
        writer.create("ended", b"e").unwrap();
        writer.set("was-alive", b"1", Keep::WhileAlive).unwrap();
        writer.set("was-alive", b"2", Keep::Always).unwrap();
        successor.set("taken", b"new", Keep::WhileAlive).unwrap();
        // Its wait timed out, so the server still parks its GET when the connection closes.
        writer.wait_all("a key", &[(0, "never".into())], Duration::from_millis(100)).unwrap_err();
        drop(writer);
        let started = Instant::now();
        while reader.check("hb/0").unwrap().is_some() {
            assert!(started.elapsed() < Duration::from_secs(5), "a closed connection's key stayed");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(reader.check("taken").unwrap(), Some(b"new".to_vec()), "the successor's value went");
        assert_eq!(reader.check("kept").unwrap(), Some(b"k".to_vec()));
        assert_eq!(reader.check("ended").unwrap(), Some(b"e".to_vec()));
        assert_eq!(reader.check("was-alive").unwrap(), Some(b"2".to_vec()));
        drop(successor);
        while reader.check("taken").unwrap().is_some() {
            assert!(started.elapsed() < Duration::from_secs(5), "the successor's key stayed");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
