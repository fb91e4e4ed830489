"""The cluster recipes in infra/ are checked, not just written.

- KubeRay (infra/kuberay/): every RayCluster and RayJob is validated against the openAPIV3Schema of
  the KubeRay CRD version it names (../shared/kuberay/, copied from the operator; the tests skip
  with a reason when it is absent) with a real JSON-schema validator, plus what the API server and
  the operator add: a field the schema does not declare is an error here (Kubernetes would prune it
  silently), list-map keys are unique, and the operator's own spec rules (RayJob names, backoffLimit
  vs clusterSelector, replicas, token auth vs rayVersion...) hold. Then LiteFrame's conventions:
  token auth in every cluster, one image and one Ray version everywhere, each RayJob's entrypoint
  parses with the job's real config class, local paths lie on the shared volume of every pod, a
  retried job resumes, and the GPU counts match the command.
- `ray up` (infra/ray-up/aws.yaml): Ray's own `validate_config` (ray-schema.json) on the config as
  `ray up` prepares it, AWS provider keys that Ray reads, and every node_config against botocore's
  EC2 RunInstances request shape (unknown keys, types, enums such as the instance type).
- The image (infra/docker/): the Dockerfile is parsed (no docker here): base tag vs the Ray pin,
  every COPY source exists and survives Dockerfile.dockerignore, cheap layer order, a non-root user,
  the dependency step installs pyproject's dependencies under pins that satisfy pyproject, a wheel
  builds from exactly the copied files, and check_ffmpeg.py passes on the ffmpeg the tests decode with.
Each checker is also shown to catch a planted mistake, so a green run means something.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import fnmatch
import importlib
import importlib.util
import io
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
KUBERAY_CRDS = REPO.parent / "shared" / "kuberay"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PROJECT_VERSION = PYPROJECT["project"]["version"]
IMAGE = f"liteframe:{PROJECT_VERSION}"          # what `docker build -t` in the Dockerfile's header makes
RAY_PIN = next(d.split("==")[1] for d in PYPROJECT["project"]["dependencies"] if d.startswith("ray["))
SHARED_CLAIM = "liteframe-shared"


def _ray_version() -> str:
    from importlib.metadata import version

    return version("ray")


# --------------------------------------------------------------------------------------------------
# KubeRay: schema validation with unknown fields as errors
# --------------------------------------------------------------------------------------------------

# metadata at the root is ObjectMeta (the API server validates it; the CRD schema says only "object")
OBJECT_META = {"name", "namespace", "labels", "annotations", "generateName", "finalizers", "ownerReferences"}


@pytest.fixture(scope="module")
def crds() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> openAPIV3Schema of that served version, from the operator's CRD files."""
    if not KUBERAY_CRDS.is_dir():
        pytest.skip(f"KubeRay CRD schemas not present at {KUBERAY_CRDS}")
    out = {}
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)     # 2.3 MB of YAML: libyaml when present
    for path in (KUBERAY_CRDS / "ray.io_rayclusters.yaml", KUBERAY_CRDS / "ray.io_rayjobs.yaml"):
        crd = yaml.load(path.read_text(), Loader=loader)
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if version.get("served", True):
                out[(f"{group}/{version['name']}", kind)] = version["schema"]["openAPIV3Schema"]
    assert ("ray.io/v1", "RayCluster") in out and ("ray.io/v1", "RayJob") in out
    return out


