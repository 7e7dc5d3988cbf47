//! The deployment files are parsed and checked against the code they drive:
//! Kubernetes manifests (current APIs, selectors, the FlexVolume options the
//! driver accepts, env the entrypoint maps, one etcd address everywhere), the
//! systemd environment file, and the container build file.

use serde_yaml::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use torusblk::entrypoint;
use torusblk::flex::MountOptions;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn docs(file: &str) -> Vec<Value> {
    let path = root().join("deploy").join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{file}: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

use serde::Deserialize;

fn s<'a>(v: &'a Value, path: &[&str]) -> &'a Value {
    path.iter().fold(v, |v, k| &v[*k])
}

fn str_at(v: &Value, path: &[&str]) -> String {
    s(v, path)
        .as_str()
        .unwrap_or_else(|| panic!("{path:?} missing in {v:?}"))
        .to_string()
}

fn find<'a>(all: &'a [Value], kind: &str, name: &str) -> &'a Value {
    all.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

/// Every workload: apps/v1, a selector matching its template's labels, containers with images.
fn check_workloads(all: &[Value]) {
    for d in all {
        let kind = str_at(d, &["kind"]);
        assert!(
            d["metadata"]["name"].as_str().is_some(),
            "{kind} without a name"
        );
        if ["Deployment", "DaemonSet", "StatefulSet"].contains(&kind.as_str()) {
            assert_eq!(str_at(d, &["apiVersion"]), "apps/v1", "{kind}");
            let selector = s(d, &["spec", "selector", "matchLabels"])
                .as_mapping()
                .expect("matchLabels");
            let labels = s(d, &["spec", "template", "metadata", "labels"])
                .as_mapping()
                .expect("labels");
            for (k, v) in selector {
                assert_eq!(
                    labels.get(k),
                    Some(v),
                    "{kind}: selector {k:?} does not match the template"
                );
            }
            let containers = s(d, &["spec", "template", "spec", "containers"])
                .as_sequence()
                .expect("containers");
            assert!(!containers.is_empty());
            for c in containers {
                assert!(
                    c["image"].as_str().is_some_and(|i| i.contains(':')),
                    "{kind}: image with a tag"
                );
            }
        } else {
            assert_eq!(str_at(d, &["apiVersion"]), "v1", "{kind}");
        }
    }
}

fn env_of(container: &Value) -> HashMap<String, Value> {
    container["env"]
        .as_sequence()
        .expect("env")
        .iter()
        .map(|e| (str_at(e, &["name"]), e.clone()))
        .collect()
}

