"""LoRA SFT on the tiny model: weights, loss mask, curriculum, atomic adapter, load + generate.

One full run (100 traces, two curriculum phases, the tiny model's demo settings) is shared by the module's tests.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from tests.synthetic import synthetic_traces
from trainer.dataset import BuiltDataset, build_dataset, inference_messages, phase_examples
from trainer.errors import BackendUnavailable, EmptyDataset
from trainer.inference import adapter_prompt_format, generate, load_student, prompt_format
from trainer.sft_config import Phase, SFTConfig
from trainer.sft_trainer import (
    ADAPTER_DIR,
    IGNORE_INDEX,
    TrainResult,
    choose_backend,
    make_lora_model,
    make_trl_trainer,
    train,
)
from trainer.tiny_model import TINY_DEMO_OVERRIDES, cached_tiny_model


@dataclass
class Run:
    base: Path
    base_sha256: str
    cfg: SFTConfig
    dataset: BuiltDataset
    result: TrainResult
    steps_seen: list[tuple[int, int]]
    out_dir: Path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    base = cached_tiny_model()
    base_sha = _sha(base / "model.safetensors")
    cfg = SFTConfig(tier3_base_model=str(base), tier3_backend="auto", **TINY_DEMO_OVERRIDES)  # type: ignore[arg-type]
    out = tmp_path_factory.mktemp("run")
    ds = build_dataset(synthetic_traces(100), cfg, out / "data")
    steps: list[tuple[int, int]] = []
    result = train(ds, cfg, out, on_step=lambda s, t: steps.append((s, t)))
    return Run(base, base_sha, cfg, ds, result, steps, out)


@pytest.mark.slow
def test_result_progress_and_curriculum(run: Run) -> None:
    r = run.result
    assert r.backend == "trl"  # no CUDA here
    assert "unsloth" not in sys.modules  # never imported without CUDA
    assert r.adapter_dir == run.out_dir / ADAPTER_DIR and r.adapter_dir.is_dir()
    assert list(r.phase_losses) == ["1:answer", "2:reasoning"]
    total = run.steps_seen[-1][1]
    assert run.steps_seen[-1] == (total, total) and r.steps == total
    assert [s for s, _ in run.steps_seen] == sorted(s for s, _ in run.steps_seen)
    assert r.tokens > 0 and r.train_loss > 0 and r.wall_s > 0
    assert r.eot_in_loss is True and r.hyperparameters["eot_in_loss_checked"] is True
    hp = r.hyperparameters
    assert hp["tier3_lora_r"] == 16 and hp["tier3_lora_target_modules"] == "all-linear"
    assert hp["phases"] == [{"kind": p.kind, "epochs": p.epochs} for p in run.cfg.phases]
    assert [p.kind for p in run.cfg.phases] == ["answer", "reasoning"]
    assert hp["n_examples"] == {"answer": run.dataset.n_train, "reasoning": run.dataset.n_train}
    assert hp["tier3_base_model"] == str(run.base)
    # the last phase is reasoning: the student is prompted for reasoning then the answer
    assert adapter_prompt_format(r.adapter_dir) == "reasoning" == prompt_format(run.cfg.phases) == hp["prompt_format"]
    assert prompt_format((Phase("reasoning", 1), Phase("answer", 2))) == "answer"
    # published atomically: nothing but the adapter and the dataset is left in the run folder
    assert sorted(p.name for p in run.out_dir.iterdir()) == sorted([ADAPTER_DIR, "data"])


@pytest.mark.slow
def test_lora_weights_changed_and_base_weights_did_not(run: Run) -> None:
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    assert _sha(run.base / "model.safetensors") == run.base_sha256  # the base folder is untouched
    saved = load_file(str(run.result.adapter_dir / "adapter_model.safetensors"))
    assert saved and all("lora_" in k for k in saved)  # the adapter holds LoRA weights only
    # what LoRA started from: the same seed gives the same initial A (and B is zero at init)
    init = make_lora_model(AutoModelForCausalLM.from_pretrained(run.base), run.cfg)
    init_sd = {k: v for k, v in init.state_dict().items() if "lora_" in k}
    model, _ = load_student(run.result.adapter_dir)
    trained = model.state_dict()
    lora_keys = [k for k in trained if "lora_" in k]
    assert len(lora_keys) == len(init_sd) > 0
    assert all(not torch.equal(trained[k], init_sd[k]) for k in lora_keys if "lora_B" in k)
    assert any(not torch.equal(trained[k], init_sd[k]) for k in lora_keys if "lora_A" in k)
    base = AutoModelForCausalLM.from_pretrained(run.base).state_dict()
    for k, v in trained.items():
        if "lora_" in k:
            continue
        base_key = k.replace("base_model.model.", "", 1).replace(".base_layer", "")
        assert torch.equal(v, base[base_key]), k


@pytest.mark.slow
def test_adapter_loads_and_generates_greedily(run: Run) -> None:
    model, tok = load_student(run.result.adapter_dir)
    exp = synthetic_traces(1, seed=99)[0].experience
    msgs = inference_messages(exp, reasoning=True)
    text, n_tokens, latency_s = generate(model, tok, msgs, max_new_tokens=12)
    assert isinstance(text, str) and 1 <= n_tokens <= 12 and latency_s > 0
    assert (text, n_tokens) == generate(model, tok, msgs, max_new_tokens=12)[:2]  # greedy: deterministic
    assert tok.chat_template == cached_tiny_model_template()


@pytest.mark.slow
def test_the_student_learns_to_stop(run: Run) -> None:
    """Behaviour, not just the mask: on unseen holdout prompts the trained student ends its turn by itself."""
    from trainer.dataset import holdout_records

    model, tok = load_student(run.result.adapter_dir)
    records = holdout_records(run.dataset)
    assert records
    max_new = 160  # a reasoned answer here is ~60-100 tokens
    stopped = [generate(model, tok, r["messages"], max_new_tokens=max_new)[1] < max_new for r in records]
    assert sum(stopped) >= len(records) / 2, stopped


def cached_tiny_model_template() -> str:
    from transformers import AutoTokenizer

    return str(AutoTokenizer.from_pretrained(cached_tiny_model()).chat_template)


@pytest.mark.slow
def test_end_of_turn_token_is_in_the_loss_mask(run: Run, tmp_path: Path) -> None:
    """The labels the trainer really builds: assistant tokens (end-of-turn included) are targets, the prompt
    is not, so the student learns to stop."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok: Any = AutoTokenizer.from_pretrained(run.base)
    model = make_lora_model(AutoModelForCausalLM.from_pretrained(run.base), run.cfg)
    for kind in ("answer", "reasoning"):
        examples = phase_examples(run.dataset, kind)[:6]
        trainer = make_trl_trainer(model, tok, examples, run.cfg, Phase(kind, 1.0), tmp_path, on_cuda=False)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(examples))])
        for ids, labels, ex in zip(batch["input_ids"].tolist(), batch["labels"].tolist(), examples, strict=True):
            targets = [(i, t) for i, t in zip(ids, labels, strict=True) if t != IGNORE_INDEX]
            assert all(i == t for i, t in targets)
            target_ids = [i for i, _ in targets]
            assert target_ids[-1] == tok.eos_token_id  # the last target is the end-of-turn token
            assert tok.decode(target_ids) == ex["messages"][-1]["content"] + tok.eos_token
            assert ids.count(tok.eos_token_id) > target_ids.count(tok.eos_token_id)  # prompt turns: not targets


