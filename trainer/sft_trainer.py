"""LoRA SFT of the student: one interface, two backends, curriculum phases, an atomically published adapter.

``train(dataset, cfg, out_dir)`` trains a LoRA adapter on ``dataset`` (see :mod:`trainer.dataset`) and moves it
into ``out_dir/adapter`` only when training succeeded. Backends, chosen at run time (:func:`choose_backend`):

- **unsloth** (the production path) when CUDA is available and unsloth is installed (the ``gpu`` extra):
  ``FastLanguageModel`` + LoRA, optional 4-bit (QLoRA). unsloth is imported only on that path: on a machine
  without CUDA it would refuse or fall back to a slow CPU mode, and it patches transformers/TRL/PEFT globally when
  imported.
- **TRL ``SFTTrainer`` + PEFT** otherwise (CPU, tests, laptops; also CUDA without unsloth).

Both train on the same rows (:func:`tokenized_examples`, built by :mod:`trainer.chat_tokens`): the chat template
alone inserts special tokens, message text (the application's and the teacher's) is tokenized as plain text, and
the labels are the assistant turns and their end of turn, taken from the template's own token positions (never by
searching the text for a turn header, which an injected fake turn in user content would fool).

Both check before training that an end-of-turn token (eos, or the template's own such as Gemma's
``<end_of_turn>``) is inside the loss mask, because a student that is never trained on it never learns to stop,
and the training loss would not show it.

Curriculum: phases run in order on the same LoRA weights, each with its own optimiser and schedule.

Multi-task phases (``multitask``, Distilling Step-by-Step): the rationale examples' loss is weighted by
``TIER3_RATIONALE_WEIGHT`` relative to the answer examples'. The TRL path applies it per example in
:func:`target_only_loss` (a ``weight`` column, a weighted mean over the target tokens; every weight 1 is the plain
loss), on CPU and on CUDA alike (on CUDA a weighted phase uses that loss instead of TRL's fused kernel). unsloth's
patched trainer computes its own loss, so it is given no weights: a weight of 1 (no weights) or 0 (the rationale
examples left out) runs there, any other weight is refused with ``TIER3_BACKEND=unsloth`` and makes ``auto``
choose TRL (:func:`choose_backend`).
Heavy libraries are imported inside functions, so importing this module is cheap and never imports unsloth.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from schemas.runtime.files import move_into_place
from trainer.chat_tokens import end_of_turn_ids, training_features
from trainer.dataset import BuiltDataset, phase_examples
from trainer.errors import (
    AdapterError,
    BackendUnavailable,
    BaseModelError,
    ConfigError,
    EmptyDataset,
    TrainerError,
    TrainingFailed,
)
from trainer.inference import (
    ADAPTER_DIR,
    ADAPTER_META,
    MIN_SHARED_PREFIX,
    cuda_available,
    prompt_format,
)
from trainer.inference import torch_dtype as _torch_dtype
from trainer.sft_config import Phase, SFTConfig

log = logging.getLogger("tier3.trainer.sft")

IGNORE_INDEX = -100  # label value that the loss skips (transformers' convention)
WEIGHT_COLUMN = "weight"  # per-example loss weight of a multitask phase (trainer.dataset.phase_examples)

OnStep = Callable[[int, int], None]


@dataclass(frozen=True)
class TrainResult:
    """What a successful :func:`train` produced (the run manifest records all of it)."""

    adapter_dir: Path
    backend: str  # "unsloth" | "trl"
    steps: int  # optimiser steps over all phases
    train_loss: float  # mean training loss of the last phase
    tokens: int  # tokens fed to the model over all phases and epochs (prompt + completion, no padding)
    wall_s: float  # model load + training + adapter write
    hyperparameters: dict[str, Any]
    phase_losses: dict[str, float] = field(default_factory=dict)  # "1:answer" -> mean loss of that phase
    eot_in_loss: bool = True  # checked before training that the end-of-turn token is a target (False: not checkable)
    train_wall_s: float = 0.0  # optimiser loop only (what tokens/s is measured against)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.train_wall_s if self.train_wall_s > 0 else 0.0


# ---------------------------------------------------------------------------------------------------- backends


def unsloth_installed() -> bool:
    """Whether unsloth can be imported, without importing it (importing it patches other libraries)."""
    return importlib.util.find_spec("unsloth") is not None


def weighted_examples(cfg: SFTConfig) -> bool:
    """Whether training needs per-example loss weights: a ``multitask`` phase with a rationale weight that is
    neither 1 (equal weights: plain SFT) nor 0 (the rationale examples are left out)."""
    return (any(p.kind == "multitask" for p in cfg.phases)
            and cfg.tier3_rationale_weight not in (0.0, 1.0))


def choose_backend(cfg: SFTConfig) -> str:
    """``unsloth`` or ``trl`` for this machine and config; raise BackendUnavailable if the choice cannot run.

    unsloth computes its own loss and takes no per-example weights (:func:`weighted_examples`): with them
    ``TIER3_BACKEND=unsloth`` is refused and ``auto`` chooses TRL (on CUDA too), which weighs each example."""
    if cfg.tier3_backend == "trl":
        return "trl"
    has_cuda = cuda_available()
    weighted = weighted_examples(cfg)
    if cfg.tier3_backend == "unsloth":
        if not has_cuda:
            raise BackendUnavailable("TIER3_BACKEND=unsloth needs a CUDA GPU and none is visible; "
                                     "use TIER3_BACKEND=trl or auto on this machine")
        if not unsloth_installed():
            raise BackendUnavailable("TIER3_BACKEND=unsloth but unsloth is not installed: "
                                     "pip install 'tier3[gpu]', or use TIER3_BACKEND=trl")
        if weighted:
            raise BackendUnavailable(
                f"TIER3_BACKEND=unsloth cannot weight the multitask rationale examples "
                f"(TIER3_RATIONALE_WEIGHT={cfg.tier3_rationale_weight:g}): unsloth computes its own loss. Use "
                "TIER3_BACKEND=trl or auto (TRL weighs each example), or TIER3_RATIONALE_WEIGHT=1 (equal) or 0 "
                "(answer examples only)")
        return "unsloth"
    if has_cuda and unsloth_installed():
        if not weighted:
            return "unsloth"
        if cfg.tier3_load_in_4bit:
            raise BackendUnavailable(
                f"TIER3_RATIONALE_WEIGHT={cfg.tier3_rationale_weight:g} with a multitask phase needs the TRL "
                "backend (unsloth takes no per-example weights), and TIER3_LOAD_IN_4BIT needs unsloth: unset "
                "TIER3_LOAD_IN_4BIT, or set TIER3_RATIONALE_WEIGHT to 1 or 0")
        log.warning("TIER3_RATIONALE_WEIGHT=%g with a multitask phase: unsloth takes no per-example loss "
                    "weights, training with TRL + PEFT instead", cfg.tier3_rationale_weight)
        return "trl"
    if cfg.tier3_load_in_4bit:
        raise BackendUnavailable("TIER3_LOAD_IN_4BIT needs unsloth on a CUDA GPU; this machine has "
                                 f"{'no unsloth' if has_cuda else 'no CUDA'}: unset TIER3_LOAD_IN_4BIT")
    return "trl"


def _import_unsloth() -> Any:
    """Import unsloth first (it patches transformers/TRL/PEFT), never letting it install anything."""
    # Without this, unsloth's GGUF/llama.cpp helpers run apt-get as root and clone llama.cpp from the internet.
    os.environ["UNSLOTH_AUTO_INSTALL"] = "0"
    # Never let it fall back to its slow CPU mode: we only get here with CUDA, and a silent fallback would hide it.
    os.environ.setdefault("UNSLOTH_DISABLE_CPU_FALLBACK", "1")
    import unsloth

    return unsloth


# ---------------------------------------------------------------------------------------------------- helpers


def _resolve_base(name: str) -> str:
    """A named model (``tier3 models list``) becomes its cached folder, pulled on first use; a local folder becomes
    an absolute path (the adapter records it); a hub id stays as it is."""
    from trainer.models import resolve_base_model

    return resolve_base_model(name)


def _steps_per_phase(n_examples: int, phase: Phase, cfg: SFTConfig) -> int:
    batches = math.ceil(n_examples / cfg.tier3_batch_size)
    return max(1, math.ceil(math.ceil(batches / cfg.tier3_grad_accum) * phase.epochs))


def _trl_args(cfg: SFTConfig, phase: Phase, scratch: Path, *, on_cuda: bool, assistant_only: bool,
              text_field: str | None = None, unsloth: bool = False) -> Any:
    from trl import SFTConfig as TRLSFTConfig

    dtype = _torch_dtype(on_cuda)
    import torch

    kwargs: dict[str, Any] = {}
    if text_field is not None:
        kwargs["dataset_text_field"] = text_field
    return TRLSFTConfig(
        output_dir=str(scratch),
        num_train_epochs=phase.epochs,
        per_device_train_batch_size=cfg.tier3_batch_size,
        gradient_accumulation_steps=cfg.tier3_grad_accum,
        learning_rate=cfg.tier3_learning_rate,
        lr_scheduler_type=cfg.tier3_lr_scheduler,
        warmup_steps=cfg.tier3_warmup_ratio,  # a float in [0, 1) is a ratio of the phase's steps
        weight_decay=cfg.tier3_weight_decay,
        max_length=cfg.tier3_max_seq_len,
        packing=cfg.tier3_packing,
        assistant_only_loss=assistant_only,
        # unsloth does its own (cheaper) checkpointing, set in get_peft_model; HF's on top would redo it
        gradient_checkpointing=cfg.tier3_gradient_checkpointing and not unsloth,
        seed=cfg.tier3_seed,
        data_seed=cfg.tier3_seed,
        bf16=on_cuda and dtype == torch.bfloat16,
        fp16=on_cuda and dtype == torch.float16,
        use_cpu=not on_cuda,
        logging_steps=1,
        save_strategy="no",  # the adapter is written once, atomically, by train()
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        **kwargs,
    )


def progress_bar(total: int, desc: str, unit: str) -> Any:
    """A tqdm bar on stderr: redrawn in a terminal, a line every 30 s in a log file (a service's log stays short)."""
    import sys

    from tqdm.auto import tqdm

    tty = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=tty,
                mininterval=0.5 if tty else 30.0)