def undeclared_fields(value, schema: dict, path: str = "") -> list[str]:
    """Keys the structural schema does not declare: the API server prunes them without a word, so a
    typo or a field in the wrong place would be lost. Also checks x-kubernetes list-map/set keys."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    problems = []
    if isinstance(value, dict):
        props, extra = schema.get("properties"), schema.get("additionalProperties")
        for key, sub in value.items():
            where = f"{path}.{key}"
            if path == "" and key == "metadata" and props and props.get("metadata") == {"type": "object"}:
                problems += [f"{where}.{k}: not an ObjectMeta field" for k in sub if k not in OBJECT_META]
            elif props is not None and key in props:
                problems += undeclared_fields(sub, props[key], where)
            elif isinstance(extra, dict):
                problems += undeclared_fields(sub, extra, where)
            elif extra is True:
                continue
            else:
                known = sorted(props or ())
                hint = difflib.get_close_matches(key, known, n=1)
                problems.append(f"{where}: unknown field" + (f" (did you mean {hint[0]!r}?)" if hint else
                                                             f" (known here: {', '.join(known) or 'none'})"))
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            problems += undeclared_fields(item, schema["items"], f"{path}[{i}]")
        keys = schema.get("x-kubernetes-list-map-keys")
        if schema.get("x-kubernetes-list-type") == "map" and keys:
            seen = [tuple(item.get(k) for k in keys) for item in value if isinstance(item, dict)]
            problems += [f"{path}: duplicate {'/'.join(keys)} {d}" for d in {s for s in seen if seen.count(s) > 1}]
        if schema.get("x-kubernetes-list-type") == "set":
            dup = {json.dumps(v) for v in value if value.count(v) > 1}
            problems += [f"{path}: duplicate item {d}" for d in dup]
    return problems


def schema_problems(doc: dict, schema: dict) -> list[str]:
    import jsonschema

    validator = jsonschema.Draft4Validator(schema)   # CRD schemas are OpenAPI v3.0 (draft-4 keywords)
    problems = [f".{'.'.join(map(str, e.absolute_path))}: {e.message}"
                for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))]
    return problems + undeclared_fields(doc, schema)


# --------------------------------------------------------------------------------------------------
# KubeRay: the operator's own rules (ray-operator/controllers/ray/utils/validation.go) that the
# schema cannot express, for the features these manifests use
# --------------------------------------------------------------------------------------------------

DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
MAX_RAYCLUSTER_NAME, MAX_RAYJOB_NAME = 53, 47     # the operator appends a suffix to a RayJob's cluster


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


def pod_templates(cluster_spec: dict) -> list[tuple[str, dict]]:
    head = [("head", cluster_spec["headGroupSpec"]["template"])]
    return head + [(g["groupName"], g["template"]) for g in cluster_spec.get("workerGroupSpecs", [])]


def cluster_spec_rules(spec: dict, where: str) -> list[str]:
    problems = []
    autoscaling = bool(spec.get("enableInTreeAutoscaling"))
    start_resources = ("num-cpus", "num-gpus", "memory", "resources")
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]
    names = [g for g, _ in groups[1:]]
    problems += [f"{where}: worker group {n!r} defined twice" for n in {n for n in names if names.count(n) > 1}]
    for name, group in groups:
        if not group["template"].get("spec", {}).get("containers"):
            problems.append(f"{where}: group {name} has no container")
        params = group.get("rayStartParams", {})
        if any(params.get(k) for k in start_resources) and group.get("resources"):
            problems.append(f"{where}: group {name} sets resources in both rayStartParams and resources")
        if "labels" in params:
            problems.append(f"{where}: group {name}: rayStartParams['labels'] is not supported (use labels)")
        if name == "head":
            continue
        lo, hi, n = group.get("minReplicas"), group.get("maxReplicas"), group.get("replicas")
        if not autoscaling and (lo is None or hi is None):
            problems.append(f"{where}: group {name} needs minReplicas and maxReplicas without autoscaling")
        if lo is not None and hi is not None and lo > hi:
            problems.append(f"{where}: group {name} has minReplicas {lo} > maxReplicas {hi}")
        if n is not None and ((lo is not None and n < lo) or (hi is not None and n > hi)):
            problems.append(f"{where}: group {name} has replicas {n} outside [{lo}, {hi}]")
    auth = spec.get("authOptions") or {}
    if auth.get("mode") == "token":
        if not spec.get("rayVersion") or _version_tuple(spec["rayVersion"]) < (2, 52, 0):
            problems.append(f"{where}: authOptions.mode token needs rayVersion >= 2.52.0")
    elif auth.get("enableK8sTokenAuth"):
        problems.append(f"{where}: authOptions.enableK8sTokenAuth needs mode token")
    return problems


def operator_rules(doc: dict) -> list[str]:
    kind, name, spec = doc["kind"], doc.get("metadata", {}).get("name", ""), doc.get("spec", {})
    problems = []
    limit = MAX_RAYJOB_NAME if kind == "RayJob" else MAX_RAYCLUSTER_NAME
    if len(name) > limit or not DNS1035.match(name):
        problems.append(f"{kind} name {name!r}: must be a DNS-1035 label of at most {limit} characters")
    if kind == "RayCluster":
        problems += cluster_spec_rules(spec, "spec")
    elif kind == "RayJob":
        selector, cluster = spec.get("clusterSelector") or {}, spec.get("rayClusterSpec")
        if bool(selector) == bool(cluster):
            problems.append("RayJob: set exactly one of rayClusterSpec and clusterSelector")
        if selector:
            if not selector.get("ray.io/cluster"):
                problems.append("RayJob: clusterSelector needs the key ray.io/cluster")
            if spec.get("backoffLimit", 0) > 0:
                problems.append("RayJob: backoffLimit is incompatible with clusterSelector (the operator refuses it)")
            if spec.get("submissionMode") == "SidecarMode" or spec.get("suspend"):
                problems.append("RayJob: clusterSelector allows neither SidecarMode nor suspend")
        if not spec.get("shutdownAfterJobFinishes") and spec.get("ttlSecondsAfterFinished", 0) > 0:
            problems.append("RayJob: ttlSecondsAfterFinished needs shutdownAfterJobFinishes")
        if spec.get("submissionMode") == "SidecarMode" and ("submitterPodTemplate" in spec or "submitterConfig" in spec):
            problems.append("RayJob: SidecarMode takes neither submitterPodTemplate nor submitterConfig")
        if spec.get("submissionMode") == "InteractiveMode" and spec.get("backoffLimit", 0) > 0:
            problems.append("RayJob: backoffLimit is incompatible with InteractiveMode")
        for key in ("activeDeadlineSeconds", "preRunningDeadlineSeconds"):
            if key in spec and spec[key] <= 0:
                problems.append(f"RayJob: {key} must be positive")
        if not str(spec.get("entrypoint", "")).strip() and spec.get("submissionMode") != "InteractiveMode":
            problems.append("RayJob: no entrypoint")
        if cluster:
            problems += cluster_spec_rules(cluster, "spec.rayClusterSpec")
    return problems


def pod_rules(template: dict, where: str) -> list[str]:
    """What the API server would refuse or a pod would trip over: mounts of undeclared volumes,
    extended resources (GPUs) whose request differs from the limit."""
    spec = template.get("spec", {})
    volumes = {v["name"] for v in spec.get("volumes", [])}
    problems = []
    for c in spec.get("initContainers", []) + spec.get("containers", []):
        for m in c.get("volumeMounts", []):
            if m["name"] not in volumes:
                problems.append(f"{where}: container {c['name']} mounts undeclared volume {m['name']!r}")
        res = c.get("resources", {})
        for key, limit in res.get("limits", {}).items():
            if "/" in key and str(res.get("requests", {}).get(key, limit)) != str(limit):
                problems.append(f"{where}: container {c['name']}: {key} request must equal its limit")
    return problems


# --------------------------------------------------------------------------------------------------
# KubeRay: LiteFrame's conventions
# --------------------------------------------------------------------------------------------------

JOB_CONFIGS = {"jobs.extract": "ExtractConfig", "jobs.train_student": "RayTrainConfig",
               "jobs.lma_finetune": "RayFinetuneConfig"}
RAY_TRAIN_JOBS = {"jobs.train_student": "CTD", "jobs.lma_finetune": "LMA"}     # jobs.ray_train's worker groups
PATH_FIELDS = ("input", "output", "teacher", "data", "eval_data", "init_from", "init_from_teacher", "student",
               "llm")


def parse_entrypoint(entrypoint: str):
    """(module, config) for `python -m jobs.X ...`, parsed by the job's own config class; or a problem."""
    argv = shlex.split(entrypoint)
    if argv[:2] != ["python", "-m"] or argv[2] not in JOB_CONFIGS:
        return None, f"entrypoint is not `python -m` one of {sorted(JOB_CONFIGS)}: {entrypoint[:80]!r}"
    module = importlib.import_module(argv[2])
    from pipeline.config import parse_config

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return argv[2], parse_config(getattr(module, JOB_CONFIGS[argv[2]]), argv[3:])
    except SystemExit:
        return argv[2], f"entrypoint of {argv[2]} does not parse: {err.getvalue().strip().splitlines()[-1]}"


