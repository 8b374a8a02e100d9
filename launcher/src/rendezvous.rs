//! The launchers' rendezvous (torchelastic's agent model): every node's `kdmcse-launch` meets in
//! numbered rounds on the store the node-0 launcher hosts. A round starts once every node has
//! joined it; any failure anywhere (a worker's exit, a lost heartbeat, a launcher replaced) ends
//! it on every node, and each launcher stops its workers and joins the next round. The round
//! number is the job's restart count.
//!
//! Keys (laid out in `kdmcse::dist::contract`), all under `{run id}/`: `round` (the newest
//! round), and per round K under `r{K}/`: `node/{n}` (node n joined), `ended` (why the round
//! ended: `"{exit code} {reason}"`), `done/{n}` (node n's workers finished) and the workers' own
//! keys (`tcp/`, `hb/`, `lost`).

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kdmcse::dist::contract::{exit, newest_round_key, RoundKeys};
use kdmcse::dist::store::StoreClient;

/// Why a round ended: the exit code the job would end with, and what happened.
#[derive(Debug, Clone, PartialEq)]
pub struct Ending {
    pub code: i32,
    pub reason: String,
}

impl Ending {
    fn encode(&self) -> Vec<u8> {
        format!("{} {}", self.code, self.reason).into_bytes()
    }

    fn decode(bytes: &[u8]) -> Self {
        let text = String::from_utf8_lossy(bytes);
        let (code, reason) = text.split_once(' ').unwrap_or((&text, ""));
        Self { code: code.parse().unwrap_or(exit::FAILURE), reason: reason.to_owned() }
    }
}

/// How often a launcher looks at the store while it waits.
const POLL: Duration = Duration::from_millis(100);

pub struct Rendezvous {
    client: StoreClient,
    run: String,
    node: usize,
    nnodes: usize,
    timeout: Duration,
}

impl Rendezvous {
    /// Connects to the store at `addr` for node `node` of `nnodes` of run `run`; `timeout`
    /// bounds every wait for the other nodes.
    pub fn connect(addr: &str, run: &str, node: usize, nnodes: usize, timeout: Duration) -> Result<Self> {
        let client = StoreClient::connect(addr, timeout)?;
        Ok(Self { client, run: run.to_owned(), node, nnodes, timeout })
    }

    fn keys(&self, round: u64) -> RoundKeys {
        RoundKeys::new(&self.run, round)
    }

    fn newest_round(&mut self) -> Result<u64> {
        let key = newest_round_key(&self.run);
        Ok(self.client.check(&key)?.and_then(|v| String::from_utf8_lossy(&v).parse().ok()).unwrap_or(0))
    }

    /// Joins the newest round not before `round` and waits until every node has joined it;
    /// returns its number. A round this node already joined (its earlier launcher is gone: this
    /// one replaces it) is ended, and so is skipped, as is one that ended before it started.
    pub fn join(&mut self, mut round: u64) -> Result<u64> {
        loop {
            let newest = self.newest_round()?;
            round = round.max(newest);
            if self.client.check(&self.keys(round).node_joined(self.node))?.is_some() {
                let reason = format!("node {} rejoined (a replacement launcher)", self.node);
                self.end(round, &Ending { code: exit::FAILURE, reason })?;
            }
            if self.ended(round)?.is_some() {
                round += 1;
                continue;
            }
            if round > newest {
                self.client.set(&newest_round_key(&self.run), round.to_string().as_bytes())?;
            }
            let me = format!("pid {}", std::process::id());
            self.client.set(&self.keys(round).node_joined(self.node), me.as_bytes())?;
            if self.wait_for_nodes(round)? {
                return Ok(round);
            }
            round += 1;
        }
    }