class _Progress:
    """A transformers TrainerCallback (built lazily) that reports (step, total) across all phases and moves the
    progress bar (with the latest training loss). Each logged loss also goes to :func:`trainer.stage.record_loss`
    (the trainer's heartbeat shows it; the consumer binds its stage holder to the training thread)."""

    @staticmethod
    def make(on_step: OnStep | None, offset: int, total: int, bar: Any = None) -> Any:
        from transformers import TrainerCallback

        from trainer.stage import record_loss

        class Cb(TrainerCallback):  # type: ignore[misc]
            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                step = min(offset + int(state.global_step), total)
                if bar is not None:
                    bar.update(step - bar.n)
                if on_step is not None:
                    on_step(step, total)

            def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
                       **kwargs: Any) -> None:
                if not logs or "loss" not in logs:
                    return
                loss = float(logs["loss"])
                record_loss(loss)
                if bar is not None:
                    bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

        return Cb()


def eot_label_check(trainer: Any, tokenizer: Any) -> bool | None:
    """Whether an end-of-turn token (:func:`end_of_turn_ids`: eos, or the template's ``<end_of_turn>`` /
    ``<|im_end|>`` / ...) is a training target in the first examples the trainer built.

    Looks at the labels the trainer will really use: a ``labels`` column where the backend wrote one (unsloth's
    ``train_on_responses_only``), else the trainer's own collator run on the first examples. Returns None when
    the check cannot run on this backend's data layout (the caller logs it; it does not guess).
    """
    eot = set(end_of_turn_ids(tokenizer))
    ds = trainer.train_dataset
    n = min(len(ds), 4)
    if n == 0 or not eot:
        return False
    try:
        if "labels" in ds.column_names:
            return any(eot & set(ds[i]["labels"]) for i in range(n))
        batch = trainer.data_collator([ds[i] for i in range(n)])
        labels = batch["labels"]
        return any(bool((labels == t).any().item()) for t in eot)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        log.warning("cannot check the loss mask on this backend's data (%s: %s)", type(exc).__name__, exc)
        return None


