"""The files in cluster/ and configs/: each loads and passes its own checker (Ray's launcher
schema, KubeRay's required keys, raylm's config loader), they agree with each other (GPUs per
worker and per node, the 7B elastic range against the GPU node group, one Ray / Python / raylm
version everywhere), the 7B run's data and runs are on one bucket that every node reaches with
its own cloud identity (no shared file system, no keys), they keep the job API private with
token authentication on and hold no credentials; and cluster/local.sh starts a
token-authenticated cluster that runs a submitted job and refuses a client without the token
(the one slow test).

The node-group arithmetic is tests/test_autoscaler.py's (`worker_bundle`, `autoscaler_capacity`),
applied to the cloud files; a KubeRay RayCluster is read into the same launcher shape first.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.specifiers import SpecifierSet
from test_autoscaler import ELASTIC, autoscaler_capacity, worker_bundle

from raylm import storage
from raylm.config import load_config
from raylm.plan import plan
from raylm.train import checkpoint as ckpt


ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
LLAMA2_7B = ROOT / "configs" / "llama2-7b.yaml"
PROXY_SWEEP = ROOT / "configs" / "sweeps" / "llama2-7b-proxy.yaml"
GUIDE = ROOT / "docs" / "cluster.md"
CONFIG_FILES = sorted((ROOT / "configs").rglob("*.yaml"))
LAUNCHER_FILES = ["aws.yaml", "gcp.yaml"]  # Ray cluster launcher, cloud providers
KUBERAY_CLUSTER, KUBERAY_JOB = "kuberay-raycluster.yaml", "kuberay-rayjob.yaml"
CLOUD_FILES = [*LAUNCHER_FILES, KUBERAY_CLUSTER]
LOCAL_AUTOSCALER = "local-autoscaler.yaml"
HOSTS_AUTOSCALER = "hosts-autoscaler.yaml"  # the autoscaler on namespace hosts (cluster/hosts_provider.py)
GPUS_PER_NODE = 8  # p5.48xlarge, a3-highgpu-8g: 8 x H100 80GB
RAY_BIN = Path(sys.executable).with_name("ray")

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
RAYLM_VERSION = PYPROJECT["version"]
# The Ray the clusters run is the one CI tests: the constraints pin (pyproject allows the range
# tests/test_ray_compat.py guards).
(RAY_VERSION,) = {m.group(1) for line in (ROOT / "constraints" / "cpu.txt").read_text().splitlines()
                  if (m := re.match(r"ray==(\S+)", line.strip()))}
PYTHON_VERSION = "3.11"  # the images' Python (py311)


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def load_all(name: str) -> list[dict]:
    return list(yaml.safe_load_all((CLUSTER / name).read_text()))


def one_of_kind(name: str, kind: str) -> dict:
    (doc,) = [d for d in load_all(name) if d["kind"] == kind]
    return doc


def ray_schema() -> dict:
    import ray

    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


def quantity(value) -> float:
    """A Kubernetes CPU quantity ("60", "500m", 8) as CPUs."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def kuberay_node_groups(spec: dict) -> dict:
    """A RayCluster spec in the launcher's shape: the resources Ray sees in each group's pods
    (CPUs from num-cpus or the container's CPU limit, GPUs from its nvidia.com/gpu limit) and
    minReplicas/maxReplicas as min_workers/max_workers."""

    def resources(group: dict) -> dict[str, float]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        cpus = group.get("rayStartParams", {}).get("num-cpus", limits.get("cpu", 0))
        return {"CPU": quantity(cpus), "GPU": float(limits.get("nvidia.com/gpu", 0))}

    types = {"head": {"resources": resources(spec["headGroupSpec"]), "max_workers": 0}}
    for group in spec["workerGroupSpecs"]:
        types[group["groupName"]] = {"resources": resources(group), "min_workers": group["minReplicas"],
                                     "max_workers": group["maxReplicas"]}
    return {"head_node_type": "head", "available_node_types": types}


def node_groups(name: str) -> dict:
    if name == KUBERAY_CLUSTER:
        return kuberay_node_groups(one_of_kind(name, "RayCluster")["spec"])
    return load(name)


def gpu_group(cluster: dict) -> dict:
    (group,) = [g for g in cluster["available_node_types"].values() if g["resources"].get("GPU", 0) > 0]
    return group