    /// Waits until every node joined `round` (true) or the round ended first (false).
    fn wait_for_nodes(&mut self, round: u64) -> Result<bool> {
        let deadline = Instant::now() + self.timeout;
        loop {
            let missing = self.nodes_without(round, RoundKeys::node_joined)?;
            if missing.is_empty() {
                return Ok(true);
            }
            if self.ended(round)?.is_some() {
                return Ok(false);
            }
            if Instant::now() >= deadline {
                bail!(
                    "rendezvous of round {round} timed out after {:?}: node(s) {missing:?} never joined",
                    self.timeout
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// The nodes whose key `key(node)` of `round` is not set yet.
    fn nodes_without(&mut self, round: u64, key: fn(&RoundKeys, usize) -> String) -> Result<Vec<usize>> {
        let keys = self.keys(round);
        let mut missing = Vec::new();
        for node in 0..self.nnodes {
            if self.client.check(&key(&keys, node))?.is_none() {
                missing.push(node);
            }
        }
        Ok(missing)
    }

    /// Why `round` ended, if it has.
    pub fn ended(&mut self, round: u64) -> Result<Option<Ending>> {
        Ok(self.client.check(&self.keys(round).ended())?.map(|v| Ending::decode(&v)))
    }

    /// Ends `round` for every node (the first reason stays).
    pub fn end(&mut self, round: u64, ending: &Ending) -> Result<()> {
        if self.ended(round)?.is_none() {
            self.client.set(&self.keys(round).ended(), &ending.encode())?;
        }
        Ok(())
    }

    /// A worker watchdog's verdict on a lost rank in `round`, if one was given.
    pub fn lost(&mut self, round: u64) -> Result<Option<String>> {
        Ok(self.client.check(&self.keys(round).lost())?.map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Records that this node's workers finished `round`, then waits until every node's have
    /// (`None`) or the round ended (`Some`). Node 0 hosts the store, so it is the last to go.
    pub fn finish(&mut self, round: u64) -> Result<Option<Ending>> {
        self.client.set(&self.keys(round).node_done(self.node), b"")?;
        let deadline = Instant::now() + self.timeout;
        loop {
            let waiting = self.nodes_without(round, RoundKeys::node_done)?;
            if waiting.is_empty() {
                return Ok(None);
            }
            if let Some(ending) = self.ended(round)? {
                return Ok(Some(ending));
            }
            if Instant::now() >= deadline {
                return Err(anyhow::anyhow!("node(s) {waiting:?} did not finish within {:?}", self.timeout))
                    .context("this node's workers finished");
            }
            std::thread::sleep(POLL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kdmcse::dist::store::StoreServer;

    fn node(addr: &str, n: usize) -> Rendezvous {
        Rendezvous::connect(addr, "job", n, 2, Duration::from_secs(5)).unwrap()
    }

    #[test]
    fn rounds_start_together_end_everywhere_and_a_replacement_moves_on() {
        let server = StoreServer::start("127.0.0.1:0").unwrap();
        let addr = server.addr.to_string();
        let joiner = {
            let addr = addr.clone();
            std::thread::spawn(move || node(&addr, 1).join(0).unwrap())
        };
        let mut zero = node(&addr, 0);
        assert_eq!(zero.join(0).unwrap(), 0);
        assert_eq!(joiner.join().unwrap(), 0);

        // Node 1's launcher is replaced: the new one ends round 0 and waits in round 1.
        let replacement = {
            let addr = addr.clone();
            std::thread::spawn(move || node(&addr, 1).join(0).unwrap())
        };
        let started = Instant::now();
        let ending = loop {
            if let Some(ending) = zero.ended(0).unwrap() {
                break ending;
            }
            assert!(started.elapsed() < Duration::from_secs(5), "round 0 never ended");
            std::thread::sleep(POLL);
        };
        assert_eq!(ending, Ending { code: 1, reason: "node 1 rejoined (a replacement launcher)".into() });
        assert_eq!(zero.join(1).unwrap(), 1);
        assert_eq!(replacement.join().unwrap(), 1);

        // The first reason stays; finishing waits for every node.
        zero.end(1, &Ending { code: 2, reason: "rank 0 failed with exit code 2".into() }).unwrap();
        zero.end(1, &Ending { code: 1, reason: "later".into() }).unwrap();
        assert_eq!(zero.ended(1).unwrap().unwrap().code, 2);
        let mut one = node(&addr, 1);
        assert_eq!(one.finish(1).unwrap().unwrap().code, 2, "a finished node still sees the round end");
    }

    #[test]
    fn a_node_that_never_comes_is_named() {
        let server = StoreServer::start("127.0.0.1:0").unwrap();
        let mut zero =
            Rendezvous::connect(&server.addr.to_string(), "job", 0, 3, Duration::from_millis(300)).unwrap();
        let err = zero.join(0).unwrap_err().to_string();
        assert!(err.contains("node(s) [1, 2] never joined"), "{err}");
    }
}
