"""The workflow on a real (single-node) SLURM cluster through the user-facing profile.

tests/slurm/cluster.sh starts slurmctld + slurmd on this machine with partitions `cpu` and `gpu` (two fake
GPUs as generic resources). The tiny config then runs from the project root, through the command a user
types plus the test profile:

    snakemake --profile slurm --profile tests/slurm/profile -d <workdir>

(`slurm` is the root's symlink to profiles/slurm; the second profile only swaps the site placeholders for the
test cluster and polls with squeue; the GPU and memory requests are profiles/slurm's own). Checked: every
non-local job was a SLURM job that completed on the partition its rule asks for, the GPU rules with a GPU
allocated; the local rules were not submitted; the artifacts are byte-identical to a local run's; a failing
job fails the run with a non-zero exit, no hang, after every failed job got its one retry with doubled memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from conftest import tiny_config, write_config

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CLUSTER_SH = ROOT / "tests/slurm/cluster.sh"
# As typed in the project root: `slurm` is found there (Snakemake looks a profile name up in the current
# directory before ~/.config/snakemake), so the SLURM runs start in ROOT and `-d` points at their workdir.
PROFILES = ["slurm", "tests/slurm/profile"]

# Rules the profile sends to the gpu partition with one GPU; every other submitted rule goes to `cpu`.
GPU_RULES = {"merge_adapter", "compute_imatrix", "test_merged_model", "compare_models", "compare_adapter"}
# Rules the Snakefile declares local (the tiny config has the demo off, so no build_demo_* job runs):
# they must never become SLURM jobs. Everything else is submitted.
LOCAL_RULES = {"all", "rank_candidates", "plot_candidates", "plot_comparison", "write_manifest", "deploy_model",
               "export_adapter"}
HEAVY_RULES = GPU_RULES | {"convert_gguf", "quantize_gguf", "check_chat_parity", "convert_base_gguf", "quantize_base_gguf"}
# A Snakemake waiting on SLURM ignores SIGTERM: every run is bounded by `timeout -k`.
RUN_TIMEOUT_S = 1200

pytestmark = [pytest.mark.slow, pytest.mark.slurm]


def _skip_reason() -> str | None:
    """Why this machine cannot start the test cluster, or None when it can."""
    if not sys.platform.startswith("linux"):
        return "SLURM test cluster needs Linux"
    if os.geteuid() != 0:
        return "starting slurmctld/slurmd and writing /etc/slurm needs root"
    have_slurm = all(shutil.which(b) or Path("/usr/sbin", b).exists() for b in ("slurmctld", "slurmd", "munged"))
    if not have_slurm and not shutil.which("apt-get"):
        return "SLURM is not installed and apt-get is not available to install it"
    if shutil.which("timeout") is None:
        return "coreutils `timeout` is needed to bound Snakemake runs"
    return None


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    already_up = subprocess.run([str(CLUSTER_SH), "status"], capture_output=True, check=False).returncode == 0
    started = time.monotonic()
    up = subprocess.run([str(CLUSTER_SH), "up"], capture_output=True, text=True, timeout=600, check=False)
    # A machine that passed _skip_reason must be able to run the cluster: a failure here is a real failure.
    assert up.returncode == 0, f"cluster.sh up failed:\n{up.stdout}\n{up.stderr}"
    logger.info("cluster up in %.1fs", time.monotonic() - started)
    yield
    if not already_up:
        subprocess.run([str(CLUSTER_SH), "down"], capture_output=True, timeout=120, check=False)


@dataclass
class Run:
    workdir: Path
    returncode: int
    output: str
    seconds: float


@dataclass
class Started:
    workdir: Path
    slurm: bool
    proc: subprocess.Popen
    log: Path
    started: float


def start_workflow(workdir: Path, *args: str, slurm: bool, timeout: int = RUN_TIMEOUT_S) -> Started:
    """Start the project's Snakefile on workdir, through the SLURM profiles or locally (output to a file)."""
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    # The plugin warns and cleans up when it finds itself inside a SLURM job; never inherit one.
    for key in [k for k in env if k.startswith("SLURM_")]:
        del env[key]
    cmd = [str(BIN / "snakemake"), "-s", str(ROOT / "Snakefile"), "-d", str(workdir)]
    if slurm:
        for profile in PROFILES:
            cmd += ["--profile", str(profile)]
    else:
        cmd += ["--cores", "2"]
    cmd += list(args)
    log = workdir.parent / f"{workdir.name}.snakemake.out"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            ["timeout", "-k", "30", str(timeout), *cmd],
            cwd=ROOT if slurm else workdir,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    return Started(workdir, slurm, proc, log, time.monotonic())


