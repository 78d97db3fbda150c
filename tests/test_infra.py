"""infra/ checked against the code: manifests' commands parse with the jobs' real parsers,
image versions agree with pyproject.toml, resource requests agree between cluster and jobs,
and the Dockerfiles are built the way the project needs."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import tomllib
import yaml

from jobs._config import parse_config
from jobs.annotate import AnnotateConfig
from jobs.evaluate import EvaluateConfig
from jobs.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
JOB_CONFIGS = {"jobs.annotate": AnnotateConfig, "jobs.evaluate": EvaluateConfig, "jobs.train": TrainConfig}


def ray_version() -> str:
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (ray,) = [d for d in dependencies if d.startswith("ray[")]
    return ray.split("==")[1]


def manifests() -> dict[str, list[dict]]:
    return {str(p.relative_to(INFRA)): [d for d in yaml.safe_load_all(p.read_text()) if d] for p in sorted(INFRA.rglob("*.yaml"))}


def job_commands() -> list[tuple[str, str, list[str]]]:
    """(manifest, job module, argv) for every `python -m jobs.X ...` in any manifest."""
    found = []
    for name, documents in manifests().items():
        for document in documents:
            for text in _strings(document):
                env = _container_env(document)
                for line in text.splitlines() if "\n" in text else [text]:
                    # Shell variables of the CronJob script: substitute what its container sets.
                    line = re.sub(r"\$\(date[^)]*\)", "2026-w48", line)
                    line = re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), f"value-of-{m.group(1)}"), line)
                    words = shlex.split(line)
                    for i in range(len(words) - 2):
                        if words[i] == "python" and words[i + 1] == "-m" and words[i + 2].startswith("jobs."):
                            found.append((name, words[i + 2], words[i + 3 :]))
    return found


def _strings(node):
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)


def _container_env(document: dict) -> dict[str, str]:
    env = {}
    for container in _find(document, "containers"):
        for item in container.get("env", []):
            env[item["name"]] = item.get("value", "")
    return env


def _find(node, key):
    if isinstance(node, dict):
        for k, value in node.items():
            if k == key:
                yield from value
            else:
                yield from _find(value, key)
    elif isinstance(node, list):
        for value in node:
            yield from _find(value, key)


def parse_job(module: str, argv: list[str]):
    if module == "jobs.registry":
        from jobs.registry import build_parser

        return build_parser().parse_args(argv)
    return parse_config(JOB_CONFIGS[module], argv)


def test_every_manifest_parses_and_has_a_kind_or_launcher_shape():
    found = manifests()
    assert {
        "k8s/raycluster.yaml",
        "k8s/rayjob-annotate.yaml",
        "k8s/rayjob-train.yaml",
        "k8s/cronjob-retrain.yaml",
        "aws/cluster.yaml",
    } <= set(found)
    for name, documents in found.items():
        for document in documents:
            assert "kind" in document or "available_node_types" in document, name


def test_every_entrypoint_parses_with_the_jobs_real_parser():
    commands = job_commands()
    modules = {module for _, module, _ in commands}
    assert {"jobs.annotate", "jobs.train", "jobs.registry"} <= modules
    for manifest, module, argv in commands:
        try:
            parse_job(module, argv)
        except SystemExit as exc:
            pytest.fail(f"{manifest}: `python -m {module} {' '.join(argv)}` does not parse (exit {exc.code})")


def test_parser_check_catches_unknown_and_missing_flags():
    with pytest.raises(SystemExit):
        parse_job("jobs.annotate", ["--input", "s3://a/", "--output", "s3://b/", "--no-such-flag", "1"])
    with pytest.raises(SystemExit):
        parse_job("jobs.annotate", ["--input", "s3://a/"])


def test_images_and_versions_agree_with_pyproject():
    version = ray_version()
    images = []
    for name, documents in manifests().items():
        for document in documents:
            images += [(name, c["image"]) for c in _find(document, "containers")]
            if "docker" in document:
                images += [(name, document["docker"][k]) for k in ("head_image", "worker_image")]
                images += [(name, t["docker"]["worker_image"]) for t in document["available_node_types"].values() if "docker" in t]
            if document.get("kind") == "RayCluster":
                assert document["spec"]["rayVersion"] == version, name
    assert len(images) >= 6
    for name, image in images:
        assert f"-ray{version}-" in image, f"{name}: image {image} is not built for Ray {version}"
        assert image.endswith(("-cpu", "-gpu")), f"{name}: {image}"


def _cluster() -> dict:
    (document,) = manifests()["k8s/raycluster.yaml"]
    return document["spec"]


def _group(name: str) -> dict:
    (group,) = [g for g in _cluster()["workerGroupSpecs"] if g["groupName"] == name]
    return group


def test_resource_requests_agree_between_cluster_and_jobs():
    gpu, cpu = _group("gpu-detect"), _group("cpu-decode")
    for group in (gpu, cpu):
        (container,) = group["template"]["spec"]["containers"]
        limits = container["resources"]["limits"]
        assert int(limits["cpu"]) == int(group["rayStartParams"]["num-cpus"]), group["groupName"]
        assert int(limits.get("nvidia.com/gpu", 0)) == int(group["rayStartParams"].get("num-gpus", 0)), group["groupName"]
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert gpu["template"]["spec"]["containers"][0]["image"].endswith("-gpu")
    assert _cluster()["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"

    gpus_per_node = int(gpu["rayStartParams"]["num-gpus"])
    cpus_gpu_node = int(gpu["rayStartParams"]["num-cpus"])
    cpus_cpu_node = int(cpu["rayStartParams"]["num-cpus"])
    annotate = [parse_job(m, a) for _, m, a in job_commands() if m == "jobs.annotate"]
    assert annotate
    for config in annotate:
        assert config.num_gpus_per_actor > 0, "the cluster's annotation job should use its GPU group"
        assert gpus_per_node % config.num_gpus_per_actor == 0
        assert config.num_cpus_per_actor <= cpus_gpu_node
        assert config.actors <= gpu["maxReplicas"] * gpus_per_node / config.num_gpus_per_actor
        # Several actors share a GPU (each decodes its JPEGs there); together they fit the node's CPUs.
        assert config.decode_mode == "actor"
        assert config.num_cpus_per_actor * gpus_per_node / config.num_gpus_per_actor <= cpus_gpu_node
    train = [parse_job(m, a) for _, m, a in job_commands() if m == "jobs.train"]
    assert train
    for config in train:
        assert config.use_gpu and config.num_workers <= gpu["maxReplicas"] * gpus_per_node
        assert config.cpus_per_worker <= cpus_gpu_node

    (launcher,) = manifests()["aws/cluster.yaml"]
    types = launcher["available_node_types"]
    assert types[launcher["head_node_type"]]["resources"]["CPU"] == 0
    assert types["gpu_detect"]["resources"] == {"CPU": cpus_gpu_node, "GPU": gpus_per_node}
    assert types["cpu_decode"]["resources"]["CPU"] == cpus_cpu_node


def test_cronjob_is_weekly_and_submits_with_fixed_ids():
    (cron,) = manifests()["k8s/cronjob-retrain.yaml"]
    assert cron["kind"] == "CronJob" and cron["spec"]["concurrencyPolicy"] == "Forbid"
    minute, hour, day, month, weekday = cron["spec"]["schedule"].split()
    assert day == "*" and month == "*" and weekday != "*"
    script = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"][0]
    submits = [line for line in script.splitlines() if line.strip().startswith("ray job submit")]
    assert len(submits) == 1 and "--submission-id" in submits[0] and "jobs.train" in submits[0]
    # The training run registers; it must not promote on its own, past the gate's exit status.
    assert "--registry" in submits[0] and "--promote" not in submits[0]


def test_cronjob_exit_status_is_the_gates():
    """The promotion runs in the CronJob's own container, last (exec), so that the Job ends with
    jobs.registry's exit status; a refusal (ExitCode.REFUSED) fails the Job without a retry."""
    from jobs._exit import ExitCode

    (cron,) = manifests()["k8s/cronjob-retrain.yaml"]
    job = cron["spec"]["jobTemplate"]["spec"]
    (container,) = job["template"]["spec"]["containers"]
    assert container["command"][1].startswith("-e"), "a failed training run must stop the script before the gate"
    lines = [line.strip() for line in container["args"][0].splitlines() if line.strip()]
    assert lines[-1].startswith("exec python -m jobs.registry promote ")
    assert job["backoffLimit"] == 0
    (rule,) = job["podFailurePolicy"]["rules"]
    assert rule["action"] == "FailJob" and rule["onExitCodes"]["values"] == [ExitCode.REFUSED]
    assert rule["onExitCodes"]["containerName"] == container["name"]
    header = (INFRA / "k8s" / "cronjob-retrain.yaml").read_text().split("apiVersion")[0]
    for code in (ExitCode.OK, ExitCode.FAILED, ExitCode.REFUSED):  # what jobs.registry returns
        assert re.search(rf"#\s+{int(code)}\s", header), f"exit status {int(code)} is not explained in the manifest"


@pytest.mark.parametrize("dockerfile", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_dockerfiles_are_pinned_non_root_secret_free_and_install_the_project(dockerfile):
    text = (INFRA / "docker" / dockerfile).read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S*)", text, re.M))
    assert args["RAY_VERSION"] == ray_version()
    bases = re.findall(r"^FROM (\S+)", text, re.M)
    assert len(bases) >= 2, "multi-stage: a build stage and a runtime stage"
    suffix = "-gpu" if dockerfile.endswith("gpu") else ""
    for base in bases:
        assert base == "rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}" + suffix, base
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0"), "the image must run as a non-root user"
    assert not re.search(r"(?i)(aws_secret|aws_access_key|password|token|secret)\s*[=:]", text)
    assert not re.search(r"(?i)^(ENV|ARG)\s+\w*(KEY|SECRET|TOKEN|PASSWORD)", text, re.M)
    assert "COPY --chown=ray:users pyproject.toml" in text and "pip wheel --no-deps --wheel-dir /tmp/wheels ." in text
    assert 'ARG BAKE_WEIGHTS=""' in text, "weights are not baked in by default"
