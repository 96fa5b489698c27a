"""GPU training benchmark: unsloth vs TRL + PEFT on a randomly initialised model of real size (no download).

The model is built from a config with the shapes of Llama-3.2-1B (default) or Qwen2.5-1.5B, random weights in
bf16, and the project's tiny tokenizer (its ids are all < the real vocabulary size, so the embedding and LM head
keep their real size and cost). 100 synthetic traces, 3 epochs (the default curriculum: answer-only x1, then
reasoning + answer x2), LoRA r=16 on all linear layers, loss on the assistant turns only: the production
training path, timed end to end (model load + training + adapter write) and for the training loop alone.

Each backend runs in its own process (unsloth patches transformers/TRL/PEFT when imported, and the peak GPU
memory must be per backend). Prints one JSON object with wall time, tokens/s and peak GPU memory per backend,
their ratios, and the targets (the original system: ~5 min and ~8 GB per 100 traces; tier3's goal on an H100:
<= 30 s and <= 6 GB).

    .venv/bin/python bench/train_gpu.py [--arch llama-3.2-1b|qwen2.5-1.5b] [--traces 100] [--backends unsloth,trl]
                                        [--batch-size 4] [--load-in-4bit]

Needs a CUDA GPU (exits with status 2 and a JSON error otherwise) and, for the unsloth arm, ``pip install
'tier3[gpu]'`` (the arm is reported as skipped with the reason when unsloth is missing).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Shapes from the public configs (no weights, no download).
ARCHS: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 2048,
        "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 64, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
        "hidden_act": "silu",
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192},
    },
    "qwen2.5-1.5b": {
        "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "vocab_size": 151936, "hidden_size": 1536,
        "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "hidden_act": "silu",
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    },
}

ORIGINAL = {"wall_s": 300.0, "peak_gpu_gib": 8.0}  # the original system, per 100 traces
GOAL = {"wall_s": 30.0, "peak_gpu_gib": 6.0}  # tier3's goal on an H100


def _fail(msg: str, code: int = 2) -> None:
    print(json.dumps({"bench": "train_gpu", "error": msg}))
    sys.exit(code)


def build_random_model(arch: str, folder: Path, device: str = "cuda") -> Path:
    """A real-size model with random bf16 weights and the tiny tokenizer, saved as a normal model folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from trainer.tiny_model import cached_tiny_model

    tiny = cached_tiny_model()
    shape = dict(ARCHS[arch])
    model_type = shape.pop("model_type")
    config = AutoConfig.for_model(model_type, **shape, bos_token_id=None, eos_token_id=2, pad_token_id=0,
                                  dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU: seconds instead of minutes on CPU
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.generation_config.eos_token_id = 2
    model.save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tiny / name).exists():
            shutil.copy(tiny / name, folder / name)
    return folder


def backend_config(backend: str, base: Path, batch_size: int, load_in_4bit: bool) -> Any:
    """The SFTConfig of one arm. QLoRA is unsloth's: the TRL arm always trains in 16-bit (SFTConfig refuses
    4-bit with TRL), so ``--load-in-4bit`` reaches the unsloth arm only."""
    from trainer.sft_config import SFTConfig

    return SFTConfig(tier3_base_model=str(base), tier3_backend=backend,  # type: ignore[arg-type]
                     tier3_batch_size=batch_size, tier3_load_in_4bit=load_in_4bit and backend == "unsloth")


def child_command(backend: str, base: Path, traces: int, batch_size: int, load_in_4bit: bool) -> list[str]:
    cmd = [sys.executable, __file__, "--child", backend, "--base", str(base), "--traces", str(traces),
           "--batch-size", str(batch_size)]
    return cmd + (["--load-in-4bit"] if load_in_4bit and backend == "unsloth" else [])