#[test]
fn manifests_are_consistent_with_the_entrypoint_and_the_driver() {
    let etcd = docs("etcd.yaml");
    let torus = docs("torus.yaml");
    let pad = docs("etherpad.yaml");
    for all in [&etcd, &torus, &pad] {
        check_workloads(all);
    }

    // etcd: a StatefulSet behind a Service with a fixed address.
    let svc = find(&etcd, "Service", "etcd-torus");
    let etcd_ip = str_at(svc, &["spec", "clusterIP"]);
    assert_eq!(svc["spec"]["ports"][0]["port"].as_u64(), Some(2379));
    let sts = find(&etcd, "StatefulSet", "etcd-torus");
    let image = str_at(
        &sts["spec"]["template"]["spec"]["containers"][0],
        &["image"],
    );
    assert!(image.contains("etcd:v3."), "etcd v3: {image}");
    let args: Vec<String> = sts["spec"]["template"]["spec"]["containers"][0]["command"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    assert!(args.contains(&format!("--advertise-client-urls=http://{etcd_ip}:2379")));

    // torus: every variable is one the entrypoint maps, and the plan is valid.
    let ds = find(&torus, "DaemonSet", "torus");
    let pod = &ds["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    let env = env_of(c);
    for name in env.keys() {
        assert!(
            entrypoint::VARIABLES.contains(&name.as_str()),
            "{name} is not read by the entrypoint"
        );
    }
    for required in [
        "ETCD_HOST",
        "ETCD_PORT",
        "STORAGE_SIZE",
        "LISTEN_HOST",
        "PEER_ADDRESS",
        "AUTO_JOIN",
        "DROP_MOUNT_BIN",
    ] {
        assert!(env.contains_key(required), "torus.yaml sets no {required}");
    }
    let literal: HashMap<String, String> = env
        .iter()
        .map(|(k, v)| {
            let value = v["value"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| "10.2.0.5".into());
            (k.clone(), value.replace("$(LISTEN_HOST)", "10.2.0.5"))
        })
        .collect();
    let plan = entrypoint::plan(&literal).expect("the DaemonSet's env maps to torusd flags");
    let at = |f: &str| {
        plan.args
            .iter()
            .position(|a| a == f)
            .map(|i| plan.args[i + 1].clone())
    };
    assert_eq!(at("--etcd").unwrap(), format!("{etcd_ip}:2379"));
    assert_eq!(at("--size").unwrap(), "5GiB");
    assert!(plan.args.contains(&"--auto-join".to_string()));
    assert_eq!(at("--data-dir").unwrap(), "/data");
    // The driver lands in the plugin hostPath.
    let install = plan.install_driver.expect("DROP_MOUNT_BIN=1");
    let mounts = c["volumeMounts"].as_sequence().unwrap();
    let mount_of = |name: &str| {
        mounts
            .iter()
            .find(|m| m["name"] == name)
            .map(|m| str_at(m, &["mountPath"]))
    };
    assert!(install.starts_with(mount_of("plugin").expect("plugin mount")));
    assert_eq!(mount_of("data").expect("data mount"), "/data");
    let volumes = pod["volumes"].as_sequence().unwrap();
    let host_path = |name: &str| {
        volumes
            .iter()
            .find(|v| v["name"] == name)
            .map(|v| str_at(v, &["hostPath", "path"]))
    };
    assert_eq!(
        host_path("plugin").unwrap(),
        "/usr/libexec/kubernetes/kubelet-plugins/volume/exec"
    );
    assert_eq!(host_path("data").unwrap(), "/var/lib/torus");
    // The privileged part loads nbd; the image's entrypoint is what runs torusd.
    let init = &pod["initContainers"][0];
    assert_eq!(init["securityContext"]["privileged"].as_bool(), Some(true));
    assert_eq!(init["command"][0].as_str(), Some("modprobe"));
    assert_eq!(init["image"], c["image"]);
    assert!(
        c["command"].is_null(),
        "the torus container must run the image's entrypoint"
    );

    // etherpad: a FlexVolume whose options the driver accepts, on the same etcd.
    let dep = find(&pad, "Deployment", "etherpad");
    let vol = &dep["spec"]["template"]["spec"]["volumes"][0]["flexVolume"];
    assert_eq!(str_at(vol, &["driver"]), "coreos.com/torus");
    assert_eq!(
        install.strip_prefix(mount_of("plugin").unwrap()).unwrap(),
        Path::new("coreos.com~torus/torus"),
        "kubelet finds driver vendor/name at vendor~name/name"
    );
    let mut json: serde_json::Map<String, serde_json::Value> =
        serde_json::from_value(serde_json::to_value(&vol["options"]).unwrap()).unwrap();
    json.insert(
        "kubernetes.io/fsType".into(),
        serde_json::to_value(&vol["fsType"]).unwrap(),
    );
    let opts = MountOptions::from_json(&serde_json::Value::Object(json).to_string())
        .expect("options the driver accepts");
    assert_eq!(opts.volume, "pad");
    assert_eq!(opts.fs_type, "ext4");
    assert_eq!(opts.etcd, format!("{etcd_ip}:2379"));
    assert_eq!(str_at(dep, &["spec", "strategy", "type"]), "Recreate");
}

#[test]
fn systemd_unit_runs_the_entrypoint_with_a_valid_environment() {
    let dir = root().join("deploy/systemd");
    let unit = std::fs::read_to_string(dir.join("torusd.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/local/bin/torus-entrypoint"));
    assert!(unit.contains("EnvironmentFile=/etc/torus/torusd.env"));
    let env: HashMap<String, String> = std::fs::read_to_string(dir.join("torusd.env"))
        .unwrap()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l
                .split_once('=')
                .unwrap_or_else(|| panic!("not KEY=VALUE: {l}"));
            assert!(
                entrypoint::VARIABLES.contains(&k),
                "{k} is not read by the entrypoint"
            );
            (k.to_string(), v.to_string())
        })
        .collect();
    let plan = entrypoint::plan(&env).expect("valid environment");
    assert!(plan
        .args
        .windows(2)
        .any(|w| w[0] == "--data-dir" && w[1] == "/var/lib/torus"));
    assert_eq!(plan.install_driver, None);
}

#[test]
fn container_file_is_multi_stage_with_the_entrypoint_and_every_binary() {
    let text = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .collect();
    let stages: Vec<&str> = lines
        .iter()
        .filter(|l| l.starts_with("FROM "))
        .copied()
        .collect();
    assert_eq!(
        stages.len(),
        2,
        "a build stage and a runtime stage: {stages:?}"
    );
    assert!(stages[0].ends_with(" AS build"));
    let entry = lines
        .iter()
        .find(|l| l.starts_with("ENTRYPOINT"))
        .expect("ENTRYPOINT");
    let entry: Vec<String> =
        serde_json::from_str(entry.trim_start_matches("ENTRYPOINT").trim()).expect("exec form");
    assert_eq!(entry, ["/usr/local/bin/torus-entrypoint"]);
    for bin in ["torusd", "torusctl", "torus-entrypoint", "torusblk"] {
        let copy = lines
            .iter()
            .find(|l| {
                l.starts_with("COPY --from=build") && l.ends_with(&format!("/usr/local/bin/{bin}"))
            })
            .unwrap_or_else(|| panic!("{bin} is not copied into the image"));
        assert!(copy.contains(&format!("/release/{bin} ")), "{copy}");
    }
    // The copied binaries are ones the workspace builds.
    let cargo = std::fs::read_to_string(root().join("torus/Cargo.toml")).unwrap();
    assert!(
        root().join("torus/src/bin/torusd.rs").exists()
            && root().join("torus/src/bin/torusctl.rs").exists(),
        "{cargo:.0}"
    );
    assert!(root().join("torusblk/src/bin/torus-entrypoint.rs").exists());
    assert!(text.contains("--locked"));
    // The runtime has modprobe for the init container in deploy/torus.yaml.
    assert!(text.contains("kmod"));
    let ignore = std::fs::read_to_string(root().join(".dockerignore")).unwrap();
    assert!(ignore.lines().any(|l| l.trim() == "target"));
}
