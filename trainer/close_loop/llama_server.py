"""llama-cpp-python's OpenAI-compatible server as ``tier3 serve`` runs it (internal: started by
:class:`trainer.close_loop.serve.LlamaServer` as ``python -m trainer.close_loop.llama_server --config_file F``).

It is ``python -m llama_cpp.server`` with three changes, each made by a named function before the server module
builds its routes:

- :func:`no_weight_repacking`: llama.cpp's "extra buffer types" (weight repacking) off. A build with
  ``-march=native`` (pip's default for the sdist) on a CPU with AMX (Sapphire Rapids and later) puts quantised
  weights (q8_0, Q4_1, ...) in ggml's AMX buffer, and ``ggml_backend_amx_mul_mat`` dies with SIGSEGV on its first
  ``ldtilecfg`` in a KVM guest that does not grant the AMX tile state: every prompt of a quantised model crashed the
  server, f16 models ran. Without repacking the same build runs the plain CPU kernels (same outputs).
  llama-cpp-python builds ``llama_model_params`` from ``llama_model_default_params()`` and exposes no option for
  this field, so that function is wrapped.
- :func:`greedy_by_default`: a request's ``repeat_penalty`` defaults to 1.0 (no penalty) instead of 1.1.
  llama-cpp-python applies it *before* greedy selection, so a request with ``temperature`` 0 that names no
  ``repeat_penalty`` (the router's, the served evaluation's) was not the greedy decoding of transformers: on
  SmolLM2-135M the f16 GGUF matched PyTorch on 0/10 holdout prompts with the default and 10/10 with 1.0
  (``parity.py``). A request naming a ``repeat_penalty`` still gets it.
- :func:`message_text_as_text`: every model the server loads gets :func:`trainer.chat_tokens.content_as_text`
  around its chat handler, so special-token strings in message content are tokenized as plain text; only the
  chat template inserts special tokens (the ids the trainer trained on).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any


def no_weight_repacking() -> None:
    import llama_cpp.llama_cpp as c

    defaults = c.llama_model_default_params
    if getattr(defaults, "_tier3", False):
        return

    def params() -> Any:
        p = defaults()
        p.use_extra_bufts = False
        return p

    params._tier3 = True  # type: ignore[attr-defined]
    c.llama_model_default_params = params


def greedy_by_default() -> None:
    import llama_cpp.server.types as t

    for request in (t.CreateCompletionRequest, t.CreateChatCompletionRequest):
        request.model_fields["repeat_penalty"].default = 1.0
        request.model_rebuild(force=True)


def message_text_as_text() -> None:
    from llama_cpp.server.model import LlamaProxy

    from trainer.chat_tokens import content_as_text

    load = LlamaProxy.load_llama_from_model_settings
    if getattr(load, "_tier3", False):
        return

    def loaded(settings: Any) -> Any:
        return content_as_text(load(settings))

    loaded._tier3 = True  # type: ignore[attr-defined]
    LlamaProxy.load_llama_from_model_settings = staticmethod(loaded)  # type: ignore[method-assign,assignment]


def main(argv: Sequence[str] | None = None) -> None:
    no_weight_repacking()
    greedy_by_default()
    message_text_as_text()
    from llama_cpp.server.__main__ import main as server_main

    sys.argv = ["llama_cpp.server", *(sys.argv[1:] if argv is None else argv)]
    server_main()


if __name__ == "__main__":
    main()