def _dataset_tokens(trainer: Any) -> int:
    """Tokens in the trainer's prepared (tokenized, truncated) dataset: one epoch, no padding."""
    ds = trainer.train_dataset
    if "input_ids" not in ds.column_names:
        return 0
    return int(sum(len(ids) for ids in ds["input_ids"]))


def _write_adapter(model: Any, tokenizer: Any, out_dir: Path, meta: dict[str, Any]) -> Path:
    """Save the adapter (+ tokenizer + metadata) to a temp folder, fsync it, then move it into place."""
    final = out_dir / ADAPTER_DIR
    tmp = Path(tempfile.mkdtemp(prefix=f".{ADAPTER_DIR}.tmp-", dir=out_dir))
    try:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / ADAPTER_META).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
        for p in tmp.iterdir():
            if p.is_file():
                with open(p, "rb") as fh:
                    os.fsync(fh.fileno())
        move_into_place(tmp, final)  # a previous attempt in the same folder is renamed away first
    except OSError as exc:
        raise AdapterError(f"could not write the adapter to {final}: {exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# ---------------------------------------------------------------------------------------------------- TRL backend


def load_base_for_training(cfg: SFTConfig, on_cuda: bool) -> tuple[Any, Any]:
    """Base model + tokenizer for the TRL backend (raises BaseModelError with what to change)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = _resolve_base(cfg.tier3_base_model)
    try:
        tokenizer: Any = AutoTokenizer.from_pretrained(base)
        model: Any = AutoModelForCausalLM.from_pretrained(base, dtype=_torch_dtype(on_cuda))
    except (OSError, ValueError) as exc:
        raise BaseModelError(f"cannot load base model {base!r} (TIER3_BASE_MODEL): {exc}") from exc
    if on_cuda:
        model = model.to("cuda")
    if tokenizer.chat_template is None:
        raise BaseModelError(f"base model {base!r} has no chat template: use an instruct/chat model")
    return model, tokenizer


def make_lora_model(model: Any, cfg: SFTConfig) -> Any:
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed

    set_seed(cfg.tier3_seed)  # the LoRA A matrices are random: same seed, same start
    lora = LoraConfig(r=cfg.tier3_lora_r, lora_alpha=cfg.tier3_lora_alpha, lora_dropout=cfg.tier3_lora_dropout,
                      target_modules=cfg.target_modules, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def make_trl_trainer(model: Any, tokenizer: Any, examples: list[dict[str, Any]], cfg: SFTConfig, phase: Phase,
                     scratch: Path, *, on_cuda: bool, callbacks: list[Any] | None = None) -> Any:
    """A TRL SFTTrainer for one phase, with loss on the assistant turns only."""
    from datasets import Dataset
    from datasets.utils.logging import disable_progress_bar
    from trl import SFTTrainer

    disable_progress_bar()  # per-map progress bars in a service log are noise; on_step reports progress
    # the examples arrive tokenized (tokenized_examples): TRL truncates them and keeps their labels
    args = _trl_args(cfg, phase, scratch, on_cuda=on_cuda, assistant_only=False)
    weighted = any(WEIGHT_COLUMN in ex for ex in examples)
    if weighted and cfg.tier3_packing:
        raise ConfigError("TIER3_PACKING cannot keep per-example loss weights (a multitask phase with "
                          "TIER3_RATIONALE_WEIGHT not 0 or 1): unset TIER3_PACKING")
    # TRL's own loss (a fused kernel) knows no per-example weights: a weighted phase uses target_only_loss on CUDA too
    cls = SFTTrainer if on_cuda and not weighted else _cpu_sft_trainer_class()
    return cls(model=model, args=args, train_dataset=Dataset.from_list(tokenized_examples(tokenizer, examples)),
               processing_class=tokenizer, callbacks=callbacks)


def tokenized_examples(tokenizer: Any, examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat examples (``{"messages": [...]}`` and maybe a ``weight``) as ``{"input_ids", "labels"}`` rows: special
    tokens from the chat template only, message text as plain text, labels on the assistant turns and their end of
    turn (:func:`trainer.chat_tokens.training_features`; both backends train on these rows)."""
    rows = []
    for ex in examples:
        row: dict[str, Any] = training_features(tokenizer, ex["messages"])
        if WEIGHT_COLUMN in ex:
            row[WEIGHT_COLUMN] = ex[WEIGHT_COLUMN]
        rows.append(row)
    return rows


class _WeightCollator:
    """Wraps a collator: the examples' ``weight`` values become a float tensor ``weight`` of the batch (one per
    row); the wrapped collator never sees them."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, features: list[dict[str, Any]]) -> Any:
        import torch

        if not any(WEIGHT_COLUMN in f for f in features):
            return self.inner(features)
        weights = [float(f.get(WEIGHT_COLUMN, 1.0)) for f in features]
        batch = self.inner([{k: v for k, v in f.items() if k != WEIGHT_COLUMN} for f in features])
        batch[WEIGHT_COLUMN] = torch.tensor(weights, dtype=torch.float32)
        return batch


def _target_counts(batch: dict[str, Any]) -> tuple[Any, Any]:
    """(targets, weighted targets) of a collated batch: next-token targets (labels shifted by one, as the
    trainer counts them) and the same with each row's count times its ``weight``."""
    per_row = (batch["labels"][..., 1:] != IGNORE_INDEX).sum(-1)
    weights = batch.get(WEIGHT_COLUMN)
    weighted = per_row.float() if weights is None else per_row.float() * weights.to(per_row.device).float()
    return per_row.sum(), weighted.sum()


def _cpu_sft_trainer_class() -> Any:
    """TRL's SFTTrainer with :func:`target_only_loss` (the plain causal-LM loss) and per-example loss weights.

    TRL 1.15 computes the loss with a fused, chunked LM head whose kernel is written in Triton, and Triton has no
    CPU driver ("0 active drivers"), so on CPU every training step fails. The model's own causal-LM loss over the
    same labels (assistant tokens only, -100 elsewhere) is the same quantity; only TRL's entropy/accuracy
    metrics are lost. Also used on CUDA for a phase whose examples carry weights (:data:`WEIGHT_COLUMN`): the
    column is kept through TRL's preparation, collated into a per-row tensor, and the loss is the weighted mean
    over the target tokens, normalised by the weighted target count of the whole accumulation window (the
    trainer's ``num_items_in_batch``, weighted here), so that every weight 1 gives exactly the unweighted loss.
    """
    from transformers import Trainer
    from trl import SFTTrainer

    class CpuSFTTrainer(SFTTrainer):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            ds = self.train_dataset
            if ds is not None and WEIGHT_COLUMN in (getattr(ds, "column_names", None) or ()):
                self.data_collator = _WeightCollator(self.data_collator)

        def _set_signature_columns_if_needed(self) -> None:
            super()._set_signature_columns_if_needed()
            if self._signature_columns is not None and WEIGHT_COLUMN not in self._signature_columns:
                self._signature_columns = [*self._signature_columns, WEIGHT_COLUMN]  # kept for the collator

        def _get_num_items_in_batch(self, batch_samples: list[Any], device: Any) -> Any:
            n = super()._get_num_items_in_batch(batch_samples, device)
            if n is None or not batch_samples or WEIGHT_COLUMN not in batch_samples[0]:
                return n
            # the weighted count of the window (exact on one device; scaled like the trainer's count elsewhere)
            counts = [_target_counts(b) for b in batch_samples]
            plain = sum(int(c) for c, _ in counts)
            weighted = sum(float(w) for _, w in counts)
            return n * (weighted / plain) if plain else n

        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            weights = inputs.get(WEIGHT_COLUMN)
            inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "position_ids",
                                                                  "labels")}
            if not return_outputs:
                # the trainer divides by the accumulation steps itself when the model takes no loss kwargs
                loss = target_only_loss(model, inputs, num_items_in_batch if self.model_accepts_loss_kwargs else None,
                                        weights=weights)
                if loss is not None:
                    return loss
            if weights is not None:
                raise TrainingFailed("per-example loss weights (a multitask phase) need a model with a separate LM "
                                     "head; set TIER3_RATIONALE_WEIGHT to 1 or 0")
            inputs["use_cache"] = False
            return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    return CpuSFTTrainer