def shared_mounts(cluster_spec: dict) -> set[str]:
    """Mount paths of claim volumes mounted in every pod of the cluster (the only claim allowed is
    the ReadWriteMany liteframe-shared)."""
    common = None
    for _, template in pod_templates(cluster_spec):
        spec = template["spec"]
        claims = {v["name"] for v in spec.get("volumes", []) if v.get("persistentVolumeClaim")}
        mounts = {m["mountPath"].rstrip("/") for m in spec["containers"][0].get("volumeMounts", [])
                  if m["name"] in claims}
        common = mounts if common is None else common & mounts
    return common or set()


def gpus(template: dict) -> int:
    return int(template["spec"]["containers"][0].get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def liteframe_rules(doc: dict) -> list[str]:
    """One image, one Ray version and token auth everywhere; a RayJob's command is valid for its job,
    sees its files on every node, resumes when retried, and asks for the GPUs its cluster has."""
    spec = doc["spec"]
    cluster = spec if doc["kind"] == "RayCluster" else spec.get("rayClusterSpec")
    if cluster is None:
        return ["RayJobs here bring their own cluster (rayClusterSpec), so that backoffLimit retries work"]
    problems = []
    if cluster.get("rayVersion") != _ray_version() or cluster.get("rayVersion") != RAY_PIN:
        problems.append(f"rayVersion {cluster.get('rayVersion')} != installed Ray {_ray_version()} / pin {RAY_PIN}")
    auth = cluster.get("authOptions") or {}
    if auth.get("mode") != "token" or not auth.get("secretName"):
        problems.append("token authentication must be on (authOptions: mode token, secretName)")
    for group, template in pod_templates(cluster):
        container = template["spec"]["containers"][0]
        if container.get("image") != IMAGE:
            problems.append(f"{group}: image {container.get('image')!r} is not {IMAGE!r}")
        if not template["spec"].get("securityContext", {}).get("runAsNonRoot"):
            problems.append(f"{group}: pods must run as non-root (securityContext.runAsNonRoot)")
        claims = [v["persistentVolumeClaim"]["claimName"] for v in template["spec"].get("volumes", [])
                  if v.get("persistentVolumeClaim")]
        problems += [f"{group}: unknown claim {c!r}" for c in claims if c != SHARED_CLAIM]
        problems += pod_rules(template, group)
    if doc["kind"] != "RayJob":
        return problems

    module, cfg = parse_entrypoint(spec["entrypoint"])
    if isinstance(cfg, str):
        return problems + [cfg]
    mounts = shared_mounts(cluster)
    for name in PATH_FIELDS:       # absolute paths; `s3://...` and hub ids are not files of a node
        value = getattr(cfg, name, None)
        if isinstance(value, str) and value.startswith("/"):
            if not any(value == m or value.startswith(m + "/") for m in mounts):
                problems.append(f"--{name.replace('_', '-')} {value}: not on a shared volume of every pod "
                                f"(shared: {sorted(mounts)})")
    retried = spec.get("backoffLimit", 0) > 0
    workers = [(g, t) for g, t in pod_templates(cluster)[1:]]
    groups = {g["groupName"]: g for g in cluster.get("workerGroupSpecs", [])}
    if module in RAY_TRAIN_JOBS:
        what = RAY_TRAIN_JOBS[module]
        if not cfg.output.startswith("/"):
            problems.append(f"{module} --output must be an absolute path on the shared volume "
                            "(rank 0 writes a local directory, every rank and every retry reads it)")
        if retried and not (cfg.resume or cfg.max_failures > 0):
            problems.append(f"a retried {what} job must resume: --max-failures > 0 or --resume")
        gpu_groups = [(groups[g], gpus(t)) for g, t in workers if gpus(t)]
        fixed = all(g.get("minReplicas") == g.get("maxReplicas") == g.get("replicas") for g, _ in gpu_groups)
        total = sum(g.get("replicas", g.get("minReplicas", 0)) * n for g, n in gpu_groups)
        if cfg.use_gpu and (not fixed or total != cfg.ray_workers):
            problems.append(f"--ray-workers {cfg.ray_workers} --use-gpu needs exactly that many GPUs in fixed-size "
                            f"groups (Ray Train's group has a fixed size); the cluster has {total}")
    elif module == "jobs.extract":
        most = sum(groups[g].get("maxReplicas", groups[g].get("replicas", 0)) * gpus(t) for g, t in workers)
        if cfg.teacher_actors and cfg.teacher_actors > most:
            problems.append(f"--teacher-actors {cfg.teacher_actors} > the {most} GPUs the cluster can have")
    return problems


def kuberay_documents() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted((INFRA / "kuberay").glob("*.yaml")):
        docs += [(f"{path.name}#{i}", d) for i, d in enumerate(yaml.safe_load_all(path.read_text())) if d]
    return docs


def check_kuberay(doc: dict, crds: dict) -> list[str]:
    schema = crds.get((doc.get("apiVersion"), doc.get("kind")))
    if schema is None:
        return [f"no served CRD version for apiVersion {doc.get('apiVersion')!r} kind {doc.get('kind')!r}"]
    problems = schema_problems(doc, schema)
    if problems:           # the rules below assume a well-formed document
        return problems
    return operator_rules(doc) + liteframe_rules(doc)


def test_every_kuberay_manifest_is_a_ray_resource_or_the_shared_claim():
    kinds = sorted((d["apiVersion"], d["kind"], d["metadata"]["name"]) for _, d in kuberay_documents())
    assert kinds == [("ray.io/v1", "RayCluster", "liteframe"),
                     ("ray.io/v1", "RayJob", "liteframe-extract"),
                     ("ray.io/v1", "RayJob", "liteframe-lma-finetune"),
                     ("ray.io/v1", "RayJob", "liteframe-train-student"),
                     ("v1", "PersistentVolumeClaim", SHARED_CLAIM)]


@pytest.mark.parametrize("name", [n for n, d in kuberay_documents() if d["apiVersion"].startswith("ray.io/")])
def test_kuberay_manifest(name, crds):
    doc = dict(kuberay_documents())[name]
    assert check_kuberay(doc, crds) == []


def test_shared_claim_is_a_valid_readwritemany_claim(crds):
    """The PVC is core Kubernetes, not a KubeRay kind: its spec is checked against the
    PersistentVolumeClaimSpec schema that the RayCluster CRD embeds (pod volumes' ephemeral claims)."""
    (doc,) = [d for _, d in kuberay_documents() if d["kind"] == "PersistentVolumeClaim"]
    pod = crds[("ray.io/v1", "RayCluster")]["properties"]["spec"]["properties"]["headGroupSpec"]["properties"]["template"]
    claim_spec = (pod["properties"]["spec"]["properties"]["volumes"]["items"]["properties"]["ephemeral"]
                  ["properties"]["volumeClaimTemplate"]["properties"]["spec"])
    assert schema_problems(doc["spec"], claim_spec) == []
    assert set(doc["metadata"]) <= OBJECT_META
    assert doc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_all_clusters_share_one_token_secret():
    secrets = set()
    for _, doc in kuberay_documents():
        spec = doc.get("spec", {})
        cluster = spec if doc["kind"] == "RayCluster" else spec.get("rayClusterSpec")
        if cluster is not None:
            secrets.add(cluster["authOptions"]["secretName"])
    assert len(secrets) == 1, secrets


def _mutate(name: str, change) -> dict:
    doc = copy.deepcopy(dict(kuberay_documents())[name])
    change(doc)
    return doc


def _on_existing_cluster(doc, name):
    del doc["spec"]["rayClusterSpec"]
    doc["spec"]["clusterSelector"] = {"ray.io/cluster": name}


def _worker(doc):
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    return spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]


