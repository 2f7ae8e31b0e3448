"""The architecture's hyperparameters and q/k layout as llama.cpp's converter writes them into a GGUF."""

from __future__ import annotations

import gguf

# permute_qk lives in the base (lora2gguf.archs) since the adapter export needs it too; re-exported here.
from lora2gguf.archs import ArchSpec, HParams, permute_qk

__all__ = ["permute_qk", "write_arch_extras", "write_generic_hparams", "write_hparams"]


def write_hparams(writer: gguf.GGUFWriter, spec: ArchSpec, hp: HParams) -> None:
    """The architecture's hyperparameter keys, in the order llama.cpp's converter writes them."""
    if spec.write_hparams is not None:
        spec.write_hparams(writer, hp)
    else:
        write_generic_hparams(writer, hp)


def write_generic_hparams(writer: gguf.GGUFWriter, hp: HParams) -> None:
    """What llama.cpp's TextModel.set_gguf_parameters writes for a plain decoder."""
    writer.add_block_count(hp.block_count)
    writer.add_context_length(hp.context_length)
    writer.add_embedding_length(hp.embedding_length)
    writer.add_feed_forward_length(hp.feed_forward_length)
    writer.add_head_count(hp.head_count)
    if hp.head_count_kv is not None:
        writer.add_head_count_kv(hp.head_count_kv)
    rope_type = hp.rope_scaling.get("rope_type")
    factor = hp.rope_scaling.get("factor")
    if rope_type == "linear" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(factor))
    elif rope_type == "yarn" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(factor))
        writer.add_rope_scaling_orig_ctx_len(int(hp.rope_scaling["original_max_position_embeddings"]))
        for key, add in (
            ("extrapolation_factor", writer.add_rope_scaling_yarn_ext_factor),
            ("attention_factor", writer.add_rope_scaling_yarn_attn_factor),
            ("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
            ("beta_slow", writer.add_rope_scaling_yarn_beta_slow),
        ):
            if hp.rope_scaling.get(key) is not None:
                add(float(hp.rope_scaling[key]))
    if hp.rope_theta is not None:
        writer.add_rope_freq_base(hp.rope_theta)
    if hp.rope_theta_swa is not None:
        writer.add_rope_freq_base_swa(hp.rope_theta_swa)
    writer.add_layer_norm_rms_eps(hp.rms_eps)
    if hp.head_dim is not None:
        writer.add_key_length(hp.head_dim)
        writer.add_value_length(hp.head_dim)


def write_arch_extras(writer: gguf.GGUFWriter, spec: ArchSpec, hp: HParams) -> None:
    """Keys only some architectures carry (written after general.file_type, like llama.cpp does)."""
    if spec.write_vocab_size:
        writer.add_vocab_size(hp.vocab_size)
    if spec.write_rope_dimension_count:
        writer.add_rope_dimension_count(hp.n_embd_head)
    if spec.write_extras is not None:
        spec.write_extras(writer, hp)
