"""Test prompts, generation and evaluation settings: read, checked and normalised in one place.

They reach the CLI either from the workflow's config file (``--config config.yaml``, keys
``test_prompts``, ``generation``, ``evaluation``) or as explicit values (``--prompts``, ``--generation``):
a JSON/YAML file, or inline JSON text. Snakemake passes inline JSON from ``params`` so that a change of
just these keys, and nothing else in the config, makes the evaluation rules stale.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from lora2gguf.errors import Lora2ggufError

logger = logging.getLogger(__name__)

# How `lora2gguf test` decodes: auto (the fast CUDA-graph path on CUDA, eager elsewhere), eager
# (transformers' generate()), cuda-graph (static KV cache, decode steps replayed as CUDA graphs).
DECODE_CHOICES = ("auto", "eager", "cuda-graph")


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str


@dataclass(frozen=True)
class Generation:
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Evaluation:
    text: Path
    max_tokens: int = 512
    context: int = 512


def _read_structured(value: str, what: str) -> tuple[Any, str]:
    """Inline JSON text, or a .json/.yaml/.yml file. Returns (data, where) for error messages."""
    stripped = value.lstrip()
    if stripped.startswith(("[", "{")):
        try:
            return json.loads(value), f"{what} (inline JSON)"
        except json.JSONDecodeError as exc:
            raise Lora2ggufError(f"{what}: inline JSON is invalid: {exc.msg} at column {exc.colno}") from None
    path = Path(value)
    if not path.is_file():
        raise Lora2ggufError(f"{path}: file not found ({what})")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text), str(path)
        except json.JSONDecodeError as exc:
            raise Lora2ggufError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    try:
        return yaml.safe_load(text), str(path)
    except yaml.YAMLError as exc:
        raise Lora2ggufError(f"{path}: not valid YAML: {exc}") from None


def read_config(path: str | Path) -> dict[str, Any]:
    data, where = _read_structured(str(path), "--config")
    if not isinstance(data, dict):
        raise Lora2ggufError(f"{where}: expected a mapping at the top level")
    return data


def parse_prompts(data: Any, where: str) -> list[Prompt]:
    # A whole config passed as the prompts file is accepted: take its test_prompts key.
    if isinstance(data, dict) and "test_prompts" in data:
        data = data["test_prompts"]
        where = f"{where}: test_prompts"
    if not isinstance(data, list) or not data:
        raise Lora2ggufError(f"{where}: expected a non-empty list of {{id, text}} entries")
    prompts: list[Prompt] = []
    seen: set[str] = set()
    for index, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise Lora2ggufError(f"{where}[{index}]: expected a mapping with keys id and text")
        extra = set(entry) - {"id", "text"}
        if extra:
            raise Lora2ggufError(f"{where}[{index}]: unknown key(s) {sorted(extra)}")
        pid, text = entry.get("id"), entry.get("text")
        if not isinstance(pid, str) or not pid.strip():
            raise Lora2ggufError(f"{where}[{index}].id: expected a non-empty string")
        if not isinstance(text, str) or not text.strip():
            raise Lora2ggufError(f"{where}[{index}].text ({pid}): expected a non-empty string")
        if pid in seen:
            raise Lora2ggufError(f"{where}[{index}].id: duplicate id {pid!r}")
        seen.add(pid)
        prompts.append(Prompt(pid, text))
    return prompts


def parse_generation(data: Any, where: str) -> Generation:
    if isinstance(data, dict) and "generation" in data and isinstance(data["generation"], dict):
        data = data["generation"]
        where = f"{where}: generation"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise Lora2ggufError(f"{where}: expected a mapping")
    allowed = set(Generation.__dataclass_fields__)
    extra = set(data) - allowed
    if extra:
        raise Lora2ggufError(f"{where}: unknown key(s) {sorted(extra)}; allowed: {sorted(allowed)}")
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key == "do_sample":
            if not isinstance(value, bool):
                raise Lora2ggufError(f"{where}.do_sample: expected true or false, got {value!r}")
        elif key in ("max_new_tokens", "seed"):
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if key == "max_new_tokens" else 0):
                raise Lora2ggufError(f"{where}.{key}: expected a {'positive' if key == 'max_new_tokens' else 'non-negative'} integer, got {value!r}")
        else:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise Lora2ggufError(f"{where}.{key}: expected a positive number, got {value!r}")
            if key == "top_p" and value > 1:
                raise Lora2ggufError(f"{where}.top_p: must be in (0, 1], got {value!r}")
            value = float(value)
        values[key] = value
    return Generation(**values)


def parse_evaluation(data: Any, where: str) -> dict[str, Any]:
    if isinstance(data, dict) and "evaluation" in data and isinstance(data["evaluation"], dict):
        data = data["evaluation"]
        where = f"{where}: evaluation"
    if not isinstance(data, dict):
        raise Lora2ggufError(f"{where}: expected a mapping")
    out: dict[str, Any] = {}
    if "text" in data:
        out["text"] = str(data["text"])
    for key in ("max_tokens", "context"):
        if key in data:
            value = data[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 2:
                raise Lora2ggufError(f"{where}.{key}: expected an integer >= 2, got {value!r}")
            out[key] = value
    return out


def resolve_prompts(config: str | None, prompts: str | None) -> list[Prompt]:
    if prompts:
        data, where = _read_structured(prompts, "--prompts")
        return parse_prompts(data, where)
    if config:
        data = read_config(config)
        if "test_prompts" not in data:
            raise Lora2ggufError(f"{config}: key test_prompts is missing (or pass --prompts)")
        return parse_prompts(data["test_prompts"], f"{config}: test_prompts")
    raise Lora2ggufError("no test prompts: pass --prompts FILE|JSON or --config config.yaml")


def resolve_generation(config: str | None, generation: str | None) -> Generation:
    if generation:
        data, where = _read_structured(generation, "--generation")
        return parse_generation(data, where)
    if config:
        data = read_config(config)
        return parse_generation(data.get("generation"), f"{config}: generation")
    logger.info("no generation settings given; using defaults %s", Generation().as_dict())
    return Generation()


def parse_decode(value: Any, where: str) -> str:
    if value not in DECODE_CHOICES:
        raise Lora2ggufError(f"{where}: expected one of {', '.join(DECODE_CHOICES)}, got {value!r}")
    return str(value)


def resolve_decode(config: str | None, decode: str | None) -> str:
    """The inference test's decoding path: ``--decode`` if given, else the config's
    ``evaluation.decode``, else auto."""
    if decode is not None:
        return parse_decode(decode, "--decode")
    if config:
        evaluation = read_config(config).get("evaluation")
        if isinstance(evaluation, dict) and "decode" in evaluation:
            return parse_decode(evaluation["decode"], f"{config}: evaluation.decode")
    return "auto"


def resolve_evaluation(
    config: str | None, text: str | None, max_tokens: int | None, context: int | None
) -> Evaluation:
    values: dict[str, Any] = {}
    if config:
        data = read_config(config)
        if "evaluation" in data:
            values.update(parse_evaluation(data["evaluation"], f"{config}: evaluation"))
    if text:
        values["text"] = text
    if max_tokens is not None:
        values["max_tokens"] = max_tokens
    if context is not None:
        values["context"] = context
    if "text" not in values:
        raise Lora2ggufError("no evaluation text: pass --eval-text FILE or --config with evaluation.text")
    path = Path(values["text"])
    if not path.is_file():
        raise Lora2ggufError(f"{path}: evaluation text not found")
    evaluation = Evaluation(path, int(values.get("max_tokens", 512)), int(values.get("context", 512)))
    if evaluation.max_tokens < 2 or evaluation.context < 2:
        raise Lora2ggufError("--max-tokens and --context must be at least 2")
    return evaluation
