//! The Kubernetes manifests: every overlay renders with kustomize and validates against the
//! Kubernetes API types (a typed round trip that loses no field), and the pod command lines of
//! the 2-node overlay, run as two local launchers on loopback, train and checkpoint to a real S3
//! server and recover when node 1 is killed.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::process::free_port;
use common::s3::{open_store, s3_env, S3Server, BUCKET};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Container, Service};
use kdmcse::checkpoint::Pointer;
use serde::de::DeserializeOwned;
use serde::Serialize;

fn render(overlay: &str) -> Vec<serde_json::Value> {
    render_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("k8s/overlays").join(overlay))
}

/// The documents `kubectl kustomize DIR` renders.
fn render_dir(dir: &Path) -> Vec<serde_json::Value> {
    let overlay = dir.display();
    let out = Command::new("kubectl").arg("kustomize").arg(dir).output().expect("kubectl not found");
    assert!(out.status.success(), "kustomize {overlay}: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| serde_json::Value::deserialize(doc).unwrap())
        .collect()
}

use serde::Deserialize;

/// Parses `doc` as the API type and checks that serialising it again gives the same document:
/// an unknown or misplaced field would be dropped, a wrong type would not parse.
fn validate<T: DeserializeOwned + Serialize>(doc: &serde_json::Value) -> T {
    let typed: T =
        serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("invalid {}: {e}", doc["kind"]));
    let again = serde_json::to_value(&typed).unwrap();
    assert_eq!(&again, doc, "{} does not round-trip: unknown fields?", doc["kind"]);
    typed
}

struct Rendered {
    job: Job,
    container: Container,
    config: ConfigMap,
}

fn rendered(overlay: &str) -> Rendered {
    let docs = render(overlay);
    let (mut job, mut service, mut config) = (None, None, None);
    for doc in &docs {
        match doc["kind"].as_str().unwrap() {
            "Job" => job = Some(validate::<Job>(doc)),
            "Service" => service = Some(validate::<Service>(doc)),
            "ConfigMap" => config = Some(validate::<ConfigMap>(doc)),
            other => panic!("{overlay}: unexpected kind {other}"),
        }
    }
    let (job, service, config) = (job.unwrap(), service.unwrap(), config.unwrap());
    let spec = job.spec.as_ref().unwrap();
    let pod = spec.template.spec.as_ref().unwrap();
    assert_eq!(spec.completion_mode.as_deref(), Some("Indexed"));
    assert_eq!(service.spec.as_ref().unwrap().cluster_ip.as_deref(), Some("None"), "headless");
    assert_eq!(pod.subdomain.as_deref(), service.metadata.name.as_deref());
    let container = pod.containers[0].clone();
    let args = container.args.clone().unwrap();
    let master = &args[args.iter().position(|a| a == "--master-addr").unwrap() + 1];
    let expected =
        format!("{}-0.{}", job.metadata.name.as_deref().unwrap(), service.metadata.name.as_deref().unwrap());
    assert_eq!(master, &expected, "the master is pod 0 of the Job");
    Rendered { job, container, config }
}

fn env_value(container: &Container, name: &str) -> String {
    let env = container.env.as_ref().unwrap();
    env.iter()
        .find(|e| e.name == name)
        .and_then(|e| e.value.clone())
        .unwrap_or_else(|| panic!("no env {name}"))
}

/// The image every manifest gets from the `images:` of k8s/config.
const IMAGE: &str = "ghcr.io/example/kdmcse:0.1.0";