def finish_workflow(started: Started) -> Run:
    returncode = started.proc.wait()
    seconds = time.monotonic() - started.started
    output = started.log.read_text(encoding="utf-8", errors="replace")
    if started.slurm and returncode in (124, 137):
        # Killed by timeout: cancel what that Snakemake left queued (its jobs are all named by its run id).
        for run_id in re.findall(r"SLURM run ID: (\S+)", output):
            subprocess.run(["scancel", "--name", run_id], capture_output=True, check=False)
    return Run(started.workdir, returncode, output, seconds)


def run_workflow(workdir: Path, *args: str, slurm: bool, timeout: int = RUN_TIMEOUT_S) -> Run:
    return finish_workflow(start_workflow(workdir, *args, slurm=slurm, timeout=timeout))


def submitted_jobs(output: str) -> dict[str, int]:
    """SLURM job id -> Snakemake job id, from 'Job N has been submitted with SLURM jobid J' lines."""
    return {
        m.group(2): int(m.group(1)) for m in re.finditer(r"Job (\d+) has been submitted with SLURM jobid (\d+)", output)
    }


def rule_blocks(output: str) -> list[tuple[bool, str]]:
    """(runs locally?, rule name) for every job Snakemake started: its log heads each job with
    'rule X:', 'checkpoint X:', 'localrule X:' or 'localcheckpoint X:'."""
    return [
        (bool(m.group(1)), m.group(2)) for m in re.finditer(r"^(local)?(?:rule|checkpoint) (\w+):$", output, flags=re.M)
    ]


def slurm_job(job_id: str) -> dict[str, str]:
    """scontrol's view of one job (kept by the controller for MinJobAge after the end)."""
    out = subprocess.run(
        ["scontrol", "-d", "-o", "show", "job", job_id], capture_output=True, text=True, check=True
    ).stdout
    info: dict[str, str] = {}
    for field in out.split():
        key, sep, value = field.partition("=")
        # Later tokens can come from free text (the command line); the first occurrence is scontrol's field.
        if sep and key not in info:
            info[key] = value
    return info


def sha256_tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path, tiny_runs: dict[str, Path]) -> dict:
    holder = tmp_path_factory.mktemp("slurm-config")
    config = tiny_config(tiny_base, tiny_runs, holder)
    # Keys tiny_config does not set keep the project's defaults (e.g. evaluation.device/threads).
    defaults = yaml.safe_load((ROOT / "config.yaml").read_text(encoding="utf-8"))
    config["evaluation"] = {**defaults["evaluation"], **config["evaluation"]}
    # one calibrated quantization, so the importance matrix runs as a GPU job too
    config["quantize"]["types"] = [*config["quantize"]["types"], {"type": "Q4_K_M", "imatrix": True}]
    return config


@pytest.fixture(scope="module")
def runs(cluster: None, tmp_path_factory: pytest.TempPathFactory, tiny_cfg: dict) -> dict[str, Run]:
    """The tiny config through SLURM and, at the same time, locally (the SLURM run mostly waits on polls,
    so the local run uses the idle CPU; results must not depend on that)."""
    workdirs = {name: tmp_path_factory.mktemp(name) for name in ("on-slurm", "local")}
    for workdir in workdirs.values():
        write_config(workdir, tiny_cfg)
    started = {name: start_workflow(workdir, slurm=name == "on-slurm") for name, workdir in workdirs.items()}
    done: dict[str, Run] = {}
    while len(done) < len(started):  # collect each run as it ends, so that its time is its own
        for name, s in started.items():
            if name not in done and s.proc.poll() is not None:
                done[name] = finish_workflow(s)
        time.sleep(0.5)
    for name, run in done.items():
        logger.info("workflow %s in %.1fs", name, run.seconds)
    return done