def _causal_lm(model: Any) -> Any:
    """The ``*ForCausalLM`` inside a PEFT wrapper (LoRA layers are injected in place, so this is still trained)."""
    get_base = getattr(model, "get_base_model", None)  # PeftModel
    inner = get_base() if callable(get_base) else model
    lm_head = getattr(inner, "lm_head", None)
    body = getattr(inner, "model", None)
    if lm_head is None or body is None or not callable(getattr(body, "forward", None)):
        return None
    return inner



def shared_prefix_len(inputs: dict[str, Any]) -> int:
    """How many leading tokens every row of a right-padded batch has in common and can be computed once.

    The common token prefix of all rows (all real tokens, same position ids), cut so that the last prefix
    position predicts no target: every target's logit then comes from the suffix pass. 0 when the batch has one
    row or the prefix is shorter than :data:`MIN_SHARED_PREFIX`.
    """
    ids = inputs["input_ids"]
    labels = inputs["labels"]
    if ids.dim() != 2 or ids.shape[0] < 2:
        return 0
    same = (ids == ids[:1]).all(0)
    mask = inputs.get("attention_mask")
    if mask is not None:
        same &= (mask == 1).all(0)
    pos = inputs.get("position_ids")
    if pos is not None:
        same &= (pos == pos[:1]).all(0)
    n = int(same.long().cumprod(0).sum())
    has_target = (labels != IGNORE_INDEX).any(0)
    if bool(has_target.any()):
        n = min(n, int(has_target.long().argmax()) - 1)  # label at t is predicted at t - 1, which must be suffix
    return n if n >= MIN_SHARED_PREFIX else 0


