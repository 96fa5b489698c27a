"""CPU training benchmark: tier3's LoRA SFT of the tiny model vs a full fine-tune baseline, same data, same run.

100 synthetic traces, 3 epochs (the default curriculum: answer-only x1, then reasoning + answer x2), TRL + PEFT
on CPU. Each variant runs in its own process (clean peak-memory figure, no shared warm caches), one after the
other; the JSON printed at the end has wall time, tokens/s and peak RSS for each, and the ratios.

    .venv/bin/python bench/train_cpu.py [--traces 100] [--phases answer:1,reasoning:2] [--repeat 1]

Variants:
- ``lora``: ``trainer.sft_trainer.train`` as the trainer runs it (LoRA r=16 on all linear layers, assistant-only
  loss, adapter written atomically);
- ``full``: the baseline: every weight trained (no LoRA), same TRL trainer, data, loss mask and schedule.
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


def run_variant(variant: str, n_traces: int, phases: str) -> dict[str, Any]:
    t_process = time.perf_counter()
    import torch

    from trainer.dataset import build_dataset, phase_examples
    from trainer.sft_config import SFTConfig
    from trainer.sft_trainer import load_base_for_training, make_trl_trainer, train
    from trainer.synthetic import synthetic_traces
    from trainer.tiny_model import cached_tiny_model

    import_s = time.perf_counter() - t_process
    base = cached_tiny_model()
    cfg = SFTConfig(tier3_base_model=str(base), tier3_backend="trl", tier3_phases=phases)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        ds = build_dataset(synthetic_traces(n_traces), cfg, out / "data")
        if variant == "lora":
            r = train(ds, cfg, out)
            res: dict[str, Any] = {"wall_s": r.wall_s, "train_wall_s": r.train_wall_s, "tokens": r.tokens,
                                   "steps": r.steps, "final_loss": r.train_loss, "trainable_params": None}
        elif variant == "full":
            t0 = time.perf_counter()
            model, tok = load_base_for_training(cfg, on_cuda=False)
            train_wall_s, tokens, steps, loss = 0.0, 0, 0, float("nan")
            for phase in ds.phases:
                trainer = make_trl_trainer(model, tok, phase_examples(ds, phase.kind), cfg, phase, out / "scratch",
                                           on_cuda=False)
                t1 = time.perf_counter()
                o = trainer.train()
                train_wall_s += time.perf_counter() - t1
                tokens += round(sum(len(x) for x in trainer.train_dataset["input_ids"]) * phase.epochs)
                steps += trainer.state.global_step
                loss = float(o.training_loss)
            model.save_pretrained(out / "full")  # what a full fine-tune must publish: every weight
            res = {"wall_s": time.perf_counter() - t0, "train_wall_s": train_wall_s, "tokens": tokens,
                   "steps": steps, "final_loss": loss,
                   "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
        else:
            raise SystemExit(f"unknown variant {variant!r}")
        if variant == "lora":
            from peft import PeftModel  # count what LoRA trains, for the comparison
            from transformers import AutoModelForCausalLM

            m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(out / "adapter"))
            res["trainable_params"] = sum(p.numel() for n, p in m.named_parameters() if "lora_" in n)
        res["published_bytes"] = sum(p.stat().st_size for p in (out / ("adapter" if variant == "lora" else "full"))
                                     .iterdir())
    res.update({
        "variant": variant, "tokens_per_s": res["tokens"] / res["train_wall_s"] if res["train_wall_s"] else 0.0,
        "import_s": import_s, "process_wall_s": time.perf_counter() - t_process, "peak_rss_mib": _peak_rss_mib(),
        "torch_threads": torch.get_num_threads(), "n_train": ds.n_train, "n_holdout": ds.n_holdout,
    })
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--traces", type=int, default=100)
    ap.add_argument("--phases", default="answer:1,reasoning:2", help="curriculum (default: 3 epochs in all)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per variant (the median is reported)")
    ap.add_argument("--variant", help=argparse.SUPPRESS)  # child mode
    a = ap.parse_args()
    if a.variant:
        print(json.dumps(run_variant(a.variant, a.traces, a.phases)))
        return

    from trainer.tiny_model import cached_tiny_model

    cached_tiny_model()  # built once, outside the timings
    results: dict[str, list[dict[str, Any]]] = {"lora": [], "full": []}
    for _ in range(a.repeat):
        for variant in results:  # interleaved, so a noisy neighbour hurts both alike
            out = subprocess.run([sys.executable, __file__, "--variant", variant, "--traces", str(a.traces),
                                  "--phases", a.phases], capture_output=True, text=True, cwd=ROOT, check=False)
            if out.returncode != 0:
                sys.exit(f"variant {variant} failed:\n{out.stderr[-4000:]}")
            results[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))

    def median(variant: str) -> dict[str, Any]:
        runs = sorted(results[variant], key=lambda r: r["train_wall_s"])
        return runs[len(runs) // 2]

    lora, full = median("lora"), median("full")
    report = {
        "bench": "train_cpu", "traces": a.traces, "phases": a.phases, "repeat": a.repeat,
        "machine": {"cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0], "python": platform.python_version()},
        "lora": lora, "baseline_full_finetune": full,
        "lora_vs_full": {
            "train_wall_speedup": full["train_wall_s"] / lora["train_wall_s"],
            "tokens_per_s_ratio": lora["tokens_per_s"] / full["tokens_per_s"],
            "trainable_params_ratio": lora["trainable_params"] / full["trainable_params"],
            "published_bytes_ratio": lora["published_bytes"] / full["published_bytes"],
        },
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