def run_backend(backend: str, base: Path, traces: int, batch_size: int, load_in_4bit: bool) -> dict[str, Any]:
    """Child process: one training run with ``backend``; returns its figures."""
    t_process = time.perf_counter()
    import torch

    from tests.synthetic import synthetic_traces
    from trainer.dataset import build_dataset
    from trainer.sft_trainer import train

    cfg = backend_config(backend, base, batch_size, load_in_4bit)
    with tempfile.TemporaryDirectory() as tmp:
        ds = build_dataset(synthetic_traces(traces), cfg, Path(tmp) / "data")
        torch.cuda.reset_peak_memory_stats()
        r = train(ds, cfg, Path(tmp))
        peak_alloc = torch.cuda.max_memory_allocated()
        peak_reserved = torch.cuda.max_memory_reserved()
    return {
        "backend": r.backend, "load_in_4bit": cfg.tier3_load_in_4bit, "wall_s": r.wall_s,
        "train_wall_s": r.train_wall_s, "tokens": r.tokens,
        "tokens_per_s": r.tokens_per_s, "steps": r.steps, "final_loss": r.train_loss, "phase_losses": r.phase_losses,
        "peak_gpu_allocated_gib": peak_alloc / 2**30, "peak_gpu_reserved_gib": peak_reserved / 2**30,
        "process_wall_s": time.perf_counter() - t_process, "n_train": ds.n_train,
        "versions": r.hyperparameters.get("versions"), "dtype": r.hyperparameters.get("dtype"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=sorted(ARCHS), default="llama-3.2-1b")
    ap.add_argument("--traces", type=int, default=100)
    ap.add_argument("--backends", default="unsloth,trl")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--load-in-4bit", action="store_true", help="QLoRA (unsloth arm only)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--base", help=argparse.SUPPRESS)
    a = ap.parse_args()

    import torch

    if not torch.cuda.is_available():
        _fail("no CUDA GPU visible: this benchmark compares GPU backends and was not run "
              "(use bench/train_cpu.py on CPU)")
    if a.child:
        print(json.dumps(run_backend(a.child, Path(a.base), a.traces, a.batch_size, a.load_in_4bit)))
        return

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="tier3-gpu-bench-") as tmp:
        t0 = time.perf_counter()
        base = build_random_model(a.arch, Path(tmp) / a.arch)
        build_s = time.perf_counter() - t0
        for backend in [b.strip() for b in a.backends.split(",") if b.strip()]:
            if backend == "unsloth" and importlib.util.find_spec("unsloth") is None:
                results[backend] = {"skipped": "unsloth is not installed (pip install 'tier3[gpu]')"}
                continue
            cmd = child_command(backend, base, a.traces, a.batch_size, a.load_in_4bit)
            env = {**os.environ, "UNSLOTH_AUTO_INSTALL": "0"}
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, check=False)
            if out.returncode != 0:
                results[backend] = {"failed": out.stderr[-3000:]}
                continue
            results[backend] = json.loads(out.stdout.strip().splitlines()[-1])

    ok = {k: v for k, v in results.items() if "wall_s" in v}
    report: dict[str, Any] = {
        "bench": "train_gpu", "arch": a.arch, "traces": a.traces, "phases": "answer:1,reasoning:2",
        "batch_size": a.batch_size, "load_in_4bit": a.load_in_4bit, "gpu": torch.cuda.get_device_name(0),
        "random_model_build_s": build_s, "results": results, "original_system": ORIGINAL, "goal_h100": GOAL,
        "meets_goal": {k: v["wall_s"] <= GOAL["wall_s"] and v["peak_gpu_reserved_gib"] <= GOAL["peak_gpu_gib"]
                       for k, v in ok.items()},
    }
    if "unsloth" in ok and "trl" in ok:
        u, t = ok["unsloth"], ok["trl"]
        report["unsloth_vs_trl"] = {"wall_speedup": t["wall_s"] / u["wall_s"],
                                    "train_speedup": t["train_wall_s"] / u["train_wall_s"],
                                    "memory_ratio": u["peak_gpu_reserved_gib"] / t["peak_gpu_reserved_gib"]}
    print(json.dumps(report, indent=2))
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