def _shared_prefix_hidden(causal: Any, inputs: dict[str, Any], n: int) -> Any:
    """Hidden states of the suffix positions ``n:`` of every row, with the shared prefix ``:n`` run once.

    The prefix's keys and values (computed with gradients, on the current weights) are repeated for every row and
    the rows continue from them: causal attention makes this the same computation as the full rows, and the
    backward pass sums the rows' gradients through the one prefix. On a task whose system prompt is most of every
    example (the widget selector's catalog: ~550 of ~640 tokens) a batch of 8 costs about a third of 8 full rows.
    """
    import torch

    ids = inputs["input_ids"]
    rows, length = ids.shape
    pos = inputs.get("position_ids")
    prefix_pos = pos[:1, :n] if pos is not None else None
    pre = causal.model(input_ids=ids[:1, :n], position_ids=prefix_pos, use_cache=True)
    cache = pre.past_key_values
    cache.batch_repeat_interleave(rows)
    suffix_pos = pos[:, n:] if pos is not None else (
        torch.arange(n, length, device=ids.device).unsqueeze(0).expand(rows, -1))
    mask = inputs.get("attention_mask")
    return causal.model(input_ids=ids[:, n:], attention_mask=mask, past_key_values=cache,
                        position_ids=suffix_pos, use_cache=True).last_hidden_state