MISTAKES = {
    "typo in a container field": (
        "raycluster.yaml#0", lambda d: _worker(d).__setitem__("volumeMount", _worker(d).pop("volumeMounts")),
        "volumeMount: unknown field (did you mean 'volumeMounts'?)"),
    "field in the wrong place": (
        "rayjob-train-student.yaml#0",
        lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"].__setitem__(
            "authOptions", d["spec"]["rayClusterSpec"].pop("authOptions")),
        "headGroupSpec.authOptions: unknown field"),
    "string where an integer belongs": (
        "raycluster.yaml#0", lambda d: d["spec"]["workerGroupSpecs"][0].__setitem__("replicas", "4"),
        "'4' is not of type 'integer'"),
    "a quantity Kubernetes cannot parse": (
        "raycluster.yaml#0", lambda d: _worker(d)["resources"]["limits"].__setitem__("memory", "128GB"),
        "does not match"),
    "an enum value out of range": (
        "raycluster.yaml#0", lambda d: d["spec"]["authOptions"].__setitem__("mode", "tokens"),
        "'tokens' is not one of"),
    "two env vars of one name": (
        "rayjob-lma-finetune.yaml#0",
        lambda d: _worker(d).__setitem__("env", [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]),
        "duplicate name"),
    "backoffLimit on an existing cluster": (
        "rayjob-extract.yaml#0", lambda d: _on_existing_cluster(d, "liteframe"),
        "backoffLimit is incompatible with clusterSelector"),
    "minReplicas above maxReplicas": (
        "rayjob-extract.yaml#0",
        lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(minReplicas=70),
        "minReplicas 70 > maxReplicas 64"),
    "a flag the job does not have": (
        "rayjob-train-student.yaml#0",
        lambda d: d["spec"].__setitem__("entrypoint", d["spec"]["entrypoint"] + " --max-failurs 3"),
        "entrypoint of jobs.train_student does not parse"),
    "a run directory only one node sees": (
        "rayjob-lma-finetune.yaml#0",
        lambda d: d["spec"].__setitem__("entrypoint", d["spec"]["entrypoint"].replace("/shared/runs/lma", "/tmp/lma")),
        "--output /tmp/lma: not on a shared volume"),
    "a retry that would start over": (
        "rayjob-train-student.yaml#0",
        lambda d: d["spec"].__setitem__("entrypoint", d["spec"]["entrypoint"].replace("--max-failures 3", "")),
        "a retried CTD job must resume"),
    "an LMA retry that would start over": (
        "rayjob-lma-finetune.yaml#0",
        lambda d: d["spec"].__setitem__("entrypoint", d["spec"]["entrypoint"].replace("--max-failures 2", "")),
        "a retried LMA job must resume"),
    "ranks that do not match the GPUs": (
        "rayjob-train-student.yaml#0",
        lambda d: d["spec"].__setitem__("entrypoint", d["spec"]["entrypoint"].replace("--ray-workers 16", "--ray-workers 8")),
        "--ray-workers 8 --use-gpu needs exactly that many GPUs"),
    "LMA ranks that do not match the GPUs": (
        "rayjob-lma-finetune.yaml#0",
        lambda d: d["spec"].__setitem__("entrypoint",
                                        d["spec"]["entrypoint"].replace("--ray-workers 8", "--ray-workers 4")),
        "--ray-workers 4 --use-gpu needs exactly that many GPUs"),
    "authentication off": (
        "raycluster.yaml#0", lambda d: d["spec"].pop("authOptions"), "token authentication must be on"),
    "another image": (
        "rayjob-extract.yaml#0", lambda d: _worker(d).__setitem__("image", "liteframe:latest"), "is not 'liteframe:"),
}


