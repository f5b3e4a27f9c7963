//! Keeps `deploy/kubernetes/` true to the code.
//!
//! - Every manifest parses, and kustomization.yaml applies all of them but the example Secret.
//! - The Deployment, Service, PodMonitor and probes agree with the configuration the ConfigMap
//!   holds: the ports of `server.listen` and `server.admin_listen` (on all addresses), probes on
//!   `/readyz` and `/healthz` of the admin port, the Service on the consent port only, the
//!   `--config` path inside the ConfigMap's mount, three replicas, no privilege, a read-only root.
//! - The PrometheusRule holds exactly the groups of `deploy/prometheus/alerts.yml`
//!   (`UPDATE_K8S_RULES=1 cargo test --test integration kubernetes::` copies them), and the PodMonitor's job
//!   label gives the job name those alerts select.
//! - The real binary's `check-config` accepts the ConfigMap's configuration with the Secrets'
//!   files laid out as the kubelet mounts them (`..data` symlinks included), at the paths the
//!   Deployment mounts them, every `*_file` key pointing into a mounted Secret.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use crate::support::yaml::yaml_documents;
use serde_json::Value;

const DIR: &str = "deploy/kubernetes";
const ALERTS: &str = "deploy/prometheus/alerts.yml";
const RULES: &str = "deploy/kubernetes/prometheusrule.yaml";
const EXAMPLE_SECRETS: &str = "secret.example.yaml";
const APP_LABEL: &str = "app.kubernetes.io/name";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every manifest, by file name, as its documents (read once: each file is a Python run).
fn manifests() -> &'static BTreeMap<String, Vec<Value>> {
    static MANIFESTS: OnceLock<BTreeMap<String, Vec<Value>>> = OnceLock::new();
    MANIFESTS.get_or_init(read_manifests)
}

fn read_manifests() -> BTreeMap<String, Vec<Value>> {
    let mut files = BTreeMap::new();
    for entry in fs::read_dir(root().join(DIR)).expect("deploy/kubernetes") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            files.insert(name, yaml_documents(&path));
        }
    }
    files
}

/// The one object of `kind` among the applied manifests.
fn the<'a>(all: &'a BTreeMap<String, Vec<Value>>, kind: &str) -> &'a Value {
    let found: Vec<&Value> = all
        .iter()
        .filter(|(file, _)| file.as_str() != EXAMPLE_SECRETS)
        .flat_map(|(_, docs)| docs)
        .filter(|doc| doc["kind"] == kind)
        .collect();
    assert_eq!(found.len(), 1, "expected one {kind}, found {}", found.len());
    found[0]
}

fn str_of<'a>(value: &'a Value, what: &str) -> &'a str {
    value
        .as_str()
        .unwrap_or_else(|| panic!("{what} is not a string: {value}"))
}

/// The configuration the ConfigMap holds, as TOML text and parsed.
fn config(all: &BTreeMap<String, Vec<Value>>) -> (String, toml::Table) {
    let map = the(all, "ConfigMap");
    let text = str_of(&map["data"]["config.toml"], "data.config.toml").to_owned();
    let table = toml::from_str(&text).unwrap_or_else(|e| panic!("config.toml: {e}"));
    (text, table)
}

fn port_of(addr: &str) -> u64 {
    addr.rsplit_once(':')
        .and_then(|(_, port)| port.parse().ok())
        .unwrap_or_else(|| panic!("no port in {addr}"))
}