def images(name: str) -> list[str]:
    """Every container image a cloud file names, with the node group's GPU count."""
    if name in LAUNCHER_FILES:
        cluster = load(name)
        out = [cluster["docker"]["image"], cluster["docker"]["head_image"]]
        out += [g["docker"]["worker_image"] for g in cluster["available_node_types"].values() if "docker" in g]
        return out
    spec = one_of_kind(name, "RayCluster")["spec"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c["image"] for g in groups for c in g["template"]["spec"]["containers"]]


# ---------------------------------------------------------------------------------------
# Every file loads and passes its own checker.


def test_every_yaml_in_cluster_and_configs_is_checked_here_and_every_config_loads():
    assert sorted(p.name for p in CLUSTER.glob("*.yaml")) == sorted([*LAUNCHER_FILES, KUBERAY_CLUSTER, KUBERAY_JOB,
                                                                     LOCAL_AUTOSCALER, HOSTS_AUTOSCALER])
    configs = sorted((ROOT / "configs").glob("*.yaml"))
    assert len(configs) >= 5
    for path in configs:
        load_config(path)  # raises a one-line ConfigError if a file is wrong


@pytest.mark.parametrize("name", [*LAUNCHER_FILES, LOCAL_AUTOSCALER, HOSTS_AUTOSCALER])
def test_launcher_files_validate_against_rays_own_schema_and_config_checks(name):
    """ray-schema.json from the installed wheel, then Ray's own validate_config, as `ray up`
    runs them before any cloud call (prepare_config fills in the provider's defaults first; the
    fake provider's defaults file is not in the wheel, see docs/cluster.md)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    cluster = load(name)
    jsonschema.validate(cluster, ray_schema())
    validate_config(copy.deepcopy(cluster))
    if name not in (LOCAL_AUTOSCALER, HOSTS_AUTOSCALER):
        validate_config(prepare_config(copy.deepcopy(cluster)))


def test_the_schema_check_rejects_a_broken_launcher_file():
    """The check bites: fractional GPUs, an unknown key and a node type without resources fail."""
    schema = ray_schema()
    for breakage in (lambda c: c["available_node_types"]["gpu"]["resources"].update(GPU=7.5),
                     lambda c: c.update(max_worker=12),
                     lambda c: c["available_node_types"]["gpu"].pop("resources")):
        cluster = load("aws.yaml")
        breakage(cluster)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(cluster, schema)


def test_kuberay_files_have_the_keys_kuberay_needs():
    """The RayCluster: ray.io/v1, autoscaler v2 in-tree, token auth, a head with no CPUs for
    Ray and head/cpu/gpu groups with resources; the RayJob runs raylm train on that cluster.
    (Checked by hand against KubeRay 1.7.0's CRD schemas too, see docs/cluster.md.)"""
    docs = load_all(KUBERAY_CLUSTER)
    assert sorted(d["kind"] for d in docs) == ["RayCluster", "ServiceAccount"]
    rc = one_of_kind(KUBERAY_CLUSTER, "RayCluster")
    assert rc["apiVersion"] == "ray.io/v1" and rc["metadata"]["name"]
    spec = rc["spec"]
    assert spec["enableInTreeAutoscaling"] is True and spec["autoscalerOptions"]["version"] == "v2"
    assert spec["authOptions"] == {"mode": "token"}
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # strings: rayStartParams is map[string]string
    assert [g["groupName"] for g in spec["workerGroupSpecs"]] == ["cpu", "gpu"]
    for group in [head, *spec["workerGroupSpecs"]]:
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())
        pod = group["template"]["spec"]
        (container,) = pod["containers"]
        assert container["image"] and container["resources"]["limits"] == container["resources"]["requests"]
        assert {"cpu", "memory"} <= set(container["resources"]["limits"])
        mounts = {m["name"] for m in container.get("volumeMounts", [])}
        assert mounts <= {v["name"] for v in pod.get("volumes", [])}  # every mount has its volume
        if group is not head:
            assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]

    job = load(KUBERAY_JOB)
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": rc["metadata"]["name"]}
    entrypoint = job["spec"]["entrypoint"]
    # KubeRay pastes the entrypoint unquoted into the submitter's shell command.
    assert not re.search(r"[;&|<>$`'\"]", entrypoint), entrypoint
    command, config_path = entrypoint.rsplit(" ", 1)
    assert command == "raylm train" and Path(config_path).name == LLAMA2_7B.name
    # The config is where the head mounts the ConfigMap made from configs/ (kubectl create configmap).
    head_pod = head["template"]["spec"]
    (head_container,) = head_pod["containers"]
    mounts = {m["mountPath"]: m["name"] for m in head_container["volumeMounts"]}
    volume = {v["name"]: v for v in head_pod["volumes"]}[mounts[str(Path(config_path).parent)]]
    assert volume["configMap"]["name"] == "raylm-configs"
    assert "kubectl create configmap raylm-configs --from-file=configs/" in (CLUSTER / KUBERAY_JOB).read_text()