@pytest.mark.parametrize("mistake", sorted(MISTAKES))
def test_kuberay_checks_catch_planted_mistakes(mistake, crds):
    name, change, expected = MISTAKES[mistake]
    problems = check_kuberay(_mutate(name, change), crds)
    assert any(expected in p for p in problems), problems


# --------------------------------------------------------------------------------------------------
# `ray up` on AWS
# --------------------------------------------------------------------------------------------------

RAY_UP = INFRA / "ray-up" / "aws.yaml"
RAY_SUBNET_KEYS = {"SubnetIds"}     # Ray's AWS provider resolves it to RunInstances' SubnetId itself


def aws_provider_keys() -> set[str]:
    """The provider keys Ray's autoscaler reads (its schema lets `provider` hold anything)."""
    import ray.autoscaler

    root = Path(ray.autoscaler.__file__).parent
    pattern = re.compile(r"""(?:provider_config|\["provider"\])(?:\.get\(|\[)\s*["'](\w+)["']""")
    keys = set()
    for path in list((root / "_private" / "aws").rglob("*.py")) + list((root / "_private").glob("*.py")):
        keys |= set(pattern.findall(path.read_text()))
    return keys


def botocore_problems(value, shape, path: str) -> list[str]:
    kind = shape.type_name
    if kind == "structure":
        if not isinstance(value, dict):
            return [f"{path}: expected a mapping"]
        out = []
        for key, sub in value.items():
            if key not in shape.members:
                hint = difflib.get_close_matches(key, list(shape.members), n=1)
                out.append(f"{path}.{key}: not a RunInstances field" + (f" (did you mean {hint[0]!r}?)" if hint else ""))
            else:
                out += botocore_problems(sub, shape.members[key], f"{path}.{key}")
        return out
    if kind == "list":
        if not isinstance(value, list):
            return [f"{path}: expected a list"]
        return [p for i, v in enumerate(value) for p in botocore_problems(v, shape.member, f"{path}[{i}]")]
    if kind == "map":
        return [p for k, v in value.items() for p in botocore_problems(v, shape.value, f"{path}.{k}")]
    expected = {"string": str, "integer": int, "long": int, "boolean": bool, "double": (int, float),
                "float": (int, float), "timestamp": str, "blob": (str, bytes)}.get(kind, object)
    if not isinstance(value, expected) or (kind in ("integer", "long") and isinstance(value, bool)):
        return [f"{path}: {value!r} is not a {kind}"]
    if kind == "string" and shape.enum and value not in shape.enum:
        hint = difflib.get_close_matches(value, shape.enum, n=1)
        return [f"{path}: {value!r} is not a valid value" + (f" (did you mean {hint[0]!r}?)" if hint else "")]
    return []


