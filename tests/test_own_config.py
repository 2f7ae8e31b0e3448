"""A config file of your own (`snakemake --configfile mine.yaml`) runs exactly its own candidates.

Snakemake merges a --configfile into config.yaml key by key. When config.yaml listed the demo's
runs as candidates, a user's file with two real runs got five candidates after `make demo` (and a
demo model could win the ranking), or, before it, an error about a demo path the user never named.
Here a project folder is set up as a user has it (the project's config.yaml, with or without a built
demo under resources/demo/) and a user's file beside it is run through the workflow.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, run_snakemake
from lora2gguf.demo.dataset import render_text

DEMO_RUNS = ("smollm2-counsel-r8", "smollm2-counsel-r16", "tiny-qwen2-counsel")
# The demo's ranking command, as the workflow ran it when config.yaml listed the demo's candidates.
DEMO_RANK = (
    "lora2gguf rank"
    " --candidate smollm2-counsel-r16 resources/demo/runs/smollm2-counsel-r16 resources/demo/bases/smollm2-135m"
    " --candidate smollm2-counsel-r8 resources/demo/runs/smollm2-counsel-r8 resources/demo/bases/smollm2-135m"
    " --candidate tiny-qwen2-counsel resources/demo/runs/tiny-qwen2-counsel resources/demo/bases/tiny-qwen2"
    " --metric eval_loss --mode min --out results/model_analysis.json"
)


@pytest.fixture(scope="module")
def own_texts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("own-texts")
    (folder / "eval.txt").write_text(render_text("eval"), encoding="utf-8")
    (folder / "train.txt").write_text(render_text("train"), encoding="utf-8")
    return {"evaluation": str(folder / "eval.txt"), "calibration": str(folder / "train.txt")}


def project(workdir: Path, tiny_base: Path, tiny_runs: dict[str, Path], demo_built: bool) -> Path:
    """The project folder as a user has it: config.yaml, and resources/demo/ after `make demo`
    (tiny stand-ins with the demo's names: the ranking only reads their metrics files)."""
    workdir.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "config.yaml", workdir / "config.yaml")
    if demo_built:
        demo = workdir / "resources" / "demo"
        for base in ("smollm2-135m", "tiny-qwen2"):
            shutil.copytree(tiny_base, demo / "bases" / base)
        for name in DEMO_RUNS:
            shutil.copytree(tiny_runs["tiny-b"], demo / "runs" / name)
        (demo / "data").mkdir()
        for split in ("train", "eval"):
            (demo / "data" / f"{split}.txt").write_text(render_text(split), encoding="utf-8")
    return workdir