# ---------------------------------------------------------------------------------------
# Storage: one bucket for the 7B run's data and runs, reached by every node's own identity.


def gcp_overrides() -> list[str]:
    """The overrides configs/llama2-7b.yaml's header gives for Google Cloud: its one comment
    line of `key=gs://...` words."""
    (line,) = [line for line in LLAMA2_7B.read_text().splitlines()
               if line.startswith("#") and "=gs://" in line]
    return line.lstrip("# ").split()


def run_storage(cfg) -> dict[str, str]:
    """Where a config keeps what every node reads or writes: the corpus, the shards, the runs."""
    (source,) = cfg.data.sources
    return {"data.sources.0.path": source.path, "data.prepared_path": cfg.data.prepared_path,
            "run.output_dir": cfg.run.output_dir}


def bucket_of(uri: str) -> str:
    return uri.split("://", 1)[1].split("/", 1)[0]


def test_the_7b_run_keeps_corpus_shards_and_runs_in_one_bucket_and_the_gcp_overrides_move_them_to_gs():
    """Every node reads the corpus and the shards and writes checkpoints, so none of them may be
    a node's local path: configs/llama2-7b.yaml puts all three in one s3:// bucket, and the three
    overrides of its header (the GCP form, list index included) put all three, and nothing
    else, in one gs:// bucket under the same keys."""
    on_aws = run_storage(load_config(LLAMA2_7B))
    assert all(storage.is_uri(v) and v.startswith("s3://") for v in on_aws.values()), on_aws
    assert len({bucket_of(v) for v in on_aws.values()}) == 1, on_aws

    overrides = gcp_overrides()
    assert sorted(o.split("=", 1)[0] for o in overrides) == sorted(on_aws)
    on_gcp = run_storage(load_config(LLAMA2_7B, overrides))
    assert all(v.startswith("gs://") for v in on_gcp.values()), on_gcp
    assert len({bucket_of(v) for v in on_gcp.values()}) == 1, on_gcp
    for key, uri in on_gcp.items():  # the same layout in the bucket
        assert uri.split("://", 1)[1].split("/", 1)[1] == on_aws[key].split("://", 1)[1].split("/", 1)[1]
    assert load_config(LLAMA2_7B, overrides).data.sources[0].format == "jsonl"  # only the path changed


SHARED_FILE_SYSTEM = re.compile(r"/mnt/raylm|mount(\.| -t )nfs|nfs-common|\.efs\.|\bEFS\b|Filestore|"
                                r"PersistentVolumeClaim|ReadWriteMany|issue 12")


@pytest.mark.parametrize("path", sorted([*CLUSTER.iterdir(), *CONFIG_FILES]), ids=lambda p: p.name)
def test_no_cluster_or_config_file_mounts_a_shared_file_system_any_more(path):
    """Runs, checkpoints and shards are on the bucket: no NFS / EFS / Filestore mount, no
    ReadWriteMany volume, no /mnt/raylm path, no "pending (issue 12)" left in any file."""
    assert not SHARED_FILE_SYSTEM.search(path.read_text()), f"{path.name}: {SHARED_FILE_SYSTEM.search(path.read_text())}"


def worker_types(cluster: dict) -> dict[str, dict]:
    return {n: g for n, g in cluster["available_node_types"].items() if n != cluster["head_node_type"]}