def node_config_problems(node_config: dict, where: str) -> list[str]:
    import botocore.session

    shape = botocore.session.get_session().get_service_model("ec2").operation_model("RunInstances").input_shape
    plain = {k: v for k, v in node_config.items() if k not in RAY_SUBNET_KEYS}
    return botocore_problems(plain, shape, where)


def check_ray_up(config: dict) -> list[str]:
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    problems = [f".{'.'.join(map(str, e.absolute_path))}: {e.message}"
                for e in jsonschema.Draft7Validator(schema).iter_errors(config)]
    if problems:
        return problems
    try:        # what `ray up` does before it calls the cloud: defaults merged, then Ray's validation
        validate_config(prepare_config(copy.deepcopy(config)))
    except Exception as e:   # jsonschema.ValidationError, ValueError
        return [f"validate_config: {str(e).splitlines()[0]}"]
    provider = config["provider"]
    known = aws_provider_keys() | {"type"}
    problems += [f"provider.{k}: not a key Ray's AWS provider reads" for k in provider if k not in known]
    for name, node_type in config["available_node_types"].items():
        problems += node_config_problems(node_type["node_config"], f"available_node_types.{name}.node_config")
    return problems


def test_ray_up_config_is_valid_for_the_installed_ray():
    config = yaml.safe_load(RAY_UP.read_text())
    assert config["provider"]["type"] == "aws"
    assert check_ray_up(config) == []


def test_ray_up_config_conventions():
    """Token auth on every node, the project image, the shared volume, and two worker groups that
    scale on their own (decode CPUs, GPUs) beside a head that takes no tasks."""
    config = yaml.safe_load(RAY_UP.read_text())
    image = config["docker"]["image"]
    assert image.rsplit("/", 1)[-1] == IMAGE, image
    assert config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in config[key] if "ray start" in c]
        assert start and all("RAY_AUTH_MODE=token" in c for c in start), key
    assert "--dashboard-host" not in " ".join(config["head_start_ray_commands"])   # reached through `ray dashboard`
    assert any(o.endswith(":/shared") for o in config["docker"]["run_options"])
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0} and "--num-cpus=0" in " ".join(config["head_start_ray_commands"])
    workers = {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}
    assert set(workers) == {"cpu-decode", "gpu"}
    assert all(v["min_workers"] < v["max_workers"] for v in workers.values())   # autoscaled
    assert workers["gpu"]["node_config"]["InstanceType"].startswith("p5")
    assert workers["cpu-decode"]["node_config"]["InstanceType"].startswith("c")