def test_empty_dataset_and_unavailable_backend_fail_before_training(tmp_path: Path) -> None:
    cfg = SFTConfig(tier3_base_model="unused", tier3_holdout_fraction=0.999)
    ds = build_dataset(synthetic_traces(3), cfg, tmp_path / "data")
    with pytest.raises(EmptyDataset) as e:
        train(ds, cfg, tmp_path)
    assert e.value.retryable is False
    assert not (tmp_path / ADAPTER_DIR).exists()
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailable, match="CUDA"):
            choose_backend(SFTConfig(tier3_base_model="unused", tier3_backend="unsloth"))
        assert choose_backend(SFTConfig(tier3_base_model="unused")) == "trl"
        with pytest.raises(BackendUnavailable, match="4BIT"):
            choose_backend(SFTConfig(tier3_base_model="unused", tier3_load_in_4bit=True))
        assert "unsloth" not in sys.modules


@pytest.mark.slow
def test_a_failed_run_leaves_the_previous_adapter_in_place(run: Run, tmp_path: Path) -> None:
    """A run whose base model cannot load raises a fatal error and publishes nothing."""
    from trainer.errors import BaseModelError

    cfg = run.cfg.model_copy(update={"tier3_base_model": str(tmp_path / "missing-model")})
    ds = replace(run.dataset)
    with pytest.raises(BaseModelError) as e:
        train(ds, cfg, tmp_path)
    assert e.value.retryable is False
    assert not (tmp_path / ADAPTER_DIR).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".adapter", ".scratch"))]


