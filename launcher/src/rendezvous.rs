//! The launchers' rendezvous (torchelastic's agent model): every node's `kdmcse-launch` meets in
//! numbered rounds on the rendezvous store (the static store the node-0 launcher hosts, or etcd).
//! A round starts with the nodes that joined it: all `MAX` of `--nnodes MIN:MAX`, or at least
//! `MIN` once `--rdzv-last-call` has passed since `MIN` were there and the round before's members
//! that are leaving it (stopping their workers) came back; the first launcher to see that writes
//! the round's members, and ranks follow their order. Any failure anywhere (a worker's exit, a lost
//! heartbeat, a launcher lost: its keys go with its etcd lease or its connection to the static
//! store; a launcher replaced) ends the round on every node; so does a node waiting for the next
//! round while this one has fewer than `MAX` (it joins at that boundary). Each launcher then stops
//! its workers, waits for the others stopping theirs ([`Rendezvous::settle`]: an input error one
//! of them finds meanwhile ends the job) and joins the next round, whose workers resume from the
//! newest checkpoint.
//!
//! Keys (laid out in `kdmcse::dist::contract`), per round K under `{run id}/r{K}/`: `node/{n}`
//! (node n joined; it lives as long as that launcher), `members` (who the round started with),
//! `ended` (why the round ended: `"{exit code} {reason}"`, code 0 for a membership change; an
//! input error, exit 2, replaces any other reason, so that no node restarts what cannot mend),
//! `leaving/{n}` (node n saw it end and is stopping its workers to join the next), `stopped/{n}`
//! (node n's workers stopped: its word on the ending is in), `done/{n}` (node n's workers
//! finished) and the workers' own keys (`tcp/`, `hb/`, `lost`).

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kdmcse::dist::contract::{exit, RoundKeys};
use kdmcse::dist::store::{Keep, Store, StoreAddress};

/// Why a round ended: the exit code the job would end with (0: not a failure, the membership
/// changes), and what happened.
#[derive(Debug, Clone, PartialEq)]
pub struct Ending {
    pub code: i32,
    pub reason: String,
}

impl Ending {
    pub fn failure(code: i32, reason: String) -> Self {
        Self { code, reason }
    }

    /// A round ended to let the membership change: it costs no restart.
    fn membership(reason: String) -> Self {
        Self { code: 0, reason }
    }

    /// The last round: every member's workers finished.
    fn job_finished() -> Self {
        Self::membership(JOB_FINISHED.into())
    }

    fn is_job_finished(&self) -> bool {
        self.code == 0 && self.reason == JOB_FINISHED
    }

    pub fn is_failure(&self) -> bool {
        self.code != 0
    }

    /// A configuration or input error: restarting cannot help.
    pub fn is_input_error(&self) -> bool {
        self.code == exit::INPUT_ERROR
    }

    /// Whether the job ends with this round: it finished, or an input error ended it.
    fn ends_job(&self) -> bool {
        self.is_job_finished() || self.is_input_error()
    }

    fn encode(&self) -> Vec<u8> {
        format!("{} {}", self.code, self.reason).into_bytes()
    }

    fn decode(bytes: &[u8]) -> Self {
        let text = String::from_utf8_lossy(bytes);
        let (code, reason) = text.split_once(' ').unwrap_or((&text, ""));
        Self { code: code.parse().unwrap_or(exit::FAILURE), reason: reason.to_owned() }
    }
}

/// How many nodes a round may start with (`--nnodes N` or `MIN:MAX`), how long to wait for more
/// than `min` once `min` are there, and how long the members of the round before, still stopping
/// their workers, are waited for before that wait begins.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NodeRange {
    pub min: usize,
    pub max: usize,
    pub last_call: Duration,
    pub rejoin: Duration,
}

impl NodeRange {
    /// `N` or `MIN:MAX`.
    pub fn parse(text: &str, last_call: Duration, rejoin: Duration) -> Result<Self> {
        let number = |s: &str| {
            s.trim().parse::<usize>().map_err(|_| anyhow::anyhow!("--nnodes {text:?}: give N or MIN:MAX"))
        };
        let (min, max) = match text.split_once(':') {
            Some((min, max)) => (number(min)?, number(max)?),
            None => (number(text)?, number(text)?),
        };
        if min == 0 || min > max {
            bail!("--nnodes {text:?}: need 1 <= MIN <= MAX");
        }
        Ok(Self { min, max, last_call, rejoin })
    }

