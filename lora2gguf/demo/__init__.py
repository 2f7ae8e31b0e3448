"""The embedded demo: a bilingual counselling dataset, two base models and real LoRA runs on them.

Submodules keep torch/transformers imports inside functions so that importing the package is cheap.
"""
