"""CPU training speed: tier3's LoRA SFT vs a plain transformers ``Trainer`` + PEFT baseline, same run, same data.

Both train the same LoRA (the product defaults: rank 16 on all linear layers) of the same base model
(``TIER3_BASE_MODEL``, default SmolLM2-135M-Instruct) on the same widget-selector examples with the same loss
(the assistant turn only, its end-of-turn token included), learning rate and epochs. What differs is how:

- ``tier3``: ``trainer.sft_trainer.train`` as the trainer runs it: TRL's SFTTrainer with assistant-only loss,
  batches of ``TIER3_BATCH_SIZE`` (default 8) whose shared prompt prefix (the task's system prompt, ~550 of
  ~640 tokens) is run once per batch and reused by every row (same loss and gradients), and the LM head applied
  only where there is a target (prompt positions never build 49k-wide logits);
- ``baseline``: a plain ``transformers.Trainer`` over the PEFT model: the chat template tokenized, the prompt
  masked with -100, ``DataCollatorForSeq2Seq`` padding each batch of ``--baseline-batch`` to its longest example,
  and the model's own loss (full logits).

tokens/s counts real tokens only (prompt + completion, no padding), over the optimiser loop's wall time. The
variants alternate (``--repeat``), each in its own process; the median per variant is reported, with the machine
load, since other processes on a shared machine slow both.

    .venv/bin/python bench/train_cpu.py [--traces 16] [--phases answer:1] [--repeat 1] [--baseline-batch 4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _traces(n: int) -> list[Any]:
    sys.path.insert(0, str(ROOT / "bench"))
    from quality import load_traces, split  # the same example data as bench/quality.py

    pool, _ = split(load_traces(), 24)
    return pool[:n]


def run_tier3(cfg: Any, ds: Any, out: Path) -> dict[str, Any]:
    from trainer.sft_trainer import train

    r = train(ds, cfg, out)
    return {"train_wall_s": r.train_wall_s, "tokens": r.tokens, "steps": r.steps, "final_loss": r.train_loss}


def run_baseline(cfg: Any, ds: Any, out: Path, batch: int) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    from trainer.dataset import phase_examples
    from trainer.models import resolve_base_model

    base = resolve_base_model(cfg.tier3_base_model)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    set_seed(cfg.tier3_seed)
    model = get_peft_model(model, LoraConfig(r=cfg.tier3_lora_r, lora_alpha=cfg.tier3_lora_alpha,
                                             lora_dropout=cfg.tier3_lora_dropout, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    train_wall_s, tokens, steps, loss = 0.0, 0, 0, float("nan")
    for phase in ds.phases:
        rows = []
        for ex in phase_examples(ds, phase.kind):
            msgs = ex["messages"]
            prompt = tok.apply_chat_template(msgs[:-1], add_generation_prompt=True, tokenize=False)
            full = tok.apply_chat_template(msgs, tokenize=False)
            # the assistant content and its end of turn are the targets (the trailing newline is not)
            full = full[: full.rindex(tok.eos_token) + len(tok.eos_token)]
            p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
            ids = tok(full, add_special_tokens=False)["input_ids"][: cfg.tier3_max_seq_len]
            labels = [-100] * len(p_ids) + ids[len(p_ids):]
            rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels[: len(ids)]})
        from datasets import Dataset

        args = TrainingArguments(output_dir=str(out / "scratch"), num_train_epochs=phase.epochs,
                                 per_device_train_batch_size=batch, learning_rate=cfg.tier3_learning_rate,
                                 lr_scheduler_type=cfg.tier3_lr_scheduler, warmup_steps=cfg.tier3_warmup_ratio,
                                 logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                                 seed=cfg.tier3_seed, disable_tqdm=True, dataloader_num_workers=0)
        trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                          data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100))
        t0 = time.perf_counter()
        o = trainer.train()
        train_wall_s += time.perf_counter() - t0
        tokens += round(sum(len(r["input_ids"]) for r in rows) * phase.epochs)
        steps += trainer.state.global_step
        loss = float(o.training_loss)
    return {"train_wall_s": train_wall_s, "tokens": tokens, "steps": steps, "final_loss": loss}


def run_variant(variant: str, a: argparse.Namespace) -> dict[str, Any]:
    import torch

    from trainer.dataset import build_dataset
    from trainer.sft_config import SFTConfig

    cfg = SFTConfig(tier3_backend="trl", tier3_phases=a.phases, tier3_holdout_fraction=0.0)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        ds = build_dataset(_traces(a.traces), cfg, out / "data")
        load0 = os.getloadavg()[0]
        res = run_tier3(cfg, ds, out) if variant == "tier3" else run_baseline(cfg, ds, out, a.baseline_batch)
    res.update({"variant": variant, "tokens_per_s": res["tokens"] / res["train_wall_s"],
                "peak_rss_mib": _peak_rss_mib(), "torch_threads": torch.get_num_threads(),
                "load_avg_1m_start": load0, "load_avg_1m_end": os.getloadavg()[0]})
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--traces", type=int, default=16)
    ap.add_argument("--phases", default="answer:1", help="curriculum of both variants")
    ap.add_argument("--repeat", type=int, default=1, help="runs per variant (the median is reported)")
    ap.add_argument("--baseline-batch", type=int, default=4, help="the baseline's per-device batch size")
    ap.add_argument("--variant", help=argparse.SUPPRESS)  # child mode
    a = ap.parse_args()
    if a.variant:
        print(json.dumps(run_variant(a.variant, a)))
        return

    from trainer.models import resolve_base_model
    from trainer.sft_config import SFTConfig

    base = resolve_base_model(SFTConfig().tier3_base_model)  # pulled once, outside the timings
    results: dict[str, list[dict[str, Any]]] = {"tier3": [], "baseline": []}
    for _ in range(a.repeat):
        for variant in results:  # interleaved, so a noisy neighbour hurts both alike
            out = subprocess.run([sys.executable, __file__, "--variant", variant, "--traces", str(a.traces),
                                  "--phases", a.phases, "--baseline-batch", str(a.baseline_batch)],
                                 capture_output=True, text=True, cwd=ROOT, check=False)
            if out.returncode != 0:
                sys.exit(f"variant {variant} failed:\n{out.stderr[-4000:]}")
            results[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))

    def median(variant: str) -> dict[str, Any]:
        runs = sorted(results[variant], key=lambda r: r["tokens_per_s"])
        return runs[len(runs) // 2]

    t3, bl = median("tier3"), median("baseline")
    print(json.dumps({
        "bench": "train_cpu", "base_model": base, "traces": a.traces, "phases": a.phases, "repeat": a.repeat,
        "baseline_batch": a.baseline_batch,
        "machine": {"cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0], "python": platform.python_version()},
        "tier3": t3, "baseline_trainer_peft": bl,
        "tokens_per_s_ratio": t3["tokens_per_s"] / bl["tokens_per_s"], "goal": ">= 1.5",
        "all_runs": results,
    }, indent=2))


if __name__ == "__main__":
    main()
