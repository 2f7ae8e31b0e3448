"""Build the benchmark inputs: a randomly initialised model of Qwen2-0.5B's exact architecture and a
rank-8 LoRA run on every linear layer of every block, in LLaMA-Factory's output layout.

Shape (Qwen2-0.5B's config.json): hidden 896, 24 layers, 14 query / 2 KV heads (head dim 64),
ffn 4864, vocabulary 151,936 rows, tied embeddings, q/k/v biases, RMSNorm eps 1e-6, rope theta 1e6,
``Qwen2ForCausalLM``, bf16 weights as Qwen2-0.5B ships them: 494 M parameters.

The tokenizer is the demo's tiny byte-level BPE (Qwen2's pre-tokenizer and ChatML template) with the
embedding matrix padded to 151,936 rows, as Qwen2 itself pads 151,665 tokens to 151,936: the weight
work of every step is that of the real model; only the vocabulary metadata is smaller. The adapter's
B matrices are random (not zero, as a fresh LoRA would be), so the merge really changes every
targeted weight. Nothing is trained: the run's metrics files say so.

    .venv/bin/python benchmarks/build_model.py OUT_DIR [--seed 0] [--dtype bfloat16]

writes OUT_DIR/base/ (HF folder) and OUT_DIR/run/ (adapter_config.json, adapter_model.safetensors,
tokenizer files, all_results.json, eval_results.json, train_results.json, trainer_state.json).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lora2gguf.artifacts import atomic_dir  # noqa: E402
from lora2gguf.demo.tiny import ENDOFTEXT, IM_END, IM_START, build_tiny_qwen2  # noqa: E402

logger = logging.getLogger("benchmarks.build_model")

# Qwen2-0.5B's config.json values (architecture only; the weights are random).
QWEN2_0_5B = {
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1_000_000.0,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
    "use_sliding_window": False,
    "initializer_range": 0.02,
}
# Only for checking the benchmark scripts themselves in seconds (--shape smoke); never for figures.
SMOKE = {**QWEN2_0_5B, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 2048}
SHAPES = {"qwen2-0.5b": QWEN2_0_5B, "smoke": SMOKE}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_R = 8
LORA_ALPHA = 16
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
BASE_NAME = "bench/qwen2-0.5b-shaped-random"


def _tokenizer_files(dest: Path) -> dict[str, int]:
    """Write the demo's tiny Qwen2-style tokenizer into ``dest``; return its special token ids."""
    with tempfile.TemporaryDirectory() as tmp:
        tiny = build_tiny_qwen2(Path(tmp) / "tiny")
        for name in TOKENIZER_FILES:
            shutil.copy2(tiny / name, dest / name)
    vocab = json.loads((dest / "tokenizer.json").read_text(encoding="utf-8"))
    ids = {t["content"]: t["id"] for t in vocab["added_tokens"]}
    return {"endoftext": ids[ENDOFTEXT], "im_start": ids[IM_START], "im_end": ids[IM_END]}


def build_base(out: Path, seed: int = 0, dtype: str = "bfloat16", shape: str = "qwen2-0.5b") -> Path:
    """Random Qwen2-0.5B-shaped model at ``out`` (replaced atomically)."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    with atomic_dir(out) as tmp:
        ids = _tokenizer_files(tmp)
        config = Qwen2Config(
            **SHAPES[shape],
            bos_token_id=ids["endoftext"],
            eos_token_id=ids["im_end"],
            pad_token_id=ids["endoftext"],
        )
        torch_dtype = getattr(torch, dtype)
        state = torch.random.get_rng_state()
        previous = torch.get_default_dtype()
        try:
            torch.manual_seed(seed)
            # Initialised directly in the target dtype: an fp32 copy first would double the peak (2 GB).
            torch.set_default_dtype(torch_dtype)
            model = Qwen2ForCausalLM(config).eval()
        finally:
            torch.set_default_dtype(previous)
            torch.random.set_rng_state(state)
        model.generation_config = GenerationConfig(
            bos_token_id=ids["endoftext"],
            eos_token_id=[ids["im_end"], ids["endoftext"]],
            pad_token_id=ids["endoftext"],
            do_sample=False,
        )
        model.save_pretrained(tmp, safe_serialization=True)
        n_params = sum(p.numel() for p in model.parameters())
    logger.info("base: %d parameters (%s), written to %s", n_params, dtype, out)
    return out


def _results_files(folder: Path, seed: int) -> None:
    """The metrics files LLaMA-Factory writes beside the adapter (ranking reads them); marked untrained."""
    note = "benchmark input: random LoRA weights, not trained (benchmarks/build_model.py)"
    train = {"epoch": 0.0, "train_loss": None, "note": note}
    evaluation = {"epoch": 0.0, "eval_loss": 10.0, "note": note}
    (folder / "train_results.json").write_text(json.dumps(train, indent=2) + "\n", encoding="utf-8")
    (folder / "eval_results.json").write_text(json.dumps(evaluation, indent=2) + "\n", encoding="utf-8")
    (folder / "all_results.json").write_text(json.dumps({**train, **evaluation}, indent=2) + "\n", encoding="utf-8")
    state = {"global_step": 0, "epoch": 0.0, "log_history": [], "seed": seed, "note": note}
    (folder / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")


def build_run(base: Path, out: Path, seed: int = 0) -> Path:
    """Rank-8 LoRA (alpha 16) on every linear layer of every block, saved as LLaMA-Factory does."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, local_files_only=True)  # its own dtype (bf16)
    config = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=list(LORA_TARGETS),
                        bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    model.peft_config["default"].base_model_name_or_path = BASE_NAME
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            # peft leaves B at zero (a no-op adapter); a trained one is not, so B gets values of the
            # size a short fine-tune reaches, and the merge changes every targeted weight.
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator, dtype=torch.float32) * 0.01)
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        cfg_path = tmp / "adapter_config.json"
        cfg: dict[str, Any] = json.loads(cfg_path.read_text(encoding="utf-8"))
        cfg["target_modules"] = sorted(cfg["target_modules"])
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        for name in TOKENIZER_FILES:
            shutil.copy2(base / name, tmp / name)
        _results_files(tmp, seed)
    logger.info("run: LoRA r=%d on %s, %d adapter parameters, written to %s", LORA_R, ",".join(LORA_TARGETS), lora, out)
    return out


def build(out_dir: Path, seed: int = 0, dtype: str = "bfloat16", shape: str = "qwen2-0.5b") -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = build_base(out_dir / "base", seed, dtype, shape)
    run = build_run(base, out_dir / "run", seed)
    return base, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder to write base/ and run/ into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--shape", default="qwen2-0.5b", choices=sorted(SHAPES),
                        help="smoke: a small model for checking the scripts, not for figures")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # peft looks the recorded base name up on the hub otherwise
    build(args.out, args.seed, args.dtype, args.shape)
    return 0


if __name__ == "__main__":
    sys.exit(main())