#[test]
fn overlays_render_and_validate() {
    for (overlay, nodes, gpus) in
        [("1node-8gpu", 1, Some(8)), ("4node-8gpu", 4, Some(8)), ("2node-cpu", 2, None)]
    {
        let r = rendered(overlay);
        let spec = r.job.spec.as_ref().unwrap();
        assert_eq!(spec.completions, Some(nodes), "{overlay}");
        assert_eq!(spec.parallelism, Some(nodes), "{overlay}");
        assert_eq!(env_value(&r.container, "KDMCSE_NNODES"), nodes.to_string(), "{overlay}");
        assert_eq!(r.container.image.as_deref(), Some(IMAGE), "{overlay}: the image of k8s/config");
        let limits = r.container.resources.as_ref().unwrap().limits.clone().unwrap_or_default();
        let args = r.container.args.clone().unwrap();
        let has_env = |name: &str| r.container.env.iter().flatten().any(|e| e.name == name);
        match gpus {
            Some(g) => {
                assert_eq!(limits["nvidia.com/gpu"].0, g.to_string(), "{overlay}");
                assert_eq!(env_value(&r.container, "KDMCSE_GPUS"), g.to_string());
                assert!(!has_env("KDMCSE_NPROC"), "{overlay}");
            }
            None => {
                assert!(!limits.contains_key("nvidia.com/gpu"), "{overlay}");
                assert!(!has_env("KDMCSE_GPUS"), "{overlay}: the CPU overlay deletes it by name");
                assert_eq!(env_value(&r.container, "KDMCSE_NPROC"), "1");
                assert_eq!(env_value(&r.container, "KDMCSE_TRAIN__DEVICE"), "cpu");
            }
        }
        assert!(args.windows(2).any(|w| w == ["--resume", "auto"]), "{overlay}: pods resume");
        assert!(r.config.data.as_ref().unwrap().contains_key("train.toml"));
        // Pre-emption and drains are not failures; a config error (exit 2) fails the Job at once.
        let policy = spec.pod_failure_policy.as_ref().unwrap();
        let ignores_disruption = policy.rules.iter().any(|rule| {
            rule.action == "Ignore"
                && rule
                    .on_pod_conditions
                    .iter()
                    .flatten()
                    .any(|c| c.type_ == "DisruptionTarget" && c.status == "True")
        });
        assert!(ignores_disruption, "{overlay}: pre-emption must not count as a failure");
        let fails_on_2 = policy.rules.iter().any(|rule| {
            rule.action == "FailJob"
                && rule.on_exit_codes.as_ref().is_some_and(|codes| {
                    codes.operator == "In"
                        && codes.values == [2]
                        && codes.container_name.as_deref() == Some("trainer")
                })
        });
        assert!(fails_on_2, "{overlay}: exit code 2 (bad config) must fail the Job");
    }
}

/// What every pod of every manifest needs: the shared image, the ConfigMap mounted where the
/// config is read, the data volume, shared memory, time to checkpoint on SIGTERM, the output
/// folder from the environment, and `--resume auto`.
fn assert_pod_resumes_with_the_shared_config(
    what: &str,
    pod: &k8s_openapi::api::core::v1::PodSpec,
    config: &str,
) {
    let container = &pod.containers[0];
    assert_eq!(container.image.as_deref(), Some(IMAGE), "{what}");
    let args = container.args.clone().unwrap();
    assert!(args.windows(2).any(|w| w == ["--resume", "auto"]), "{what}: {args:?}");
    assert!(args.windows(2).any(|w| w == ["--config", "/etc/kdmcse/train.toml"]), "{what}: {args:?}");
    assert!(args.windows(2).any(|w| w == ["--set", "output.dir=$(OUTPUT_DIR)"]), "{what}: {args:?}");
    assert!(container.env.iter().flatten().any(|e| e.name == "OUTPUT_DIR"), "{what}: OUTPUT_DIR");
    assert!(pod.termination_grace_period_seconds.is_some_and(|s| s >= 60), "{what}: grace to checkpoint");
    let volumes = pod.volumes.as_ref().unwrap();
    let volume =
        |name: &str| volumes.iter().find(|v| v.name == name).unwrap_or_else(|| panic!("{what}: no {name}"));
    assert_eq!(volume("config").config_map.as_ref().unwrap().name, config, "{what}: the generated ConfigMap");
    assert!(volume("data").persistent_volume_claim.is_some(), "{what}");
    assert_eq!(volume("dshm").empty_dir.as_ref().unwrap().medium.as_deref(), Some("Memory"), "{what}");
    let mounts = container.volume_mounts.as_ref().unwrap();
    for (name, path) in [("config", "/etc/kdmcse"), ("data", "/data"), ("dshm", "/dev/shm")] {
        assert!(mounts.iter().any(|m| m.name == name && m.mount_path == path), "{what}: {name} at {path}");
    }
}