def own_file(workdir: Path, config: dict, name: str = "mine.yaml") -> Path:
    path = workdir / name
    path.write_text(yaml.safe_dump(config, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def own_config(tiny_base: Path, tiny_runs: dict[str, Path], texts: dict[str, str], demo_key: bool) -> dict:
    """What a user writes: two real runs under names of their own, their texts, the demo off
    (or not mentioned at all)."""
    config: dict = {
        "candidates": {
            f"my-{name[-1]}": {"base": str(tiny_base), "run": str(run)} for name, run in tiny_runs.items()
        },
        "evaluation": {"text": texts["evaluation"]},
        "calibration": {"text": texts["calibration"]},
    }
    if demo_key:
        config["demo"] = {"enabled": False}
    return config


def edited_config_yaml(own: dict) -> dict:
    """The project's config.yaml with ``own`` written into it, section by section."""
    config = yaml.safe_load((ROOT / "config.yaml").read_text(encoding="utf-8"))
    for key, value in own.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict) and key != "candidates":
            config[key].update(value)
        else:
            config[key] = value
    return config


def rank_command(output: str) -> str:
    commands = [line for line in output.splitlines() if "lora2gguf rank " in line]
    assert len(commands) == 1, output[-3000:]
    return re.sub(r"^.*?(lora2gguf rank .*?) > .*$", r"\1", commands[0])


def hashes(*paths: Path) -> dict[str, str]:
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*"))) if f.is_file()]
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


@pytest.mark.parametrize("demo_key", [True, False], ids=["demo-off", "demo-unmentioned"])
@pytest.mark.parametrize("demo_built", [False, True], ids=["before-make-demo", "after-make-demo"])
def test_own_file_ranks_exactly_its_candidates(
    tmp_path: Path, tiny_base: Path, tiny_runs: dict[str, Path], own_texts: dict[str, str],
    demo_built: bool, demo_key: bool,
) -> None:
    workdir = project(tmp_path / "project", tiny_base, tiny_runs, demo_built)
    mine = own_file(workdir, own_config(tiny_base, tiny_runs, own_texts, demo_key))
    inputs = [workdir / "config.yaml", mine, *tiny_runs.values()]
    before = hashes(*inputs)

    plan = run_snakemake(workdir, "-n", "-p", "--configfile", str(mine), timeout=300)
    assert plan.returncode == 0, plan.stderr[-3000:]
    command = rank_command(plan.stdout + plan.stderr)
    assert re.findall(r"--candidate (\S+)", command) == ["my-a", "my-b"], command
    assert "resources/demo" not in plan.stdout + plan.stderr
    assert "build_demo" not in plan.stdout + plan.stderr

    # The target goes before --configfile, which takes any number of files.
    target = "results/model_analysis.json"
    result = run_snakemake(workdir, target, "--cores", "1", "--configfile", str(mine), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    analysis = json.loads((workdir / target).read_text(encoding="utf-8"))
    assert sorted(analysis["candidates"]) == ["my-a", "my-b"]
    assert sorted(analysis["ranking"]) == ["my-a", "my-b"] and analysis["best"] in ("my-a", "my-b")
    assert hashes(*inputs) == before


@pytest.mark.parametrize(
    ("left_out", "expected"),
    [
        ("evaluation", "mine.yaml: evaluation.text: missing; name a held-out text file"),
        ("calibration", "mine.yaml: calibration.text: missing; a quantize.types entry has imatrix: true"),
        ("candidates", "mine.yaml: candidates: none named"),
    ],
)
@pytest.mark.parametrize("demo_built", [False, True], ids=["before-make-demo", "after-make-demo"])
def test_key_only_the_demo_supplied_is_named_when_missing(
    tmp_path: Path, tiny_base: Path, tiny_runs: dict[str, Path], own_texts: dict[str, str],
    demo_built: bool, left_out: str, expected: str,
) -> None:
    """A file of your own that leaves out what only the demo supplied is refused, naming the file
    and the key, instead of running on (or stumbling over) the demo's runs and texts."""
    workdir = project(tmp_path / "project", tiny_base, tiny_runs, demo_built)
    config = own_config(tiny_base, tiny_runs, own_texts, demo_key=True)
    del config[left_out]
    mine = own_file(workdir, config)
    before = hashes(workdir, *tiny_runs.values())

    result = run_snakemake(workdir, "-n", "--configfile", str(mine), timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert expected in output, output[-3000:]
    assert "smollm2" not in output and "resources/demo" not in output, output[-3000:]
    assert not any((workdir / name).exists() for name in ("results", "models", "logs"))
    after = hashes(workdir, *tiny_runs.values())
    assert {k: v for k, v in after.items() if "/.snakemake/" not in k} == before


def test_candidates_in_config_yaml_give_way_to_your_file(
    tmp_path: Path, tiny_base: Path, tiny_runs: dict[str, Path], own_texts: dict[str, str]
) -> None:
    """Candidates written into config.yaml are not added to those of your file: the last file that
    names candidates decides, and the log says which were left out."""
    workdir = project(tmp_path / "project", tiny_base, tiny_runs, demo_built=False)
    edited = edited_config_yaml(own_config(tiny_base, tiny_runs, own_texts, demo_key=True))
    edited["candidates"] = {"old-b": edited["candidates"]["my-b"]}
    own_file(workdir, edited, "config.yaml")
    mine = own_file(workdir, {"candidates": {"my-a": {"base": str(tiny_base), "run": str(tiny_runs["tiny-a"])}}})

    result = run_snakemake(workdir, "-n", "-p", "--configfile", str(mine), timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert re.findall(r"--candidate (\S+)", rank_command(output)) == ["my-a"]
    assert "left out candidates old-b: mine.yaml names its own" in output

    alone = run_snakemake(workdir, "-n", "-p", timeout=300)
    assert re.findall(r"--candidate (\S+)", rank_command(alone.stdout + alone.stderr)) == ["old-b"]


def test_replace_workflow_config_still_uses_your_file_alone(
    tmp_path: Path, tiny_base: Path, tiny_runs: dict[str, Path], own_texts: dict[str, str]
) -> None:
    """The README's other way: a whole config of your own that replaces config.yaml."""
    workdir = project(tmp_path / "project", tiny_base, tiny_runs, demo_built=True)
    mine = own_file(workdir, edited_config_yaml(own_config(tiny_base, tiny_runs, own_texts, demo_key=True)))
    result = run_snakemake(workdir, "-n", "-p", "--configfile", str(mine), "--replace-workflow-config", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.findall(r"--candidate (\S+)", rank_command(result.stdout + result.stderr)) == ["my-a", "my-b"]


def test_default_config_still_plans_the_demo_as_before(tmp_path: Path) -> None:
    """config.yaml alone: the demo supplies its three runs, its eval and training texts, with the
    same names, paths and commands as when config.yaml listed them."""
    workdir = tmp_path / "project"
    workdir.mkdir()
    shutil.copy(ROOT / "config.yaml", workdir / "config.yaml")
    target = "results/smollm2-counsel-r8/manifest.json"
    result = run_snakemake(workdir, "-n", "-p", "-F", target, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert rank_command(output) == DEMO_RANK
    assert "--eval-text resources/demo/data/eval.txt" in output
    assert "lora2gguf imatrix --model models/smollm2-counsel-r8-merged --text resources/demo/data/train.txt" in output
    manifest = next(line for line in output.splitlines() if "lora2gguf manifest " in line)
    for part in (
        '"candidate": {"base": "resources/demo/bases/smollm2-135m", "name": "smollm2-counsel-r8", '
        '"run": "resources/demo/runs/smollm2-counsel-r8"}',
        '"text": "resources/demo/data/eval.txt"',
        '"text": "resources/demo/data/train.txt"',
    ):
        assert part in manifest, manifest