def test_every_aws_worker_group_has_the_bucket_instance_profile_and_the_head_keeps_rays():
    """Ray's launcher gives only the head an instance profile (ray-autoscaler-v1, EC2 and S3
    full access) when its node_config names none; the worker groups would get no AWS identity at
    all, and a Ray Train worker could not upload a checkpoint. Each names the profile
    docs/cluster.md creates (read/write on the bucket only)."""
    cluster = load("aws.yaml")
    head = cluster["available_node_types"][cluster["head_node_type"]]
    assert "IamInstanceProfile" not in head["node_config"]
    guide = GUIDE.read_text()
    workers = worker_types(cluster)
    assert sorted(workers) == ["cpu", "gpu"]
    for name, group in workers.items():
        profile = group["node_config"]["IamInstanceProfile"]
        assert set(profile) in ({"Name"}, {"Arn"}), name
        profile_name = profile.get("Name") or profile["Arn"].rsplit("/", 1)[1]
        assert f"--instance-profile-name {profile_name}" in guide, profile_name


DEVSTORAGE_SCOPES = {f"https://www.googleapis.com/auth/{s}" for s in
                     ("devstorage.read_write", "devstorage.full_control", "cloud-platform")}


def test_every_gcp_worker_group_runs_as_a_service_account_with_a_storage_scope():
    """GCE gives a VM the project's default compute account unless its node_config names one;
    each worker group names the account docs/cluster.md creates, with a scope that lets its token
    write to Cloud Storage (read_write; the roles on the bucket decide the rest). The head keeps
    the one the launcher makes (ray-autoscaler-sa-v1)."""
    cluster = load("gcp.yaml")
    head = cluster["available_node_types"][cluster["head_node_type"]]
    assert "serviceAccounts" not in head["node_config"]
    guide = GUIDE.read_text()
    workers = worker_types(cluster)
    assert sorted(workers) == ["cpu", "gpu"]
    for name, group in workers.items():
        (account,) = group["node_config"]["serviceAccounts"]  # GCE takes one account per VM
        assert set(account) == {"email", "scopes"}, name
        m = re.fullmatch(r"(?P<id>[a-z][-a-z0-9]{4,28}[a-z0-9])@(?P<project>[-a-zA-Z0-9]+)\.iam\.gserviceaccount\.com",
                         account["email"])
        assert m, account["email"]
        assert m["project"] == cluster["provider"]["project_id"]  # one placeholder, filled in once
        assert set(account["scopes"]) & DEVSTORAGE_SCOPES, account["scopes"]
        assert f"gcloud iam service-accounts create {m['id']}" in guide


def test_every_kuberay_pod_runs_as_the_service_account_of_the_file_with_its_irsa_annotation():
    """No volume is shared and no key is mounted: each Ray pod (head, cpu, gpu) runs as the
    ServiceAccount defined beside the RayCluster, whose IRSA annotation names the IAM role that
    docs/cluster.md creates (on GKE the Workload Identity annotation, given in a comment)."""
    (account,) = [d for d in load_all(KUBERAY_CLUSTER) if d["kind"] == "ServiceAccount"]
    name = account["metadata"]["name"]
    role_arn = account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    m = re.fullmatch(r"arn:aws:iam::(?P<account>[^:]+):role/(?P<role>[\w+=,.@-]+)", role_arn)
    assert m, role_arn
    assert f"--role-name {m['role']}" in GUIDE.read_text()
    assert "iam.gke.io/gcp-service-account: " in (CLUSTER / KUBERAY_CLUSTER).read_text()
    spec = one_of_kind(KUBERAY_CLUSTER, "RayCluster")["spec"]
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        pod = group["template"]["spec"]
        assert pod.get("serviceAccountName") == name, group.get("groupName", "head")
        assert pod.get("automountServiceAccountToken", True) is not False  # IRSA's token is projected there
        assert not [v for v in pod.get("volumes", []) if set(v) & {"persistentVolumeClaim", "nfs", "secret", "csi"}]


def test_the_7b_proxy_sweep_writes_its_directory_to_the_bucket():
    """The proxy sweep's trials run on GPU nodes that share no disk, so its directory (each
    trial's run and checkpoints, Tune's state, best.yaml) must be on the bucket its output_dir
    names, beside the 7B run's corpus and prepared shards."""
    from raylm.sweep import load_sweep, sweep_dir_for

    sweep = load_sweep(PROXY_SWEEP)
    assert sweep.output_dir.startswith("s3://")
    assert str(sweep_dir_for(sweep)).startswith(sweep.output_dir + "/")
    bucket = sweep.output_dir.split("/")[2]
    assert sweep.base_config().data.prepared_path.startswith(f"s3://{bucket}/")