/// The generated ConfigMap of a rendering (holding train.toml), validated; its name.
fn config_map(what: &str, docs: &[serde_json::Value]) -> String {
    let doc =
        docs.iter().find(|d| d["kind"] == "ConfigMap").unwrap_or_else(|| panic!("{what}: no ConfigMap"));
    let config: ConfigMap = validate(doc);
    assert!(config.data.as_ref().unwrap().contains_key("train.toml"), "{what}");
    config.metadata.name.unwrap()
}

/// The JobSet and Kubeflow's PyTorchJob render with the shared config and image, and their pod
/// templates are valid pods (typed round trip) that resume; the JobSet's node count, node rank and
/// master follow its replicated Job, the PyTorchJob's come from the operator's variables.
#[test]
fn the_jobset_and_the_pytorchjob_render_with_the_shared_config() {
    use k8s_openapi::api::batch::v1::JobTemplateSpec;
    use k8s_openapi::api::core::v1::PodTemplateSpec;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("k8s");

    let docs = render_dir(&root.join("jobset"));
    let config = config_map("jobset", &docs);
    let jobset = docs.iter().find(|d| d["kind"] == "JobSet").expect("a JobSet");
    assert_eq!(jobset["apiVersion"], "jobset.x-k8s.io/v1alpha2");
    let replicated = &jobset["spec"]["replicatedJobs"][0];
    let job: JobTemplateSpec = validate(&replicated["template"]);
    let pod = job.spec.as_ref().unwrap().template.spec.clone().unwrap();
    assert_pod_resumes_with_the_shared_config("jobset", &pod, &config);
    let container = &pod.containers[0];
    assert_eq!(env_value(container, "KDMCSE_NNODES"), replicated["replicas"].to_string());
    let args = container.args.clone().unwrap();
    let master = format!(
        "{}-{}-0-0.{}",
        jobset["metadata"]["name"].as_str().unwrap(),
        replicated["name"].as_str().unwrap(),
        jobset["spec"]["network"]["subdomain"].as_str().unwrap()
    );
    assert!(args.windows(2).any(|w| w == ["--master-addr", master.as_str()]), "{args:?} vs {master}");
    assert!(args.windows(2).any(|w| w == ["--node-rank", "$(JOBSET_NODE_INDEX)"]), "{args:?}");
    let fails_on_2 = job
        .spec
        .as_ref()
        .unwrap()
        .pod_failure_policy
        .as_ref()
        .unwrap()
        .rules
        .iter()
        .any(|r| r.action == "FailJob" && r.on_exit_codes.as_ref().is_some_and(|c| c.values == [2]));
    assert!(fails_on_2 && jobset["spec"]["failurePolicy"]["rules"][0]["action"] == "FailJobSet");

    let docs = render_dir(&root.join("kubeflow"));
    let config = config_map("kubeflow", &docs);
    let job = docs.iter().find(|d| d["kind"] == "PyTorchJob").expect("a PyTorchJob");
    assert_eq!(job["apiVersion"], "kubeflow.org/v1");
    for role in ["Master", "Worker"] {
        let replicas = &job["spec"]["pytorchReplicaSpecs"][role];
        let template: PodTemplateSpec = validate(&replicas["template"]);
        let pod = template.spec.unwrap();
        assert_pod_resumes_with_the_shared_config(role, &pod, &config);
        let container = &pod.containers[0];
        assert_eq!(container.name, "pytorch", "the operator's container name");
        let port =
            container.ports.as_ref().unwrap().iter().find(|p| p.name.as_deref() == Some("pytorchjob-port"));
        assert!(port.is_some(), "{role}: MASTER_PORT comes from the pytorchjob-port");
        let args = container.args.clone().unwrap();
        for (flag, var) in [
            ("--nnodes", "$(WORLD_SIZE)"),
            ("--node-rank", "$(RANK)"),
            ("--master-addr", "$(MASTER_ADDR)"),
            ("--master-port", "$(MASTER_PORT)"),
        ] {
            assert!(args.windows(2).any(|w| w == [flag, var]), "{role}: {args:?}");
        }
        assert_eq!(replicas["restartPolicy"], "ExitCode", "{role}");
    }
    assert_eq!(job["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"], 1);
}