@pytest.mark.parametrize("change, expected", [
    (lambda c: c["available_node_types"]["gpu"].__setitem__("min_worker", 0), "'min_worker' was unexpected"),
    (lambda c: c["available_node_types"]["gpu"].__setitem__("min_workers", 40), "validate_config"),
    (lambda c: c["available_node_types"]["gpu"]["node_config"].__setitem__("InstanceTyp", "p5.48xlarge"),
     "InstanceTyp: not a RunInstances field (did you mean 'InstanceType'?)"),
    (lambda c: c["available_node_types"]["gpu"]["node_config"].__setitem__("InstanceType", "p5e.48xlarg"),
     "'p5e.48xlarg' is not a valid value"),
    (lambda c: c["available_node_types"]["gpu"]["node_config"]["BlockDeviceMappings"][0]["Ebs"].__setitem__(
        "VolumeSize", "2000"), "is not a integer"),
    (lambda c: c["provider"].__setitem__("regoin", "us-east-1"), "provider.regoin"),
    (lambda c: c.__setitem__("head_node_type", "gpu-head"), "head_node_type"),
    (lambda c: c["docker"].__setitem__("run_option", []), "run_option"),
], ids=["node-type-typo", "min-above-max-workers", "node-config-typo", "instance-type-typo", "ebs-size-type", "provider-typo",
        "head-type", "docker-typo"])
def test_ray_up_checks_catch_planted_mistakes(change, expected):
    config = yaml.safe_load(RAY_UP.read_text())
    change(config)
    problems = check_ray_up(config)
    assert any(expected in p for p in problems), problems


# --------------------------------------------------------------------------------------------------
# The image
# --------------------------------------------------------------------------------------------------

DOCKER = INFRA / "docker"


