//! Liveness of the ranks of a job: every rank heartbeats to the rendezvous store from a
//! background thread and watches everyone else's heartbeat; a rank whose heartbeat stops (a frozen
//! host, a partition, SIGSTOP) for `peer_timeout` is declared lost, and [`Abort`] unblocks this
//! rank's collectives so the process exits with an error naming the lost rank instead of waiting
//! out the collective timeout. Staleness is judged on this rank's own clock (a heartbeat is a
//! counter that must change), so the hosts' clocks need not agree. A rank whose process is gone
//! is lost at the next look: its heartbeat key lives only while it does ([`Keep::WhileAlive`]),
//! and a rank that finished wrote a last beat that stays.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Result;

use super::contract::RoundKeys;
use super::store::{Keep, Store, StoreAddress};

/// Heartbeat settings (`[dist]` in the training config).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Liveness {
    /// How often each rank beats.
    pub heartbeat: Duration,
    /// How long a rank's heartbeat may stay unchanged before the rank is declared lost.
    pub peer_timeout: Duration,
}

impl Default for Liveness {
    fn default() -> Self {
        Self { heartbeat: Duration::from_secs(5), peer_timeout: Duration::from_secs(60) }
    }
}

/// What a finished rank writes as its last heartbeat, so that peers still exporting or
/// evaluating do not take its silence for a loss.
const DONE: &[u8] = b"done";

/// The verdict that ends this rank's collectives, and what carrying it out takes (closing the
/// TCP mesh, aborting the NCCL communicator). The first verdict wins.
#[derive(Default)]
pub struct Abort {
    verdict: OnceLock<String>,
    actions: Mutex<Vec<Box<dyn Fn() + Send>>>,
}

impl Abort {
    /// Registers what aborting must do (run once, from the thread that aborts).
    pub fn on_abort(&self, action: Box<dyn Fn() + Send>) {
        self.actions.lock().expect("abort lock").push(action);
    }

    /// Records `verdict` and unblocks every collective; later calls only keep the first verdict.
    pub fn abort(&self, verdict: String) {
        if self.verdict.set(verdict).is_ok() {
            for action in self.actions.lock().expect("abort lock").iter() {
                action();
            }
        }
    }

    /// Why collectives were aborted, if they were.
    pub fn verdict(&self) -> Option<&str> {
        self.verdict.get().map(String::as_str)
    }
}