# ---------------------------------------------------------------------------------------
# The files agree with each other.


@pytest.mark.parametrize("name", CLOUD_FILES)
def test_the_7b_elastic_range_is_the_gpu_group_one_worker_per_gpu_8_per_node(name):
    """configs/llama2-7b.yaml: one GPU per worker (scaling.use_gpu). Each cloud file's GPU group
    has 8 GPUs a node, CPUs for 8 workers, starts at 0 nodes; the elastic max is exactly its
    max nodes x 8 (no idle GPU at the max, no unreachable max), and the min is reachable: the
    autoscaler can launch ceil(min / 8) nodes, and min workers fit in memory (raylm plan)."""
    cfg = load_config(LLAMA2_7B)
    s = cfg.scaling
    assert s.use_gpu and s.elastic
    bundle = worker_bundle(cfg)
    assert bundle["GPU"] == 1.0

    cluster = node_groups(name)
    gpu = gpu_group(cluster)
    assert gpu["resources"]["GPU"] == GPUS_PER_NODE and gpu["min_workers"] == 0
    per_node = min(int(gpu["resources"].get(k, 0) // v) for k, v in bundle.items())
    assert per_node == GPUS_PER_NODE  # the GPUs bound it, not the CPUs
    assert autoscaler_capacity(cluster, bundle) == s.max_workers == gpu["max_workers"] * GPUS_PER_NODE
    assert 1 <= math.ceil(s.min_workers / per_node) <= gpu["max_workers"]
    assert plan(cfg, s.min_workers, "h100").fits and plan(cfg, s.max_workers, "h100").fits

    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"]["CPU"] == 0  # no training and no tokenising on the head
    (cpu,) = [g for n, g in types.items() if n != cluster["head_node_type"] and g is not gpu]
    assert cpu["resources"].get("GPU", 0) == 0 and cpu["resources"]["CPU"] > 0
    # raylm checks a data pipeline against the CPUs the cluster has now: one CPU node stays up.
    assert cpu["min_workers"] >= 1
    if name in LAUNCHER_FILES:
        assert cluster["max_workers"] == cpu["max_workers"] + gpu["max_workers"]
        head_start = " ".join(cluster["head_start_ray_commands"])
        assert "--num-cpus=0" in head_start and "--head" in head_start


def test_the_local_autoscaler_gpu_group_mirrors_the_cloud_gpu_groups():
    """Same relation, on fake nodes of 1 logical GPU: the group starts at 0 nodes and the elastic
    run tests/test_autoscaler.py trains ([1, 3]) has its max exactly at max nodes x workers per node."""
    local = load(LOCAL_AUTOSCALER)
    local_gpu = local["available_node_types"]["gpu"]
    for name in CLOUD_FILES:
        assert gpu_group(node_groups(name))["min_workers"] == local_gpu["min_workers"] == 0
    cfg = load_config(ROOT / "configs" / "debug.yaml", ELASTIC)
    bundle = worker_bundle(cfg)
    per_node = min(int(local_gpu["resources"].get(k, 0) // v) for k, v in bundle.items())
    assert autoscaler_capacity(local, bundle) == cfg.scaling.max_workers == local_gpu["max_workers"] * per_node


def test_ray_python_and_raylm_versions_agree_across_images_setup_commands_and_pyproject():
    import ray

    assert ray.__version__ == RAY_VERSION  # this environment runs the Ray the clusters run
    assert PYTHON_VERSION in SpecifierSet(PYPROJECT["requires-python"])
    image = re.compile(r"rayproject/ray:(?P<ray>[\d.]+)-py(?P<py>\d)(?P<minor>\d+)-(?P<kind>cpu|gpu)")
    for name in CLOUD_FILES:
        names = images(name)
        assert len(names) >= 3
        for tag in names:
            m = image.fullmatch(tag)
            assert m, f"{name}: {tag}"
            assert m["ray"] == RAY_VERSION and f"{m['py']}.{m['minor']}" == PYTHON_VERSION, f"{name}: {tag}"
    # GPU nodes run the CUDA image.
    assert load("aws.yaml")["available_node_types"]["gpu"]["docker"]["worker_image"].endswith("-gpu")
    assert load("gcp.yaml")["available_node_types"]["gpu"]["docker"]["worker_image"].endswith("-gpu")
    gpu_pod = one_of_kind(KUBERAY_CLUSTER, "RayCluster")["spec"]["workerGroupSpecs"][1]["template"]["spec"]
    assert gpu_pod["containers"][0]["image"].endswith("-gpu")

    for name in LAUNCHER_FILES:
        setup = load(name)["setup_commands"]
        (install,) = [c for c in setup if "pip install" in c]
        assert re.findall(r"raylm==(\S+?)'", install) == [RAYLM_VERSION], install
        (check,) = [c for c in setup if "ray.__version__" in c]
        assert f"ray.__version__ == '{RAY_VERSION}'" in check
        assert f"sys.version_info[:2] == ({PYTHON_VERSION.replace('.', ', ')})" in check
    spec = one_of_kind(KUBERAY_CLUSTER, "RayCluster")["spec"]
    assert spec["rayVersion"] == RAY_VERSION
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        (container,) = group["template"]["spec"]["containers"]
        assert container["command"][:2] == ["pip", "install"] and f"raylm=={RAYLM_VERSION}" in container["command"]


def test_the_pinned_install_refuses_a_checkout_of_another_version(tmp_path):
    """The launcher files install this checkout *and* raylm==<version>: pip installs nothing
    when the two disagree (a resolver conflict), so a node never runs an unpinned raylm."""
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    (tmp_path / "README.md").write_text("x")
    (tmp_path / "raylm").mkdir()
    (tmp_path / "raylm" / "__init__.py").write_text("")
    pip = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--no-build-isolation", "--no-index",
           "--quiet", str(tmp_path)]
    ok, other = [subprocess.Popen([*pip, pin], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for pin in (f"raylm=={RAYLM_VERSION}", "raylm==9.9.9")]  # at once: each builds the metadata
    ok_err, other_err = ok.communicate(timeout=300)[1], other.communicate(timeout=300)[1]
    assert ok.returncode == 0, ok_err
    assert other.returncode != 0 and "ResolutionImpossible" in other_err, other_err


# ---------------------------------------------------------------------------------------
# Security: private job API, token auth, no credentials.


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_dashboard_is_on_the_heads_loopback_and_token_auth_is_on(name):
    """`ray dashboard` tunnels to localhost:8265 on the head, so the dashboard binds there and
    nowhere else; every container runs with RAY_AUTH_MODE=token and the user's token, mode 600."""
    cluster = load(name)
    head_start = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in (CLUSTER / name).read_text()
    assert "-e RAY_AUTH_MODE=token" in cluster["docker"]["run_options"]
    assert cluster["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"
    assert "chmod 600 ~/.ray/auth_token" in cluster["setup_commands"]
    if cluster["provider"]["type"] == "aws":
        # The launcher's group: intra-cluster + SSH; IpPermissions here would add rules to it.
        assert set(cluster["provider"]["security_group"]) == {"GroupName"}
        assert not any("SecurityGroupIds" in g["node_config"] for g in cluster["available_node_types"].values())


def _strings(value) -> list[str]:
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (str(k), *_strings(v))]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return [str(value)]


def test_kuberay_job_api_is_cluster_internal_and_token_auth_is_on():
    """The head Service stays ClusterIP (reached by `kubectl port-forward`), nothing exposes it,
    and the dashboard keeps KubeRay's pod-network binding (no dashboard-host override)."""
    docs = load_all(KUBERAY_CLUSTER) + load_all(KUBERAY_JOB)
    spec = one_of_kind(KUBERAY_CLUSTER, "RayCluster")["spec"]
    assert spec["authOptions"]["mode"] == "token" and spec["headGroupSpec"]["serviceType"] == "ClusterIP"
    assert not {d["kind"] for d in docs} & {"Service", "Ingress", "Gateway", "HTTPRoute", "Route"}
    values = _strings(docs)
    assert not {"LoadBalancer", "NodePort", "dashboard-host", "hostNetwork", "hostPort"} & set(values)


@pytest.mark.parametrize("path", sorted([*CLUSTER.iterdir(), *CONFIG_FILES]), ids=lambda p: p.name)
def test_no_credentials_in_cluster_or_config_files(path):
    # cluster/hosts.sh gives its hosts moto_server's documented dummy keys (moto accepts any).
    text = path.read_text().replace("AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing", "")
    for pattern in (r"AKIA[0-9A-Z]{16}", r"(?i)aws_secret_access_key|secret_key|password", r"-----BEGIN",
                    r"\b[0-9a-f]{64}\b",  # a Ray token (secrets.token_hex(32))
                    r"RAY_AUTH_TOKEN\s*[=:]\s*\S", r"(?m)^kind: Secret", r"(?i)private_key|credentials\.json"):
        assert not re.search(pattern, text), f"{path.name}: {pattern}"


# ---------------------------------------------------------------------------------------
# cluster/local.sh: a token-authenticated cluster, a job, a refused client.


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> set[str]:
    """Local addresses (hex, as /proc/net/tcp* writes them) of the sockets listening on `port`."""
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.rsplit(":", 1)
            if state == "0A" and int(hex_port, 16) == port:
                out.add(address)
    return out


def _session_pids(sid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid and (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    pids.append(int(entry.name))
            except (OSError, IndexError):
                pass
    return pids


def test_local_script_token_is_a_64_hex_file_of_mode_600_kept_across_calls(tmp_path):
    """`cluster/local.sh token` (and `start`) make the token if missing and chmod 600 it, never
    print it (only its path), and keep an existing one, fixing its mode."""
    token_file = tmp_path / "ray" / "auth_token"
    env = {**os.environ, "RAY_AUTH_TOKEN_PATH": str(token_file), "PATH": f"{RAY_BIN.parent}{os.pathsep}{os.environ['PATH']}"}
    first = subprocess.run([str(CLUSTER / "local.sh"), "token"], env=env, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    token = token_file.read_text()
    assert re.fullmatch(r"[0-9a-f]{64}", token) and token not in first.stdout + first.stderr
    assert first.stdout.strip() == str(token_file) and token_file.stat().st_mode & 0o777 == 0o600
    assert token_file.parent.stat().st_mode & 0o777 == 0o700  # made here: private
    tmp_path.chmod(0o755)
    other = tmp_path / "other_token"  # in an existing directory, whose mode stays as it is
    made = subprocess.run([str(CLUSTER / "local.sh"), "token"], env={**env, "RAY_AUTH_TOKEN_PATH": str(other)},
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0 and other.stat().st_mode & 0o777 == 0o600 and tmp_path.stat().st_mode & 0o777 == 0o755
    token_file.chmod(0o644)
    again = subprocess.run([str(CLUSTER / "local.sh"), "token"], env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and token_file.read_text() == token and token_file.stat().st_mode & 0o777 == 0o600


@pytest.mark.slow
def test_local_cluster_script_runs_a_job_with_the_token_and_refuses_clients_without_it(tmp_path):
    """cluster/local.sh start --workers 1 on ports of its own, with a token file of this test
    (never ~/.ray/auth_token): the token file ends up mode 600, the job API listens on 127.0.0.1
    only, `ray job submit` with the token runs a job whose tasks reach both nodes, and clients
    without the token or with a wrong one are refused by the job API and by the GCS. `stop`
    leaves no process of either node behind."""
    port, dashboard = _free_port(), _free_port()
    state = Path("/tmp") / f"raylm-lt-{os.getpid()}"  # short: Ray's socket paths have a length limit
    token_file = tmp_path / "auth_token"
    token_file.write_text("0123456789abcdef" * 4)
    token_file.chmod(0o644)  # as `ray get-auth-token --generate` leaves it (umask 022): start fixes it
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_MODE")}
    env.update(PATH=f"{RAY_BIN.parent}{os.pathsep}{env['PATH']}", RAY_AUTH_TOKEN_PATH=str(token_file),
               RAYLM_LOCAL_DIR=str(state))
    script = [str(CLUSTER / "local.sh")]
    start = subprocess.run([*script, "start", "--workers", "1", "--port", str(port), "--dashboard-port", str(dashboard),
                            "--num-cpus", "2", "--", f"--object-store-memory={150 * 2**20}"],
                           env=env, capture_output=True, text=True, timeout=300)
    sessions = [int(p.read_text()) for p in state.glob("*.pid")]
    try:
        assert start.returncode == 0, start.stdout[-3000:] + start.stderr[-3000:]
        assert len(sessions) == 2
        assert (f"RAY_ADDRESS=http://127.0.0.1:{dashboard} ray job submit --working-dir . -- raylm train "
                "configs/debug.yaml") in start.stdout
        assert token_file.stat().st_mode & 0o777 == 0o600 and token_file.read_text() == "0123456789abcdef" * 4
        assert _listening(dashboard) == {"0100007F"}  # 127.0.0.1, nothing else
        # A temp dir per node, as on separate machines (a shared one lets a worker node delete the
        # unpacked working_dir the job's driver runs in; seen with `raylm train` as the job).
        assert (state / "head").is_dir() and (state / "w1").is_dir()

        # The guide's job, `raylm train` as a job, with the token from the client's env: it
        # finishes and leaves its checkpoint. (2 logical CPUs a node: the data pipeline's actors
        # and tasks and the worker must fit on the nodes at once.)
        # Its tokenizer trained here beforehand (tokenizer.path): the job skips sampling the corpus.
        from support import train_tokenizer_local

        runs, job_args = tmp_path / "runs", ["train.max_steps=2", "train.eval_every=0", "run.sample_tokens=4",
                                             "data.val_fraction=0", "data.sources.0.max_bytes=100000",
                                             "tokenizer.sample_bytes=100000", "scaling.num_workers=1"]
        tokenizer = tmp_path / "tokenizer.model"
        train_tokenizer_local(load_config(ROOT / "configs/debug.yaml", job_args)).save(tokenizer)
        submit = [str(RAY_BIN), "job", "submit", "--working-dir", str(ROOT), "--",
                  sys.executable, "-m", "raylm", "train", "configs/debug.yaml", f"run.output_dir={runs}",
                  f"tokenizer.path={tokenizer}", *job_args]
        client = {**env, "RAY_AUTH_MODE": "token", "RAY_ADDRESS": f"http://127.0.0.1:{dashboard}"}
        done = subprocess.run(submit, env=client, capture_output=True, text=True, timeout=400, cwd=tmp_path)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "succeeded" in done.stdout
        (run,) = runs.iterdir()
        assert ckpt.latest_checkpoint(run) == run / ckpt.checkpoint_dir_name(2)
        assert not (run / ".venv").exists()
        submission_id = re.search(r"Job '(raysubmit_\w+)' succeeded", done.stdout).group(1)
        logs = subprocess.run([str(RAY_BIN), "job", "logs", "-f", submission_id], env=client, capture_output=True,
                              text=True, timeout=120)
        assert logs.returncode == 0 and "final checkpoint" in logs.stdout, logs.stdout[-2000:] + logs.stderr[-2000:]

        wrong = tmp_path / "wrong_token"
        wrong.write_text("f" * 64)
        refused = {"Missing authentication token": {**client, "RAY_AUTH_MODE": "disabled"},
                   "Invalid authentication token": {**client, "RAY_AUTH_TOKEN_PATH": str(wrong)}}
        for why, client_env in refused.items():
            no = subprocess.run(submit, env=client_env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
            assert no.returncode != 0 and why in no.stdout + no.stderr, no.stdout[-2000:] + no.stderr[-2000:]
        jobs = subprocess.run([str(RAY_BIN), "job", "list"], env=client, capture_output=True, text=True, timeout=120)
        assert jobs.returncode == 0 and jobs.stdout.count("submission_id='raysubmit_") == 1, jobs.stdout[-2000:]

        gcs = subprocess.run([str(RAY_BIN), "status", f"--address=127.0.0.1:{port}"],
                             env={**env, "RAY_AUTH_MODE": "disabled"}, capture_output=True, text=True, timeout=120)
        assert gcs.returncode != 0 and "InvalidAuthToken" in gcs.stdout + gcs.stderr
        status = subprocess.run([*script, "status", "--port", str(port)], env=env, capture_output=True, text=True,
                                timeout=120)
        assert status.returncode == 0, status.stdout[-2000:] + status.stderr[-2000:]
        assert "head: running" in status.stdout and "worker-1: running" in status.stdout
        assert "auth mode: token" in status.stdout
    finally:
        stop = subprocess.run([*script, "stop", "--port", str(port)], env=env, capture_output=True, text=True,
                              timeout=180)
        left = {sid: _session_pids(sid) for sid in sessions}
        for pids in left.values():  # never leave a cluster behind, even when stop failed
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        shutil.rmtree(state, ignore_errors=True)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert not any(left.values()), left
    assert not state.exists()
    deadline = time.monotonic() + 30
    while _listening(dashboard) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _listening(dashboard)
