//! The `etcd` rendezvous backend: the [`Store`] of launchers and workers on an etcd cluster
//! (through `etcd-client`, etcd's gRPC API). No process hosts it, so any node may die. Each client
//! holds a lease that a background task keeps alive; keys set [`Keep::WhileAlive`] carry it, so a
//! process's keys vanish within [`LEASE_TTL_S`] of its death. A request that fails (a member
//! down, a leader election) is retried, on whichever endpoint answers, for [`RETRY_FOR`].

use std::future::Future;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use etcd_client::{Client, Compare, CompareOp, ConnectOptions, PutOptions, Txn, TxnOp, TxnOpResponse};

use super::store::{Keep, Store};

/// Seconds a client's keys outlive it.
pub const LEASE_TTL_S: i64 = 10;

/// How long one request is retried before the store counts as unreachable.
const RETRY_FOR: Duration = Duration::from_secs(10);

pub struct EtcdStore {
    /// Runs the requests (`block_on`) and, on its worker thread, the lease's keep-alive.
    runtime: tokio::runtime::Runtime,
    client: Client,
    /// The lease keys set [`Keep::WhileAlive`] carry (renewed if it ever expires).
    lease: Arc<AtomicI64>,
    endpoints: String,
}

impl EtcdStore {
    /// Connects to the cluster at `endpoints` (`host:port` each) and takes a lease, retrying
    /// until `timeout`; the error names the endpoints.
    pub fn connect(endpoints: &[String], timeout: Duration) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("kdmcse-etcd")
            .enable_all()
            .build()?;
        let shown = endpoints.join(",");
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(5));
        let (client, lease) = runtime
            .block_on(until(timeout, || async {
                let mut client = Client::connect(endpoints, Some(options.clone())).await?;
                let lease = client.lease_grant(LEASE_TTL_S, None).await?.id();
                Ok((client, lease))
            }))
            .with_context(|| format!("rendezvous: cannot reach etcd at {shown} within {timeout:?}"))?;
        let lease = Arc::new(AtomicI64::new(lease));
        runtime.spawn(keep_alive(client.clone(), Arc::clone(&lease)));
        Ok(Self { runtime, client, lease, endpoints: shown })
    }

    /// Runs `op` (given a client and the lease) until it succeeds or [`RETRY_FOR`] has passed.
    fn retry<T, F, Fut>(&self, what: &str, op: F) -> Result<T>
    where
        F: Fn(Client, i64) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        self.runtime
            .block_on(until(RETRY_FOR, || op(self.client.clone(), self.lease.load(Ordering::SeqCst))))
            .with_context(|| {
                format!("rendezvous: etcd at {} did not answer {what} within {RETRY_FOR:?}", self.endpoints)
            })
    }
}

/// Runs `op` until it succeeds or `limit` has passed; the last error stands for the attempts.
async fn until<T, F, Fut>(limit: Duration, op: F) -> Result<T>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<T, etcd_client::Error>>,
{
    let deadline = Instant::now() + limit;
    loop {
        match op().await {
            Ok(value) => return Ok(value),
            Err(err) if Instant::now() >= deadline => return Err(anyhow!(err)),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Keeps `lease` alive every third of its TTL; an expired one (this process was frozen past
/// it) is replaced, so later keys live again. Errors (a member down) are retried.
async fn keep_alive(mut client: Client, lease: Arc<AtomicI64>) {
    loop {
        let renewed = async {
            let (mut keeper, mut responses) = client.lease_keep_alive(lease.load(Ordering::SeqCst)).await?;
            loop {
                keeper.keep_alive().await?;
                match responses.message().await? {
                    Some(response) if response.ttl() > 0 => {}
                    _ => {
                        let fresh = client.lease_grant(LEASE_TTL_S, None).await?.id();
                        lease.store(fresh, Ordering::SeqCst);
                        return Ok::<_, etcd_client::Error>(());
                    }
                }
                tokio::time::sleep(Duration::from_secs(LEASE_TTL_S as u64 / 3)).await;
            }
        };
        if renewed.await.is_err() {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

impl Drop for EtcdStore {
    /// Revokes the lease: a process that exits takes its live keys with it at once.
    fn drop(&mut self) {
        let (mut client, id) = (self.client.clone(), self.lease.load(Ordering::SeqCst));
        let revoke =
            async move { tokio::time::timeout(Duration::from_secs(2), client.lease_revoke(id)).await };
        let _ = self.runtime.block_on(revoke);
    }
}

impl Store for EtcdStore {
    fn set(&mut self, key: &str, value: &[u8], keep: Keep) -> Result<()> {
        self.retry("a put", |mut client, lease| async move {
            let options = (keep == Keep::WhileAlive).then(|| PutOptions::new().with_lease(lease));
            client.put(key, value, options).await.map(|_| ())
        })
    }

    fn create(&mut self, key: &str, value: &[u8]) -> Result<Vec<u8>> {
        self.retry("a create", |mut client, _| async move {
            let txn = Txn::new()
                .when([Compare::version(key, CompareOp::Equal, 0)])
                .and_then([TxnOp::put(key, value, None)])
                .or_else([TxnOp::get(key, None)]);
            let response = client.txn(txn).await?;
            if response.succeeded() {
                return Ok(value.to_vec());
            }
            Ok(response
                .op_responses()
                .into_iter()
                .find_map(|op| match op {
                    TxnOpResponse::Get(get) => get.kvs().first().map(|kv| kv.value().to_vec()),
                    _ => None,
                })
                .unwrap_or_default())
        })
    }

    fn check(&mut self, key: &str) -> Result<Option<Vec<u8>>> {
        self.retry("a get", |mut client, _| async move {
            Ok(client.get(key, None).await?.kvs().first().map(|kv| kv.value().to_vec()))
        })
    }
}