@pytest.fixture(scope="module")
def slurm_run(runs: dict[str, Run]) -> Run:
    assert runs["on-slurm"].returncode == 0, runs["on-slurm"].output[-8000:]
    return runs["on-slurm"]


@pytest.fixture(scope="module")
def local_run(runs: dict[str, Run]) -> Run:
    assert runs["local"].returncode == 0, runs["local"].output[-8000:]
    return runs["local"]


def test_every_remote_job_ran_as_a_completed_slurm_job(slurm_run: Run) -> None:
    blocks = rule_blocks(slurm_run.output)
    remote = [name for local, name in blocks if not local]
    jobs = submitted_jobs(slurm_run.output)
    assert remote, slurm_run.output[-4000:]
    # One SLURM job per non-local job, no more, no fewer.
    assert len(jobs) == len(remote), (remote, jobs)
    ran_rules = []
    for job_id in jobs:
        info = slurm_job(job_id)
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", info
        # The plugin tags each job with its rule: --comment rule_<name>_wildcards_<...>.
        match = re.match(r"rule_(\w+?)(?:_wildcards_.*)?$", info["Comment"])
        assert match, info["Comment"]
        ran_rules.append(match.group(1))
        # SLURM's own log of the job exists and shows Snakemake running that rule inside the job.
        logs = list((slurm_run.workdir / "logs/slurm").rglob(f"{job_id}.log"))
        assert len(logs) == 1, job_id
        assert re.search(rf"^(rule|checkpoint) {match.group(1)}:$", logs[0].read_text(errors="replace"), re.M), logs[0]
    assert sorted(ran_rules) == sorted(remote)
    assert HEAVY_RULES <= set(ran_rules), sorted(ran_rules)


def test_gpu_rules_ran_on_gpu_partition_with_a_gpu(slurm_run: Run) -> None:
    for job_id in submitted_jobs(slurm_run.output):
        info = slurm_job(job_id)
        rule = re.match(r"rule_(\w+?)(?:_wildcards_.*)?$", info["Comment"]).group(1)
        if rule in GPU_RULES:
            assert info["Partition"] == "gpu", (rule, info)
            # Requested (--gpus=1 from profiles/slurm) and allocated (one of the node's fake GPUs).
            assert info.get("TresPerJob") == "gres:gpu:1", (rule, info)
            assert info.get("JOB_GRES", "").startswith("gpu:fake:1"), (rule, info)
        else:
            assert info["Partition"] == "cpu", (rule, info)
            assert info.get("JOB_GRES", "(null)") == "(null)", (rule, info)


def test_memory_request_follows_input_size(slurm_run: Run) -> None:
    """quantize_gguf asks max(2 x input MB, 2000) MB: the floor for the tiny model, proving the expression ran."""
    for job_id in submitted_jobs(slurm_run.output):
        info = slurm_job(job_id)
        if info["Comment"].startswith("rule_quantize_gguf"):
            assert "mem=2000M" in info["TRES"], info["TRES"]
        if info["Comment"].startswith("rule_merge_adapter"):
            assert "mem=4000M" in info["TRES"], info["TRES"]


def test_light_rules_ran_locally(slurm_run: Run) -> None:
    blocks = rule_blocks(slurm_run.output)
    local = {name for is_local, name in blocks if is_local}
    remote = {name for is_local, name in blocks if not is_local}
    assert local == LOCAL_RULES, (
        f"light rules submitted to SLURM: {sorted(LOCAL_RULES - local)}; the Snakefile must list them under "
        f"`localrules:` (local ones seen: {sorted(local)})"
    )
    assert remote == HEAVY_RULES, sorted(remote)