def _stand_in_unsloth(calls: dict[str, Any], fail_load: BaseException | None = None) -> tuple[Any, Any]:
    """A stand-in ``unsloth`` with its real API, doing the real work with transformers/PEFT on CPU:
    ``FastLanguageModel.from_pretrained`` loads the model, ``get_peft_model`` wraps it in LoRA, and
    ``train_on_responses_only`` writes a ``labels`` column that keeps only the response turns (unsloth's rule:
    from each ``response_part`` up to the next ``instruction_part``) and pads labels with -100."""
    import os
    import types

    class FastLanguageModel:
        @staticmethod
        def from_pretrained(**kwargs: Any) -> Any:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            calls["from_pretrained"] = kwargs
            calls["auto_install"] = os.environ.get("UNSLOTH_AUTO_INSTALL")
            if fail_load is not None:
                raise fail_load
            tok = AutoTokenizer.from_pretrained(kwargs["model_name"])
            return AutoModelForCausalLM.from_pretrained(kwargs["model_name"], dtype=torch.float32), tok

        @staticmethod
        def get_peft_model(model: Any, **kwargs: Any) -> Any:
            from peft import LoraConfig, get_peft_model

            calls["get_peft_model"] = kwargs
            return get_peft_model(model, LoraConfig(r=kwargs["r"], lora_alpha=kwargs["lora_alpha"],
                                                    lora_dropout=kwargs["lora_dropout"], bias=kwargs["bias"],
                                                    target_modules=kwargs["target_modules"], task_type="CAUSAL_LM"))

    def train_on_responses_only(trainer: Any, *, instruction_part: str, response_part: str) -> Any:
        from transformers import DataCollatorForSeq2Seq

        tok = trainer.processing_class
        inst = tok(instruction_part, add_special_tokens=False)["input_ids"]
        resp = tok(response_part, add_special_tokens=False)["input_ids"]
        calls["train_on_responses_only"] = (instruction_part, response_part)

        def label(ex: dict[str, Any]) -> dict[str, Any]:
            ids, labels, on, i = ex["input_ids"], [], False, 0
            while i < len(ids):
                for part, state in ((resp, True), (inst, False)):
                    if ids[i:i + len(part)] == part:
                        labels += [IGNORE_INDEX] * len(part)
                        on, i = state, i + len(part)
                        break
                else:
                    labels.append(ids[i] if on else IGNORE_INDEX)
                    i += 1
            return {"labels": labels}

        trainer.train_dataset = trainer.train_dataset.map(label)
        trainer.data_collator = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=IGNORE_INDEX)
        return trainer

    fake = types.ModuleType("unsloth")
    fake.FastLanguageModel = FastLanguageModel  # type: ignore[attr-defined]
    templates = types.ModuleType("unsloth.chat_templates")
    templates.train_on_responses_only = train_on_responses_only  # type: ignore[attr-defined]
    return fake, templates


def _use_stand_in(monkeypatch: pytest.MonkeyPatch, calls: dict[str, Any],
                  fail_load: BaseException | None = None) -> None:
    import torch
    import trl

    from trainer import sft_trainer

    fake, templates = _stand_in_unsloth(calls, fail_load)
    monkeypatch.setitem(sys.modules, "unsloth", fake)
    monkeypatch.setitem(sys.modules, "unsloth.chat_templates", templates)
    monkeypatch.setattr(sft_trainer, "cuda_available", lambda: True)
    monkeypatch.setattr(sft_trainer, "unsloth_installed", lambda: True)
    # what the GPU would do in bf16 runs here in fp32; TRL's own loss kernel needs Triton (no CPU driver), as
    # unsloth replaces it on a GPU: the CPU variant of SFTTrainer stands in for unsloth's patched one
    monkeypatch.setattr(sft_trainer, "_torch_dtype", lambda on_cuda: torch.float32)
    monkeypatch.setattr(trl, "SFTTrainer", sft_trainer._cpu_sft_trainer_class())
    monkeypatch.setenv("UNSLOTH_AUTO_INSTALL", "1")  # a user's setting is overridden
    monkeypatch.setenv("UNSLOTH_DISABLE_CPU_FALLBACK", "1")


