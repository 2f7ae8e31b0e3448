"""The config is checked against schemas/config.schema.yaml before any job runs."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, run_snakemake, write_config

BASE = yaml.safe_load((ROOT / "config.yaml").read_text(encoding="utf-8"))


def broken(change: str) -> dict:
    config = copy.deepcopy(BASE)
    config["demo"]["enabled"] = False
    if change == "unknown_key":
        config["quantize"]["bits"] = 4
    elif change == "wrong_type":
        config["generation"]["max_new_tokens"] = "many"
    elif change == "unknown_quant_type":
        config["quantize"]["types"] = ["Q4_K_M", "Q3_XL"]
    elif change == "missing_section":
        del config["selection"]
    elif change == "missing_path":
        # The demo's paths written into the config as your own: nothing builds them once the demo is off.
        config["candidates"] = {
            name: {"base": run["base"], "run": f"resources/demo/runs/{name}"}
            for name, run in config["demo"]["runs"].items()
        }
        config["evaluation"]["text"] = "resources/demo/data/eval.txt"
        config["calibration"]["text"] = "resources/demo/data/train.txt"
    elif change == "imatrix_only_type_plain":
        config["demo"]["enabled"] = True
        config["quantize"]["types"] = ["Q4_K_M", {"type": "IQ2_XS", "imatrix": True}, "IQ1_M"]
    elif change == "deploy_file_not_built":
        config["demo"]["enabled"] = True
        config["deploy"]["file"] = "Q6_K"
    elif change == "training_template_missing":
        # paths that exist in the work folder, so that only the template is missing
        config["candidates"] = {"mine": {"base": ".", "run": ".", "training_template": "nope.jinja"}}
        config["evaluation"]["text"] = "config.yaml"
        config["quantize"]["types"] = ["Q4_K_M"]
    return config


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ("unknown_key", "'bits' was unexpected"),
        ("wrong_type", "max_new_tokens"),
        ("unknown_quant_type", "Q3_XL"),
        ("missing_section", "'selection' is a required property"),
        ("missing_path", "candidates.smollm2-counsel-r8.base: path 'resources/demo/bases/smollm2-135m' does not exist"),
        ("deploy_file_not_built", "config.yaml: deploy.file: Q6_K is not among quantize.types"),
        ("imatrix_only_type_plain", "quantize.types: IQ1_M needs an importance matrix"),
        ("training_template_missing", "candidates.mine.training_template: path 'nope.jinja' is not a file"),
    ],
)
def test_bad_config_is_refused_naming_the_key(tmp_path: Path, change: str, expected: str) -> None:
    write_config(tmp_path, broken(change))
    result = run_snakemake(tmp_path, "-n", timeout=300)
    assert result.returncode != 0
    assert expected in result.stdout + result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "results").exists()


def test_default_config_is_valid(tmp_path: Path) -> None:
    write_config(tmp_path, BASE)
    result = run_snakemake(tmp_path, "-n", "--quiet", "rules", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