def test_artifacts_identical_to_local_run(slurm_run: Run, local_run: Run) -> None:
    best = json.loads((slurm_run.workdir / "results/model_analysis.json").read_text())["best"]
    on_slurm = sha256_tree(slurm_run.workdir / "models")
    local = sha256_tree(local_run.workdir / "models")
    assert set(on_slurm) == set(local), sorted(set(on_slurm) ^ set(local))
    weights = [n for n in on_slurm if n.endswith((".gguf", ".safetensors"))]
    assert any(n.endswith(".gguf") for n in weights) and any(n.endswith(".safetensors") for n in weights), weights
    # Sidecar reports next to GGUF files: the quantizer's (merged model and base) and the adapter's.
    sidecars = [n for n in on_slurm if n.endswith(".json") and re.match(r"[^/]+-(gguf|lora)/", n.removeprefix("bases/"))]
    # Model files (weights, tokenizer, configs, Modelfile): byte for byte.
    for name in on_slurm:
        if name not in sidecars:
            assert on_slurm[name] == local[name], name
    # JSON reports (sidecars, results/<model>/*.json) also record how long a step took and how much
    # memory it used; everything else in them must match.
    reports = [f"models/{n}" for n in sidecars]
    reports += [f"results/{best}/{n}" for n in ("merge_report.json", "merged_model_test.json", "compare_models.json")]
    for rel in reports:
        a = json.loads((slurm_run.workdir / rel).read_text())
        b = json.loads((local_run.workdir / rel).read_text())
        assert _stable(a) == _stable(b), rel


# Keys of our reports that hold measurements of time, memory or machine load: they differ between any two runs.
VOLATILE = re.compile(r"(_s$|seconds|timing|latency|time_to|tokens_per_s|rss|peak|memory|timestamp|load_average)", re.I)


def _stable(obj: object) -> object:
    if isinstance(obj, dict):
        # The sha256 of another JSON report (e.g. compare_models citing a quantizer sidecar) hashes its timings too.
        cites_report = str(obj.get("path", "")).endswith(".json")
        return {
            k: _stable(v) for k, v in obj.items() if not VOLATILE.search(k) and not (cites_report and k == "sha256")
        }
    if isinstance(obj, list):
        return [_stable(v) for v in obj]
    return obj


def test_failing_job_fails_the_run_without_hanging(slurm_run: Run, tiny_cfg: dict, tmp_path: Path) -> None:
    workdir = tmp_path / "broken"
    shutil.copytree(slurm_run.workdir, workdir, symlinks=True)
    best = json.loads((workdir / "results/model_analysis.json").read_text())["best"]
    f16 = workdir / f"models/{best}-merged-gguf/model.gguf"
    # A corrupt F16 GGUF: newer than the quantized files, so quantize_gguf reruns and must fail on it.
    f16.write_bytes(b"this is not a GGUF file\n")
    run = run_workflow(workdir, slurm=True, timeout=600)
    logger.info("failing run through SLURM ended in %.1fs", run.seconds)
    assert run.returncode not in (124, 137), "snakemake hung and was killed by timeout:\n" + run.output[-4000:]
    assert run.returncode != 0, run.output[-4000:]
    assert "Error in rule quantize_gguf" in run.output, run.output[-4000:]
    failed = re.findall(r"SLURM-job '(\d+)' failed, SLURM status is: '(\w+)'", run.output)
    assert failed, run.output[-4000:]
    memory: dict[str, list[str]] = {}
    for job_id, state in sorted(failed, key=lambda f: int(f[0])):  # in submission order
        assert state == "FAILED", state
        info = slurm_job(job_id)
        assert info["JobState"] == "FAILED" and info["Comment"].startswith("rule_quantize_gguf"), info
        memory.setdefault(info["Comment"], []).append(re.search(r"mem=(\d+)M", info["TRES"]).group(1))
    # Every quantize job (one per configured type) read the corrupt file and failed; profiles/slurm retried
    # each once with its memory request doubled (`* attempt`). Its `keep-going` is what gives every job that
    # retry: without it, a job whose first failure came in the same status check as another job's second one
    # was never resubmitted.
    assert len(memory) == len(tiny_cfg["quantize"]["types"]), memory
    for comment, mems in memory.items():
        assert mems == ["2000", "4000"], (comment, mems)
    # Nothing downstream of the failure was built or left half-written.
    assert not list(f16.parent.glob(".*tmp*")), list(f16.parent.iterdir())