@dataclasses.dataclass
class Instruction:
    op: str
    args: str
    line: int


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped (Dockerfile syntax subset
    this file uses: no heredocs, default escape character)."""
    out, buf, start = [], "", 0
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if not buf:
            start = n
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        op, _, args = buf.partition(" ")
        out.append(Instruction(op.upper(), args.strip(), start))
        buf = ""
    assert not buf, "Dockerfile ends inside a continued line"
    return out


def copy_sources(ins: Instruction) -> tuple[list[str], str, dict]:
    words = shlex.split(ins.args)
    flags = {w.split("=", 1)[0][2:]: w.split("=", 1)[1] for w in words if w.startswith("--")}
    paths = [w for w in words if not w.startswith("--")]
    return paths[:-1], paths[-1], flags


def _ignore_regex(pattern: str) -> re.Pattern:
    """A .dockerignore pattern (Go filepath.Match plus `**`) as a regex over slash-separated paths."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore semantics: the last pattern that matches the path or one of its parent
    folders decides; `!` re-includes."""
    parts = path.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _ignore_regex(pattern[1:] if negate else pattern)
        if any(regex.match(c) for c in candidates):
            ignored = not negate
    return ignored


@pytest.fixture(scope="module")
def dockerfile() -> list[Instruction]:
    return parse_dockerfile((DOCKER / "Dockerfile").read_text())


def constraints() -> dict[str, str]:
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (DOCKER / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version and re.fullmatch(r"[\w.]+", version), f"not an exact pin: {line}"
            pins[canonicalize_name(name)] = version
    return pins


def test_base_image_is_the_pinned_ray_release(dockerfile):
    (base,) = [i for i in dockerfile if i.op == "FROM"]
    py = "".join(re.search(r"Python (\d+)\.(\d+)", (DOCKER / "constraints.txt").read_text()).groups())
    assert base.args == f"rayproject/ray:{RAY_PIN}-py{py}-gpu"
    assert RAY_PIN == _ray_version() == constraints()["ray"]


def test_every_copy_source_exists_and_is_in_the_build_context(dockerfile):
    patterns = [p.strip() for p in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    copies = [i for i in dockerfile if i.op in ("COPY", "ADD")]
    assert copies and all(i.op == "COPY" for i in copies), "ADD fetches URLs and unpacks archives: use COPY"
    for ins in copies:
        sources, _, flags = copy_sources(ins)
        assert flags.get("chown", "").split(":")[0] not in ("", "0", "root"), f"line {ins.line}: --chown to the user"
        for src in sources:
            path = REPO / src
            assert path.exists(), f"line {ins.line}: COPY {src}: no such file in the repository"
            files = [path] if path.is_file() else [p for p in path.rglob("*.py")]
            assert files, f"line {ins.line}: COPY {src} copies no Python file"
            kept = [f for f in files if not dockerignored(f.relative_to(REPO).as_posix(), patterns)]
            assert kept == files, f"line {ins.line}: Dockerfile.dockerignore drops {sorted(set(files) - set(kept))[:3]}"
    # and the context holds nothing else of size
    assert dockerignored(".venv/bin/python", patterns) and dockerignored(".git/config", patterns)
    assert dockerignored("pipeline/__pycache__/video.cpython-311.pyc", patterns)


def test_every_package_is_copied(dockerfile):
    include = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {p.name for p in REPO.iterdir() if (p / "__init__.py").is_file()
                and any(fnmatch.fnmatch(p.name, pat) for pat in include)}
    copied = {Path(s).parts[0] for i in dockerfile if i.op == "COPY" for s in copy_sources(i)[0]}
    assert packages and packages <= copied, packages - copied


def test_runs_as_a_non_root_user(dockerfile):
    users = [i for i in dockerfile if i.op == "USER"]
    assert users, "no USER: the image would run as whatever the base sets"
    first_build_step = min(i.line for i in dockerfile if i.op in ("RUN", "COPY"))
    assert users[0].line < first_build_step, "USER must come before any RUN or COPY"
    for u in users:
        uid = u.args.split(":")[0]
        assert uid.isdigit() and int(uid) != 0, f"USER {u.args}: numeric and not root (runAsNonRoot checks numbers)"
    env = " ".join(i.args for i in dockerfile if i.op == "ENV")
    assert "RAY_AUTH_MODE=token" in env


def test_layer_order_keeps_code_changes_cheap(dockerfile):
    """Only pyproject.toml and the pins enter before the dependency install; the code comes after,
    and nothing after the code resolves dependencies again."""
    runs = [i for i in dockerfile if i.op == "RUN"]
    install = next(i for i in runs if "-r requirements.txt" in i.args)
    before = [s for i in dockerfile if i.op == "COPY" and i.line < install.line for s in copy_sources(i)[0]]
    assert sorted(before) == ["infra/docker/check_ffmpeg.py", "infra/docker/constraints.txt", "pyproject.toml"]
    code = [i for i in dockerfile if i.op == "COPY" and i.line > install.line]
    assert {Path(s).parts[0] for i in code for s in copy_sources(i)[0]} >= {"pipeline", "student", "lma", "jobs"}
    later = [i for i in runs if i.line > install.line and "pip install" in i.args]
    assert later and all("--no-deps" in i.args for i in later)


def test_dependency_step_installs_pyproject_dependencies_under_the_pins(dockerfile, tmp_path):
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    install = next(i for i in dockerfile if i.op == "RUN" and "-r requirements.txt" in i.args)
    assert "-c constraints.txt" in install.args
    # run the Dockerfile's own requirements step on pyproject.toml
    words = shlex.split(install.args)
    snippet = words[words.index("-c") + 1]
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    listed = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True,
                            check=True).stdout.split("\n")
    assert [r for r in listed if r] == PYPROJECT["project"]["dependencies"]
    pins = constraints()
    for dep in PYPROJECT["project"]["dependencies"] + ["boto3"]:
        req = Requirement(dep)
        pin = pins.get(canonicalize_name(req.name))
        assert pin is not None, f"{req.name} has no pin in constraints.txt"
        assert req.specifier.contains(pin, prereleases=True), f"{req.name}=={pin} does not satisfy {dep}"
    assert "imageio-ffmpeg" in pins      # the ffmpeg of the image


def test_a_wheel_builds_from_exactly_the_copied_files(dockerfile, tmp_path):
    """`pip install --no-deps .` in the image sees only what the COPYs put in WORKDIR."""
    context = tmp_path / "workdir"
    context.mkdir()
    for ins in (i for i in dockerfile if i.op == "COPY"):
        sources, dest, _ = copy_sources(ins)
        for src in sources:
            target = context / (Path(src).name if dest in ("./", ".") else dest)
            if (REPO / src).is_dir():
                shutil.copytree(REPO / src, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy(REPO / src, target)
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                             "-w", str(tmp_path / "dist"), str(context)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("liteframe-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {p.relative_to(REPO).as_posix() for pkg in ("pipeline", "student", "lma", "jobs")
                for p in (REPO / pkg).rglob("*.py") if "__pycache__" not in p.parts}
    assert expected <= names, sorted(expected - names)[:5]


def test_check_ffmpeg_passes_on_the_tests_ffmpeg_and_fails_on_a_lesser_one(tmp_path):
    from pipeline.ffmpeg import ffmpeg_exe

    script = DOCKER / "check_ffmpeg.py"
    ok = subprocess.run([sys.executable, str(script), ffmpeg_exe()], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    fake = tmp_path / "ffmpeg"
    fake.write_text("#!/bin/sh\necho ' V....D h264  H.264'\n")
    fake.chmod(0o755)
    bad = subprocess.run([sys.executable, str(script), str(fake)], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "no hevc decoder" in bad.stderr and "no zscale filter" in bad.stderr
    assert "python check_ffmpeg.py" in (DOCKER / "Dockerfile").read_text()


def test_readme_codecs_are_the_ones_checked():
    """check_ffmpeg.py's lists cover the codecs and containers of the README and the real test clips."""
    spec = importlib.util.spec_from_file_location("check_ffmpeg", DOCKER / "check_ffmpeg.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert {"h264", "hevc", "vp8", "vp9", "mjpeg"} <= set(module.DECODERS)
    assert {"mov", "matroska", "avi", "mpegts"} <= set(module.DEMUXERS)
    assert "zscale" in module.FILTERS


def test_image_installs_the_gpu_decode_extra_at_its_pin(dockerfile):
    """NVDEC decode on GPU nodes: the image's PyNvVideoCodec is pyproject's gpu-decode extra, same version."""
    install = next(i for i in dockerfile if i.op == "RUN" and "-r requirements.txt" in i.args)
    extra = PYPROJECT["project"]["optional-dependencies"]["gpu-decode"]
    assert extra and all(req in shlex.split(install.args) for req in extra)