def _prefix_sharing_ok(causal: Any) -> bool:
    """The shared-prefix pass needs a KV cache during training (gradient checkpointing turns it off)."""
    return not getattr(causal, "is_gradient_checkpointing", False)


def target_only_loss(model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None, *,
                     weights: Any = None) -> Any:
    """The causal-LM loss with the LM head applied only at the positions that have a target.

    The same number as the model's own loss (mean cross-entropy of next-token targets, labels shifted by one,
    -100 skipped; divided by ``num_items_in_batch`` when the trainer counts targets across gradient accumulation),
    but cheaper in two ways:

    - no logits for prompt tokens: with a 49k vocabulary the LM head and its softmax are about a fifth of a step on
      CPU, and the prompt is most of every example;
    - the rows' shared prefix (:func:`shared_prefix_len`, typically the system prompt) is run once per batch, not
      once per row (:func:`_shared_prefix_hidden`).

    ``weights``: one loss weight per row (a multitask phase's rationale examples weigh ``TIER3_RATIONALE_WEIGHT``,
    the answer examples 1): every target token of a row counts that much, and the loss is the weighted mean,
    ``sum(w_row * ce) / sum(w_row)`` over the target tokens (or over ``num_items_in_batch``, which the trainer then
    counts weighted too). All weights 1 give the unweighted loss; a row of weight 0 adds nothing to the sum nor to
    the count.

    None when the model has no separate LM head.
    """
    import torch
    import torch.nn.functional as F

    causal = _causal_lm(model)
    labels = inputs.get("labels")
    if causal is None or labels is None:
        return None
    n = shared_prefix_len(inputs) if _prefix_sharing_ok(causal) else 0
    if n:
        hidden = _shared_prefix_hidden(causal, inputs, n)
        targets = labels[:, n + 1:]
    else:
        body_inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "position_ids")}
        hidden = causal.model(**body_inputs, use_cache=False).last_hidden_state
        targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    logits = causal.lm_head(hidden[:, :-1][mask]).float()
    if weights is None:
        loss = F.cross_entropy(logits, targets[mask], reduction="sum")
        denom = num_items_in_batch if num_items_in_batch is not None else mask.sum().clamp(min=1)
    else:
        token_w = weights.to(logits.device, torch.float32).unsqueeze(1).expand(mask.shape)[mask]
        loss = (F.cross_entropy(logits, targets[mask], reduction="none") * token_w).sum()
        denom = num_items_in_batch if num_items_in_batch is not None else token_w.sum()
        if not torch.is_tensor(denom):
            denom = torch.tensor(float(denom))
        denom = torch.where(denom > 0, denom, torch.ones_like(denom))  # only weight-0 rows: a loss of 0
    if hasattr(denom, "to"):
        denom = denom.to(loss.device)
    return loss / denom


def _train_trl(dataset: BuiltDataset, cfg: SFTConfig, scratch: Path, on_step: OnStep | None) -> dict[str, Any]:
    on_cuda = cuda_available()
    model, tokenizer = load_base_for_training(cfg, on_cuda)
    model = make_lora_model(model, cfg)
    return _run_phases(model, tokenizer, dataset, cfg, scratch, on_step, on_cuda=on_cuda,
                       make=lambda ex, ph, cbs: make_trl_trainer(model, tokenizer, ex, cfg, ph, scratch,
                                                                 on_cuda=on_cuda, callbacks=cbs))