/// Expands `$(VAR)` as the kubelet does.
fn expand(arg: &str, env: &HashMap<String, String>) -> String {
    let mut out = arg.to_owned();
    for (k, v) in env {
        out = out.replace(&format!("$({k})"), v);
    }
    out
}

/// The mounted config: the common quick config with `device = "cuda"`, which the overlay's pod
/// arguments override for its CPU nodes.
fn write_config(dir: &Path) -> PathBuf {
    let path = common::quick_config(dir, "unused", 8, 8);
    let text = std::fs::read_to_string(&path).unwrap().replace("device = \"cpu\"", "device = \"cuda\"");
    std::fs::write(&path, text).unwrap();
    path
}

/// One "pod": the container's command line with the pod's environment, as a local process.
fn start_pod(
    r: &Rendered,
    index: usize,
    config: &Path,
    port: u16,
    s3_port: u16,
    log: Arc<Mutex<String>>,
) -> Child {
    let mut env: HashMap<String, String> = r
        .container
        .env
        .as_ref()
        .unwrap()
        .iter()
        .filter_map(|e| e.value.clone().map(|v| (e.name.clone(), v)))
        .collect();
    env.insert("OUTPUT_DIR".into(), format!("s3://{BUCKET}/k8s-run"));
    env.insert("KDMCSE_TIMEOUT".into(), "120".into());
    let args: Vec<String> = r
        .container
        .args
        .as_ref()
        .unwrap()
        .iter()
        .map(|a| expand(a, &env))
        .map(|a| match a.as_str() {
            "kdmcse-train-0.kdmcse" => "127.0.0.1".to_owned(), // pod 0's DNS name, here
            "29500" => port.to_string(),
            "/etc/kdmcse/train.toml" => config.display().to_string(), // the mounted ConfigMap
            _ => a,
        })
        .collect();
    assert_eq!(r.container.command.as_deref(), Some(&["kdmcse-launch".to_owned()][..]));
    let mut cmd = Command::new(common::process::launcher_bin());
    s3_env(&mut cmd, s3_port)
        .args(&args)
        .envs(&env)
        .env("JOB_COMPLETION_INDEX", index.to_string())
        .env("KDMCSE_BIN", env!("CARGO_BIN_EXE_kdmcse"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd.spawn().unwrap();
    let (stdout, stderr) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let read = |stream: Box<dyn std::io::Read + Send>, log: Arc<Mutex<String>>| {
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                log.lock().unwrap().push_str(&format!("{line}\n"));
            }
        })
    };
    read(Box::new(stdout), log.clone());
    read(Box::new(stderr), log);
    child
}

/// Whether a pod's output holds an event named `name` with these fields.
fn has_event(log: &str, name: &str, fields: &[(&str, serde_json::Value)]) -> bool {
    log.lines()
        .filter_map(common::process::event)
        .any(|e| e["event"] == name && fields.iter().all(|(k, v)| e[*k] == *v))
}

