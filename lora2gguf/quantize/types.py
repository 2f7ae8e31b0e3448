"""Quantization file types we support, and their file-name tags.

Pure data and pure functions (no numpy, no gguf) so that ``rules/common.smk`` can import them
to map the ``{q}`` wildcard of ``model-{q}.gguf`` back to a type.
"""

from __future__ import annotations

from dataclasses import dataclass

from lora2gguf.errors import Lora2ggufError


@dataclass(frozen=True)
class FileType:
    """One ``llama-quantize`` file type ("mostly Q4_K_M")."""

    name: str  # as llama-quantize spells it: Q4_K_M
    llama_ftype: (
        int  # value of llama.cpp's enum llama_ftype (gguf.LlamaFileType), stored as general.file_type
    )
    default_tensor_type: str  # ggml type of an ordinary weight matrix (gguf.GGMLQuantizationType name)


# Values of llama.cpp's llama_ftype enum (include/llama.h); they are written to general.file_type.
_FILE_TYPES: tuple[FileType, ...] = (
    FileType("Q8_0", 7, "Q8_0"),
    FileType("Q4_0", 2, "Q4_0"),
    FileType("Q4_1", 3, "Q4_1"),
    FileType("Q5_0", 8, "Q5_0"),
    FileType("Q5_1", 9, "Q5_1"),
    FileType("Q4_K_S", 14, "Q4_K"),
    FileType("Q4_K_M", 15, "Q4_K"),
    FileType("Q5_K_S", 16, "Q5_K"),
    FileType("Q5_K_M", 17, "Q5_K"),
    FileType("Q6_K", 18, "Q6_K"),
    FileType("Q2_K", 10, "Q2_K"),
    FileType("Q3_K_S", 11, "Q3_K"),
    FileType("Q3_K_M", 12, "Q3_K"),
    FileType("Q3_K_L", 13, "Q3_K"),
    FileType("IQ4_NL", 25, "IQ4_NL"),
    FileType("IQ4_XS", 30, "IQ4_XS"),
    # importance-matrix-only families (llama.cpp refuses them without --imatrix)
    FileType("IQ2_XXS", 19, "IQ2_XXS"),
    FileType("IQ2_XS", 20, "IQ2_XS"),
    FileType("IQ2_S", 28, "IQ2_XS"),
    FileType("IQ2_M", 29, "IQ2_S"),
    FileType("IQ3_XXS", 23, "IQ3_XXS"),
    FileType("IQ3_S", 26, "IQ3_S"),
    FileType("IQ3_M", 27, "IQ3_S"),
    FileType("IQ1_S", 24, "IQ1_S"),
    FileType("IQ1_M", 31, "IQ1_M"),
)

FILE_TYPES: dict[str, FileType] = {ft.name: ft for ft in _FILE_TYPES}
SUPPORTED: tuple[str, ...] = tuple(FILE_TYPES)
# File types llama-quantize refuses without --imatrix (their recipe puts IQ1_S / IQ1_M / IQ2_XXS /
# IQ2_XS / IQ2_S / IQ3_XXS tensors in the layers: llama.cpp's tensor_requires_imatrix). IQ3_S and
# IQ3_M do not need one.
NEEDS_IMATRIX: tuple[str, ...] = ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ1_S", "IQ1_M")

# Tensor types a user may force with --output-tensor-type / --token-embedding-type: every type we can write.
TENSOR_TYPES: tuple[str, ...] = (
    "F32", "F16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS",
    "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M",
)


def canonical_type(name: str) -> str:
    """``q4_k_m`` / ``Q4_K_M`` / file tag ``q4_km`` -> ``Q4_K_M``; unknown names fail with the supported list."""
    upper = str(name).strip().upper()
    if upper not in FILE_TYPES:
        for known in FILE_TYPES:
            if _tag(known) == upper.lower():
                return known
        raise Lora2ggufError(
            f"quantization type {name!r} is not supported; supported types: {', '.join(SUPPORTED)}"
        )
    return upper


def _tag(known: str) -> str:
    return known.lower().replace("_k_m", "_km").replace("_k_s", "_ks").replace("_k_l", "_kl")


def file_tag(type_name: str) -> str:
    """File-name tag of a type, as the export guide names files: Q4_K_M -> q4_km, Q3_K_L -> q3_kl,
    Q8_0 -> q8_0, Q6_K -> q6_k, IQ4_XS -> iq4_xs."""
    return _tag(canonical_type(type_name))


def type_from_tag(tag: str) -> str:
    """Inverse of :func:`file_tag`: q4_km -> Q4_K_M."""
    for name in SUPPORTED:
        if file_tag(name) == tag:
            return name
    raise Lora2ggufError(
        f"file tag {tag!r} names no quantization type; known tags: "
        + ", ".join(f"{file_tag(n)} ({n})" for n in SUPPORTED)
    )


# File tag suffix of a file quantized with an importance matrix: model-q4_km-imat.gguf.
IMATRIX_SUFFIX = "-imat"


def quant_file_tag(type_name: str, imatrix: bool = False) -> str:
    """File-name tag of a configured quantization: Q4_K_M -> q4_km, with an imatrix q4_km-imat."""
    return file_tag(type_name) + (IMATRIX_SUFFIX if imatrix else "")


def split_quant_tag(tag: str) -> tuple[str, bool]:
    """Inverse of :func:`quant_file_tag`: q4_km-imat -> ("Q4_K_M", True)."""
    if tag.endswith(IMATRIX_SUFFIX):
        return type_from_tag(tag[: -len(IMATRIX_SUFFIX)]), True
    return type_from_tag(tag), False
