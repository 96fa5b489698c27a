"""Prompt parity: the token ids the student was trained on vs the ids the llama.cpp server evaluates.

A gap between the merged PyTorch student and its f16 GGUF served by ``llama_cpp.server`` should be numerical noise
only. It is not when the served prompt differs from the trained one (another chat-template rendering, a BOS token
llama.cpp adds, special-token parsing of message text, a default system prompt, whitespace) or when generation is
configured differently. This module computes both sides with the libraries' own code paths:

- :func:`trainer_prompt_ids`: the ids the TRL backend trains on before the first assistant token. A training
  example (``{"messages": prompt + [assistant]}``, as ``trainer.dataset.phase_examples`` writes them) goes through
  ``sft_trainer.tokenized_examples`` (``trainer.chat_tokens``: template text with special tokens, message text
  without) and TRL's own ``SFTTrainer._prepare_dataset`` with the trainer's own TRL arguments (truncation). The
  prompt is every id before the first label that is not ``-100``. :func:`eval_prompt_ids` is what the evaluator
  feeds the PyTorch model (``inference.prompt_ids``).
- :func:`served_prompt_ids`: what ``tier3 serve``'s server (``trainer/close_loop/llama_server.py``) evaluates for
  ``POST /v1/chat/completions`` on a GGUF with the config :class:`~trainer.close_loop.serve.LlamaServer` writes (no
  ``chat_format``): ``llama_cpp.Llama`` picks the chat handler itself (the GGUF's ``tokenizer.chat_template`` through
  ``Jinja2ChatFormatter``, registered as ``chat_template.default``), and the server wraps it in
  ``chat_tokens.ContentAsText``: the handler renders the prompt around slot markers, and its
  ``llama.tokenize(prompt, add_bos=..., special=True)`` tokenizes the template text with special tokens and each
  message's content without, then ``create_completion(prompt=<ids>)``. The model is loaded ``vocab_only`` and the
  handler is run on a stand-in ``llama`` that tokenizes with the real vocabulary and captures what would be passed
  to ``create_completion``: the same handler objects, no template re-implemented. :func:`server_prompt_tokens`
  reads a real server's ``usage.prompt_tokens`` to cross-check it.

Found with it (tests/close_loop/test_parity.py): the ids agree for the tiny test model and for SmolLM2-135M-Instruct
(the wheel's GGUF and tier3's own export), answer-only and reasoned prompts, special-token strings in message text,
no system prompt. What parts the served outputs from PyTorch's is decoding: llama-cpp-python's server defaults a
request's ``repeat_penalty`` to 1.1 and applies it before the greedy choice; :func:`served_chat` with
``repeat_penalty=1.0`` gives PyTorch's greedy text.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: the assistant content appended to a prompt to make a training example (only the ids *before* it are kept; the
#: task's answers start with ``<answer>`` or ``<reasoning>``)
DEFAULT_COMPLETION = "<answer>\n{}\n</answer>"


# ------------------------------------------------------------------------------------------------ trainer side


def load_tokenizer(model_dir_or_tokenizer: Any) -> Any:
    """The tokenizer as the trainer loads it (``AutoTokenizer.from_pretrained(folder)``: the base model's folder in
    ``load_base_for_training``, the adapter's in ``load_student``), or the tokenizer object given."""
    if isinstance(model_dir_or_tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(model_dir_or_tokenizer))
    return model_dir_or_tokenizer


@dataclass
class _PrepareStub:
    """The attributes of an ``SFTTrainer`` that ``SFTTrainer._prepare_dataset`` reads, set as ``__init__`` sets them."""

    _tokenizer: Any
    chat_template: str | None
    completion_only_loss: bool | None = None


def trainer_examples(model_dir_or_tokenizer: Any, examples: Sequence[Mapping[str, Any]], *,
                     max_seq_len: int | None = None) -> list[dict[str, list[int]]]:
    """``{"input_ids", "labels"}`` of chat examples (``{"messages": [...]}``) exactly as the TRL backend prepares
    them: ``sft_trainer.tokenized_examples`` (template special tokens only, labels on the assistant turns), then
    ``SFTTrainer._prepare_dataset`` with the trainer's own arguments (truncation, no packing)."""
    from datasets import Dataset
    from datasets.utils.logging import disable_progress_bar
    from trl import SFTTrainer

    from trainer.sft_config import Phase, SFTConfig
    from trainer.sft_trainer import _trl_args, tokenized_examples

    disable_progress_bar()
    tok = load_tokenizer(model_dir_or_tokenizer)
    overrides: dict[str, Any] = {"tier3_packing": False}
    if max_seq_len is not None:
        overrides["tier3_max_seq_len"] = max_seq_len
    cfg = SFTConfig(**overrides)  # type: ignore[arg-type]
    with tempfile.TemporaryDirectory(prefix="tier3-parity-") as scratch:
        args = _trl_args(cfg, Phase("answer", 1.0), Path(scratch), on_cuda=False, assistant_only=False)
        stub = _PrepareStub(_tokenizer=tok, chat_template=None, completion_only_loss=args.completion_only_loss)
        rows = tokenized_examples(tok, [dict(e) for e in examples])
        ds = SFTTrainer._prepare_dataset(stub, Dataset.from_list(rows), tok, args,  # type: ignore[arg-type]
                                         packing=False, formatting_func=None, dataset_name="parity")
        return [{"input_ids": list(r["input_ids"]), "labels": list(r["labels"])} for r in ds]


def trainer_prompt_ids(model_dir_or_tokenizer: Any, messages: Sequence[Mapping[str, str]], *,
                       completion: str = DEFAULT_COMPLETION) -> list[int]:
    """The ids the trainer trains on for ``messages`` up to the assistant's content: ``messages`` plus an assistant
    turn ``completion`` prepared as a training example (:func:`trainer_examples`), cut where that turn's targets
    start. ``model_dir_or_tokenizer`` is what the trainer loads: the base model's folder or the adapter's (an
    exported ``merged`` folder's template has its ``{% generation %}`` markers removed, and TRL refuses it)."""
    example = {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]
               + [{"role": "assistant", "content": completion}]}
    (row,) = trainer_examples(model_dir_or_tokenizer, [example])
    labels = row["labels"]
    last = next((i for i in range(len(labels) - 1, -1, -1) if labels[i] != -100), None)
    if last is None:
        raise ValueError("the prepared example has no target token (truncated, or the template has no assistant mask)")
    first = last  # the start of the last run of targets: the appended assistant turn (earlier ones stay in the prompt)
    while first > 0 and labels[first - 1] != -100:
        first -= 1
    return row["input_ids"][:first]