#[test]
fn two_node_pod_commands_train_to_s3_and_recover_from_a_lost_node() {
    let r = rendered("2node-cpu");
    let server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    let port = free_port();
    let (log0, log1) = (Arc::new(Mutex::new(String::new())), Arc::new(Mutex::new(String::new())));
    let mut node0 = start_pod(&r, 0, &config, port, server.port, log0.clone());
    let mut node1 = start_pod(&r, 1, &config, port, server.port, log1.clone());
    let deadline = Instant::now() + Duration::from_secs(300);
    while !has_event(&log0.lock().unwrap(), "checkpoint_saved", &[("step", 2.into())]) {
        assert!(
            Instant::now() < deadline,
            "no checkpoint:\n{}\n{}",
            log0.lock().unwrap(),
            log1.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Node 1's pod dies (its whole process group), and the Job starts a replacement.
    common::process::kill(-(node1.id() as i32), 9);
    let _ = node1.wait();
    let log1b = Arc::new(Mutex::new(String::new()));
    let mut node1b = start_pod(&r, 1, &config, port, server.port, log1b.clone());
    let (s0, s1) = (node0.wait().unwrap(), node1b.wait().unwrap());
    let (l0, l1) = (log0.lock().unwrap().clone(), log1b.lock().unwrap().clone());
    assert!(s0.success() && s1.success(), "node 0 {s0:?}:\n{l0}\nnode 1 {s1:?}:\n{l1}");
    assert!(l0.contains("restarting in round 1"), "node 0 restarts its workers:\n{l0}");
    assert!(
        has_event(&l0, "resumed", &[("rank", 0.into())]) && has_event(&l1, "resumed", &[("rank", 1.into())]),
        "both resume from the checkpoint:\n{l0}\n{l1}"
    );
    let store = open_store(&format!("s3://{BUCKET}/k8s-run"), server.port);
    assert_eq!(store.pointer(Pointer::Latest).unwrap().as_deref(), Some("step-00000008"));
    assert_eq!(store.load_newest().unwrap().unwrap().step, 8);
    // The recovered run trained the model an uninterrupted one does (2 workers, same config).
    let straight = dir.path().join("straight");
    let output = format!("output.dir=\"{}\"", straight.display());
    let reference = common::process::launcher(&["--nproc", "2", "--standalone", "--"])
        .args(["--config", config.to_str().unwrap(), "--set", "train.device=\"cpu\"", "--set", &output])
        .output()
        .unwrap();
    common::process::assert_ok(&reference);
    let recovered = common::checkpoint_weights(&store, "step-00000008");
    assert_eq!(common::max_weight_diff(&recovered, &common::latest_weights(&straight)), 0.0);
}

/// The etcd cluster of `k8s/components/etcd` in a rendering, validated: 3 members started
/// together, each listed in the initial cluster under its stable name, a quorum kept through
/// voluntary disruptions. Returns the members' client endpoints and the client Service's.
fn etcd_cluster(what: &str, docs: &[serde_json::Value]) -> (Vec<String>, String) {
    use k8s_openapi::api::apps::v1::StatefulSet;
    use k8s_openapi::api::policy::v1::PodDisruptionBudget;
    let of_kind = |kind: &'static str| docs.iter().filter(move |d| d["kind"] == kind);
    let sts: StatefulSet =
        validate(of_kind("StatefulSet").next().unwrap_or_else(|| panic!("{what}: no etcd")));
    let spec = sts.spec.as_ref().unwrap();
    let (name, replicas) = (sts.metadata.name.clone().unwrap(), spec.replicas.unwrap());
    assert_eq!(replicas, 3, "{what}: a quorum survives one member");
    assert_eq!(spec.pod_management_policy.as_deref(), Some("Parallel"), "{what}: members start together");
    let labels = spec.template.metadata.as_ref().unwrap().labels.clone().unwrap();
    let services: Vec<Service> = of_kind("Service").map(validate).collect();
    let selects_etcd = |s: &&Service| {
        let selector = s.spec.as_ref().unwrap().selector.clone().unwrap_or_default();
        !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
    };
    let peers = services
        .iter()
        .filter(selects_etcd)
        .find(|s| s.metadata.name.as_ref() == Some(&spec.service_name.clone().unwrap()));
    let peers = peers.unwrap_or_else(|| panic!("{what}: no headless Service for the members"));
    assert_eq!(peers.spec.as_ref().unwrap().cluster_ip.as_deref(), Some("None"), "{what}");
    let client = services.iter().filter(selects_etcd).find(|s| s.spec.as_ref().unwrap().cluster_ip.is_none());
    let client = client.unwrap_or_else(|| panic!("{what}: no client Service")).metadata.name.clone().unwrap();
    let service = peers.metadata.name.clone().unwrap();
    let member = |i: i32| format!("{name}-{i}.{service}");
    let initial: Vec<String> =
        (0..replicas).map(|i| format!("{name}-{i}=http://{}:2380", member(i))).collect();
    let args = spec.template.spec.as_ref().unwrap().containers[0].args.clone().unwrap();
    assert!(args.contains(&format!("--initial-cluster={}", initial.join(","))), "{what}: {args:?}");
    let pdb: PodDisruptionBudget =
        validate(of_kind("PodDisruptionBudget").next().expect("a PodDisruptionBudget"));
    let min_available = pdb.spec.unwrap().min_available.unwrap();
    assert_eq!(min_available, k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(2), "{what}");
    ((0..replicas).map(|i| format!("{}:2379", member(i))).collect(), format!("{client}:2379"))
}

/// A trainer pod's environment as the kubelet gives it, less secrets: the `envFrom` ConfigMaps of
/// `docs`, then its own variables (which win), those from the downward API through `field`; plus
/// what the operator adds (`extra`).
fn pod_env(
    container: &Container,
    docs: &[serde_json::Value],
    field: impl Fn(&str) -> String,
    extra: &[(String, String)],
) -> HashMap<String, String> {
    let mut env: HashMap<String, String> = extra.iter().cloned().collect();
    for source in container.env_from.iter().flatten() {
        let Some(map) = &source.config_map_ref else { continue };
        let doc =
            docs.iter().find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == map.name.as_str());
        let config: ConfigMap = validate(doc.unwrap_or_else(|| panic!("no ConfigMap {}", map.name)));
        env.extend(config.data.unwrap());
    }
    for var in container.env.iter().flatten() {
        let from_field =
            var.value_from.as_ref().and_then(|v| v.field_ref.as_ref()).map(|f| field(&f.field_path));
        // Secrets (the S3 credentials) are not there to read, and not needed to meet.
        if let Some(value) = var.value.clone().or(from_field) {
            env.insert(var.name.clone(), value);
        }
    }
    env
}

/// The etcd variants of the Indexed Job, the JobSet and the PyTorchJob run the etcd cluster of
/// `k8s/components/etcd`, and their pods' launchers are given every member (or the client
/// Service), an elastic range up to their pod count, and a rendezvous id. kdmcse-launch itself
/// reads each pod's command line: here, where the cluster's names do not resolve, it takes the
/// etcd backend and fails as a restartable rendezvous error (exit 1) naming those endpoints.
#[test]
fn the_etcd_variants_point_every_launcher_at_a_three_member_etcd() {
    use k8s_openapi::api::batch::v1::JobTemplateSpec;
    use k8s_openapi::api::core::v1::PodTemplateSpec;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("k8s");
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    for variant in ["overlays/4node-8gpu-etcd", "jobset-etcd", "kubeflow-etcd"] {
        let docs = render_dir(&root.join(variant));
        let (members, client) = etcd_cluster(variant, &docs);
        let find = |kind: &str| docs.iter().find(|d| d["kind"] == kind);
        let (pod, pods, endpoints, extra) = if let Some(job) = find("Job") {
            let job: Job = validate(job);
            let spec = job.spec.unwrap();
            (spec.template.spec.unwrap(), spec.completions.unwrap(), members.join(","), vec![])
        } else if let Some(jobset) = find("JobSet") {
            let replicated = &jobset["spec"]["replicatedJobs"][0];
            let job: JobTemplateSpec = validate(&replicated["template"]);
            let pod = job.spec.unwrap().template.spec.unwrap();
            (pod, replicated["replicas"].as_i64().unwrap() as i32, members.join(","), vec![])
        } else {
            let job = find("PyTorchJob").expect("a Job, JobSet or PyTorchJob");
            let specs = &job["spec"]["pytorchReplicaSpecs"];
            assert!(specs.get("Master").is_none(), "elastic PyTorchJobs have Workers only");
            let template: PodTemplateSpec = validate(&specs["Worker"]["template"]);
            // What the training-operator sets from elasticPolicy (as for torchrun).
            let policy = &job["spec"]["elasticPolicy"];
            let host = format!("{}:{}", policy["rdzvHost"].as_str().unwrap(), policy["rdzvPort"]);
            let operator = [
                ("PET_NNODES", format!("{}:{}", policy["minReplicas"], policy["maxReplicas"])),
                ("PET_RDZV_BACKEND", policy["rdzvBackend"].as_str().unwrap().to_owned()),
                ("PET_RDZV_ENDPOINT", host.clone()),
                ("PET_RDZV_ID", policy["rdzvId"].as_str().unwrap().to_owned()),
                ("PET_MAX_RESTARTS", policy["maxRestarts"].to_string()),
            ];
            assert_eq!(policy["maxReplicas"], specs["Worker"]["replicas"], "{variant}");
            assert_eq!(host, client, "{variant}: the operator's endpoint is the etcd client Service");
            let extra = operator.map(|(k, v)| (k.to_owned(), v)).to_vec();
            (template.spec.unwrap(), specs["Worker"]["replicas"].as_i64().unwrap() as i32, host, extra)
        };
        assert_pod_resumes_with_the_shared_config(variant, &pod, &config_map(variant, &docs));
        let container = &pod.containers[0];
        let env = pod_env(
            container,
            &docs,
            |path| match path {
                "metadata.labels['batch.kubernetes.io/controller-uid']" => "3f1c9a".into(),
                "metadata.labels['jobset.sigs.k8s.io/jobset-name']" => "kdmcse".into(),
                "metadata.annotations['jobset.sigs.k8s.io/job-index']" => "1".into(),
                "metadata.labels['training.kubeflow.org/replica-index']" => "1".into(),
                other => panic!("{variant}: a field the test does not know: {other}"),
            },
            &extra,
        );
        let args: Vec<String> = container.args.clone().unwrap().iter().map(|a| expand(a, &env)).collect();
        let nnodes = args.windows(2).find(|w| w[0] == "--nnodes").map(|w| w[1].clone());
        let nnodes = nnodes.or_else(|| env.get("KDMCSE_NNODES").cloned()).unwrap();
        assert_eq!(nnodes, format!("2:{pods}"), "{variant}: elastic up to its pods");
        let has_id = env.contains_key("KDMCSE_RDZV_ID") || args.iter().any(|a| a == "--rdzv-id");
        assert!(has_id, "{variant}: a rendezvous id of its own");
        let args: Vec<String> = args
            .into_iter()
            .map(|a| if a == "/etc/kdmcse/train.toml" { config.display().to_string() } else { a })
            .collect();
        // No GPUs here: as many CPU workers.
        let mut env = env;
        if let Some(gpus) = env.remove("KDMCSE_GPUS") {
            env.insert("KDMCSE_NPROC".into(), gpus);
        }
        let out = Command::new(common::process::launcher_bin())
            .args(&args)
            .env_clear()
            .envs(&env)
            .env("PATH", std::env::var_os("PATH").unwrap())
            .env("KDMCSE_TIMEOUT", "2")
            .env("JOB_COMPLETION_INDEX", "1")
            .env("KDMCSE_BIN", env!("CARGO_BIN_EXE_kdmcse"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{variant}: {args:?}\n{stderr}");
        assert!(stderr.contains(&format!("cannot reach etcd at {endpoints} ")), "{variant}:\n{stderr}");
    }
}
