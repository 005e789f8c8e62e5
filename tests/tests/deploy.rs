//! The Kubernetes, Prometheus and Grafana files in `deploy/` against the
//! tool itself: the DaemonSet's arguments parse with the real CLI, its
//! metrics port is the one the probes and the scrape configuration use, and
//! the dashboard queries only metrics that `port-trace --metrics` serves.

use std::collections::BTreeSet;
use std::path::PathBuf;

use clap::Parser;
use port_trace::metrics::{bind_addr, is_sample_name, METRIC_NAMES};
use serde::Deserialize;
use serde_json::Value;

fn deploy_file(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every document of a YAML file, as JSON values.
fn yaml_documents(name: &str) -> Vec<Value> {
    let text = deploy_file(name);
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{name}: {e}")))
        .collect()
}

fn str_at<'a>(value: &'a Value, pointer: &str) -> &'a str {
    value.pointer(pointer).and_then(Value::as_str).unwrap_or_else(|| panic!("no string at {pointer} in {value}"))
}

fn daemonset() -> Value {
    let docs = yaml_documents("port-trace-daemonset.yaml");
    let mut sets = docs.iter().filter(|d| d["kind"] == "DaemonSet");
    let set = sets.next().expect("a DaemonSet").clone();
    assert!(sets.next().is_none(), "one DaemonSet");
    let namespace = str_at(&set, "/metadata/namespace");
    assert_eq!(namespace, "port-trace");
    assert!(
        docs.iter().any(|d| d["kind"] == "Namespace" && d["metadata"]["name"] == namespace),
        "the manifest creates its namespace"
    );
    set
}

fn container(set: &Value) -> &Value {
    let containers = set.pointer("/spec/template/spec/containers").and_then(Value::as_array).expect("containers");
    assert_eq!(containers.len(), 1);
    &containers[0]
}

fn args(set: &Value) -> Vec<String> {
    container(set)["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| a.as_str().expect("args are strings").to_string())
        .collect()
}

/// The port given to `--metrics` in the DaemonSet's arguments.
fn metrics_port(set: &Value) -> u16 {
    let args = args(set);
    let at = args.iter().position(|a| a == "--metrics").expect("--metrics in args");
    let addr = bind_addr(&args[at + 1]).expect("a valid --metrics address");
    assert!(addr.ip().is_unspecified(), "Prometheus scrapes from another host: {addr}");
    addr.port()
}

#[test]
fn daemonset_runs_privileged_in_the_host_namespaces_with_limits() {
    let set = daemonset();
    let spec = set.pointer("/spec/template/spec").unwrap();
    assert_eq!(spec["hostNetwork"], true);
    assert_eq!(spec["hostPID"], true);
    let c = container(&set);
    assert_eq!(c.pointer("/securityContext/privileged"), Some(&Value::Bool(true)));
    for kind in ["requests", "limits"] {
        for resource in ["cpu", "memory"] {
            assert!(c["resources"][kind][resource].is_string(), "resources.{kind}.{resource}");
        }
    }
    // The selector selects the pods.
    let selector = set.pointer("/spec/selector/matchLabels").and_then(Value::as_object).unwrap();
    for (key, value) in selector {
        assert_eq!(&set["spec"]["template"]["metadata"]["labels"][key], value);
    }
}

#[test]
fn daemonset_arguments_are_accepted_by_the_cli() {
    let set = daemonset();
    let args = args(&set);
    let parsed = port_trace::cli::Cli::try_parse_from(std::iter::once("port-trace".to_string()).chain(args.clone()));
    assert!(parsed.is_ok(), "{args:?}: {}", parsed.err().map(|e| e.to_string()).unwrap_or_default());
}

#[test]
fn daemonset_mounts_what_the_tracer_reads_and_where_it_writes() {
    let set = daemonset();
    let spec = set.pointer("/spec/template/spec").unwrap();
    let volumes = spec["volumes"].as_array().expect("volumes");
    let host_path = |name: &str| -> Option<String> {
        volumes
            .iter()
            .find(|v| v["name"] == name)
            .and_then(|v| v.pointer("/hostPath/path"))
            .and_then(Value::as_str)
            .map(String::from)
    };
    let mounts = container(&set)["volumeMounts"].as_array().expect("volumeMounts");
    let mut mounted_host_paths = BTreeSet::new();
    for mount in mounts {
        let name = str_at(mount, "/name");
        let path = host_path(name).unwrap_or_else(|| panic!("mount {name} has no hostPath volume"));
        mounted_host_paths.insert(path);
    }
    for needed in
        ["/sys/kernel/btf", "/sys/fs/cgroup", "/sys/kernel/debug", "/sys/kernel/tracing", "/run/netns", "/proc"]
    {
        assert!(mounted_host_paths.contains(needed), "{needed} is not mounted");
    }
    // The output file is inside a mounted host directory.
    let args = args(&set);
    let at = args.iter().position(|a| a == "--output" || a == "-o").expect("--output in args");
    let output = &args[at + 1];
    assert!(
        mounts.iter().any(|m| output.starts_with(&format!("{}/", str_at(m, "/mountPath").trim_end_matches('/')))),
        "{output} is not on a mounted volume"
    );
}

#[test]
fn metrics_port_is_the_same_in_args_ports_probes_and_scrape_config() {
    let set = daemonset();
    let port = metrics_port(&set);
    let c = container(&set);
    let ports = c["ports"].as_array().expect("ports");
    let declared = ports.iter().find(|p| p["containerPort"] == u64::from(port)).expect("the metrics port is declared");
    let port_name = str_at(declared, "/name");
    for probe in ["readinessProbe", "livenessProbe"] {
        let get = &c[probe]["httpGet"];
        assert_eq!(get["path"], "/metrics", "{probe}");
        assert!(get["port"] == port_name || get["port"] == u64::from(port), "{probe} port {}", get["port"]);
    }
    let pod_labels = set.pointer("/spec/template/metadata/labels").and_then(Value::as_object).unwrap().clone();

    let scrape = yaml_documents("prometheus-scrape.yaml");
    assert_eq!(scrape.len(), 1);
    let jobs = scrape[0]["scrape_configs"].as_array().expect("scrape_configs");
    let job = jobs.iter().find(|j| j["job_name"] == "port-trace").expect("a port-trace job");
    assert_eq!(job["metrics_path"], "/metrics");
    let sd = &job["kubernetes_sd_configs"][0];
    assert_eq!(sd["role"], "pod");
    assert_eq!(sd.pointer("/namespaces/names/0"), set.pointer("/metadata/namespace"));
    let keeps: Vec<&Value> =
        job["relabel_configs"].as_array().unwrap().iter().filter(|r| r["action"] == "keep").collect();
    let keep_regex = |label: &str| -> String {
        let rule = keeps
            .iter()
            .find(|r| r["source_labels"].as_array().is_some_and(|l| l.len() == 1 && l[0] == label))
            .unwrap_or_else(|| panic!("no keep rule on {label}"));
        str_at(rule, "/regex").to_string()
    };
    assert_eq!(keep_regex("__meta_kubernetes_pod_container_port_number"), port.to_string());
    assert_eq!(keep_regex("__meta_kubernetes_pod_container_port_name"), port_name);
    // The pod label the job keeps is one the pods carry, with that value.
    let label_rule = keeps
        .iter()
        .find(|r| str_at(r, "/source_labels/0").starts_with("__meta_kubernetes_pod_label_"))
        .expect("a keep rule on a pod label");
    let label = str_at(label_rule, "/source_labels/0").trim_start_matches("__meta_kubernetes_pod_label_").to_string();
    let carried =
        pod_labels.iter().find(|(k, _)| k.replace(['.', '/', '-'], "_") == label).expect("pods carry the kept label");
    assert_eq!(carried.1, &label_rule["regex"]);
}

/// Every string under a key named `expr` or `query`, anywhere.
fn queries(value: &Value, found: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("expr" | "query" | "definition", Value::String(s)) => found.push(s.clone()),
                    _ => queries(v, found),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| queries(v, found)),
        _ => {}
    }
}