fn the_container(deployment: &Value) -> &Value {
    let containers = deployment["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("containers");
    assert_eq!(containers.len(), 1, "one container");
    &containers[0]
}

/// A container port by name or number, as its number.
fn container_port(container: &Value, port: &Value) -> u64 {
    match port {
        Value::Number(n) => n.as_u64().expect("a port number"),
        Value::String(name) => container["ports"]
            .as_array()
            .expect("ports")
            .iter()
            .find(|p| p["name"] == name.as_str())
            .and_then(|p| p["containerPort"].as_u64())
            .unwrap_or_else(|| panic!("no container port named {name}")),
        other => panic!("not a port: {other}"),
    }
}

fn pod_labels(deployment: &Value) -> &serde_json::Map<String, Value> {
    deployment["spec"]["template"]["metadata"]["labels"]
        .as_object()
        .expect("pod labels")
}

/// Whether `selector`'s matchLabels all hold on the pods.
fn selects_the_pods(selector: &Value, deployment: &Value) -> bool {
    let labels = pod_labels(deployment);
    let wanted = selector.as_object().expect("matchLabels");
    !wanted.is_empty() && wanted.iter().all(|(k, v)| labels.get(k) == Some(v))
}

#[test]
fn every_manifest_parses_and_is_applied() {
    let all = manifests();
    for (file, docs) in all {
        assert!(!docs.is_empty(), "{file} is empty");
        for doc in docs {
            assert!(doc["apiVersion"].is_string(), "{file}: no apiVersion");
            assert!(doc["kind"].is_string(), "{file}: no kind");
            if doc["kind"] != "Kustomization" {
                assert!(doc["metadata"]["name"].is_string(), "{file}: no name");
            }
        }
    }
    let kustomization = the(all, "Kustomization");
    let mut applied: Vec<&str> = kustomization["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .map(|r| str_of(r, "resource"))
        .collect();
    applied.sort_unstable();
    let mut expected: Vec<&str> = all
        .keys()
        .map(String::as_str)
        .filter(|f| *f != "kustomization.yaml" && *f != EXAMPLE_SECRETS)
        .collect();
    expected.sort_unstable();
    assert_eq!(
        applied, expected,
        "kustomization.yaml applies every manifest"
    );
    for kind in [
        "ConfigMap",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "PodMonitor",
        "PrometheusRule",
    ] {
        the(all, kind);
    }
    // The image the Deployment names is this version's (kustomize's `images` may retag it).
    let deployment = the(all, "Deployment");
    let image = str_of(&the_container(deployment)["image"], "image");
    assert!(
        image.ends_with(&format!(":{}", env!("CARGO_PKG_VERSION"))),
        "{image}"
    );
    let overridden = &kustomization["images"][0];
    assert_eq!(overridden["newTag"], env!("CARGO_PKG_VERSION"));
    assert_eq!(
        format!(
            "{}:{}",
            str_of(&overridden["name"], "name"),
            overridden["newTag"].as_str().unwrap()
        ),
        image
    );
}

#[test]
fn the_deployment_agrees_with_its_configuration() {
    let all = manifests();
    let (_, config) = config(all);
    let server = config["server"].as_table().expect("[server]");
    let listen = str_of_toml(&server["listen"]);
    let admin_listen = str_of_toml(&server["admin_listen"]);
    // Kubelet probes and Prometheus come from outside the pod's loopback.
    for addr in [listen, admin_listen] {
        assert!(
            addr.starts_with("0.0.0.0:") || addr.starts_with("[::]:"),
            "{addr}"
        );
    }
    let deployment = the(all, "Deployment");
    assert_eq!(deployment["spec"]["replicas"], 3);
    assert!(selects_the_pods(
        &deployment["spec"]["selector"]["matchLabels"],
        deployment
    ));
    let container = the_container(deployment);
    assert_eq!(
        container_port(container, &Value::from("consent")),
        port_of(listen)
    );
    assert_eq!(
        container_port(container, &Value::from("admin")),
        port_of(admin_listen)
    );
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        let get = &container[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert_eq!(
            container_port(container, &get["port"]),
            port_of(admin_listen),
            "{probe} is on the admin port"
        );
    }

    // The drain fits in the grace period.
    let pod = &deployment["spec"]["template"]["spec"];
    let grace_s = pod["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("grace");
    let pre_stop_s = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        .as_u64()
        .unwrap_or(0);
    let shutdown_ms = server
        .get("shutdown_grace_ms")
        .and_then(toml::Value::as_integer)
        .unwrap_or(10_000) as u64;
    assert!(
        grace_s * 1000 > pre_stop_s * 1000 + shutdown_ms,
        "terminationGracePeriodSeconds {grace_s} s is not above preStop {pre_stop_s} s + \
         shutdown_grace_ms {shutdown_ms}"
    );

    // No privilege, a read-only root, not root.
    let security = &container["securityContext"];
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_ne!(security["privileged"], true);
    assert_eq!(security["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_ne!(pod["securityContext"]["runAsUser"], 0);
    assert_eq!(pod["automountServiceAccountToken"], false);

    // Resources are set, the limit at least the request.
    let resources = &container["resources"];
    let request = mebibytes(&resources["requests"]["memory"]);
    let limit = mebibytes(&resources["limits"]["memory"]);
    assert!(resources["requests"]["cpu"].is_string());
    assert!(request > 0 && limit >= request, "{resources}");

    // The Service exposes the consent port, and only it.
    let service = the(all, "Service");
    assert!(selects_the_pods(&service["spec"]["selector"], deployment));
    let ports = service["spec"]["ports"].as_array().expect("ports");
    assert_eq!(ports.len(), 1, "the Service exposes one port");
    assert_eq!(
        container_port(container, &ports[0]["targetPort"]),
        port_of(listen)
    );

    // The PodDisruptionBudget covers the pods and leaves some running.
    let budget = the(all, "PodDisruptionBudget");
    assert!(selects_the_pods(
        &budget["spec"]["selector"]["matchLabels"],
        deployment
    ));
    let max_unavailable = budget["spec"]["maxUnavailable"]
        .as_u64()
        .expect("maxUnavailable");
    assert!((1..3).contains(&max_unavailable));
}

fn str_of_toml(value: &toml::Value) -> &str {
    value.as_str().expect("a TOML string")
}

fn mebibytes(quantity: &Value) -> u64 {
    let text = str_of(quantity, "a memory quantity");
    text.strip_suffix("Mi")
        .and_then(|n| n.parse().ok())
        .or_else(|| {
            text.strip_suffix("Gi")
                .and_then(|n| n.parse::<u64>().ok())
                .map(|g| g * 1024)
        })
        .unwrap_or_else(|| panic!("memory in Mi or Gi: {text}"))
}

#[test]
fn prometheus_scrapes_the_admin_port_as_the_job_the_alerts_expect() {
    let all = manifests();
    let deployment = the(all, "Deployment");
    let monitor = the(all, "PodMonitor");
    assert!(selects_the_pods(
        &monitor["spec"]["selector"]["matchLabels"],
        deployment
    ));
    let endpoint = &monitor["spec"]["podMetricsEndpoints"][0];
    assert_eq!(endpoint["path"], "/metrics");
    let (_, config) = config(all);
    assert_eq!(
        container_port(the_container(deployment), &endpoint["port"]),
        port_of(str_of_toml(&config["server"]["admin_listen"]))
    );
    // The job label is the pod label jobLabel names; the alerts select job="consent-proxy".
    let job_label = str_of(&monitor["spec"]["jobLabel"], "jobLabel");
    let job = str_of(&pod_labels(deployment)[job_label], "the job's pod label");
    let alerts = fs::read_to_string(root().join(ALERTS)).expect("alerts.yml");
    assert!(
        alerts.contains(&format!("up{{job=\"{job}\"}}")),
        "job {job}"
    );
    assert_eq!(job, "consent-proxy");
    assert!(pod_labels(deployment).contains_key(APP_LABEL));
}

#[test]
fn the_prometheus_rule_holds_the_alerts_of_alerts_yml() {
    let alerts = yaml_documents(&root().join(ALERTS));
    let groups = &alerts[0]["groups"];
    assert!(
        groups.as_array().is_some_and(|g| !g.is_empty()),
        "alerts.yml has groups"
    );
    let rule_docs = yaml_documents(&root().join(RULES));
    let rule = &rule_docs[0];
    assert_eq!(rule["kind"], "PrometheusRule");
    if &rule["spec"]["groups"] == groups {
        return;
    }
    if std::env::var_os("UPDATE_K8S_RULES").is_some() {
        copy_alerts_into_the_rule();
        return;
    }
    let names = |groups: &Value| -> Vec<String> {
        groups
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().into_iter().flatten())
            .map(|r| r["alert"].as_str().unwrap_or("?").to_owned())
            .collect()
    };
    panic!(
        "{RULES} differs from {ALERTS} (alerts in the rule: {:?}, in alerts.yml: {:?}); run \
         `UPDATE_K8S_RULES=1 cargo test --test integration kubernetes::` and commit the result",
        names(&rule["spec"]["groups"]),
        names(groups)
    );
}

/// Replaces everything after the rule's `spec:` line with alerts.yml from its `groups:` line
/// on, indented under `spec` (comments kept).
fn copy_alerts_into_the_rule() {
    let rule = fs::read_to_string(root().join(RULES)).expect("read the rule");
    let head_end = rule.find("\nspec:").expect("a `spec:` line") + "\nspec:\n".len();
    let alerts = fs::read_to_string(root().join(ALERTS)).expect("read alerts.yml");
    let groups_at = alerts.find("\ngroups:").expect("a `groups:` line") + 1;
    let indented: String = alerts[groups_at..]
        .lines()
        .map(|line| {
            if line.is_empty() {
                "\n".to_owned()
            } else {
                format!("  {line}\n")
            }
        })
        .collect();
    fs::write(
        root().join(RULES),
        format!("{}{indented}", &rule[..head_end]),
    )
    .expect("write the rule");
}

// ---------------------------------------------------------------------------------------------
// check-config on the ConfigMap's configuration, with the Secrets mounted as the kubelet does

/// A temporary directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = std::env::temp_dir().join(format!(
            "consent-proxy-kubernetes-{}-{nanos}",
            std::process::id()
        ));
        fs::create_dir_all(&path).expect("create the temp dir");
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Writes `files` into `dir` as the kubelet projects a ConfigMap or Secret: the files in a
/// timestamped directory with the volume's `mode`, `..data` a symlink to it, each name a
/// symlink through `..data`, and the mount itself sticky and writable by all (`1777`, on a
/// read-only tmpfs there).
fn project(dir: &Path, files: &BTreeMap<String, String>, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    let chmod = |path: &Path, mode| {
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
    };
    let stamp = "..2026_01_01_00_00_00.000000001";
    fs::create_dir_all(dir.join(stamp)).expect("create the projection");
    for (name, content) in files {
        let file = dir.join(stamp).join(name);
        fs::write(&file, content).expect("write a projected file");
        chmod(&file, mode);
    }
    std::os::unix::fs::symlink(stamp, dir.join("..data")).expect("..data");
    for name in files.keys() {
        std::os::unix::fs::symlink(format!("..data/{name}"), dir.join(name)).expect("link");
    }
    chmod(dir, 0o1777);
}

/// A ConfigMap's or Secret's files: `data` (base64 for a Secret) and `stringData`.
fn files_of(object: &Value) -> BTreeMap<String, String> {
    use base64::Engine as _;
    let mut files = BTreeMap::new();
    let secret = object["kind"] == "Secret";
    for (name, value) in object["data"].as_object().into_iter().flatten() {
        let text = str_of(value, name);
        let content = if secret {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(text)
                .unwrap_or_else(|e| panic!("{name} is not base64: {e}"));
            String::from_utf8(bytes).expect("UTF-8")
        } else {
            text.to_owned()
        };
        files.insert(name.clone(), content);
    }
    for (name, value) in object["stringData"].as_object().into_iter().flatten() {
        files.insert(name.clone(), str_of(value, name).to_owned());
    }
    files
}

#[test]
fn check_config_accepts_the_config_map_with_the_secrets_mounted() {
    let all = manifests();
    let deployment = the(all, "Deployment");
    let container = the_container(deployment);
    let objects: Vec<&Value> = all.values().flatten().collect();
    let find = |kind: &str, name: &str| -> &Value {
        objects
            .iter()
            .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name} among the manifests"))
    };

    // Lay every mount out under a temporary root; the configuration's paths move with it.
    let scratch = TempDir::new();
    let (mut text, config) = config(all);
    let volumes = deployment["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .expect("volumes");
    let mut secret_mounts = Vec::new();
    for mount in container["volumeMounts"].as_array().expect("volumeMounts") {
        let mount_path = str_of(&mount["mountPath"], "mountPath");
        assert_eq!(mount["readOnly"], true, "{mount_path} is mounted read-only");
        let volume = volumes
            .iter()
            .find(|v| v["name"] == mount["name"])
            .unwrap_or_else(|| panic!("no volume {}", mount["name"]));
        let kind = if volume["configMap"].is_object() {
            "configMap"
        } else {
            "secret"
        };
        // The kubelet's default mode is 0644.
        let mode = volume[kind]["defaultMode"]
            .as_u64()
            .map_or(0o644, |m| m as u32);
        let source = if kind == "configMap" {
            find("ConfigMap", str_of(&volume["configMap"]["name"], "name"))
        } else {
            secret_mounts.push(mount_path.to_owned());
            find(
                "Secret",
                str_of(&volume["secret"]["secretName"], "secretName"),
            )
        };
        let local = scratch.0.join(mount_path.trim_start_matches('/'));
        project(&local, &files_of(source), mode);
        text = text.replace(mount_path, &local.display().to_string());
    }

    // Every `*_file` key names a file of a mounted Secret.
    let mut file_keys = Vec::new();
    collect_file_keys(&toml::Value::Table(config), "", &mut file_keys);
    assert!(file_keys.len() >= 5, "{file_keys:?}");
    for (key, path) in &file_keys {
        assert!(
            secret_mounts
                .iter()
                .any(|m| path.starts_with(&format!("{m}/")) || path == m),
            "{key} = {path} is not inside a mounted Secret ({secret_mounts:?})"
        );
    }

    // The Deployment's --config names the ConfigMap's file.
    let args: Vec<&str> = container["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| str_of(a, "arg"))
        .collect();
    let at = args
        .iter()
        .position(|a| *a == "--config")
        .expect("--config");
    let config_path = args[at + 1];
    let config_mount = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| str_of(&m["mountPath"], "mountPath"))
        .find(|m| config_path.starts_with(&format!("{m}/")))
        .expect("--config inside a mount");
    assert_eq!(&config_path[config_mount.len() + 1..], "config.toml");
    let local_config = scratch.0.join(config_path.trim_start_matches('/'));
    // The projected config.toml is a symlink; the paths in it now point into the scratch root.
    fs::remove_file(&local_config).expect("unlink the projected config");
    fs::write(&local_config, &text).expect("write the relocated config");

    let output = Command::new(env!("CARGO_BIN_EXE_consent-proxy"))
        .arg("check-config")
        .arg("--config")
        .arg(&local_config)
        .env_clear()
        .output()
        .expect("run check-config");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(0),
        "check-config refused the ConfigMap's configuration:\n{stderr}"
    );
    // The Secrets are mounted group-readable (fsGroup), not readable by others: no warning.
    assert_eq!(stderr, "", "check-config warned about the mounted Secrets");
    // What it printed is the configuration, without a secret.
    assert!(
        stdout.contains("redis://consent-proxy-redis:6379/0"),
        "{stdout}"
    );
    for secret in the_secrets(all) {
        assert!(
            !stdout.contains(&secret),
            "a secret in check-config's output"
        );
    }
}

fn the_secrets(all: &BTreeMap<String, Vec<Value>>) -> Vec<String> {
    all.values()
        .flatten()
        .filter(|o| o["kind"] == "Secret")
        .flat_map(|o| files_of(o).into_values())
        .collect()
}

/// Every key ending in `_file` with a non-empty value, by dotted path.
fn collect_file_keys(value: &toml::Value, path: &str, into: &mut Vec<(String, String)>) {
    match value {
        toml::Value::Table(table) => {
            for (key, value) in table {
                let path = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                match value {
                    toml::Value::String(s) if key.ends_with("_file") && !s.is_empty() => {
                        into.push((path, s.clone()));
                    }
                    _ => collect_file_keys(value, &path, into),
                }
            }
        }
        toml::Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                collect_file_keys(item, &format!("{path}[{i}]"), into);
            }
        }
        _ => {}
    }
}
