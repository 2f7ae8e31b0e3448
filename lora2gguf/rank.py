"""Rank LoRA candidate runs from their trainer outputs and pick the best one."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora2gguf import qlora
from lora2gguf.artifacts import Output, check_paths, read_json, sha256_file, write_json
from lora2gguf.errors import Lora2ggufError
from lora2gguf.provenance import build_report

logger = logging.getLogger(__name__)

REPORT_KIND = "model_analysis"

# Where LLaMA-Factory / the HF Trainer put their numbers, in the order we trust them:
# the dedicated split file first, the merged summary next, the step log last.
METRIC_FILES = ("eval_results.json", "all_results.json", "train_results.json")
STATE_FILE = "trainer_state.json"
ADAPTER_CONFIG = "adapter_config.json"
# Where a run may record that it trained on a quantized base (QLoRA): read for trained_on.
TRAINING_RECORDS = qlora.RECORD_FILES

# Recorded for every candidate when present; only the selection metric is required.
RECORDED_KEYS = (
    "eval_loss",
    "eval_samples_per_second",
    "eval_runtime",
    "train_loss",
    "epoch",
)

TIE_RULE = (
    "candidates whose metric values are exactly equal keep the order of their names "
    "(Unicode code-point order), so the same inputs always give the same ranking"
)


@dataclass
class Candidate:
    name: str
    run_dir: Path
    base_dir: Path | None = None
    values: dict[str, float | int | None] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    lora: dict[str, Any] = field(default_factory=dict)
    curves: dict[str, list[list[float]]] = field(default_factory=dict)
    input_sha256: dict[str, str] = field(default_factory=dict)
    trained_on: dict[str, Any] = field(default_factory=dict)


def _as_number(value: Any, path: Path, key: str) -> float:
    # bool is an int subclass in Python, and a "true" loss is a corrupted file, not a number.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Lora2ggufError(f"{path}: key '{key}' is not a number (got {value!r})")
    if not math.isfinite(value):
        raise Lora2ggufError(f"{path}: key '{key}' is {value} (not a finite number)")
    return value


def _read_object(path: Path) -> dict[str, Any]:
    data = read_json(path)
    if not isinstance(data, dict):
        raise Lora2ggufError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_curves(state: dict[str, Any], path: Path) -> dict[str, list[list[float]]]:
    history = state.get("log_history", [])
    if not isinstance(history, list):
        raise Lora2ggufError(f"{path}: key 'log_history' is not a list")
    curves: dict[str, list[list[float]]] = {"loss": [], "eval_loss": []}
    for entry in history:
        if not isinstance(entry, dict) or "step" not in entry:
            continue
        for key in curves:
            if key in entry:
                step = _as_number(entry["step"], path, "log_history[].step")
                curves[key].append([step, _as_number(entry[key], path, f"log_history[].{key}")])
    return curves


def _read_metric_files(candidate: Candidate, metric: str) -> None:
    """Fill the recorded keys from the first metrics file that has each."""
    for filename in METRIC_FILES:
        path = candidate.run_dir / filename
        if not path.is_file():
            continue
        data = _read_object(path)
        for key in (*RECORDED_KEYS, metric):
            if key in data and key not in candidate.values:
                candidate.values[key] = _as_number(data[key], path, key)
                candidate.sources[key] = filename


def _read_trainer_state(candidate: Candidate, metric: str) -> None:
    """Training curves, the step count and, as a last resort, the metric from the step log."""
    state_path = candidate.run_dir / STATE_FILE
    if not state_path.is_file():
        return
    state = _read_object(state_path)
    candidate.curves = _read_curves(state, state_path)
    if "global_step" in state:
        candidate.values["global_step"] = int(_as_number(state["global_step"], state_path, "global_step"))
        candidate.sources["global_step"] = STATE_FILE
    # A run that stopped before writing its results still logged its evaluations.
    evaluations = [e for e in state.get("log_history", []) if isinstance(e, dict) and metric in e]
    if metric not in candidate.values and evaluations:
        candidate.values[metric] = _as_number(evaluations[-1][metric], state_path, metric)
        candidate.sources[metric] = f"{STATE_FILE}:log_history[-1]"


def _read_adapter_config(candidate: Candidate) -> None:
    adapter_path = candidate.run_dir / ADAPTER_CONFIG
    if not adapter_path.is_file():
        raise Lora2ggufError(
            f"{adapter_path}: file not found (candidate '{candidate.name}' is not a LoRA run folder)"
        )
    adapter = _read_object(adapter_path)
    candidate.input_sha256[ADAPTER_CONFIG] = sha256_file(adapter_path)
    candidate.lora = {
        "peft_type": adapter.get("peft_type"),
        "r": adapter.get("r"),
        "lora_alpha": adapter.get("lora_alpha"),
        "target_modules": adapter.get("target_modules"),
        "use_rslora": adapter.get("use_rslora", False),
        "use_dora": adapter.get("use_dora", False),
        "base_model_name_or_path": adapter.get("base_model_name_or_path"),
    }


def _read_trained_on(candidate: Candidate, override: str | None) -> None:
    """How the run was trained (float or a bitsandbytes base: QLoRA), and from which record."""
    where = f"candidates.{candidate.name}.trained_on"
    trained = qlora.read_trained_on(candidate.run_dir, override, candidate.base_dir, where)
    candidate.trained_on = trained.as_dict()
    for name in TRAINING_RECORDS:
        if (candidate.run_dir / name).is_file():
            candidate.input_sha256[name] = sha256_file(candidate.run_dir / name)


def read_candidate(
    name: str, run_dir: Path, base_dir: Path | None, metric: str, trained_on: str | None = None
) -> Candidate:
    """Collect one run's numbers, remembering which file each came from. ``trained_on`` is the config's
    candidates.<name>.trained_on (None: what the run folder records)."""
    if not run_dir.is_dir():
        raise Lora2ggufError(f"{run_dir}: candidate '{name}' run folder does not exist")
    candidate = Candidate(name=name, run_dir=run_dir, base_dir=base_dir)
    found = [run_dir / f for f in (*METRIC_FILES, STATE_FILE) if (run_dir / f).is_file()]
    if not found:
        raise Lora2ggufError(
            f"{run_dir}: candidate '{name}' has no metrics file "
            f"(looked for {', '.join((*METRIC_FILES, STATE_FILE))})"
        )
    for path in found:
        candidate.input_sha256[path.name] = sha256_file(path)
    _read_metric_files(candidate, metric)
    _read_trainer_state(candidate, metric)
    if metric not in candidate.values:
        raise Lora2ggufError(
            f"{run_dir}: candidate '{name}' records no '{metric}' "
            f"(looked in {', '.join(p.name for p in found)})"
        )
    _read_adapter_config(candidate)
    _read_trained_on(candidate, trained_on)
    return candidate


def _format_margin(delta: float, relative: float | None) -> str:
    if delta == 0:
        return "best"
    rel = "n/a" if relative is None else f"{relative:.2f}%"
    return f"{abs(delta):.6f} {'higher' if delta > 0 else 'lower'} ({rel})"


def _entry(position: int, cand: Candidate, metric: str, best_value: float) -> dict[str, Any]:
    """One candidate of model_analysis.json: its numbers, where they came from, its margin to the best."""
    value = float(cand.values[metric])
    delta = value - best_value
    relative = None if best_value == 0 else 100.0 * delta / abs(best_value)
    return {
        "rank": position,
        "run_dir": str(cand.run_dir),
        "base_dir": None if cand.base_dir is None else str(cand.base_dir),
        "metrics": cand.values,
        "sources": cand.sources,
        "lora": cand.lora,
        "trained_on": cand.trained_on,
        "margin_to_best": {
            "absolute": delta,
            "relative_percent": relative,
            "text": _format_margin(delta, relative),
        },
        "curves": cand.curves,
        "input_sha256": cand.input_sha256,
    }


def rank(candidates: list[Candidate], metric: str, mode: str) -> dict[str, Any]:
    """Order candidates by ``metric`` (``min`` or ``max``) and describe every margin to the best:
    the model_analysis.json report."""
    if not candidates:
        raise Lora2ggufError("no candidates to rank")
    if mode not in ("min", "max"):
        raise Lora2ggufError(f"selection mode must be 'min' or 'max', got {mode!r}")
    sign = 1.0 if mode == "min" else -1.0
    ordered = sorted(candidates, key=lambda c: (sign * float(c.values[metric]), c.name))
    best = ordered[0]
    best_value = float(best.values[metric])
    entries = {
        cand.name: _entry(position, cand, metric, best_value) for position, cand in enumerate(ordered, start=1)
    }
    body = {
        "metric": metric,
        "mode": mode,
        "best": best.name,
        "ranking": [c.name for c in ordered],
        "tie_rule": TIE_RULE,
        "candidates": entries,
    }
    return build_report(REPORT_KIND, body)


def _warn_on_base_mismatch(cand: Candidate) -> None:
    recorded = cand.lora.get("base_model_name_or_path")
    if cand.base_dir is None or not recorded:
        return
    if Path(str(recorded)).name != cand.base_dir.name and Path(str(recorded)) != cand.base_dir:
        logger.warning(
            "candidate '%s': adapter was trained on '%s' but is configured with base '%s'",
            cand.name,
            recorded,
            cand.base_dir,
        )


@dataclass
class RankOptions:
    """What ``lora2gguf rank`` was asked: (name, run folder, base folder) per candidate."""

    candidates: list[tuple[str, Path, Path]]
    metric: str
    mode: str
    out: Path
    # name -> the config's candidates.<name>.trained_on (float, nf4, fp4, int8); absent: read the run folder
    trained_on: dict[str, str] = field(default_factory=dict)


def _check_paths(options: RankOptions) -> None:
    """model_analysis.json must not overwrite or land inside a run or base folder, nor be a folder."""
    inputs = []
    for name, run_dir, base_dir in options.candidates:
        inputs += [(f"RUN_DIR of {name}", run_dir), (f"BASE_DIR of {name}", base_dir)]
    check_paths(inputs, [Output("--out", options.out)])


def rank_candidates(options: RankOptions) -> dict[str, Any]:
    """Read every candidate, rank them, write model_analysis.json and log the table."""
    _check_paths(options)
    unknown = sorted(set(options.trained_on) - {name for name, _, _ in options.candidates})
    if unknown:
        raise Lora2ggufError(f"--trained-on names {', '.join(unknown)}, which is no --candidate")
    candidates = []
    for name, run_dir, base_dir in options.candidates:
        cand = read_candidate(name, run_dir, base_dir, options.metric, options.trained_on.get(name))
        _warn_on_base_mismatch(cand)
        candidates.append(cand)
    names = [c.name for c in candidates]
    if len(set(names)) != len(names):
        raise Lora2ggufError(f"candidate names must be unique, got {names}")
    analysis = rank(candidates, options.metric, options.mode)
    write_json(options.out, analysis)
    for name in analysis["ranking"]:
        entry = analysis["candidates"][name]
        logger.info(
            "%d. %-30s %s=%.6f  %s  (trained on %s)",
            entry["rank"],
            name,
            options.metric,
            entry["metrics"][options.metric],
            entry["margin_to_best"]["text"],
            entry["trained_on"]["kind"],
        )
    logger.info("best candidate: %s -> %s", analysis["best"], options.out)
    return analysis