    pub fn is_elastic(&self) -> bool {
        self.min < self.max
    }
}

/// What joining comes to: a round that started with this node, or the job's end (`JobOver`: it
/// finished, or an input error ended a round; nothing is left to join).
#[derive(Debug, Clone, PartialEq)]
pub enum Joined {
    Round(Round),
    JobOver(Ending),
}

/// A round that started: its number (the rounds before it, restarts or membership changes) and
/// the nodes in it, in rank order.
#[derive(Debug, Clone, PartialEq)]
pub struct Round {
    pub number: u64,
    pub members: Vec<usize>,
}

impl Round {
    /// Where `node` stands among the members: its `GROUP_RANK`.
    pub fn position(&self, node: usize) -> usize {
        self.members.iter().position(|&m| m == node).expect("a member of the round")
    }
}

fn encode_members(members: &[usize]) -> Vec<u8> {
    members.iter().map(usize::to_string).collect::<Vec<_>>().join(",").into_bytes()
}

fn decode_members(bytes: &[u8]) -> Vec<usize> {
    String::from_utf8_lossy(bytes).split(',').filter_map(|n| n.parse().ok()).collect()
}

const JOB_FINISHED: &str = "the job finished";

/// How often a launcher looks at the store while it waits.
const POLL: Duration = Duration::from_millis(100);
/// How often a running round checks its members' leases and the nodes waiting for the next one.
const LOOK_EVERY: Duration = Duration::from_secs(1);
/// How long a member of an ended round that has not said it is leaving is waited for to say so
/// (a launcher looks every [`POLL`]; one frozen, or stopped by a signal, never does).
const ACKNOWLEDGE: Duration = Duration::from_secs(3);

pub struct Rendezvous {
    store: Box<dyn Store>,
    run: String,
    node: usize,
    nodes: NodeRange,
    timeout: Duration,
    last_look: Instant,
}

impl Rendezvous {
    /// Connects to the store at `address` for node `node` of run `run`; `timeout` bounds every
    /// wait for the other nodes.
    pub fn connect(
        address: &StoreAddress,
        run: &str,
        node: usize,
        nodes: NodeRange,
        timeout: Duration,
    ) -> Result<Self> {
        let store = address.connect(timeout)?;
        Ok(Self { store, run: run.to_owned(), node, nodes, timeout, last_look: Instant::now() })
    }

    fn keys(&self, round: u64) -> RoundKeys {
        RoundKeys::new(&self.run, round)
    }

    fn members(&mut self, round: u64) -> Result<Option<Vec<usize>>> {
        Ok(self.store.check(&self.keys(round).members())?.map(|m| decode_members(&m)))
    }

    /// The restarts the job used before `round`: the rounds that ended by a failure.
    pub fn failures_before(&mut self, round: u64) -> Result<u64> {
        let mut failures = 0;
        for earlier in 0..round {
            failures += u64::from(self.ended(earlier)?.is_some_and(|e| e.is_failure()));
        }
        Ok(failures)
    }

    /// Joins the first round from `round` on that is still open and waits until it starts with
    /// this node; returns it, or how the job ended first. A running round that counts
    /// this node (its earlier launcher is gone: this one replaces it) is ended, and so is skipped,
    /// as is one that ended before it started or started without this node.
    pub fn join(&mut self, mut round: u64) -> Result<Joined> {
        loop {
            if let Some(ending) = self.ended(round)? {
                if ending.ends_job() {
                    return Ok(Joined::JobOver(ending));
                }
                round += 1;
                continue;
            }
            let members = self.members(round)?;
            let replaced = match &members {
                Some(members) => members.contains(&self.node),
                None => self.store.check(&self.keys(round).node_joined(self.node))?.is_some(),
            };
            if replaced {
                let reason = format!("node {} rejoined (a replacement launcher)", self.node);
                self.end(round, &Ending::failure(exit::FAILURE, reason))?;
                round += 1;
                continue;
            }
            if let Some(members) = members {
                // A round that started without this node: it waits in the next one, unless
                // nobody is left in this one to end it.
                if self.absent(round, &members)?.len() == members.len() {
                    let reason = format!("every node of round {round} was lost");
                    self.end(round, &Ending::failure(exit::FAILURE, reason))?;
                }
                round += 1;
                continue;
            }
            let me = format!("pid {}", std::process::id());
            self.store.set(&self.keys(round).node_joined(self.node), me.as_bytes(), Keep::WhileAlive)?;
            match self.wait_for_members(round)? {
                Some(members) if members.contains(&self.node) => {
                    self.last_look = Instant::now();
                    return Ok(Joined::Round(Round { number: round, members }));
                }
                None => match self.job_ended_before(round)? {
                    Some(ending) => return Ok(Joined::JobOver(ending)),
                    None => round += 1,
                },
                Some(_) => round += 1,
            }
        }
    }