def test_unsloth_path_end_to_end_with_a_stand_in(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """unsloth is not installed here (no CUDA): a stand-in with unsloth's API runs the whole unsloth path —
    from_pretrained, get_peft_model, the trainer, train_on_responses_only, the end-of-turn label check,
    training and the adapter — and records what the path passed to it."""
    calls: dict[str, Any] = {}
    _use_stand_in(monkeypatch, calls)
    base = cached_tiny_model()
    cfg = SFTConfig(tier3_base_model=str(base), tier3_load_in_4bit=True, tier3_max_seq_len=1024,
                    tier3_phases="answer:1", tier3_batch_size=4)  # type: ignore[call-arg]
    ds = build_dataset(synthetic_traces(12), cfg, tmp_path / "data")
    result = train(ds, cfg, tmp_path)

    assert calls["auto_install"] == "0"  # set before the import (else its GGUF helpers apt-get and git-clone)
    kw = calls["from_pretrained"]
    assert kw["model_name"] == str(base) and kw["load_in_4bit"] is True and kw["max_seq_length"] == 1024
    assert kw["use_exact_model_name"] is True  # never swapped for unsloth's own re-upload of a hub model
    assert calls["get_peft_model"]["target_modules"] == "all-linear"  # as is: unsloth resolves it per arch
    # the response mask comes from the template's token positions (chat_tokens), not from searching the text
    assert "train_on_responses_only" not in calls
    assert result.backend == "unsloth" and result.eot_in_loss is True
    assert result.steps >= 1 and result.train_loss > 0
    assert (result.adapter_dir / "adapter_config.json").is_file()
    assert json.loads((result.adapter_dir / "tier3_adapter.json").read_text())["backend"] == "unsloth"


def test_unsloth_path_refuses_a_mask_without_end_of_turn(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The end-of-turn label check runs on the labels the unsloth path trains on: rows whose end of turn is not a
    target are refused before training."""
    from trainer import sft_trainer
    from trainer.chat_tokens import end_of_turn_ids
    from trainer.errors import BaseModelError

    calls: dict[str, Any] = {}
    _use_stand_in(monkeypatch, calls)
    real = sft_trainer.tokenized_examples

    def without_eot(tokenizer: Any, examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        eot = set(end_of_turn_ids(tokenizer))
        rows = real(tokenizer, examples)
        return [{**r, "labels": [IGNORE_INDEX if t in eot else t for t in r["labels"]]} for r in rows]

    monkeypatch.setattr(sft_trainer, "tokenized_examples", without_eot)
    cfg = SFTConfig(tier3_base_model=str(cached_tiny_model()), tier3_phases="answer:1")  # type: ignore[call-arg]
    ds = build_dataset(synthetic_traces(8), cfg, tmp_path / "data")
    with pytest.raises(BaseModelError, match="end-of-turn"):
        train(ds, cfg, tmp_path)
    assert not (tmp_path / ADAPTER_DIR).exists()


@pytest.mark.parametrize("exc", [OSError("no such model"), ValueError("bad config"),
                                 RuntimeError("Unsloth: not supported"), NotImplementedError("architecture")])
def test_unsloth_load_failures_are_base_model_errors(exc: BaseException, monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    from trainer.errors import BaseModelError

    calls: dict[str, Any] = {}
    _use_stand_in(monkeypatch, calls, fail_load=exc)
    cfg = SFTConfig(tier3_base_model=str(cached_tiny_model()), tier3_phases="answer:1")  # type: ignore[call-arg]
    ds = build_dataset(synthetic_traces(6), cfg, tmp_path / "data")
    with pytest.raises(BaseModelError, match=f"unsloth cannot load.*{type(exc).__name__}") as e:
        train(ds, cfg, tmp_path)
    assert e.value.retryable is False
    assert not (tmp_path / ADAPTER_DIR).exists()


def test_end_of_turn_tokens_of_the_template() -> None:
    """Gemma ends a turn with <end_of_turn> (eos is <eos>): the end-of-turn check accepts either."""
    from types import SimpleNamespace

    from trainer.sft_trainer import end_of_turn_ids

    vocab = {"<eos>": 1, "<end_of_turn>": 107, "<|im_end|>": 5}
    gemma = SimpleNamespace(eos_token="<eos>", eos_token_id=1, get_vocab=lambda: vocab,
                            chat_template="{{ '<start_of_turn>model\n' + content + '<end_of_turn>\n' }}")
    assert end_of_turn_ids(gemma) == {1: "<eos>", 107: "<end_of_turn>"}
    plain = SimpleNamespace(eos_token="<eos>", eos_token_id=1, get_vocab=lambda: vocab, chat_template="{{ x }}")
    assert end_of_turn_ids(plain) == {1: "<eos>"}
    # the labels unsloth's masking writes for a Gemma turn end in <end_of_turn>, never <eos>: accepted
    from datasets import Dataset

    from trainer.sft_trainer import eot_label_check

    trainer = SimpleNamespace(train_dataset=Dataset.from_list([{"labels": [IGNORE_INDEX, 42, 107]}]))
    assert eot_label_check(trainer, gemma) is True
    assert eot_label_check(trainer, plain) is False


