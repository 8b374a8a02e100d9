//! What `kdmcse-launch` and its `kdmcse` workers agree on, in one place: the environment a
//! worker starts with, the exit codes each side reads, and the layout of the rendezvous store's
//! keys. Both binaries use these names; neither spells them out.

/// The environment a launcher gives each worker: torchrun's variables, then kdmcse's own.
pub mod env {
    pub const RANK: &str = "RANK";
    pub const WORLD_SIZE: &str = "WORLD_SIZE";
    pub const LOCAL_RANK: &str = "LOCAL_RANK";
    pub const LOCAL_WORLD_SIZE: &str = "LOCAL_WORLD_SIZE";
    /// The node's index.
    pub const GROUP_RANK: &str = "GROUP_RANK";
    /// Where the static rendezvous store is.
    pub const MASTER_ADDR: &str = "MASTER_ADDR";
    pub const MASTER_PORT: &str = "MASTER_PORT";
    /// The rendezvous backend: `static` (the default: `MASTER_ADDR:MASTER_PORT`) or `etcd`.
    pub const RDZV_BACKEND: &str = "KDMCSE_RDZV_BACKEND";
    /// The etcd endpoints, `host:port[,host:port...]`.
    pub const RDZV_ENDPOINT: &str = "KDMCSE_RDZV_ENDPOINT";
    /// Set when the launchers' node count is a range (`--nnodes MIN:MAX`): the world size may
    /// change from one round to the next.
    pub const ELASTIC: &str = "KDMCSE_ELASTIC";
    /// The run id (`--rdzv-id`) that prefixes the round's keys ([`super::RoundKeys`]).
    pub const RUN_ID: &str = "KDMCSE_RUN_ID";
    /// The launchers' rendezvous round: the job's restart count (0 on the first start).
    pub const ROUND: &str = "KDMCSE_ROUND";
    /// Set when `--gpus` gave the worker a GPU (`CUDA_VISIBLE_DEVICES` names it).
    pub const LAUNCHED_GPUS: &str = "KDMCSE_LAUNCHED_GPUS";
    /// Seconds a rendezvous or a collective may wait (default [`super::DEFAULT_TIMEOUT_S`]).
    pub const TIMEOUT: &str = "KDMCSE_TIMEOUT";
}

/// How long a rendezvous or a collective may wait without [`env::TIMEOUT`].
pub const DEFAULT_TIMEOUT_S: u64 = 600;

/// Exit codes: a worker's tell its launcher whether a restart can help; a launcher's tell
/// Kubernetes the same (its `podFailurePolicy` fails the Job at once on [`exit::INPUT_ERROR`]).
pub mod exit {
    /// A runtime failure (a lost peer, storage that stayed down, ...): worth a restart.
    pub const FAILURE: i32 = 1;
    /// A configuration or input error: restarting cannot help, so nothing restarts it.
    pub const INPUT_ERROR: i32 = 2;

    /// A process stopped by `signal` (after checkpointing its step), as a shell reports it.
    pub fn stopped_by(signal: i32) -> i32 {
        128 + signal
    }
}

/// The store keys of one worker group: everything under `{run}/r{round}/`, so that a group never
/// meets the keys of an earlier round or of another run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoundKeys {
    prefix: String,
}

impl RoundKeys {
    pub fn new(run: &str, round: u64) -> Self {
        Self { prefix: format!("{run}/r{round}") }
    }

    /// The keys of a world no launcher started (rank 0 hosts the store).
    pub fn unlaunched() -> Self {
        Self { prefix: "kdmcse".into() }
    }

    fn key(&self, rest: std::fmt::Arguments) -> String {
        format!("{}/{rest}", self.prefix)
    }

    /// Node `node`'s launcher joined the round (its pid).
    pub fn node_joined(&self, node: usize) -> String {
        self.key(format_args!("node/{node}"))
    }

    /// The nodes the round started with, in rank order (`"0,1,3"`), written once.
    pub fn members(&self) -> String {
        self.key(format_args!("members"))
    }

    /// Node `node`'s workers finished.
    pub fn node_done(&self, node: usize) -> String {
        self.key(format_args!("done/{node}"))
    }

    /// Node `node`'s launcher saw the round end and is stopping its workers to join the next.
    pub fn node_leaving(&self, node: usize) -> String {
        self.key(format_args!("leaving/{node}"))
    }

    /// Node `node`'s launcher stopped its workers after the round ended; its word on how the
    /// round ended is in.
    pub fn node_stopped(&self, node: usize) -> String {
        self.key(format_args!("stopped/{node}"))
    }

    /// Why the round ended (`"{exit code} {reason}"`), set by the first launcher to know (an
    /// input error found later replaces any other reason).
    pub fn ended(&self) -> String {
        self.key(format_args!("ended"))
    }

    /// A watchdog's verdict on a lost rank.
    pub fn lost(&self) -> String {
        self.key(format_args!("lost"))
    }

    /// Rank `rank`'s heartbeat.
    pub fn heartbeat(&self, rank: usize) -> String {
        self.key(format_args!("hb/{rank}"))
    }

    /// Where rank `rank` listens for the TCP mesh.
    pub fn tcp_address(&self, rank: usize) -> String {
        self.key(format_args!("tcp/{rank}"))
    }

    /// The NCCL unique id rank 0 made.
    pub fn nccl_id(&self) -> String {
        self.key(format_args!("nccl-id"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The layout the rendezvous docs (README, launcher/src/rendezvous.rs) describe.
    #[test]
    fn keys_of_a_round_sit_under_the_run_and_round() {
        let keys = RoundKeys::new("job", 3);
        assert_eq!(keys.members(), "job/r3/members");
        assert_eq!(keys.node_joined(1), "job/r3/node/1");
        assert_eq!(keys.node_done(0), "job/r3/done/0");
        assert_eq!(keys.node_leaving(2), "job/r3/leaving/2");
        assert_eq!(keys.node_stopped(2), "job/r3/stopped/2");
        assert_eq!(keys.ended(), "job/r3/ended");
        assert_eq!(keys.lost(), "job/r3/lost");
        assert_eq!(keys.heartbeat(2), "job/r3/hb/2");
        assert_eq!(keys.tcp_address(4), "job/r3/tcp/4");
        assert_eq!(keys.nccl_id(), "job/r3/nccl-id");
        assert_ne!(RoundKeys::new("job", 4).ended(), keys.ended());
    }
}