def eval_prompt_ids(model_dir_or_tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """The ids the PyTorch evaluator feeds the model (``inference.prompt_ids``: the chat template with the
    generation prompt)."""
    from trainer.inference import prompt_ids

    return prompt_ids(load_tokenizer(model_dir_or_tokenizer), [dict(m) for m in messages])


# ------------------------------------------------------------------------------------------------ served side


class _Captured(Exception):
    def __init__(self, kwargs: dict[str, Any]) -> None:
        super().__init__("captured")
        self.kwargs = kwargs


class _CapturingLlama:
    """Stands in for ``llama_cpp.Llama`` in a chat handler: real tokenizer and metadata, and ``create_completion``
    records its arguments instead of evaluating anything."""

    def __init__(self, llm: Any) -> None:
        self._llm = llm

    def __getattr__(self, name: str) -> Any:
        return getattr(self._llm, name)

    def create_completion(self, **kwargs: Any) -> Any:
        raise _Captured(kwargs)

    def __call__(self, **kwargs: Any) -> Any:
        raise _Captured(kwargs)


@dataclass(frozen=True)
class ServedPrompt:
    ids: list[int]
    chat_format: str  # the handler the model chose ("chat_template.default": the GGUF's Jinja template)
    stop: list[str]  # stop strings the handler passes (the template's eos for Jinja2ChatFormatter)
    add_bos_token: bool  # llama.cpp's add_bos for this vocabulary (tokenizer.ggml.add_bos_token or its default)
    bos_id: int
    eos_id: int


_VOCABS: dict[str, Any] = {}


def load_vocab(gguf_path: Path | str) -> Any:
    """``llama_cpp.Llama(model_path, vocab_only=True)``, with the server's choice of chat handler (its config names
    no ``chat_format``), cached per file."""
    key = str(Path(gguf_path).resolve())
    llm = _VOCABS.get(key)
    if llm is None:
        from llama_cpp import Llama

        from trainer.chat_tokens import content_as_text

        llm = content_as_text(Llama(model_path=key, vocab_only=True, verbose=False))  # as tier3 serve installs it
        _VOCABS[key] = llm
    return llm


def served_prompt(gguf_path: Path | str, messages: Sequence[Mapping[str, str]]) -> ServedPrompt:
    """The prompt ``llama_cpp.server`` evaluates for a chat completion of ``messages`` on ``gguf_path`` (module doc)."""
    from llama_cpp import llama_chat_format

    llm = load_vocab(gguf_path)
    # Llama.create_chat_completion's own choice of handler
    handler: Any = (llm.chat_handler or llm._chat_handlers.get(llm.chat_format)
                    or llama_chat_format.get_chat_completion_handler(llm.chat_format))
    try:
        handler(llama=_CapturingLlama(llm), messages=[dict(m) for m in messages], max_tokens=1, temperature=0.0)
    except _Captured as cap:
        kwargs = cap.kwargs
    else:  # pragma: no cover - every handler ends in create_completion
        raise RuntimeError(f"chat handler {llm.chat_format!r} did not call create_completion")
    prompt = kwargs["prompt"]
    if isinstance(prompt, str):  # create_completion tokenizes a text prompt itself (BOS per the vocabulary)
        ids = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
    else:
        ids = list(prompt)
    stop = kwargs.get("stop") or []
    return ServedPrompt(ids=[int(i) for i in ids], chat_format=str(llm.chat_format),
                        stop=[stop] if isinstance(stop, str) else list(stop),
                        add_bos_token=bool(llm._model.add_bos_token()), bos_id=int(llm.token_bos()),
                        eos_id=int(llm.token_eos()))


def served_prompt_ids(gguf_path: Path | str, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """The ids ``llama_cpp.server`` evaluates for a chat completion of ``messages`` on ``gguf_path``."""
    return served_prompt(gguf_path, messages).ids


def server_prompt_tokens(base_url: str, model: str, messages: Sequence[Mapping[str, str]],
                         timeout_s: float = 120.0) -> int:
    """``usage.prompt_tokens`` of one real chat completion (``max_tokens=1``, greedy) on a running server."""
    import httpx

    resp = httpx.post(f"{base_url}/chat/completions", timeout=timeout_s,
                      json={"model": model, "messages": [dict(m) for m in messages], "max_tokens": 1,
                            "temperature": 0.0})
    resp.raise_for_status()
    return int(resp.json()["usage"]["prompt_tokens"])


# ------------------------------------------------------------------------------------------------ comparing


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first position where ``a`` and ``b`` differ (the shorter length when one is a prefix of the
    other), None when they are equal."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def describe_mismatch(trainer_ids: Sequence[int], served_ids: Sequence[int], tokenizer: Any = None,
                      vocab: Any = None, context: int = 3, width: int = 8) -> str:
    """A readable account of where two id lists part: the position, and the ids with their token strings on both
    sides (the HF tokenizer names the trainer's, llama.cpp's vocabulary the served ones). "" when equal."""
    i = first_difference(trainer_ids, served_ids)
    if i is None:
        return ""
    lo = max(0, i - context)

    def hf(ids: Sequence[int]) -> list[str]:
        if tokenizer is None:
            return [str(x) for x in ids]
        return [f"{x}:{tokenizer.convert_ids_to_tokens(int(x))!r}" for x in ids]

    def ll(ids: Sequence[int]) -> list[str]:
        if vocab is None:
            return [str(x) for x in ids]
        out = []
        for x in ids:
            with contextlib.suppress(Exception):
                out.append(f"{x}:{vocab._model.token_get_text(int(x))!r}")
                continue
            out.append(str(x))
        return out

    return (f"first difference at position {i} (trainer {len(trainer_ids)} ids, served {len(served_ids)} ids)\n"
            f"  trainer[{lo}:{i + width}]: {hf(trainer_ids[lo:i + width])}\n"
            f"  served [{lo}:{i + width}]: {ll(served_ids[lo:i + width])}")


@dataclass(frozen=True)
class ParityResult:
    messages: list[dict[str, str]]
    trainer_ids: list[int]
    eval_ids: list[int]
    served: ServedPrompt
    detail: str  # describe_mismatch of trainer vs served ("" when equal)

    @property
    def ok(self) -> bool:
        return self.trainer_ids == self.eval_ids == self.served.ids


def check_parity(model_dir_or_tokenizer: Any, gguf_path: Path | str, prompts: Sequence[Sequence[Mapping[str, str]]]
                 ) -> list[ParityResult]:
    """Trainer, evaluator and server prompt ids for each prompt."""
    tok = load_tokenizer(model_dir_or_tokenizer)
    vocab = load_vocab(gguf_path)
    out = []
    for msgs in prompts:
        t = trainer_prompt_ids(tok, msgs)
        e = eval_prompt_ids(tok, msgs)
        s = served_prompt(gguf_path, msgs)
        detail = describe_mismatch(t, s.ids, tok, vocab)
        if not detail and e != t:
            detail = "evaluator vs trainer: " + describe_mismatch(t, e, tok, None)
        out.append(ParityResult([dict(m) for m in msgs], t, e, s, detail))
    return out


# ------------------------------------------------------------------------------------------------ exports


def export_gguf(adapter_dir: Path, out_dir: Path, outtypes: Sequence[str] = ("f16",),
                settings: Any = None) -> dict[str, Path]:
    """``tier3 export``'s merge and GGUF steps alone (no Ollama, no event): ``merge_adapter`` into
    ``out_dir/merged``, then llama.cpp's converter once per ``outtype`` with the declared pre-tokenizer."""
    from trainer.close_loop.export import merge_adapter
    from trainer.close_loop.gguf_converter import convert_to_gguf, declared_pre_tokenizer, ensure_converter
    from trainer.close_loop.settings import CloseLoopSettings

    s = settings or CloseLoopSettings()
    merged = merge_adapter(Path(adapter_dir), Path(out_dir) / "merged")
    converter = ensure_converter(s)
    pre = declared_pre_tokenizer(s.tier3_gguf_pre_tokenizer, merged, Path(adapter_dir))
    out: dict[str, Path] = {"merged": merged}
    for t in outtypes:
        out[t] = convert_to_gguf(merged, Path(out_dir) / f"student-{t}.gguf", t, converter, pre_tokenizer=pre)
    return out


def untrained_adapter(base_model: str | Path, out_dir: Path) -> Path:
    """A LoRA adapter written the way ``sft_trainer.train`` writes one, without training (PEFT's B matrices start
    at zero, so the merged model is the base model): what an export of a student of ``base_model`` carries, for
    checks that depend on the tokenizer, the chat template and the conversion only."""
    from trainer.sft_config import SFTConfig
    from trainer.sft_trainer import _resolve_base, _write_adapter, load_base_for_training, make_lora_model

    cfg = SFTConfig(tier3_base_model=str(base_model), tier3_backend="trl")  # type: ignore[call-arg]
    model, tokenizer = load_base_for_training(cfg, on_cuda=False)
    model = make_lora_model(model, cfg)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    return _write_adapter(model, tokenizer, Path(out_dir), {
        "base_model": _resolve_base(cfg.tier3_base_model), "backend": "trl", "prompt_format": "answer",
        "note": "untrained (tier3 parity check)"})


# ------------------------------------------------------------------------------------------------ greedy outputs


def served_chat(base_url: str, model: str, messages: Sequence[Mapping[str, str]], max_tokens: int,
                timeout_s: float = 300.0, **sampling: Any) -> dict[str, Any]:
    """One greedy chat completion (``temperature`` 0) on a running llama_cpp.server; ``sampling`` adds fields of
    the request body (``repeat_penalty=1.0``: llama-cpp-python's server defaults it to 1.1, applied before greedy
    selection). Returns ``{"text", "prompt_tokens", "completion_tokens", "finish_reason"}``."""
    import httpx

    body = {"model": model, "messages": [dict(m) for m in messages], "max_tokens": max_tokens, "temperature": 0.0,
            **sampling}
    resp = httpx.post(f"{base_url}/chat/completions", json=body, timeout=timeout_s)
    resp.raise_for_status()
    data = resp.json()
    choice = data["choices"][0]
    return {"text": choice["message"].get("content") or "", "prompt_tokens": data["usage"]["prompt_tokens"],
            "completion_tokens": data["usage"]["completion_tokens"], "finish_reason": choice.get("finish_reason")}