# ---------------------------------------------------------------------------------------------------- unsloth


def _train_unsloth(dataset: BuiltDataset, cfg: SFTConfig, scratch: Path, on_step: OnStep | None) -> dict[str, Any]:
    _import_unsloth()  # first: it patches transformers/TRL/PEFT
    from unsloth import FastLanguageModel

    base = _resolve_base(cfg.tier3_base_model)
    try:
        # use_exact_model_name: without it unsloth swaps a hub name for its own re-upload (another download,
        # and a cache miss offline); a local folder is used as it is either way
        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=base, max_seq_length=cfg.tier3_max_seq_len, load_in_4bit=cfg.tier3_load_in_4bit,
            dtype=None, use_exact_model_name=True)  # dtype None: bf16 where the GPU has it
    except (OSError, ValueError, RuntimeError, NotImplementedError) as exc:  # unsupported models: the last two
        raise BaseModelError(f"unsloth cannot load base model {base!r} (TIER3_BASE_MODEL): "
                             f"{type(exc).__name__}: {exc}") from exc
    # "all-linear" goes to unsloth as it is: it resolves it per architecture (fused projections included)
    model = FastLanguageModel.get_peft_model(
        model, r=cfg.tier3_lora_r, lora_alpha=cfg.tier3_lora_alpha, lora_dropout=cfg.tier3_lora_dropout,
        target_modules=cfg.target_modules, bias="none",
        use_gradient_checkpointing="unsloth" if cfg.tier3_gradient_checkpointing else False,
        random_state=cfg.tier3_seed)
    def make(examples: list[dict[str, Any]], phase: Phase, cbs: list[Any]) -> Any:
        from datasets import Dataset
        from trl import SFTTrainer

        if any(WEIGHT_COLUMN in ex for ex in examples):  # choose_backend keeps weighted phases away from here
            raise BackendUnavailable(f"phase {phase}: unsloth takes no per-example loss weights; set "
                                     "TIER3_RATIONALE_WEIGHT to 1 or 0, or TIER3_BACKEND=trl")
        # the same tokenized rows as the TRL path: the response mask comes from the template's own token
        # positions (chat_tokens), not from searching the text for a turn header as train_on_responses_only does
        args = _trl_args(cfg, phase, scratch, on_cuda=True, assistant_only=False, unsloth=True)
        return SFTTrainer(model=model, args=args,
                          train_dataset=Dataset.from_list(tokenized_examples(tokenizer, examples)),
                          processing_class=tokenizer, callbacks=cbs)

    return _run_phases(model, tokenizer, dataset, cfg, scratch, on_step, on_cuda=True, make=make)


# ---------------------------------------------------------------------------------------------------- shared loop


def _run_phases(model: Any, tokenizer: Any, dataset: BuiltDataset, cfg: SFTConfig, scratch: Path,
                on_step: OnStep | None, *, on_cuda: bool,
                make: Callable[[list[dict[str, Any]], Phase, list[Any]], Any]) -> dict[str, Any]:
    """Train the curriculum phases in order on the same LoRA model; return counters for TrainResult."""
    from transformers import PrinterCallback

    examples = {p.kind: phase_examples(dataset, p.kind, rationale_weight=cfg.tier3_rationale_weight)
                for p in dataset.phases}
    total = sum(_steps_per_phase(len(examples[p.kind]), p, cfg) for p in dataset.phases)
    steps = 0
    tokens = 0
    train_wall_s = 0.0
    phase_losses: dict[str, float] = {}
    last_loss = float("nan")
    eot_checked = True
    bar = progress_bar(total, "training", "step")
    try:
        for i, phase in enumerate(dataset.phases, start=1):
            bar.set_description(f"training {phase}")
            trainer = make(examples[phase.kind], phase, [_Progress.make(on_step, steps, total, bar)])
            trainer.remove_callback(PrinterCallback)  # progress goes to on_step, not to stdout
            eot_ok = eot_label_check(trainer, tokenizer)
            eot_checked = eot_checked and eot_ok is not None
            if eot_ok is False:
                eot_names = sorted(end_of_turn_ids(tokenizer).values())
                raise BaseModelError(f"phase {i} ({phase}): no end-of-turn token ({eot_names}) is in "
                                     "the loss mask, so the student would never learn to stop; fix the chat template "
                                     "(end-of-turn inside {% generation %}) or the tokenizer's eos token")
            log.info("phase %d/%d (%s): %d examples", i, len(dataset.phases), phase, len(examples[phase.kind]))
            t0 = time.perf_counter()
            try:
                out = trainer.train()
            except (RuntimeError, ValueError, FloatingPointError) as exc:  # OOM is a RuntimeError subclass
                raise TrainingFailed(f"phase {i} ({phase}) failed: {type(exc).__name__}: {exc}") from exc
            train_wall_s += time.perf_counter() - t0
            last_loss = float(out.training_loss)
            if not math.isfinite(last_loss):
                raise TrainingFailed(f"phase {i} ({phase}): training loss is {last_loss}")
            phase_losses[f"{i}:{phase.kind}"] = last_loss
            steps += int(trainer.state.global_step)
            tokens += round(_dataset_tokens(trainer) * phase.epochs)
    finally:
        bar.close()
    if on_step is not None:
        on_step(total, total)
    return {"model": model, "tokenizer": tokenizer, "steps": steps, "tokens": tokens, "train_wall_s": train_wall_s,
            "phase_losses": phase_losses, "train_loss": last_loss, "on_cuda": on_cuda,
            "n_examples": {p.kind: len(examples[p.kind]) for p in dataset.phases}, "eot_checked": eot_checked}


