"""Inference with a trained student in PyTorch: loading it (adapter or merged), its prompt ids, greedy generation
one request at a time (with a prompt-prefix KV cache, as a serving llama.cpp keeps one) or in batches.

Used by the evaluation's PyTorch diagnostics, the export (merging) and the benchmarks; ``sft_trainer`` only trains.
Prompts are tokenized by :mod:`trainer.chat_tokens`: the chat template inserts the special tokens, message text is
plain text (the same ids the trainer trained on and ``tier3 serve`` evaluates). Heavy libraries are imported inside
functions.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainer.chat_tokens import hf_prompt_ids
from trainer.errors import AdapterError
from trainer.sft_config import PROMPT_FORMAT_OF, Phase

if TYPE_CHECKING:  # imported lazily at run time: torch/transformers take seconds to import
    import torch

ADAPTER_DIR = "adapter"
ADAPTER_META = "tier3_adapter.json"
MAX_NEW_TOKENS_LIMIT = 4096  # generate() never runs longer than this, whatever it is asked
#: shorter shared prefixes are not worth a second forward call (the prompt cache here, the training loss's prefix)
MIN_SHARED_PREFIX = 32


def cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def torch_dtype(on_cuda: bool) -> torch.dtype:
    import torch

    if on_cuda:
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32  # CPU: bf16 matmuls are slow or missing on many CPUs


def prompt_format(phases: tuple[Phase, ...]) -> str:
    """``reasoning`` or ``answer``: the output format the student learnt last, hence the prompt (instruction) it is
    to be given at inference (``inference_messages(..., reasoning=...)``); recorded in ``tier3_adapter.json``.
    A ``multitask`` phase trains a rationale task too but is served answer-only: ``answer``
    (:data:`trainer.sft_config.PROMPT_FORMAT_OF`)."""
    return PROMPT_FORMAT_OF[phases[-1].kind] if phases else "reasoning"


def adapter_prompt_format(adapter_dir: Path) -> str:
    """The prompt format recorded with an adapter (``reasoning`` for adapters written before it was recorded)."""
    try:
        meta = json.loads((Path(adapter_dir) / ADAPTER_META).read_text())
    except (OSError, ValueError):
        return "reasoning"
    fmt = meta.get("prompt_format") if isinstance(meta, dict) else None
    return fmt if fmt in ("answer", "reasoning") else "reasoning"


def load_student(adapter_dir: Path) -> tuple[Any, Any]:
    """Base model + LoRA adapter (not merged) and the tokenizer saved with it, ready for :func:`generate`."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter_dir = Path(adapter_dir)
    try:
        meta_path = adapter_dir / ADAPTER_META
        if meta_path.exists():
            base = json.loads(meta_path.read_text())["base_model"]
        else:  # an adapter written by something else: PEFT records its base
            base = json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
        on_cuda = cuda_available()
        model: Any = AutoModelForCausalLM.from_pretrained(base, dtype=torch_dtype(on_cuda))
        model = PeftModel.from_pretrained(model, str(adapter_dir))
        tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
    except (OSError, KeyError, ValueError) as exc:
        raise AdapterError(f"cannot load the student from {adapter_dir}: {exc}", retryable=False) from exc
    if on_cuda:
        model = model.to("cuda")
    model.eval()
    return model, tokenizer


def common_prefix_len(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class PromptCache:
    """The KV cache of the prompt prefix that requests share, reused by the next single-request generation.

    A server keeps the keys and values of the prompts it evaluated and starts a request from the longest common
    prefix (llama.cpp does): with a task whose system prompt is most of every prompt, a request then computes only
    its own question. This does the same for :func:`generate`, so the latency it measures is what a serving
    student costs. Greedy outputs are the same with or without it (checked by a test).
    """

    def __init__(self) -> None:
        self.ids: list[int] = []  # the cached prefix
        self.cache: Any = None
        self.last: list[int] = []  # the previous prompt seen

    def reusable(self, ids: list[int]) -> Any:
        """A copy of the cached prefix's KV cache when the prefix starts ``ids`` (and is shorter), else None."""
        import copy

        if self.cache is None or len(self.ids) >= len(ids) or ids[: len(self.ids)] != self.ids:
            return None
        return copy.deepcopy(self.cache)

    def observe(self, model: Any, prompts: list[list[int]]) -> None:
        """Note prompts that were evaluated; cache the prefix they share with each other (and the previous one)
        when it is longer than the cached one (one forward pass, no gradients)."""
        import torch

        seen = [self.last, *prompts] if self.last else list(prompts)
        if len(seen) < 2:
            self.last = list(prompts[-1]) if prompts else self.last
            return
        n = min(common_prefix_len(seen[0], p) for p in seen[1:])
        self.last = list(prompts[-1])
        n = min(n, min(len(p) for p in seen) - 1)  # a request always computes at least its last token
        if n < MIN_SHARED_PREFIX or n <= len(self.ids):
            return
        prefix = seen[0][:n]
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([prefix], device=model.device), use_cache=True)
        self.ids, self.cache = prefix, out.past_key_values


def prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """The token ids of ``messages`` with the generation prompt, as :func:`generate` feeds them."""
    return hf_prompt_ids(tokenizer, messages)


def generate(model: Any, tokenizer: Any, messages: list[dict[str, str]], max_new_tokens: int,
             prompt_cache: PromptCache | None = None) -> tuple[str, int, float]:
    """Greedy decoding of the assistant turn for ``messages`` (the chat template with a generation prompt).

    Stops at the eos (end-of-turn) token or after ``max_new_tokens``. Returns (text without special tokens,
    number of new tokens including the end-of-turn token, latency in seconds). With ``prompt_cache`` the prompt
    prefix it holds is not computed again (:class:`PromptCache`).
    """
    import torch
    from transformers import GenerationConfig

    max_new_tokens = max(1, min(int(max_new_tokens), MAX_NEW_TOKENS_LIMIT))
    ids: list[int] = prompt_ids(tokenizer, messages)
    inputs = {"input_ids": torch.tensor([ids], device=model.device),
              "attention_mask": torch.ones((1, len(ids)), dtype=torch.long, device=model.device)}
    eos = tokenizer.eos_token_id
    gen = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=eos,
                           pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos)
    extra: dict[str, Any] = {}
    if prompt_cache is not None:
        cached = prompt_cache.reusable(ids)
        if cached is not None:
            extra["past_key_values"] = cached
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**inputs, generation_config=gen, **extra)
    latency_s = time.perf_counter() - t0
    new_ids = out[0, inputs["input_ids"].shape[1]:].tolist()
    if eos in new_ids:  # anything after eos would be padding
        new_ids = new_ids[: new_ids.index(eos) + 1]
    text = tokenizer.decode(new_ids, skip_special_tokens=True)
    if prompt_cache is not None:
        prompt_cache.observe(model, [ids])
    return text, len(new_ids), latency_s


def cached_generators(model: Any, tokenizer: Any, max_new_tokens: int) -> tuple[Any, Any]:
    """(one request at a time, a batch at a time) greedy generators sharing one :class:`PromptCache`: the prompt
    prefix the batches share (the system prompt) is kept, as a serving llama.cpp keeps it, so a single request's
    latency is what the served student costs. The cache is filled after a batch's timing."""
    cache = PromptCache()

    def gen(messages: list[dict[str, str]]) -> tuple[str, int, float]:
        return generate(model, tokenizer, messages, max_new_tokens, prompt_cache=cache)

    def gen_batch(prompts: list[list[dict[str, str]]]) -> tuple[list[tuple[str, int]], float]:
        out = generate_batch(model, tokenizer, prompts, max_new_tokens)
        cache.observe(model, [prompt_ids(tokenizer, p) for p in prompts[:2]])
        return out

    return gen, gen_batch


def load_merged_student(adapter_dir: Path) -> tuple[Any, Any]:
    """The student as it ships: base + LoRA adapter merged into plain weights (``merge_and_unload``), eval mode.
    Generation then runs the dense model with its KV cache, without PEFT's per-layer adapter detour."""
    model, tokenizer = load_student(adapter_dir)
    try:
        merged = model.merge_and_unload()
    except (ValueError, RuntimeError) as exc:
        raise AdapterError(f"cannot merge the adapter in {adapter_dir}: {exc}", retryable=False) from exc
    merged.eval()
    return merged, tokenizer


def generate_batch(model: Any, tokenizer: Any, prompts: list[list[dict[str, str]]], max_new_tokens: int
                   ) -> tuple[list[tuple[str, int]], float]:
    """Greedy decoding of a batch of prompts at once (left padding, KV cache); returns ([(text, n_new_tokens
    including the end of turn)], wall seconds of the batch). Each sequence stops at eos; finished ones are padded
    until the longest is done."""
    import torch
    from transformers import GenerationConfig

    max_new_tokens = max(1, min(int(max_new_tokens), MAX_NEW_TOKENS_LIMIT))
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    rows = [prompt_ids(tokenizer, p) for p in prompts]
    width = max(len(r) for r in rows)
    # left padding: new tokens must follow each prompt directly
    inputs = {"input_ids": torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=model.device),
              "attention_mask": torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows],
                                             device=model.device)}
    gen = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=eos,
                           pad_token_id=pad, use_cache=True)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**inputs, generation_config=gen)
    wall_s = time.perf_counter() - t0
    results: list[tuple[str, int]] = []
    for row in out[:, inputs["input_ids"].shape[1]:].tolist():
        if eos in row:
            row = row[: row.index(eos) + 1]
        results.append((tokenizer.decode(row, skip_special_tokens=True), len(row)))
    return results, wall_s
