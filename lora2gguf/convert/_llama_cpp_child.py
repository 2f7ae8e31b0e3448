"""Runs llama.cpp's ``convert_hf_to_gguf.py`` in a guarded interpreter; started by
:mod:`lora2gguf.convert.external`, never imported.

It runs as a script, not as part of the package, so that the converter's own gguf-py (the one
its code is written against, from the same llama.cpp sources) is the first ``gguf`` on the path.
Before the converter starts:

* transformers cannot run code shipped with a checkpoint: every ``from_pretrained`` of the Auto
  classes gets ``trust_remote_code=False`` (the converter asks for ``True`` when it loads some
  tokenizers), and the two functions that import such code raise instead;
* a byte-level BPE vocabulary whose hash llama.cpp does not know (a retrained or extended one)
  gets the pre-tokenizer name lora2gguf recognised from ``tokenizer.json``'s structure, when the
  parent found one; the converter's own table wins whenever it knows the vocabulary;
* a chat template given with ``--chat-template`` replaces the one the converter found.

Argument: one JSON object (llama_dir, argv, pre_tokenizer, chat_template). The last line on
stdout is ``LORA2GGUF_CHILD {json}``: which gguf-py ran and whether the pre-tokenizer was supplied.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
from typing import Any

STATE: dict[str, Any] = {"pre_tokenizer_supplied": None}


REFUSAL = (
    "this model folder needs Python code shipped with it (auto_map in config.json or tokenizer_config.json) "
    "to be read; lora2gguf never runs a checkpoint's own code"
)


def _refuse_remote_code(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError(REFUSAL)


def _guard_transformers() -> None:
    import transformers
    from transformers import dynamic_module_utils

    # Every path that loads a checkpoint's code ends in these two (module-level lookups).
    dynamic_module_utils.get_cached_module_file = _refuse_remote_code
    dynamic_module_utils.get_class_in_module = _refuse_remote_code
    for name in ("AutoConfig", "AutoTokenizer", "AutoModel", "AutoModelForCausalLM", "AutoProcessor"):
        cls = getattr(transformers, name, None)
        if cls is None:
            continue
        original = cls.from_pretrained.__func__

        def from_pretrained(klass: Any, *args: Any, _original: Any = original, **kwargs: Any) -> Any:
            kwargs["trust_remote_code"] = False
            try:
                return _original(klass, *args, **kwargs)
            except ValueError as exc:
                # transformers' own refusal ends by suggesting trust_remote_code=True: say why not instead
                if "trust_remote_code" in str(exc):
                    raise RuntimeError(REFUSAL) from None
                raise

        cls.from_pretrained = classmethod(from_pretrained)


def _supply_pre_tokenizer(name: str) -> None:
    import conversion.base as base

    original = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self: Any, tokenizer: Any) -> str:
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            STATE["pre_tokenizer_supplied"] = name
            return name

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre


def _carry_chat_template(template: str) -> None:
    import gguf

    original = gguf.SpecialVocab.add_to_gguf

    def add_to_gguf(self: Any, gw: Any, quiet: bool = False) -> None:
        self.chat_template = template
        original(self, gw, quiet=quiet)

    gguf.SpecialVocab.add_to_gguf = add_to_gguf


def main() -> int:
    job = json.loads(sys.argv[1])
    llama_dir = job["llama_dir"]
    os.environ.pop("NO_LOCAL_GGUF", None)
    # As when the converter runs from its own folder: that folder first (conversion/, models/), then
    # its gguf-py; this script's folder (lora2gguf/convert, whose module names are generic) not at all.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [llama_dir, os.path.join(llama_dir, "gguf-py")] + [p for p in sys.path if os.path.abspath(p or ".") != here]
    import gguf

    STATE["gguf_py"] = os.path.dirname(os.path.abspath(gguf.__file__))
    _guard_transformers()
    if job.get("pre_tokenizer"):
        _supply_pre_tokenizer(job["pre_tokenizer"])
    if job.get("chat_template") is not None:
        _carry_chat_template(job["chat_template"])
    script = os.path.join(llama_dir, "convert_hf_to_gguf.py")
    sys.argv = [script, *job["argv"]]
    runpy.run_path(script, run_name="__main__")
    print("LORA2GGUF_CHILD " + json.dumps(STATE), flush=True)
    return 0


if __name__ == "__main__":
    try:
        status = main()
    except SystemExit as exc:  # the converter's own exit after it logged why (an unknown architecture, ...)
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
        status = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    sys.stdout.flush()
    sys.stderr.flush()
    # The file is written and closed; skip the interpreter's teardown of torch (seconds, nothing to save).
    os._exit(status)