def train(dataset: BuiltDataset, cfg: SFTConfig, out_dir: Path, *, on_step: OnStep | None = None) -> TrainResult:
    """Train a LoRA adapter on ``dataset`` and publish it atomically as ``out_dir/adapter``.

    ``on_step(step, total_steps)`` is called after every optimiser step (from the training thread). Raises a
    :class:`trainer.errors.TrainerError` leaf; nothing is left at ``out_dir/adapter`` by a failed run unless a
    previous successful run left it there.
    """
    t_start = time.perf_counter()
    if dataset.n_train == 0:
        raise EmptyDataset("no training example (all traces were holdout, duplicates or unusable)")
    backend = choose_backend(cfg)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".scratch-", dir=out_dir))
    try:
        run = (_train_unsloth if backend == "unsloth" else _train_trl)(dataset, cfg, scratch, on_step)
        hyper = _hyperparameters(cfg, backend, run, dataset)
        adapter = _write_adapter(run["model"], run["tokenizer"], out_dir, {
            "base_model": _resolve_base(cfg.tier3_base_model), "backend": backend, "dataset_sha256": dataset.sha256,
            "prompt_format": prompt_format(dataset.phases),
            "hyperparameters": hyper, "phase_losses": run["phase_losses"]})
    except TrainerError:
        raise
    except MemoryError as exc:
        raise TrainingFailed(f"out of memory: {exc}") from exc
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return TrainResult(
        adapter_dir=adapter, backend=backend, steps=run["steps"], train_loss=run["train_loss"],
        tokens=run["tokens"], wall_s=time.perf_counter() - t_start, hyperparameters=hyper,
        phase_losses=run["phase_losses"], eot_in_loss=run["eot_checked"], train_wall_s=run["train_wall_s"])


def _hyperparameters(cfg: SFTConfig, backend: str, run: dict[str, Any], dataset: BuiltDataset) -> dict[str, Any]:
    import peft
    import torch
    import transformers
    import trl

    return {
        **cfg.hyperparameters(),
        "tier3_base_model": _resolve_base(cfg.tier3_base_model),
        "backend": backend,
        "device": "cuda" if run["on_cuda"] else "cpu",
        "dtype": str(_torch_dtype(run["on_cuda"])).removeprefix("torch."),
        "phases": [{"kind": p.kind, "epochs": p.epochs} for p in dataset.phases],
        "prompt_format": prompt_format(dataset.phases),  # the instruction the student is to be prompted with
        **({"rationale_weighting": _rationale_weighting(cfg, backend)}
           if any(p.kind == "multitask" for p in dataset.phases) else {}),
        "n_examples": run["n_examples"],
        "assistant_only_loss": True,
        "eot_in_loss_checked": run["eot_checked"],
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
                     "peft": peft.__version__},
    }


# ---------------------------------------------------------------------------------------------------- manifest


def _rationale_weighting(cfg: SFTConfig, backend: str) -> str:
    """How a multitask phase's rationale weight was applied (for the manifest)."""
    w = cfg.tier3_rationale_weight
    if w == 0:
        return "rationale examples left out (weight 0)"
    if w == 1:
        return "equal (weight 1, plain SFT)"
    return f"per-example loss weight {w:g} ({backend}: target_only_loss)"