/// The `port_trace_*` names a PromQL text uses.
fn metric_names(query: &str) -> Vec<String> {
    let mut names = Vec::new();
    let bytes = query.as_bytes();
    let mut at = 0;
    while let Some(found) = query[at..].find("port_trace_") {
        let start = at + found;
        let boundary = start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let end = start
            + query[start..].find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(query.len() - start);
        if boundary {
            names.push(query[start..end].to_string());
        }
        at = end;
    }
    names
}

#[test]
fn dashboard_queries_only_served_metrics_and_shows_them_all() {
    let dashboard: Value = serde_json::from_str(&deploy_file("grafana-dashboard.json")).expect("valid JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(!panels.is_empty());
    let mut ids = BTreeSet::new();
    for panel in panels {
        assert!(ids.insert(panel["id"].as_u64().expect("panel id")), "duplicate panel id");
        let targets = panel["targets"].as_array().unwrap_or_else(|| panic!("{} has no targets", panel["title"]));
        assert!(!targets.is_empty());
        let refs: BTreeSet<&str> = targets.iter().map(|t| str_at(t, "/refId")).collect();
        assert_eq!(refs.len(), targets.len(), "refIds of {} are unique", panel["title"]);
    }
    let mut found = Vec::new();
    queries(&dashboard, &mut found);
    let mut used = BTreeSet::new();
    for query in &found {
        for name in metric_names(query) {
            assert!(is_sample_name(&name), "{name} (in {query:?}) is not served by port-trace");
            used.insert(name);
        }
    }
    // Every served metric is on the dashboard (the histogram through its
    // samples).
    for name in METRIC_NAMES {
        assert!(used.iter().any(|u| u == name || u.starts_with(&format!("{name}_"))), "{name} is on no panel");
    }
}

#[test]
fn metric_name_scan_finds_whole_names_only() {
    assert_eq!(
        metric_names("sum(rate(port_trace_allocations_total[1m])) / x_port_trace_no + port_trace_ports_in_use{a=\"port_trace_q\"}"),
        vec!["port_trace_allocations_total", "port_trace_ports_in_use", "port_trace_q"]
    );
    assert!(is_sample_name("port_trace_port_hold_seconds_bucket"));
    assert!(!is_sample_name("port_trace_port_hold_seconds_total"));
}