/// The heartbeat thread of one rank; dropping it writes the final "done" beat.
pub struct Watchdog {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    /// Starts beating this rank's heartbeat key of `keys` and watching the other ranks'. A lost
    /// peer (or a store unreachable for `peer_timeout`) aborts through `abort` and is recorded
    /// under the round's `lost` key, where the launchers read it.
    pub fn start(
        store: &StoreAddress,
        keys: &RoundKeys,
        rank: usize,
        world_size: usize,
        liveness: Liveness,
        abort: Arc<Abort>,
    ) -> Result<Self> {
        let client = store.connect(Duration::from_secs(10))?;
        let stop = Arc::new(AtomicBool::new(false));
        let beat = Beat { client, store: store.clone(), keys: keys.clone(), rank, world_size, liveness };
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("kdmcse-watchdog".into())
            .spawn(move || beat.run(&flag, &abort))?;
        Ok(Self { stop, thread: Some(thread) })
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct Beat {
    client: Box<dyn Store>,
    store: StoreAddress,
    keys: RoundKeys,
    rank: usize,
    world_size: usize,
    liveness: Liveness,
}

/// What the watchdog knows of one peer.
enum Peer {
    /// Its heartbeat value (empty before its first) and when this rank saw it change.
    Beating(Vec<u8>, Instant),
    /// Its heartbeat key vanished with its process, which never wrote the last beat.
    Gone,
    Done,
}

impl Beat {
    fn run(mut self, stop: &AtomicBool, abort: &Abort) {
        let started = Instant::now();
        let mut peers: Vec<Peer> = (0..self.world_size).map(|_| Peer::Beating(Vec::new(), started)).collect();
        peers[self.rank] = Peer::Done;
        let mut store_seen = started;
        let mut count: u64 = 0;
        while !stop.load(Ordering::SeqCst) {
            count += 1;
            match self.beat_and_look(count, &mut peers) {
                Ok(()) => store_seen = Instant::now(),
                Err(err) if store_seen.elapsed() > self.liveness.peer_timeout => {
                    let verdict = format!(
                        "lost the rendezvous store ({}) for {:.1} s: {err:#}",
                        self.store,
                        store_seen.elapsed().as_secs_f64()
                    );
                    return abort.abort(verdict);
                }
                Err(_) => self.reconnect(count),
            }
            if let Some(verdict) = self.lost_peer(&peers) {
                tracing::error!("{verdict}");
                let _ = self.client.create(&self.keys.lost(), verdict.as_bytes());
                return abort.abort(verdict);
            }
            sleep_unless(stop, self.liveness.heartbeat);
        }
        // Kept after this process exits: peers still exporting must not count it as lost.
        let _ = self.client.set(&self.keys.heartbeat(self.rank), DONE, Keep::Always);
    }

    fn beat(&mut self, count: u64) -> Result<()> {
        self.client.set(&self.keys.heartbeat(self.rank), &count.to_le_bytes(), Keep::WhileAlive)
    }

    fn beat_and_look(&mut self, count: u64, peers: &mut [Peer]) -> Result<()> {
        self.beat(count)?;
        for (rank, peer) in peers.iter_mut().enumerate() {
            let Peer::Beating(last, _) = peer else { continue };
            match self.client.check(&self.keys.heartbeat(rank))? {
                Some(value) if value == DONE => *peer = Peer::Done,
                Some(value) if value != *last => *peer = Peer::Beating(value, Instant::now()),
                None if !last.is_empty() => *peer = Peer::Gone,
                _ => {}
            }
        }
        Ok(())
    }

    /// The verdict on a peer gone, else on the peer silent the longest once it has been silent
    /// for `peer_timeout`.
    fn lost_peer(&self, peers: &[Peer]) -> Option<String> {
        if let Some(rank) = peers.iter().position(|p| matches!(p, Peer::Gone)) {
            return Some(format!(
                "rank {rank} was lost: its heartbeat key is gone (its process exited before it \
                 finished, or lost the store), seen by rank {}",
                self.rank
            ));
        }
        let (rank, silent) = peers
            .iter()
            .enumerate()
            .filter_map(|(rank, p)| match p {
                Peer::Beating(_, seen) => Some((rank, seen.elapsed())),
                Peer::Gone | Peer::Done => None,
            })
            .max_by_key(|&(_, silent)| silent)?;
        (silent > self.liveness.peer_timeout).then(|| {
            format!(
                "rank {rank} was lost: no heartbeat for {:.1} s (dist.peer_timeout_s = {}), seen by rank {}",
                silent.as_secs_f64(),
                self.liveness.peer_timeout.as_secs_f64(),
                self.rank
            )
        })
    }

    /// A store request that timed out leaves its connection mid-reply: start a new one, and beat
    /// `count` on it before the old one goes, or this rank's key would vanish with the old one
    /// and its peers take it for gone.
    fn reconnect(&mut self, count: u64) {
        if let Ok(client) = self.store.connect(self.liveness.heartbeat) {
            let old = std::mem::replace(&mut self.client, client);
            let _ = self.beat(count);
            drop(old);
        }
    }
}

/// Sleeps `total`, returning early once `stop` is set.
fn sleep_unless(stop: &AtomicBool, total: Duration) {
    let deadline = Instant::now() + total;
    while !stop.load(Ordering::SeqCst) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        std::thread::sleep(left.min(Duration::from_millis(50)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::store::{StoreClient, StoreServer};

    fn fast() -> Liveness {
        Liveness { heartbeat: Duration::from_millis(50), peer_timeout: Duration::from_millis(400) }
    }

    #[test]
    fn a_silent_peer_is_declared_lost_and_a_finished_one_is_not() {
        let server = StoreServer::start("127.0.0.1:0").unwrap();
        let addr = StoreAddress::Tcp(server.addr.to_string());
        let abort = Arc::new(Abort::default());
        let fired = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&fired);
        abort.on_abort(Box::new(move || flag.store(true, Ordering::SeqCst)));
        // Ranks 0 (this test's watcher), 1 (beats, then finishes) and 2 (never beats).
        let watcher =
            Watchdog::start(&addr, &RoundKeys::new("job", 0), 0, 3, fast(), Arc::clone(&abort)).unwrap();
        let finished =
            Watchdog::start(&addr, &RoundKeys::new("job", 0), 1, 3, fast(), Arc::new(Abort::default()))
                .unwrap();
        std::thread::sleep(Duration::from_millis(150));
        drop(finished);
        let started = Instant::now();
        while abort.verdict().is_none() && started.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let verdict = abort.verdict().expect("rank 2 is declared lost").to_owned();
        assert!(verdict.starts_with("rank 2 was lost: no heartbeat for"), "{verdict}");
        assert!(fired.load(Ordering::SeqCst), "the abort actions ran");
        let mut client = StoreClient::connect(&server.addr.to_string(), Duration::from_secs(1)).unwrap();
        assert_eq!(client.check(&RoundKeys::new("job", 0).lost()).unwrap(), Some(verdict.into_bytes()));
        assert_eq!(client.check(&RoundKeys::new("job", 0).heartbeat(1)).unwrap(), Some(DONE.to_vec()));
        drop(watcher);
    }

    /// A peer whose process died (its connection to the store closed, so its heartbeat key went)
    /// is lost at the next look, long before the peer timeout.
    #[test]
    fn a_peer_whose_heartbeat_key_vanishes_is_lost_at_once() {
        let server = StoreServer::start("127.0.0.1:0").unwrap();
        let addr = StoreAddress::Tcp(server.addr.to_string());
        let keys = RoundKeys::new("job", 0);
        let abort = Arc::new(Abort::default());
        let liveness = Liveness { peer_timeout: Duration::from_secs(60), ..fast() };
        let watcher = Watchdog::start(&addr, &keys, 0, 2, liveness, Arc::clone(&abort)).unwrap();
        let mut peer = StoreClient::connect(&server.addr.to_string(), Duration::from_secs(1)).unwrap();
        peer.set(&keys.heartbeat(1), &1u64.to_le_bytes(), Keep::WhileAlive).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(abort.verdict(), None, "a beating peer was lost");
        drop(peer);
        let started = Instant::now();
        while abort.verdict().is_none() && started.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let verdict = abort.verdict().expect("rank 1 is declared lost");
        assert!(verdict.starts_with("rank 1 was lost: its heartbeat key is gone"), "{verdict}");
        drop(watcher);
    }

    #[test]
    fn beating_peers_are_not_lost() {
        let server = StoreServer::start("127.0.0.1:0").unwrap();
        let addr = StoreAddress::Tcp(server.addr.to_string());
        let aborts: Vec<Arc<Abort>> = (0..2).map(|_| Arc::new(Abort::default())).collect();
        let dogs: Vec<Watchdog> = (0..2)
            .map(|r| {
                Watchdog::start(&addr, &RoundKeys::new("job", 1), r, 2, fast(), Arc::clone(&aborts[r]))
                    .unwrap()
            })
            .collect();
        std::thread::sleep(Duration::from_millis(1200));
        assert!(aborts.iter().all(|a| a.verdict().is_none()));
        drop(dogs);
    }
}