    /// Waits until `round` has its members (`Some`), or ended first or the job ended with the
    /// round before it (`None`); writes the members when this node is the first to see enough.
    fn wait_for_members(&mut self, round: u64) -> Result<Option<Vec<usize>>> {
        let deadline = Instant::now() + self.timeout;
        let mut enough_since: Option<Instant> = None;
        // When this node saw the round before end, and who was in it (read once: it is fixed).
        let mut previous_end: Option<(Instant, Vec<usize>)> = None;
        loop {
            if let Some(members) = self.members(round)? {
                return Ok(Some(members));
            }
            let previous = if round == 0 { None } else { self.ended(round - 1)? };
            if self.ended(round)?.is_some() || previous.as_ref().is_some_and(Ending::ends_job) {
                return Ok(None);
            }
            let joined = self.nodes_with(round, RoundKeys::node_joined, 0..self.nodes.max)?;
            // The last call starts once the round before has ended and its members that are
            // leaving it have joined this one (or had `rejoin` to): one still stopping its workers
            // would find this round started without it, and end it at once to join the next.
            if previous.is_some() && previous_end.is_none() {
                previous_end = Some((Instant::now(), self.members(round - 1)?.unwrap_or_default()));
            }
            let previous_over = round == 0
                || match &previous_end {
                    Some((ended_at, members)) => {
                        ended_at.elapsed() >= self.nodes.rejoin
                            || self.rejoining(round - 1, members, &joined)?.is_empty()
                    }
                    None => false,
                };
            let enough = joined.len() >= self.nodes.min && previous_over;
            enough_since = enough.then(|| enough_since.unwrap_or_else(Instant::now));
            if joined.len() == self.nodes.max
                || enough_since.is_some_and(|t| t.elapsed() >= self.nodes.last_call)
            {
                self.store.create(&self.keys(round).members(), &encode_members(&joined))?;
                continue;
            }
            if Instant::now() >= deadline {
                let missing: Vec<usize> = (0..self.nodes.max).filter(|n| !joined.contains(n)).collect();
                bail!(
                    "rendezvous of round {round} timed out after {:?}: {} of at least {} node(s) joined; node(s) {missing:?} never joined",
                    self.timeout,
                    joined.len(),
                    self.nodes.min
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// The nodes of `candidates` whose key `key(node)` of `round` is set.
    fn nodes_with(
        &mut self,
        round: u64,
        key: fn(&RoundKeys, usize) -> String,
        candidates: impl IntoIterator<Item = usize>,
    ) -> Result<Vec<usize>> {
        let keys = self.keys(round);
        let mut set = Vec::new();
        for node in candidates {
            if self.store.check(&key(&keys, node))?.is_some() {
                set.push(node);
            }
        }
        Ok(set)
    }

    /// The `members` of `round` whose launcher is gone (its key went with it) before their workers
    /// finished.
    fn absent(&mut self, round: u64, members: &[usize]) -> Result<Vec<usize>> {
        let present = self.nodes_with(round, RoundKeys::node_joined, members.to_vec())?;
        let done = self.nodes_with(round, RoundKeys::node_done, members.to_vec())?;
        Ok(members.iter().copied().filter(|n| !present.contains(n) && !done.contains(n)).collect())
    }

    /// The `members` of `round` leaving it (a lost node never says so) that have not joined the
    /// next round yet: `joined` are those that have.
    fn rejoining(&mut self, round: u64, members: &[usize], joined: &[usize]) -> Result<Vec<usize>> {
        let outside = members.iter().copied().filter(|n| !joined.contains(n));
        self.nodes_with(round, RoundKeys::node_leaving, outside)
    }

    /// Says that this node saw `round` end and will join the next, so the next waits for it.
    fn leave(&mut self, round: u64) -> Result<()> {
        let key = self.keys(round).node_leaving(self.node);
        self.store.set(&key, b"", Keep::WhileAlive)
    }

    /// How the job ended with the round before `round`, if it did: a node that comes now has
    /// nothing to join.
    fn job_ended_before(&mut self, round: u64) -> Result<Option<Ending>> {
        if round == 0 {
            return Ok(None);
        }
        Ok(self.ended(round - 1)?.filter(Ending::ends_job))
    }

    /// Why `round` ended, if it has.
    pub fn ended(&mut self, round: u64) -> Result<Option<Ending>> {
        Ok(self.store.check(&self.keys(round).ended())?.map(|v| Ending::decode(&v)))
    }

    /// Ends `round` for every node and returns how it ended: the first reason stays, except that
    /// an input error replaces any other (the failure it caused elsewhere may be written first).
    pub fn end(&mut self, round: u64, ending: &Ending) -> Result<Ending> {
        let key = self.keys(round).ended();
        let first = Ending::decode(&self.store.create(&key, &ending.encode())?);
        if ending.is_input_error() && !first.is_input_error() {
            self.store.set(&key, &ending.encode(), Keep::Always)?;
            return Ok(ending.clone());
        }
        Ok(first)
    }

    /// Says that this node stopped its workers for the ended `round`, waits until the other
    /// members stopping theirs have too, and returns how the round ended then: a member whose
    /// worker exits with an input error as it is stopped replaces the round's first ending only
    /// then ([`Self::end`]), and every node must hear it. Waited for: a member that said it is
    /// leaving (at most `rejoin`; a lost one's key goes), and for [`ACKNOWLEDGE`] any member
    /// still there, which may not have seen the end yet.
    pub fn settle(&mut self, round: &Round) -> Result<Option<Ending>> {
        self.store.set(&self.keys(round.number).node_stopped(self.node), b"", Keep::WhileAlive)?;
        let started = Instant::now();
        let others: Vec<usize> = round.members.iter().copied().filter(|&n| n != self.node).collect();
        loop {
            let stopping = if started.elapsed() < ACKNOWLEDGE {
                self.nodes_with(round.number, RoundKeys::node_joined, others.clone())?
            } else {
                self.nodes_with(round.number, RoundKeys::node_leaving, others.clone())?
            };
            let stopped = self.nodes_with(round.number, RoundKeys::node_stopped, stopping.clone())?;
            if stopped.len() == stopping.len() || started.elapsed() >= self.nodes.rejoin {
                return self.ended(round.number);
            }
            std::thread::sleep(POLL);
        }
    }

    /// Ends `round` for a failure on this node, which leaves it (stops its workers and joins the
    /// next round); returns the first reason, as [`Self::end`].
    pub fn fail(&mut self, round: u64, ending: &Ending) -> Result<Ending> {
        let first = self.end(round, ending)?;
        self.leave(round)?;
        Ok(first)
    }

    /// Whether the running `round` has ended, or now ends: a member's launcher lost (its key
    /// gone before its workers finished), or a node waiting for the next round while this one
    /// has room. Cheap between looks (every [`LOOK_EVERY`]). An ending it reports, this node
    /// leaves the round: it stops its workers and joins the next.
    pub fn watch(&mut self, round: &Round) -> Result<Option<Ending>> {
        let ending = self.look(round)?;
        if ending.is_some() {
            self.leave(round.number)?;
        }
        Ok(ending)
    }

    /// [`Self::watch`]'s look at the round.
    fn look(&mut self, round: &Round) -> Result<Option<Ending>> {
        if let Some(ending) = self.ended(round.number)? {
            return Ok(Some(ending));
        }
        if self.last_look.elapsed() < LOOK_EVERY {
            return Ok(None);
        }
        self.last_look = Instant::now();
        if let Some(lost) = self.absent(round.number, &round.members)?.first() {
            let reason = format!("node {lost}'s launcher was lost (its rendezvous key is gone)");
            return Ok(Some(self.end(round.number, &Ending::failure(exit::FAILURE, reason))?));
        }
        if round.members.len() < self.nodes.max {
            let others = (0..self.nodes.max).filter(|n| !round.members.contains(n));
            if let Some(&waiting) = self.nodes_with(round.number + 1, RoundKeys::node_joined, others)?.first()
            {
                let reason = format!("node {waiting} is waiting to join");
                return Ok(Some(self.end(round.number, &Ending::membership(reason))?));
            }
        }
        Ok(None)
    }

    /// A worker watchdog's verdict on a lost rank in `round`, if one was given.
    pub fn lost(&mut self, round: u64) -> Result<Option<String>> {
        Ok(self.store.check(&self.keys(round).lost())?.map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Records that this node's workers finished `round`, then waits until every member's have
    /// (`None`) or the round ended (`Some`). With the static store, node 0 hosts it, so it is the
    /// last to go.
    pub fn finish(&mut self, round: &Round) -> Result<Option<Ending>> {
        let recording = "recording that this node's workers finished";
        self.store.create(&self.keys(round.number).node_done(self.node), b"").context(recording)?;
        let deadline = Instant::now() + self.timeout;
        loop {
            let done = match self.look_finished(round).context(recording)? {
                ControlFlow::Break(outcome) => return Ok(outcome),
                ControlFlow::Continue(done) => done,
            };
            if Instant::now() >= deadline {
                let waiting: Vec<usize> =
                    round.members.iter().copied().filter(|n| !done.contains(n)).collect();
                bail!(
                    "this node's workers finished, but node(s) {waiting:?} did not within {:?}",
                    self.timeout
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// [`Self::finish`]'s look at the store: its outcome (`Break`), or the members done so far.
    fn look_finished(&mut self, round: &Round) -> Result<ControlFlow<Option<Ending>, Vec<usize>>> {
        let done = self.nodes_with(round.number, RoundKeys::node_done, round.members.clone())?;
        if done.len() == round.members.len() {
            // A node that comes now finds the job over, not a round it must wait out.
            self.end(round.number, &Ending::job_finished())?;
            return Ok(ControlFlow::Break(None));
        }
        match self.ended(round.number)? {
            // The job finished between the two reads: the last node saw this one done.
            Some(ending) if ending.is_job_finished() => Ok(ControlFlow::Break(None)),
            Some(ending) => {
                self.leave(round.number)?;
                Ok(ControlFlow::Break(Some(ending)))
            }
            None => Ok(ControlFlow::Continue(done)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kdmcse::dist::store::StoreServer;

    impl Joined {
        fn round(self) -> Round {
            match self {
                Joined::Round(round) => round,
                Joined::JobOver(ending) => panic!("the job is over: {}", ending.reason),
            }
        }
    }

    fn nodes(min: usize, max: usize) -> NodeRange {
        NodeRange { min, max, last_call: Duration::from_millis(300), rejoin: Duration::from_secs(5) }
    }

    fn node(addr: &str, n: usize, range: NodeRange) -> Rendezvous {
        let address = StoreAddress::Tcp(addr.to_owned());
        Rendezvous::connect(&address, "job", n, range, Duration::from_secs(5)).unwrap()
    }

    fn wait_ended(rdzv: &mut Rendezvous, round: &Round) -> Ending {
        let started = Instant::now();
        loop {
            if let Some(ending) = rdzv.watch(round).unwrap() {
                return ending;
            }
            assert!(started.elapsed() < Duration::from_secs(5), "round {} never ended", round.number);
            std::thread::sleep(POLL);
        }
    }

    /// Nodes 0 and 1 of a 2-node job join round 0; returns their clients and the round both
    /// joined.
    fn two_nodes_join(addr: &str) -> (Rendezvous, Rendezvous, Round) {
        let joiner = {
            let addr = addr.to_owned();
            std::thread::spawn(move || {
                let mut one = node(&addr, 1, nodes(2, 2));
                (one.join(0).unwrap().round(), one)
            })
        };
        let mut zero = node(addr, 0, nodes(2, 2));
        let round = zero.join(0).unwrap().round();
        let (joined, one) = joiner.join().unwrap();
        assert_eq!(joined, round);
        (zero, one, round)
    }

    #[test]
    fn rounds_start_together_end_everywhere_and_a_replacement_moves_on() {
        let server = StoreServer::start("127.0.0.1:0").unwrap();
        let addr = server.addr.to_string();
        let (mut zero, _one, first) = two_nodes_join(&addr);
        assert_eq!(first, Round { number: 0, members: vec![0, 1] });

        // Node 1's launcher is replaced: the new one ends round 0 and waits in round 1.
        let replacement = {
            let addr = addr.clone();
            std::thread::spawn(move || node(&addr, 1, nodes(2, 2)).join(0).unwrap().round())
        };
        let ending = wait_ended(&mut zero, &first);
        assert_eq!(ending, Ending::failure(1, "node 1 rejoined (a replacement launcher)".into()));
        let second = zero.join(1).unwrap().round();
        assert_eq!(second.number, 1);
        assert_eq!(replacement.join().unwrap(), second);

        // The first reason stays; finishing waits for every node.
        zero.end(1, &Ending::failure(1, "rank 0 failed with exit code 1".into())).unwrap();
        zero.end(1, &Ending::failure(143, "later".into())).unwrap();
        assert_eq!(zero.ended(1).unwrap().unwrap().code, 1);
        let mut one = node(&addr, 1, nodes(2, 2));
        assert_eq!(one.finish(&second).unwrap().unwrap().code, 1, "a finished node still sees the round end");
        assert_eq!(one.failures_before(2).unwrap(), 2);
    }

    #[test]
    fn an_elastic_round_starts_with_min_after_the_last_call_and_a_newcomer_joins_at_the_next() {
        let server = StoreServer::start("127.0.0.1:0").unwrap();
        let addr = server.addr.to_string();
        let mut one = node(&addr, 1, nodes(1, 2));
        let started = Instant::now();
        let alone = one.join(0).unwrap().round();
        assert_eq!(alone, Round { number: 0, members: vec![1] });
        assert_eq!(alone.position(1), 0, "ranks follow the members, not the node ids");
        assert!(started.elapsed() >= Duration::from_millis(300), "the last call was not waited for");

        // Node 0 arrives: round 0 is closed to it, it waits in round 1, and round 0 ends for it
        // without counting as a failure.
        let newcomer = {
            let addr = addr.clone();
            std::thread::spawn(move || node(&addr, 0, nodes(1, 2)).join(0).unwrap().round())
        };
        let ending = wait_ended(&mut one, &alone);
        assert_eq!(ending, Ending::membership("node 0 is waiting to join".into()));
        let both = one.join(1).unwrap().round();
        assert_eq!(both, Round { number: 1, members: vec![0, 1] });
        assert_eq!(newcomer.join().unwrap(), both);
        assert_eq!(one.failures_before(1).unwrap(), 0);
    }

    /// A newcomer ends a running round; the next one waits for that round's member while it stops
    /// its workers (longer than the last call), so both start together. A member lost (it never
    /// said it was leaving) is not waited for; one that said so but never came is waited `rejoin`.
    #[test]
    fn a_round_waits_for_the_members_leaving_the_round_before() {
        let server = StoreServer::start("127.0.0.1:0").unwrap();
        let addr = server.addr.to_string();
        let range = NodeRange { rejoin: Duration::from_secs(2), ..nodes(1, 2) };
        let joiner = |n: usize, from: u64| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let mut rdzv = node(&addr, n, range);
                (rdzv.join(from).unwrap().round(), Instant::now(), rdzv)
            })
        };
        let mut one = node(&addr, 1, range);
        let alone = one.join(0).unwrap().round();
        let newcomer = joiner(0, 0);
        wait_ended(&mut one, &alone);
        std::thread::sleep(range.last_call * 2);
        let both = one.join(1).unwrap().round();
        let (joined, _, mut zero) = newcomer.join().unwrap();
        assert_eq!(joined, Round { number: 1, members: vec![0, 1] });
        assert_eq!(both, joined);

        // Node 1 is lost as node 0 ends round 1: round 2 starts without it after the last call.
        zero.end(1, &Ending::failure(exit::FAILURE, "rank 1 failed".into())).unwrap();
        let started = Instant::now();
        let without_one = zero.join(2).unwrap().round();
        assert_eq!(without_one, Round { number: 2, members: vec![0] });
        assert!(started.elapsed() < range.rejoin, "a lost node was waited for");

        // Node 1 comes back and ends round 2; node 0 says it is leaving and never comes.
        let back = joiner(1, 2);
        wait_ended(&mut zero, &without_one);
        let ended = Instant::now();
        let (round, at, _) = back.join().unwrap();
        assert_eq!(round, Round { number: 3, members: vec![1] });
        assert!(at.duration_since(ended) >= range.rejoin, "{:?}", at.duration_since(ended));
    }

    /// A launcher's keys go with it (on the static store with its connection, as on etcd with
    /// its lease): a member lost mid-round ends the round at the next look.
    #[test]
    fn a_lost_launcher_ends_the_round() {
        let server = StoreServer::start("127.0.0.1:0").unwrap();
        let addr = server.addr.to_string();
        let (mut zero, one, round) = two_nodes_join(&addr);
        drop(one);
        let lost = "node 1's launcher was lost (its rendezvous key is gone)";
        assert_eq!(wait_ended(&mut zero, &round), Ending::failure(exit::FAILURE, lost.into()));
    }

    /// A node whose worker failed ends the round and leaves it: the next round waits for it while
    /// it stops its other workers (longer than the last call).
    #[test]
    fn the_node_that_failed_is_waited_for_by_the_next_round() {
        let server = StoreServer::start("127.0.0.1:0").unwrap();
        let addr = server.addr.to_string();
        let (mut zero, mut one, round) = two_nodes_join(&addr);
        let range = nodes(1, 2);
        (zero.nodes, one.nodes) = (range, range);
        one.fail(0, &Ending::failure(exit::FAILURE, "rank 2 failed".into())).unwrap();
        assert!(zero.watch(&round).unwrap().is_some());
        let next = std::thread::spawn(move || zero.join(1).unwrap().round());
        std::thread::sleep(range.last_call * 3);
        let both = Round { number: 1, members: vec![0, 1] };
        assert_eq!(one.join(1).unwrap().round(), both);
        assert_eq!(next.join().unwrap(), both);
    }

    /// A member that said it was leaving the round and was then lost is not waited for.
    #[test]
    fn a_member_lost_while_leaving_is_not_waited_for() {
        let server = StoreServer::start("127.0.0.1:0").unwrap();
        let addr = server.addr.to_string();
        let range = NodeRange { rejoin: Duration::from_secs(30), ..nodes(1, 2) };
        let (mut zero, mut one, round) = two_nodes_join(&addr);
        zero.nodes = range;
        zero.end(0, &Ending::failure(exit::FAILURE, "rank 0 failed".into())).unwrap();
        assert!(one.watch(&round).unwrap().is_some());
        drop(one);
        assert!(zero.watch(&round).unwrap().is_some());
        let started = Instant::now();
        assert_eq!(zero.join(1).unwrap().round(), Round { number: 1, members: vec![0] });
        assert!(started.elapsed() < Duration::from_secs(10), "waited {:?}", started.elapsed());
    }

    #[test]
    fn a_node_that_comes_after_the_job_finished_has_nothing_to_join() {
        let server = StoreServer::start("127.0.0.1:0").unwrap();
        let addr = server.addr.to_string();
        let mut one = node(&addr, 1, nodes(1, 2));
        let alone = one.join(0).unwrap().round();
        // Node 0 waits in round 1 while round 0 finishes; one that comes later finds it over.
        let waiting = {
            let addr = addr.clone();
            std::thread::spawn(move || node(&addr, 0, nodes(1, 2)).join(0).unwrap())
        };
        std::thread::sleep(POLL * 3);
        assert_eq!(one.finish(&alone).unwrap(), None);
        assert_eq!(waiting.join().unwrap(), Joined::JobOver(Ending::job_finished()));
        assert_eq!(node(&addr, 0, nodes(1, 2)).join(0).unwrap(), Joined::JobOver(Ending::job_finished()));
    }

    /// An input error replaces the failure it caused elsewhere, which may have been written
    /// first: no node restarts, and one that comes later finds the job over.
    #[test]
    fn an_input_error_replaces_the_first_ending_and_ends_the_job() {
        let server = StoreServer::start("127.0.0.1:0").unwrap();
        let addr = server.addr.to_string();
        let (mut zero, mut one, _) = two_nodes_join(&addr);
        let first = Ending::failure(1, "rank 0 failed with exit code 1".into());
        assert_eq!(zero.fail(0, &first).unwrap(), first);
        let input = Ending::failure(2, "rank 1 failed with exit code 2".into());
        assert_eq!(one.fail(0, &input).unwrap(), input);
        assert_eq!(zero.end(0, &Ending::failure(1, "later".into())).unwrap(), input);
        assert_eq!(zero.join(1).unwrap(), Joined::JobOver(input.clone()));
        assert_eq!(node(&addr, 1, nodes(2, 2)).join(0).unwrap(), Joined::JobOver(input));
    }

    /// Node 0 fails and settles round 0, while node 1 (having seen the end, or not yet) finds an
    /// input error `delay` later: node 0 must hear it.
    fn settling_hears_an_input_error_found(seen_end: bool, delay: Duration) {
        let server = StoreServer::start("127.0.0.1:0").unwrap();
        let (mut zero, mut one, round) = two_nodes_join(&server.addr.to_string());
        let first = Ending::failure(1, "rank 0 failed with exit code 1".into());
        zero.fail(0, &first).unwrap();
        if seen_end {
            assert_eq!(wait_ended(&mut one, &round), first);
        }
        let settling = {
            let round = round.clone();
            std::thread::spawn(move || (zero.settle(&round).unwrap(), zero))
        };
        std::thread::sleep(delay);
        let input = Ending::failure(2, "rank 1 failed with exit code 2".into());
        one.end(0, &input).unwrap();
        assert_eq!(one.settle(&round).unwrap(), Some(input.clone()));
        let (settled, mut zero) = settling.join().unwrap();
        assert_eq!(settled, Some(input.clone()));
        assert_eq!(zero.join(1).unwrap(), Joined::JobOver(input));
    }

    /// Settling waits for a member still there that has not said it saw the end yet...
    #[test]
    fn settling_waits_for_a_member_yet_to_see_the_end() {
        settling_hears_an_input_error_found(false, POLL * 3);
    }

    /// ... and, past that, for one that said it is leaving, until it stopped its workers.
    #[test]
    fn settling_waits_for_a_member_stopping_its_workers() {
        settling_hears_an_input_error_found(true, ACKNOWLEDGE + POLL * 3);
    }

    #[test]
    fn a_member_lost_while_stopping_its_workers_is_not_waited_for() {
        let server = StoreServer::start("127.0.0.1:0").unwrap();
        let (mut zero, mut one, round) = two_nodes_join(&server.addr.to_string());
        let first = Ending::failure(1, "rank 0 failed with exit code 1".into());
        zero.fail(0, &first).unwrap();
        assert_eq!(wait_ended(&mut one, &round), first);
        drop(one);
        let started = Instant::now();
        assert_eq!(zero.settle(&round).unwrap(), Some(first));
        assert!(started.elapsed() < nodes(2, 2).rejoin / 2, "waited {:?}", started.elapsed());
    }

    /// The last node to finish marks the job finished; a node whose read of the done nodes came
    /// just before (itself only) and whose read of the ending came just after finds the job
    /// finished, not a round to leave.
    #[test]
    fn the_job_finishing_between_a_nodes_two_reads_is_its_finish() {
        let server = StoreServer::start("127.0.0.1:0").unwrap();
        let addr = server.addr.to_string();
        let (mut zero, _, round) = two_nodes_join(&addr);
        // The state node 1's second read meets: the round ended as the job finished, node 0's
        // done key not yet visible to its first read.
        zero.end(0, &Ending::job_finished()).unwrap();
        assert_eq!(node(&addr, 1, nodes(2, 2)).finish(&round).unwrap(), None);
    }

    #[test]
    fn a_node_that_never_comes_is_named() {
        let server = StoreServer::start("127.0.0.1:0").unwrap();
        let address = StoreAddress::Tcp(server.addr.to_string());
        let mut zero =
            Rendezvous::connect(&address, "job", 0, nodes(3, 3), Duration::from_millis(300)).unwrap();
        let err = zero.join(0).unwrap_err().to_string();
        assert!(err.contains("node(s) [1, 2] never joined"), "{err}");
    }
}
